"""What a new user types: the config from the environment alone, options after the subcommand, the example."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from listener.backfill import Request
from listener.backfill_cli import _Bar
from listener.config import Config, _leaf_paths, load_config

REPO = Path(__file__).resolve().parent.parent
ENV_ONLY = {
    "WAL_LISTENER_SLOTNAME": "s1",
    "WAL_DATABASE_NAME": "shop",
    "WAL_DATABASE_USER": "wal",
    "WAL_PUBLISHER_TYPE": "nats",
    "WAL_PUBLISHER_ADDRESS": "nats://nats:4222",
    "WAL_PUBLISHER_TOPIC": "events",
}


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("WAL_")}
    return subprocess.run(
        [sys.executable, "-m", "listener", *args], cwd=cwd, env={**base, **(env or {})}, capture_output=True, text=True
    )


def test_no_file_at_all_runs_from_the_environment(tmp_path: Path) -> None:
    run = _cli("check-config", cwd=tmp_path, env=ENV_ONLY)
    assert run.returncode == 0, run.stderr
    shown = yaml.safe_load(run.stdout)
    assert shown["listener"]["slotName"] == "s1" and shown["publisher"]["topic"] == "events"


def test_no_file_and_no_environment_says_where_it_looked(tmp_path: Path) -> None:
    run = _cli("check-config", cwd=tmp_path)
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1
    assert "no --config given, no config.yml here and no WAL_* variables set" in run.stderr
    assert "Traceback" not in run.stderr
    # some WAL_* variables, but not enough: what is missing, each on its line, after where it looked
    partial = _cli("check-config", cwd=tmp_path, env={"WAL_DATABASE_NAME": "shop"})
    lines = partial.stderr.strip().splitlines()
    assert partial.returncode == 2
    assert lines[0] == "wal-listener: config: no --config given and no config.yml here: the WAL_* variables alone"
    assert [line.split(" ")[2] for line in lines[1:]] == [
        "listener", "database.user", "publisher"
    ], lines


def test_config_yml_in_the_current_directory_is_the_default(tmp_path: Path) -> None:
    data = load_config(None, ENV_ONLY).to_yaml_dict()
    data["listener"]["slotName"] = "from_file"
    (tmp_path / "config.yml").write_text(yaml.safe_dump(data))
    run = _cli("check-config", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert yaml.safe_load(run.stdout)["listener"]["slotName"] == "from_file"


def test_global_options_go_before_or_after_the_subcommand(tmp_path: Path) -> None:
    example = str(REPO / "config_example.yml")
    before = _cli("--config", example, "check-config", cwd=tmp_path)
    after = _cli("check-config", "--config", example, cwd=tmp_path)
    short = _cli("check-config", "-c", example, cwd=tmp_path)
    assert before.returncode == after.returncode == short.returncode == 0, after.stderr
    assert before.stdout == after.stdout == short.stdout
    missing = _cli("check-config", "--config", str(tmp_path / "nope.yml"), cwd=tmp_path)
    assert missing.returncode == 2 and "nope.yml" in missing.stderr and "not found" in missing.stderr


def test_the_example_publishes_every_table_on_the_documented_subjects() -> None:
    """cp config_example.yml config.yml + editing database and publisher: everything is published."""
    warnings: list[str] = []
    cfg = load_config(REPO / "config_example.yml", {}, warnings)
    assert cfg.listener.filter.tables is None
    assert cfg.listener.topics_map == {}
    assert warnings == []
    assert cfg.database.password.get_secret_value() != cfg.database.user  # never taught: see the comment there


#: a commented-out key in config_example.yml: "  # key: value", the key indented as it would be
_COMMENTED_KEY = re.compile(r"^(\s*)# (\s*[A-Za-z][\w-]*:(?:\s|$))", re.MULTILINE)


def _key_paths(data: dict[str, Any], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    paths = set()
    for key, value in data.items():
        path = (*prefix, str(key))
        paths.add(path)
        if isinstance(value, dict) and key not in ("tables", "topicsMap"):  # their keys are table names
            paths |= _key_paths(value, path)
    return paths


def test_the_example_holds_every_key_of_the_model() -> None:
    """Each key of the config model is in config_example.yml, set or commented out, and nothing else is."""
    text = (REPO / "config_example.yml").read_text()
    every = yaml.safe_load(_COMMENTED_KEY.sub(r"\1\2", text))
    model = set(_leaf_paths((Config,)))
    in_file = _key_paths(every)
    assert sorted(".".join(p) for p in model - in_file) == []
    assert sorted(".".join(p) for p in in_file - model) == []


def test_config_yml_is_never_committed() -> None:
    assert "config.yml" in (REPO / ".gitignore").read_text().splitlines()


PUBSUB_ONLY = {
    "WAL_LISTENER_SLOTNAME": "s1",
    "WAL_DATABASE_NAME": "shop",
    "WAL_DATABASE_USER": "wal",
    "WAL_PUBLISHER_TYPE": "google_pubsub",
    "WAL_PUBLISHER_PUBSUBPROJECTID": "my-project",
    "WAL_PUBLISHER_TOPIC": "events",
}


def test_a_key_a_broker_does_not_use_is_not_required(tmp_path: Path) -> None:
    """google_pubsub needs no address (it was "publisher.address is required but missing")."""
    run = _cli("check-config", cwd=tmp_path, env=PUBSUB_ONLY)
    assert run.returncode == 0, run.stderr
    publisher = yaml.safe_load(run.stdout)["publisher"]
    assert publisher["pubSubProjectID"] == "my-project"
    # only the chosen broker's keys are shown
    assert not {"duplicateWindow", "exchangeKind", "saslMechanism", "partitions", "enableTLS"} & set(publisher)


def test_another_brokers_key_is_dropped_with_a_warning(tmp_path: Path) -> None:
    run = _cli("check-config", cwd=tmp_path, env={**PUBSUB_ONLY, "WAL_PUBLISHER_EXCHANGEKIND": "fanout"})
    assert run.returncode == 0, run.stderr
    assert "publisher.exchangeKind does nothing for publisher.type google_pubsub" in run.stderr
    assert "exchangeKind" not in yaml.safe_load(run.stdout)["publisher"]


def test_the_brokers_own_required_keys_are_named(tmp_path: Path) -> None:
    env = {**ENV_ONLY, "WAL_PUBLISHER_TYPE": "kafka"}
    del env["WAL_PUBLISHER_ADDRESS"]
    run = _cli("check-config", cwd=tmp_path, env=env)
    assert run.returncode == 2
    assert "publisher.address is required but missing" in run.stderr and "WAL_PUBLISHER_ADDRESS" in run.stderr
    bad = _cli("check-config", cwd=tmp_path, env={**ENV_ONLY, "WAL_PUBLISHER_TYPE": "redis"})
    assert "publisher.type = 'redis' is not allowed; use one of nats, kafka, rabbitmq, google_pubsub" in bad.stderr


def test_backfill_progress_is_shown_only_when_rows_move() -> None:
    bar = _Bar(io.StringIO())
    bar.EVERY = 0.0

    def running(rows: int) -> Request:
        return Request(1, "n", ("public.t",), "", "running", "public.t", None, (), rows, 0, 0, "")

    for _ in range(4):
        bar.update(running(0))
    assert bar.out.getvalue() == ""  # was "0 rows 0 rows/s public.t", four times for a one-chunk backfill
    bar.update(running(500))
    bar.update(running(500))
    (line,) = bar.out.getvalue().splitlines()
    assert re.fullmatch(r"500 rows [\d,]+ rows/s public\.t", line), line


def test_the_listeners_start_reads_no_package_metadata_and_the_versions_are_right() -> None:
    # psycopg, psycopg-binary and nats-py ask importlib.metadata for their versions when imported: the listener's
    # start answers from the .dist-info names instead (listener.lean) and never imports the real module
    code = (
        "import sys\n"
        "from listener import cli\n"
        "cli._import_lean()\n"
        "import listener.publishers.nats, psycopg, psycopg_binary, nats.aio.client\n"
        "print('importlib.metadata' in sys.modules, psycopg.__version__, psycopg_binary.__version__,"
        " nats.aio.client.__version__, psycopg.pq.__impl__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    import importlib.metadata

    expected = [importlib.metadata.version(name) for name in ("psycopg", "psycopg-binary", "nats-py")]
    assert done.stdout.split() == ["False", *expected, "binary"]


def test_the_metadata_stand_in_leaves_the_rest_to_the_real_module() -> None:
    import importlib.metadata

    from listener.lean import _VersionsOnly, metadata_versions_only

    lean = _VersionsOnly()
    assert lean.version("PSYCOPG.binary") == importlib.metadata.version("psycopg-binary")  # names as packaging
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        lean.version("no-such-distribution-here")
    assert lean.PackageNotFoundError is importlib.metadata.PackageNotFoundError
    scripts = importlib.metadata.entry_points(group="console_scripts")
    assert list(lean.entry_points(group="console_scripts")) == list(scripts)
    with metadata_versions_only():  # the real module was imported already: nothing to stand in for
        assert sys.modules["importlib.metadata"] is importlib.metadata
