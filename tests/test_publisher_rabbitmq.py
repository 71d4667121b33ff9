"""The RabbitMQ publisher against the machine's RabbitMQ, read back with aio-pika's consumer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from pamqp.commands import Basic

from listener.config import PublisherConfig, parse_publisher
from listener.delivery import Acks
from listener.errors import (
    AckTimeout,
    BrokerConfigError,
    BrokerUnavailable,
    MessageRejected,
    MessageTooLarge,
    PublishError,
)
from listener.message import Message
from listener.publishers import make_publisher
from listener.publishers.rabbitmq import RabbitMQPublisher, broker_url
from tests.support.harness import metric, publish_until_acked, wait_until
from tests.support.proxy import TcpProxy
from tests.support.services import free_port
from tests.support.tls import Certificates, TlsForwarder

pytestmark = pytest.mark.service


def config(address: str, exchange: str, **overrides: Any) -> PublisherConfig:
    values: dict[str, Any] = {"type": "rabbitmq", "address": address, "topic": exchange}
    values.update(overrides)
    return parse_publisher(values)


def unique_exchange() -> str:
    return f"wal_test_{uuid.uuid4().hex[:10]}"


def message(exchange: str, n: int, *, table: str = "users", action: str = "INSERT") -> Message:
    return Message(
        id=f"00000000-0000-0000-0000-{n:012d}",
        subject=f"{exchange}.public_{table}",
        body=b'{"n": %d}' % n,
        schema="public",
        table=table,
        action=action,
    )


def number(m: AbstractIncomingMessage) -> int:
    return int(m.body[6:-1])


@contextlib.asynccontextmanager
async def bound_queue(
    url: str, exchange: str, kind: str = "topic", routing_key: str = "#", arguments: dict[str, Any] | None = None
) -> AsyncIterator[AbstractQueue]:
    """A fresh queue bound to ``exchange`` (declared here first, durable, so it exists before binding)."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType(kind), durable=True)
        queue = await channel.declare_queue(f"q_{exchange}_{uuid.uuid4().hex[:6]}", exclusive=True)
        await queue.bind(ex, routing_key, arguments=arguments)
        yield queue
        await ex.delete()
    finally:
        await connection.close()


async def drain(queue: AbstractQueue, count: int, timeout: float = 15.0) -> list[AbstractIncomingMessage]:
    """Read until ``count`` messages are there, then whatever else arrives shortly after (duplicates)."""
    got: list[AbstractIncomingMessage] = []
    deadline = time.monotonic() + timeout
    quiet_until = 0.0
    while time.monotonic() < deadline:
        m = await queue.get(no_ack=True, fail=False, timeout=5)
        if m is None:
            if len(got) >= count and time.monotonic() > quiet_until:
                break
            await asyncio.sleep(0.05)
            continue
        got.append(m)
        quiet_until = time.monotonic() + 0.5
    return got




async def test_batch_arrives_with_routing_key_properties_and_headers_in_order(rabbitmq_url: str) -> None:
    exchange = unique_exchange()
    async with bound_queue(rabbitmq_url, exchange, routing_key=f"{exchange}.*") as queue:
        publisher = make_publisher(config(rabbitmq_url, exchange), 5.0)
        assert isinstance(publisher, RabbitMQPublisher) and publisher.needs_key is False
        await publisher.connect()
        try:
            assert publisher.ready
            actions = ["INSERT", "UPDATE", "DELETE", "TRUNCATE"]
            batch = [message(exchange, n, action=actions[n % 4]) for n in range(500)]
            results = await (await publisher.send(batch))
            assert results == [None] * 500
        finally:
            await publisher.close()
        assert not publisher.ready
        got = await drain(queue, 500)
    assert [number(m) for m in got] == list(range(500))
    for m, sent in zip(got, batch, strict=True):
        assert m.routing_key == f"{exchange}.public_users"
        assert m.exchange == exchange
        assert m.body == sent.body
        assert m.message_id == sent.id
        assert m.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert m.content_type == "application/json"
        assert m.app_id == "wal-listener"
        assert m.headers == {"id": sent.id, "schema": "public", "table": "users", "action": sent.action}


