"""Stage 1 — configuration: load the YAML file, apply ``WAL_`` environment overrides, validate.

The model is the single source of truth for the listener's settings; the operator imports it to
render the config it hands to listener pods. Keys are camelCase as in the Go original; matching is
case-insensitive and ignores ``_``/``-`` (so ``enable_tls``, ``enableTLS`` and ``ENABLETLS`` are one
key, as they were under Viper). Every problem becomes one :class:`ConfigError` line naming the key,
the bad value and what is allowed.
"""

from __future__ import annotations

import os
import re
import typing
from collections.abc import Mapping
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from listener.errors import ConfigError

ENV_PREFIX = "WAL_"

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> timedelta:
    """Parse a Go-style duration (``30s``, ``1m30s``, ``500ms``) or a number of seconds."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 1m30s or 500ms")
    if isinstance(value, int | float):
        return timedelta(seconds=value)
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d+(\.\d+)?", text):
            return timedelta(seconds=float(text))
        if text and _DURATION_PART.sub("", text) == "":
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))
            return timedelta(seconds=seconds)
    raise ValueError("expected a duration such as 30s, 1m30s or 500ms")


def format_duration(value: timedelta) -> str:
    """Render a duration the way the config file writes it (``30s``, ``1.5s``)."""
    seconds = value.total_seconds()
    return f"{seconds:g}s"


Duration = Annotated[timedelta, BeforeValidator(parse_duration), PlainSerializer(format_duration, return_type=str)]

_BYTES = re.compile(r"(\d+(?:\.\d+)?)\s*([kKMGT]?)(i?)B?")
_BYTE_POWERS = {"": 0, "k": 1, "K": 1, "M": 2, "G": 3, "T": 4}


def parse_bytes(value: Any) -> int:
    """Parse a size: a number of bytes, or with a unit as Kubernetes or IEC write it (``64Mi``, ``64MiB``,
    ``512k``, ``1GB``; ``Ki``/``KiB`` are powers of 1024, ``k``/``KB`` of 1000)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 67108864, 64Mi or 64MiB")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        match = _BYTES.fullmatch(value.strip())
        if match:
            number, unit, binary = match.groups()
            if unit or not binary:
                return int(float(number) * (1024 if binary else 1000) ** _BYTE_POWERS[unit])
    raise ValueError("expected a size such as 67108864, 64Mi or 64MiB")


#: a size in bytes; the config file may write it with a unit (64Mi, 64MiB), the CRD takes an integer or string
ByteSize = Annotated[
    int,
    BeforeValidator(parse_bytes),
    WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string", "pattern": _BYTES.pattern}]}),
]


class Action(StrEnum):
    """A change kind a filter can select; the event's ``action`` is its upper-case form."""

    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"
    TRUNCATE = "truncate"

    @classmethod
    def _missing_(cls, value: object) -> Action | None:
        if isinstance(value, str):
            lowered = value.lower()
            for member in cls:
                if member.value == lowered:
                    return member
        return None


class PublisherType(StrEnum):
    NATS = "nats"
    KAFKA = "kafka"
    RABBITMQ = "rabbitmq"
    GOOGLE_PUBSUB = "google_pubsub"


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        validate_default=True,
        # each model's validator is built when it is first used, not at import: the listener validates one
        # Config (whose validator covers every section), and building every section's own validator as well
        # was about a third of its start-up
        defer_build=True,
    )


# The default factories are plain functions: pydantic reads each factory's signature when it builds a model,
# and the signature of ``list``, ``dict`` or a model class costs far more (a tokenizer for a builtin's text
# signature, a model's generated __signature__) than a function's; the defaults are the same.


def _empty_list() -> list[Any]:
    return []


def _empty_dict() -> dict[str, Any]:
    return {}


_SLOT_NAME = re.compile(r"[a-z0-9_]{1,63}")


class FilterConfig(_Model):
    """Which tables and actions are published. No ``tables`` at all: everything is published."""

    tables: dict[str, list[Action]] | None = Field(
        None,
        description="Table ('table' in any schema, or 'schema.table') -> the actions to publish "
        "(insert, update, delete, truncate). Leave out to publish every table and action.",
    )

    @field_validator("tables")
    @classmethod
    def _check_tables(cls, tables: dict[str, list[Action]] | None) -> dict[str, list[Action]] | None:
        if tables is None:
            return None
        for key in tables:
            parts = key.split(".")
            if not key or len(parts) > 2 or not all(parts):
                raise ValueError(f"table key {key!r} must be 'table' or 'schema.table'")
        return tables


class SnapshotConfig(_Model):
    """Backfills: existing rows published as READ events while streaming (see docs/snapshots.md)."""

    mode: Literal["never", "initial"] = Field(
        "never", description="initial: when the listener creates its slot, backfill every published table."
    )
    chunk_size: int = Field(
        10000, ge=1, le=1_000_000, description="Rows per chunk (keyset pages over the primary key), at most: a "
        "chunk also ends once its rows pass a quarter of listener.maxInFlightBytes."
    )


#: logical message prefixes the listener itself writes: never published as MESSAGE events
INTERNAL_MESSAGE_PREFIXES = ("wal_listener.watermark", "wal-listener-heartbeat", "wal_listener.ddl")


def _topic_part(value: str, what: str) -> str:
    """A name that becomes part of a topic: non-empty, no spaces, '*' or '>', no leading or trailing dot."""
    if not value or any(c.isspace() or c in "*>" for c in value) or value[0] == "." or value[-1] == ".":
        raise ValueError(
            f"{what} {value!r} must be a non-empty name without spaces, '*' or '>' and without a leading or "
            "trailing dot (it becomes part of a topic name)"
        )
    return value


