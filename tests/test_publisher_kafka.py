"""The Kafka publisher against a real Kafka-protocol broker (Tansu), read back with aiokafka's consumer."""

from __future__ import annotations

import asyncio
import ssl
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaTimeoutError
from aiokafka.partitioner import DefaultPartitioner

from listener.config import PublisherConfig, parse_publisher
from listener.delivery import AckResults
from listener.errors import BrokerConfigError, BrokerUnavailable, MessageTooLarge, PublishError
from listener.message import Message
from listener.publishers import make_publisher
from listener.publishers.kafka import KafkaPublisher, security_options
from tests.support.harness import metric, publish_until_acked, wait_until
from tests.support.services import ProxiedTansu, TansuServer, free_port
from tests.support.tls import Certificates, TlsForwarder

pytestmark = pytest.mark.service


def config(address: str, **overrides: Any) -> PublisherConfig:
    # Tansu does not support idempotent producers.
    values: dict[str, Any] = {"type": "kafka", "address": address, "topic": "wal_listener", "idempotent": False}
    values.update(overrides)
    return parse_publisher(values)


def unique_topic() -> str:
    return f"wal_listener.t{uuid.uuid4().hex[:10]}"


def message(subject: str, n: int, *, key: int | None = None, action: str = "INSERT", table: str = "users") -> Message:
    return Message(
        id=f"00000000-0000-0000-0000-{n:012d}",
        subject=subject,
        body=b'{"n": %d}' % n,
        schema="public",
        table=table,
        action=action,
        key=None if key is None else b'{"id":%d}' % key,
    )