async def test_batches_sent_back_to_back_keep_their_order(rabbitmq_url: str) -> None:
    exchange = unique_exchange()
    async with bound_queue(rabbitmq_url, exchange) as queue:
        publisher = RabbitMQPublisher(config(rabbitmq_url, exchange))
        await publisher.connect()
        try:
            pending = [await publisher.send([message(exchange, b * 200 + n) for n in range(200)]) for b in range(10)]
            for acks in pending:
                assert await acks == [None] * 200
        finally:
            await publisher.close()
        got = await drain(queue, 2000)
    assert [number(m) for m in got] == list(range(2000))


@pytest.mark.parametrize("kind", ["fanout", "direct", "headers"])
async def test_exchange_kinds(rabbitmq_url: str, kind: str) -> None:
    exchange = unique_exchange()
    publisher = RabbitMQPublisher(config(rabbitmq_url, exchange, exchange_kind=kind))
    await publisher.connect()  # declares the exchange with that kind
    bindings: dict[str, dict[str, Any]] = {
        "fanout": {"routing_key": ""},
        "direct": {"routing_key": f"{exchange}.public_orders"},
        "headers": {"routing_key": "", "arguments": {"x-match": "all", "table": "orders"}},
    }
    binding = bindings[kind]
    try:
        async with bound_queue(rabbitmq_url, exchange, kind, **binding) as queue:
            batch = [message(exchange, n, table="orders" if n % 2 else "users") for n in range(20)]
            assert await (await publisher.send(batch)) == [None] * 20
            got = await drain(queue, 20 if kind == "fanout" else 10, timeout=5)
    finally:
        await publisher.close()
    expected = range(20) if kind == "fanout" else range(1, 20, 2)
    assert [number(m) for m in got] == list(expected)


async def test_existing_exchange_of_another_kind_is_a_config_error(rabbitmq_url: str) -> None:
    exchange = unique_exchange()
    async with bound_queue(rabbitmq_url, exchange, "fanout", routing_key=""):
        publisher = RabbitMQPublisher(config(rabbitmq_url, exchange, exchange_kind="topic"))
        with pytest.raises(BrokerConfigError) as info:
            await publisher.connect()
    text = str(info.value)
    assert f"exchange {exchange!r} already exists" in text and "exchangeKind='topic'" in text and "\n" not in text
    assert not publisher.ready


async def test_wrong_credentials_are_a_config_error(rabbitmq_url: str) -> None:
    address = rabbitmq_url.split("@", 1)[1]  # host:port/
    publisher = RabbitMQPublisher(
        config(f"amqp://{address}", unique_exchange(), username="guest", password="not-the-password")
    )
    with pytest.raises(BrokerConfigError, match=r"refused user 'guest'; check publisher.username/password"):
        await publisher.connect()


async def test_unreachable_broker_at_connect_is_a_publish_error() -> None:
    publisher = RabbitMQPublisher(config(f"127.0.0.1:{free_port()}", unique_exchange()), connect_timeout=3)
    started = time.monotonic()
    with pytest.raises(PublishError, match=r"rabbitmq: cannot reach amqp://127\.0\.0\.1:"):
        await publisher.connect()
    assert time.monotonic() - started < 10


async def test_unroutable_event_is_confirmed_and_logged(rabbitmq_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "listener.publishers.rabbitmq")
    exchange = unique_exchange()
    publisher = RabbitMQPublisher(config(rabbitmq_url, exchange))
    await publisher.connect()
    try:
        assert await (await publisher.send([message(exchange, 1), message(exchange, 2)])) == [None, None]
    finally:
        await publisher.close()
        async with bound_queue(rabbitmq_url, exchange):
            pass  # deletes the exchange
    warnings = [r.getMessage() for r in caplog.records if "no queue is bound" in r.getMessage()]
    assert warnings == [
        f"rabbitmq: no queue is bound to exchange {exchange} for routing key {exchange}.public_users; "
        "RabbitMQ discarded the event"
    ]


