"""RabbitMQ publisher (aio-pika): durable exchange, persistent messages, publisher confirms.

How acknowledgements are collected: the channel is opened in confirm mode. ``publish`` encodes the AMQP
frames of the whole batch (``basic.publish`` + content header + body for each message, the same
bytes aiormq's ``basic_publish`` writes) and hands them to the connection's writer in one piece under
the channel lock, so frames leave in the order of the batch, and batch after batch. Publishes on a
channel in confirm mode are numbered 1, 2, 3, …; the batch remembers which delivery tags its messages
got, and the broker's ``basic.ack`` (usually ``multiple``: everything up to a tag) settles them on
the batch's tracker in bulk, without a future or a task per message. ``None`` means RabbitMQ
confirmed the message, which for a persistent message routed to durable queues means it is on disk.
A ``basic.nack`` (:class:`MessageRejected`), a lost connection or channel (:class:`BrokerUnavailable`),
or a confirm that does not come within ``listener.ackTimeout`` (the delivery stage's
:class:`AckTimeout`) fails the message; the delivery stage sends it again (same ``message_id``, so
consumers can drop the duplicate).

Reconnects: the connection is aio-pika's robust connection; after a lost connection it reconnects
every ``reconnect_interval`` seconds, re-opens the channel in confirm mode and re-declares the
exchange. While it is down ``ready`` is false and ``publish`` waits up to ``ready_timeout`` for it, then
fails the batch without sending anything, so that the delivery stage backs off and retries.

A message nobody has bound a queue for is published ``mandatory``; RabbitMQ returns it and then
confirms it. It counts as published (that is the exchange's routing, not a failure) and is logged
once per routing key so the missing binding is visible.

Where aiormq does not have the channel internals the bulk path uses, each message goes through
``basic_publish`` as before (one task and one confirmation future per message).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection, ExchangeType
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader
from yarl import URL

from listener.config import RabbitMQPublisherConfig
from listener.delivery import Acks
from listener.errors import AckTimeout, BrokerConfigError, BrokerUnavailable, MessageRejected, PublishError
from listener.formats import Binding
from listener.message import Message
from listener.metrics import RECONNECTS
from listener.publishers.base import Publisher, tls_context

log = logging.getLogger(__name__)

_MAX_ROUTING_KEY = 255  # bytes, AMQP 0-9-1 short string
_DEFAULT_MAX_MESSAGE = 128 * 1024 * 1024  # RabbitMQ's default max_message_size (3.8 and later)
_TOO_LARGE = re.compile(r"message size (\d+) is larger than configured max size (\d+)")
_PERSISTENT = 2

# AMQP 0-9-1 wire format (section 4.2 of the specification) for the frames of one basic.publish
_FRAME_START = struct.Struct(">BHI")  # frame type, channel, payload size
_CONTENT_HEADER = struct.Struct(">HHQH")  # class id (basic = 60), weight, body size, property flags
_LONG = struct.Struct(">I")
_METHOD, _HEADER, _BODY, _FRAME_END = 1, 2, 3, b"\xce"
_BASIC_PUBLISH = b"\x00\x3c\x00\x28\x00\x00"  # class 60, method 40, reserved short
# the properties we set, in the order of their flag bits: content-type, headers, delivery-mode,
# message-id, app-id
_PROPERTY_FLAGS = 0x8000 | 0x2000 | 0x1000 | 0x0080 | 0x0008
_CONTENT_TYPE = b"\x10application/json"
_APP_ID = b"\x0cwal-listener"
# the aiormq channel internals the bulk path uses (aiormq 6 and 7)
_CHANNEL_ATTRIBUTES = ("number", "max_content_size", "write_queue", "delivery_tag", "lock", "closing",
                       "_on_confirm_frame", "_on_return_frame", "_get_frame")
# connecting: the broker's refusals that are the publisher's settings (BrokerConfigError, exit 2); any
# other connection failure means "unreachable" and is retried
_REFUSALS: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...] = (
    ((aiormq.exceptions.ProbableAuthenticationError, aiormq.exceptions.AuthenticationError),
     "{where} refused user {user!r}; check publisher.username/password or the address"),
    (aiormq.exceptions.ConnectionNotAllowed, "{where} refused access to virtual host {vhost!r}"),
    (aiormq.exceptions.ChannelPreconditionFailed,
     "exchange {exchange!r} already exists with other settings than publisher.exchangeKind={kind!r}, durable; "
     "delete it or change the setting"),
    (aiormq.exceptions.ChannelAccessRefused, "user {user!r} may not declare exchange {exchange!r} on {where}"),
)


def _short(text: str) -> bytes:
    data = text.encode()
    if len(data) > 255:
        raise ValueError(f"{text[:40]!r}... is longer than 255 bytes (an AMQP short string)")
    return bytes((len(data),)) + data


def _table(values: dict[str, str]) -> bytes:
    """An AMQP field table of strings (type S), keys sorted as pamqp writes them."""
    out = []
    for key, value in sorted(values.items()):
        data = value.encode()
        out.append(_short(key) + b"S" + _LONG.pack(len(data)) + data)
    return b"".join(out)


class _Wire:
    """Encodes basic.publish frames for one channel, with the parts that repeat cached."""

    def __init__(self, exchange: str, channel: int, max_content: int) -> None:
        self.exchange = _short(exchange)
        self.channel = channel
        self.max_content = max_content
        self._publish: dict[str, bytes] = {}
        self._tables: dict[tuple[str, str, str], tuple[bytes, bytes]] = {}

    def publish_frame(self, routing_key: str) -> bytes:
        frame = self._publish.get(routing_key)
        if frame is None:
            # mandatory: an unroutable message is returned (and logged), not dropped silently
            payload = _BASIC_PUBLISH + self.exchange + _short(routing_key) + b"\x01"
            frame = _FRAME_START.pack(_METHOD, self.channel, len(payload)) + payload + _FRAME_END
            if len(self._publish) < 10000:
                self._publish[routing_key] = frame
        return frame

    def encode(self, message: Message, out: list[bytes]) -> None:
        """Append the frames of ``message`` to ``out``."""
        message_id = _short(message.id)
        if message.headers:
            table = _table({k: v for k, v in message.attributes().items() if k != "content-type"})
        else:
            # sorted keys: action, id, schema, table
            key = (message.schema, message.table, message.action)
            parts = self._tables.get(key)
            if parts is None:
                before = _table({"action": message.action})
                after = _table({"schema": message.schema, "table": message.table})
                parts = (before, after)
                if len(self._tables) < 10000:
                    self._tables[key] = parts
            table = b"".join((parts[0], b"\x02idS", _LONG.pack(len(message_id) - 1), message_id[1:], parts[1]))
        body = message.body
        size = len(body)
        header = b"".join((
            _CONTENT_HEADER.pack(60, 0, size, _PROPERTY_FLAGS),
            _short(message.content_type) if message.content_type else _CONTENT_TYPE,
            _LONG.pack(len(table)), table, b"\x02", message_id, _APP_ID,
        ))
        channel = self.channel
        out += (self.publish_frame(message.subject),
                _FRAME_START.pack(_HEADER, channel, len(header)), header, _FRAME_END)
        if not size:
            return
        if size < self.max_content:
            out += (_FRAME_START.pack(_BODY, channel, size), body, _FRAME_END)
            return
        for start in range(0, size, self.max_content):
            chunk = body[start:start + self.max_content]
            out += (_FRAME_START.pack(_BODY, channel, len(chunk)), chunk, _FRAME_END)


class _Sent:
    """One batch on the wire: the delivery tags its messages got, and its tracker."""

    __slots__ = ("acks", "batch", "first", "indices", "last", "next")

    def __init__(self, acks: Acks, batch: Sequence[Message], indices: list[int], first: int) -> None:
        self.acks = acks
        self.batch = batch
        self.indices = indices  # the batch index of delivery tag first + i
        self.first = first
        self.last = first + len(indices) - 1
        self.next = first  # every tag before this one is settled

    def ack(self, start: int, stop: int) -> None:
        """Tags ``start``..``stop`` were confirmed."""
        settle, indices, first = self.acks.settle, self.indices, self.first
        for tag in range(start, stop + 1):
            settle(indices[tag - first])

    def settle(self, tag: int, outcome: Callable[[Message], PublishError | None]) -> None:
        index = self.indices[tag - self.first]
        if self.acks.waiting(index):  # the outcome is made only when it counts (a failure may count a metric)
            self.acks.settle(index, outcome(self.batch[index]))

    def settle_all(self, outcome: Callable[[Message], PublishError | None]) -> None:
        for tag in range(self.first, self.last + 1):
            self.settle(tag, outcome)


class _Confirms:
    """The batches waiting for confirms on one channel, in delivery-tag order."""

    def __init__(self, publisher: RabbitMQPublisher, channel: aiormq.Channel) -> None:
        self.publisher = publisher
        self.channel = channel
        self.sent: deque[_Sent] = deque()
        self.closed: BaseException | None = None

    def add(self, sent: _Sent) -> None:
        if self.closed is not None:
            sent.settle_all(self._failure(self.closed))
        else:
            self.sent.append(sent)

    def withdraw(self, sent: _Sent) -> None:
        """``sent`` did not reach the connection after all (its tags are given back)."""
        if self.sent and self.sent[-1] is sent:
            self.sent.pop()

    async def on_confirm(self, frame: Basic.Ack | Basic.Nack) -> None:
        """The channel's reader calls this for every basic.ack / basic.nack (never raises)."""
        try:
            self.confirm(frame.delivery_tag, bool(frame.multiple), isinstance(frame, Basic.Ack))
        except Exception:  # an exception here would close the channel
            log.exception("rabbitmq: cannot process a publisher confirm %r", frame)

    def confirm(self, tag: int, multiple: bool, ack: bool) -> None:
        outcome = _acked if ack else _nacked
        sent = self.sent
        if multiple:
            while sent and sent[0].first <= tag:
                head = sent[0]
                upto = min(tag, head.last)
                if ack:
                    head.ack(head.next, upto)
                else:
                    for each in range(head.next, upto + 1):
                        head.settle(each, outcome)
                head.next = max(head.next, upto + 1)
                if upto < head.last:
                    break
                sent.popleft()
        else:
            for item in sent:
                if item.first <= tag <= item.last:
                    item.settle(tag, outcome)
                    break
            while sent and sent[0].acks.done:  # settled, or failed by its ack timeout
                sent.popleft()

    async def on_return(self, frame: Basic.Return) -> None:
        """A mandatory message no queue is bound for: read its content, log the routing key."""
        header = await self.channel._get_frame()
        if not isinstance(header, ContentHeader):
            raise ValueError(f"unexpected frame {header!r} instead of the returned message's content header")
        left = header.body_size
        while left > 0:
            body = await self.channel._get_frame()
            if not isinstance(body, ContentBody):
                raise ValueError(f"unexpected frame {body!r} instead of the returned message's body")
            if not body.value:
                break
            left -= len(body.value)
        self.publisher._unroutable(frame.routing_key or "")

    def on_closed(self, closing: asyncio.Future[Any]) -> None:
        if closing.cancelled():
            reason: BaseException = aiormq.exceptions.ChannelInvalidStateError("channel closed")
        else:
            reason = closing.exception() or aiormq.exceptions.ChannelInvalidStateError("channel closed")
        self.fail(reason)

    def fail(self, reason: BaseException) -> None:
        self.closed = reason
        outcome = self._failure(reason)
        while self.sent:
            self.sent.popleft().settle_all(outcome)

    def _failure(self, reason: BaseException) -> Callable[[Message], PublishError]:
        return lambda message: self.publisher._failure(message, reason)


