"""`wal-listener schema`: the JSON Schema (draft 2020-12) of a table's events, checked with the jsonschema library.

The type-coverage tables (tests/test_listener_nats.py, tests/test_reliability_input.py) validate every event
they read against it; here: the rules without a server, the command's output and refusals against PostgreSQL
15 and 18, and the events of a stream with SCHEMA events, unchanged TOAST values and a partitioned table.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml

from listener.event_schema import Document, EventColumn
from listener.types import PgType, TypeRegistry
from tests.support.event_schemas import assert_valid, is_valid, printed_schema, validator
from tests.support.harness import nats_config, read_stream, run_cli, running, sql, unique
from tests.support.services import Database, NatsServer

ID = "8f0e3a1c-0000-8000-8000-000000000001"
TIME = "2026-01-02T03:04:05.123456Z"

POSINT, MOOD, MOODS, AMOUNT = 90001, 90002, 90003, 90004


def registry() -> TypeRegistry:
    found = TypeRegistry()
    found.add(PgType(POSINT, "d", 23, 0, "N", ","))  # a domain over int4
    found.add(PgType(MOOD, "e", 0, 0, "E", ","))
    found.add(PgType(MOODS, "b", 0, MOOD, "A", ","))  # mood[]
    found.add(PgType(AMOUNT, "d", 1700, 0, "N", ","))  # a domain over numeric(10,2)
    found.add(PgType(22, "b", 0, 21, "A", ","))  # int2vector
    return found


COLUMNS = [
    EventColumn("id", 20, "bigint", True, False),
    EventColumn("n", 1700, "numeric", False, False),
    EventColumn("f", 701, "double precision", False, False),
    EventColumn("doc", 3802, "jsonb", False, True),
    EventColumn("at", 1184, "timestamp with time zone", False, False),
    EventColumn("local", 1114, "timestamp without time zone", False, False),
    EventColumn("tags", 1009, "text[]", False, True),
    EventColumn("grid", 1007, "integer[]", False, True),
    EventColumn("p", POSINT, "posint", False, False),
    EventColumn("m", MOOD, "mood", False, False),
    EventColumn("ms", MOODS, "mood[]", False, True),
    EventColumn("amount", AMOUNT, "amount", False, False),
    EventColumn("vec", 22, "int2vector", False, False),
    EventColumn("blob", 17, "bytea", False, True),
    EventColumn("u", 2950, "uuid", False, False),
    EventColumn("body", 25, "text", True, True),
]
ROW: dict[str, Any] = {
    "id": 1, "n": "12345678901234567890.000001", "f": "NaN", "doc": {"any": [1, None]}, "at": "2026-01-01T21:34:05.5Z",
    "local": "2026-01-02T03:04:05.123456", "tags": ["a", None], "grid": [[1, 2], [3, None]], "p": 42, "m": "happy",
    "ms": ["sad", None], "amount": "12.50", "vec": "1 2 3", "blob": "3q2+7wA=",
    "u": "0b2f6a84-7c2e-4b8e-9a4e-1c2d3e4f5a6b", "body": "x",
}


def schema_of(actions: list[str], schema_events: bool = False) -> dict[str, Any]:
    document = Document(registry(), {MOOD: ["sad", "happy"]})
    return document.finish({"public.t": document.table("public", "t", COLUMNS, actions, schema_events)})


def event(action: str, data: dict[str, Any], old: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": ID, "schema": "public", "table": "t", "action": action, "data": data, "dataOld": old or {},
            "commitTime": TIME}


def test_values_follow_the_conversion_rules() -> None:
    schema = schema_of(["INSERT", "READ"])
    validator(schema)
    assert is_valid(schema, event("INSERT", ROW)) and is_valid(schema, event("READ", ROW))
    nulls = {name: None for name in ROW if name not in ("id", "body")}
    assert is_valid(schema, event("INSERT", {**ROW, **nulls}))
    for value in ("infinity", "-infinity", "0001-01-01 00:00:00+00 BC", "294276-12-31T23:59:59.999999Z"):
        assert is_valid(schema, event("INSERT", {**ROW, "at": value})), value
    for value in ("Infinity", "-Infinity", 1.5, 0):
        assert is_valid(schema, event("INSERT", {**ROW, "f": value})), value
    wrong = {
        "id": ["1", None, 1.5], "n": [12.5, "1e5", "12,5"], "f": ["1.5", "nan"], "at": ["2026-01-01 21:34:05+00",
        "2026-01-01T21:34:05+05:30", 0], "local": ["2026-01-02 03:04:05"], "tags": ["a", [1]],
        "grid": [[1, "2"], [[1], ["x"]]], "p": ["42", 4.2], "m": ["angry"], "ms": [["angry"]], "amount": [12.5],
        "vec": [[1, 2, 3]], "blob": ["not base64!"], "u": ["not-a-uuid"], "body": [None, 5],
    }
    for column, values in wrong.items():
        for value in values:
            assert not is_valid(schema, event("INSERT", {**ROW, column: value})), (column, value)


def test_only_an_update_may_lack_a_column_stored_out_of_line() -> None:
    schema = schema_of(["INSERT", "UPDATE", "DELETE", "TRUNCATE"])
    toasted = {k: v for k, v in ROW.items() if k != "body"}
    assert not is_valid(schema, event("INSERT", toasted))
    assert is_valid(schema, event("UPDATE", toasted, {"id": 1}))
    assert not is_valid(schema, event("UPDATE", {k: v for k, v in ROW.items() if k != "n"}))  # never TOASTed
    assert is_valid(schema, event("UPDATE", ROW, ROW))  # REPLICA IDENTITY FULL
    assert is_valid(schema, event("DELETE", {}, {"id": 1}))
    assert not is_valid(schema, event("DELETE", ROW, {"id": 1}))
    assert is_valid(schema, event("TRUNCATE", {}))
    assert not is_valid(schema, event("READ", ROW))  # not among the actions given
    assert not is_valid(schema, event("UPDATE", toasted, {"id": "1"}))


def test_schema_events_are_one_more_kind_when_on() -> None:
    announced = {"id": ID, "schema": "public", "table": "t", "action": "SCHEMA", "commitTime": TIME,
                 "columns": [{"name": "id", "type": "bigint", "key": True}], "previous": None,
                 "replicaIdentity": "default"}
    assert is_valid(schema_of(["INSERT"], schema_events=True), announced)
    assert not is_valid(schema_of(["INSERT"]), announced)
    assert not is_valid(schema_of(["INSERT"], schema_events=True), {**announced, "replicaIdentity": "primary"})


def test_several_tables_make_one_document_each_event_valid_for_its_own() -> None:
    document = Document(registry(), {})
    tables = {
        "public.a": document.table("public", "a", [EventColumn("id", 23, "integer", True, False)], ["INSERT"], False),
        "shop/x.b~": document.table("shop/x", "b~", [EventColumn("id", 25, "text", True, True)], ["INSERT"], False),
    }
    schema = document.finish(tables)
    a = {"id": ID, "schema": "public", "table": "a", "action": "INSERT", "data": {"id": 1}, "dataOld": {},
         "commitTime": TIME}
    b = {**a, "schema": "shop/x", "table": "b~", "data": {"id": "1"}}
    assert is_valid(schema, a) and is_valid(schema, b)
    assert not is_valid(schema, {**a, "data": {"id": "1"}}) and not is_valid(schema, {**b, "data": {"id": 1}})


# -- the command, against PostgreSQL -------------------------------------------------------------------------


def _config_file(cfg: dict[str, Any], tmp_path: Path) -> str:
    path = tmp_path / f"{unique('cfg')}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.service
async def test_every_event_of_a_stream_validates_against_the_schema_of_every_published_table(
    fresh_any_db: Database, nats_server: NatsServer, tmp_path: Path
) -> None:
    """SCHEMA events, an UPDATE without its unchanged TOAST value, a partitioned table's events as its root."""
    dsn = fresh_any_db.dsn()
    await sql(dsn, "CREATE TABLE docs (id int PRIMARY KEY, title varchar(20) NOT NULL, body text, price numeric(10,2))",
              "ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL",
              "CREATE TABLE ev (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at)",
              "CREATE TABLE ev_1 PARTITION OF ev FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')")
    topic = unique("js")
    cfg = nats_config(fresh_any_db.server.port, fresh_any_db.name, nats_server.url, topic, schemaEvents=True)
    async with running(cfg):
        await sql(dsn, ("INSERT INTO docs VALUES (1, 'a', %s, 1.5)", ("x" * 20000,)),
                  "UPDATE docs SET title = 'b'", "ALTER TABLE docs ADD COLUMN tags text[]",
                  "UPDATE docs SET tags = '{x,y}'", "DELETE FROM docs", "TRUNCATE docs",
                  "INSERT INTO ev VALUES (1, '2026-05-01')")
        got = await read_stream(nats_server.url, topic, 9)
    assert [r.event["action"] for r in got] == ["SCHEMA", "INSERT", "UPDATE", "SCHEMA", "UPDATE", "DELETE",
                                                "TRUNCATE", "SCHEMA", "INSERT"]
    assert "body" not in got[2].event["data"]  # the unchanged TOAST value
    schema = await asyncio.to_thread(printed_schema, cfg, tmp_path)  # no table named: every published one
    assert [step["$ref"] for step in schema["oneOf"]] == ["#/$defs/public.docs", "#/$defs/public.ev"]
    assert_valid(schema, [r.event for i, r in enumerate(got) if i != 1])
    # it describes the table as it is now: the INSERT of the old shape lacks the column added since
    assert not is_valid(schema, got[1].event)
    one = await asyncio.to_thread(printed_schema, cfg, tmp_path, "docs")
    assert one["title"] == "public.docs" and is_valid(one, got[4].event) and not is_valid(one, got[8].event)