class MessagesConfig(_Model):
    """Logical decoding messages (``pg_logical_emit_message``) published as MESSAGE events: the outbox."""

    prefixes: list[str] = Field(
        default_factory=_empty_list,
        description="Prefixes whose messages become MESSAGE events (topic: topic.topicPrefix + topicsMap[prefix] or "
        "prefix); messages with any other prefix are skipped and counted. PostgreSQL 14+.",
    )

    @field_validator("prefixes")
    @classmethod
    def _check_prefixes(cls, prefixes: list[str]) -> list[str]:
        for prefix in prefixes:
            _topic_part(prefix, "prefix")
            if prefix in INTERNAL_MESSAGE_PREFIXES:
                raise ValueError(
                    f"prefix {prefix!r} is the listener's own (backfill watermarks, heartbeats, DDL events)"
                )
        if len(set(prefixes)) != len(prefixes):
            raise ValueError("a prefix is listed twice")
        return prefixes


#: what a mask does to a column's value: hash (HMAC-SHA256 of its text form), redact ("[redacted]"), null
MaskKind = Literal["hash", "redact", "null"]
#: a name part of a topic template outside its {column} placeholders (the escaping of the values keeps to
#: the same characters, see listener.transforms.escape)
_TOPIC_LITERAL = re.compile(r"[A-Za-z0-9_.-]*")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def topic_template(template: str) -> list[str | tuple[str]]:
    """A topic template split into literal text and ``(column,)`` placeholders; ValueError when malformed."""
    parts: list[str | tuple[str]] = []
    at = 0
    for found in _PLACEHOLDER.finditer(template):
        parts.append(template[at : found.start()])
        if not found.group(1):
            raise ValueError("an empty {} names no column")
        parts.append((found.group(1),))
        at = found.end()
    parts.append(template[at:])
    literals = [p for p in parts if isinstance(p, str)]
    if not any(isinstance(p, tuple) for p in parts):
        raise ValueError(f"{template!r} names no column: write the column in braces, e.g. users.{{tenant_id}}")
    if any(not _TOPIC_LITERAL.fullmatch(p) for p in literals):
        raise ValueError(f"{template!r}: outside the {{column}} parts only letters, digits, '.', '_' and '-'")
    if template.startswith(".") or template.endswith(".") or ".." in template:
        raise ValueError(f"{template!r} must not start or end with a dot or hold two dots in a row")
    return [p for p in parts if p != ""]


def _mask_kind(value: Any) -> Any:
    if value is None:
        raise ValueError('unquoted null is YAML\'s empty value: write the mask as "null" (in quotes)')
    return value


class TransformColumns(_Model):
    """Which columns of a table's rows are published: include (only these) or exclude (all but these)."""

    include: list[str] | None = Field(
        None, description="Only these columns are published (key columns too only when listed)."
    )
    exclude: list[str] | None = Field(None, description="These columns are never published.")

    @model_validator(mode="after")
    def _one_of(self) -> TransformColumns:
        if self.include is not None and self.exclude is not None:
            raise ValueError("set include or exclude, not both")
        return self

    def keeps(self, column: str) -> bool:
        """Whether ``column`` is published."""
        if self.include is not None:
            return column in self.include
        return column not in (self.exclude or ())


class TransformConfig(_Model):
    """A transform of the tables it names: columns left out, values masked, topic and key per table."""

    tables: list[str] = Field(
        min_length=1,
        description="'schema.table', 'table' (any schema) or 'schema.*'; the first transform naming a table applies.",
    )
    columns: TransformColumns = Field(
        default_factory=lambda: TransformColumns(),
        description="columns.include or columns.exclude: which columns are published."
    )
    mask: dict[str, Annotated[MaskKind, BeforeValidator(_mask_kind)]] = Field(
        default_factory=_empty_dict,
        description="Column -> hash (HMAC-SHA256 with listener.transformsHashKey of the value's PostgreSQL text form, "
        "lower-case hex), redact (the string \"[redacted]\") or \"null\" (null). NULL stays null.",
    )
    topic: str = Field(
        "",
        description="Topic name part instead of schema_table, from column values: users.{tenant_id}. An event without "
        "the value (NULL, unchanged TOAST) goes to schema_table and is counted in transform_fallbacks_total.",
    )
    key: list[str] = Field(
        default_factory=_empty_list,
        description="Columns of the message key (Kafka key, Pub/Sub ordering key) of these tables' events.",
    )

    @field_validator("tables")
    @classmethod
    def _check_tables(cls, tables: list[str]) -> list[str]:
        for pattern in tables:
            parts = pattern.split(".")
            if len(parts) > 2 or not all(parts) or "*" in parts[0] or ("*" in parts[-1] and parts[-1] != "*") or (
                parts == ["*"]
            ):
                raise ValueError(f"{pattern!r} must be 'schema.table', 'table' or 'schema.*'")
        return tables

    @field_validator("topic")
    @classmethod
    def _check_topic(cls, topic: str) -> str:
        if topic:
            topic_template(topic)
        return topic

    @model_validator(mode="after")
    def _consistent(self) -> TransformConfig:
        for column in self.mask:
            if not self.columns.keeps(column):
                raise ValueError(f"mask.{column}: the column is not published (columns); mask it or leave it out")
        for column in self.key:
            if not self.columns.keeps(column):
                raise ValueError(f"key: column {column!r} is not published (columns) and cannot be the key")
        if len(set(self.key)) != len(self.key):
            raise ValueError("key: a column is listed twice")
        for column in self.topic_columns():
            if not self.columns.keeps(column):
                raise ValueError(f"topic: column {column!r} is not published (columns) and cannot name a topic")
            if self.mask.get(column) in ("redact", "null"):
                raise ValueError(f"topic: column {column!r} is masked with {self.mask[column]}: every event would get "
                                 "one topic; route by another column or mask it with hash")
        return self

    def topic_columns(self) -> list[str]:
        """The columns the topic template names."""
        return [p[0] for p in topic_template(self.topic) if isinstance(p, tuple)] if self.topic else []