async def consume(
    bootstrap: str, topic: str, count: int, timeout: float = 20.0, **options: Any
) -> list[ConsumerRecord[Any, Any]]:
    """Every record of ``topic`` from the start, waiting until ``count`` are there (and a moment more)."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None, **options
    )
    await consumer.start()
    records: list[ConsumerRecord[Any, Any]] = []
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for part in batches.values():
                records.extend(part)
            if len(records) >= count and not batches:
                break
    finally:
        await consumer.stop()
    return records




async def test_batch_arrives_with_key_headers_and_per_key_order(tansu: TansuServer) -> None:
    topic = unique_topic()
    publisher = KafkaPublisher(config(tansu.bootstrap, create_topics=True, partitions=3))
    assert publisher.needs_key is True
    await publisher.connect()
    try:
        assert publisher.ready
        actions = ["INSERT", "UPDATE", "DELETE"]
        batch = [message(topic, n, key=n % 5, action=actions[n % 3]) for n in range(300)]
        batch.append(message(topic, 300, action="TRUNCATE"))  # no row, no key
        acks = await publisher.send(batch)
        results: AckResults = await acks
        assert results == [None] * len(batch)
    finally:
        await publisher.close()
    assert not publisher.ready

    records = await consume(tansu.bootstrap, topic, len(batch))
    assert len(records) == len(batch)
    assert {r.partition for r in records} <= {0, 1, 2}
    by_id = {r.headers[0][1].decode(): r for r in records}
    for m in batch:
        r = by_id[m.id]
        assert r.topic == topic
        assert r.value == m.body
        assert r.key == m.key
        assert dict((k, v.decode()) for k, v in r.headers) == {
            "id": m.id,
            "schema": "public",
            "table": "users",
            "action": m.action,
        }
    # one key -> one partition, in the order of the batch
    for key in range(5):
        mine = [r for r in records if r.key == b'{"id":%d}' % key]
        assert len({r.partition for r in mine}) == 1
        ordered = sorted(mine, key=lambda r: r.offset)
        assert [int(r.value[6:-1]) for r in ordered] == [n for n in range(300) if n % 5 == key]


async def test_created_topic_has_the_configured_partitions(tansu: TansuServer) -> None:
    topic = unique_topic()
    publisher = KafkaPublisher(config(tansu.bootstrap, create_topics=True, partitions=4))
    await publisher.connect()
    try:
        assert await (await publisher.send([message(topic, 1, key=1)])) == [None]
    finally:
        await publisher.close()
    admin = AIOKafkaAdminClient(bootstrap_servers=tansu.bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    assert sorted(p["partition"] for p in described["partitions"]) == [0, 1, 2, 3]


async def test_several_topics_in_one_batch_and_compression(tansu: TansuServer) -> None:
    users, orders = unique_topic(), unique_topic()
    publisher = make_publisher(config(tansu.bootstrap, compression="gzip", linger_ms=20), 5.0)
    assert isinstance(publisher, KafkaPublisher)
    await publisher.connect()
    try:
        batch = [message(users if n % 2 else orders, n, key=n) for n in range(50)]
        assert await (await publisher.send(batch)) == [None] * 50
    finally:
        await publisher.close()
    got_users = await consume(tansu.bootstrap, users, 25)
    got_orders = await consume(tansu.bootstrap, orders, 25)
    assert sorted(r.value for r in got_users) == sorted(m.body for m in batch if m.subject == users)
    assert sorted(r.value for r in got_orders) == sorted(m.body for m in batch if m.subject == orders)


async def test_batches_sent_back_to_back_keep_their_order(tansu: TansuServer) -> None:
    topic = unique_topic()
    publisher = KafkaPublisher(config(tansu.bootstrap, create_topics=True, partitions=1))
    await publisher.connect()
    try:
        pending = [await publisher.send([message(topic, b * 100 + n, key=7) for n in range(100)]) for b in range(10)]
        for acks in pending:
            assert await acks == [None] * 100
    finally:
        await publisher.close()
    records = await consume(tansu.bootstrap, topic, 1000)
    assert [int(r.value[6:-1]) for r in sorted(records, key=lambda r: r.offset)] == list(range(1000))


async def test_records_go_to_the_partition_producer_send_chooses(tansu: TansuServer) -> None:
    """The bulk path picks partitions itself: the same as aiokafka's default partitioner (murmur2 of the
    key, as the Java client), so a row keeps its partition whichever producer wrote it."""
    topic = unique_topic()
    publisher = KafkaPublisher(config(tansu.bootstrap, create_topics=True, partitions=3))
    await publisher.connect()
    try:
        batch = [message(topic, n, key=n) for n in range(60)] + [message(topic, 60 + n) for n in range(6)]
        assert await (await publisher.send(batch)) == [None] * len(batch)
    finally:
        await publisher.close()
    records = await consume(tansu.bootstrap, topic, len(batch))
    assert len(records) == len(batch)
    for r in records:
        if r.key is not None:
            assert r.partition == DefaultPartitioner()(r.key, [0, 1, 2], [0, 1, 2]), r


async def test_batch_spanning_many_record_batches_keeps_its_order(tansu: TansuServer) -> None:
    topic = unique_topic()
    publisher = KafkaPublisher(config(tansu.bootstrap, create_topics=True, partitions=2, max_batch_bytes=1024))
    await publisher.connect()
    try:
        batch = [message(topic, n, key=n % 4) for n in range(400)]  # ~15 records fit one record batch
        pending = [await publisher.send(batch[:200]), await publisher.send(batch[200:])]
        for acks in pending:
            assert await acks == [None] * 200
    finally:
        await publisher.close()
    records = await consume(tansu.bootstrap, topic, 400)
    assert len(records) == 400
    for key in range(4):
        mine = sorted((r for r in records if r.key == b'{"id":%d}' % key), key=lambda r: r.offset)
        assert [int(r.value[6:-1]) for r in mine] == [n for n in range(400) if n % 4 == key]


async def test_record_batch_not_taken_fails_it_and_the_rest_of_the_batch(
    tansu: TansuServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = unique_topic()
    publisher = KafkaPublisher(config(tansu.bootstrap, create_topics=True, max_batch_bytes=1024))
    await publisher.connect()
    try:
        producer = publisher._producer
        real = producer.send_batch
        calls = 0

        async def send_batch(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 3:
                raise KafkaTimeoutError()  # the accumulator did not take it in time
            return await real(*args, **kwargs)

        monkeypatch.setattr(producer, "send_batch", send_batch)
        batch = [message(topic, n, key=1) for n in range(100)]
        results = await (await publisher.send(batch))
        monkeypatch.undo()
        taken = results.index(next(r for r in results if r is not None))
        assert 0 < taken < 100 and results[:taken] == [None] * taken
        failed = results[taken:]
        assert all(isinstance(r, BrokerUnavailable) and "could not queue" in str(r) for r in failed), results[-1]
    finally:
        await publisher.close()
    records = await consume(tansu.bootstrap, topic, taken, timeout=5)
    assert sorted(int(r.value[6:-1]) for r in records) == list(range(taken))


class OnlySend:
    """An aiokafka producer without the batch interface (create_batch/send_batch)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        if name in ("create_batch", "send_batch"):
            raise AttributeError(name)
        return getattr(self._inner, name)


