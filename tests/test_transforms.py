"""Transforms (listener.transforms): the pure parts — config errors, the escaping, routes, masks, the
start-up check — and, against a real PostgreSQL and brokers, what consumers get: every mask kind and
columns include/exclude on INSERT/UPDATE/DELETE (default and FULL identity) and READ, in every format;
hashes equal to an independent HMAC-SHA256 of the value's text form and stable across a restart and a
backfill; topics per tenant on NATS and Kafka with the escaping and the fallback; message keys per table.
(The leak test is tests/test_transforms_leak.py; the compiled path's equality tests/test_hotpath.py.)
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import yaml

from listener.config import ListenerConfig, load_config
from listener.errors import ConfigError
from listener.event import EventBuilder, read_event_ids
from listener.pgoutput import UNCHANGED, Column, Relation, Tuple
from listener.transforms import MAX_TOPIC_BYTES, MISSING, NULL, REDACTED, Transforms, escape, matches
from listener.types import TypeRegistry
from tests.support.brokers import Got, Kafka, Nats
from tests.support.events import make_config
from tests.support.harness import (
    ListenerProcess,
    config_dict,
    metric,
    read_stream,
    running,
    sql,
    unique,
    wait_until,
)
from tests.support.services import NatsServer, PostgresServer, TansuServer

KEY = "transforms-test-key-0123456789"


def mac(text: str, key: str = KEY) -> str:
    """An HMAC-SHA256 computed here, independently of the listener: what a hash mask must publish."""
    return hmac.new(key.encode(), text.encode(), "sha256").hexdigest()


# -- config ------------------------------------------------------------------------------------------

BASE = """\
listener:
  slotName: s1
  transformsHashKey: "{key}"
  transforms:
{transforms}
database: {{name: db, user: u}}
publisher: {{type: nats, address: "localhost:4222", topic: t}}
"""


def _write(tmp_path: Path, transforms: str, key: str = KEY) -> Path:
    path = tmp_path / "config.yml"
    path.write_text(BASE.format(key=key, transforms="\n".join("    " + line for line in transforms.splitlines())))
    return path


@pytest.mark.parametrize(("transforms", "expected"), [
    ("- tables: [users]\n  mask: {email: encrypt}",
     "listener.transforms.0.mask.email = 'encrypt' is not allowed; use one of 'hash', 'redact' or 'null'"),
    ("- tables: [users]\n  mask: {birth: null}", 'write the mask as "null" (in quotes)'),
    ("- tables: [users]\n  columns: {include: [a], exclude: [b]}",
     "listener.transforms.0.columns = {'include': ['a'], 'exclude': ['b']} is invalid: set include or exclude"),
    ("- tables: [users]\n  topic: users.tenant", "listener.transforms.0.topic = 'users.tenant' is invalid: "
     "'users.tenant' names no column"),
    ("- tables: [users]\n  topic: 'users/{tenant}'", "outside the {column} parts only letters, digits"),
    ("- tables: [users]\n  topic: '.{tenant}'", "must not start or end with a dot"),
    ("- tables: [users]\n  topic: 'a.{}'", "an empty {} names no column"),
    ("- tables: ['a.b.c']", "must be 'schema.table', 'table' or 'schema.*'"),
    ("- tables: ['*']", "must be 'schema.table', 'table' or 'schema.*'"),
    ("- tables: []", "listener.transforms.0.tables"),
    ("- tables: [users]\n  columns: {exclude: [email]}\n  mask: {email: hash}",
     "mask.email: the column is not published"),
    ("- tables: [users]\n  columns: {include: [id]}\n  key: [tenant]", "key: column 'tenant' is not published"),
    ("- tables: [users]\n  columns: {exclude: [tenant]}\n  topic: 'u.{tenant}'", "topic: column 'tenant' is not"),
    ("- tables: [users]\n  mask: {tenant: redact}\n  topic: 'u.{tenant}'", "masked with redact: every event"),
    ("- tables: [users]\n  key: [id, id]", "key: a column is listed twice"),
    ("- tables: [users]\n  colums: {exclude: [a]}", "unknown key listener.transforms.0.colums"),
])  # fmt: skip
def test_a_bad_transform_is_one_line_naming_the_key(tmp_path: Path, transforms: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, transforms))
    message = str(caught.value)
    assert expected in message, message
    assert "\n" not in message and message.startswith("config: ")


def test_hash_needs_a_key_of_16_characters(tmp_path: Path) -> None:
    hashed = "- tables: [users]\n  mask: {email: hash}"
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, hashed, key=""))
    assert str(caught.value) == (
        "config: listener.transformsHashKey is required when a mask uses hash (listener.transforms.0.mask.email); "
        "set it or WAL_LISTENER_TRANSFORMSHASHKEY to a random secret of 16+ characters (openssl rand -hex 32)"
    )
    with pytest.raises(ConfigError, match="too short") as short:
        load_config(_write(tmp_path, hashed, key="short-key"))
    assert "short-key" not in str(short.value)
    cfg = load_config(_write(tmp_path, hashed, key=""), {"WAL_LISTENER_TRANSFORMSHASHKEY": KEY})
    assert cfg.listener.transforms_hash_key.get_secret_value() == KEY
    assert load_config(_write(tmp_path, "- tables: [users]\n  mask: {email: redact}", key="")).listener.transforms


def test_the_hash_key_is_a_secret(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, "- tables: [users]\n  mask: {email: hash}"))
    assert KEY in cfg.secret_values()
    assert "transformsHashKey" not in cfg.to_yaml_dict()["listener"]
    assert cfg.to_yaml_dict(include_secrets=True)["listener"]["transformsHashKey"] == KEY
    assert KEY not in repr(cfg) and KEY not in str(cfg.model_dump())
    # a key starting with a YAML bracket stays text in the environment
    env = load_config(_write(tmp_path, "- tables: [users]"), {"WAL_LISTENER_TRANSFORMSHASHKEY": "[not-a-list-0123456"})
    assert env.listener.transforms_hash_key.get_secret_value() == "[not-a-list-0123456"


def test_transforms_from_the_environment(tmp_path: Path) -> None:
    path = _write(tmp_path, "- tables: [users]")
    cfg = load_config(path, {"WAL_LISTENER_TRANSFORMS": '[{"tables": ["orders"], "topic": "o.{tenant}"}]'})
    assert [(t.tables, t.topic) for t in cfg.listener.transforms] == [(["orders"], "o.{tenant}")]


def test_the_cli_exits_2_with_one_line(tmp_path: Path) -> None:
    from tests.support.harness import run_cli

    run = run_cli(["--config", str(_write(tmp_path, "- tables: [users]\n  mask: {email: scramble}")), "check-config"])
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "listener.transforms.0.mask.email" in run.stderr
    good = run_cli(["--config", str(_write(tmp_path, "- tables: [users]\n  mask: {email: hash}")), "check-config"])
    assert good.returncode == 0, good.stderr
    assert KEY not in good.stdout + good.stderr and "mask:" in good.stdout


# -- pure parts --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "escaped"), [
    ("acme", "acme"), ("Acme-42", "Acme-42"), ("acme_eu", "acme_5feu"), ("a.b", "a_2eb"), ("a b", "a_20b"),
    ("x/y*z>", "x_2fy_2az_3e"), ("é", "_c3_a9"), ("日", "_e6_97_a5"), ("_", "_5f"), ("%~+", "_25_7e_2b"),
])  # fmt: skip
def test_the_escaping(value: str, escaped: str) -> None:
    assert escape(value) == escaped
    # legal everywhere: a NATS subject token, Kafka's [a-zA-Z0-9._-], a Pub/Sub id, a RabbitMQ word
    assert all(c.isascii() and (c.isalnum() or c in "_-") for c in escaped)
    # reversible
    raw = bytearray()
    rest = escaped
    while rest:
        if rest[0] == "_":
            raw.append(int(rest[1:3], 16))
            rest = rest[3:]
        else:
            raw += rest[0].encode()
            rest = rest[1:]
    assert raw.decode() == value


def test_table_patterns_and_first_match_wins() -> None:
    assert matches("users", "public", "users") and matches("users", "billing", "users")
    assert matches("billing.*", "billing", "x") and not matches("billing.*", "public", "x")
    assert matches("public.users", "public", "users") and not matches("public.users", "shop", "users")
    cfg = ListenerConfig.model_validate({"slotName": "s", "transforms": [
        {"tables": ["public.users"], "mask": {"a": "redact"}},
        {"tables": ["users", "billing.*"], "mask": {"b": "null"}},
    ]})  # fmt: skip
    transforms = Transforms(cfg, "t.")
    assert transforms.find("public", "users") is cfg.transforms[0]
    assert transforms.find("shop", "users") is cfg.transforms[1]
    assert transforms.find("billing", "invoices") is cfg.transforms[1]
    assert transforms.find("public", "orders") is None


def test_schema_events_announce_only_the_published_columns() -> None:
    """A SCHEMA event lists what the table's events carry: an excluded column is not announced, a hashed or
    redacted one is text, one masked to null keeps its type; the other tables are announced as they are."""
    cfg = make_config(hash_key=KEY, transforms=[
        {"tables": ["users"], "columns": {"exclude": ["pw"]}, "mask": {"email": "hash", "born": "null"}},
        {"tables": ["accounts"], "columns": {"include": ["email", "plan"]}},
    ])  # fmt: skip
    builder = EventBuilder(cfg, TypeRegistry(), needs_key=True, compiled=False)

    def announced(table: str, names: list[str]) -> list[dict[str, Any]]:
        info = builder.relation_info(Relation(1, "public", table, "d", tuple(
            Column(n, 23, -1, n == "id") for n in names)))
        columns = [{"name": n, "type": "integer", "key": n == "id"} for n in names]
        return builder.announced_columns(info, columns)

    assert announced("users", ["id", "email", "pw", "born"]) == [
        {"name": "id", "type": "integer", "key": True}, {"name": "email", "type": "text", "key": False},
        {"name": "born", "type": "integer", "key": False}]
    assert [c["name"] for c in announced("accounts", ["id", "email", "plan", "x"])] == ["email", "plan"]
    assert [c["name"] for c in announced("other", ["id", "pw"])] == ["id", "pw"]


def test_apply_and_route_on_python_values() -> None:
    cfg = ListenerConfig.model_validate({"slotName": "s", "transformsHashKey": KEY, "transforms": [{
        "tables": ["users"], "columns": {"exclude": ["pw"]},
        "mask": {"email": "hash", "phone": "redact", "born": "null"}, "topic": "u.{tenant}.{email}",
    }]})  # fmt: skip
    names = ["id", "tenant", "email", "phone", "born", "pw"]
    shaped = Transforms(cfg, "t.").relation("public", "users", names, [True, False, False, False, False, False])
    assert shaped is not None and shaped.names == ("id", "tenant", "email", "phone", "born")
    row: Tuple = shaped.apply(["1", "a.b", "x@y", "555", "2000-01-01", "secret"])
    assert row == ["1", "a.b", mac("x@y"), REDACTED, None]
    assert shaped.apply(["1", None, None, None, None, None]) == ["1", None, None, None, None]
    assert shaped.apply(["1", UNCHANGED, UNCHANGED, UNCHANGED, UNCHANGED, "x"])[2:] == [UNCHANGED] * 3
    route = shaped.route
    assert route is not None
    assert route.subject(row, None, None) == f"t.u.a_2eb.{mac('x@y')}"
    assert route.subject(["1", None, "e", None, None], None, None) == NULL
    key_only: Tuple = ["1", None, None, None, None]
    assert route.subject(None, key_only, "K") == MISSING  # a DELETE's old key has no tenant
    assert route.subject(None, row, "O") == f"t.u.a_2eb.{mac('x@y')}"  # REPLICA IDENTITY FULL
    unchanged: Tuple = ["1", UNCHANGED, "e", None, None]
    assert route.subject(unchanged, None, None) == MISSING
    assert route.subject(unchanged, row, "O") == f"t.u.a_2eb.{'e'}"
    long: Tuple = ["1", "x" * MAX_TOPIC_BYTES, "e", None, None]
    assert route.subject(long, None, None) == 4  # too_long


def test_the_check_at_start_names_missing_columns_and_tables() -> None:
    cfg = ListenerConfig.model_validate({"slotName": "s", "transformsHashKey": KEY, "transforms": [
        {"tables": ["public.users", "public.gone"], "mask": {"email": "hash", "nope": "redact"}, "topic": "u.{tnt}"},
        {"tables": ["shop.*"], "columns": {"exclude": ["pw"]}},
    ]})  # fmt: skip
    found = Transforms(cfg, "t.").check({
        ("public", "users"): ["id", "email"], ("shop", "a"): ["id", "pw"], ("shop", "b"): ["id"],
    })  # fmt: skip
    assert found == [
        "listener.transforms.0: table public.users has no column nope, tnt (applied when it has)",
        "listener.transforms.0: table public.gone does not exist (yet)",
        "listener.transforms.1: table shop.b has no column pw (applied when it has)",
    ]


def test_a_table_without_a_transform_is_built_as_before() -> None:
    """An EventBuilder with transforms builds the other tables' plans exactly as one without any."""
    rel = Relation(1, "public", "plain", "d", (Column("id", 23, -1, True), Column("email", 25, -1, False)))
    plain = EventBuilder(make_config(), TypeRegistry(), needs_key=True).relation_info(rel)
    shaped = EventBuilder(make_config(transforms=[{"tables": ["users"], "mask": {"email": "hash"}}], hash_key=KEY),
                          TypeRegistry(), needs_key=True).relation_info(rel)
    assert shaped.transform is None and shaped.route is None
    assert (shaped.plan, shaped.names, shaped.key_index, shaped.subject) == (
        plain.plan, plain.names, plain.key_index, plain.subject)


