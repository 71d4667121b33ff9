"""Stage 6 — event: turn a decoded change into the published event and its wire message.

The event keeps the Go original's field names::

    {"id", "schema", "table", "action", "data", "dataOld", "commitTime"}

``id`` is deterministic: it is built from the slot name, the transaction's commit LSN and the
change's ordinal in the transaction (counting every change, filtered or not), so a change replayed
after a crash carries the id it had the first time and brokers can drop the duplicate.
An unchanged TOASTed column is left out of ``data`` (or taken from ``dataOld`` when the table has
REPLICA IDENTITY FULL) — it is never published as null.

Logical decoding messages with a listed prefix become MESSAGE events. ``publisher.format`` other than the
default reshapes every event through :mod:`listener.formats`. On Kafka with ``publisher.tombstones`` a DELETE's
message is marked to be followed by a tombstone (:attr:`Message.tombstone`), whichever path built it. A
table's transform (:mod:`listener.transforms`) is applied to its rows before anything is converted: the
event stage only ever sees the kept columns, masked, and takes the topic and key the transform gives.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import struct
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from listener import hotpath, metrics, pgoutput
from listener.catalog import ColumnFacts
from listener.config import INTERNAL_MESSAGE_PREFIXES, Config, KafkaPublisherConfig
from listener.errors import DecodeError
from listener.filter import TableFilter
from listener.formats import (
    CE_HEADERS,
    Binding,
    Change,
    CloudEvents,
    CompiledCloudEvents,
    Debezium,
    DebeziumTable,
    debezium_converter,
    default_source,
    message_body,
    message_key,
    moment_micros,
)
from listener.message import HeadedMessage, Message
from listener.pgoutput import PG_EPOCH, UNCHANGED, Relation, Tuple
from listener.transforms import FALLBACK_REASONS, RelationTransform, Route, Transforms
from listener.types import Converter, TypeRegistry

log = logging.getLogger("listener.event")

_U32 = struct.Struct(">I").unpack_from
#: pgoutput change message tag -> the event's action (the messages :meth:`EventBuilder.change` takes)
CHANGE_ACTIONS = {0x49: "INSERT", 0x55: "UPDATE", 0x44: "DELETE"}


def event_id_parts(slot_hash: int, commit_lsn: int) -> tuple[str, int]:
    """What all ids of one transaction share: the text up to the last group, and that group's LSN bits."""
    lsn_hi = commit_lsn >> 48
    lsn_mid = (commit_lsn >> 36) & 0xFFF
    lsn_lo = (commit_lsn >> 22) & 0x3FFF
    lsn_tail = commit_lsn & 0x3FFFFF
    return f"{slot_hash:08x}-{lsn_hi:04x}-{0x8000 | lsn_mid:04x}-{0x8000 | lsn_lo:04x}-", lsn_tail << 26


def event_id(slot_hash: int, commit_lsn: int, ordinal: int) -> str:
    """A UUID (version 8, RFC 9562) that packs a 32-bit slot hash, the 64-bit LSN and a 26-bit ordinal."""
    prefix, base = event_id_parts(slot_hash, commit_lsn)
    return f"{prefix}{base | (ordinal & 0x3FFFFFF):012x}"


def read_event_ids(
    slot: str, backfill: int, schema: str, table: str, secret: bytes = b""
) -> Callable[[Sequence[str | None]], str]:
    """The ids of the rows a backfill reads from one table (READ events): row key -> a UUID (version 8)
    hashed (BLAKE2b) from the slot, the backfill, the table and the key, so a chunk sent again after a
    crash has the ids it had. ``secret`` keys the hash (a table whose transform masks or leaves out a key
    column: its ids must not let anyone test guesses of the key)."""
    key, data = read_id_seed(slot, backfill, schema, table, secret)
    base = hashlib.blake2b(data, digest_size=16, key=key)

    def ident(key: Sequence[str | None]) -> str:
        h = base.copy()
        if len(key) == 1 and key[0] is not None:
            h.update(f"\x00{key[0]}".encode())
        else:
            h.update("".join("\x00\x01" if k is None else f"\x00{k}" for k in key).encode())
        return hashed_uuid(h.hexdigest())

    return ident


def read_id_seed(slot: str, backfill: int, schema: str, table: str, secret: bytes = b"") -> tuple[bytes, bytes]:
    """What every READ id of one table's backfill starts from: BLAKE2b's key (b"": unkeyed) and the data
    hashed before the row's key (see :func:`read_event_ids`; the compiled read_page prepares the same)."""
    key = hashlib.sha256(secret).digest() if secret else b""
    return key, "\x00".join([slot, str(backfill), schema, table]).encode()


#: a backfilled row's key as the stream's decoded tuples give it (str; None for NULL)
RowKey = tuple[str | None, ...]
#: the compiled read_page's answer: events, keys (None: that row is the Python path's), value bytes, largest row
PageRead = tuple[list[Message | None], list[RowKey | None], int, int]
#: EventBuilder.page_reader's: (result_ptr, ids, key_index, read_time) -> PageRead
PageReader = Callable[[int, bytes, tuple[int, ...], str], PageRead]


#: the fields of Message, in order, that read_page sets without calling the class (those after the first seven:
#: their defaults)
_MESSAGE_FIELDS = ("id", "subject", "body", "schema", "table", "action", "key", "headers", "content_type", "tombstone",
                   "header_lines", "head")


