"""The listener never breaks the application's database: its publications hold only what it publishes.

A table without a replica identity makes the application's UPDATE and DELETE fail as soon as any publication
publishes its updates or deletes. Real PostgreSQL 15 and 18, a real nats-server; what is checked is what the
application sees (its UPDATE succeeds or not), what the catalog holds, and what the listener says.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from tests.support.chart import render_chart
from tests.support.harness import (
    ListenerProcess,
    http_get,
    nats_config,
    query,
    read_stream,
    run_cli,
    running,
    sql,
    unique,
    wait_until,
)
from tests.support.promql import chart_expressions, evaluate
from tests.support.services import Database, NatsServer, free_port

pytestmark = pytest.mark.service

MAIN = "wal-listener"
INSERTS = "wal-listener_inserts"


async def publications(dsn: str) -> dict[str, dict[str, Any]]:
    """Every publication as the catalog has it: actions, via root, FOR ALL TABLES, its own tables."""
    rows = await query(
        dsn,
        "SELECT p.pubname, p.puballtables, p.pubinsert, p.pubupdate, p.pubdelete, p.pubtruncate, p.pubviaroot,"
        " ARRAY(SELECT n.nspname || '.' || c.relname FROM pg_publication_rel r JOIN pg_class c ON c.oid = r.prrelid"
        "  JOIN pg_namespace n ON n.oid = c.relnamespace WHERE r.prpubid = p.oid ORDER BY 1),"
        " obj_description(p.oid, 'pg_publication') FROM pg_publication p",
    )
    out = {}
    for name, all_tables, ins, upd, dele, trunc, via_root, tables, comment in rows:
        publish = [a for a, on in zip(("insert", "update", "delete", "truncate"), (ins, upd, dele, trunc), strict=True)
                   if on]
        out[name] = {"all": all_tables, "publish": publish, "via_root": via_root, "tables": tables,
                     "comment": comment or ""}
    return out


def refused(cfg: dict[str, Any], tmp_path: Path) -> str:
    """Run the listener with ``cfg``: it must exit 2 with one line on stderr; that line."""
    path = tmp_path / f"{unique('cfg')}.yml"
    path.write_text(yaml.safe_dump(cfg))
    done = run_cli(["--config", str(path)])
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("wal-listener: ")]
    assert len(lines) == 1, done.stderr
    return lines[0]


async def nothing_made(dsn: str, slot: str) -> None:
    assert await publications(dsn) == {}
    assert await query(dsn, "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)) == []


async def test_a_keyless_table_outside_the_filter_keeps_working(
    fresh_any_db: Database, nats_server: NatsServer
) -> None:
    """The issue's scenario: filter {users: [insert, update]} beside a table nopk without a key."""
    dsn = fresh_any_db.dsn()
    await sql(dsn, "CREATE TABLE nopk (a int)", "INSERT INTO nopk VALUES (1)",
              "CREATE TABLE users (id int PRIMARY KEY, name text)")
    topic = unique("safe")
    cfg = nats_config(fresh_any_db.server.port, fresh_any_db.name, nats_server.url, topic,
                      filter={"tables": {"users": ["insert", "update"]}})
    async with running(cfg):
        await sql(dsn, "UPDATE nopk SET a = 2", "DELETE FROM nopk",  # the application's writes still work
                  "INSERT INTO users VALUES (1, 'ann')", "UPDATE users SET name = 'bo'", "DELETE FROM users")
        got = await read_stream(nats_server.url, topic, 2)
    assert [(r.event["action"], r.event["data"]["name"]) for r in got] == [("INSERT", "ann"), ("UPDATE", "bo")]
    pubs = await publications(dsn)
    assert pubs[MAIN]["tables"] == ["public.users"] and not pubs[MAIN]["all"]
    assert pubs[MAIN]["publish"] == ["insert", "update"]  # only what the filter asks for
    assert pubs[MAIN]["via_root"] is True
    assert pubs[MAIN]["comment"].startswith(f"wal-listener slot={cfg['listener']['slotName']}")
    assert pubs[INSERTS]["tables"] == [] and pubs[INSERTS]["publish"] == ["insert", "truncate"]
    published = await query(dsn, "SELECT pubname, schemaname || '.' || tablename FROM pg_publication_tables")
    assert published == [(MAIN, "public.users")]


