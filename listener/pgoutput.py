"""Stage 3 — pgoutput: decode the logical replication protocol's messages into Python objects.

Covers every message of protocol version 1 (Begin, Commit, Origin, Relation, Type, Insert, Update,
Delete, Truncate, Message) as PostgreSQL 14-18 send them. Pure functions over bytes: no I/O.
Column values stay in their wire form here (text as ``str``, binary as ``bytes``); NULL is ``None``
and an unchanged TOASTed value is the :data:`UNCHANGED` marker, so the two never mix.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, TypeAlias

from listener.errors import DecodeError


class _Unchanged:
    """Marker of an unchanged TOASTed column: the value was not sent, it is *not* NULL."""

    _instance: _Unchanged | None = None

    def __new__(cls) -> _Unchanged:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"

    def __bool__(self) -> bool:
        return False


UNCHANGED: Final = _Unchanged()

Value: TypeAlias = str | bytes | _Unchanged | None
Tuple: TypeAlias = list[Value]

PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)

_I16 = struct.Struct(">h").unpack_from
_I32 = struct.Struct(">i").unpack_from
_U32 = struct.Struct(">I").unpack_from
_U64 = struct.Struct(">Q").unpack_from
_BEGIN = struct.Struct(">QqI").unpack_from
_COMMIT = struct.Struct(">BQQq").unpack_from


def pg_timestamp(micros: int) -> datetime:
    """A protocol timestamp (microseconds since 2000-01-01 UTC) as an aware datetime."""
    return PG_EPOCH + timedelta(microseconds=micros)


def format_lsn(lsn: int) -> str:
    """``0/16B3748`` form of an LSN."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    hi, _, lo = text.partition("/")
    return (int(hi, 16) << 32) | int(lo, 16)


@dataclass(slots=True, frozen=True)
class Begin:
    """A transaction starts ('B')."""

    final_lsn: int  # LSN of the commit record: the transaction's identity in the WAL
    commit_time: int  # microseconds since 2000-01-01 UTC
    xid: int


@dataclass(slots=True, frozen=True)
class Commit:
    """A transaction commits ('C')."""

    flags: int
    commit_lsn: int
    end_lsn: int  # the position to confirm once the transaction is delivered
    commit_time: int


@dataclass(slots=True, frozen=True)
class Origin:
    """The replication origin the transaction came from ('O'), when it has one."""

    commit_lsn: int
    name: str


@dataclass(slots=True, frozen=True)
class Column:
    """One column of a Relation message."""

    name: str
    type_oid: int
    type_modifier: int
    is_key: bool


@dataclass(slots=True, frozen=True)
class Relation:
    """A table's description ('R'): sent before its first change in a session, again after its definition changes."""

    oid: int
    schema: str
    name: str
    replica_identity: str  # d(efault) n(othing) f(ull) i(ndex)
    columns: tuple[Column, ...]


@dataclass(slots=True, frozen=True)
class Type:
    """A user-defined type's name ('Y'), sent before the first change that has a column of that type."""

    oid: int
    schema: str
    name: str


@dataclass(slots=True, frozen=True)
class Insert:
    """A new row ('I')."""

    relation_oid: int
    new: Tuple


@dataclass(slots=True, frozen=True)
class Update:
    """A changed row ('U'): the old key or row when the replica identity sends it, and the new row."""

    relation_oid: int
    old: Tuple | None
    old_kind: str | None  # "K": key columns only, "O": the whole old row (REPLICA IDENTITY FULL)
    new: Tuple


@dataclass(slots=True, frozen=True)
class Delete:
    """A deleted row ('D'): its key, or the whole old row under REPLICA IDENTITY FULL."""

    relation_oid: int
    old: Tuple
    old_kind: str


@dataclass(slots=True, frozen=True)
class Truncate:
    """Tables truncated in one statement ('T')."""

    relation_oids: tuple[int, ...]
    cascade: bool
    restart_identity: bool


