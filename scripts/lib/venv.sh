# Sourced by scripts/test and scripts/demo: make .venv and install the project into it (editable) with
# the extras given, again only when pyproject.toml, setup.py or the C sources (listener/_hotpath_c/*.[ch])
# changed, or when the extras installed last are not among those that will do.
#   ensure_venv EXTRAS WHO [ALSO_FINE...]   e.g. ensure_venv demo scripts/demo dev  (dev includes demo)
ensure_venv() {
    local extras="$1" who="$2"
    shift 2
    if [[ ! -x .venv/bin/python ]]; then
        echo "$who: creating .venv" >&2
        python3 -m venv .venv
    fi
    local stamp=".venv/.wal-listener-installed" sources installed="" fine
    sources="$(cat pyproject.toml setup.py listener/_hotpath_c/*.[ch] | sha256sum | cut -d' ' -f1)"
    if [[ -f "$stamp" ]]; then
        read -r stamped installed < "$stamp" || true
        if [[ "$stamped" == "$sources" ]]; then
            for fine in "$extras" "$@"; do
                [[ "$installed" == "$fine" ]] && return 0
            done
        fi
    fi
    echo "$who: installing the project into .venv (extras: $extras)" >&2
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extras]"
    echo "$sources $extras" > "$stamp"
}