async def test_all_tables_is_refused_while_a_table_has_no_replica_identity(
    fresh_any_db: Database, nats_server: NatsServer, tmp_path: Path
) -> None:
    dsn = fresh_any_db.dsn()
    await sql(dsn, "CREATE TABLE nopk (a int)", "CREATE TABLE users (id int PRIMARY KEY)",
              "CREATE TABLE nothing (id int PRIMARY KEY)", "ALTER TABLE nothing REPLICA IDENTITY NOTHING")
    cfg = nats_config(fresh_any_db.server.port, fresh_any_db.name, nats_server.url)
    line = refused(cfg, tmp_path)
    assert "public.nopk" in line and "public.nothing" in line and "public.users" not in line
    assert "would fail" in line and "REPLICA IDENTITY FULL" in line and "listener.filter.tables" in line
    await nothing_made(dsn, cfg["listener"]["slotName"])
    await sql(dsn, "UPDATE nopk SET a = 1", "DELETE FROM nothing")


async def test_a_keyless_table_asked_for_updates_is_refused_before_anything_is_made(
    fresh_any_db: Database, nats_server: NatsServer, tmp_path: Path
) -> None:
    dsn = fresh_any_db.dsn()
    await sql(dsn, "CREATE TABLE nopk (a int)", "CREATE TABLE users (id int PRIMARY KEY)",
              "CREATE TABLE ev (id int, at date) PARTITION BY RANGE (at)",
              "CREATE TABLE ev_2026a PARTITION OF ev FOR VALUES FROM ('2026-01-01') TO ('2026-07-01')")
    cfg = nats_config(fresh_any_db.server.port, fresh_any_db.name, nats_server.url,
                      filter={"tables": {"users": ["insert", "update"], "nopk": ["insert", "delete"],
                                         "ev": ["update"]}})
    line = refused(cfg, tmp_path)
    assert "public.nopk" in line and "public.ev (partition public.ev_2026a)" in line and "public.users" not in line
    await nothing_made(dsn, cfg["listener"]["slotName"])


async def test_a_keyless_table_asked_only_for_inserts_is_published_without_risk(
    fresh_any_db: Database, nats_server: NatsServer
) -> None:
    """An append-only table without a key beside keyed tables: its own publication publishes only inserts."""
    dsn = fresh_any_db.dsn()
    await sql(dsn, "CREATE TABLE orders (id int PRIMARY KEY, total int)", "CREATE TABLE audit_log (line text)")
    topic = unique("audit")
    cfg = nats_config(fresh_any_db.server.port, fresh_any_db.name, nats_server.url, topic,
                      filter={"tables": {"orders": ["insert", "update", "delete"], "audit_log": ["insert"]}})
    async with running(cfg):
        await sql(dsn, "INSERT INTO orders VALUES (1, 10)", "INSERT INTO audit_log VALUES ('one')",
                  "UPDATE audit_log SET line = 'two'", "DELETE FROM audit_log",  # the application's writes work
                  "UPDATE orders SET total = 20", "DELETE FROM orders")
        got = await read_stream(nats_server.url, topic, 4)
    assert [(r.event["table"], r.event["action"]) for r in got] == [
        ("orders", "INSERT"), ("audit_log", "INSERT"), ("orders", "UPDATE"), ("orders", "DELETE")]
    pubs = await publications(dsn)
    assert (pubs[MAIN]["tables"], pubs[MAIN]["publish"]) == (["public.orders"], ["insert", "update", "delete"])
    assert (pubs[INSERTS]["tables"], pubs[INSERTS]["publish"]) == (["public.audit_log"], ["insert", "truncate"])


