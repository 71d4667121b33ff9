"""End to end for Kafka, RabbitMQ and Google Pub/Sub: PostgreSQL -> the listener -> the broker, read back
with each broker's own consumer client.

Every test runs once per broker (ids ``kafka``, ``rabbitmq``, ``pubsub``) against a real server: Tansu for
the Kafka protocol, the machine's RabbitMQ, the Pub/Sub emulator. Outages are network cuts through a
:class:`TcpProxy` (the brokers keep their data, so "nothing is missing" can be checked exactly); the
publisher-level tests also stop and restart Tansu and the emulator themselves.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from tests.support.brokers import Broker, Got, Kafka, PubSub, RabbitMQ
from tests.support.harness import (
    ListenerProcess,
    Received,
    Writer,
    assert_complete,
    config_dict,
    confirmed_lsn,
    current_lsn,
    run_cli,
    running,
    sql,
    unique,
    wait_until,
)
from tests.support.proxy import TcpProxy
from tests.support.services import ProxiedTansu, PubSubEmulator, TansuServer, free_port

pytestmark = pytest.mark.service

BROKERS = ["kafka", "rabbitmq", "pubsub"]


@pytest.fixture(params=BROKERS)
def broker_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def broker(
    broker_name: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Broker]:
    """The broker of this test run, on the shared session services."""
    topic = unique("e2e")
    made: Broker
    if broker_name == "kafka":
        tansu: TansuServer = request.getfixturevalue("tansu")
        made = Kafka(topic, tansu.bootstrap)
    elif broker_name == "rabbitmq":
        made = RabbitMQ(topic, request.getfixturevalue("rabbitmq_url"))
    else:
        emulator: PubSubEmulator = request.getfixturevalue("pubsub_emulator")
        monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emulator.host)  # the in-process listener
        made = PubSub(topic, emulator.host)
    yield made
    await made.close()


@pytest.fixture
async def cut_broker(
    broker_name: str, request: pytest.FixtureRequest, make_proxy: Callable[..., TcpProxy]
) -> AsyncIterator[tuple[Broker, TcpProxy]]:
    """The broker behind a TcpProxy that the listener goes through: ``proxy.stop()`` cuts it."""
    topic = unique("cut")
    made: Broker
    tansu: ProxiedTansu | None = None
    if broker_name == "kafka":
        proxy_port = free_port()
        tansu = ProxiedTansu(proxy_port)
        proxy = make_proxy("127.0.0.1", tansu.port, port=proxy_port)
        await asyncio.to_thread(tansu.start)
        made = Kafka(topic, proxy.address)
    elif broker_name == "rabbitmq":
        url = request.getfixturevalue("rabbitmq_url")
        proxy = make_proxy("127.0.0.1", 5672)
        made = RabbitMQ(topic, url, f"amqp://guest:guest@{proxy.address}/")
    else:
        emulator: PubSubEmulator = request.getfixturevalue("pubsub_emulator")
        proxy = make_proxy("127.0.0.1", emulator.port)
        made = PubSub(topic, emulator.host, proxy.address)
    try:
        yield made, proxy
    finally:
        proxy.start()
        await made.close()
        if tansu is not None:
            await asyncio.to_thread(tansu.cleanup)


def complete(events: list[Got], rows: int) -> None:
    """Every committed row arrived (duplicates allowed), each with one id however often it was sent."""
    assert_complete(list[Received](events), rows)


async def _ge(value: Any, target: int) -> bool:
    return bool(await value >= target)


# -- the events on each broker ------------------------------------------------------------------------


async def test_every_action_arrives_with_topic_key_and_headers(broker: Broker, fresh_db: str, pg: Any) -> None:
    dsn = pg.dsn(fresh_db)
    await sql(
        dsn, "CREATE TABLE pairs (a int, b text, v text, PRIMARY KEY (a, b))", "CREATE TABLE solo (id int PRIMARY KEY)"
    )
    tables = ["pairs", "solo"]
    await broker.prepare(tables)
    cfg = config_dict(pg.port, fresh_db, broker.publisher())
    async with running(cfg):
        await sql(
            dsn,
            "INSERT INTO pairs VALUES (1, 'x', 'first')",
            "UPDATE pairs SET v = 'second' WHERE a = 1",
            "DELETE FROM pairs WHERE a = 1",
            "INSERT INTO solo VALUES (7)",
            "TRUNCATE pairs",
        )
        got = await broker.read(tables, 5)
    arrived = [g for g in got if g.event["table"] == "pairs"]
    # the row's events arrive in commit order (one key); the key-less TRUNCATE has no order relative to
    # them on Kafka (any partition) and Pub/Sub (no ordering key). Ids sort in commit order.
    assert [g.event["action"] for g in arrived if g.event["action"] != "TRUNCATE"] == ["INSERT", "UPDATE", "DELETE"]
    pairs = sorted(arrived, key=lambda g: g.id)
    solo = [g for g in got if g.event["table"] == "solo"]
    assert [g.event["action"] for g in pairs] == ["INSERT", "UPDATE", "DELETE", "TRUNCATE"]
    assert len(solo) == 1 and solo[0].event["data"] == {"id": 7}
    assert pairs[0].event["data"] == {"a": 1, "b": "x", "v": "first"}
    assert pairs[1].event["data"]["v"] == "second"
    assert pairs[2].event["dataOld"] == {"a": 1, "b": "x"}
    for g in got:
        table = g.event["table"]
        assert g.subject == f"{broker.topic}.public_{table}"
        assert set(g.event) == {"id", "schema", "table", "action", "data", "dataOld", "commitTime"}
        for name in ("id", "schema", "table", "action"):
            assert g.headers[name] == str(g.event[name])
    if broker.name == "kafka":  # the row key (composite: a JSON list), the old key for DELETE
        assert [g.key for g in pairs] == [b'["1","x"]', b'["1","x"]', b'["1","x"]', None]
        assert solo[0].key == b"7"
    elif broker.name == "pubsub":  # the same key as ordering key
        assert [g.key for g in pairs] == ['["1","x"]', '["1","x"]', '["1","x"]', ""]
        assert solo[0].key == "7"
    else:
        for g in got:
            assert g.headers["message_id"] == g.id
            assert g.headers["content_type"] == "application/json" and g.headers["delivery_mode"] == "2"


async def test_message_key_from_a_column(fresh_db: str, pg: Any, tansu: TansuServer) -> None:
    dsn = pg.dsn(fresh_db)
    await sql(dsn, "CREATE TABLE users (id int PRIMARY KEY, tenant text)")
    kafka = Kafka(unique("keyfrom"), tansu.bootstrap)
    cfg = config_dict(pg.port, fresh_db, kafka.publisher(messageKeyFrom="tenant"))
    async with running(cfg):
        await sql(dsn, "INSERT INTO users VALUES (1, 'acme')", "INSERT INTO users VALUES (2, 'globex')")
        got = await kafka.read(["users"], 2)
    assert sorted((g.event["data"]["id"], g.key) for g in got) == [(1, b"acme"), (2, b"globex")]


async def test_kafka_tombstones_follow_deletes_and_are_acknowledged_before_the_lsn_moves(
    fresh_db: str, pg: Any, tansu: TansuServer
) -> None:
    """publisher.tombstones with the default event: after each DELETE the row's next record (its partition) has
    the DELETE's key and a null value; once the slot is confirmed past the DELETEs every tombstone is on the
    topic. The events themselves are the default event (without the key: none, see test_event_formats)."""
    dsn = pg.dsn(fresh_db)
    await sql(dsn, "CREATE TABLE users (id int PRIMARY KEY, name text)")
    kafka = Kafka(unique("tomb"), tansu.bootstrap)
    cfg = config_dict(pg.port, fresh_db, kafka.publisher(tombstones=True))
    async with running(cfg):
        await sql(dsn, "INSERT INTO users VALUES (1, 'a'), (2, 'b'), (3, 'c')", "DELETE FROM users WHERE id = 2",
                  "UPDATE users SET name = 'z' WHERE id = 3", "DELETE FROM users WHERE id IN (1, 3)")
        end = await current_lsn(dsn)
        await wait_until(lambda: _ge(confirmed_lsn(dsn, cfg["listener"]["slotName"]), end), 30, "confirmation")
        got = await kafka.read(["users"], 10, timeout=10)
    assert len(got) == 10
    for row, actions in ((1, ["INSERT", "DELETE"]), (2, ["INSERT", "DELETE"]), (3, ["INSERT", "UPDATE", "DELETE"])):
        mine = [g for g in got if g.key == str(row).encode()]
        assert [g.event.get("action") for g in mine] == [*actions, None]
        assert mine[-1].tombstone and mine[-1].headers == {} and mine[-1].subject == mine[-2].subject
        assert mine[-2].event["dataOld"] == {"id": row}


# -- outages, crashes --------------------------------------------------------------------------------


async def test_broker_cut_mid_stream_then_back_nothing_skipped_lsn_held(
    cut_broker: tuple[Broker, TcpProxy], fresh_db: str, pg: Any, tmp_path: Path, procs: list[ListenerProcess]
) -> None:
    broker, proxy = cut_broker
    dsn = pg.dsn(fresh_db)
    await sql(dsn, "CREATE TABLE items (id int PRIMARY KEY, payload text)")
    await broker.prepare(["items"])
    cfg = config_dict(pg.port, fresh_db, broker.publisher(), ackTimeout="2s")
    slot = cfg["listener"]["slotName"]
    proc = ListenerProcess(cfg, tmp_path, env=broker.env).start()
    procs.append(proc)
    await wait_until(lambda: '"msg":"streaming"' in proc.output(), 60, "streaming")
    writer = Writer(dsn, transactions=150, rows_per_txn=10, pace=0.02).start()
    await wait_until(lambda: writer.committed >= 300, 60, "some commits")

    proxy.stop()  # the broker is gone for the listener
    await wait_until(lambda: "publish not acknowledged" in proc.output(), 30, "publish failures")
    await asyncio.sleep(2 * 2)  # what was acknowledged before the cut is confirmed by now
    held = await confirmed_lsn(dsn, slot)
    await asyncio.sleep(4)
    assert await confirmed_lsn(dsn, slot) == held, "confirmed past an event the broker never acknowledged"
    assert proc.proc is not None and proc.proc.poll() is None

    proxy.start()
    writer.join()
    assert writer.committed == 1500
    events = await broker.read(["items"], 1500, timeout=120)
    complete(events, 1500)
    end = await current_lsn(dsn)
    await wait_until(lambda: _ge(confirmed_lsn(dsn, slot), end), 60, "confirmation after the outage")
    assert await asyncio.to_thread(proc.terminate) == 0


async def test_kill_9_mid_stream_then_restart_loses_nothing_and_keeps_ids(
    broker: Broker, fresh_db: str, pg: Any, tmp_path: Path, procs: list[ListenerProcess]
) -> None:
    dsn = pg.dsn(fresh_db)
    await sql(dsn, "CREATE TABLE items (id int PRIMARY KEY, payload text)")
    await broker.prepare(["items"])
    cfg = config_dict(pg.port, fresh_db, broker.publisher())
    first = ListenerProcess(cfg, tmp_path, env=broker.env).start()
    procs.append(first)
    await wait_until(lambda: '"msg":"streaming"' in first.output(), 60, "streaming")
    writer = Writer(dsn, transactions=300, rows_per_txn=10, pace=0.02).start()
    await wait_until(lambda: writer.committed >= 600, 60, "some commits")
    await broker.read(["items"], 300, timeout=30, settle=False)  # events are flowing
    first.kill()  # kill -9 while transactions keep committing
    killed_at = writer.committed
    second = ListenerProcess(cfg, tmp_path, env=broker.env).start()
    procs.append(second)
    writer.join()
    assert writer.committed == 3000 and killed_at < 3000
    events = await broker.read(["items"], 3000, timeout=120)
    complete(events, 3000)
    end = await current_lsn(dsn)
    await wait_until(lambda: _ge(confirmed_lsn(dsn, cfg["listener"]["slotName"]), end), 60)
    assert await asyncio.to_thread(second.terminate) == 0


async def test_unreachable_broker_at_start_is_retried_until_it_comes(
    broker_name: str, fresh_db: str, pg: Any, tmp_path: Path, procs: list[ListenerProcess],
    request: pytest.FixtureRequest, make_proxy: Callable[..., TcpProxy],
    make_tansu: Callable[..., TansuServer], make_pubsub: Callable[..., PubSubEmulator],
) -> None:  # fmt: skip
    dsn = pg.dsn(fresh_db)
    await sql(dsn, "CREATE TABLE items (id int PRIMARY KEY, payload text)")
    port = free_port()
    topic = unique("late")
    made: Broker
    proxy: TcpProxy | None = None
    if broker_name == "kafka":
        made = Kafka(topic, f"127.0.0.1:{port}")
    elif broker_name == "rabbitmq":
        proxy = make_proxy("127.0.0.1", 5672, port=port)
        proxy.stop()
        made = RabbitMQ(topic, request.getfixturevalue("rabbitmq_url"), f"amqp://guest:guest@127.0.0.1:{port}/")
    else:
        made = PubSub(topic, f"127.0.0.1:{port}")
    cfg = config_dict(pg.port, fresh_db, made.publisher(), refreshConnection="2s")
    proc = ListenerProcess(cfg, tmp_path, env=made.env).start()
    procs.append(proc)
    try:
        await wait_until(lambda: proc.output().count("broker unreachable; retrying") >= 2, 60, "retries")
        assert proc.proc is not None and proc.proc.poll() is None  # retrying, not exiting
        if broker_name == "kafka":
            await asyncio.to_thread(make_tansu, port=port)
        elif proxy is not None:
            proxy.start()
        else:
            await asyncio.to_thread(make_pubsub, port=port)
        await made.prepare(["items"])
        await wait_until(lambda: '"msg":"streaming"' in proc.output(), 60, "streaming after the broker came")
        await sql(dsn, "INSERT INTO items SELECT g, 'x' FROM generate_series(1, 100) g")
        events = await made.read(["items"], 100)
        complete(events, 100)
        assert await asyncio.to_thread(proc.terminate) == 0
    finally:
        await made.close()


# -- bad publisher settings ----------------------------------------------------------------------------


def _run_with(tmp_path: Path, publisher: dict[str, Any], env: dict[str, str] | None = None) -> tuple[int, str]:
    cfg = config_dict(5432, "db", publisher)
    path = tmp_path / "config.yml"
    path.write_text(json.dumps(cfg))
    result = run_cli(["--config", str(path)], env=env, timeout=90)
    assert "Traceback" not in result.stderr
    return result.returncode, result.stderr


def _error_line(stderr: str) -> str:
    """The one line the CLI prints for a fatal error (log lines of the run before it are JSON)."""
    errors = [line for line in stderr.splitlines() if line.startswith("wal-listener: ")]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.mark.parametrize(
    ("publisher", "expected"),
    [
        ({"type": "rabbitmq", "address": "127.0.0.1:5672", "topic": "t", "exchangeKind": "x-delayed"},
         "config: publisher.exchangeKind = 'x-delayed' is not allowed; use one of"),
        ({"type": "google_pubsub", "address": "x", "topic": "t"},
         "config: publisher.pubSubProjectID is required but missing; set it in the file or as "
         "WAL_PUBLISHER_PUBSUBPROJECTID"),
        ({"type": "kafka", "address": "127.0.0.1:9092", "topic": "t", "compression": "brotli"},
         "config: publisher.compression = 'brotli' is not allowed"),
        ({"type": "kafka", "address": "127.0.0.1:9092", "topic": "t", "saslMechanism": "PLAIN"},
         "kafka: publisher.saslMechanism = 'PLAIN' needs publisher.username and publisher.password"),
    ],
)  # fmt: skip
def test_bad_publisher_config_is_one_line_and_exit_2(tmp_path: Path, publisher: dict[str, Any], expected: str) -> None:
    code, stderr = _run_with(tmp_path, publisher)
    assert code == 2, stderr
    assert expected in _error_line(stderr), stderr


async def test_exchange_of_another_kind_is_one_line_and_exit_2(tmp_path: Path, rabbitmq_url: str) -> None:
    exchange = unique("kind")
    connection = await aio_pika.connect(rabbitmq_url)
    try:
        channel = await connection.channel()
        ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.FANOUT, durable=True)
        publisher = {"type": "rabbitmq", "address": rabbitmq_url, "topic": exchange, "exchangeKind": "topic"}
        code, stderr = await asyncio.to_thread(_run_with, tmp_path, publisher)
        await ex.delete()
    finally:
        await connection.close()
    assert code == 2, stderr
    assert f"rabbitmq: exchange '{exchange}' already exists with other settings" in _error_line(stderr)


async def test_idempotent_producer_refused_is_one_line_and_exit_2(tmp_path: Path, tansu: TansuServer) -> None:
    publisher = {"type": "kafka", "address": tansu.bootstrap, "topic": "t"}  # idempotent is the default
    code, stderr = await asyncio.to_thread(_run_with, tmp_path, publisher)
    assert code == 2, stderr
    assert "set publisher.idempotent: false" in _error_line(stderr)


async def test_missing_pubsub_topic_is_one_line_and_exit_2(
    tmp_path: Path, fresh_db: str, pg: Any, pubsub_emulator: PubSubEmulator
) -> None:
    dsn = pg.dsn(fresh_db)
    await sql(dsn, "CREATE TABLE items (id int PRIMARY KEY)")
    pubsub = PubSub(unique("missing"), pubsub_emulator.host)
    cfg = config_dict(pg.port, fresh_db, pubsub.publisher())
    proc = ListenerProcess(cfg, tmp_path, env=pubsub.env).start()
    try:
        await wait_until(lambda: '"msg":"streaming"' in proc.output(), 60, "streaming")
        await sql(dsn, "INSERT INTO items VALUES (1)")
        assert proc.proc is not None
        code = await asyncio.to_thread(proc.proc.wait, 30)
    finally:
        proc.stop()
    assert code == 2
    assert f"topic projects/{pubsub.project}/topics/{pubsub.topic}.public_items does not exist" in proc.output()