@functools.cache
def _message_slots() -> tuple[tuple[Any, ...] | None, tuple[Any, ...] | None]:
    """For read_page: the member descriptors of Message's fields and the defaults of those it does not set from
    the row, so that it fills each event's slots directly; (None, None) — it calls the class, about twice as
    slow — when Message is no longer shaped so (a field added to Message belongs in _MESSAGE_FIELDS)."""
    found = dataclasses.fields(Message)
    if tuple(f.name for f in found) != _MESSAGE_FIELDS or not hasattr(Message, "__slots__"):
        return None, None
    return tuple(Message.__dict__[name] for name in _MESSAGE_FIELDS), tuple(f.default for f in found[7:])


def _change_shape(info: RelationInfo, content_type: str | None = None) -> hotpath.MessageShape | None:
    """For the compiled event() and debezium_event(): what the table's change events share, so that they come back
    made as Messages (or, with Debezium's schemas, HeadedMessages of the table's schema head); None: they come
    back as tuples and ``info.make`` makes them (CloudEvents, or Message shaped otherwise). With a topic route the
    subject is the topic each change's values give. ``content_type``: for a CloudEvents table, the content type
    of its events, for the compiled change() (which makes them from event()'s tuples); None for any other."""
    fields, defaults = _message_slots()
    if fields is None or defaults is None or (info.ce is not None) != (content_type is not None):
        return None
    cls: type[Message] = Message
    if content_type is not None:  # headers, content_type, ... (_MESSAGE_FIELDS)
        defaults = (defaults[0], content_type, *defaults[2:])
    if info.debezium_plan is not None and info.debezium_plan[5] is not None:
        cls, defaults = HeadedMessage, (*defaults[:-1], info.debezium_plan[5])
    return cls, info.subject, info.schema, info.table, _ACTIONS, fields, defaults


#: the actions of change events in the order the compiled path picks them by the message's tag (I, U, D)
_ACTIONS = (CHANGE_ACTIONS[0x49], CHANGE_ACTIONS[0x55], CHANGE_ACTIONS[0x44])
#: how hot_change is told which actions of a table are published
_ACTION_BITS = {"INSERT": 1, "UPDATE": 2, "DELETE": 4}


def hashed_uuid(hexed: str) -> str:
    """A UUID (version 8, RFC 9562 variant) made of a 128-bit hash in hex."""
    return f"{hexed[:8]}-{hexed[8:12]}-8{hexed[13:16]}-{_VARIANT[hexed[16]]}{hexed[17:20]}-{hexed[20:]}"


#: the first hex digit of the variant group: its top two bits set to 10
_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def now_text() -> str:
    """Now as an event's ``commitTime`` is written (RFC 3339, UTC, microseconds)."""
    moment = datetime.now(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond:06d}Z"


def slot_hash(slot_name: str) -> int:
    return zlib.crc32(slot_name.encode())


def commit_time_text(micros: int) -> str:
    """Protocol commit timestamp -> RFC 3339 UTC with microseconds (``2026-01-02T03:04:05.123456Z``)."""
    moment = PG_EPOCH + timedelta(microseconds=micros)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond:06d}Z"


@dataclass(slots=True)
class RelationInfo:
    """Everything the hot path needs about one table, computed once per Relation message."""

    oid: int
    schema: str
    table: str
    names: tuple[str, ...]
    converters: tuple[Converter | None, ...]
    conversions: tuple[tuple[int, str, Converter], ...]  # (index, name, converter) of columns not left as text
    key_index: tuple[int, ...]  # columns of the message key (replica identity or messageKeyFrom)
    identity_index: tuple[int, ...]  # the replica identity's columns (an old 'K' tuple holds only these)
    full_identity: bool
    actions: frozenset[str]
    subject: str  # with a route: the topic of events the route gives none (counted)
    plan: hotpath.Plan | None = None  # for the compiled fast path, when it is loaded
    #: publisher.format cloudevents: what the compiled path takes to wrap the table's events (with plan)
    ce: CompiledCloudEvents | None = None
    ce_lines: bool = False  # its binary mode's attributes come as Message.header_lines (formats.Binding.lines)
    debezium: DebeziumTable | None = None  # publisher.format debezium: what its events share (schemas...)
    debezium_plan: hotpath.DebeziumPlan | None = None  # its compiled path's plan (a table without a transform)
    #: makes the compiled path's events, called as Message is: Message, or with publisher.debezium.schemas a
    #: HeadedMessage of the table's schema head (the plan's value_head) and what the compiled path wrote after it
    make: Callable[..., Message] = Message
    #: what the compiled path takes to make the table's change events itself (_change_shape; None: make makes them);
    #: EventBuilder.change_rest uses it only without a topic route
    shape: hotpath.MessageShape | None = None
    #: the table's transform (None: no entry of listener.transforms names it); names, converters and the
    #: indexes above are then those of the columns it keeps
    transform: RelationTransform | None = None
    route: Route | None = None  # the transform's topic template
    #: with a route: transform_fallbacks_total's count per reason (FALLBACK_REASONS), taken at its first fallback
    fallbacks: list[list[int] | None] = field(default_factory=lambda: [None] * len(FALLBACK_REASONS))


