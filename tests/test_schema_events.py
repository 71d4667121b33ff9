"""SCHEMA events (listener.schemaEvents): real PostgreSQL 15 and 18, a real nats-server, real listener processes.

Each real change of a table's shape (a column added, dropped, renamed, retyped; the replica identity) is
announced exactly once, before the first event with the new shape, in commit order; a restart, a kill -9 or
a relcache invalidation that re-sends the same Relation message announces nothing; a transaction read again
after a crash announces with the same id and body.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from listener.event import EventBuilder
from listener.pgoutput import Column, Relation
from listener.schema import Shape, schema_body, schema_event_id
from listener.types import TypeRegistry
from tests.support.events import make_config
from tests.support.harness import (
    ListenerProcess,
    Received,
    confirmed_lsn,
    current_lsn,
    metric,
    nats_config,
    query,
    read_stream,
    run_cli,
    running,
    sql,
    unique,
    wait_until,
)
from tests.support.services import Database, NatsServer

INT, TEXT = "integer", "text"


def col(name: str, kind: str, key: bool = False) -> dict[str, Any]:
    return {"name": name, "type": kind, "key": key}


def actions(events: list[Received]) -> list[str]:
    return [r.event["action"] for r in events]


def schemas(events: list[Received]) -> list[dict[str, Any]]:
    return [r.event for r in events if r.event["action"] == "SCHEMA"]


@pytest.mark.service
async def test_each_real_shape_change_is_announced_once_before_its_first_event(
    fresh_any_db: Database, nats_server: NatsServer
) -> None:
    dsn = fresh_any_db.dsn()
    await sql(dsn, "CREATE TABLE t (id int PRIMARY KEY, a text, n numeric(10,2))",
              "CREATE TABLE skip (id int PRIMARY KEY)", "CREATE PUBLICATION everything FOR ALL TABLES")
    topic = unique("shape")
    cfg = nats_config(fresh_any_db.server.port, fresh_any_db.name, nats_server.url, topic, schemaEvents=True,
                      publicationName="everything", filter={"tables": {"t": ["insert", "update", "delete"]}})
    before = metric("schema_changes_total", {"table": "t"})
    async with running(cfg):
        await sql(
            dsn,
            "INSERT INTO t VALUES (1, 'a', 1.5)",
            "INSERT INTO skip VALUES (1)",  # its changes are not published: never announced
            "CREATE INDEX ON t (a)", "COMMENT ON TABLE t IS 'same shape'", "ANALYZE t",
            "INSERT INTO t VALUES (2, 'b', 2)",  # a new Relation message, the same shape
            "ALTER TABLE t ADD COLUMN b int", "INSERT INTO t VALUES (3, 'c', 3, 30)",
            "ALTER TABLE t DROP COLUMN a", "INSERT INTO t VALUES (4, 4, 40)",
            "ALTER TABLE t RENAME COLUMN b TO c", "INSERT INTO t VALUES (5, 5, 50)",
            "ALTER TABLE t ALTER COLUMN n TYPE numeric(12,3)", "UPDATE t SET c = 10 WHERE id = 1",
            "ALTER TABLE t REPLICA IDENTITY FULL", "DELETE FROM t WHERE id = 2",
            "BEGIN; INSERT INTO t VALUES (6, 6, 60); ALTER TABLE t ADD COLUMN d text;"
            " INSERT INTO t VALUES (7, 7, 70, 'seven'); COMMIT",
            "BEGIN; ALTER TABLE t ADD COLUMN never int; INSERT INTO t VALUES (8, 8, 80, 'x', 8); ROLLBACK",
            "ALTER TABLE skip ADD COLUMN z int", "INSERT INTO skip VALUES (2, 2)",
            "INSERT INTO t VALUES (9, 9, 90, 'nine')",
            # a type made in the transaction that uses it: named as PostgreSQL names it
            "BEGIN; CREATE TYPE mood AS ENUM ('ok'); ALTER TABLE t ADD COLUMN m mood;"
            " INSERT INTO t VALUES (10, 10, 100, 'ten', 'ok'); COMMIT",
        )
        got = await read_stream(nats_server.url, topic, 19)
    assert actions(got) == [
        "SCHEMA", "INSERT", "INSERT", "SCHEMA", "INSERT", "SCHEMA", "INSERT", "SCHEMA", "INSERT", "SCHEMA", "UPDATE",
        "SCHEMA", "DELETE", "INSERT", "SCHEMA", "INSERT", "INSERT", "SCHEMA", "INSERT",
    ]
    assert {(r.subject, r.event["schema"], r.event["table"]) for r in got} == {(f"{topic}.public_t", "public", "t")}
    numeric, wider = "numeric(10,2)", "numeric(12,3)"
    shapes = [
        [col("id", INT, True), col("a", TEXT), col("n", numeric)],
        [col("id", INT, True), col("a", TEXT), col("n", numeric), col("b", INT)],
        [col("id", INT, True), col("n", numeric), col("b", INT)],
        [col("id", INT, True), col("n", numeric), col("c", INT)],
        [col("id", INT, True), col("n", wider), col("c", INT)],
        [col("id", INT, True), col("n", wider, True), col("c", INT, True)],
        [col("id", INT, True), col("n", wider, True), col("c", INT, True), col("d", TEXT, True)],
        [col("id", INT, True), col("n", wider, True), col("c", INT, True), col("d", TEXT, True),
         col("m", "mood", True)],
    ]
    announced = schemas(got)
    assert [s["columns"] for s in announced] == shapes
    assert [s["previous"] for s in announced] == [None, *shapes[:-1]]
    assert [s["replicaIdentity"] for s in announced] == ["default"] * 5 + ["full"] * 3
    for event in announced:
        assert set(event) == {"id", "schema", "table", "action", "columns", "previous", "replicaIdentity",
                              "commitTime"}
    # the event after each SCHEMA has the shape announced (an INSERT carries every column)
    for i, received in enumerate(got[:-1]):
        if received.event["action"] == "SCHEMA" and got[i + 1].event["action"] == "INSERT":
            assert list(got[i + 1].event["data"]) == [c["name"] for c in received.event["columns"]]
    # in commit order: the SCHEMA inside the transaction shares its commit time and sits between its changes
    assert got[13].event["commitTime"] == got[14].event["commitTime"] == got[15].event["commitTime"]
    assert len({r.id for r in got}) == len(got)
    assert got[-1].event["data"]["m"] == "ok"
    assert metric("schema_changes_total", {"table": "t"}) == before + 8
    assert metric("schema_changes_total", {"table": "skip"}) == 0
    # every shape announced is kept (the superseded ones until the next start), the filtered table's never
    assert await query(dsn, "SELECT table_name, count(*) FROM wal_listener.schemas GROUP BY 1") == [("t", 8)]


def _slot(cfg: dict[str, Any]) -> str:
    return str(cfg["listener"]["slotName"])


@pytest.mark.service
async def test_restarts_and_kill_9_announce_nothing_again_and_a_replay_has_the_same_ids(
    fresh_any_db: Database, nats_server: NatsServer, tmp_path: Path, procs: list[ListenerProcess]
) -> None:
    """A SCHEMA event whose transaction was published but never confirmed (a row of it is larger than NATS
    takes), kill -9: the next listener publishes the transaction again, the SCHEMA event with the same id and
    body. Then restarts (SIGTERM, kill -9) with the table unchanged: no SCHEMA event at all."""
    dsn = fresh_any_db.dsn()
    await sql(dsn, "CREATE TABLE t (id int PRIMARY KEY, a text)", "CREATE TABLE big (id int PRIMARY KEY, body text)")
    topic = unique("replay")
    cfg = nats_config(fresh_any_db.server.port, fresh_any_db.name, nats_server.url, topic, schemaEvents=True)
    cfg["publisher"]["duplicateWindow"] = "100ms"  # JetStream keeps a replayed copy, so it can be compared

    def start(config: dict[str, Any]) -> ListenerProcess:
        proc = ListenerProcess(config, tmp_path).start()
        procs.append(proc)
        return proc

    async def streaming(proc: ListenerProcess) -> None:
        await wait_until(lambda: '"msg":"streaming"' in proc.output(), 60, "streaming")

    async def settled() -> None:
        end = await current_lsn(dsn)
        await wait_until(lambda: _at_least(confirmed_lsn(dsn, _slot(cfg)), end), 60, "everything confirmed")

    first = start(cfg)
    await streaming(first)
    await sql(dsn, "INSERT INTO t VALUES (1, 'a')")
    assert actions(await read_stream(nats_server.url, topic, 2)) == ["SCHEMA", "INSERT"]
    await sql(dsn, "ALTER TABLE t ADD COLUMN b int",
              "BEGIN; INSERT INTO t VALUES (2, 'b', 2);"
              " INSERT INTO big SELECT 1, string_agg(md5(i::text), '') FROM generate_series(1, 40000) i; COMMIT")
    end = await current_lsn(dsn)
    await wait_until(lambda: "exceeds the server's max_payload" in first.output(), 30, "the big row refused")
    sent = await read_stream(nats_server.url, topic, 5, rest=False)
    assert [(r.event["table"], r.event["action"]) for r in sent] == [
        ("t", "SCHEMA"), ("t", "INSERT"), ("t", "SCHEMA"), ("t", "INSERT"), ("big", "SCHEMA")]
    first.kill()
    assert await confirmed_lsn(dsn, _slot(cfg)) < end  # the transaction with the second SCHEMA was not confirmed

    second = start({**cfg, "listener": {**cfg["listener"], "onError": "skip", "deadLetterTopic": "dead"}})
    await settled()
    stored = await read_stream(nats_server.url, topic, 8)
    again = [r for r in stored if r.subject == f"{topic}.public_t"]
    assert actions(again) == ["SCHEMA", "INSERT", "SCHEMA", "INSERT", "SCHEMA", "INSERT"]
    assert again[4].id == again[2].id and again[4].raw == again[2].raw  # the replayed SCHEMA event
    assert again[5].id == again[3].id
    assert again[4].event["previous"] == again[0].event["columns"]
    big = [r for r in stored if r.subject == f"{topic}.public_big"]
    assert actions(big) == ["SCHEMA", "SCHEMA"] and big[0].raw == big[1].raw  # its SCHEMA replayed too

    # the table unchanged: a restart (SIGTERM), a kill -9, a reconnect send its Relation again, nothing is announced
    await sql(dsn, "INSERT INTO t VALUES (3, 'c', 3)")
    await settled()
    assert await asyncio.to_thread(second.terminate) == 0
    third = start(cfg)
    await streaming(third)
    await sql(dsn, "INSERT INTO t VALUES (4, 'd', 4)")
    await settled()
    third.kill()
    fourth = start(cfg)
    await streaming(fourth)
    await sql(dsn, "UPDATE t SET a = 'e' WHERE id = 1")
    await sql(dsn, ("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = %s",
                    (_slot(cfg),)))  # the listener reconnects by itself
    await wait_until(lambda: fourth.output().count('"msg":"streaming"') >= 2, 60, "streaming again")
    await sql(dsn, "DELETE FROM t WHERE id = 4")
    await settled()
    everything = [r for r in await read_stream(nats_server.url, topic, 12) if r.subject == f"{topic}.public_t"]
    assert actions(everything)[6:] == ["INSERT", "INSERT", "UPDATE", "DELETE"]
    assert len(schemas(everything)) == 3  # two announcements, one of them replayed
    assert await asyncio.to_thread(fourth.terminate) == 0


async def _at_least(value: Any, target: int) -> bool:
    return bool(await value >= target)


@pytest.mark.service
async def test_a_truncate_of_changed_tables_is_preceded_by_each_ones_schema_event(
    fresh_any_db: Database, nats_server: NatsServer
) -> None:
    dsn = fresh_any_db.dsn()
    await sql(dsn, "CREATE TABLE a (id int PRIMARY KEY)", "CREATE TABLE b (id int PRIMARY KEY)")
    topic = unique("trunc")
    cfg = nats_config(fresh_any_db.server.port, fresh_any_db.name, nats_server.url, topic, schemaEvents=True)
    async with running(cfg):
        await sql(dsn, "INSERT INTO a VALUES (1)", "INSERT INTO b VALUES (1)",
                  "ALTER TABLE a ADD COLUMN x int", "ALTER TABLE b ADD COLUMN y int", "TRUNCATE a, b")
        got = await read_stream(nats_server.url, topic, 8)
    tail = [(r.event["table"], r.event["action"]) for r in got[4:]]
    assert tail == [("a", "SCHEMA"), ("b", "SCHEMA"), ("a", "TRUNCATE"), ("b", "TRUNCATE")]
    assert [c["name"] for c in got[4].event["columns"]] == ["id", "x"]
    assert len({r.id for r in got}) == 8


@pytest.mark.service
async def test_cloudevents_type_of_a_schema_event(fresh_any_db: Database, nats_server: NatsServer) -> None:
    dsn = fresh_any_db.dsn()
    await sql(dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    topic = unique("ce")
    cfg = nats_config(fresh_any_db.server.port, fresh_any_db.name, nats_server.url, topic, schemaEvents=True)
    cfg["publisher"]["format"] = "cloudevents"
    async with running(cfg):
        await sql(dsn, "INSERT INTO t VALUES (1)")
        got = await read_stream(nats_server.url, topic, 2)
    assert [r.headers["ce-type"] for r in got] == ["io.wal-listener.schema", "io.wal-listener.insert"]
    assert got[0].headers["ce-subject"] == "public.t" and got[0].headers["ce-id"] == got[0].id
    assert got[0].event["columns"] == [col("id", INT, True)]


@pytest.mark.service
async def test_a_listener_without_create_is_told_in_one_line_and_uses_the_table_a_dba_made(
    fresh_db: str, pg: Any, nats_server: NatsServer, tmp_path: Path, procs: list[ListenerProcess]
) -> None:
    dsn = pg.dsn(fresh_db)
    role = unique("cdc")
    await sql(dsn, "CREATE TABLE t (id int PRIMARY KEY)", f"CREATE ROLE {role} LOGIN REPLICATION",
              "REVOKE CREATE ON SCHEMA public FROM PUBLIC", f"REVOKE CREATE ON DATABASE {fresh_db} FROM PUBLIC",
              "CREATE PUBLICATION p FOR TABLE t")
    topic = unique("priv")
    cfg = nats_config(pg.port, fresh_db, nats_server.url, topic, publicationName="p", schemaEvents=True)
    cfg["database"]["user"] = role
    proc = ListenerProcess(cfg, tmp_path).start()
    procs.append(proc)
    await wait_until(lambda: "wal_listener.schemas" in proc.output(), 60, "the missing table said")
    said = [e for e in proc.logs() if e.get("level") == "error" and "wal_listener.schemas" in e.get("msg", "")]
    assert len(said) == 1 and "--print-ddl" in said[0]["msg"], proc.output()
    run = await asyncio.to_thread(run_cli, ["backfill", "--print-ddl", role, "--config", str(proc.path)])
    assert run.returncode == 0 and '"wal_listener"."schemas"' in run.stdout
    await sql(dsn, run.stdout)
    await wait_until(lambda: '"msg":"streaming"' in proc.output(), 60, "streaming once the table is there")
    await sql(dsn, "INSERT INTO t VALUES (1)")
    assert actions(await read_stream(nats_server.url, topic, 2)) == ["SCHEMA", "INSERT"]


# -- without a server ------------------------------------------------------------------------------------


def test_schema_event_ids_are_stable_and_distinct() -> None:
    one = schema_event_id("slot_a", 0x16B3748, 3, "public", "t")
    assert one == schema_event_id("slot_a", 0x16B3748, 3, "public", "t")
    others = {schema_event_id("slot_b", 0x16B3748, 3, "public", "t"), schema_event_id("slot_a", 0x16B3749, 3,
              "public", "t"), schema_event_id("slot_a", 0x16B3748, 4, "public", "t"),
              schema_event_id("slot_a", 0x16B3748, 3, "public", "u")}
    assert one not in others and len(others) == 4
    assert one[14] == "8" and one[19] in "89ab"  # version 8, RFC 9562 variant


def test_schema_body_and_the_announced_columns_hook() -> None:
    builder = EventBuilder(make_config(), TypeRegistry(), needs_key=True, compiled=False)
    info = builder.relation_info(Relation(1, "public", "t", "d", (Column("id", 23, -1, True),)))
    columns = builder.announced_columns(info, [col("id", INT, True)])
    body = schema_body("the-id", info, Shape(columns, "default"), None, "2026-01-02T03:04:05.000000Z")
    assert body == (b'{"id":"the-id","schema":"public","table":"t","action":"SCHEMA","columns":[{"name":"id",'
                    b'"type":"integer","key":true}],"previous":null,"replicaIdentity":"default",'
                    b'"commitTime":"2026-01-02T03:04:05.000000Z"}')


def test_schema_events_are_refused_with_the_debezium_format(tmp_path: Path) -> None:
    from listener.config import load_config
    from listener.errors import ConfigError

    path = tmp_path / "c.yml"
    path.write_text("listener: {slotName: s, schemaEvents: true}\ndatabase: {name: d, user: u}\n"
                    "publisher: {type: kafka, address: 'k:9092', topic: t, format: debezium}\n")
    with pytest.raises(ConfigError, match=r"^config: listener\.schemaEvents is true but publisher\.format is debezium"):
        load_config(path, environ={})