class DdlConfig(_Model):
    """DDL statements published as DDL events (see docs/ddl-events.md)."""

    capture: bool = Field(
        False,
        description="Publish DDL statements (CREATE/ALTER/DROP ...) as DDL events, in commit order with the rows of "
        "their transaction. An event trigger writes them; the listener installs it when its user is a superuser, "
        "else a DBA runs what `wal-listener ddl --print-sql` prints.",
    )
    topic: str = Field(
        "ddl", description="DDL events go to <publisher.topic>.<publisher.topicPrefix><topic>."
    )

    @field_validator("topic")
    @classmethod
    def _check_topic(cls, value: str) -> str:
        return _topic_part(value, "topic")


class ListenerConfig(_Model):
    slot_name: str = Field(description="Logical replication slot the listener owns (created if missing).")
    server_port: int = Field(8080, ge=0, le=65535, description="Port of /healthz and /ready; 0 turns it off.")
    ack_timeout: Duration = Field(timedelta(seconds=10), description="How long one publish may wait for its ack.")
    refresh_connection: Duration = Field(timedelta(seconds=30), description="Longest backoff between reconnects.")
    heartbeat_interval: Duration = Field(timedelta(seconds=10), description="Standby status update interval.")
    filter: FilterConfig = Field(
        default_factory=lambda: FilterConfig(), description="Which tables and actions are published."
    )
    topics_map: dict[str, str] = Field(
        default_factory=_empty_dict, description="schema_table -> the name used in its topic instead of schema_table."
    )
    publication_name: str = Field(
        "wal-listener",
        min_length=1,
        max_length=63,
        description="Publication the slot streams. When missing, the listener creates it (with a companion "
        "<name>_inserts for tables without a replica identity that publish only inserts): FOR TABLE the tables "
        "of filter.tables publishing only the actions asked for, FOR ALL TABLES without a filter; it keeps the "
        "publications it made to the filter at every start. A publication made by someone else is used as it is.",
    )
    partition_root: bool = Field(
        True,
        description="Publish changes of a partitioned table's partitions as the partitioned (root) table: its "
        "name, its topic, its filter entry (publish_via_partition_root on the publications the listener makes).",
    )
    schema_events: bool = Field(
        False,
        description="Publish a SCHEMA event on a table's topic before its first change with a new shape (columns, "
        "types, key, replica identity) or its first change on this slot; the shapes announced are kept in "
        "wal_listener.schemas, so a restart announces nothing again. Not with publisher.format debezium.",
    )
    max_in_flight: int = Field(20000, ge=1, description="Events read but not yet acknowledged, at most.")
    max_in_flight_bytes: ByteSize = Field(
        64 * 1024 * 1024,
        ge=1024 * 1024,
        description="Bytes of events read but not yet acknowledged, at most (64Mi by default; a number of bytes or "
        "with a unit: 256Mi, 1Gi). Reading pauses at this bound as at maxInFlight; a single larger event still "
        "goes, alone. Under the operator it is derived from the pod's memory limit when not set.",
    )
    batch_size: int = Field(
        2000, ge=1, description="Most events handed to the broker in one pipelined batch (a smaller one goes "
        "out when the reader has caught up and no earlier batch waits for acks, or when one is acked)."
    )
    emit_heartbeat: bool = Field(
        False, description="Write pg_logical_emit_message heartbeats so a quiet database still advances."
    )
    on_error: Literal["halt", "skip"] = Field(
        "halt", description="A change that cannot be published: halt (retry forever) or skip to deadLetterTopic."
    )
    dead_letter_topic: str = Field("", description="Topic for changes that cannot be published (onError: skip).")
    snapshot: SnapshotConfig = Field(
        default_factory=lambda: SnapshotConfig(), description="Initial snapshot and backfills."
    )
    messages: MessagesConfig = Field(
        default_factory=lambda: MessagesConfig(),
        description="Logical decoding messages published as events (the transactional outbox).",
    )
    transforms: list[TransformConfig] = Field(
        default_factory=_empty_list,
        description="Per table: columns left out, values masked, topic and message key (see docs/transforms.md); "
        "the first entry naming a table applies.",
    )
    transforms_hash_key: SecretStr = Field(
        SecretStr(""),
        description="The HMAC key of transforms' hash masks (at least 16 characters; keep it secret and stable: "
        "the same value hashes the same only under the same key). Required when a mask uses hash.",
    )
    ddl: DdlConfig = Field(default_factory=lambda: DdlConfig(), description="DDL statements published as DDL events.")
    failover: Literal["auto", "true", "false"] = Field(
        "auto",
        description="Create the slot with FAILOVER so standbys with sync_replication_slots keep a copy "
        "(PostgreSQL 17+): auto (on for 17+), true or false.",
    )

    @field_validator("failover", mode="before")
    @classmethod
    def _failover_words(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return "true" if value else "false"
        return value.lower() if isinstance(value, str) else value
    on_slot_lost: Literal["halt", "resnapshot"] = Field(
        "halt",
        description="A dropped or invalidated slot: halt (report it, retry slowly) or resnapshot (create the slot "
        "again and backfill every published table).",
    )

    @field_validator("slot_name")
    @classmethod
    def _check_slot(cls, value: str) -> str:
        if not _SLOT_NAME.fullmatch(value):
            raise ValueError("must be 1-63 characters of lower-case letters, digits and underscores")
        return value

    #: how to give the hash key, in the error that says it is missing (the operator's spec takes a Secret)
    _HASH_KEY_HOW: ClassVar[str] = "set it or WAL_LISTENER_TRANSFORMSHASHKEY to"

    def _has_hash_key(self) -> bool:
        return bool(self.transforms_hash_key.get_secret_value())

    @model_validator(mode="after")
    def _hash_key_needed(self) -> ListenerConfig:
        hashed = [f"listener.transforms.{i}.mask.{column}" for i, t in enumerate(self.transforms)
                  for column, kind in t.mask.items() if kind == "hash"]
        key = self.transforms_hash_key.get_secret_value()
        if hashed and not self._has_hash_key():
            raise ValueError(f"listener.transformsHashKey is required when a mask uses hash ({hashed[0]}); "
                             f"{self._HASH_KEY_HOW} a random secret of 16+ characters (openssl rand -hex 32)")
        if key and len(key) < 16:
            raise ValueError("listener.transformsHashKey is too short: use 16+ characters (openssl rand -hex 32)")
        return self

    @model_validator(mode="after")
    def _dead_letter_needed(self) -> ListenerConfig:
        if self.on_error == "skip" and not self.dead_letter_topic:
            raise ValueError("listener.deadLetterTopic is required when listener.onError is skip")
        return self

    @field_validator("refresh_connection", "heartbeat_interval", "ack_timeout")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value.total_seconds() <= 0:
            raise ValueError("must be a positive duration such as 10s")
        return value


_ENDPOINT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^\s,:\[\]]+))(?::(?P<port>\d{1,5}))?$")