async def test_without_the_batch_interface_it_sends_one_by_one(tansu: TansuServer) -> None:
    """The fallback for an aiokafka without create_batch/send_batch: producer.send per event."""
    topic = unique_topic()
    publisher = KafkaPublisher(config(tansu.bootstrap, create_topics=True, partitions=2))
    await publisher.connect()
    real = publisher._producer
    publisher._producer = OnlySend(real)
    try:
        batch = [message(topic, n, key=n % 3) for n in range(30)]
        assert await (await publisher.send(batch)) == [None] * 30
    finally:
        publisher._producer = real
        await publisher.close()
    records = await consume(tansu.bootstrap, topic, 30)
    assert sorted(int(r.value[6:-1]) for r in records) == list(range(30))


def tombstoned(subject: str, n: int, key: int, padding: int = 0) -> Message:
    """A DELETE marked to be followed by a tombstone (publisher.tombstones), its body ``padding`` bytes longer."""
    deleted = message(subject, n, key=key, action="DELETE")
    deleted.body = b'{"n": %d, "pad": "%s"}' % (n, b"x" * padding) if padding else deleted.body
    deleted.tombstone = True
    return deleted


@pytest.mark.parametrize(("path", "padding"), [("bulk", 0), ("bulk", 900), ("one-by-one", 0)],
                         ids=["one-record-batch", "tombstone-in-the-next-record-batch", "producer-send"])
async def test_a_delete_is_followed_by_a_tombstone_on_its_partition(
    tansu: TansuServer, path: str, padding: int
) -> None:
    """After a DELETE marked for it, the next record of its partition has its key, a null value and no headers.
    With a 900-byte DELETE and 1 KB record batches the tombstone opens the partition's next record batch."""
    topic = unique_topic()
    publisher = KafkaPublisher(config(tansu.bootstrap, create_topics=True, partitions=2, max_batch_bytes=1024))
    await publisher.connect()
    real = publisher._producer
    if path == "one-by-one":
        publisher._producer = OnlySend(real)
    try:
        batch = [message(topic, n, key=n % 4) for n in range(20)]
        deletes = [tombstoned(topic, 20 + k, key=k, padding=padding) for k in range(4)]
        batch += [*deletes, message(topic, 24, key=0), message(topic, 25, action="TRUNCATE")]
        assert await (await publisher.send(batch)) == [None] * len(batch)
    finally:
        publisher._producer = real
        await publisher.close()
    records = await consume(tansu.bootstrap, topic, len(batch) + len(deletes))
    assert len(records) == len(batch) + len(deletes)
    for deleted in deletes:
        mine = sorted((r for r in records if r.key == deleted.key), key=lambda r: r.offset)
        assert len({r.partition for r in mine}) == 1
        values = [r.value for r in mine]
        tombstone = mine[values.index(deleted.body) + 1]
        assert (tombstone.value, tombstone.headers) == (None, ())
        assert [r.value is None for r in mine].count(True) == 1
    assert all(r.value is not None for r in records if r.key is None)  # TRUNCATE: no key, no tombstone


