"""End to end: real PostgreSQL (15 and 18) -> the listener -> a real nats-server with JetStream."""

from __future__ import annotations

import base64
import copy
import uuid
from pathlib import Path

import orjson
import pytest

from tests.support.event_schemas import assert_valid, is_valid, printed_schema
from tests.support.harness import (
    confirmed_lsn,
    current_lsn,
    http_get,
    metric,
    nats_config,
    query,
    read_stream,
    running,
    sql,
    unique,
    wait_until,
)
from tests.support.services import Database, NatsServer, PostgresServer, free_port

pytestmark = pytest.mark.service

TYPES_TABLE = """
CREATE TYPE mood AS ENUM ('sad', 'happy');
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE TABLE everything (
    id bigserial PRIMARY KEY,
    i2 smallint, i4 int, i8 bigint, num numeric, num_big numeric(40,10), f4 real, f8 double precision,
    f_nan double precision, f_inf double precision, b boolean, t text, vc varchar(10), ch char(3),
    js json, jsb jsonb, ts timestamp, tstz timestamptz, tstz_inf timestamptz, d date, tm time,
    iv interval, u uuid, by bytea, ai int[], at text[], a2 int[][], m mood, ma mood[], dom posint,
    inet_col inet, rng int4range, n_null text
)
"""


async def test_every_action_and_type_arrives_with_the_documented_json(
    fresh_any_db: Database, nats_server: NatsServer, tmp_path: Path
) -> None:
    db = fresh_any_db
    await sql(db.dsn(), *TYPES_TABLE.strip().split(";\n"))
    topic = unique("types")
    cfg = nats_config(db.server.port, db.name, nats_server.url, topic)
    some_uuid = str(uuid.uuid4())
    async with running(cfg):
        await sql(
            db.dsn(),
            (
                """INSERT INTO everything (i2, i4, i8, num, num_big, f4, f8, f_nan, f_inf, b, t, vc, ch, js, jsb,
                ts, tstz, tstz_inf, d, tm, iv, u, by, ai, at, a2, m, ma, dom, inet_col, rng, n_null)
                VALUES (-7, 2147483647, 9223372036854775807, 3.14159265358979323846264338327950288,
                '123456789012345678901234567890.0123456789', 1.5, 0.1, 'NaN', '-Infinity', true,
                'héllo "world"', 'short', 'ab', '{"a": [1, 2.5, null]}', '{"k": {"n": 1}}',
                '2026-01-02 03:04:05.123456', '2026-01-02 03:04:05.5+05:30', 'infinity', '2026-01-02',
                '12:34:56', '1 day 2 hours', %s, '\\x00ff10', '{1,NULL,3}', '{"a,b","c\\"d",NULL}',
                '{{1,2},{3,4}}', 'happy', '{sad,happy}', 42, '10.0.0.1/32', '[1,5)', NULL)""",
                (some_uuid,),
            ),
            "UPDATE everything SET t = 'changed', i4 = 1",
            "DELETE FROM everything",
            "TRUNCATE everything",
        )
        got = await read_stream(nats_server.url, topic, 4)
    assert [r.event["action"] for r in got] == ["INSERT", "UPDATE", "DELETE", "TRUNCATE"]
    assert {r.subject for r in got} == {f"{topic}.public_everything"}
    for r in got:
        assert set(r.event) == {"id", "schema", "table", "action", "data", "dataOld", "commitTime"}
        assert r.headers["Nats-Msg-Id"] == r.id
        assert r.event["schema"] == "public" and r.event["table"] == "everything"
        assert r.event["commitTime"].endswith("Z")
    data = got[0].event["data"]
    assert data["i2"] == -7 and data["i4"] == 2147483647 and data["i8"] == 9223372036854775807
    assert data["num"] == "3.14159265358979323846264338327950288"
    assert data["num_big"] == "123456789012345678901234567890.0123456789"
    assert data["f4"] == 1.5 and data["f8"] == 0.1
    assert data["f_nan"] == "NaN" and data["f_inf"] == "-Infinity"
    assert data["b"] is True
    assert data["t"] == 'héllo "world"' and data["vc"] == "short" and data["ch"] == "ab "
    assert data["js"] == {"a": [1, 2.5, None]} and data["jsb"] == {"k": {"n": 1}}
    assert data["ts"] == "2026-01-02T03:04:05.123456"
    assert data["tstz"] == "2026-01-01T21:34:05.5Z"  # +05:30 converted to UTC
    assert data["tstz_inf"] == "infinity"
    assert data["d"] == "2026-01-02" and data["tm"] == "12:34:56"
    assert data["iv"] == "P1DT2H"
    assert data["u"] == some_uuid
    assert base64.b64decode(data["by"]) == b"\x00\xff\x10"
    assert data["ai"] == [1, None, 3] and data["at"] == ["a,b", 'c"d', None] and data["a2"] == [[1, 2], [3, 4]]
    assert data["m"] == "happy" and data["ma"] == ["sad", "happy"] and data["dom"] == 42
    assert data["inet_col"] == "10.0.0.1" and data["rng"] == "[1,5)"
    assert data["n_null"] is None and "n_null" in data
    assert got[0].event["dataOld"] == {}
    assert got[1].event["data"]["t"] == "changed" and got[1].event["data"]["i4"] == 1
    assert got[2].event["data"] == {} and got[2].event["dataOld"] == {"id": data["id"]}
    assert got[3].event["data"] == {} and got[3].event["dataOld"] == {}
    assert len({r.id for r in got}) == 4
    # every event validates against the JSON Schema `wal-listener schema everything` prints; a wrong one does not
    schema = printed_schema(cfg, tmp_path, "everything")
    assert_valid(schema, [r.event for r in got])
    insert = got[0].event
    wrong = {
        "integer as text": ("i4", "2147483647"), "numeric as a number": ("num", 3.14), "bool as text": ("b", "t"),
        "timestamptz with its offset": ("tstz", "2026-01-02T03:04:05.5+05:30"), "array item": ("ai", [1, "2"]),
        "enum label": ("m", "angry"), "null in a NOT NULL column": ("id", None), "bytea not base64": ("by", "~~"),
        "unknown column": ("nope", 1),
    }
    for what, (column, value) in wrong.items():
        bad = copy.deepcopy(insert)
        bad["data"][column] = value
        assert not is_valid(schema, bad), what
    for what, change in {
        "an INSERT without a column": lambda e: e["data"].pop("t"),
        "another table": lambda e: e.update(table="other"),
        "an unknown action": lambda e: e.update(action="UPSERT"),
        "a field more": lambda e: e.update(extra=1),
        "no id": lambda e: e.pop("id"),
    }.items():
        bad = copy.deepcopy(insert)
        change(bad)
        assert not is_valid(schema, bad), what