async def test_connection_cut_mid_stream_then_back_nothing_skipped(
    rabbitmq_url: str, make_proxy: Callable[..., TcpProxy]
) -> None:
    proxy = make_proxy("127.0.0.1", 5672)
    exchange = unique_exchange()
    async with bound_queue(rabbitmq_url, exchange) as queue:  # the consumer is connected directly
        publisher = RabbitMQPublisher(config(f"amqp://guest:guest@{proxy.address}/", exchange), 3.0, ready_timeout=1.0)
        await publisher.connect()
        try:
            assert await (await publisher.send([message(exchange, n) for n in range(100)])) == [None] * 100

            in_flight = await publisher.send([message(exchange, n) for n in range(100, 300)])
            proxy.stop()  # closes every connection through it and refuses new ones
            results = await in_flight
            failed = [m for m, r in zip(range(100, 300), results, strict=True) if r is not None]
            assert all(isinstance(r, PublishError) for r in results if r is not None)
            await wait_until(lambda: not publisher.ready, 10, "ready to turn false")
            outage = [message(exchange, n) for n in range(300, 400)]
            started = time.monotonic()
            refused = await (await publisher.send(outage))
            assert all(isinstance(r, PublishError) for r in refused)
            assert time.monotonic() - started < 5  # a wait of about readyTimeout, no hang

            proxy.start()
            await wait_until(lambda: publisher.ready, 30, "the robust connection to come back")
            await publish_until_acked(publisher, [message(exchange, n) for n in failed] + outage)
        finally:
            await publisher.close()
        got = await drain(queue, 400)
    numbers = [number(m) for m in got]
    assert set(numbers) == set(range(400)), "an event is missing"
    assert numbers[:100] == list(range(100))


async def test_stalled_connection_fails_the_batch_then_recovers(
    rabbitmq_url: str, make_proxy: Callable[..., TcpProxy]
) -> None:
    proxy = make_proxy("127.0.0.1", 5672)
    exchange = unique_exchange()
    async with bound_queue(rabbitmq_url, exchange) as queue:
        publisher = RabbitMQPublisher(config(f"amqp://guest:guest@{proxy.address}/", exchange), 2.0)
        await publisher.connect()
        try:
            proxy.pause()  # bytes stop flowing, the connection stays open: no confirms come
            started = time.monotonic()
            results = await (await publisher.send([message(exchange, n) for n in range(50)]))
            timed_out = [isinstance(r, AckTimeout) and "no acknowledgement within 2s" in str(r) for r in results]
            assert all(timed_out), results[:2]
            assert 1.5 < time.monotonic() - started < 6
            proxy.resume()
            await publish_until_acked(publisher, [message(exchange, n) for n in range(50)])
        finally:
            await publisher.close()
        got = await drain(queue, 50)
    assert set(number(m) for m in got) == set(range(50))  # duplicates allowed, nothing missing


async def test_oversized_event_is_refused_permanently_and_counted(rabbitmq_url: str) -> None:
    exchange = unique_exchange()
    publisher = RabbitMQPublisher(config(rabbitmq_url, exchange))
    await publisher.connect()
    try:
        publisher._max_message = 1000  # as if the broker's max_message_size were 1000 bytes
        big = message(exchange, 2, table="blobs")
        big.body = b'"' + b"x" * 2000 + b'"'
        before = metric("oversized_events_total", {"table": "blobs"})
        results = await (await publisher.send([message(exchange, 1), big, message(exchange, 3)]))
        assert results[0] is None and results[2] is None
        assert isinstance(results[1], MessageTooLarge) and "max_message_size of 1000 bytes" in str(results[1])
        assert metric("oversized_events_total", {"table": "blobs"}) == before + 1
    finally:
        await publisher.close()
        async with bound_queue(rabbitmq_url, exchange):
            pass


def test_broker_limit_is_learnt_from_the_channel_close() -> None:
    """RabbitMQ closes the channel over a too-large message; its reply text carries the limit."""
    publisher = RabbitMQPublisher(config("127.0.0.1:5672", "x"))
    big = message("x", 1)
    big.body = b"x" * 5000
    closed = aiormq.exceptions.ChannelPreconditionFailed(
        "PRECONDITION_FAILED - message size 5000 is larger than configured max size 4096"
    )
    assert isinstance(publisher._failure(big, closed), MessageTooLarge)
    assert isinstance(publisher._failure(message("x", 2), closed), BrokerUnavailable)  # the channel closed under it
    assert publisher._max_message == 4096