def _acked(_: Message) -> None:
    return None


def _nacked(message: Message) -> PublishError:
    return MessageRejected(f"rabbitmq: broker refused (nack) event {message.id}", broker="rabbitmq")


def broker_url(cfg: RabbitMQPublisherConfig, tls: bool) -> URL:
    """The AMQP URL from ``publisher.address`` (``host:port`` or a full ``amqp://`` URL) and the credentials."""
    address = cfg.address.strip()
    try:
        url = URL(address if "://" in address else f"amqp://{address}")
    except ValueError as exc:
        raise BrokerConfigError(f"rabbitmq: publisher.address = {address!r} is not host:port or an amqp URL") from exc
    if url.scheme not in ("amqp", "amqps") or not url.host:
        raise BrokerConfigError(
            f"rabbitmq: publisher.address = {address!r} is not host:port or an amqp:// / amqps:// URL"
        )
    if tls and url.scheme == "amqp":
        url = url.with_scheme("amqps")
        if url.explicit_port is None:
            url = url.with_port(5671)
    if cfg.username:
        url = url.with_user(cfg.username).with_password(cfg.password.get_secret_value() or None)
    query = dict(url.query)
    query.setdefault("heartbeat", "15")
    query.setdefault("reconnect_interval", "2")
    query.setdefault("name", "wal-listener")
    return url.with_query(query)


