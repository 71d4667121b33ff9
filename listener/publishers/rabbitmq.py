"""RabbitMQ publisher (aio-pika): durable exchange, persistent messages, publisher confirms.

How acknowledgements are collected: the channel is opened in confirm mode. ``send`` takes the
channel once and starts one ``basic_publish`` per message, in order; each of them writes its frames
under the channel's FIFO lock (so frames leave in the order of the batch, and batch after batch) and
then waits for the broker's ``basic.ack`` for its delivery tag. The awaitable returned by ``send``
gathers them: ``None`` means RabbitMQ confirmed the message, which for a persistent message routed
to durable queues means it is on disk. A ``basic.nack``, a lost connection or a confirm that does
not come within ``listener.ackTimeout`` is a :class:`PublishError`; the delivery stage sends the message
again (same ``message_id``, so consumers can drop the duplicate).

Reconnects: the connection is aio-pika's robust connection; after a lost connection it reconnects
every ``reconnect_interval`` seconds, re-opens the channel in confirm mode and re-declares the
exchange. While it is down ``ready`` is false and ``send`` waits up to ``ready_timeout`` for it, then
fails the batch without sending anything, so that the delivery stage backs off and retries.

A message nobody has bound a queue for is published ``mandatory``; RabbitMQ returns it and then
confirms it. It counts as published (that is the exchange's routing, not a failure) and is logged
once per routing key so the missing binding is visible.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Sequence
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection, ExchangeType
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from yarl import URL

from listener.config import PublisherConfig
from listener.errors import BrokerConfigError, PermanentPublishError, PublishError
from listener.metrics import OVERSIZED, RECONNECTS
from listener.publishers.base import AckResults, Message, Publisher

log = logging.getLogger(__name__)

_MAX_ROUTING_KEY = 255  # bytes, AMQP 0-9-1 short string
_DEFAULT_MAX_MESSAGE = 128 * 1024 * 1024  # RabbitMQ's default max_message_size (3.8 and later)
_TOO_LARGE = re.compile(r"message size (\d+) is larger than configured max size (\d+)")
_PERSISTENT = 2


def _tls_context(cfg: PublisherConfig) -> ssl.SSLContext | None:
    if not (cfg.enable_tls or cfg.ca_cert or cfg.client_cert):
        return None
    try:
        context = ssl.create_default_context(cafile=cfg.ca_cert or None)
        if cfg.client_cert:
            context.load_cert_chain(cfg.client_cert, cfg.client_key or None)
    except (OSError, ssl.SSLError) as exc:
        raise BrokerConfigError(
            f"rabbitmq: TLS files publisher.caCert/clientCert/clientKey cannot be loaded: {exc}"
        ) from None
    return context


def broker_url(cfg: PublisherConfig, tls: bool) -> URL:
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


class RabbitMQPublisher(Publisher):
    """Publishes every event to exchange ``publisher.topic`` with the topic name as routing key."""

    needs_key = False

    def __init__(
        self,
        cfg: PublisherConfig,
        ack_timeout: float = 10.0,
        *,
        ready_timeout: float = 5.0,
        connect_timeout: float = 10.0,
    ) -> None:
        super().__init__(cfg, ack_timeout)
        self._confirm_timeout = ack_timeout
        self._ready_timeout = ready_timeout
        self._connect_timeout = connect_timeout
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._max_message = _DEFAULT_MAX_MESSAGE
        self._unrouted: dict[str, float] = {}
        self._pending: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ lifecycle

    async def connect(self) -> None:
        if self._connection is not None:
            return
        cfg = self.cfg
        context = _tls_context(cfg)
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
        except (aiormq.exceptions.ProbableAuthenticationError, aiormq.exceptions.AuthenticationError) as exc:
            await self._close_quietly(connection)
            user = url.user or "guest"
            raise BrokerConfigError(
                f"rabbitmq: {where} refused user {user!r}; check publisher.username/password or the address"
            ) from exc
        except aiormq.exceptions.ConnectionNotAllowed as exc:
            await self._close_quietly(connection)
            raise BrokerConfigError(f"rabbitmq: {where} refused access to virtual host {url.path!r}") from exc
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            await self._close_quietly(connection)
            raise BrokerConfigError(
                f"rabbitmq: exchange {cfg.topic!r} already exists with other settings than "
                f"publisher.exchangeKind={cfg.exchange_kind!r}, durable; delete it or change the setting"
            ) from exc
        except aiormq.exceptions.ChannelAccessRefused as exc:
            await self._close_quietly(connection)
            raise BrokerConfigError(
                f"rabbitmq: user {url.user or 'guest'!r} may not declare exchange {cfg.topic!r} on {where}"
            ) from exc
        except (TimeoutError, *aio_pika.exceptions.CONNECTION_EXCEPTIONS) as exc:
            await self._close_quietly(connection)
            raise PublishError(f"rabbitmq: cannot reach {where}: {exc!r}") from exc
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
            await asyncio.wait(set(self._pending), timeout=self._confirm_timeout)
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
            raise PublishError("rabbitmq: not connected")
        deadline = time.monotonic() + self._ready_timeout
        while True:
            try:
                underlay = await asyncio.wait_for(
                    channel.get_underlay_channel(), max(0.01, deadline - time.monotonic())
                )
                return cast(aiormq.Channel, underlay)
            except TimeoutError:
                raise PublishError(f"rabbitmq: no connection to the broker for {self._ready_timeout:g}s") from None
            except (aiormq.exceptions.ChannelInvalidStateError, aiormq.exceptions.AMQPError) as exc:
                # the channel is being re-opened after the broker closed it
                if time.monotonic() >= deadline:
                    raise PublishError(f"rabbitmq: channel not available: {exc!r}") from exc
                await asyncio.sleep(0.1)

    async def send(self, batch: Sequence[Message]) -> Awaitable[AckResults]:
        exchange = self.cfg.topic
        for message in batch:
            if len(message.subject.encode()) > _MAX_ROUTING_KEY:
                raise BrokerConfigError(
                    f"rabbitmq: routing key {message.subject!r} is longer than {_MAX_ROUTING_KEY} bytes; "
                    "shorten publisher.topic/topicPrefix or map the table with listener.topicsMap"
                )
        try:
            channel = await self._underlay()
        except PublishError as exc:
            return asyncio.ensure_future(_settled([exc] * len(batch)))

        loop = asyncio.get_running_loop()
        items: list[asyncio.Future[Any]] = []
        for message in batch:
            if len(message.body) > self._max_message:
                fut: asyncio.Future[Any] = loop.create_future()
                fut.set_result(self._oversized(message))
                items.append(fut)
                continue
            properties = Basic.Properties(
                content_type="application/json",
                delivery_mode=_PERSISTENT,
                message_id=message.id,
                app_id="wal-listener",
                headers=dict(message.attributes()),
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
                    timeout=self._confirm_timeout,
                    wait=False,  # do not hold the channel lock until the socket drained
                )
            )
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
            items.append(task)
        await asyncio.sleep(0)  # let the tasks write their frames before the caller goes on
        return asyncio.ensure_future(self._gather(items, batch))

    def _oversized(self, message: Message) -> PermanentPublishError:
        OVERSIZED.labels(message.table).inc()
        return PermanentPublishError(
            f"rabbitmq: event {message.id} of {message.schema}.{message.table} is {len(message.body)} bytes, "
            f"more than the broker's max_message_size ({self._max_message} bytes)"
        )

    async def _gather(self, items: list[asyncio.Future[Any]], batch: Sequence[Message]) -> AckResults:
        outcomes = await asyncio.gather(*items, return_exceptions=True)
        results: AckResults = []
        for message, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, PublishError):
                results.append(outcome)
            elif isinstance(outcome, BaseException):
                results.append(self._failure(message, outcome))
            else:
                if isinstance(outcome, DeliveredMessage):
                    self._unroutable(message.subject)
                results.append(None)
        return results

    def _failure(self, message: Message, exc: BaseException) -> PublishError:
        match = _TOO_LARGE.search(str(exc))
        if match:
            # The broker closed the channel over a too-large message: remember its limit, so the
            # message is refused up front (permanently) when it comes again.
            self._max_message = min(self._max_message, int(match.group(2)))
            if len(message.body) > self._max_message:
                return self._oversized(message)
        if isinstance(exc, aiormq.exceptions.DeliveryError):
            return PublishError(f"rabbitmq: broker refused (nack) event {message.id}")
        if isinstance(exc, TimeoutError):
            return PublishError(f"rabbitmq: no confirm for event {message.id} within {self._confirm_timeout:g}s")
        return PublishError(f"rabbitmq: event {message.id} not confirmed: {exc!r}")

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


async def _settled(results: list[BaseException | None]) -> AckResults:
    return list(results)