async def test_a_delete_is_acknowledged_only_once_its_tombstone_is(
    tansu: TansuServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DELETE's record batch is acknowledged, then the one holding its tombstone fails: the DELETE fails
    (the delivery stage sends it again and the LSN does not move past it)."""
    topic = unique_topic()
    publisher = KafkaPublisher(config(tansu.bootstrap, create_topics=True, max_batch_bytes=1024))
    await publisher.connect()
    try:
        producer = publisher._producer
        real = producer.send_batch
        futures: list[asyncio.Future[Any]] = []

        async def send_batch(*args: Any, **kwargs: Any) -> Any:
            if len(futures) == 1:  # the tombstone's record batch: fails after the DELETE's was acknowledged
                failing: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                futures[0].add_done_callback(lambda _: failing.set_exception(KafkaTimeoutError()))
                futures.append(failing)
                return failing
            futures.append(await real(*args, **kwargs))
            return futures[-1]

        monkeypatch.setattr(producer, "send_batch", send_batch)
        results = await (await publisher.send([tombstoned(topic, 1, key=1, padding=900)]))
        monkeypatch.undo()
        assert futures[0].done() and futures[0].exception() is None  # the DELETE itself was written
        assert isinstance(results[0], BrokerUnavailable), results
    finally:
        await publisher.close()


async def test_oversized_event_is_a_permanent_error_and_counted(tansu: TansuServer) -> None:
    topic = unique_topic()
    publisher = KafkaPublisher(config(tansu.bootstrap))
    await publisher.connect()
    try:
        big = message(topic, 2, key=2, table="blobs")
        big.body = b'"' + b"x" * 2_000_000 + b'"'
        before = metric("oversized_events_total", {"table": "blobs"})
        results = await (await publisher.send([message(topic, 1, key=1), big, message(topic, 3, key=3)]))
        assert results[0] is None and results[2] is None
        assert isinstance(results[1], MessageTooLarge) and not results[1].retryable
        assert "bytes" in str(results[1]) and big.id in str(results[1])
        assert metric("oversized_events_total", {"table": "blobs"}) == before + 1
    finally:
        await publisher.close()


async def test_broker_stopped_mid_stream_then_back_nothing_skipped(make_tansu: Callable[..., TansuServer]) -> None:
    broker = make_tansu()
    topic = unique_topic()
    publisher = KafkaPublisher(config(broker.bootstrap, create_topics=True), 3.0, probe_interval=0.5)
    await publisher.connect()
    try:
        assert await (await publisher.send([message(topic, n, key=n % 3) for n in range(20)])) == [None] * 20

        broker.stop()
        outage = [message(topic, n, key=n % 3) for n in range(20, 60)]
        started = time.monotonic()
        results = await (await publisher.send(outage))
        assert all(isinstance(r, PublishError) and r.retryable for r in results), results[:3]
        assert time.monotonic() - started < 3.0 + 5.0  # failed within about ackTimeout, no hang
        await wait_until(lambda: not publisher.ready, 10, "ready to turn false")
        # while it is down, a new batch is refused at once, without queueing anything
        started = time.monotonic()
        refused = await (await publisher.send(outage[:5]))
        assert all(isinstance(r, BrokerUnavailable) for r in refused) and time.monotonic() - started < 1.0

        # Memory storage: the broker comes back empty. (Tansu then acknowledges records for a topic it
        # no longer has and drops them; the publisher re-checks its topics after an outage, and with
        # createTopics it creates them again before producing.)
        broker.start()
        await wait_until(lambda: publisher.ready, 30, "ready to turn true again")
        attempts = await publish_until_acked(publisher, outage)
        assert attempts >= 1
    finally:
        await publisher.close()
    records = await consume(broker.bootstrap, topic, len(outage))
    got = [int(r.value[6:-1]) for r in records]
    assert set(got) >= set(range(20, 60)), "an event of the outage is missing"
    for key in range(3):  # per key, the re-sent events are in order (duplicates may repeat a suffix)
        seq = [n for n in got if n % 3 == key]
        assert sorted(set(seq)) == [n for n in range(20, 60) if n % 3 == key]


async def test_broker_killed_while_acks_are_pending(make_tansu: Callable[..., TansuServer]) -> None:
    broker = make_tansu()
    topic = unique_topic()
    publisher = KafkaPublisher(config(broker.bootstrap, linger_ms=200, create_topics=True), 3.0, probe_interval=0.5)
    await publisher.connect()
    try:
        assert await (await publisher.send([message(topic, 0, key=0)])) == [None]
        acks = await publisher.send([message(topic, n, key=n) for n in range(1, 200)])
        broker.kill()  # the records are still lingering in the client
        results = await acks
        failed = [r for r in results if r is not None]
        assert all(isinstance(r, PublishError) for r in failed)
        broker.start()
        await wait_until(lambda: publisher.ready, 30, "ready again")
        retry = [message(topic, n, key=n) for n, r in zip(range(1, 200), results, strict=True) if r is not None]
        await publish_until_acked(publisher, retry)
    finally:
        await publisher.close()
    records = await consume(broker.bootstrap, topic, len(retry))
    assert {int(r.value[6:-1]) for r in records} >= {int(m.body[6:-1]) for m in retry}


async def test_unreachable_broker_at_connect_is_a_publish_error() -> None:
    publisher = KafkaPublisher(config(f"127.0.0.1:{free_port()}"), 2.0)
    started = time.monotonic()
    with pytest.raises(PublishError, match=r"kafka: cannot reach 127\.0\.0\.1:"):
        await publisher.connect()
    assert time.monotonic() - started < 15
    assert not publisher.ready


async def test_idempotent_producer_refused_is_a_config_error(tansu: TansuServer) -> None:
    publisher = KafkaPublisher(config(tansu.bootstrap, idempotent=True))
    with pytest.raises(BrokerConfigError) as info:
        await publisher.connect()
    text = str(info.value)
    assert "idempotent" in text and "publisher.idempotent: false" in text and "\n" not in text


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"sasl_mechanism": "SCRAM-SHA-256"}, "publisher.saslMechanism = 'SCRAM-SHA-256' needs publisher.username"),
        ({"enable_tls": True, "ca_cert": "/nonexistent/ca.pem"}, "publisher.caCert = '/nonexistent/ca.pem' cannot"),
        ({"client_key": "/tmp/key.pem"}, "publisher.clientKey is set but publisher.clientCert is not"),
        ({"address": " , "}, "names no bootstrap server"),
    ],
)
async def test_bad_security_settings_are_one_line_config_errors(overrides: dict[str, Any], expected: str) -> None:
    values = {"address": "127.0.0.1:9"} | overrides
    publisher = KafkaPublisher(config(**values))
    with pytest.raises(BrokerConfigError) as info:
        await publisher.connect()
    assert expected in str(info.value) and "\n" not in str(info.value)


async def test_topic_name_kafka_cannot_hold_is_a_config_error(tansu: TansuServer) -> None:
    publisher = KafkaPublisher(config(tansu.bootstrap))
    await publisher.connect()
    try:
        with pytest.raises(BrokerConfigError, match=r"topic name 'wal_listener.public_my table' is not valid"):
            await publisher.send([message("wal_listener.public_my table", 1)])
    finally:
        await publisher.close()


async def test_publisher_sees_an_idle_broker_go_away(make_tansu: Callable[..., TansuServer]) -> None:
    broker = make_tansu()
    publisher = KafkaPublisher(config(broker.bootstrap), 2.0, probe_interval=0.3)
    await publisher.connect()
    try:
        assert publisher.ready
        broker.stop()
        await wait_until(lambda: not publisher.ready, 10, "ready to turn false while idle")
        broker.start()
        await wait_until(lambda: publisher.ready, 30, "ready to turn true")
        topic = unique_topic()
        assert await (await publisher.send([message(topic, 1, key=1)])) == [None]
    finally:
        await publisher.close()


async def test_mutual_tls_with_ca_and_client_certificate(tmp_path: Path) -> None:
    certs = Certificates(tmp_path)
    tls_port = free_port()
    broker = ProxiedTansu(tls_port)
    await asyncio.to_thread(broker.start)
    try:
        async with TlsForwarder(broker.port, certs.server_context(), port=tls_port) as tls:
            topic = unique_topic()
            publisher = KafkaPublisher(
                config(
                    f"127.0.0.1:{tls_port}", enable_tls=True, ca_cert=str(certs.ca),
                    client_cert=str(certs.client_cert), client_key=str(certs.client_key),
                )
            )  # fmt: skip
            await publisher.connect()
            try:
                assert await (await publisher.send([message(topic, n, key=n) for n in range(10)])) == [None] * 10
            finally:
                await publisher.close()
            assert tls.handshakes >= 1
            context = ssl.create_default_context(cafile=str(certs.ca))
            context.load_cert_chain(certs.client_cert, certs.client_key)
            records = await consume(f"127.0.0.1:{tls_port}", topic, 10, security_protocol="SSL", ssl_context=context)
            assert sorted(r.value for r in records) == sorted(b'{"n": %d}' % n for n in range(10))

            plain = KafkaPublisher(config(f"127.0.0.1:{tls_port}"), 2.0)  # no TLS: the endpoint refuses it
            with pytest.raises(PublishError):
                await plain.connect()
    finally:
        await asyncio.to_thread(broker.cleanup)


def test_security_options() -> None:
    def options(**overrides: Any) -> dict[str, Any]:
        return security_options(config("127.0.0.1:9092", **overrides))

    assert options() == {"security_protocol": "PLAINTEXT"}
    assert options(username="u", password="p") == {
        "security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN",
        "sasl_plain_username": "u", "sasl_plain_password": "p",
    }  # fmt: skip
    scram = options(sasl_mechanism="SCRAM-SHA-512", username="u", password="p", enable_tls=True)
    assert scram["security_protocol"] == "SASL_SSL" and scram["sasl_mechanism"] == "SCRAM-SHA-512"
    assert isinstance(scram["ssl_context"], ssl.SSLContext)
    assert scram["ssl_context"].verify_mode == ssl.CERT_REQUIRED
    tls = options(enable_tls=True)
    assert tls["security_protocol"] == "SSL" and tls["ssl_context"].check_hostname