class DatabaseConfig(_Model):
    host: str = Field(
        "localhost",
        description="PostgreSQL host, or several comma-separated host[:port] entries (the primary among them is "
        "found by targetSessionAttrs); an entry without a port uses database.port.",
    )
    port: int = Field(5432, ge=1, le=65535, description="PostgreSQL port (of every host entry without its own).")
    target_session_attrs: Literal["", "any", "read-write", "read-only", "primary", "standby", "prefer-standby"] = (
        Field("", description="libpq target_session_attrs; default read-write when several hosts are given.")
    )
    name: str = Field(min_length=1, description="Database whose changes are streamed.")
    user: str = Field(min_length=1, description="User with the REPLICATION attribute (or superuser).")
    password: SecretStr = Field(
        SecretStr(""),
        description="The user's password; better set as WAL_DATABASE_PASSWORD. Never shown: its text is "
        "written as *** wherever it appears in a log line.",
    )
    ssl_mode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = Field(
        "prefer", description="libpq sslmode; verify-ca/verify-full check the server against sslRootCert."
    )
    enable_tls: bool = Field(False, alias="enableTLS", description="Require TLS (sslMode require at least).")
    ssl_root_cert: str = Field("", description="File of CA certificates to verify the server (libpq sslrootcert).")
    ssl_cert: str = Field("", description="Client certificate file for certificate authentication (libpq sslcert).")
    ssl_key: str = Field("", description="Private key file of sslCert (libpq sslkey).")
    debug: bool = Field(
        False, description="Log every event as it is published, transforms applied (at logger.level debug; verbose)."
    )

    @field_validator("host")
    @classmethod
    def _check_hosts(cls, value: str) -> str:
        for entry in value.split(","):
            found = _ENDPOINT.fullmatch(entry.strip())
            if found is None or (found["port"] is not None and not 0 < int(found["port"]) < 65536):
                raise ValueError(f"{entry.strip()!r} is not host or host:port (entries separated by commas)")
        return value

    @model_validator(mode="after")
    def _tls_means_require(self) -> DatabaseConfig:
        if self.enable_tls and self.ssl_mode in ("disable", "allow", "prefer"):
            return self.model_copy(update={"ssl_mode": "require"})
        return self

    def endpoints(self) -> list[tuple[str, int]]:
        """(host, port) of every entry of ``host``, in order."""
        out = []
        for entry in self.host.split(","):
            found = _ENDPOINT.fullmatch(entry.strip())
            assert found is not None  # checked by _check_hosts
            out.append((found["v6"] or found["host"], int(found["port"] or self.port)))
        return out

    @property
    def where(self) -> str:
        """The server(s) for messages: ``pg-a:5432`` or ``pg-a:5432,pg-b:5433``."""
        return ",".join(f"{h}:{p}" for h, p in self.endpoints())

    @property
    def session_attrs(self) -> str:
        """target_session_attrs as sent: as set, else read-write with several hosts (always the primary)."""
        return self.target_session_attrs or ("read-write" if len(self.endpoints()) > 1 else "")

    def conninfo(self, **extra: str) -> str:
        """The libpq connection string; the password is included, so never log it."""
        from psycopg.conninfo import make_conninfo

        endpoints = self.endpoints()
        params: dict[str, Any] = {
            "host": ",".join(h for h, _ in endpoints),
            "port": ",".join(str(p) for _, p in endpoints),
            "dbname": self.name,
            "user": self.user,
            "sslmode": self.ssl_mode,
            "application_name": "wal-listener",
            "connect_timeout": 10,
        }
        if self.password.get_secret_value():
            params["password"] = self.password.get_secret_value()
        for key, path in (("sslrootcert", self.ssl_root_cert), ("sslcert", self.ssl_cert), ("sslkey", self.ssl_key)):
            if path:
                params[key] = path
        if self.session_attrs:
            params["target_session_attrs"] = self.session_attrs
        params.update(extra)
        return make_conninfo(**params)


