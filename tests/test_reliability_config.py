"""Config fuzzing through the real command line: every broken config is refused with one line on
stderr and exit code 2 — never a traceback, never a start with a silent default. (Key-by-key unit
cases are in tests/test_config.py; the first CLI cases in tests/test_listener_process.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.harness import run_cli

GOOD: dict[str, dict[str, Any]] = {
    "listener": {"slotName": "slot_1", "serverPort": 0},
    "database": {"host": "127.0.0.1", "port": 1, "name": "db", "user": "u"},
    "publisher": {"type": "nats", "address": "127.0.0.1:1", "topic": "t"},
    "monitoring": {"promAddr": ""},
}


def _with(section: str, key: str, value: object) -> str:
    data = {k: dict(v) for k, v in GOOD.items()}
    data[section][key] = value
    return yaml.safe_dump(data)


# (case id, file content as bytes or text, what the one line must say)
CASES: list[tuple[str, str | bytes, str]] = [
    ("unclosed-flow-mapping", "listener: {slotName: a\n", "is not valid YAML at line"),
    ("tab-indentation", "listener:\n\tslotName: a\n", "is not valid YAML at line 2"),
    ("python-tag", '!!python/object/apply:os.system ["echo pwned"]\n', "could not determine a constructor"),
    ("not-utf8", b"listener:\n  slotName: a\n\xff\xfe\x00\n", "is not UTF-8 text"),
    ("nested-too-deeply", "listener: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
    ("top-level-list", "- listener\n- database\n", "must hold a mapping of sections"),
    ("section-is-a-string", yaml.safe_dump({**GOOD, "listener": "slot_1"}), "listener = 'slot_1' is invalid"),
    ("int-as-words", _with("listener", "maxInFlight", "lots"), "listener.maxInFlight = 'lots' is invalid"),
    ("port-out-of-range", _with("listener", "serverPort", 70000), "listener.serverPort = 70000 is invalid"),
    ("infinite-number", _with("listener", "batchSize", float("inf")), "listener.batchSize = inf is invalid"),
    ("zero-in-flight", _with("listener", "maxInFlight", 0), "listener.maxInFlight = 0 is invalid"),
    ("duration-as-words", _with("listener", "ackTimeout", "soon"), "listener.ackTimeout = 'soon' is invalid"),
    ("negative-duration", _with("listener", "heartbeatInterval", "-5s"), "listener.heartbeatInterval = '-5s'"),
    ("bool-as-words", _with("listener", "emitHeartbeat", "perhaps"), "listener.emitHeartbeat = 'perhaps'"),
    ("tables-as-list", _with("listener", "filter", {"tables": ["users"]}), "listener.filter.tables = ['users']"),
    ("topics-map-as-string", _with("listener", "topicsMap", "x"), "listener.topicsMap = 'x' is invalid"),
    ("on-error-unknown", _with("listener", "onError", "ignore"), "listener.onError = 'ignore' is not allowed"),
    ("skip-without-dead-letter", _with("listener", "onError", "skip"), "listener.deadLetterTopic is required"),
    ("slot-with-dash", _with("listener", "slotName", "my-slot"), "listener.slotName = 'my-slot' is invalid"),
    ("slot-with-sql", _with("listener", "slotName", 'x"; DROP TABLE t; --'), "listener.slotName = 'x\"; DROP"),
    ("slot-not-ascii", _with("listener", "slotName", "slöt"), "listener.slotName = 'slöt' is invalid"),
    ("slot-too-long", _with("listener", "slotName", "s" * 64), "must be 1-63 characters"),
    ("slot-empty", _with("listener", "slotName", ""), "listener.slotName = '' is invalid"),
    ("slot-as-number", _with("listener", "slotName", 123), "listener.slotName = 123 is invalid"),
    ("topic-with-space", _with("publisher", "topic", "a b"), "publisher.topic = 'a b' is invalid"),
    ("prom-addr-garbage", _with("monitoring", "promAddr", "everywhere"), "monitoring.promAddr = 'everywhere'"),
    ("typo-of-a-required-key",
     yaml.safe_dump({**GOOD, "listener": {"slotNme": "slot_1"}}),
     "listener.slotName is required but missing; set it in the file or as WAL_LISTENER_SLOTNAME "
     "(the file has listener.slotNme: did you mean listener.slotName?)"),
]


@pytest.mark.parametrize(("content", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_broken_config_is_one_line_and_exit_2(tmp_path: Path, content: str | bytes, expected: str) -> None:
    path = tmp_path / "config.yml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    result = run_cli(["--config", str(path)], timeout=30)
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wal-listener: config: "), result.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.stderr and "pwned" not in result.stdout + result.stderr


def test_unknown_keys_are_warned_with_did_you_mean_and_the_listener_starts(tmp_path: Path) -> None:
    data = {k: dict(v) for k, v in GOOD.items()}
    data["listener"]["refreshConection"] = "5s"
    data["publsher"] = {"topic": "x"}
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(data))
    result = run_cli(["--config", str(path), "check-config"], timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "config: unknown key listener.refreshConection is ignored; did you mean listener.refreshConnection?",
        "config: unknown key publsher is ignored; did you mean publisher?",
    ]
    assert "refreshConnection: 30s" in result.stdout  # the typo did not change anything


def test_a_config_with_several_problems_names_each_on_its_own_line(tmp_path: Path) -> None:
    """Every problem at once, one line each, instead of one per attempt."""
    data = {k: dict(v) for k, v in GOOD.items()}
    data["listener"].update(serverPort=70000, slotName="Bad-Slot")
    data["database"]["port"] = "abc"
    del data["publisher"]["topic"]
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(data))
    result = run_cli(["--config", str(path)], timeout=30)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert [line.split(" ")[2] for line in lines] == [
        "listener.slotName", "listener.serverPort", "database.port", "publisher.topic"
    ], lines
    assert all(line.startswith("wal-listener: config: ") for line in lines), lines
    empty = tmp_path / "empty.yml"
    empty.write_text("")
    result = run_cli(["--config", str(empty)], timeout=30)
    assert result.returncode == 2
    assert [line.split(" ")[2] for line in result.stderr.strip().splitlines()] == [
        "listener", "database", "publisher"
    ], result.stderr