def _safe(url: URL) -> str:
    return str(url.with_password(None).with_query(None)) if url.password else str(url.with_query(None))


class RabbitMQPublisher(Publisher[RabbitMQPublisherConfig]):
    """Publishes every event to exchange ``publisher.topic`` with the topic name as routing key."""

    broker = "rabbitmq"
    errors = (
        (aiormq.exceptions.DeliveryError, MessageRejected),  # a nack, or returned
        (TimeoutError, AckTimeout),  # the client's own wait for a confirm (one-by-one path)
        # a lost connection, or a closed channel (which fails every message on it; when the broker closed
        # it over a too-large message, that message is told apart by the reply text: see _failure)
        ((ConnectionError, OSError, aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError),
         BrokerUnavailable),
    )
    needs_key = False
    cloudevents = Binding("cloudEvents_", percent_encoded=False)  # the AMQP binding's application properties

    def __init__(
        self,
        cfg: RabbitMQPublisherConfig,
        ack_timeout: float = 10.0,
        *,
        ready_timeout: float = 5.0,
        connect_timeout: float = 10.0,
    ) -> None:
        super().__init__(cfg, ack_timeout)
        self._ready_timeout = ready_timeout
        self._connect_timeout = connect_timeout
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._max_message = _DEFAULT_MAX_MESSAGE
        self._unrouted: dict[str, float] = {}
        self._pending: set[asyncio.Future[Any]] = set()  # the batches (trackers) on the wire, until settled
        self._tasks: set[asyncio.Task[Any]] = set()  # basic_publish tasks of the one-by-one path
        self._confirms: _Confirms | None = None  # the channel the bulk path is wired to
        self._wire: _Wire | None = None

    # ------------------------------------------------------------------ lifecycle

    async def connect(self) -> None:
        if self._connection is not None:
            return
        cfg = self.cfg
        context = tls_context(cfg, "rabbitmq")
        url = broker_url(cfg, context is not None)
        where = _safe(url)
        connection: AbstractRobustConnection | None = None
        try:
            connection = await aio_pika.connect_robust(url, ssl_context=context, timeout=self._connect_timeout)
            channel = await connection.channel(publisher_confirms=True)
            assert isinstance(channel, AbstractRobustChannel)
            await channel.declare_exchange(
                cfg.topic, ExchangeType(cfg.exchange_kind), durable=True, timeout=self._connect_timeout
            )
        except (TimeoutError, *aio_pika.exceptions.CONNECTION_EXCEPTIONS) as exc:
            await self._close_quietly(connection)
            for classes, text in _REFUSALS:
                if isinstance(exc, classes):
                    raise BrokerConfigError("rabbitmq: " + text.format(
                        where=where, user=url.user or "guest", vhost=url.path, exchange=cfg.topic,
                        kind=cfg.exchange_kind)) from exc
            raise BrokerUnavailable(f"rabbitmq: cannot reach {where}: {exc!r}", broker=self.broker) from exc
        assert connection is not None
        connection.reconnect_callbacks.add(self._on_reconnect)
        self._connection = connection
        self._channel = channel
        log.info("rabbitmq: connected to %s, exchange %s (%s)", where, cfg.topic, cfg.exchange_kind)

    def _on_reconnect(self, *_: Any) -> None:
        RECONNECTS.labels("broker").inc()
        log.info("rabbitmq: reconnected")

    @staticmethod
    async def _close_quietly(connection: AbstractRobustConnection | None) -> None:
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    async def close(self) -> None:
        if self._pending:  # let confirms of what is already written arrive
            await asyncio.wait(set(self._pending), timeout=self.ack_timeout)
        self._confirms = self._wire = None
        channel, self._channel = self._channel, None
        connection, self._connection = self._connection, None
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.close()
        await self._close_quietly(connection)

    @property
    def ready(self) -> bool:
        connection, channel = self._connection, self._channel
        return (
            connection is not None
            and channel is not None
            and not connection.is_closed
            and connection.connected.is_set()
            and not channel.is_closed
        )

    # ------------------------------------------------------------------ publishing

    async def _underlay(self) -> aiormq.Channel:
        channel = self._channel
        if channel is None:
            raise BrokerUnavailable("rabbitmq: not connected", broker=self.broker)
        deadline = time.monotonic() + self._ready_timeout
        while True:
            try:
                underlay = await asyncio.wait_for(
                    channel.get_underlay_channel(), max(0.01, deadline - time.monotonic())
                )
                return cast(aiormq.Channel, underlay)
            except TimeoutError:
                raise BrokerUnavailable(f"rabbitmq: no connection to the broker for {self._ready_timeout:g}s",
                                        broker=self.broker) from None
            except (aiormq.exceptions.ChannelInvalidStateError, aiormq.exceptions.AMQPError) as exc:
                # the channel is being re-opened after the broker closed it
                if time.monotonic() >= deadline:
                    raise BrokerUnavailable(f"rabbitmq: channel not available: {exc!r}", broker=self.broker) from exc
                await asyncio.sleep(0.1)

    async def publish(self, batch: Sequence[Message], acks: Acks) -> None:
        for message in batch:
            if len(message.subject.encode()) > _MAX_ROUTING_KEY:
                raise BrokerConfigError(
                    f"rabbitmq: routing key {message.subject!r} is longer than {_MAX_ROUTING_KEY} bytes; "
                    "shorten publisher.topic/topicPrefix or map the table with listener.topicsMap"
                )
        channel = await self._underlay()
        self._pending.add(acks.future)  # close() lets confirms of what is written arrive
        acks.add_done_callback(lambda done: self._pending.discard(done.future))
        confirms = self._wired(channel)
        if confirms is None:
            await self._send_each(channel, batch, acks)
        else:
            await self._send_bulk(channel, confirms, batch, acks)

    def _wired(self, channel: aiormq.Channel) -> _Confirms | None:
        """The confirm tracking of ``channel``, set up the first time it is used (a reconnect or a
        channel re-opened after the broker closed it brings a new one); None: no bulk path."""
        confirms = self._confirms
        if confirms is not None and confirms.channel is channel:
            return confirms
        if not all(hasattr(channel, name) for name in _CHANNEL_ATTRIBUTES) or not channel.publisher_confirms:
            return None
        if confirms is not None and confirms.closed is None:
            confirms.fail(aiormq.exceptions.ChannelInvalidStateError("the channel was replaced"))
        confirms = _Confirms(self, channel)
        # instance attributes over the channel's handlers: its reader looks them up on every frame
        setattr(channel, "_on_confirm_frame", confirms.on_confirm)  # noqa: B010
        setattr(channel, "_on_return_frame", confirms.on_return)  # noqa: B010
        channel.closing.add_done_callback(confirms.on_closed)
        self._confirms = confirms
        self._wire = _Wire(self.cfg.topic, channel.number, channel.max_content_size)
        return confirms

    async def _send_bulk(
        self, channel: aiormq.Channel, confirms: _Confirms, batch: Sequence[Message], acks: Acks
    ) -> None:
        wire = self._wire
        assert wire is not None
        indices: list[int] = []
        frames: list[bytes] = []
        for index, message in enumerate(batch):
            if len(message.body) > self._max_message:
                acks.settle(index, self._oversized(message))
                continue
            try:
                wire.encode(message, frames)
            except ValueError as exc:  # an id or header name longer than an AMQP short string
                acks.settle(index, MessageRejected(f"rabbitmq: event {message.id} cannot be encoded: {exc}",
                                                   broker=self.broker, retryable=False))
                continue
            indices.append(index)
        if not indices:
            return
        deadline = time.monotonic() + self.ack_timeout
        frame = ChannelFrame(payload=b"".join(frames), should_close=False)
        try:
            async with channel.lock:
                # the broker numbers the publishes of a channel in confirm mode 1, 2, 3, ...: the batch
                # takes the next tags and is waiting for them before its frames can reach the broker
                sent = _Sent(acks, batch, indices, channel.delivery_tag + 1)
                channel.delivery_tag = sent.last
                confirms.add(sent)
                try:
                    channel.write_queue.put_nowait(frame)
                except asyncio.QueueFull:
                    await asyncio.wait_for(channel.write_queue.put(frame), max(0.01, deadline - time.monotonic()))
                except BaseException:
                    confirms.withdraw(sent)
                    channel.delivery_tag = sent.first - 1
                    raise
        except (TimeoutError, aiormq.exceptions.AMQPError, ConnectionError) as exc:
            # nothing of the batch was handed to the connection
            error: BaseException = exc
            _Sent(acks, batch, indices, 0).settle_all(lambda message: self._failure(message, error))

    async def _send_each(self, channel: aiormq.Channel, batch: Sequence[Message], acks: Acks) -> None:
        """One ``basic_publish`` task per message: for an aiormq without the internals of the bulk path."""
        exchange = self.cfg.topic
        loop = asyncio.get_running_loop()
        for index, message in enumerate(batch):
            if len(message.body) > self._max_message:
                acks.settle(index, self._oversized(message))
                continue
            headers: dict[str, Any] = message.attributes()
            properties = Basic.Properties(
                content_type=headers.pop("content-type", "application/json"),
                delivery_mode=_PERSISTENT,
                message_id=message.id,
                app_id="wal-listener",
                headers=headers,
            )
            # Each task reaches the channel lock without suspending first, so tasks (and batches)
            # write their frames in the order they were created.
            task = loop.create_task(
                channel.basic_publish(
                    message.body,
                    exchange=exchange,
                    routing_key=message.subject,
                    properties=properties,
                    mandatory=True,
                    timeout=self.ack_timeout,  # a bound for the task; the delivery stage's deadline is the same
                    wait=False,  # do not hold the channel lock until the socket drained
                )
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(self._settle_on(acks, index, message))
        await asyncio.sleep(0)  # let the tasks write their frames before the caller goes on

    def _settle_on(self, acks: Acks, index: int, message: Message) -> Callable[[asyncio.Task[Any]], None]:
        def done(task: asyncio.Task[Any]) -> None:
            if task.cancelled():
                acks.settle(index, self._failure(message, asyncio.CancelledError()))
                return
            exc = task.exception()
            if exc is not None:
                acks.settle(index, self._failure(message, exc))
                return
            if isinstance(task.result(), DeliveredMessage):
                self._unroutable(message.subject)
            acks.settle(index)

        return done

    def _oversized(self, message: Message) -> PublishError:
        return self.too_large(message, len(message.body), self._max_message, "the broker's max_message_size")

    def _failure(self, message: Message, exc: BaseException) -> PublishError:
        match = _TOO_LARGE.search(str(exc))
        if match:
            # The broker closed the channel over a too-large message: remember its limit, so the
            # message is refused up front (permanently) when it comes again.
            self._max_message = min(self._max_message, int(match.group(2)))
            if len(message.body) > self._max_message:
                return self._oversized(message)
        if isinstance(exc, aiormq.exceptions.DeliveryError):
            return self.error(exc, f"broker refused (nack) event {message.id}")
        if isinstance(exc, TimeoutError):
            return self.error(exc, f"no confirm for event {message.id} within {self.ack_timeout:g}s")
        return self.error(exc, f"event {message.id} not confirmed: {exc!r}")

    def _unroutable(self, routing_key: str) -> None:
        now = time.monotonic()
        last = self._unrouted.get(routing_key)
        if last is None or now - last > 300:
            self._unrouted[routing_key] = now
            log.warning(
                "rabbitmq: no queue is bound to exchange %s for routing key %s; RabbitMQ discarded the event",
                self.cfg.topic,
                routing_key,
            )
