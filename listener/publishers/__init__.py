"""The brokers: ``publisher.type`` → its publisher class, imported only when that type is used.

Each broker's module imports its client library (SDK) at the top, so importing this package imports no
SDK, and a listener configured for NATS never imports aiokafka, aio-pika or the Google client. An SDK
that is not installed is a one-line :class:`~listener.errors.ConfigError` naming the pip extra to install.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, NamedTuple

from listener.config import PublisherConfig, PublisherType
from listener.errors import ConfigError

if TYPE_CHECKING:
    from listener.publishers.base import Publisher


class Broker(NamedTuple):
    module: str  # the module of the publisher class
    cls: str  # the class in it
    extra: str  # the pip extra that installs its SDK: pip install 'wal-listener[<extra>]'
    packages: tuple[str, ...]  # the SDK's top-level packages (a missing one means: install the extra)


REGISTRY: dict[PublisherType, Broker] = {
    PublisherType.NATS: Broker("listener.publishers.nats", "NatsPublisher", "nats", ("nats",)),
    PublisherType.KAFKA: Broker("listener.publishers.kafka", "KafkaPublisher", "kafka", ("aiokafka",)),
    PublisherType.RABBITMQ: Broker(
        "listener.publishers.rabbitmq", "RabbitMQPublisher", "rabbitmq", ("aio_pika", "aiormq", "pamqp", "yarl")
    ),
    PublisherType.GOOGLE_PUBSUB: Broker("listener.publishers.pubsub", "PubSubPublisher", "pubsub", ("google", "grpc")),
}


def publisher_class(kind: PublisherType) -> type[Publisher[Any]]:
    """The publisher class of ``kind``, importing its module (and SDK) now."""
    broker = REGISTRY[kind]
    try:
        module = importlib.import_module(broker.module)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing.split(".")[0] not in broker.packages:
            raise
        raise ConfigError(
            f"publisher.type {kind.value} needs the Python package {missing!r}, which is not installed: "
            f"pip install 'wal-listener[{broker.extra}]'"
        ) from None
    cls: type[Publisher[Any]] = getattr(module, broker.cls)
    return cls


def make_publisher(cfg: PublisherConfig, ack_timeout: float = 10.0) -> Publisher[Any]:
    """The publisher for ``cfg.type``."""
    return publisher_class(cfg.type)(cfg, ack_timeout)