def test_excluded_key_columns_leave_the_default_key_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    rel = Relation(1, "public", "accounts", "d", (Column("id", 23, -1, True), Column("email", 25, -1, False)))
    built = EventBuilder(make_config(transforms=[{"tables": ["accounts"], "columns": {"include": ["email"]}}]),
                         TypeRegistry(), needs_key=True, compiled=False)
    with caplog.at_level(logging.WARNING, "listener.event"):
        info = built.add_relation(rel)
        built.add_relation(rel)
    assert info.key_index == () and info.names == ("email",)
    warned = [r for r in caplog.records if "message key leaves out" in r.getMessage()]
    assert len(warned) == 1 and warned[0].fields["columns"] == ["id"]  # type: ignore[attr-defined]


# -- against PostgreSQL and the brokers --------------------------------------------------------------

USERS = ("CREATE TABLE users (id int PRIMARY KEY, tenant text, email text, phone text, born date, pw text,"
         " note text, seen timestamptz)")
ACCOUNTS = "CREATE TABLE accounts (id int PRIMARY KEY, email text, plan text, secret text)"
TRANSFORMS = [
    {"tables": ["public.users"], "columns": {"exclude": ["pw"]},
     "mask": {"email": "hash", "phone": "redact", "born": "null", "seen": "hash"}},
    {"tables": ["accounts"], "columns": {"include": ["email", "plan"]}, "mask": {"email": "hash"}},
]  # fmt: skip
SEEN = "2026-01-02 03:04:05.5+00"  # the text form of the seen column, as pgoutput sends it (TimeZone UTC)
ANN = f"INSERT INTO users VALUES (1, 'acme', 'ann@example.com', '555-0101', '1980-01-02', 'h1', NULL, '{SEEN}')"