def test_frames_are_the_bytes_aiormq_would_write() -> None:
    """The bulk path encodes basic.publish + content header + body itself: byte for byte what pamqp
    (aiormq's basic_publish) writes for the same message, properties and headers."""
    from pamqp import frame
    from pamqp.body import ContentBody
    from pamqp.header import ContentHeader

    from listener.publishers.rabbitmq import _Wire

    max_content = 100
    wire = _Wire("ex", 3, max_content)
    extra = message("ex", 2)
    extra.headers = {"error": "boom ü", "zeta": "z", "id": "overridden"}
    empty = message("ex", 3, table="tü")
    empty.body = b""
    split = message("ex", 4)
    split.body = b"y" * 250
    exact = message("ex", 5)
    exact.body = b"y" * max_content
    for m in [message("ex", 1), extra, empty, split, exact, message("ex", 6, action="TRUNCATE")]:
        properties = Basic.Properties(
            content_type="application/json", delivery_mode=2, message_id=m.id, app_id="wal-listener",
            headers=dict(m.attributes()),
        )
        expected = frame.marshal(Basic.Publish(exchange="ex", routing_key=m.subject, mandatory=True), 3)
        expected += frame.marshal(ContentHeader(0, len(m.body), properties), 3)
        for start in range(0, len(m.body), max_content):
            expected += frame.marshal(ContentBody(m.body[start:start + max_content]), 3)
        out: list[bytes] = []
        wire.encode(m, out)
        assert b"".join(out) == expected, m


async def test_confirms_settle_by_delivery_tag() -> None:
    """basic.ack with multiple settles everything up to its tag; single acks and nacks may come in any
    order; a closed channel fails what is still waiting; a batch failed by its ack timeout ignores the
    confirms that come later."""
    from listener.publishers.rabbitmq import _Confirms, _Sent

    publisher = RabbitMQPublisher(config("127.0.0.1:5672", "x"))
    confirms = _Confirms(publisher, cast(aiormq.Channel, object()))
    first = [message("x", n) for n in range(4)]
    second = [message("x", n) for n in range(4, 7)]
    acks1, acks2 = Acks(4, "rabbitmq"), Acks(3, "rabbitmq")
    # message 1 of the first batch was refused before sending: tags 1..3 are messages 0, 2, 3
    acks1.settle(1, MessageTooLarge("too big"))
    confirms.add(_Sent(acks1, first, [0, 2, 3], 1))
    confirms.add(_Sent(acks2, second, [0, 1, 2], 4))
    confirms.confirm(5, multiple=False, ack=False)  # a nack, out of order
    confirms.confirm(2, multiple=True, ack=True)
    assert not acks1.done and acks1.results[0] is None and acks1.results[2] is None and acks1.waiting(3)
    confirms.confirm(4, multiple=True, ack=True)
    assert acks1.done and acks1.results[3] is None and len(confirms.sent) == 1
    assert isinstance(acks1.results[1], MessageTooLarge)
    assert acks2.results[0] is None
    assert isinstance(acks2.results[1], MessageRejected) and "nack" in str(acks2.results[1])
    confirms.fail(aiormq.exceptions.ChannelPreconditionFailed(
        "PRECONDITION_FAILED - message size 5000 is larger than configured max size 4096"))
    assert acks2.done and isinstance(acks2.results[2], BrokerUnavailable)
    assert publisher._max_message == 4096
    late = Acks(1, "rabbitmq")
    confirms.add(_Sent(late, [message("x", 9)], [0], 7))  # on a closed channel: failed at once
    assert late.done and isinstance(late.results[0], PublishError)

    confirms = _Confirms(publisher, cast(aiormq.Channel, object()))
    slow, next_one = Acks(2, "rabbitmq"), Acks(1, "rabbitmq")
    confirms.add(_Sent(slow, first[:2], [0, 1], 1))
    confirms.add(_Sent(next_one, first[2:3], [0], 3))
    slow.fail_rest(AckTimeout("rabbitmq: no acknowledgement within 1s"))  # what the deadline does
    confirms.confirm(3, multiple=True, ack=True)
    assert all(isinstance(r, AckTimeout) for r in slow.results) and next_one.results == [None]
    assert not confirms.sent


async def test_many_batches_in_flight_confirmed_in_order(rabbitmq_url: str) -> None:
    exchange = unique_exchange()
    async with bound_queue(rabbitmq_url, exchange) as queue:
        publisher = RabbitMQPublisher(config(rabbitmq_url, exchange), 30.0)
        await publisher.connect()
        try:
            pending = [await publisher.send([message(exchange, b * 1000 + n) for n in range(1000)]) for b in range(8)]
            for acks in pending:
                assert await acks == [None] * 1000
        finally:
            await publisher.close()
        got = await drain(queue, 8000, timeout=60)
    assert [number(m) for m in got] == list(range(8000))


