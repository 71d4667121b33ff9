"""Bad input: rows the broker cannot take, and every kind of value PostgreSQL can hold.

Each value either converts as documented in listener/types.py or is published as its text form with
the ``conversion_errors`` metric — never a crash, never a silently changed value. An event the broker
refuses (larger than NATS' max_payload) halts delivery with one error and a metric (``onError: halt``,
the default: nothing after it is confirmed) or goes to the dead-letter subject (``onError: skip``).
"""

from __future__ import annotations

import base64
import math
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from listener.replication import SESSION_OPTIONS
from tests.support.event_schemas import assert_valid, printed_schema
from tests.support.harness import (
    ListenerProcess,
    confirmed_lsn,
    current_lsn,
    http_get,
    metric,
    nats_config,
    read_stream,
    running,
    sql,
    unique,
    wait_until,
)
from tests.support.services import Database, NatsServer, PostgresServer, free_port

pytestmark = pytest.mark.service

TEXT = object()  # expected: PostgreSQL's own text form of the value
UUID = str(uuid.uuid4())
ONE_MB = 1024 * 1024

# (column type, SQL literal, expected JSON value)
VALUES: list[tuple[str, str, Any]] = [
    ("smallint", "-32768", -32768),
    ("integer", "2147483647", 2147483647),
    ("bigint", "-9223372036854775808", -9223372036854775808),
    ("oid", "4294967295", 4294967295),
    ("xid", "'4294967295'", 4294967295),
    ("numeric", "'NaN'", "NaN"),
    ("numeric", "'Infinity'", "Infinity"),
    ("numeric", "'-Infinity'", "-Infinity"),
    ("numeric", "1e400", "1" + "0" * 400),
    ("numeric", "'-0.000000000000000000000000000000000001'", "-0.000000000000000000000000000000000001"),
    ("numeric(40,10)", "'123456789012345678901234567890.0123456789'", "123456789012345678901234567890.0123456789"),
    ("real", "'NaN'", "NaN"),
    ("real", "'-Infinity'", "-Infinity"),
    ("real", "3.4028235e38", 3.4028235e38),
    ("real", "1.4e-45", 1e-45),
    ("double precision", "'Infinity'", "Infinity"),
    ("double precision", "1.7976931348623157e308", 1.7976931348623157e308),
    ("double precision", "5e-324", 5e-324),
    ("double precision", "0.1", 0.1),
    ("boolean", "false", False),
    ("text", "E'tab\\there \\\\ \"quoted\" ünïcödé 😀 \\n newline'", "tab\there \\ \"quoted\" ünïcödé 😀 \n newline"),
    ("text", "''", ""),
    ("varchar(5)", "'abc'", "abc"),
    ("char(5)", "'ab'", "ab   "),
    ('"char"', "'x'", "x"),
    ("name", "'a name'", "a name"),
    ("uuid", f"'{UUID}'", UUID),
    ("bytea", "'\\x'", ""),
    ("bytea", "'\\xdeadbeef00'", base64.b64encode(b"\xde\xad\xbe\xef\x00").decode()),
    ("json", """'  {"a" : [1, 2.50, null], "a" : "dup"} '""", {"a": "dup"}),
    ("jsonb", """'{"deep": {"n": 1.000, "s": "\\u00e9"}}'""", {"deep": {"n": 1.0, "s": "é"}}),
    ("jsonb", """'"just a string"'""", "just a string"),
    ("timestamp", "'infinity'", "infinity"),
    ("timestamp", "'-infinity'", "-infinity"),
    ("timestamp", "'4713-01-01 00:00:00 BC'", "4713-01-01 00:00:00 BC"),
    ("timestamp", "'294276-12-31 23:59:59.999999'", "294276-12-31T23:59:59.999999"),
    ("timestamp", "'0099-01-02 03:04:05'", "0099-01-02T03:04:05"),
    ("timestamptz", "'infinity'", "infinity"),
    ("timestamptz", "'-infinity'", "-infinity"),
    ("timestamptz", "'2026-01-02 03:04:05.123456-08'", "2026-01-02T11:04:05.123456Z"),
    ("timestamptz", "'2026-03-29 02:30:00 Europe/Berlin'", "2026-03-29T01:30:00Z"),
    ("timestamptz", "'1900-01-01 00:00:00+00'", "1900-01-01T00:00:00Z"),
    ("timestamptz", "'0001-01-01 00:00:00+00 BC'", TEXT),
    ("date", "'infinity'", "infinity"),
    ("date", "'5874897-12-31'", "5874897-12-31"),
    ("time", "'24:00:00'", "24:00:00"),
    ("timetz", "'12:00:00.5+05:30'", "12:00:00.5+05:30"),
    ("interval", "'-178000000 years'", "P-178000000Y"),
    ("interval", "'1 mon -1 day 00:00:00.000001'", TEXT),
    ("money", "'-92233720368547758.08'", TEXT),
    ("bit(4)", "B'1010'", "1010"),
    ("varbit", "B''", ""),
    ("inet", "'::1/128'", "::1"),
    ("cidr", "'10.0.0.0/8'", "10.0.0.0/8"),
    ("macaddr", "'08:00:2b:01:02:03'", "08:00:2b:01:02:03"),
    ("macaddr8", "'08:00:2b:01:02:03:04:05'", "08:00:2b:01:02:03:04:05"),
    ("point", "'(1.5,-2)'", "(1.5,-2)"),
    ("line", "'{1,2,3}'", "{1,2,3}"),
    ("lseg", "'[(0,0),(1,1)]'", "[(0,0),(1,1)]"),
    ("box", "'(1,1),(0,0)'", "(1,1),(0,0)"),
    ("path", "'[(0,0),(1,1),(2,0)]'", "[(0,0),(1,1),(2,0)]"),
    ("polygon", "'((0,0),(1,1),(1,0))'", "((0,0),(1,1),(1,0))"),
    ("circle", "'<(1,2),3>'", "<(1,2),3>"),
    ("tsvector", "'a fat cat'", "'a' 'cat' 'fat'"),
    ("tsquery", "'fat & (rat | cat)'", TEXT),
    ("xml", "'<a b=\"c\">d &amp; e</a>'", '<a b="c">d &amp; e</a>'),
    ("pg_lsn", "'16/B374D848'", "16/B374D848"),
    ("regclass", "'pg_class'", "pg_class"),
    ("int2vector", "'1 2 3'", "1 2 3"),  # array-like text without braces: published as text, counted
    ("int4range", "'[1,5)'", "[1,5)"),
    ("numrange", "'(,)'", "(,)"),
    ("daterange", "'empty'", "empty"),
    ("tstzrange", "'[2026-01-01 00:00+02, infinity)'", '["2025-12-31 22:00:00+00",infinity)'),
    ("int4multirange", "'{[1,3), [5,7)}'", "{[1,3),[5,7)}"),
    ("mood", "'so-so, \"really\"'", 'so-so, "really"'),
    ("mood[]", "ARRAY['happy', 'so-so, \"really\"']::mood[]", ["happy", 'so-so, "really"']),
    ("posint", "42", 42),
    ("money_amount", "'12.50'", "12.50"),
    ("int_list", "'{1,2,NULL}'", [1, 2, None]),
    ("posint[]", "'{1,2}'", [1, 2]),
    ("pair", "ROW(1, 'a \"b\", c')::pair", '(1,"a ""b"", c")'),
    ("pair[]", "ARRAY[ROW(1, 'x')::pair, NULL]", ["(1,x)", None]),
    ("int4range[]", "ARRAY['[1,2)'::int4range, 'empty']", ["[1,2)", "empty"]),
    ("box[]", "ARRAY['(1,1),(0,0)'::box, '(3,3),(2,2)'::box]", ["(1,1),(0,0)", "(3,3),(2,2)"]),
    ("int[]", "'{}'", []),
    ("int[]", "'[0:1]={7,8}'", [7, 8]),
    ("int[][]", "'{{1,2},{3,4}}'", [[1, 2], [3, 4]]),
    ("text[]", """'{"a,b","c\\"d",NULL,"NULL",""}'""", ["a,b", 'c"d', None, "NULL", ""]),
    ("float8[]", "'{NaN,-Infinity,1.5}'", ["NaN", "-Infinity", 1.5]),
    ("numeric[]", "'{NaN,1e30}'", ["NaN", "1000000000000000000000000000000"]),
    ("timestamptz[]", "'{infinity,\"2026-01-02 03:04:05+01\"}'", ["infinity", "2026-01-02T02:04:05Z"]),
    ("jsonb[]", """ARRAY['{"a": 1}'::jsonb, 'null']""", [{"a": 1}, None]),
    ("bytea[]", "ARRAY['\\x00'::bytea]", ["AA=="]),
    ("bool[]", "'{t,f,NULL}'", [True, False, None]),
    ("hstore", """'"a key"=>"1", b=>NULL'""", TEXT),
]

