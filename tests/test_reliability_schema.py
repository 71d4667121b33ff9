"""Schema changes while the listener streams: events follow the new shape, without a restart.

pgoutput sends a Relation message before the first change of a table after its definition changed
(and describes user types first), so the listener re-reads the shape and the types from the stream.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.support.harness import metric, nats_config, read_stream, running, sql, unique
from tests.support.services import Database, NatsServer

pytestmark = pytest.mark.service

ROW_ID = str(uuid.uuid4())

# (what happens, statements, the events they must produce: (table, action, data, dataOld))
STEPS: list[tuple[str, list[str], list[tuple[str, str, dict[str, Any], dict[str, Any]]]]] = [
    ("before any change", ["INSERT INTO s VALUES (1, 10, 'x')"],
     [("s", "INSERT", {"id": 1, "a": 10, "b": "x"}, {})]),
    ("column added", ["ALTER TABLE s ADD COLUMN c jsonb DEFAULT '{}'",
                      """INSERT INTO s VALUES (2, 20, 'y', '{"k": 1}')"""],
     [("s", "INSERT", {"id": 2, "a": 20, "b": "y", "c": {"k": 1}}, {})]),
    ("column dropped", ["ALTER TABLE s DROP COLUMN b", "INSERT INTO s VALUES (3, 30, '[]')"],
     [("s", "INSERT", {"id": 3, "a": 30, "c": []}, {})]),
    ("column renamed", ["ALTER TABLE s RENAME COLUMN a TO amount", "UPDATE s SET amount = 31 WHERE id = 3"],
     [("s", "UPDATE", {"id": 3, "amount": 31, "c": []}, {})]),
    ("type changed int -> numeric", ["ALTER TABLE s ALTER COLUMN amount TYPE numeric(10,2)",
                                     """INSERT INTO s VALUES (4, 4.5, '"s"')"""],
     [("s", "INSERT", {"id": 4, "amount": "4.50", "c": "s"}, {})]),
    ("type changed to a new enum, replica identity full",
     ["CREATE TYPE color AS ENUM ('red', 'green')", "ALTER TABLE s ADD COLUMN col color",
      "ALTER TABLE s ALTER COLUMN amount TYPE text", "ALTER TABLE s REPLICA IDENTITY FULL",
      "UPDATE s SET col = 'green' WHERE id = 4"],
     [("s", "UPDATE", {"id": 4, "amount": "4.50", "c": "s", "col": "green"},
       {"id": 4, "amount": "4.50", "c": "s", "col": None})]),
    ("table dropped and recreated with other columns",
     ["DROP TABLE s", "CREATE TABLE s (id uuid PRIMARY KEY, note text)",
      f"INSERT INTO s VALUES ('{ROW_ID}', 'new')", "DELETE FROM s"],
     [("s", "INSERT", {"id": ROW_ID, "note": "new"}, {}), ("s", "DELETE", {}, {"id": ROW_ID})]),
    ("table created after start", ["CREATE TABLE later (id int PRIMARY KEY, v int[])",
                                   "INSERT INTO later VALUES (1, '{1,2}')"],
     [("later", "INSERT", {"id": 1, "v": [1, 2]}, {})]),
    ("DDL and DML in one transaction, with a domain created in it",
     ["BEGIN; CREATE DOMAIN posint AS int CHECK (VALUE > 0); ALTER TABLE later ADD COLUMN w posint;"
      " INSERT INTO later VALUES (2, '{}', 7); ALTER TABLE later DROP COLUMN v; INSERT INTO later VALUES (3, 8);"
      " COMMIT"],
     [("later", "INSERT", {"id": 2, "v": [], "w": 7}, {}), ("later", "INSERT", {"id": 3, "w": 8}, {})]),
    ("table in a new schema", ["CREATE SCHEMA extra", "CREATE TABLE extra.t (id int PRIMARY KEY)",
                               "INSERT INTO extra.t VALUES (1)", "TRUNCATE extra.t"],
     [("t", "INSERT", {"id": 1}, {}), ("t", "TRUNCATE", {}, {})]),
]


async def test_schema_changes_mid_stream_follow_the_new_shape(fresh_any_db: Database, nats_server: NatsServer) -> None:
    db = fresh_any_db
    await sql(db.dsn(), "CREATE TABLE s (id int PRIMARY KEY, a int, b text)")
    topic = unique("ddl")
    expected = [event for _, _, events in STEPS for event in events]
    errors_before = metric("conversion_errors_total", {"table": "later", "column": "w"})
    async with running(nats_config(db.server.port, db.name, nats_server.url, topic)) as listener:
        for _, statements, _ in STEPS:
            await sql(db.dsn(), *statements)
        got = await read_stream(nats_server.url, topic, len(expected))
        assert listener.health.ready()[0] == 200  # never left the stream
    actual = [(r.event["table"], r.event["action"], r.event["data"], r.event["dataOld"]) for r in got]
    for (what, _, events), start in zip(STEPS, _offsets(STEPS), strict=True):
        assert actual[start:start + len(events)] == events, what
    assert len(actual) == len(expected)  # nothing more (duplicates, phantoms)
    assert got[-1].subject == f"{topic}.extra_t"
    assert metric("conversion_errors_total", {"table": "later", "column": "w"}) == errors_before


def _offsets(steps: list[Any]) -> list[int]:
    out, at = [], 0
    for _, _, events in steps:
        out.append(at)
        at += len(events)
    return out