class CloudEventsConfig(_Model):
    """How events are written when publisher.format is cloudevents (CloudEvents 1.0, JSON)."""

    mode: Literal["binary", "structured"] = Field(
        "binary",
        description="binary: the event as the body, CloudEvents attributes in headers (ce- on NATS, Pub/Sub; ce_ on "
        "Kafka; cloudEvents_ on RabbitMQ); structured: one application/cloudevents+json body.",
    )
    source: str = Field(
        "", description="The CloudEvents source attribute; empty: //<first database host>/<database name>."
    )

    @field_validator("source")
    @classmethod
    def _check_source(cls, value: str) -> str:
        if any(c in value for c in "\r\n"):
            raise ValueError("must be one line (a URI reference such as //pg-a/shop)")
        return value


class DebeziumConfig(_Model):
    """How events are written when publisher.format is debezium."""

    schemas: bool = Field(
        False,
        description="Write key and value as Debezium's JSON converter does with schemas.enable=true: "
        '{"schema": {...}, "payload": {...}}, the schema naming each field\'s type, whether it is optional and its '
        "logical type (io.debezium.time.MicroTimestamp, ...), for Kafka Connect sinks that need schemas (JDBC sink). "
        "The key carries its schema on Kafka only (elsewhere the key orders messages and stays the plain key).",
    )


#: publisher.format: the shape of the published events
EventFormat = Literal["wal-listener", "cloudevents", "debezium"]


class PublisherSettings(_Model):
    """What every broker shares: the type, how topic names are made, and the format of the events."""

    type: PublisherType = Field(description="The broker: nats, kafka, rabbitmq or google_pubsub.")
    topic: str = Field(
        min_length=1, description="NATS stream / RabbitMQ exchange, and the first part of every topic name."
    )
    topic_prefix: str = Field("", description="Put before schema_table in every topic name.")
    message_key_from: str = Field(
        "",
        description="Column whose value is the message key (default: the row key); for MESSAGE events, a field of "
        "the JSON content (default: the prefix).",
    )
    format: EventFormat = Field(
        "wal-listener",
        description="Event format: wal-listener (the Go original's event), cloudevents (CloudEvents 1.0 around it) "
        "or debezium (Debezium's JSON envelope; with its schemas: publisher.debezium.schemas).",
    )
    cloud_events: CloudEventsConfig = Field(
        default_factory=lambda: CloudEventsConfig(),
        description="CloudEvents mode and source (publisher.format cloudevents)."
    )
    debezium: DebeziumConfig = Field(
        default_factory=lambda: DebeziumConfig(),
        description="Debezium's JSON converter settings (publisher.format debezium)."
    )

    @field_validator("topic")
    @classmethod
    def _check_topic(cls, value: str) -> str:
        if any(c.isspace() for c in value) or value.startswith(".") or value.endswith("."):
            raise ValueError("must be a name without spaces and without a leading or trailing dot")
        return value

    @model_validator(mode="after")
    def _schemas_need_debezium(self) -> PublisherSettings:
        if self.debezium.schemas and self.format != "debezium":
            raise ValueError(
                f"publisher.debezium.schemas is true but publisher.format is {self.format}; "
                "set publisher.format: debezium or leave publisher.debezium out"
            )
        return self

    def secret_values(self) -> list[str]:
        """The secrets of this block (kept out of logs and /ready)."""
        return []


class BrokerConnection(_Model):
    """Address, TLS switch and user of NATS, Kafka and RabbitMQ (the parts a WalListener spec sets as is)."""

    address: str = Field(min_length=1, description="Broker address (NATS URL, Kafka bootstrap servers, AMQP URL).")
    enable_tls: bool = Field(False, alias="enableTLS", description="Connect to the broker over TLS.")
    username: str = Field("", description="Broker user (Kafka SASL, NATS, RabbitMQ when not in the address).")


class BrokerSecrets(_Model):
    """The password and the TLS files of NATS, Kafka and RabbitMQ (a WalListener takes them from Secrets)."""

    password: SecretStr = Field(
        SecretStr(""), description="Broker password (NATS, Kafka SASL, RabbitMQ); better set as WAL_PUBLISHER_PASSWORD."
    )
    client_cert: str = Field("", description="Client certificate file (TLS client authentication).")
    client_key: str = Field("", description="Private key file of clientCert.")
    ca_cert: str = Field("", description="File of CA certificates to verify the broker.")


class NatsSettings(BrokerConnection):
    """NATS JetStream: the stream is publisher.topic."""

    duplicate_window: Duration = Field(timedelta(minutes=2), description="JetStream de-duplication window.")


class KafkaSettings(BrokerConnection):
    """Kafka: address is the bootstrap server list."""

    sasl_mechanism: Literal["", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "", description="Kafka SASL mechanism; empty: no SASL."
    )
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "none", description="Kafka batch compression."
    )
    linger_ms: int = Field(5, ge=0, description="How long a batch may wait to fill up, ms.")
    max_batch_bytes: int = Field(1048576, ge=1024, description="Largest Kafka produce batch per partition, bytes.")
    idempotent: bool = Field(True, description="Kafka idempotent producer (turn off for brokers without it).")
    partitions: int = Field(1, ge=1, description="Partitions of topics the listener creates (createTopics).")
    replication_factor: int = Field(1, ge=1, description="Replication factor of topics the listener creates.")
    create_topics: bool = Field(False, description="Create missing topics.")
    tombstones: bool | None = Field(
        None,
        description="After each DELETE, a record with the same key and a null value on the same partition (a "
        "tombstone: log compaction then forgets the row). Default: on with format debezium (as Debezium does), "
        "else off.",
    )


class RabbitMQSettings(BrokerConnection):
    """RabbitMQ: the exchange is publisher.topic; keep credentials out of the address."""

    exchange_kind: Literal["topic", "fanout", "direct", "headers"] = Field(
        "topic", description="Kind of the RabbitMQ exchange declared as publisher.topic."
    )