async def test_the_listeners_own_publication_follows_its_config_and_a_users_is_never_altered(
    fresh_any_db: Database, nats_server: NatsServer
) -> None:
    dsn = fresh_any_db.dsn()
    await sql(dsn, "CREATE TABLE a (id int PRIMARY KEY)", "CREATE TABLE b (id int PRIMARY KEY)",
              "CREATE TABLE c (x int)")
    port, name, url = fresh_any_db.server.port, fresh_any_db.name, nats_server.url
    slot = unique("follow")
    async with running(nats_config(port, name, url, slotName=slot, filter={"tables": {"a": ["insert"]}})):
        pass
    assert (await publications(dsn))[MAIN]["tables"] == ["public.a"]
    topic = unique("follow")
    async with running(nats_config(port, name, url, topic, slotName=slot,
                                   filter={"tables": {"b": ["insert", "delete"], "c": ["insert"]}})):
        await sql(dsn, "INSERT INTO a VALUES (1)", "INSERT INTO b VALUES (1)", "INSERT INTO c VALUES (1)",
                  "DELETE FROM b")
        got = await read_stream(nats_server.url, topic, 3)
    assert [(r.event["table"], r.event["action"]) for r in got] == [("b", "INSERT"), ("c", "INSERT"), ("b", "DELETE")]
    pubs = await publications(dsn)
    assert (pubs[MAIN]["tables"], pubs[MAIN]["publish"]) == (["public.b"], ["insert", "delete"])
    assert pubs[INSERTS]["tables"] == ["public.c"]

    # a publication the user made: used as it is (its table list and actions), never altered
    await sql(dsn, "CREATE PUBLICATION mine FOR TABLE a WITH (publish = 'insert')")
    topic = unique("mine")
    async with running(nats_config(port, name, url, topic, publicationName="mine",
                                   filter={"tables": {"a": ["insert"], "b": ["insert", "update"]}})):
        await sql(dsn, "INSERT INTO b VALUES (2)", "INSERT INTO a VALUES (2)")
        got = await read_stream(nats_server.url, topic, 1)
    assert [r.event["table"] for r in got] == ["a"]  # b is not in "mine", and the listener did not add it
    pubs = await publications(dsn)
    assert (pubs["mine"]["tables"], pubs["mine"]["publish"], pubs["mine"]["comment"]) == (["public.a"], ["insert"], "")
    assert "mine_inserts" not in pubs


async def test_a_filtered_table_created_later_is_added_and_published(
    fresh_any_db: Database, nats_server: NatsServer, tmp_path: Path, procs: list[ListenerProcess]
) -> None:
    dsn = fresh_any_db.dsn()
    await sql(dsn, "CREATE TABLE users (id int PRIMARY KEY)")
    topic = unique("later")
    cfg = nats_config(fresh_any_db.server.port, fresh_any_db.name, nats_server.url, topic,
                      filter={"tables": {"users": ["insert"], "shop.orders": ["insert", "update"], "log": ["insert"]}})
    proc = ListenerProcess(cfg, tmp_path).start()
    procs.append(proc)
    await wait_until(lambda: any(e.get("msg") == "streaming" for e in proc.logs()), 30, "streaming")
    warned = [e for e in proc.logs() if e["level"] == "warning" and "do not exist (yet)" in e["msg"]]
    assert len(warned) == 1 and sorted(warned[0]["tables"]) == ["log", "shop.orders"]
    await sql(dsn, "CREATE SCHEMA shop", "CREATE TABLE shop.orders (id int PRIMARY KEY, n int)",
              "CREATE TABLE log (line text)")
    await wait_until(lambda: any("appeared and were added" in e["msg"] for e in proc.logs()), 30, "tables added")
    await sql(dsn, "INSERT INTO shop.orders VALUES (1, 1)", "UPDATE shop.orders SET n = 2",
              "INSERT INTO log VALUES ('x')", "UPDATE log SET line = 'y'", "INSERT INTO users VALUES (1)")
    got = await read_stream(nats_server.url, topic, 4)
    assert [(r.event["table"], r.event["action"]) for r in got] == [
        ("orders", "INSERT"), ("orders", "UPDATE"), ("log", "INSERT"), ("users", "INSERT")]
    pubs = await publications(dsn)
    assert pubs[MAIN]["tables"] == ["public.users", "shop.orders"] and pubs[INSERTS]["tables"] == ["public.log"]
    assert await asyncio.to_thread(proc.terminate) == 0


