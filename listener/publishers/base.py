"""The publisher interface every broker implements, and the message it carries.

Lifecycle (one client class per broker, explicit, like aiokafka and nats.py)::

    pub = NatsPublisher(cfg.publisher, metrics)
    await pub.connect()                  # BrokerConfigError: permanent; PublishError: retry later
    acks = await pub.send(batch)         # hands the batch to the client, in order
    results = await acks                 # one entry per message: None (acked) or the exception
    await pub.close()

``send`` returns as soon as the batch is handed over, so the delivery stage can have several batches
in flight while keeping the order in which they were sent; awaiting the returned object waits for
the broker's acknowledgements. A message whose entry is an exception was not acknowledged and is
sent again by the delivery stage (a :class:`PermanentPublishError` goes to the ``onError`` policy).
"""

from __future__ import annotations

import asyncio
import ssl
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field

from listener.config import PublisherConfig
from listener.errors import BrokerConfigError

AckResults = list[BaseException | None]


@dataclass(slots=True)
class Message:
    """One event ready for the wire."""

    id: str
    subject: str  # the topic name: NATS subject, Kafka topic, RabbitMQ routing key, Pub/Sub topic
    body: bytes  # the event as JSON
    schema: str
    table: str
    action: str  # INSERT | UPDATE | DELETE | TRUNCATE
    key: bytes | None = None  # the row's replica-identity key (Kafka key, Pub/Sub ordering key)
    headers: dict[str, str] = field(default_factory=dict)

    def attributes(self) -> dict[str, str]:
        """Metadata every broker carries beside the body (headers / attributes / properties)."""
        return {"id": self.id, "schema": self.schema, "table": self.table, "action": self.action, **self.headers}


class Publisher(ABC):
    """One broker client. Subclasses implement connect/send/close and report readiness."""

    #: True when the broker uses :attr:`Message.key` (the event stage only computes it then).
    needs_key: bool = False

    def __init__(self, cfg: PublisherConfig, ack_timeout: float = 10.0) -> None:
        self.cfg = cfg
        #: seconds one publish may wait for its acknowledgement (``listener.ackTimeout``)
        self.ack_timeout = ack_timeout

    @abstractmethod
    async def connect(self) -> None:
        """Connect and make sure the destination exists (stream, exchange, topics)."""

    @abstractmethod
    async def send(self, batch: Sequence[Message]) -> Awaitable[AckResults]:
        """Hand ``batch`` to the broker in order; the returned awaitable yields one result per message."""

    @abstractmethod
    async def close(self) -> None:
        """Flush what is buffered and disconnect."""

    @property
    @abstractmethod
    def ready(self) -> bool:
        """True while the broker connection is up."""


def tls_context(cfg: PublisherConfig, broker: str) -> ssl.SSLContext | None:
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


async def collect(futures: Iterable[Awaitable[object]]) -> AckResults:
    """Await every acknowledgement; map each to None (acked) or its exception."""
    results = await asyncio.gather(*futures, return_exceptions=True)
    return [r if isinstance(r, BaseException) else None for r in results]


def make_publisher(cfg: PublisherConfig, ack_timeout: float = 10.0) -> Publisher:
    """The publisher for ``cfg.type``; broker libraries are imported only when used."""
    from listener.config import PublisherType

    if cfg.type is PublisherType.NATS:
        from listener.publishers.nats import NatsPublisher

        return NatsPublisher(cfg, ack_timeout)
    if cfg.type is PublisherType.KAFKA:
        from listener.publishers.kafka import KafkaPublisher

        return KafkaPublisher(cfg, ack_timeout)
    if cfg.type is PublisherType.RABBITMQ:
        from listener.publishers.rabbitmq import RabbitMQPublisher

        return RabbitMQPublisher(cfg, ack_timeout)
    from listener.publishers.pubsub import PubSubPublisher

    return PubSubPublisher(cfg, ack_timeout)