class GooglePubSubSettings(_Model):
    """Google Pub/Sub."""

    address: str = Field(
        "", description="Endpoint host:port; empty: Google's (or PUBSUB_EMULATOR_HOST when it is set)."
    )
    pub_sub_project_id: str = Field(min_length=1, alias="pubSubProjectID", description="Google Cloud project id.")
    enable_ordering: bool = Field(False, description="Pub/Sub ordering keys (one per table and row key).")
    linger_ms: int = Field(
        5, ge=0, description="Accepted for older configs, not used: each batch goes out at once."
    )
    create_topics: bool = Field(False, description="Create missing topics.")


class _WithBrokerSecrets(BrokerSecrets):
    def secret_values(self) -> list[str]:
        return [self.password.get_secret_value()]


class NatsPublisherConfig(_WithBrokerSecrets, NatsSettings, PublisherSettings):
    type: Literal[PublisherType.NATS] = Field(description="nats")


class KafkaPublisherConfig(_WithBrokerSecrets, KafkaSettings, PublisherSettings):
    type: Literal[PublisherType.KAFKA] = Field(description="kafka")

    @property
    def writes_tombstones(self) -> bool:
        """``tombstones`` as set, else on for the Debezium format."""
        return self.format == "debezium" if self.tombstones is None else self.tombstones


class RabbitMQPublisherConfig(_WithBrokerSecrets, RabbitMQSettings, PublisherSettings):
    type: Literal[PublisherType.RABBITMQ] = Field(description="rabbitmq")


class GooglePubSubPublisherConfig(GooglePubSubSettings, PublisherSettings):
    type: Literal[PublisherType.GOOGLE_PUBSUB] = Field(description="google_pubsub")


#: the ``publisher`` section: one model per broker, chosen by ``type``; a key of another broker is not
#: required (and not accepted: the loader drops it with a warning)
PublisherConfig = Annotated[
    NatsPublisherConfig | KafkaPublisherConfig | RabbitMQPublisherConfig | GooglePubSubPublisherConfig,
    Field(discriminator="type"),
]
_PUBLISHER_ADAPTER: TypeAdapter[PublisherConfig] = TypeAdapter(PublisherConfig, config=ConfigDict(defer_build=True))


def parse_publisher(data: Mapping[str, Any]) -> PublisherConfig:
    """A ``publisher`` section on its own (the model its ``type`` names); raises pydantic's ValidationError."""
    return _PUBLISHER_ADAPTER.validate_python(data)


#: publisher.type -> its model
PUBLISHER_MODELS: dict[PublisherType, type[PublisherSettings]] = {
    PublisherType.NATS: NatsPublisherConfig,
    PublisherType.KAFKA: KafkaPublisherConfig,
    PublisherType.RABBITMQ: RabbitMQPublisherConfig,
    PublisherType.GOOGLE_PUBSUB: GooglePubSubPublisherConfig,
}
#: a publisher with a password and TLS files
TLSPublisherConfig = NatsPublisherConfig | KafkaPublisherConfig | RabbitMQPublisherConfig


class LoggerConfig(_Model):
    level: Literal["debug", "info", "warn", "warning", "error"] = Field("info", description="Lowest level logged.")
    fmt: Literal["json", "text"] = Field("json", description="json: one JSON object per line; text: for people.")

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class MonitoringConfig(_Model):
    sentry_dsn: SecretStr = Field(
        SecretStr(""), alias="sentryDSN", description="Sentry DSN: error-level logs and crashes go to Sentry when set."
    )
    prom_addr: str = Field(":2112", description="host:port of /metrics; empty turns it off.")

    @field_validator("prom_addr")
    @classmethod
    def _check_addr(cls, value: str) -> str:
        if value and not re.fullmatch(r"[^:\s]*:\d{1,5}", value):
            raise ValueError("must be host:port or :port, e.g. :2112")
        return value


class Config(_Model):
    """The whole listener configuration (one slot, one database, one broker)."""

    listener: ListenerConfig
    database: DatabaseConfig
    publisher: PublisherConfig
    logger: LoggerConfig = Field(default_factory=lambda: LoggerConfig())
    monitoring: MonitoringConfig = Field(default_factory=lambda: MonitoringConfig())

    @model_validator(mode="after")
    def _schema_events_format(self) -> Config:
        if self.listener.schema_events and self.publisher.format == "debezium":
            raise ValueError(
                "listener.schemaEvents is true but publisher.format is debezium: Debezium's records have no SCHEMA "
                "event (a consumer of them expects none); set one of them otherwise"
            )
        return self

    def secret_values(self) -> list[str]:
        """Every secret of the config that is set (passwords, the Sentry DSN, the transforms' hash key)."""
        found = [self.database.password.get_secret_value(), *self.publisher.secret_values(),
                 self.listener.transforms_hash_key.get_secret_value()]
        found.append(self.monitoring.sentry_dsn.get_secret_value())
        return [value for value in found if value]

    def to_yaml_dict(self, *, include_secrets: bool = False, only_set: bool = False) -> dict[str, Any]:
        """The config as the file would write it (camelCase keys); secrets are left out unless asked.
        ``only_set`` leaves out keys that have their default value."""
        data = self.model_dump(mode="json", by_alias=True, exclude_defaults=only_set)
        for section in ("listener", "database", "publisher", "monitoring"):
            data.setdefault(section, {})
        if include_secrets:
            if self.listener.transforms_hash_key.get_secret_value():
                data["listener"]["transformsHashKey"] = self.listener.transforms_hash_key.get_secret_value()
            else:
                data["listener"].pop("transformsHashKey", None)
            data["database"]["password"] = self.database.password.get_secret_value()
            if isinstance(self.publisher, BrokerSecrets):
                data["publisher"]["password"] = self.publisher.password.get_secret_value()
            data["monitoring"]["sentryDSN"] = self.monitoring.sentry_dsn.get_secret_value()
        else:
            data["listener"].pop("transformsHashKey", None)
            data["database"].pop("password", None)
            data["publisher"].pop("password", None)
            data["monitoring"].pop("sentryDSN", None)
        if only_set:
            data = {k: v for k, v in data.items() if v}
        return data