async def test_filter_topics_map_and_skipped_metric(fresh_db: str, pg: PostgresServer, nats_server: NatsServer) -> None:
    dsn = pg.dsn(fresh_db)
    await sql(
        dsn,
        "CREATE SCHEMA billing",
        "CREATE TABLE users (id int PRIMARY KEY, name text)",
        "CREATE TABLE billing.users (id int PRIMARY KEY)",
        "CREATE TABLE orders (id int PRIMARY KEY)",
        "CREATE TABLE logs (id int PRIMARY KEY)",
    )
    topic = unique("flt")
    cfg = nats_config(
        pg.port,
        fresh_db,
        nats_server.url,
        topic,
        filter={"tables": {"users": ["insert", "update"], "billing.users": ["delete"], "orders": ["insert"]}},
        topicsMap={"public_orders": "notifier"},
    )
    cfg["publisher"]["topicPrefix"] = "pre_"
    skipped_logs = metric("filter_skipped_events_total", {"table": "logs"})
    skipped_users = metric("filter_skipped_events_total", {"table": "users"})
    async with running(cfg):
        await sql(
            dsn,
            "INSERT INTO users VALUES (1, 'a')",
            "UPDATE users SET name = 'b'",
            "DELETE FROM users",
            "INSERT INTO billing.users VALUES (1)",
            "DELETE FROM billing.users",
            "INSERT INTO orders VALUES (1)",
            "INSERT INTO logs VALUES (1)",
            "INSERT INTO users VALUES (2, 'c')",
        )
        got = await read_stream(nats_server.url, topic, 6)
    # "users" matches the table in every schema; "billing.users" adds DELETE for that schema only
    assert [(r.subject, r.event["schema"], r.event["action"]) for r in got] == [
        (f"{topic}.pre_public_users", "public", "INSERT"),
        (f"{topic}.pre_public_users", "public", "UPDATE"),
        (f"{topic}.pre_billing_users", "billing", "INSERT"),
        (f"{topic}.pre_billing_users", "billing", "DELETE"),
        (f"{topic}.pre_notifier", "public", "INSERT"),
        (f"{topic}.pre_public_users", "public", "INSERT"),
    ]
    # only public.users DELETE was filtered out of the users tables (the publication publishes deletes for
    # billing.users); logs is not in the listener's publication: its changes never left the database
    assert metric("filter_skipped_events_total", {"table": "users"}) == skipped_users + 1
    assert metric("filter_skipped_events_total", {"table": "logs"}) == skipped_logs
    assert ("public", "logs") not in await query(dsn, "SELECT schemaname, tablename FROM pg_publication_tables")
    assert metric("published_events_total", {"subject": f"{topic}.pre_notifier", "table": "orders"}) == 1


