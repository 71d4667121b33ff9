"""Error types. Each carries a message a user can act on; the CLI prints it as one line (a ConfigError for a
config with several problems holds one line per problem).

The whole tree (nothing else in the listener raises its own exception types)::

    ListenerError
    ├── ConfigError                  the configuration is invalid (or names a broker whose library is missing); exit 2
    │   └── PublicationRefused       the config would need a publication that breaks the application's writes,
    │                                or one another listener made; exit 2
    ├── BrokerConfigError            the broker refuses the publisher's settings; exit 2
    ├── DatabaseError                PostgreSQL unreachable or refusing; retried with backoff
    │   ├── DatabaseSetupError       reachable, but set up so streaming cannot work until someone acts; retried slowly
    │   │   └── SlotLostError        the slot was dropped or invalidated under the listener
    │   └── SlotInUseError           another process reads the slot
    ├── DecodeError                  a pgoutput message could not be decoded
    └── PublishError                 a message was not acknowledged; reason "publish_failed"
        ├── BrokerUnavailable        not connected, connection lost, broker unreachable; "broker_unavailable"
        ├── AckTimeout               no acknowledgement within listener.ackTimeout; "ack_timeout"
        ├── MessageTooLarge          over the broker's size limit, never retryable; "message_too_large"
        └── MessageRejected          the broker refused this message; "message_rejected"

A :class:`PublishError` names its ``broker`` and says whether sending the message again can succeed
(``retryable``); the delivery stage retries every one of them, and with ``onError: skip`` sends a message
whose error is not retryable to the dead-letter topic instead. Its ``reason`` is the value of the
``publish_errors_total{reason}`` metric label. Each publisher turns its client library's exceptions into
these types with one table (``Publisher.errors``).
"""

from __future__ import annotations

from typing import ClassVar


class ListenerError(Exception):
    """Base of every error the listener raises on purpose."""


class ConfigError(ListenerError):
    """The configuration is invalid; the process exits with code 2."""


class PublicationRefused(ConfigError):
    """Streaming this config would need a publication that makes the application's UPDATE or DELETE fail (a
    table without a replica identity), or one that the listener of another slot made; exit 2."""


class BrokerConfigError(ListenerError):
    """The broker refuses the publisher's settings (missing topic, unknown project); exit 2."""


class DatabaseError(ListenerError):
    """PostgreSQL is unreachable or refuses what the listener needs; retried with backoff.

    ``reason`` names a lasting problem with the slot or the publication (``slot_dropped``,
    ``slot_invalidated``, ``slot_in_use``, ``publication_missing``, ``wal_level``, ``setup``); the
    listener exports it as the ``slot_problem{reason}`` gauge and logs it once rather than on every retry.
    An outage (connection refused, server restarting) has no reason.
    """

    def __init__(self, message: str = "", *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class DatabaseSetupError(DatabaseError):
    """PostgreSQL is reachable but set up so streaming cannot work until someone acts (``wal_level``, a
    missing right, a slot of another plugin or database, a dropped publication). Retried, slowly: the
    listener picks up the fix by itself."""


class SlotInUseError(DatabaseError):
    """The replication slot is being read by another process; retried with backoff."""


class SlotLostError(DatabaseSetupError):
    """The slot was dropped or invalidated under the listener; changes may have been lost."""


class DecodeError(ListenerError):
    """A pgoutput message could not be decoded."""


class PublishError(ListenerError):
    """The broker did not acknowledge a message; the delivery stage sends it again.

    ``broker`` is the publisher's name (``nats``, ``kafka``, ``rabbitmq``, ``pubsub``), ``retryable``
    False when the broker will never accept the message as it is, ``reason`` the metric label value.
    """

    reason: ClassVar[str] = "publish_failed"
    retryable: bool = True

    def __init__(self, message: str = "", *, broker: str = "", retryable: bool | None = None) -> None:
        super().__init__(message)
        self.broker = broker
        if retryable is not None:
            self.retryable = retryable


class BrokerUnavailable(PublishError):
    """Not connected, the connection was lost, or the broker does not answer."""

    reason = "broker_unavailable"


class AckTimeout(PublishError):
    """No acknowledgement within ``listener.ackTimeout`` (decided by the delivery stage)."""

    reason = "ack_timeout"


class MessageTooLarge(PublishError):
    """The message is larger than the broker accepts; sending it again cannot help."""

    reason = "message_too_large"
    retryable = False


class MessageRejected(PublishError):
    """The broker refused this message (a nack, an error in the acknowledgement, a subject or topic it
    does not take); ``retryable`` False when it will refuse it every time."""

    reason = "message_rejected"