SETUP = [
    "CREATE EXTENSION IF NOT EXISTS hstore",
    "CREATE TYPE mood AS ENUM ('happy', 'so-so, \"really\"')",
    "CREATE DOMAIN posint AS int CHECK (VALUE > 0)",
    "CREATE DOMAIN money_amount AS numeric(10,2)",
    "CREATE DOMAIN int_list AS int[]",
    "CREATE TYPE pair AS (n int, s text)",
]


def _column(i: int) -> str:
    return f"c{i}"


async def test_every_kind_of_value_converts_as_documented_or_is_text_and_counted(
    fresh_any_db: Database, nats_server: NatsServer, tmp_path: Path
) -> None:
    db = fresh_any_db
    values = VALUES
    try:
        await sql(db.dsn(), "SELECT '<a/>'::xml")
    except psycopg.errors.FeatureNotSupported:  # the embedded PostgreSQL 18 is built without libxml
        values = [v for v in VALUES if v[0] != "xml"]
    columns = ", ".join(f"{_column(i)} {kind}" for i, (kind, _, _) in enumerate(values))
    await sql(db.dsn(), *SETUP, f"CREATE TABLE everything (id int PRIMARY KEY, {columns})")
    literals = ", ".join(literal for _, literal, _ in values)
    topic = unique("values")
    vector = values.index(("int2vector", "'1 2 3'", "1 2 3"))
    before = metric("conversion_errors_total", {"table": "everything", "column": _column(vector)})
    cfg = nats_config(db.server.port, db.name, nats_server.url, topic)
    async with running(cfg) as listener:
        await sql(db.dsn(), f"INSERT INTO everything VALUES (1, {literals})",
                  "INSERT INTO everything (id) VALUES (2)",  # every column NULL
                  "UPDATE everything SET id = 3 WHERE id = 1")
        got = await read_stream(nats_server.url, topic, 3)
        assert listener.health.ready()[0] == 200  # still streaming
    # PostgreSQL's text forms, with the settings the replication connection uses
    async with await psycopg.AsyncConnection.connect(db.dsn(options=SESSION_OPTIONS)) as conn:
        cur = await conn.execute(
            "SELECT " + ", ".join(f"{_column(i)}::text" for i in range(len(values))) + " FROM everything WHERE id = 3"
        )
        texts = await cur.fetchone()
    assert texts is not None
    data = got[0].event["data"]
    wrong = {}
    for i, (kind, literal, expected) in enumerate(values):
        want = texts[i] if expected is TEXT else expected
        value = data[_column(i)]
        same = value == want and type(value) is type(want)
        if isinstance(want, float) and isinstance(value, float):
            same = value == want or (math.isnan(value) and math.isnan(want))
        if not same:
            wrong[f"{kind} {literal}"] = (value, want)
    assert not wrong, wrong
    assert got[1].event["data"] == {"id": 2, **{_column(i): None for i in range(len(values))}}
    assert got[2].event["data"] == {**data, "id": 3}
    # the one value that has no documented conversion was published as text and counted
    assert metric("conversion_errors_total", {"table": "everything", "column": _column(vector)}) == before + 2
    # every event validates against the JSON Schema `wal-listener schema` prints for the table
    assert_valid(printed_schema(cfg, tmp_path, "public.everything"), [r.event for r in got])


