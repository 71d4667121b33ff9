# Sourced by scripts/test and scripts/demo: make .venv and install the project into it (editable) with
# the extras given, again only when pyproject.toml, setup.py, the C source or the extras changed.
ensure_venv() {
    local extras="$1" who="$2"
    if [[ ! -x .venv/bin/python ]]; then
        echo "$who: creating .venv" >&2
        python3 -m venv .venv
    fi
    local stamp=".venv/.wal-listener-installed" want
    want="$( (cat pyproject.toml setup.py listener/_hotpath.c; echo "$extras") | sha256sum | cut -d' ' -f1)"
    if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
        echo "$who: installing the project into .venv" >&2
        .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extras]"
        echo "$want" > "$stamp"
    fi
}