@dataclass(slots=True)
class Transaction:
    """The transaction being read: its identity in the WAL and how many changes it had so far."""

    final_lsn: int
    commit_time: str
    ordinal: int = 0
    id_prefix: str = ""  # filled by EventBuilder.begin: see event_id_parts
    id_base: int = 0
    xid: int | None = None
    commit_micros: int = 0  # protocol commit time (microseconds since 2000-01-01)
    lsn: int | None = None  # the current change's own LSN, kept only when EventBuilder.wants_lsn


#: the slots of Transaction the compiled change() reads (ordinal: and counts up)
_TRANSACTION_FIELDS = tuple(Transaction.__dict__[name] for name in (
    "ordinal", "id_prefix", "id_base", "commit_time", "commit_micros", "xid", "lsn"))


class EventBuilder:
    """Builds :class:`Message` objects from decoded changes, applying the filter and topic naming."""

    def __init__(
        self, cfg: Config, registry: TypeRegistry, *, needs_key: bool, compiled: bool = True,
        binding: Binding = CE_HEADERS,
    ) -> None:
        """``binding``: how the broker carries CloudEvents attributes (publisher.format cloudevents)."""
        self._slot_hash = slot_hash(cfg.listener.slot_name)
        self._filter = TableFilter(cfg.listener.filter)
        self._topics_map = cfg.listener.topics_map
        self._topic = cfg.publisher.topic
        self._prefix = cfg.publisher.topic_prefix
        self._key_from = cfg.publisher.message_key_from
        self._needs_key = needs_key
        self._registry = registry
        self._message_prefixes = frozenset(cfg.listener.messages.prefixes)
        self.relations: dict[int, RelationInfo] = {}
        self._bad_columns: set[tuple[str, str]] = set()
        fmt = cfg.publisher.format
        #: Debezium's envelope and conversions (publisher.format debezium): built in Python from the values
        self._debezium = Debezium(cfg) if fmt == "debezium" else None
        #: applied to every finished message (publisher.format cloudevents)
        self._finish: CloudEvents | None = None
        if fmt == "cloudevents":
            ce = cfg.publisher.cloud_events
            self._finish = CloudEvents(ce, ce.source or default_source(cfg), binding)
        #: the reader sets Transaction.lsn before each change (Debezium's source.lsn)
        self.wants_lsn = self._debezium is not None
        #: relation_info wants the columns' catalog facts (NOT NULL, enum labels) for Debezium's schemas
        self.wants_column_facts = self._debezium is not None and self._debezium.schemas
        #: a DELETE is followed by a tombstone (Kafka, publisher.tombstones)
        self._tombstones = isinstance(cfg.publisher, KafkaPublisherConfig) and cfg.publisher.writes_tombstones
        #: the compiled fast path (None: pure Python)
        self.hot = hotpath.load() if compiled else None
        #: Begin messages decoded and their shared parts written in one compiled call (every format)
        self._begin_hot = self.hot.begin if self.hot is not None else None
        #: a change of a table in :attr:`compiled` made a Message in one compiled call (the reader calls it first)
        self.hot_change = None if self.hot is None else self.hot.change
        #: what hot_change takes per table, by relation oid (see _compiled_table)
        self.compiled: dict[int, hotpath.CompiledTable] = {}
        if self.hot is not None:
            self.hot.transaction_fields(_TRANSACTION_FIELDS)
        #: a backfill chunk's read time and its protocol microseconds (Debezium's READ events, compiled)
        self._read_moment: tuple[str, int] = ("", 0)
        #: listener.transforms: columns left out, masks, topics and keys per table
        self.transforms = Transforms(cfg.listener, f"{self._topic}.{self._prefix}")
        self._hmac = self.hot.hmac_prepare(self.transforms.hash_key) if self.hot and self.transforms.hash_key else None
        self._keys_warned: set[tuple[str, str]] = set()

    @property
    def debezium(self) -> Debezium | None:
        """publisher.format debezium: what its events share (the last commit's LSN, which hot_change reads)."""
        return self._debezium

    def subject(self, schema: str, table: str) -> str:
        return self._subject(f"{schema}_{table}")

    def _subject(self, name: str) -> str:
        return f"{self._topic}.{self._prefix}{self._topics_map.get(name, name)}"

    def add_relation(
        self, rel: Relation, primary_key: tuple[str, ...] = (), facts: Mapping[str, ColumnFacts] | None = None
    ) -> RelationInfo:
        """Register a table of the stream (see :meth:`relation_info`)."""
        info = self.relation_info(rel, primary_key, facts)
        self.relations[rel.oid] = info
        compiled = self._compiled_table(info)
        if compiled is None:
            self.compiled.pop(rel.oid, None)
        else:
            self.compiled[rel.oid] = compiled
        return info

    def _compiled_table(self, info: RelationInfo) -> hotpath.CompiledTable | None:
        """For hot_change: (debezium, plan, shape, the actions published as bits, tombstones, want_key, routed, ce),
        when the compiled path makes the table's change events whole; else None. routed: with a topic route, (the
        table's fallback counts, its subject, what counts a reason not counted yet (:meth:`_routed`)): a fallback
        adds to its reason's count in place once the count exists. ce: the table's compiled CloudEvents
        (publisher.format cloudevents), whose shape carries their content type."""
        shape = info.shape
        if self._finish is not None:  # CloudEvents: made whole where the compiled path wraps them
            shape = None if info.ce is None else _change_shape(info, self._finish.content_type)
        if shape is None:
            return None
        bits = sum(bit for action, bit in _ACTION_BITS.items() if action in info.actions)
        routed = None if info.route is None else (info.fallbacks, info.subject, functools.partial(self._routed, info))
        if info.debezium_plan is not None:
            return True, info.debezium_plan, shape, bits, self._tombstones, self._needs_key, routed, None
        if info.plan is not None:
            return False, info.plan, shape, bits, self._tombstones, self._needs_key, routed, info.ce
        return None

    def relation_info(
        self, rel: Relation, primary_key: tuple[str, ...] = (), facts: Mapping[str, ColumnFacts] | None = None
    ) -> RelationInfo:
        """What building events of ``rel`` takes. ``primary_key`` keys messages of REPLICA IDENTITY FULL
        tables, where every column is flagged as identity and the whole row would otherwise be the key.
        ``facts``: the columns' catalog facts by name, for Debezium's schemas (:attr:`wants_column_facts`)."""
        all_names = tuple(c.name for c in rel.columns)
        identity = [c.is_key for c in rel.columns]
        if self._debezium is not None:
            all_converters = tuple(debezium_converter(self._registry, c.type_oid, c.type_modifier)
                                   for c in rel.columns)
        else:
            all_converters = tuple(self._registry.converter(c.type_oid) for c in rel.columns)
        transform = None
        if self.transforms.entries:
            transform = self.transforms.relation(rel.schema, rel.name, all_names, identity)
        names, converters, subject = all_names, all_converters, self.subject(rel.schema, rel.name)
        identity_index = tuple(i for i, c in enumerate(rel.columns) if c.is_key)
        if transform is not None:  # the kept columns; a masked value is published as text (its mask)
            masked = {at for at, _ in transform.masks}
            names = transform.names
            converters = tuple(None if at in masked else all_converters[i] for at, i in enumerate(transform.kept))
            identity_index = tuple(at for at, i in enumerate(transform.kept) if identity[i])
            if transform.route is not None:
                subject = f"{self._topic}.{self._prefix}{rel.schema}_{rel.name}"  # no topicsMap: the route's
        if transform is not None and transform.key is not None:
            key_index: tuple[int, ...] = transform.key
        elif self._key_from and self._key_from in names:
            key_index = (names.index(self._key_from),)
        elif rel.replica_identity == "f" and primary_key and all(n in names for n in primary_key):
            key_index = tuple(names.index(n) for n in primary_key)
        else:
            key_index = identity_index
            if transform is not None and self._needs_key:
                self._warn_key(rel, [n for n, key in zip(all_names, identity, strict=True) if key and n not in names])
        info = RelationInfo(
            oid=rel.oid,
            schema=rel.schema,
            table=rel.name,
            names=names,
            converters=converters,
            conversions=tuple((i, names[i], conv) for i, conv in enumerate(converters) if conv is not None),
            key_index=key_index,
            identity_index=identity_index,
            full_identity=rel.replica_identity == "f",
            actions=self._filter.actions(rel.schema, rel.name),
            subject=subject,
            transform=transform,
            route=None if transform is None else transform.route,
        )
        if self._debezium is not None:
            if transform is not None:  # the columns as published: kept ones, masked ones as text
                rel = transform.relation(rel)
                facts = facts and {n: f for n, f in facts.items() if n not in transform.nulled}
            info.debezium = self._debezium.table(self._registry, rel, key_index, facts)
            if self.hot is not None and (transform is None or self._hmac is not None or "hash" not in transform.codes):
                routed = None  # a topic route: rendered from the table's plan in the default format
                if transform is not None and transform.route is not None:
                    routed = hotpath.plan(rel.schema, rel.name, all_names, all_converters, identity, key_index,
                                          transform, self._hmac)
                info.debezium_plan = hotpath.debezium_plan(self._debezium.source_parts(rel.schema, rel.name), names,
                                                           converters, info.debezium, key_index, transform,
                                                           self._hmac, routed)
                if info.debezium_plan[5] is not None:
                    info.make = functools.partial(HeadedMessage, info.debezium_plan[5])
        elif self.hot is not None:
            info.plan = hotpath.plan(rel.schema, rel.name, all_names, all_converters, identity, key_index,
                                     transform, None if transform is None else self._hmac)
            if self._finish is not None:
                info.ce = self._finish.compiled(rel.schema, rel.name)
                info.ce_lines = info.ce[1] is not None and isinstance(info.ce[0][0], bytes)
        if info.plan is not None or info.debezium_plan is not None:
            info.shape = _change_shape(info)
        return info

    def _warn_key(self, rel: Relation, left_out: list[str]) -> None:
        """Once per table: the default message key (the replica identity) lost columns the transform excludes."""
        if left_out and (rel.schema, rel.name) not in self._keys_warned:
            self._keys_warned.add((rel.schema, rel.name))
            log.warning(
                "the message key leaves out key columns the transform excludes; name the key in transforms[].key",
                extra={"fields": {"schema": rel.schema, "table": rel.name, "columns": left_out}},
            )

    def _topic_of(self, info: RelationInfo, new: Tuple | None, old: Tuple | None, old_kind: str | None) -> str:
        """The topic of an event of ``info`` whose (transformed) rows are ``new`` and ``old``."""
        route = info.route
        return info.subject if route is None else self._routed(info, route.subject(new, old, old_kind))

    def _routed(self, info: RelationInfo, topic: str | int) -> str:
        """A route's answer -> the topic: the rendered one, or the table's (the reason counted)."""
        if type(topic) is not int:  # (isinstance(topic, str) of an int also looks up its __class__: slower)
            return topic  # type: ignore[return-value]  # a str
        cell = info.fallbacks[topic - 1]
        if cell is None:
            labels = (info.table, FALLBACK_REASONS[topic - 1])
            cell = info.fallbacks[topic - 1] = metrics.TRANSFORM_FALLBACKS.cell(labels)
        cell[0] += 1
        return info.subject

    def announced_columns(self, info: RelationInfo, columns: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The columns (``{"name", "type", "key"}`` in table order) a SCHEMA event of ``info``'s table announces:
        those its events carry. The one place that decides it (listener.schemaEvents compares and publishes
        what this returns): a column a transform leaves out is not announced, a masked one is announced as
        ``text`` (its events carry a hash or "[redacted]"), or as it is when masked to null."""
        transform = info.transform
        if transform is None:
            return columns
        kept = {name: at for at, name in enumerate(transform.names)}
        as_text = {transform.names[at] for at, kind in transform.masks if kind != "null"}
        return [{**column, "type": "text"} if column["name"] in as_text else column
                for column in columns if column["name"] in kept]

    def finished(self, message: Message, moment: str) -> Message:
        """``message`` in publisher.format (CloudEvents around it; the default leaves it as it is)."""
        return message if self._finish is None else self._finish(message, moment)

    # -- rows -------------------------------------------------------------------------------------

    def row(self, info: RelationInfo, values: Tuple) -> dict[str, Any]:
        """Column name -> converted value; unchanged TOAST columns are left out."""
        if len(values) != len(info.names) or UNCHANGED in values:
            return self._row_checked(info, values)
        out: dict[str, Any] = dict(zip(info.names, values, strict=True))  # text and NULL need no work
        try:
            for index, name, conv in info.conversions:
                value = values[index]
                if value is not None:
                    out[name] = conv(value)  # type: ignore[arg-type]
            return out
        except Exception:
            return self._row_checked(info, values)

    def _row_checked(self, info: RelationInfo, values: Tuple) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, conv, value in zip(info.names, info.converters, values, strict=False):
            if value is UNCHANGED:
                continue
            if value is None or conv is None:
                out[name] = value
                continue
            try:
                out[name] = conv(value)  # type: ignore[arg-type]
            except Exception as exc:
                out[name] = value  # its text form: never a made-up value
                metrics.CONVERSION_ERRORS.labels(info.table, name).inc()
                if (info.table, name) not in self._bad_columns:
                    self._bad_columns.add((info.table, name))
                    log.warning(
                        "value published as text: it could not be converted",
                        extra={"fields": {"schema": info.schema, "table": info.table, "column": name,
                                          "error": str(exc)}},
                    )
        return out

    def old_row(self, info: RelationInfo, values: Tuple, kind: str | None) -> dict[str, Any]:
        """The old row: all of it for REPLICA IDENTITY FULL ('O'), else only the identity columns ('K')."""
        if kind == "O":
            return self.row(info, values)
        row = self.row(info, values)
        return {info.names[i]: row[info.names[i]] for i in info.identity_index if info.names[i] in row}

    def _key(self, info: RelationInfo, primary: Tuple, fallback: Tuple | None) -> bytes | None:
        if not info.key_index:
            return None
        parts = []
        for i in info.key_index:
            value = primary[i] if i < len(primary) else None
            if (value is None or value is UNCHANGED) and fallback is not None and i < len(fallback):
                value = fallback[i]
            parts.append(value if isinstance(value, str) else None)
        if len(parts) == 1:
            return parts[0].encode() if parts[0] is not None else None
        return orjson.dumps(parts)

    # -- changes -> messages ----------------------------------------------------------------------

    def begin(self, final_lsn: int, commit_micros: int, xid: int | None = None) -> Transaction:
        """A transaction starts: everything its events share is computed once."""
        prefix, base = event_id_parts(self._slot_hash, final_lsn)
        return Transaction(final_lsn, commit_time_text(commit_micros), 0, prefix, base, xid, commit_micros)

    def begin_message(self, buf: bytes) -> Transaction:
        """A pgoutput Begin message -> its :class:`Transaction`: compiled when it can (the same fields as
        :meth:`begin` computes), else decoded here (a malformed message raises ``DecodeError``)."""
        if self._begin_hot is not None:
            fields = self._begin_hot(buf, self._slot_hash)
            if fields is not None:
                return Transaction(*fields)
        msg = pgoutput.decode(buf)
        if not isinstance(msg, pgoutput.Begin):
            raise DecodeError(f"pgoutput: expected a Begin message, got {type(msg).__name__}")
        return self.begin(msg.final_lsn, msg.commit_time, msg.xid)

    def commit(self, commit_lsn: int) -> None:
        """A transaction ended."""
        if self._debezium is not None:
            self._debezium.committed(commit_lsn)

    def _ident(self, txn: Transaction, ordinal: int) -> str:
        """The id of the change number ``ordinal`` of ``txn`` (see :func:`event_id`)."""
        if txn.id_prefix:
            return f"{txn.id_prefix}{txn.id_base | (ordinal & 0x3FFFFFF):012x}"
        return event_id(self._slot_hash, txn.final_lsn, ordinal)

    def _message(
        self, info: RelationInfo, txn: Transaction, action: str, data: dict[str, Any],
        old: dict[str, Any], key: bytes | None, subject: str,
    ) -> Message:
        message = self._event(info, self._ident(txn, txn.ordinal), txn.commit_time, action, data, old, key, subject)
        return message if self._finish is None else self._finish(message, txn.commit_time)

    @staticmethod
    def _event(
        info: RelationInfo, ident: str, commit_time: str, action: str, data: dict[str, Any],
        old: dict[str, Any], key: bytes | None, subject: str,
    ) -> Message:
        body = orjson.dumps(
            {"id": ident, "schema": info.schema, "table": info.table, "action": action, "data": data,
             "dataOld": old, "commitTime": commit_time}
        )
        return Message(ident, subject, body, info.schema, info.table, action, key)

    def read(self, info: RelationInfo, raw: list[bytes | None], ident: str, read_time: str) -> Message:
        """A backfilled row (each column's text form, as pgoutput would send it) as a READ event: ``data``
        built exactly as an INSERT's, ``dataOld`` empty, ``commitTime`` the time the row was read."""
        hot = self.hot
        finish = self._finish
        if hot is not None and info.debezium_plan is not None:  # publisher.format debezium
            if self._read_moment[0] != read_time:  # the same for every row of a chunk
                self._read_moment = (read_time, moment_micros(read_time))
            read = hot.debezium_read_row(raw, info.debezium_plan, self._read_moment[1],
                                         self._debezium.last_commit,  # type: ignore[union-attr]
                                         None, self._needs_key)
            if read is not None:
                subject = info.subject if info.route is None else self._routed(info, read[2])  # type: ignore[misc]
                return info.make(ident, subject, read[0], info.schema, info.table, "READ", read[1])
        if hot is not None and info.plan is not None:
            done = hot.read_row(raw, info.plan, ident, read_time, self._needs_key, info.ce)
            if done is not None:
                subject = info.subject if info.route is None else self._routed(info, done[2])  # type: ignore[misc, arg-type]
                if info.ce_lines:  # wrapped by the compiled path, the attributes as header lines
                    return Message(ident, subject, done[0], info.schema, info.table, "READ", done[1], None,
                                   finish.content_type, False, done[3])  # type: ignore[misc, union-attr, arg-type]
                if info.ce is not None:  # wrapped by the compiled path (finish is not None)
                    return Message(ident, subject, done[0], info.schema, info.table, "READ", done[1],
                                   done[3], finish.content_type)  # type: ignore[misc, union-attr]
                message = Message(ident, subject, done[0], info.schema, info.table, "READ", done[1])
                return message if finish is None else finish(message, read_time)
        values: Tuple = [None if v is None else v.decode() for v in raw]
        if info.transform is not None:
            values = info.transform.apply(values)
        subject = self._topic_of(info, values, None, None)
        if self._debezium is not None:
            change = Change(moment_micros(read_time), None, None, "incremental")
            return self._debezium_change(info, ident, "READ", None, values, change, subject)
        key = self._key(info, values, None) if self._needs_key else None
        message = self._event(info, ident, read_time, "READ", self.row(info, values), {}, key, subject)
        return message if finish is None else finish(message, read_time)

    def page_reader(self, info: RelationInfo) -> PageReader | None:
        """The compiled ``read_page`` bound to what a page of ``info``'s rows shares, when it writes that
        table's READ events itself (the default format, no CloudEvents, no topic route, libpq found); else
        None and the rows go through :meth:`read_page`. Call it as ``reader(result_ptr, ids, key_index,
        read_time)``; a row it leaves to the Python path is None in both of its lists."""
        hot, plan = self.hot, info.plan
        if (hot is None or plan is None or info.debezium_plan is not None or self._finish is not None
                or info.route is not None or not hotpath.page_reader(hot)):
            return None
        shared = (Message, info.subject, info.schema, info.table, "READ", *_message_slots())
        needs_key = self._needs_key
        read_page = hot.read_page

        def reader(result_ptr: int, ids: bytes, key_index: tuple[int, ...], read_time: str) -> PageRead:
            return read_page(result_ptr, plan, ids, key_index, read_time, needs_key, shared)

        return reader

    def read_page(
        self, info: RelationInfo, rows: Sequence[list[bytes | None]], ident_of: Callable[[Sequence[str | None]], str],
        key_index: Sequence[int], read_time: str,
    ) -> tuple[list[Message], list[RowKey]]:
        """A page of backfilled rows (each column's text form, NULL as None) -> their READ events and keys
        (the key columns at ``key_index``, decoded): the Python twin of the compiled ``read_page``."""
        read = self.read
        messages: list[Message] = []
        keys: list[RowKey] = []
        for raw in rows:
            key = tuple(None if (value := raw[i]) is None else value.decode() for i in key_index)
            messages.append(read(info, raw, ident_of(key), read_time))
            keys.append(key)
        return messages, keys

    def change(self, buf: bytes, txn: Transaction) -> Message | None:
        """An Insert, Update or Delete message -> its event (None: filtered out). The compiled path
        writes the body when it can; the Python stages take the message when it cannot."""
        if self.hot_change is not None:
            made = self.hot_change(buf, self.compiled, txn, self._debezium)
            if made is not None:
                return made
        return self.change_rest(buf, txn)

    def change_rest(self, buf: bytes, txn: Transaction) -> Message | None:
        """:meth:`change` for a message :attr:`hot_change` left (the reader calls the two itself): a table it does
        not make whole, an action not published, or a value the compiled path leaves to Python."""
        info = self.relations[_U32(buf, 1)[0]]
        hot = self.hot
        if hot is not None and (info.plan is not None or info.debezium_plan is not None):
            action = CHANGE_ACTIONS[buf[0]]
            if action not in info.actions:
                txn.ordinal += 1
                self.skipped(info)
                return None
            ordinal = txn.ordinal + 1
            if txn.id_prefix:  # the compiled call writes the id: the prefix and the change's bits
                prefix, number = txn.id_prefix, txn.id_base | (ordinal & 0x3FFFFFF)
            else:
                prefix, number = self._ident(txn, ordinal), None
            done: tuple[Any, ...] | None  # (ident, body, key[, topic][, headers]): see hotpath.Module.event
            shape = info.shape if info.route is None else None  # a route's fallbacks are counted below
            if txn.id_prefix and info.oid in self.compiled:
                done = None  # hot_change made this very call and left the change to Python: not again here
            elif shape is not None:  # the compiled call makes the Message (made: None when it leaves the change)
                if info.debezium_plan is not None:
                    made = hot.debezium_event(buf, info.debezium_plan, prefix, number, txn.commit_micros, txn.xid,
                                              txn.lsn, self._debezium.last_commit,  # type: ignore[union-attr]
                                              None, self._needs_key, shape)
                else:
                    made = hot.event(buf, info.plan, prefix, number, txn.commit_time,  # type: ignore[arg-type]
                                     self._needs_key, None, shape)
                if made is not None:
                    txn.ordinal = ordinal
                    if action == "DELETE" and self._tombstones:
                        made.tombstone = made.key is not None
                    return made if self._finish is None else self._finish(made, txn.commit_time)
                done = None
            elif info.debezium_plan is not None:  # publisher.format debezium with a route: time and position too
                done = hot.debezium_event(buf, info.debezium_plan, prefix, number, txn.commit_micros, txn.xid, txn.lsn,
                                          self._debezium.last_commit,  # type: ignore[union-attr]
                                          None, self._needs_key)  # None: it reads time.time_ns()'s clock
            elif info.ce is not None:  # publisher.format cloudevents: the event wrapped in the same call
                done = hot.event(buf, info.plan, prefix, number, txn.commit_time, self._needs_key,  # type: ignore[arg-type]
                                 info.ce)
            else:  # a topic route (or a Message only its class can make)
                done = hot.event(buf, info.plan, prefix, number, txn.commit_time, self._needs_key)  # type: ignore[arg-type]
            if done is not None:
                txn.ordinal = ordinal
                subject = info.subject
                if info.route is not None:
                    routed: str | int = done[3]  # type: ignore[misc, assignment]
                    subject = routed if type(routed) is str else self._routed(info, routed)
                if info.ce_lines:
                    message = Message(done[0], subject, done[1], info.schema, info.table, action, done[2], None,
                                      self._finish.content_type, False, done[4])  # type: ignore[misc, union-attr, arg-type]
                elif info.ce is not None:
                    message = Message(done[0], subject, done[1], info.schema, info.table, action, done[2],
                                      done[4], self._finish.content_type)  # type: ignore[misc, union-attr]
                else:  # make: with Debezium's schemas a HeadedMessage (done[1] follows the schema head)
                    make = info.make  # called from a local: a call of the attribute is looked up as a method
                    message = make(done[0], subject, done[1], info.schema, info.table, action, done[2])
                if action == "DELETE" and self._tombstones:
                    message.tombstone = message.key is not None
                return message if self._finish is None or info.ce is not None else self._finish(message,
                                                                                                 txn.commit_time)
        msg = pgoutput.decode(buf)
        if isinstance(msg, pgoutput.Insert):
            return self.insert(info, txn, msg.new)
        if isinstance(msg, pgoutput.Update):
            return self.update(info, txn, msg.old, msg.old_kind, msg.new)
        if isinstance(msg, pgoutput.Delete):
            return self.delete(info, txn, msg.old, msg.old_kind)
        raise ValueError(f"not a change message: {type(msg).__name__}")

    def skipped(self, info: RelationInfo) -> None:
        metrics.FILTER_SKIPPED.labels(info.table).inc()

    def insert(self, info: RelationInfo, txn: Transaction, new: Tuple) -> Message | None:
        txn.ordinal += 1
        if "INSERT" not in info.actions:
            self.skipped(info)
            return None
        if info.transform is not None:
            new = info.transform.apply(new)
        subject = self._topic_of(info, new, None, None)
        if self._debezium is not None:
            return self._debezium_change(info, self._ident(txn, txn.ordinal), "INSERT", None, new, _change(txn),
                                         subject)
        key = self._key(info, new, None) if self._needs_key else None
        return self._message(info, txn, "INSERT", self.row(info, new), {}, key, subject)

    def update(
        self, info: RelationInfo, txn: Transaction, old: Tuple | None, old_kind: str | None, new: Tuple
    ) -> Message | None:
        txn.ordinal += 1
        if "UPDATE" not in info.actions:
            self.skipped(info)
            return None
        if info.transform is not None:
            new = info.transform.apply(new)
            old = None if old is None else info.transform.apply(old)
        subject = self._topic_of(info, new, old, old_kind)
        if self._debezium is not None:
            before = old if old is not None and old_kind == "O" else None
            return self._debezium_change(info, self._ident(txn, txn.ordinal), "UPDATE", before, new, _change(txn),
                                         subject)
        data = self.row(info, new)
        data_old = self.old_row(info, old, old_kind) if old is not None else {}
        if len(data) < len(info.names) and old is not None:
            # unchanged TOAST values: fill from the old row when it is complete (REPLICA IDENTITY FULL)
            for i, value in enumerate(new):
                if value is UNCHANGED:
                    name = info.names[i]
                    if name in data_old:
                        data[name] = data_old[name]
        key = self._key(info, new, old) if self._needs_key else None
        return self._message(info, txn, "UPDATE", data, data_old, key, subject)

    def delete(self, info: RelationInfo, txn: Transaction, old: Tuple, old_kind: str) -> Message | None:
        txn.ordinal += 1
        if "DELETE" not in info.actions:
            self.skipped(info)
            return None
        if info.transform is not None:
            old = info.transform.apply(old)
        subject = self._topic_of(info, None, old, old_kind)
        if self._debezium is not None:
            message = self._debezium_change(info, self._ident(txn, txn.ordinal), "DELETE", old, None, _change(txn),
                                            subject)
        else:
            key = self._key(info, old, None) if self._needs_key else None
            message = self._message(info, txn, "DELETE", {}, self.old_row(info, old, old_kind), key, subject)
        message.tombstone = self._tombstones and message.key is not None
        return message

    def truncate(self, info: RelationInfo, txn: Transaction) -> Message | None:
        txn.ordinal += 1
        if "TRUNCATE" not in info.actions:
            self.skipped(info)
            return None
        if self._debezium is not None:
            return self._debezium_change(info, self._ident(txn, txn.ordinal), "TRUNCATE", None, None, _change(txn),
                                         info.subject)
        return self._message(info, txn, "TRUNCATE", {}, {}, None, info.subject)

    # -- Debezium ---------------------------------------------------------------------------------

    def _debezium_change(
        self, info: RelationInfo, ident: str, action: str, before: Tuple | None, after: Tuple | None,
        change: Change, subject: str,
    ) -> Message:
        dbz, table = self._debezium, info.debezium
        assert dbz is not None and table is not None
        before_row = dbz.row(info.names, info.converters, before, table) if before is not None else None
        after_row = dbz.row(info.names, info.converters, after, table) if after is not None else None
        key = None
        if self._needs_key and action != "TRUNCATE":
            key = dbz.key(info.names, info.key_index, after_row if after_row is not None else before_row or {}, table)
        body = dbz.envelope(info.schema, info.table, _DEBEZIUM_OPS[action], before_row, after_row, change,
                            table.envelope_schema)
        return Message(ident, subject, body, info.schema, info.table, action, key)

    def custom(
        self, txn: Transaction, subject: str, action: str, fields: dict[str, Any], table: str, key: bytes
    ) -> Message:
        """An event that is not a row's (a DDL event), the next change of ``txn``:
        ``{"id", "action", **fields, "commitTime"}`` in every format (CloudEvents wraps it)."""
        txn.ordinal += 1
        ident = self._ident(txn, txn.ordinal)
        body = orjson.dumps({"id": ident, "action": action, **fields, "commitTime": txn.commit_time})
        message = Message(ident, subject, body, "", table, action, key if self._needs_key else None)
        return message if self._finish is None else self._finish(message, txn.commit_time)

    # -- logical decoding messages ----------------------------------------------------------------

    def message(self, msg: pgoutput.LogicalMessage, txn: Transaction | None) -> Message | None:
        """A logical decoding message -> its MESSAGE event (None: its prefix is not listed). A transactional
        message counts as a change of its transaction; any other gets the id of its own LSN."""
        if txn is not None and msg.transactional:
            txn.ordinal += 1
            ident, moment, change = self._ident(txn, txn.ordinal), txn.commit_time, _change(txn)
        else:
            micros = time.time_ns() // 1000 - _PG_EPOCH_UNIX_US
            ident, moment = event_id(self._slot_hash, msg.lsn, 0), commit_time_text(micros)
            change = Change(micros, None, msg.lsn)
        if msg.prefix not in self._message_prefixes:
            if msg.prefix not in INTERNAL_MESSAGE_PREFIXES:
                metrics.MESSAGES_SKIPPED.labels(msg.prefix).inc()
            return None
        if self._debezium is not None:
            body, key = self._debezium.message(msg.prefix, msg.content, change)
        else:
            body, parsed = message_body(ident, msg.prefix, msg.content, moment)
            key = message_key(parsed, self._key_from, msg.prefix)
        message = Message(ident, self._subject(msg.prefix), body, "", msg.prefix, "MESSAGE",
                          key if self._needs_key else None)
        return message if self._finish is None else self._finish(message, moment)


_DEBEZIUM_OPS = {"INSERT": "c", "UPDATE": "u", "DELETE": "d", "TRUNCATE": "t", "READ": "r"}
_PG_EPOCH_UNIX_US = int(PG_EPOCH.timestamp()) * 1_000_000


def _change(txn: Transaction) -> Change:
    return Change(txn.commit_micros, txn.xid, txn.lsn)