async def test_without_channel_internals_it_publishes_one_by_one(
    rabbitmq_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fallback for an aiormq without the internals of the bulk path: basic_publish per message."""
    monkeypatch.setattr("listener.publishers.rabbitmq._CHANNEL_ATTRIBUTES", ("_no_such_attribute",))
    exchange = unique_exchange()
    async with bound_queue(rabbitmq_url, exchange) as queue:
        publisher = RabbitMQPublisher(config(rabbitmq_url, exchange))
        await publisher.connect()
        try:
            assert await (await publisher.send([message(exchange, n) for n in range(20)])) == [None] * 20
            assert publisher._confirms is None
        finally:
            await publisher.close()
        got = await drain(queue, 20)
    assert [number(m) for m in got] == list(range(20))
    assert all(m.headers == {"id": m.message_id, "schema": "public", "table": "users", "action": "INSERT"} for m in got)


@pytest.mark.parametrize(
    ("address", "overrides", "expected"),
    [
        ("localhost:5672", {}, "amqp://localhost:5672/?heartbeat=15&reconnect_interval=2&name=wal-listener"),
        ("localhost", {"username": "u", "password": "p"}, "amqp://u:p@localhost/?heartbeat=15"),
        ("amqp://a:b@h:1/vh?heartbeat=30", {}, "amqp://a:b@h:1/vh?heartbeat=30&reconnect_interval=2"),
        ("h", {"enable_tls": True}, "amqps://h:5671/?heartbeat=15"),
    ],
)
def test_address_forms(address: str, overrides: dict[str, Any], expected: str) -> None:
    cfg = config(address, "x", **overrides)
    assert str(broker_url(cfg, cfg.enable_tls)).startswith(expected)


def test_bad_address_is_a_config_error() -> None:
    with pytest.raises(BrokerConfigError, match="is not host:port or an amqp"):
        broker_url(config("http://h:1", "x"), False)


async def test_routing_key_too_long_is_a_config_error(rabbitmq_url: str) -> None:
    exchange = unique_exchange()
    publisher = RabbitMQPublisher(config(rabbitmq_url, exchange))
    await publisher.connect()
    try:
        long = message(exchange, 1)
        long.subject = exchange + "." + "t" * 300
        with pytest.raises(BrokerConfigError, match="longer than 255 bytes"):
            await publisher.send([long])
    finally:
        await publisher.close()
        async with bound_queue(rabbitmq_url, exchange):
            pass


# -- TLS ----------------------------------------------------------------------------------------------


async def test_mutual_tls_with_ca_and_client_certificate(rabbitmq_url: str, tmp_path: Path) -> None:
    certs = Certificates(tmp_path)
    exchange = unique_exchange()
    async with TlsForwarder(5672, certs.server_context()) as tls, bound_queue(rabbitmq_url, exchange) as queue:
        publisher = RabbitMQPublisher(
            config(
                f"127.0.0.1:{tls.port}", exchange, username="guest", password="guest", enable_tls=True,
                ca_cert=str(certs.ca), client_cert=str(certs.client_cert), client_key=str(certs.client_key),
            )
        )  # fmt: skip
        await publisher.connect()
        try:
            assert await (await publisher.send([message(exchange, n) for n in range(10)])) == [None] * 10
        finally:
            await publisher.close()
        assert tls.handshakes >= 1
        got = await drain(queue, 10)
        assert [number(m) for m in got] == list(range(10))

        # without the client certificate the broker side refuses the handshake
        anonymous = RabbitMQPublisher(
            config(f"127.0.0.1:{tls.port}", exchange, enable_tls=True, ca_cert=str(certs.ca)), connect_timeout=5
        )
        with pytest.raises(PublishError):
            await anonymous.connect()


async def test_tls_file_that_cannot_be_read_is_a_config_error(tmp_path: Path) -> None:
    publisher = RabbitMQPublisher(config("127.0.0.1:5671", "x", enable_tls=True, ca_cert=str(tmp_path / "no.pem")))
    with pytest.raises(BrokerConfigError, match=r"rabbitmq: publisher\.caCert = '.*no\.pem' cannot be loaded"):
        await publisher.connect()
