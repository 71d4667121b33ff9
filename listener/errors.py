"""Error types. Each carries a message a user can act on; the CLI prints it as one line."""

from __future__ import annotations


class ListenerError(Exception):
    """Base of every error the listener raises on purpose."""


class ConfigError(ListenerError):
    """The configuration is invalid; the process exits with code 2."""


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


class FatalDatabaseError(DatabaseError):
    """PostgreSQL is reachable but set up so the listener can never work (e.g. wal_level); exit 1."""


class SlotInUseError(DatabaseError):
    """The replication slot is being read by another process; retried with backoff."""


class SlotLostError(FatalDatabaseError):
    """The slot was dropped or invalidated under the listener; changes may have been lost."""


class DecodeError(ListenerError):
    """A pgoutput message could not be decoded."""


class PublishError(ListenerError):
    """The broker did not acknowledge a message; the listener retries it."""


class PermanentPublishError(PublishError):
    """The broker will never accept this message as it is (too large, rejected by the server)."""


class BrokerConfigError(ListenerError):
    """The broker refuses the publisher's settings (missing topic, unknown project); exit 2."""
