"""Stage 5b — transforms: per table, which columns are published, which values are masked, and the
topic and message key of its events (``listener.transforms``, see docs/transforms.md).

The first entry whose ``tables`` names a table applies to it. Its columns are dropped or masked before
anything is converted, so a left-out or masked value is never converted, never logged and never
published in clear:

- ``hash``: HMAC-SHA256 keyed with ``listener.transformsHashKey`` over the value's PostgreSQL text form
  (the UTF-8 bytes pgoutput sends), written as 64 lower-case hex digits; NULL stays null;
- ``redact``: the string ``[redacted]``; NULL stays null;
- ``null``: null.

An unchanged TOASTed value stays "not sent" whatever its mask. ``topic`` renders column values (as
published: a hashed column gives its hash) into the topic name, each escaped by :func:`escape`; an event
without the value goes to the table's own topic and is counted (``transform_fallbacks_total``).

:meth:`Transforms.relation` compiles an entry for one relation: the event stage builds events of the
kept columns only (:meth:`RelationTransform.apply` is the Python twin of what ``listener/_hotpath_c/``
does with the plan :func:`listener.hotpath.plan` makes of it). A table no entry names has no
:class:`RelationTransform` and costs what it cost before.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from listener.config import ListenerConfig, MaskKind, TransformConfig, topic_template
from listener.pgoutput import UNCHANGED, Column, Relation, Tuple

#: what a redact mask publishes
REDACTED: Final = "[redacted]"
#: the longest topic name a route may render, in bytes (Kafka allows 249 characters; Pub/Sub 255,
#: RabbitMQ routing keys 255 bytes)
MAX_TOPIC_BYTES: Final = 249
#: why an event went to its table's own topic instead of the route, by code (1, 2, ... as the compiled
#: path returns them): the column is NULL, the event does not carry it (an unchanged TOAST value, a
#: column the DELETE's old key lacks), its value is empty, the topic would be too long
FALLBACK_REASONS: Final = ("null", "missing", "empty", "too_long")
NULL, MISSING, EMPTY, TOO_LONG = 1, 2, 3, 4
#: what happens to one column of a relation: its mask, "drop" (not published), or None (published as is)
ColumnCode = Literal["hash", "redact", "null", "drop"] | None

#: bytes a topic name part keeps as they are: valid in NATS subject tokens, Kafka topics, Pub/Sub topic
#: ids and RabbitMQ routing key words alike
_PLAIN: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-")
_ESCAPES: Final = tuple(chr(b) if b in _PLAIN else f"_{b:02x}" for b in range(256))


def escape(value: str) -> str:
    """A column value as a topic name part: ASCII letters, digits and ``-`` stay; every other byte of the
    value's UTF-8 form becomes ``_`` and two lower-case hex digits (``acme_eu`` -> ``acme_5feu``,
    ``a.b`` -> ``a_2eb``, ``é`` -> ``_c3_a9``). Reversible, and never a separator of any broker."""
    if value.isascii() and value.replace("-", "").isalnum():
        return value
    return "".join([_ESCAPES[b] for b in value.encode()])


def hash_text(key: bytes, text: str) -> str:
    """The hash mask of one value: HMAC-SHA256(key, text as UTF-8), lower-case hex."""
    return hmac.digest(key, text.encode(), "sha256").hex()


def matches(pattern: str, schema: str, table: str) -> bool:
    """``schema.table``, ``table`` (any schema) or ``schema.*``."""
    head, dot, tail = pattern.partition(".")
    if not dot:
        return pattern == table
    return head == schema and (tail == "*" or tail == table)


@dataclass(frozen=True, slots=True)
class Route:
    """A topic template compiled for one relation: literal text and kept-column positions."""

    head: str  # "<publisher.topic>.<topicPrefix>"
    parts: tuple[str | int, ...]
    identity: frozenset[int]  # kept positions of the replica identity (what a DELETE's old key holds)

    def subject(self, new: Tuple | None, old: Tuple | None, old_kind: str | None) -> str | int:
        """The topic of an event whose (transformed) rows are ``new`` and ``old``, or the fallback reason
        (a code of :data:`FALLBACK_REASONS`). Values come from the new row (a DELETE's: the old row)."""
        out = [self.head]
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            value = self._value(part, new, old, old_kind) if part >= 0 else UNCHANGED
            if value is None:
                return NULL
            if value is UNCHANGED:
                return MISSING
            if not value:
                return EMPTY
            out.append(escape(value))  # type: ignore[arg-type]
        subject = "".join(out)
        return subject if len(subject.encode()) <= MAX_TOPIC_BYTES else TOO_LONG

    def _value(self, at: int, new: Tuple | None, old: Tuple | None, old_kind: str | None) -> object:
        """The value at kept position ``at`` as the event carries it (UNCHANGED: it does not)."""
        value: object = UNCHANGED
        if new is not None:
            value = new[at] if at < len(new) else UNCHANGED
            if value is not UNCHANGED:
                return value
        if old is not None and at < len(old) and (old_kind == "O" or at in self.identity):
            return old[at]
        return UNCHANGED


#: the type a masked column is announced as
TEXT_OID: Final = 25


@dataclass(frozen=True, slots=True)
class RelationTransform:
    """One transform compiled for one relation (its columns as the Relation message lists them)."""

    kept: tuple[int, ...]  # the relation's columns that are published, in table order
    names: tuple[str, ...]  # their names
    masks: tuple[tuple[int, MaskKind], ...]  # (kept position, mask) of the masked ones
    codes: tuple[ColumnCode, ...]  # per relation column
    key: tuple[int, ...] | None  # kept positions of transforms[].key (None: the default key)
    route: Route | None
    hash_key: bytes

    def relation(self, rel: Relation) -> Relation:
        """``rel`` as its events show it: the kept columns, a masked one as ``text`` (a hash or "[redacted]":
        a string, whatever the column's type) — what a format that describes the columns (Debezium's schemas)
        must announce."""
        masked = {at for at, _ in self.masks}
        columns = tuple(
            Column(rel.columns[i].name, TEXT_OID, -1, rel.columns[i].is_key) if at in masked else rel.columns[i]
            for at, i in enumerate(self.kept)
        )
        return Relation(rel.oid, rel.schema, rel.name, rel.replica_identity, columns)

    @property
    def nulled(self) -> frozenset[str]:
        """The names of the columns masked to null (whatever the catalog says, they may be null)."""
        return frozenset(self.names[at] for at, kind in self.masks if kind == "null")

    def apply(self, values: Tuple) -> Tuple:
        """A decoded tuple -> the kept columns' values, masked (the Python twin of the compiled path)."""
        count = len(values)
        out = [values[i] for i in self.kept if i < count]
        for at, kind in self.masks:
            if at >= len(out):
                break
            value = out[at]
            if value is UNCHANGED:
                continue
            if kind == "null":
                out[at] = None
            elif value is not None:
                out[at] = REDACTED if kind == "redact" else hash_text(self.hash_key, value)  # type: ignore[arg-type]
        return out


class Transforms:
    """``listener.transforms`` of a config: which entry applies to a table, compiled per relation."""

    def __init__(self, cfg: ListenerConfig, topic_head: str) -> None:
        """``topic_head``: ``<publisher.topic>.<topicPrefix>``, the start of every routed topic."""
        self.entries: tuple[TransformConfig, ...] = tuple(cfg.transforms)
        self._hash_key = cfg.transforms_hash_key.get_secret_value().encode()
        self._head = topic_head

    @property
    def hash_key(self) -> bytes:
        return self._hash_key

    def find(self, schema: str, table: str) -> TransformConfig | None:
        """The entry that applies to ``schema.table`` (the first naming it), or None."""
        for entry in self.entries:
            if any(matches(p, schema, table) for p in entry.tables):
                return entry
        return None

    def relation(
        self, schema: str, table: str, names: Sequence[str], identity: Sequence[bool]
    ) -> RelationTransform | None:
        """The transform of one relation (its column names and which are replica identity), or None."""
        entry = self.find(schema, table)
        if entry is None:
            return None
        kept = tuple(i for i, n in enumerate(names) if entry.columns.keeps(n))
        kept_names = tuple(names[i] for i in kept)
        position = {n: at for at, n in enumerate(kept_names)}
        masks = tuple((position[n], kind) for n, kind in entry.mask.items() if n in position)
        codes: tuple[ColumnCode, ...] = tuple(entry.mask.get(n) if n in position else "drop" for n in names)
        key = tuple(position[n] for n in entry.key if n in position) if entry.key else None
        route = None
        if entry.topic:
            parts: list[str | int] = []
            for part in topic_template(entry.topic):
                if isinstance(part, str):
                    parts.append(part)
                elif part[0] in position:
                    parts.append(position[part[0]])
                else:
                    parts.append(-1)  # the table has no such column: its events fall back (warned at start)
            identity_kept = frozenset(at for at, i in enumerate(kept) if i < len(identity) and identity[i])
            route = Route(self._head, tuple(parts), identity_kept)
        return RelationTransform(kept, kept_names, tuple(sorted(masks)), codes, key, route, self._hash_key)

    def check(self, tables: Mapping[tuple[str, str], Iterable[str]]) -> list[str]:
        """Warnings about entries and the database's tables (schema, table) -> column names: a column an entry
        names that a table it applies to lacks, an entry that names a ``schema.table`` that does not exist."""
        found: list[str] = []
        for number, entry in enumerate(self.entries):
            named = _named_columns(entry)
            for (schema, table), columns in sorted(tables.items()):
                if self.find(schema, table) is not entry:
                    continue
                missing = sorted(named - set(columns))
                if missing:
                    found.append(f"listener.transforms.{number}: table {schema}.{table} has no column "
                                 f"{', '.join(missing)} (applied when it has)")
            for pattern in entry.tables:
                schema, dot, table = pattern.partition(".")
                if dot and table != "*" and (schema, table) not in tables:
                    found.append(f"listener.transforms.{number}: table {pattern} does not exist (yet)")
        return found


def _named_columns(entry: TransformConfig) -> set[str]:
    named = set(entry.mask) | set(entry.key) | set(entry.topic_columns())
    named |= set(entry.columns.include or ()) | set(entry.columns.exclude or ())
    return named