async def test_replica_identity_full_and_unchanged_toast(fresh_any_db: Database, nats_server: NatsServer) -> None:
    db = fresh_any_db
    await sql(
        db.dsn(),
        "CREATE TABLE docs (id int PRIMARY KEY, title text, body text, note text)",
        "ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL",
        "CREATE TABLE full_docs (id int PRIMARY KEY, title text, body text)",
        "ALTER TABLE full_docs ALTER COLUMN body SET STORAGE EXTERNAL",
        "ALTER TABLE full_docs REPLICA IDENTITY FULL",
    )
    big = "x" * 20000  # stored out of line (TOAST)
    topic = unique("toast")
    async with running(nats_config(db.server.port, db.name, nats_server.url, topic)):
        await sql(
            db.dsn(),
            ("INSERT INTO docs VALUES (1, 'a', %s, NULL)", (big,)),
            "UPDATE docs SET title = 'b'",  # body unchanged and TOASTed: not sent
            ("INSERT INTO full_docs VALUES (1, 'a', %s)", (big,)),
            "UPDATE full_docs SET title = 'b'",
            "DELETE FROM full_docs",
        )
        got = await read_stream(nats_server.url, topic, 5)
    ins, upd, fins, fupd, fdel = (r.event for r in got)
    assert ins["data"]["body"] == big
    assert upd["data"] == {"id": 1, "title": "b", "note": None}  # body left out, never null
    assert "body" not in upd["data"] and upd["dataOld"] == {}
    assert fupd["data"] == {"id": 1, "title": "b", "body": big}  # filled from the full old row
    assert fupd["dataOld"] == {"id": 1, "title": "a", "body": big}
    assert fdel["dataOld"] == {"id": 1, "title": "b", "body": big}
    assert fins["action"] == "INSERT"


async def test_lsn_confirmed_only_after_ack_and_idle_database_advances(
    fresh_db: str, pg: PostgresServer, make_nats: object
) -> None:
    dsn = pg.dsn(fresh_db)
    broker: NatsServer = make_nats()  # type: ignore[operator]
    await sql(dsn, "CREATE TABLE t (id int PRIMARY KEY)", "CREATE TABLE quiet (id int PRIMARY KEY)")
    topic = unique("ack")
    cfg = nats_config(pg.port, fresh_db, broker.url, topic, ackTimeout="1s", filter={"tables": {"t": ["insert"]}})
    slot = cfg["listener"]["slotName"]
    async with running(cfg) as listener:
        await sql(dsn, "INSERT INTO t VALUES (1)")
        await read_stream(broker.url, topic, 1)
        before = await current_lsn(dsn)
        await wait_until(lambda: _ge(confirmed_lsn(dsn, slot), before), 15, "the first commit to be confirmed")

        broker.pause()  # JetStream stops acknowledging
        try:
            held = await confirmed_lsn(dsn, slot)
            await sql(dsn, "INSERT INTO t VALUES (2)", "INSERT INTO t VALUES (3)")
            await wait_until(lambda: listener.delivery.failing, 15, "publish failures to be noticed")
            assert await confirmed_lsn(dsn, slot) == held  # never confirmed past an unacked event
            ready = listener.health.ready()
            assert ready[0] == 503
        finally:
            broker.resume()
        got = await read_stream(broker.url, topic, 3)
        assert sorted({r.event["data"]["id"] for r in got}) == [1, 2, 3]
        end = await current_lsn(dsn)
        await wait_until(lambda: _ge(confirmed_lsn(dsn, slot), end), 15, "confirmation after recovery")

        # a fully filtered table and then an idle database still move the slot forward
        await sql(dsn, *[f"INSERT INTO quiet VALUES ({i})" for i in range(20)])
        end = await current_lsn(dsn)
        await wait_until(lambda: _ge(confirmed_lsn(dsn, slot), end), 20, "filtered changes to be confirmed")
        assert listener.health.ready()[0] == 200


async def _ge(value: object, target: int) -> bool:
    return await value >= target  # type: ignore[operator,no-any-return]


async def test_metrics_and_probes_over_http(fresh_db: str, pg: PostgresServer, nats_server: NatsServer) -> None:
    dsn = pg.dsn(fresh_db)
    await sql(dsn, "CREATE TABLE m (id int PRIMARY KEY)")
    topic = unique("http")
    port, prom = free_port(), free_port()
    cfg = nats_config(pg.port, fresh_db, nats_server.url, topic, serverPort=port)
    cfg["monitoring"]["promAddr"] = f"127.0.0.1:{prom}"
    async with running(cfg):
        assert await http_get(port, "/healthz") == (200, "ok\n")
        status, body = await http_get(port, "/ready")
        assert status == 200 and orjson.loads(body) == {
            "postgres": True, "broker": True, "server": f"127.0.0.1:{pg.port}", "slot_failover": False,
            "synced_standbys": 0,  # PostgreSQL 15: no failover slots
        }
        await sql(dsn, "INSERT INTO m VALUES (1)", "INSERT INTO m VALUES (2)")
        await read_stream(nats_server.url, topic, 2)
        end = await current_lsn(dsn)
        await wait_until(lambda: _ge(confirmed_lsn(dsn, cfg["listener"]["slotName"]), end), 15)
        status, text = await http_get(prom, "/metrics")
    assert status == 200
    assert f'published_events_total{{subject="{topic}.public_m",table="m"}} 2.0' in text
    for name in (
        "replication_lag_bytes",
        "replication_lag_seconds",
        "confirmed_lsn",
        "in_flight_events",
        "publish_errors_total",
        "reconnects_total",
        "filter_skipped_events_total",
    ):
        assert name in text or name.removesuffix("_total") in text, name
    assert "confirmed_lsn " in text and "confirmed_lsn 0.0" not in text