@pytest.mark.service
@pytest.mark.parametrize(
    ("args", "listener", "expected"),
    [
        (["nosuch"], {}, "schema: table nosuch does not exist"),
        (["other"], {}, "schema: table public.other is excluded by listener.filter.tables"),
        (['t"; DROP TABLE t; --'], {}, "is not a table name"),
        ([], {"publicationName": "empty"}, "publishes no table listener.filter covers"),
    ],
    ids=["unknown", "filtered", "injection", "nothing-published"],
)
async def test_the_command_refuses_in_one_line(
    fresh_any_db: Database, tmp_path: Path, args: list[str], listener: dict[str, Any], expected: str
) -> None:
    await sql(fresh_any_db.dsn(), "CREATE TABLE t (id int PRIMARY KEY)", "CREATE TABLE other (id int PRIMARY KEY)",
              "CREATE PUBLICATION empty")
    cfg = nats_config(fresh_any_db.server.port, fresh_any_db.name, "nats://127.0.0.1:1", unique("t"),
                      filter={"tables": {"t": ["insert"]}}, **listener)
    done = await asyncio.to_thread(run_cli, ["schema", *args, "--config", _config_file(cfg, tmp_path)])
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert expected in done.stderr and not done.stdout
    assert fresh_any_db.execute("SELECT count(*) FROM t") == [(0,)]