# -- events larger than the broker accepts ---------------------------------------------------------------


async def _prom(port: int, name: str) -> float:
    _, text = await http_get(port, "/metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def test_oversized_event_halts_with_one_error_and_a_metric_and_is_never_confirmed(
    fresh_db: str, pg: PostgresServer, nats_server: NatsServer, tmp_path: Path, procs: list[ListenerProcess]
) -> None:
    dsn = pg.dsn(fresh_db)
    await sql(dsn, "CREATE TABLE big (id int PRIMARY KEY, v text)")
    topic = unique("halt")
    port = free_port()
    cfg = nats_config(pg.port, fresh_db, nats_server.url, topic, refreshConnection="1s", ackTimeout="1s",
                      serverPort=port)
    cfg["monitoring"]["promAddr"] = f":{port}"
    proc = ListenerProcess(cfg, tmp_path).start()
    procs.append(proc)
    await wait_until(lambda: '"msg":"streaming"' in proc.output(), 30, "streaming")
    await sql(dsn, "INSERT INTO big VALUES (1, 'small')")
    await read_stream(nats_server.url, topic, 1)
    before_big = await current_lsn(dsn)
    # just under max_payload as JSON, but over it with the Nats-Msg-Id header: the server would close
    # the connection for it, so it must be refused before it is sent
    await sql(dsn, ("INSERT INTO big VALUES (2, repeat('x', %s))", (ONE_MB - 100,)),
              "INSERT INTO big VALUES (3, 'after')")
    await wait_until(lambda: _at_least(_prom(port, "oversized_events_total"), 3), 30, "retries of the big event")
    got = await read_stream(nats_server.url, topic, 2)
    assert [r.event["data"]["id"] for r in got] == [1, 3]  # later events still flow...
    assert await confirmed_lsn(dsn, cfg["listener"]["slotName"]) <= before_big  # ...but are not confirmed
    errors = [e for e in proc.logs() if e.get("level") == "error"]
    assert len(errors) == 1 and "exceeds the server's max_payload" in errors[0]["error"], errors
    assert not any("nats connection error" in e.get("msg", "") for e in proc.logs())  # the connection held
    assert await _prom(port, 'publish_errors_total{reason="message_too_large"}') >= 3
    status, body = await http_get(port, "/ready")
    assert status == 503 and '"broker":false' in body