async def test_a_keyless_table_created_under_an_all_tables_publication_is_reported(
    fresh_any_db: Database, nats_server: NatsServer, tmp_path: Path, procs: list[ListenerProcess]
) -> None:
    """FOR ALL TABLES takes in every table created later: one without a key is named (ERROR line), counted
    (the gauge) and alerted on (the chart's rule, evaluated on the listener's /metrics)."""
    dsn = fresh_any_db.dsn()
    await sql(dsn, "CREATE TABLE users (id int PRIMARY KEY)")
    metrics_port = free_port()
    cfg = nats_config(fresh_any_db.server.port, fresh_any_db.name, nats_server.url)
    cfg["monitoring"]["promAddr"] = f"127.0.0.1:{metrics_port}"
    proc = ListenerProcess(cfg, tmp_path).start()
    procs.append(proc)
    await wait_until(lambda: any(e.get("msg") == "streaming" for e in proc.logs()), 30, "streaming")
    assert (await publications(dsn))[MAIN]["all"] is True
    rule = next(e for where, e in chart_expressions(render_chart({"monitoring": {"prometheusRule": {
        "enabled": True}}})).items() if "TableWithoutIdentity" in where)

    async def alert() -> list[Any]:
        return evaluate(rule, (await http_get(metrics_port, "/metrics"))[1])

    assert await alert() == []
    await sql(dsn, "CREATE TABLE nopk (a int)")
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="does not have a replica identity"):
        await sql(dsn, "UPDATE nopk SET a = 1")  # what the listener warns about
    await wait_until(lambda: any(e["level"] == "error" and "no replica identity" in e["msg"] for e in proc.logs()),
                     30, "the ERROR line")
    said = [e for e in proc.logs() if e["level"] == "error" and "no replica identity" in e["msg"]]
    assert said[0]["tables"] == ["public.nopk"] and "REPLICA IDENTITY FULL" in said[0]["msg"]
    assert [value for _, value in await alert()] == [1.0]
    await sql(dsn, "ALTER TABLE nopk ADD PRIMARY KEY (a)")
    await wait_until(lambda: alert_cleared(proc), 30, "the all-clear")
    assert await alert() == []
    assert len([e for e in proc.logs() if e["level"] == "error" and "no replica identity" in e["msg"]]) == 1
    assert await asyncio.to_thread(proc.terminate) == 0


def alert_cleared(proc: ListenerProcess) -> bool:
    return any("has a replica identity again" in e["msg"] for e in proc.logs())


async def test_a_publication_another_slots_listener_made_is_refused(
    fresh_any_db: Database, nats_server: NatsServer, tmp_path: Path
) -> None:
    dsn = fresh_any_db.dsn()
    await sql(dsn, "CREATE TABLE a (id int PRIMARY KEY)")
    port, name, url = fresh_any_db.server.port, fresh_any_db.name, nats_server.url
    first = unique("first")
    async with running(nats_config(port, name, url, slotName=first, filter={"tables": {"a": ["insert"]}})):
        pass
    line = refused(nats_config(port, name, url, filter={"tables": {"a": ["delete"]}}), tmp_path)
    assert f"made by the listener of slot {first!r}" in line and "listener.publicationName" in line
    assert (await publications(dsn))[MAIN]["publish"] == ["insert"]