def test_the_command_refuses_the_debezium_format_and_an_unreachable_database(tmp_path: Path) -> None:
    cfg = nats_config(1, "db", "nats://127.0.0.1:1", unique("t"))
    cfg["publisher"]["format"] = "debezium"
    done = run_cli(["schema", "t", "--config", _config_file(cfg, tmp_path)])
    assert done.returncode == 2 and "publisher.format is debezium" in done.stderr
    cfg["publisher"]["format"] = "cloudevents"
    done = run_cli(["schema", "t", "--config", _config_file(cfg, tmp_path)])
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1 and "cannot connect" in done.stderr


def test_a_tables_transform_shapes_its_schema() -> None:
    """listener.transforms: an excluded column is not in the schema, a hashed one is a string, one masked to null
    is null; events of the transformed table validate, the unmasked value of a masked column does not."""
    from listener.config import ListenerConfig
    from listener.schema_cli import as_published
    from listener.transforms import Transforms

    cfg = ListenerConfig.model_validate({"slotName": "s", "transformsHashKey": "k" * 16, "transforms": [
        {"tables": ["public.t"], "columns": {"exclude": ["blob"]}, "mask": {"n": "hash", "id": "null"}}]})
    transforms = Transforms(cfg, "")
    assert as_published(transforms, "public", "other", COLUMNS) == COLUMNS
    published = as_published(transforms, "public", "t", COLUMNS)
    assert [c.name for c in published] == [c.name for c in COLUMNS if c.name != "blob"]
    document = Document(registry(), {MOOD: ["sad", "happy"]})
    schema = document.finish({"public.t": document.table("public", "t", published, ["INSERT"], False)})
    row = {k: v for k, v in ROW.items() if k != "blob"}
    hashed = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    assert is_valid(schema, event("INSERT", {**row, "n": hashed, "id": None}))
    assert not is_valid(schema, event("INSERT", {**row, "n": 12.5, "id": None}))  # a hashed column is a string
    assert not is_valid(schema, event("INSERT", {**ROW, "id": None}))  # blob is not published
    unmasked = document.table("public", "t", COLUMNS, ["INSERT"], False)
    assert not is_valid(document.finish({"public.t": unmasked}), event("INSERT", {**ROW, "id": None}))