async def _at_least(value: Any, target: float) -> bool:
    return bool(await value >= target)


async def test_oversized_event_with_skip_goes_to_the_dead_letter_subject_and_later_events_flow(
    fresh_db: str, pg: PostgresServer, nats_server: NatsServer
) -> None:
    dsn = pg.dsn(fresh_db)
    await sql(dsn, "CREATE TABLE big (id int PRIMARY KEY, v text)")
    topic = unique("skip")
    cfg = nats_config(pg.port, fresh_db, nats_server.url, topic, onError="skip", deadLetterTopic="dead_letters")
    slot = cfg["listener"]["slotName"]
    dead = metric("dead_lettered_events_total", {"table": "big"})
    async with running(cfg) as listener:
        await sql(dsn, "INSERT INTO big VALUES (1, 'small')",
                  ("INSERT INTO big VALUES (2, repeat('x', %s))", (2 * ONE_MB,)),
                  "INSERT INTO big VALUES (3, 'after')")
        got = await read_stream(nats_server.url, topic, 2, subject=f"{topic}.public_big")
        assert [r.event["data"]["id"] for r in got] == [1, 3]
        letters = await read_stream(nats_server.url, topic, 1, subject=f"{topic}.dead_letters")
        end = await current_lsn(dsn)
        await wait_until(lambda: _at_least(confirmed_lsn(dsn, slot), end), 20, "confirmation past it")
        assert listener.health.ready()[0] == 200
    assert len(letters) == 1
    letter = letters[0].event
    assert letter["event"] is None and "too large" in letter["eventOmitted"]  # the body would not fit either
    assert letter["table"] == "big" and letter["action"] == "INSERT" and "max_payload" in letter["error"]
    assert letter["id"] == letters[0].headers["Nats-Msg-Id"]
    assert metric("dead_lettered_events_total", {"table": "big"}) == dead + 1