# --------------------------------------------------------------------------------------------------
# loading

_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s,]*):[^@/\s,]*@")


_NATS_TOKEN = re.compile(r"(?P<head>\b(?:nats|tls)://)(?P<token>[^:/@\s,]+)@")


def redact_url(text: str) -> str:
    """Mask the password of every ``scheme://user:password@host`` (and the token of ``nats://token@host``)
    in ``text``: broker addresses may carry credentials; they must not reach logs, /ready or Sentry."""
    return _NATS_TOKEN.sub(r"\g<head>***@", _URL_PASSWORD.sub(r"\g<head>:***@", text))


def url_passwords(text: str) -> list[str]:
    """The passwords (and NATS tokens) embedded in the URLs of ``text``, as written and URL-decoded."""
    from urllib.parse import unquote

    found = [m.group(0)[len(m.group("head")) + 1 : -1] for m in _URL_PASSWORD.finditer(text)]
    found += [m.group("token") for m in _NATS_TOKEN.finditer(text)]
    return sorted({form for secret in found for form in (secret, unquote(secret)) if secret})


# fields whose keys are user data (table names), not config keys
_FREE_FORM = {"tables", "topicsMap", "transforms"}
SECRET_KEYS = {"password", "sentryDSN", "transformsHashKey"}


def _norm(key: str) -> str:
    return key.replace("_", "").replace("-", "").lower()


Section = tuple[type[BaseModel], ...]  # a section's model, or the models of a union (publisher)


def _submodel(model: Section, alias: str) -> Section | None:
    """The model(s) of the section ``alias`` of ``model``: one, or each member of a union."""
    for member in model:
        for name, field in member.model_fields.items():
            if (field.alias or name) == alias:
                ann = field.annotation
                if isinstance(ann, type) and issubclass(ann, BaseModel):
                    return (ann,)
                options = tuple(a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel))
                return options or None
    return None


def _aliases(model: Section) -> dict[str, str]:
    return {
        _norm(field.alias or name): field.alias or name for m in model for name, field in m.model_fields.items()
    }


def canonicalize(
    raw: Mapping[str, Any], model: Section = (Config,), path: str = ""
) -> tuple[dict[str, Any], list[str]]:
    """Map keys onto the model's aliases case-insensitively; return the result and unknown-key warnings."""
    known = _aliases(model)
    out: dict[str, Any] = {}
    warnings: list[str] = []
    for key, value in raw.items():
        skey = str(key)
        alias = known.get(_norm(skey))
        where = f"{path}{skey}"
        if alias is None:
            import difflib  # only for a key that is not known

            hint = difflib.get_close_matches(skey, list(known.values()), n=1, cutoff=0.6)
            suggestion = f"; did you mean {path}{hint[0]}?" if hint else ""
            warnings.append(f"config: unknown key {where} is ignored{suggestion}")
            continue
        sub = _submodel(model, alias)
        if sub is not None and isinstance(value, Mapping):
            value, sub_warnings = canonicalize(value, sub, f"{path}{alias}.")
            warnings.extend(sub_warnings)
        out[alias] = value
    return out, warnings