async def _text_form(dsn: str, sql_text: str) -> str:
    """A value's text form as the replication connection's settings write it."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("SET TimeZone = 'UTC'")
        await conn.execute("SET DateStyle = 'ISO'")
        row = await (await conn.execute(f"SELECT ({sql_text})::text")).fetchone()
    assert row is not None
    return str(row[0])


async def _workload(dsn: str) -> None:
    await sql(
        dsn,
        f"INSERT INTO users VALUES (2, 'acme', 'bob@example.com', '555-0102', '1990-02-03', 'h2', 'n', '{SEEN}')",
        "INSERT INTO users VALUES (3, 'acme', NULL, NULL, NULL, NULL, NULL, NULL)",
        "UPDATE users SET email = 'bob2@example.com', note = 'm' WHERE id = 2",
        "DELETE FROM users WHERE id = 1",
        "INSERT INTO accounts VALUES (2, 'carol@example.com', 'pro', 's2')",
        "DELETE FROM accounts WHERE id = 1",
    )


def _masked_user(id_: int, email: str, phone: str | None = "[redacted]") -> dict[str, Any]:
    return {"id": id_, "tenant": "acme", "email": mac(email), "phone": phone, "born": None, "note": None,
            "seen": mac(SEEN)}  # fmt: skip


@pytest.mark.service
@pytest.mark.parametrize("identity", ["default", "full"])
async def test_every_mask_and_column_list_on_every_action(
    identity: str, fresh_db: str, pg: PostgresServer, nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    dsn = pg.dsn(fresh_db)
    await sql(dsn, USERS, ACCOUNTS,
              ANN,
              "INSERT INTO accounts VALUES (1, 'dave@example.com', 'free', 's1')")  # fmt: skip
    if identity == "full":
        await sql(dsn, "ALTER TABLE users REPLICA IDENTITY FULL", "ALTER TABLE accounts REPLICA IDENTITY FULL")
    transforms = [*TRANSFORMS[:1], {**TRANSFORMS[1], "columns": {"include": ["email", "plan", "nope"]},
                                    "mask": {"email": "hash", "nope": "redact"}}]
    cfg = config_dict(pg.port, fresh_db, Nats(unique("tf"), nats_server.url).publisher(),
                      snapshot={"mode": "initial"}, transforms=transforms, transformsHashKey=KEY)
    topic = cfg["publisher"]["topic"]
    with caplog.at_level(logging.WARNING, "listener.app"):
        async with running(cfg):
            await read_stream(nats_server.url, topic, 2)  # the snapshot's READ events first
            await _workload(dsn)
            got = await read_stream(nats_server.url, topic, 8)
    assert ["listener.transforms.1: table public.accounts has no column nope (applied when it has)"] == [
        r.getMessage() for r in caplog.records if "listener.transforms" in r.getMessage()]  # once, at start
    assert await _text_form(dsn, f"'{SEEN}'::timestamptz") == SEEN  # the hash covers PostgreSQL's text form
    users = [g.event for g in got if g.event["table"] == "users"]
    accounts = [g.event for g in got if g.event["table"] == "accounts"]
    assert [e["action"] for e in users] == ["READ", "INSERT", "INSERT", "UPDATE", "DELETE"]
    assert [e["action"] for e in accounts] == ["READ", "INSERT", "DELETE"]
    read, insert, nulls, update, delete = users
    assert read["data"] == {**_masked_user(1, "ann@example.com"), "note": None}
    assert insert["data"] == {**_masked_user(2, "bob@example.com"), "note": "n"}
    assert nulls["data"] == {"id": 3, "tenant": "acme", "email": None, "phone": None, "born": None, "note": None,
                             "seen": None}  # fmt: skip  # NULL stays null whatever the mask
    assert update["data"] == {**_masked_user(2, "bob2@example.com"), "note": "m"}
    if identity == "full":
        assert update["dataOld"] == {**_masked_user(2, "bob@example.com"), "note": "n"}
        assert delete["dataOld"] == _masked_user(1, "ann@example.com")
    else:
        assert update["dataOld"] == {} and delete["dataOld"] == {"id": 1}
    assert delete["data"] == {}
    assert accounts[0]["data"] == {"email": mac("dave@example.com"), "plan": "free"}  # include: no id, no secret
    assert accounts[1]["data"] == {"email": mac("carol@example.com"), "plan": "pro"}
    expected_old = {"email": mac("dave@example.com"), "plan": "free"} if identity == "full" else {}
    assert accounts[2]["dataOld"] == expected_old  # the key column is not listed in include: not published
    everything = b"".join(g.raw for g in got)
    for clear in (b"ann@", b"bob@", b"bob2@", b"carol@", b"dave@", b"555-01", b"1980-01-02", b"h1", b"s1", b"s2"):
        assert clear not in everything


@pytest.mark.service
@pytest.mark.parametrize("fmt", ["cloudevents-binary", "cloudevents-structured", "debezium"])
async def test_masks_in_every_format(fmt: str, fresh_db: str, pg: PostgresServer, nats_server: NatsServer) -> None:
    dsn = pg.dsn(fresh_db)
    await sql(dsn, USERS, ACCOUNTS, "ALTER TABLE users REPLICA IDENTITY FULL",
              ANN,
              "INSERT INTO accounts VALUES (1, 'dave@example.com', 'free', 's1')")  # fmt: skip
    kind, _, mode = fmt.partition("-")
    publisher = Nats(unique("tf"), nats_server.url).publisher(format=kind, **({"cloudEvents": {"mode": mode}}
                                                                              if mode else {}))
    cfg = config_dict(pg.port, fresh_db, publisher, snapshot={"mode": "initial"}, transforms=TRANSFORMS,
                      transformsHashKey=KEY)
    async with running(cfg):
        await read_stream(nats_server.url, publisher["topic"], 2)
        await _workload(dsn)
        got = await read_stream(nats_server.url, publisher["topic"], 8)
    rows = [g.event for g in got if "users" in g.subject]
    if fmt == "debezium":
        by_op = {e["op"]: e for e in rows if e["op"] != "c" or e["after"]["id"] == 2}
        assert by_op["r"]["after"]["email"] == mac("ann@example.com") and "pw" not in by_op["r"]["after"]
        assert by_op["c"]["after"]["phone"] == "[redacted]" and by_op["c"]["after"]["born"] is None
        assert by_op["u"]["before"]["email"] == mac("bob@example.com")
        assert by_op["u"]["after"]["email"] == mac("bob2@example.com")
        assert by_op["d"]["before"]["seen"] == mac(SEEN) and by_op["d"]["after"] is None
    else:
        events = [e["data"] if mode == "structured" else e for e in rows]
        assert events[0]["action"] == "READ" and events[0]["data"]["email"] == mac("ann@example.com")
        update = next(e for e in events if e["action"] == "UPDATE")
        assert update["dataOld"]["email"] == mac("bob@example.com") and "pw" not in update["dataOld"]
    everything = b"".join(g.raw + orjson.dumps(g.headers) for g in got)
    for clear in (b"ann@", b"bob@", b"dave@", b"555-01", b"1980-01-02", b"h1", b"s1"):
        assert clear not in everything


@pytest.mark.service
async def test_the_same_value_hashes_the_same_across_a_restart_and_a_backfill(
    fresh_db: str, pg: PostgresServer, nats_server: NatsServer, tmp_path: Path, procs: list[ListenerProcess]
) -> None:
    dsn = pg.dsn(fresh_db)
    await sql(dsn, USERS)
    topic = unique("tf")
    transforms = TRANSFORMS[:1]
    cfg = config_dict(pg.port, fresh_db, Nats(topic, nats_server.url).publisher(), transforms=transforms,
                      transformsHashKey=KEY)
    async with running(cfg):
        await sql(dsn, "INSERT INTO users (id, email) VALUES (1, 'same@example.com')")
        first = await read_stream(nats_server.url, topic, 1)
    # a new process, the key given through the environment only
    del cfg["listener"]["transformsHashKey"]
    proc = ListenerProcess(cfg, tmp_path, env={"WAL_LISTENER_TRANSFORMSHASHKEY": KEY}).start()
    procs.append(proc)
    await sql(dsn, "INSERT INTO users (id, email) VALUES (2, 'same@example.com')")
    second = await read_stream(nats_server.url, topic, 2, timeout=90)
    assert await _wait_terminated(proc) == 0
    # another listener (own slot) backfills the table: its READ events carry the same hash
    other = config_dict(pg.port, fresh_db, Nats(unique("tf"), nats_server.url).publisher(), transforms=transforms,
                        transformsHashKey=KEY, snapshot={"mode": "initial"}, publicationName=unique("pub"))
    async with running(other):
        reads = await read_stream(nats_server.url, other["publisher"]["topic"], 2)
    hashes = {e.event["data"]["email"] for e in [*first, *second, *reads]}
    assert hashes == {mac("same@example.com")}
    assert [e.event["action"] for e in reads] == ["READ", "READ"]


async def _wait_terminated(proc: ListenerProcess) -> int:
    import asyncio

    return await asyncio.to_thread(proc.terminate)


@pytest.mark.service
async def test_a_backfill_of_a_table_with_a_masked_key(
    fresh_db: str, pg: PostgresServer, nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """READ event ids are made from the row key: with a masked key column they are keyed with the hash key
    (nobody can test guesses of the key against them), and without a hash key such a backfill is refused."""
    dsn = pg.dsn(fresh_db)
    await sql(dsn, "CREATE TABLE members (email text PRIMARY KEY, plan text)",
              "INSERT INTO members VALUES ('ann@example.com', 'pro')")  # fmt: skip
    redacted = [{"tables": ["members"], "mask": {"email": "redact"}}]
    cfg = config_dict(pg.port, fresh_db, Nats(unique("tf"), nats_server.url).publisher(), transforms=redacted,
                      snapshot={"mode": "initial"})
    with caplog.at_level(logging.ERROR, "listener.backfill"):
        async with running(cfg):
            await wait_until(lambda: any("backfill refused" in r.getMessage() for r in caplog.records), 30,
                             "the refusal")
    (refusal,) = [r for r in caplog.records if "backfill refused" in r.getMessage()]
    assert "public.members: listener.transforms masks or leaves out its key column(s) email" in (
        refusal.fields["error"])  # type: ignore[attr-defined]

    hashed = [{"tables": ["members"], "mask": {"email": "hash"}}]
    cfg = config_dict(pg.port, fresh_db, Nats(unique("tf"), nats_server.url).publisher(), transforms=hashed,
                      transformsHashKey=KEY, snapshot={"mode": "initial"}, publicationName=unique("pub"))
    async with running(cfg):
        (read,) = await read_stream(nats_server.url, cfg["publisher"]["topic"], 1)
    (backfill_id,) = (await _one(dsn, "SELECT id FROM wal_listener.backfills WHERE slot = %s",
                                 cfg["listener"]["slotName"]))
    slot = cfg["listener"]["slotName"]
    assert read.event["data"] == {"email": mac("ann@example.com"), "plan": "pro"}
    assert read.id == read_event_ids(slot, backfill_id, "public", "members", KEY.encode())(["ann@example.com"])
    assert read.id != read_event_ids(slot, backfill_id, "public", "members")(["ann@example.com"])


async def _one(dsn: str, text: str, *params: Any) -> tuple[Any, ...]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        row = await (await conn.execute(text, params)).fetchone()
    assert row is not None
    return tuple(row)


ORDERS = "CREATE TABLE orders (id int PRIMARY KEY, tenant text, note text)"
DOCS = ("CREATE TABLE docs (id int PRIMARY KEY, owner text, body text);"
        " ALTER TABLE docs ALTER owner SET STORAGE EXTERNAL")
TENANTS = {1: "acme", 2: "a.b c/é", 3: "acme_eu"}


@pytest.mark.service
@pytest.mark.parametrize("broker", ["nats", "kafka"])
async def test_routing_per_tenant_with_the_escaping_and_the_fallback(
    broker: str, fresh_db: str, pg: PostgresServer, request: pytest.FixtureRequest
) -> None:
    dsn = pg.dsn(fresh_db)
    await sql(dsn, ORDERS, DOCS, "CREATE TABLE plain (id int PRIMARY KEY)")
    topic = unique("route")
    made = (Nats(topic, request.getfixturevalue("nats_server").url) if broker == "nats"
            else Kafka(topic, request.getfixturevalue("tansu").bootstrap))
    transforms = [{"tables": ["orders"], "topic": "orders.{tenant}"},
                  {"tables": ["docs"], "topic": "docs.{owner}"}]  # fmt: skip
    cfg = config_dict(pg.port, fresh_db, made.publisher(), transforms=transforms,
                      topicsMap={"public_plain": "mapped_plain", "public_orders": "not-for-routed-tables"})
    reasons = (("orders", "null"), ("orders", "empty"), ("orders", "missing"), ("docs", "too_long"),
               ("docs", "missing"))
    counted = {(t, r): metric("transform_fallbacks_total", {"table": t, "reason": r}) for t, r in reasons}
    long_owner = "o" * 3000  # stored out of line (STORAGE EXTERNAL): an update leaves it "unchanged TOAST"
    async with running(cfg):
        await sql(
            dsn,
            *[f"INSERT INTO orders VALUES ({i}, '{t}', 'x')" for i, t in TENANTS.items()],
            "INSERT INTO orders VALUES (4, NULL, 'x')",
            "INSERT INTO orders VALUES (5, '', 'x')",
            "DELETE FROM orders WHERE id = 1",  # default identity: the old key has no tenant
            "INSERT INTO docs VALUES (1, 'short', 'b')",
            f"INSERT INTO docs VALUES (2, '{long_owner}', 'b')",
            "UPDATE docs SET body = 'c' WHERE id = 1",
            "UPDATE docs SET body = 'c' WHERE id = 2",  # owner unchanged TOAST: the event does not carry it
            "INSERT INTO plain VALUES (1)",
        )
        names = ["orders.acme", "orders.a_2eb_20c_2f_c3_a9", "orders.acme_5feu", "public_orders", "docs.short",
                 "public_docs", "mapped_plain"]
        got = await made.read(names, 11)
    subjects = sorted((g.subject, _action(g), g.event["table"], _row_id(g)) for g in got)
    assert subjects == sorted([
        (f"{topic}.orders.acme", "INSERT", "orders", 1),
        (f"{topic}.orders.a_2eb_20c_2f_c3_a9", "INSERT", "orders", 2),
        (f"{topic}.orders.acme_5feu", "INSERT", "orders", 3),
        (f"{topic}.public_orders", "INSERT", "orders", 4),  # NULL
        (f"{topic}.public_orders", "INSERT", "orders", 5),  # empty
        (f"{topic}.public_orders", "DELETE", "orders", 1),  # not carried
        (f"{topic}.docs.short", "INSERT", "docs", 1),
        (f"{topic}.docs.short", "UPDATE", "docs", 1),
        (f"{topic}.public_docs", "INSERT", "docs", 2),  # too long for a topic name
        (f"{topic}.public_docs", "UPDATE", "docs", 2),  # unchanged TOAST
        (f"{topic}.mapped_plain", "INSERT", "plain", 1),  # topicsMap: tables without a topic transform
    ])  # fmt: skip
    grown = {(t, r): metric("transform_fallbacks_total", {"table": t, "reason": r}) - counted[t, r] for t, r in reasons}
    assert grown == {("orders", "null"): 1, ("orders", "empty"): 1, ("orders", "missing"): 1,
                     ("docs", "too_long"): 1, ("docs", "missing"): 1}  # fmt: skip


def _action(got: Got) -> str:
    return str(got.event["action"])


def _row_id(got: Got) -> int:
    row = got.event["data"] or got.event["dataOld"]
    return int(row["id"])


@pytest.mark.service
async def test_message_keys_per_table(fresh_db: str, pg: PostgresServer, tansu: TansuServer) -> None:
    dsn = pg.dsn(fresh_db)
    await sql(dsn, "CREATE TABLE a (id int PRIMARY KEY, tenant text, email text)",
              "CREATE TABLE b (id int PRIMARY KEY, email text)", "CREATE TABLE c (id int PRIMARY KEY, v text)",
              "CREATE TABLE d (id int PRIMARY KEY, email text)")  # fmt: skip
    made = Kafka(unique("keys"), tansu.bootstrap)
    transforms = [
        {"tables": ["a"], "key": ["tenant", "id"]},
        {"tables": ["b"], "mask": {"email": "hash"}, "key": ["email"]},  # the key carries the masked value
        {"tables": ["d"], "columns": {"include": ["email"]}},  # the key column is not published: no key
    ]
    cfg = config_dict(pg.port, fresh_db, made.publisher(), transforms=transforms, transformsHashKey=KEY)
    async with running(cfg):
        await sql(dsn, "INSERT INTO a VALUES (1, 'acme', 'x@y')", "INSERT INTO b VALUES (1, 'x@y')",
                  "INSERT INTO c VALUES (7, 'v')", "INSERT INTO d VALUES (1, 'x@y')",
                  "UPDATE b SET id = 2 WHERE id = 1", "DELETE FROM a")  # fmt: skip
        got = await made.read(["public_a", "public_b", "public_c", "public_d"], 6)
    keys = sorted((g.event["table"], g.event["action"], g.key) for g in got)
    assert keys == sorted([
        ("a", "INSERT", orjson.dumps(["acme", "1"])),
        ("a", "DELETE", orjson.dumps([None, "1"])),  # default identity: the old key has no tenant
        ("b", "INSERT", mac("x@y").encode()),
        ("b", "UPDATE", mac("x@y").encode()),
        ("c", "INSERT", b"7"),
        ("d", "INSERT", None),
    ])  # fmt: skip


def test_the_example_config_with_transforms_loads(tmp_path: Path) -> None:
    """docs/transforms.md's example is a config the listener accepts."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "transforms.md").read_text()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    data = yaml.safe_load(block)
    data.setdefault("database", {"name": "db", "user": "u"})
    data.setdefault("publisher", {"type": "kafka", "address": "localhost:9092", "topic": "wal_listener"})
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(data))
    cfg = load_config(path, {"WAL_LISTENER_TRANSFORMSHASHKEY": KEY})
    assert cfg.listener.transforms

