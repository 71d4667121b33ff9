"""The publisher interface every broker implements, and the helpers they share.

Lifecycle (one client class per broker, explicit, like aiokafka and nats.py)::

    pub = make_publisher(cfg.publisher, ack_timeout)   # listener.publishers: the class of publisher.type
    await pub.connect()                   # BrokerConfigError: permanent; PublishError: retry later
    acks = await pub.send(batch)          # hands the batch over, in order, with a tracker (listener.delivery.Acks)
    results = await acks                  # one entry per message: None (acked) or the PublishError
    await pub.close()

A broker implements :meth:`Publisher.publish`: hand the batch to its client in order, return as soon as
it is handed over (so the delivery stage can have several batches in flight while keeping their order),
and report each message's outcome on the tracker as the client learns it. How long a batch may wait is
not the publisher's business: the delivery stage's tracker fails what is unacknowledged after
``listener.ackTimeout`` with :class:`~listener.errors.AckTimeout`. A failed message is sent again by the
delivery stage (one whose error is not ``retryable`` goes to the ``onError`` policy).

Errors: each publisher lists, in :attr:`Publisher.errors`, which exception classes of its client mean
which of our :class:`~listener.errors.PublishError` types (:meth:`Publisher.error` applies it);
:meth:`Publisher.too_large` is the one way to refuse an oversized message; :class:`Readiness` is the
reachability state of clients that reconnect on their own without saying so (Kafka, Pub/Sub).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from typing import ClassVar, Generic, TypeVar

from listener import metrics
from listener.config import PublisherSettings, TLSPublisherConfig
from listener.delivery import Acks, publish
from listener.errors import BrokerConfigError, MessageTooLarge, PublishError
from listener.formats import CE_HEADERS, Binding
from listener.message import Message

#: client exception class(es) -> our error type; the first row that matches wins (like ``except`` clauses)
ErrorTable = Sequence[tuple[type[BaseException] | tuple[type[BaseException], ...], type[PublishError]]]


#: the ``publisher`` section of the broker a publisher class serves
ConfigT = TypeVar("ConfigT", bound=PublisherSettings)


class Publisher(ABC, Generic[ConfigT]):
    """One broker client. Subclasses implement connect/publish/close and report readiness."""

    #: the broker's name, first word of its error messages and ``PublishError.broker``
    broker: ClassVar[str] = ""
    #: the client's exceptions as our error types (anything else is a plain :class:`PublishError`)
    errors: ClassVar[ErrorTable] = ()
    #: True when the broker uses :attr:`Message.key` (the event stage only computes it then).
    needs_key: bool = False
    #: how CloudEvents attributes travel as headers in binary mode: ce- as in the HTTP binding (NATS, Pub/Sub)
    cloudevents: ClassVar[Binding] = CE_HEADERS

    def __init__(self, cfg: ConfigT, ack_timeout: float = 10.0) -> None:
        self.cfg = cfg
        #: ``listener.ackTimeout``: the delivery stage's deadline per batch; publishers size their client's
        #: own request timeouts and shutdown waits by it
        self.ack_timeout = ack_timeout

    @abstractmethod
    async def connect(self) -> None:
        """Connect and make sure the destination exists (stream, exchange, topics)."""

    @abstractmethod
    async def publish(self, batch: Sequence[Message], acks: Acks) -> None:
        """Hand ``batch`` to the broker in order and report the outcome of message ``i`` as
        ``acks.settle(i, None | error)`` when it is known (now or later). Raising fails the whole batch;
        :class:`BrokerConfigError` stops the listener."""

    @abstractmethod
    async def close(self) -> None:
        """Flush what is buffered and disconnect."""

    @property
    @abstractmethod
    def ready(self) -> bool:
        """True while the broker connection is up."""

    async def send(self, batch: Sequence[Message]) -> Acks:
        """:meth:`publish` with a new tracker whose deadline is :attr:`ack_timeout`, as the delivery stage
        sends a batch; await the tracker for the results."""
        return await publish(self, batch, self.ack_timeout)

    # -- shared helpers ---------------------------------------------------------------------------

    def error(self, exc: BaseException, text: str) -> PublishError:
        """``exc`` of the client as our error type (by :attr:`errors`), with the message
        ``"<broker>: <text>"``; our own errors pass through."""
        if isinstance(exc, PublishError):
            return exc
        return self.error_type(exc)(f"{self.broker}: {text}", broker=self.broker)

    def error_type(self, exc: BaseException) -> type[PublishError]:
        for classes, kind in self.errors:
            if isinstance(exc, classes):
                return kind
        return PublishError

    def too_large(self, message: Message, size: int, limit: int, what: str, detail: str = "") -> MessageTooLarge:
        """Refuse ``message`` for good: ``size`` bytes (as the broker counts them) is more than ``limit``,
        named ``what`` (e.g. "the server's max_payload"). Counted in ``oversized_events_total``."""
        metrics.OVERSIZED.labels(message.table).inc()
        return MessageTooLarge(
            f"{self.broker}: event {message.id} of {message.schema}.{message.table} is {size} bytes and exceeds "
            f"{what} of {limit} bytes" + (f" ({detail})" if detail else ""),
            broker=self.broker,
        )


class Readiness:
    """Whether the broker answers, for a client that reconnects on its own without saying so.

    :meth:`down` on a connection-type failure (logged once; the publisher then refuses new batches at
    once instead of piling them up in the client), :meth:`up` on an acknowledgement. A probe run every
    ``interval`` seconds (:meth:`start`) notices an idle broker going away and coming back; ``back`` is
    called when it does come back (before the publisher is ready again), whichever notices it first: the
    probe, or an acknowledgement of something the client sent again by itself.
    """

    def __init__(self, broker: str, where: str, log: logging.Logger) -> None:
        self.broker = broker
        self.where = where
        self.log = log
        self.is_up = False
        self._probe: asyncio.Task[None] | None = None
        self._back: Callable[[], None] | None = None

    def up(self) -> None:
        if not self.is_up:
            self.is_up = True
            if self._back is not None:
                self._back()

    def down(self, why: object) -> None:
        if self.is_up:
            self.log.warning("%s: %s is not answering (%s); new batches are refused until it answers again",
                             self.broker, self.where, why)
            self.is_up = False

    def start(self, check: Callable[[], Awaitable[object]], interval: float,
              back: Callable[[], None] | None = None) -> None:
        """Up, and probing with ``check`` (which raises when the broker cannot be reached)."""
        self.is_up = True
        self._back = back
        if self._probe is None:
            self._probe = asyncio.create_task(self._run(check, interval), name=f"{self.broker}-probe")

    async def stop(self) -> None:
        self.is_up = False
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe

    async def _run(self, check: Callable[[], Awaitable[object]], interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.wait_for(check(), interval * 2)
            except Exception as exc:
                if self.is_up:
                    self.log.warning("%s: %s is unreachable: %s", self.broker, self.where,
                                     str(exc) or type(exc).__name__)
                self.is_up = False
            else:
                if not self.is_up:
                    self.log.info("%s: %s is reachable again", self.broker, self.where)
                    self.up()


def tls_context(cfg: TLSPublisherConfig, broker: str) -> ssl.SSLContext | None:
    """The TLS context from ``enableTLS``/``caCert``/``clientCert``/``clientKey`` (file paths), or None
    when none of them is set; files that cannot be loaded are a :class:`BrokerConfigError` naming the key."""
    if cfg.client_key and not cfg.client_cert:
        raise BrokerConfigError(f"{broker}: publisher.clientKey is set but publisher.clientCert is not")
    if not (cfg.enable_tls or cfg.ca_cert or cfg.client_cert):
        return None
    try:
        context = ssl.create_default_context(cafile=cfg.ca_cert or None)
    except (OSError, ssl.SSLError) as exc:
        raise BrokerConfigError(f"{broker}: publisher.caCert = {cfg.ca_cert!r} cannot be loaded: {exc}") from None
    if cfg.client_cert:
        try:
            context.load_cert_chain(cfg.client_cert, cfg.client_key or None)
        except (OSError, ssl.SSLError) as exc:
            raise BrokerConfigError(
                f"{broker}: publisher.clientCert = {cfg.client_cert!r} / publisher.clientKey = {cfg.client_key!r} "
                f"cannot be loaded: {exc}"
            ) from None
    return context