def _leaf_paths(model: Section, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = []
    for alias in dict.fromkeys(_aliases(model).values()):
        sub = _submodel(model, alias)
        if sub is not None and alias not in _FREE_FORM:
            paths.append((*prefix, alias))  # a whole section as YAML, e.g. WAL_LISTENER_FILTER
            paths.extend(_leaf_paths(sub, (*prefix, alias)))
        else:
            paths.append((*prefix, alias))
    return paths


def _only_the_brokers_keys(data: dict[str, Any]) -> list[str]:
    """Drop publisher keys that belong to another broker than publisher.type (a config written for several
    brokers, or the Go original's shared keys, still loads); one warning per key dropped."""
    section = data.get("publisher")
    if not isinstance(section, dict):
        return []
    try:
        kind = PublisherType(str(section.get("type", "")).lower())
    except ValueError:
        return []  # an unknown or missing type is reported by the validation
    own = set(_aliases((PUBLISHER_MODELS[kind],)).values())
    warnings = []
    for key in [k for k in section if k not in own]:
        warnings.append(f"config: publisher.{key} does nothing for publisher.type {kind.value}; ignored")
        del section[key]
    return warnings


def env_names(path: tuple[str, ...]) -> list[str]:
    """The environment variables that override one key: ``WAL_DATABASE_PORT``, ``WAL_LISTENER_SLOTNAME``
    (as Viper spelled them) and the snake-case form ``WAL_LISTENER_SLOT_NAME``."""
    plain = ENV_PREFIX + "_".join(p.upper() for p in path)
    snake = ENV_PREFIX + "_".join(re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", p).upper() for p in path)
    return [plain] if plain == snake else [plain, snake]


def _is_text(path: tuple[str, ...]) -> bool:
    """Whether the key at ``path`` holds plain text (an IPv6 ``[::1]:5432`` host is no YAML list)."""
    models: Section = (Config,)
    for part in path[:-1]:
        sub = _submodel(models, part)
        if sub is None:
            return False
        models = sub
    return any(
        (f.alias or n) == path[-1] and f.annotation in (str, SecretStr)
        for m in models for n, f in m.model_fields.items()
    )


def _env_value(text: str, path: tuple[str, ...]) -> Any:
    if _is_text(path):
        return text
    if path[-1] in _FREE_FORM or path[-1] in ("filter", "tables") or text.lstrip().startswith(("{", "[")):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or "malformed YAML"
            raise ConfigError(f"config: {ENV_PREFIX}{'_'.join(path).upper()} is not valid YAML: {problem}") from None
    return text


def apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Overlay ``WAL_*`` variables onto the file's data, also for keys the file does not have."""
    if not any(name.startswith(ENV_PREFIX) for name in environ):
        return data  # the usual case with a config file: no key's names to make and look up
    for path in _leaf_paths((Config,)):
        for name in env_names(path):
            if name in environ:
                node = data
                for part in path[:-1]:
                    child = node.get(part)
                    if not isinstance(child, dict):
                        child = {}
                        node[part] = child
                    node = child
                node[path[-1]] = _env_value(environ[name], path)
                break
    return data


def _mask(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: ("***" if _norm(str(k)) in {_norm(s) for s in SECRET_KEYS} else _mask(v)) for k, v in value.items()}
    return value


def _describe(value: Any, key: str) -> str:
    if _norm(key.split(".")[-1]) in {_norm(s) for s in SECRET_KEYS}:
        return "'***'"
    text = repr(_mask(value))
    return text if len(text) <= 80 else text[:77] + "...'"


def _format_errors(exc: ValidationError) -> list[str]:
    """One line per key that is wrong (pydantic may report several errors for one key: the first counts)."""
    lines: dict[tuple[str, ...], str] = {}
    for err in exc.errors(include_url=False):
        loc = tuple(str(p) for p in err["loc"])
        if loc[:1] == ("publisher",) and len(loc) > 1 and loc[1] in PublisherType._value2member_map_:
            loc = loc[:1] + loc[2:]  # the union's tag
        lines.setdefault(loc, _format_error(err, loc))
    return list(dict.fromkeys(lines.values()))


def _format_error(err: Any, loc: tuple[str, ...]) -> str:
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        allowed = ", ".join(t.value for t in PublisherType)
        if err["type"] == "union_tag_not_found":
            return f"config: publisher.type is required but missing; set it to one of {allowed}"
        value = _describe(err.get("input", {}).get("type") if isinstance(err.get("input"), dict) else None, "type")
        return f"config: publisher.type = {value} is not allowed; use one of {allowed}"
    key = ".".join(loc)
    msg = str(err["msg"]).removeprefix("Value error, ")
    etype = err["type"]
    if etype == "missing":
        return f"config: {key} is required but missing; set it in the file or as {env_names(loc)[0]}"
    if etype == "value_error" and msg.startswith(("listener.", "database.", "publisher.", "logger.", "monitoring.")):
        return f"config: {msg}"  # a rule over several keys; the message names them
    value = _describe(err.get("input"), key)
    if etype in ("enum", "literal_error"):
        expected = err.get("ctx", {}).get("expected", "")
        return f"config: {key} = {value} is not allowed; use one of {expected}"
    if etype == "extra_forbidden":
        return f"config: unknown key {key}"
    return f"config: {key} = {value} is invalid: {msg}"


def load_config(
    path: str | os.PathLike[str] | None,
    environ: Mapping[str, str] | None = None,
    warnings: list[str] | None = None,
) -> Config:
    """Read ``path`` (may be ``None`` for environment-only config), apply overrides, validate.

    Raises :class:`ConfigError` with one line per problem (every wrong key, not only the first); unknown
    keys are appended to ``warnings``.
    """
    env = os.environ if environ is None else environ
    raw: Any = {}
    if path is not None:
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:  # a binary or wrongly encoded file was a traceback before
            raise ConfigError(
                f"config: {str(file)!r} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
            ) from None
        except FileNotFoundError:
            raise ConfigError(
                f"config: file {str(file)!r} not found; pass --config PATH (see config_example.yml)"
            ) from None
        except OSError as exc:
            raise ConfigError(f"config: cannot read {str(file)!r}: {exc.strerror}") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or "malformed YAML"
            raise ConfigError(f"config: {str(file)!r} is not valid YAML{where}: {problem}") from None
        except RecursionError:  # thousands of nested [ or { were a traceback before
            raise ConfigError(f"config: {str(file)!r} is nested too deeply to be a config file") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config: {str(file)!r} must hold a mapping of sections (listener, database, ...)")
    data, unknown = canonicalize(raw)
    not_mappings = [
        f"config: {section} = {_describe(data[section], section)} is invalid: must be a mapping of keys"
        for section in ("listener", "database", "publisher", "logger", "monitoring")
        if section in data and data[section] is not None and not isinstance(data[section], dict)
    ]
    if not_mappings:
        raise ConfigError("\n".join(not_mappings))
    data, _ = canonicalize(apply_env(data, env))
    unknown.extend(_only_the_brokers_keys(data))
    if warnings is not None:
        warnings.extend(unknown)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        lines = _format_errors(exc)
        # a misspelt key behind an error would otherwise only be in the warnings, which a failed start
        # never shows (listener.slotNme -> "listener.slotName is required")
        for found in (_DID_YOU_MEAN.fullmatch(w) for w in unknown):
            for i, line in enumerate(lines):
                if found and f" {found['meant']} " in f" {line} ":
                    lines[i] = f"{line} (the file has {found['key']}: did you mean {found['meant']}?)"
        raise ConfigError("\n".join(lines)) from None


_DID_YOU_MEAN = re.compile(r"config: unknown key (?P<key>\S+) is ignored; did you mean (?P<meant>\S+)\?")