@dataclass(slots=True, frozen=True)
class LogicalMessage:
    """A message written with pg_logical_emit_message ('M')."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes


Message: TypeAlias = (
    Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate | LogicalMessage
)


def _cstring(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.index(b"\x00", pos)
    return buf[pos:end].decode(), end + 1


def decode_tuple(buf: bytes, pos: int) -> tuple[Tuple, int]:
    """Decode TupleData at ``pos``; return the values and the position after them."""
    (count,) = _I16(buf, pos)
    pos += 2
    values: Tuple = []
    append = values.append
    for _ in range(count):
        kind = buf[pos]
        pos += 1
        if kind == 0x74:  # 't' text
            (length,) = _I32(buf, pos)
            pos += 4
            end = pos + length
            if end > len(buf) or length < 0:
                raise DecodeError(f"pgoutput: column value of {length} bytes runs past the message end")
            append(buf[pos:end].decode())
            pos = end
        elif kind == 0x6E:  # 'n' null
            append(None)
        elif kind == 0x75:  # 'u' unchanged TOAST
            append(UNCHANGED)
        elif kind == 0x62:  # 'b' binary
            (length,) = _I32(buf, pos)
            pos += 4
            end = pos + length
            if end > len(buf) or length < 0:
                raise DecodeError(f"pgoutput: column value of {length} bytes runs past the message end")
            append(bytes(buf[pos:end]))
            pos = end
        else:
            raise DecodeError(f"pgoutput: unknown tuple column kind {kind!r} at byte {pos - 1}")
    return values, pos


def _decode_relation(buf: bytes) -> Relation:
    (oid,) = _U32(buf, 1)
    schema, pos = _cstring(buf, 5)
    name, pos = _cstring(buf, pos)
    identity = chr(buf[pos])
    (ncols,) = _I16(buf, pos + 1)
    pos += 3
    columns = []
    for _ in range(ncols):
        flags = buf[pos]
        col_name, pos = _cstring(buf, pos + 1)
        (type_oid,) = _U32(buf, pos)
        (typmod,) = _I32(buf, pos + 4)
        pos += 8
        columns.append(Column(col_name, type_oid, typmod, bool(flags & 1)))
    return Relation(oid, schema or "pg_catalog", name, identity, tuple(columns))


def _decode_update(buf: bytes) -> Update:
    (oid,) = _U32(buf, 1)
    kind = chr(buf[5])
    old: Tuple | None = None
    old_kind: str | None = None
    pos = 6
    if kind in ("K", "O"):
        old_kind = kind
        old, pos = decode_tuple(buf, pos)
        kind = chr(buf[pos])
        pos += 1
    if kind != "N":
        raise DecodeError(f"pgoutput: Update message without a new tuple (marker {kind!r})")
    new, _ = decode_tuple(buf, pos)
    return Update(oid, old, old_kind, new)


def decode(buf: bytes) -> Message:
    """Decode one pgoutput message (the payload of an XLogData message)."""
    try:
        tag = buf[0]
        if tag == 0x49:  # 'I'
            if buf[5] != 0x4E:
                raise DecodeError(f"pgoutput: Insert message without a new tuple (marker {chr(buf[5])!r})")
            return Insert(_U32(buf, 1)[0], decode_tuple(buf, 6)[0])
        if tag == 0x55:  # 'U'
            return _decode_update(buf)
        if tag == 0x44:  # 'D'
            kind = chr(buf[5])
            if kind not in ("K", "O"):
                raise DecodeError(f"pgoutput: Delete message without an old tuple (marker {kind!r})")
            return Delete(_U32(buf, 1)[0], decode_tuple(buf, 6)[0], kind)
        if tag == 0x42:  # 'B'
            final_lsn, ts, xid = _BEGIN(buf, 1)
            return Begin(final_lsn, ts, xid)
        if tag == 0x43:  # 'C'
            flags, commit_lsn, end_lsn, ts = _COMMIT(buf, 1)
            return Commit(flags, commit_lsn, end_lsn, ts)
        if tag == 0x52:  # 'R'
            return _decode_relation(buf)
        if tag == 0x59:  # 'Y'
            (oid,) = _U32(buf, 1)
            schema, pos = _cstring(buf, 5)
            name, _ = _cstring(buf, pos)
            return Type(oid, schema or "pg_catalog", name)
        if tag == 0x54:  # 'T'
            (count,) = _I32(buf, 1)
            options = buf[5]
            oids = struct.unpack_from(f">{count}I", buf, 6)
            return Truncate(tuple(oids), bool(options & 1), bool(options & 2))
        if tag == 0x4F:  # 'O'
            (lsn,) = _U64(buf, 1)
            name, _ = _cstring(buf, 9)
            return Origin(lsn, name)
        if tag == 0x4D:  # 'M'
            flags = buf[1]
            (lsn,) = _U64(buf, 2)
            prefix, pos = _cstring(buf, 10)
            (length,) = _I32(buf, pos)
            content = bytes(buf[pos + 4 : pos + 4 + length])
            if len(content) != length:
                raise DecodeError("pgoutput: Message content is shorter than its length")
            return LogicalMessage(bool(flags & 1), lsn, prefix, content)
    except DecodeError:
        raise
    except (IndexError, struct.error, ValueError, UnicodeDecodeError) as exc:
        kind = chr(buf[0]) if buf else "(empty)"
        raise DecodeError(f"pgoutput: malformed {kind!r} message ({len(buf)} bytes): {exc}") from None
    kind = chr(buf[0]) if buf else "(empty)"
    raise DecodeError(f"pgoutput: unknown message type {kind!r}; is the slot using the pgoutput plugin?")
