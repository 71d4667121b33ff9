"""DDL events (listener.ddl.capture): an event trigger writes one logical message per DDL statement; the
listener publishes each object of it as a DDL event in commit order with the transaction's rows.

Pure parts first (the statement rule, the message, the SQL, the formats), then real PostgreSQL 15 and 18
with NATS: CREATE/ALTER/DROP, DDL and rows of one transaction in order, rollbacks never published, a replay
with the same ids, no superuser (one line; a DBA's --print-sql), a broken trigger never blocking DDL, the
filter, several listeners on one trigger.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from listener import catalog
from listener.config import INTERNAL_MESSAGE_PREFIXES, Config, load_config
from listener.ddl import CaptureState, DdlEvents, one_statement, parse_message
from listener.errors import ConfigError
from listener.event import EventBuilder, event_id, slot_hash
from listener.pgoutput import LogicalMessage
from listener.types import TypeRegistry
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

# -- which text is published as the statement ----------------------------------------------------------------

ONE = [
    "CREATE TABLE t (id int)",
    "  ALTER TABLE t ADD COLUMN b int;  ",
    "-- a migration\nALTER TABLE t ADD COLUMN b int; -- done",
    "/* a /* nested */ comment; */ DROP TABLE t;",
    "COMMENT ON TABLE t IS 'a; b -- c /* d'",
    "COMMENT ON TABLE t IS 'it''s; fine'",
    "COMMENT ON TABLE t IS E'a\\'; DROP TABLE x; --'",
    'CREATE TABLE "a;b" ("x"";" int)',
    "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$ BEGIN RETURN 1; END $$;",
    "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $body$ BEGIN RETURN 1; $$ ; END $body$",
    "CREATE RULE r AS ON INSERT TO t DO ALSO (INSERT INTO a VALUES (1); INSERT INTO b VALUES (2))",
    "PREPARE p AS SELECT $1; ",
    "CREATE TABLE a$b$ (x int)",
]
NOT_ONE = [
    "CREATE TABLE a (x int); CREATE TABLE b (x int)",
    "ALTER ROLE app PASSWORD 'secret'; ALTER TABLE t OWNER TO app",
    "CREATE TABLE a (x int);;CREATE TABLE b (x int);",
    "COMMENT ON TABLE t IS 'a\\'; DROP TABLE x; --'",  # depends on standard_conforming_strings
    "COMMENT ON TABLE t IS 'unterminated",
    "CREATE FUNCTION f() AS $$ unterminated",
    "/* unterminated comment",
    "CREATE TABLE t (x int",
    "CREATE TABLE t (x int))",
    "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT 2; END",
    "",
    "  -- only a comment",
    ";",
]


@pytest.mark.parametrize("text", ONE)
def test_one_statement_is_published_as_sent(text: str) -> None:
    assert one_statement(text) == text.strip()


@pytest.mark.parametrize("text", NOT_ONE)
def test_several_statements_or_an_unreadable_text_are_not(text: str) -> None:
    assert one_statement(text) is None


def test_the_message_is_read_and_a_bad_one_refused() -> None:
    content = orjson.dumps({
        "v": 1, "command": "CREATE INDEX", "statement": "CREATE INDEX ON t (b)",
        "objects": [{"type": "index", "identity": "public.t_b_idx", "schema": "public", "relid": 16401,
                     "table": ["public", "t"], "root": None}],
    })
    ddl = parse_message(content)
    assert ddl.command == "CREATE INDEX" and ddl.statement == "CREATE INDEX ON t (b)"
    (obj,) = ddl.objects
    assert (obj.type, obj.identity, obj.schema, obj.table, obj.root, obj.relid) == (
        "index", "public.t_b_idx", "public", ("public", "t"), None, 16401)
    for bad in (b"not json", b"[]", b'{"objects": []}', b'{"command": "X", "objects": [1]}'):
        with pytest.raises(ValueError):
            parse_message(bad)


def test_the_sql_is_constant_idempotent_and_catches_every_error() -> None:
    install = [s.as_string(None) for s in catalog.ddl_capture_install()]
    body = catalog.DDL_FUNCTION_BODY
    assert "{" not in body and "}" not in body  # every placeholder filled
    assert "SECURITY DEFINER SET search_path = pg_catalog, pg_temp" in install[2]
    assert install[2].endswith(f"$wal_listener${body}$wal_listener$") and "$wal_listener$" not in body
    # the work is inside a block whose handler catches every error, and the handler's own WARNING is guarded
    head, _, handler = body.partition("EXCEPTION WHEN OTHERS THEN")
    assert "pg_logical_emit_message" in head and "EXCEPTION WHEN OTHERS THEN\n      NULL;" in handler
    assert ":=" not in head.split("BEGIN", 1)[0]  # DECLARE initializers run outside the block
    assert "CREATE SCHEMA IF NOT EXISTS" in install[1]
    assert "IF NOT EXISTS (SELECT FROM pg_catalog.pg_event_trigger" in install[4]
    assert all(s.startswith(("DROP EVENT TRIGGER IF EXISTS", "DROP FUNCTION IF EXISTS"))
               for s in (s.as_string(None) for s in catalog.ddl_capture_remove()))
    # the one thing a user supplies (--print-sql ROLE) is an identifier: it cannot end the statement
    *same, grant = catalog.ddl_capture_install('app"; DROP TABLE x; --')
    assert [s.as_string(None) for s in same] == install
    assert grant.as_string(None) == 'GRANT USAGE, CREATE ON SCHEMA "wal_listener" TO "app""; DROP TABLE x; --"'


def test_the_prefix_is_the_listeners_own() -> None:
    assert catalog.DDL_PREFIX in INTERNAL_MESSAGE_PREFIXES


def _config(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "c.yml"
    path.write_text(
        "listener: {slotName: s, ddl: " + text + "}\ndatabase: {name: d, user: u}\n"
        "publisher: {type: nats, address: nats://n:4222, topic: t}\n"
    )
    return load_config(path, {})


def test_config(tmp_path: Path) -> None:
    assert _config(tmp_path, "{}").listener.ddl.model_dump() == {"capture": False, "topic": "ddl"}
    assert _config(tmp_path, "{capture: true, topic: schema.ddl}").listener.ddl.topic == "schema.ddl"
    for bad in ("''", "'a b'", "'ddl.'", "'>'"):
        with pytest.raises(ConfigError, match=r"^config: listener\.ddl\.topic = .* must be a non-empty name"):
            _config(tmp_path, f"{{topic: {bad}}}")


def test_what_each_state_says() -> None:
    def said(**state: Any) -> tuple[str, str]:
        fields = {"superuser": True, "function": True, "current": True, "triggers": 2, "enabled": 2, **state}
        return CaptureState(**fields).problem("app", "shop")

    assert said() == ("", "")
    reason, line = said(superuser=False, function=False, triggers=0, enabled=0)
    assert reason == "SuperuserMissing" and "\n" not in line
    assert "not installed in database 'shop'" in line and "'app' is not a superuser" in line
    assert "wal-listener ddl --print-sql" in line
    assert said(function=False, triggers=0, enabled=0, error="disk full")[0] == "NotInstalled"
    assert said(superuser=False, current=False)[0] == "Outdated"
    reason, line = said(enabled=1)
    assert reason == "Disabled" and "ALTER EVENT TRIGGER wal_listener_ddl_end ENABLE" in line


def _builder_events(fmt: dict[str, Any], content: dict[str, Any], **listener: Any) -> list[Any]:
    cfg = Config.model_validate({
        "listener": {"slotName": "slot_a", "ddl": {"capture": True}, **listener},
        "database": {"host": "pg-a", "name": "shop", "user": "u"},
        "publisher": {"type": "kafka", "address": "k:9092", "topic": "cdc", "topicPrefix": "x_", **fmt},
    })
    builder = EventBuilder(cfg, TypeRegistry(), needs_key=True, compiled=False)
    txn = builder.begin(0x16B3748, 0)
    message = LogicalMessage(lsn=0x16B3700, transactional=True, prefix=catalog.DDL_PREFIX,
                             content=orjson.dumps(content))
    return DdlEvents(cfg, builder).events(message, txn)


DROP = {"v": 1, "command": "DROP TABLE", "statement": "DROP TABLE a, b CASCADE", "objects": [
    {"type": "table", "identity": "public.a", "schema": "public", "relid": 1, "table": ["public", "a"]},
    {"type": "table", "identity": "public.b", "schema": "public", "relid": 2, "table": ["public", "b"]},
]}


def test_each_object_is_an_event_with_the_ids_of_the_next_changes() -> None:
    events = _builder_events({}, DROP)
    assert [e.subject for e in events] == ["cdc.x_ddl", "cdc.x_ddl"]
    assert [e.key for e in events] == [b"shop", b"shop"]  # one key: the database's DDL stays in order
    bodies = [orjson.loads(e.body) for e in events]
    assert [list(b) for b in bodies] == [
        ["id", "action", "command", "objectType", "object", "schema", "statement", "commitTime"]] * 2
    assert bodies[1] == {"id": event_id(slot_hash("slot_a"), 0x16B3748, 2), "action": "DDL", "command": "DROP TABLE",
                         "objectType": "table", "object": "public.b", "schema": "public",
                         "statement": "DROP TABLE a, b CASCADE", "commitTime": "2000-01-01T00:00:00.000000Z"}
    assert [e.id for e in events] == [b["id"] for b in bodies] == [e.id for e in _builder_events({}, DROP)]


def test_cloudevents_type_and_subject() -> None:
    (binary, _) = _builder_events({"format": "cloudevents"}, DROP)
    assert binary.headers is not None
    assert binary.headers["ce-type"] == "io.wal-listener.ddl" and binary.headers["ce-subject"] == "public.a"
    (structured, _) = _builder_events({"format": "cloudevents", "cloudEvents": {"mode": "structured"}}, DROP)
    envelope = orjson.loads(structured.body)
    assert envelope["type"] == "io.wal-listener.ddl" and envelope["data"]["object"] == "public.a"


def test_debezium_format_publishes_the_ddl_event_as_it_is() -> None:
    (event, _) = _builder_events({"format": "debezium"}, DROP)
    assert orjson.loads(event.body)["action"] == "DDL"


def test_with_a_filter_only_its_tables_and_the_objects_on_them_and_a_rename_away() -> None:
    content = {"v": 1, "command": "ALTER TABLE", "statement": None, "objects": [
        {"type": "table", "identity": "public.people", "schema": "public", "relid": 7, "table": ["public", "people"]},
        {"type": "index", "identity": "public.users_x", "schema": "public", "relid": 8, "table": ["public", "users"]},
        {"type": "table", "identity": "shop.ev_1", "schema": "shop", "relid": 9, "table": ["shop", "ev_1"],
         "root": ["shop", "ev"]},
        {"type": "function", "identity": "public.f()", "schema": "public"},
    ]}
    events = _builder_events({}, content, filter={"tables": {"users": ["insert"], "shop.ev": ["insert"]}})
    assert [orjson.loads(e.body)["object"] for e in events] == ["public.users_x", "shop.ev_1"]
    assert orjson.loads(events[0].body)["id"].endswith("02")  # the filtered first object counted as a change


# -- real PostgreSQL and NATS ----------------------------------------------------------------------------


def ddl_config(db: Database, nats: NatsServer, **listener: Any) -> dict[str, Any]:
    listener.setdefault("ddl", {"capture": True})
    return nats_config(db.server.port, db.name, nats.url, **listener)


def ddl_events(got: list[Received]) -> list[tuple[str, str | None, str | None]]:
    return [(g.event["command"], g.event["objectType"], g.event["object"]) for g in got if g.event["action"] == "DDL"]


async def test_create_alter_drop_table_and_rows_arrive_in_commit_order(
    fresh_any_db: Database, nats_server: NatsServer
) -> None:
    dsn = fresh_any_db.dsn()
    cfg = ddl_config(fresh_any_db, nats_server)
    topic = cfg["publisher"]["topic"]
    async with running(cfg):
        await sql(
            dsn,
            "CREATE TABLE items (id int PRIMARY KEY, name text)",
            "BEGIN; INSERT INTO items VALUES (1, 'a'); ALTER TABLE items ADD COLUMN note text;"
            " INSERT INTO items VALUES (2, 'b', 'n'); COMMIT",
            "BEGIN; CREATE TABLE never (id int PRIMARY KEY); ALTER TABLE items ADD COLUMN gone int; ROLLBACK",
            "CREATE TEMP TABLE scratch (x int)",
            "CREATE TABLE wal_listener.own (x int)",  # the listener's schema: never published
            "DROP TABLE IF EXISTS nothing",
            f"COMMENT ON TABLE items IS '{'x' * 70000}'",  # longer than a DDL message carries
            "CREATE FOREIGN DATA WRAPPER nowhere",
            "CREATE SERVER far FOREIGN DATA WRAPPER nowhere OPTIONS (host 'far')",
            "CREATE USER MAPPING FOR postgres SERVER far OPTIONS (password 'sesame')",  # never its text
            "DROP TABLE items",
        )
        got = await read_stream(nats_server.url, topic, 9)
    assert [(g.subject.removeprefix(topic + "."), g.event["action"]) for g in got] == [
        ("ddl", "DDL"), ("public_items", "INSERT"), ("ddl", "DDL"), ("public_items", "INSERT"), *[("ddl", "DDL")] * 5,
    ], got
    assert ddl_events(got) == [
        ("CREATE TABLE", "table", "public.items"), ("ALTER TABLE", "table", "public.items"),
        ("COMMENT", "table", "public.items"), ("CREATE FOREIGN DATA WRAPPER", "foreign-data wrapper", "nowhere"),
        ("CREATE SERVER", "server", "far"), ("CREATE USER MAPPING", "user mapping", "postgres on server far"),
        ("DROP TABLE", "table", "public.items"),
    ]
    assert [g.event["statement"] for g in got[4:8]] == [None, "CREATE FOREIGN DATA WRAPPER nowhere", None, None]
    assert not [g for g in got if b"sesame" in g.raw]
    create, first, alter, second, *_, drop = (g.event for g in got)
    assert create["statement"] == "CREATE TABLE items (id int PRIMARY KEY, name text)" and create["schema"] == "public"
    assert alter["statement"] is None  # the client sent five statements as one query: which one is not known
    assert first["commitTime"] == alter["commitTime"] == second["commitTime"]
    assert first["id"] < alter["id"] < second["id"]  # one transaction: consecutive ids
    assert second["data"] == {"id": 2, "name": "b", "note": "n"}
    assert drop["statement"] == "DROP TABLE items"


async def test_kill_9_before_the_commit_is_confirmed_sends_the_ddl_event_again_with_its_id(
    fresh_db: str, pg: Any, nats_server: NatsServer, tmp_path: Path, procs: list[ListenerProcess]
) -> None:
    """A DDL event goes out, a row of its transaction can never be (larger than NATS takes): kill -9; the next
    listener (which leaves that table out) sends the DDL event again with the same id."""
    dsn = pg.dsn(fresh_db)
    await sql(dsn, "CREATE TABLE big (id int PRIMARY KEY, body text)")
    topic, slot = unique("t"), unique("slot")
    cfg = nats_config(pg.port, fresh_db, nats_server.url, topic=topic, slotName=slot, ddl={"capture": True})
    cfg["publisher"]["duplicateWindow"] = "100ms"  # JetStream keeps the second copy, so it can be seen
    first = ListenerProcess(cfg, tmp_path).start()
    procs.append(first)
    await wait_until(lambda: '"msg":"streaming"' in first.output(), 60, "streaming")
    await sql(dsn, "BEGIN; ALTER TABLE big ADD COLUMN note text;"
                   " INSERT INTO big SELECT 1, string_agg(md5(i::text), '') FROM generate_series(1, 40000) i; COMMIT")
    end = await current_lsn(dsn)
    sent = await read_stream(nats_server.url, topic, 1, rest=False)
    await wait_until(lambda: "exceeds the server's max_payload" in first.output(), 30, "the big row refused")
    first.kill()
    assert await confirmed_lsn(dsn, slot) < end

    cfg["listener"]["filter"] = {"tables": {"big": ["update"]}}  # its DDL, not its insert
    second = ListenerProcess(cfg, tmp_path).start()
    procs.append(second)
    await wait_until(lambda: _reached(dsn, slot, end), 60, "the commit confirmed")
    again = await read_stream(nats_server.url, topic, 2)
    assert [g.event["action"] for g in again] == ["DDL", "DDL"]
    assert again[0].id == again[1].id == sent[0].id and again[0].raw == again[1].raw
    assert await asyncio.to_thread(second.terminate) == 0


async def _reached(dsn: str, slot: str, lsn: int) -> bool:
    return await confirmed_lsn(dsn, slot) >= lsn


def _as_role(dsn: str, role: str) -> str:
    return dsn.replace("user=postgres", f"user={role}")


async def test_without_a_superuser_one_line_then_a_dba_installs_it_with_print_sql(
    fresh_any_db: Database, nats_server: NatsServer, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    dsn = fresh_any_db.dsn()
    role = unique("rep")
    await sql(
        dsn,
        f"CREATE ROLE {role} LOGIN REPLICATION",
        f"GRANT CREATE ON DATABASE {fresh_any_db.name} TO {role}",
        f"GRANT CREATE ON SCHEMA public TO {role}",
    )
    await sql(_as_role(dsn, role), "CREATE TABLE items (id int PRIMARY KEY, note text)")
    cfg = ddl_config(fresh_any_db, nats_server, filter={"tables": {"items": ["insert", "update"]}})
    cfg["database"]["user"] = role
    topic = cfg["publisher"]["topic"]
    caplog.set_level(logging.INFO, "listener.ddl")
    path = tmp_path / "listener.yml"
    path.write_text(orjson.dumps(cfg).decode())
    async with running(cfg):
        await sql(dsn, "ALTER TABLE items ADD COLUMN before_install int", "INSERT INTO items VALUES (1, 'a')")
        got = await read_stream(nats_server.url, topic, 1)
        assert [g.event["action"] for g in got] == ["INSERT"]  # the rows stream on, without DDL events
        lines = [r for r in caplog.records if "DDL event trigger is not installed" in r.getMessage()]
        assert len(lines) == 1 and lines[0].levelno == logging.WARNING
        line = lines[0].getMessage()
        assert f"user '{role}' is not a superuser" in line and "wal-listener ddl --print-sql" in line, line
        status = await asyncio.to_thread(run_cli, ["ddl", "--config", str(path)])
        assert status.returncode == 1 and "not installed" in status.stdout

        # what a DBA runs, twice (idempotent); no config needed to print it; the role keeps its backfill state
        # in the schema this makes
        printed = await asyncio.to_thread(run_cli, ["ddl", "--print-sql", role])
        assert printed.returncode == 0 and printed.stdout.startswith("BEGIN;"), printed.stderr
        await sql(dsn, printed.stdout, printed.stdout)
        status = await asyncio.to_thread(run_cli, ["ddl", "--config", str(path)])
        assert status.returncode == 0 and "installed and enabled" in status.stdout
        backfill = await asyncio.to_thread(run_cli, ["backfill", "items", "--no-wait", "--config", str(path)])
        assert backfill.returncode == 0, backfill.stderr
        await read_stream(nats_server.url, topic, 2, rest=False)  # the READ of the backfill

        # no restart: the next DDL is an event, run by the application's role
        await sql(_as_role(dsn, role), "ALTER TABLE items ADD COLUMN after_install int")
        got = await read_stream(nats_server.url, topic, 3)
    assert [g.event["action"] for g in got] == ["INSERT", "READ", "DDL"]
    assert ddl_events(got) == [("ALTER TABLE", "table", "public.items")]
    assert got[2].event["statement"] == "ALTER TABLE items ADD COLUMN after_install int"
    assert rows_of(await query(dsn, "SELECT count(*) FROM pg_event_trigger")) == 2


def rows_of(rows: list[tuple[Any, ...]]) -> Any:
    return rows[0][0]


def _notices(conn: psycopg.AsyncConnection[Any]) -> list[str]:
    said: list[str] = []
    conn.add_notice_handler(lambda diag: said.append(f"{diag.severity}: {diag.message_primary}"))
    return said


async def test_a_broken_trigger_function_never_blocks_ddl(fresh_any_db: Database, nats_server: NatsServer) -> None:
    """What the trigger calls is broken two ways; every DDL still succeeds (with a WARNING to its client) and
    is not captured; once mended, DDL is captured again."""
    dsn = fresh_any_db.dsn()
    app, nobody = unique("app"), unique("nobody")
    await sql(dsn, f"CREATE ROLE {app} LOGIN", f"GRANT CREATE ON SCHEMA public TO {app}", f"CREATE ROLE {nobody}")
    cfg = ddl_config(fresh_any_db, nats_server)
    topic = cfg["publisher"]["topic"]
    # (boolean, text, text) before PostgreSQL 17, then with a fourth argument, flush
    arguments = rows_of(await query(dsn, "SELECT pg_get_function_identity_arguments(oid) FROM pg_proc"
                                         " WHERE proname = 'pg_logical_emit_message' AND proargtypes[2] = 25"))
    emit = f"pg_catalog.pg_logical_emit_message({arguments})"
    breaks = [
        # the function it writes with is gone (renamed)
        (f"ALTER FUNCTION {emit} RENAME TO gone", f"ALTER FUNCTION pg_catalog.gone({arguments}) "
         "RENAME TO pg_logical_emit_message"),
        # it runs as a role that may no longer call it
        (f"ALTER FUNCTION wal_listener.capture_ddl() OWNER TO {nobody}; REVOKE EXECUTE ON FUNCTION {emit} FROM PUBLIC",
         f"GRANT EXECUTE ON FUNCTION {emit} TO PUBLIC; ALTER FUNCTION wal_listener.capture_ddl() OWNER TO postgres"),
    ]
    async with running(cfg):
        for number, (breaking, mending) in enumerate(breaks):
            await sql(dsn, breaking)
            for who in (dsn, _as_role(dsn, app)):
                async with await psycopg.AsyncConnection.connect(who, autocommit=True) as conn:
                    said = _notices(conn)
                    name = f"broken{number}_{'admin' if who == dsn else 'app'}"
                    await conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY)")
                    await conn.execute(f"ALTER TABLE {name} ADD COLUMN b int")
                    await conn.execute(f"DROP TABLE {name}")
                    assert len([s for s in said if s.startswith("WARNING: wal_listener:")]) == 3, said
            await sql(dsn, mending)
        await sql(_as_role(dsn, app), "CREATE TABLE mended (id int PRIMARY KEY)")
        # the mending statements are DDL too (the rename back, the GRANT): captured once they mended it
        got = await read_stream(nats_server.url, topic, 3)
    events = ddl_events(got)
    assert events[-1] == ("CREATE TABLE", "table", "public.mended"), events
    assert not [e for e in events if "broken" in str(e[2])], events


async def test_a_table_of_the_filter_created_later_is_added_at_once_and_only_its_ddl_is_published(
    fresh_any_db: Database, nats_server: NatsServer
) -> None:
    dsn = fresh_any_db.dsn()
    await sql(dsn, "CREATE TABLE items (id int PRIMARY KEY)", "CREATE TABLE other (id int PRIMARY KEY)")
    tables = {"items": ["insert"], "later": ["insert"]}
    # the periodic check (heartbeatInterval) would come after the test's timeouts: the DDL event brings it
    cfg = ddl_config(fresh_any_db, nats_server, filter={"tables": tables}, heartbeatInterval="10m")
    topic = cfg["publisher"]["topic"]
    published = "SELECT count(*) FROM pg_publication_tables WHERE tablename = 'later'"
    async with running(cfg):
        await sql(
            dsn,
            "ALTER TABLE other ADD COLUMN b int",
            "CREATE INDEX items_id_b ON items (id)",
            "ALTER TABLE items RENAME TO items_old",  # renamed away from the filter: its last DDL event
            "ALTER TABLE items_old ADD COLUMN c int",
            "CREATE TABLE later (id int PRIMARY KEY)",
        )
        await wait_until(lambda: _count(dsn, published), 15, "the new table in the publication")
        await sql(dsn, "INSERT INTO later VALUES (1)")
        got = await read_stream(nats_server.url, topic, 4)
    assert ddl_events(got) == [("CREATE INDEX", "index", "public.items_id_b"),
                               ("ALTER TABLE", "table", "public.items_old"),
                               ("CREATE TABLE", "table", "public.later")]
    assert got[3].event["action"] == "INSERT" and got[3].event["table"] == "later"


async def _count(dsn: str, text: str) -> bool:
    return bool(rows_of(await query(dsn, text)))


async def test_several_listeners_share_one_trigger(fresh_db: str, pg: Any, nats_server: NatsServer) -> None:
    """Two listeners with capture start together (one trigger, one message per DDL, each publishes it); a third
    without capture skips the prefix silently."""
    dsn = pg.dsn(fresh_db)
    await sql(dsn, "CREATE TABLE items (id int PRIMARY KEY)")
    # the filter keeps out the DDL the later listeners run when they start (their publications)
    configs = [nats_config(pg.port, fresh_db, nats_server.url, ddl={"capture": capture}, publicationName=unique("p"),
                           filter={"tables": {"items": ["insert"]}}) for capture in (True, True, False)]
    skipped = metric("messages_skipped_total", {"prefix": catalog.DDL_PREFIX})
    async with running(configs[0]), running(configs[1]), running(configs[2]):
        assert rows_of(await query(dsn, "SELECT count(*) FROM pg_event_trigger")) == 2
        await sql(dsn, "ALTER TABLE items ADD COLUMN b int", "INSERT INTO items VALUES (1, 2)")
        got = [await read_stream(nats_server.url, c["publisher"]["topic"], 2 if c["listener"]["ddl"]["capture"] else 1)
               for c in configs]
    assert [[g.event["action"] for g in each] for each in got] == [["DDL", "INSERT"], ["DDL", "INSERT"], ["INSERT"]]
    assert got[0][0].event["statement"] == got[1][0].event["statement"] == "ALTER TABLE items ADD COLUMN b int"
    assert metric("messages_skipped_total", {"prefix": catalog.DDL_PREFIX}) == skipped
