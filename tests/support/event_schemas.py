"""The JSON Schema of a table's events as ``wal-listener schema`` prints it, and events checked against it
with the ``jsonschema`` library (draft 2020-12, formats asserted where the library can)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
import yaml
from jsonschema import Draft202012Validator

from tests.support.harness import run_cli


def printed_schema(cfg: dict[str, Any], workdir: Path, *tables: str) -> dict[str, Any]:
    """What ``wal-listener schema TABLE...`` prints for the listener config ``cfg``."""
    path = workdir / f"config-{uuid.uuid4().hex[:6]}.yml"
    path.write_text(yaml.safe_dump(cfg))
    done = run_cli(["schema", *tables, "--config", str(path)])
    assert done.returncode == 0, done.stderr
    schema: dict[str, Any] = orjson.loads(done.stdout)
    return schema


def validator(schema: dict[str, Any]) -> Draft202012Validator:
    Draft202012Validator.check_schema(schema)  # a valid draft 2020-12 schema itself
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def assert_valid(schema: dict[str, Any], events: Iterable[dict[str, Any]]) -> None:
    check = validator(schema)
    problems = [(event.get("action"), f"{'/'.join(map(str, e.absolute_path))}: {e.message}"[:300])
                for event in events for e in check.iter_errors(event)]
    assert not problems, problems


def is_valid(schema: dict[str, Any], event: dict[str, Any]) -> bool:
    return bool(validator(schema).is_valid(event))
