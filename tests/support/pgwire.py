"""pgoutput messages (protocol version 1) built by hand with :mod:`struct`, following PostgreSQL's
"Logical Replication Message Formats" page: the decoder is checked against the documented wire format,
not against itself."""

from __future__ import annotations

import struct

__all__ = [
    "COL_NULL",
    "COL_UNCHANGED",
    "begin_msg",
    "col_binary",
    "col_text",
    "commit_msg",
    "cstr",
    "delete_msg",
    "insert_msg",
    "logical_msg",
    "origin_msg",
    "relation_msg",
    "truncate_msg",
    "tuple_data",
    "type_msg",
    "update_msg",
]


def cstr(text: str) -> bytes:
    return text.encode() + b"\x00"


def col_text(text: str) -> bytes:
    raw = text.encode()
    return b"t" + struct.pack(">i", len(raw)) + raw


def col_binary(raw: bytes) -> bytes:
    return b"b" + struct.pack(">i", len(raw)) + raw


COL_NULL = b"n"
COL_UNCHANGED = b"u"


def tuple_data(*columns: bytes) -> bytes:
    return struct.pack(">h", len(columns)) + b"".join(columns)


def begin_msg(final_lsn: int, ts: int, xid: int) -> bytes:
    return b"B" + struct.pack(">QqI", final_lsn, ts, xid)


def commit_msg(flags: int, commit_lsn: int, end_lsn: int, ts: int) -> bytes:
    return b"C" + struct.pack(">BQQq", flags, commit_lsn, end_lsn, ts)


def origin_msg(lsn: int, name: str) -> bytes:
    return b"O" + struct.pack(">Q", lsn) + cstr(name)


def relation_msg(oid: int, schema: str, name: str, identity: str, columns: list[tuple[int, str, int, int]]) -> bytes:
    out = b"R" + struct.pack(">I", oid) + cstr(schema) + cstr(name) + identity.encode()
    out += struct.pack(">h", len(columns))
    for flags, col_name, type_oid, typmod in columns:
        out += struct.pack(">B", flags) + cstr(col_name) + struct.pack(">Ii", type_oid, typmod)
    return out


def type_msg(oid: int, schema: str, name: str) -> bytes:
    return b"Y" + struct.pack(">I", oid) + cstr(schema) + cstr(name)


def insert_msg(oid: int, new: bytes) -> bytes:
    return b"I" + struct.pack(">I", oid) + b"N" + new


def update_msg(oid: int, new: bytes, old: bytes | None = None, old_kind: bytes = b"K") -> bytes:
    out = b"U" + struct.pack(">I", oid)
    if old is not None:
        out += old_kind + old
    return out + b"N" + new


def delete_msg(oid: int, old_kind: bytes, old: bytes) -> bytes:
    return b"D" + struct.pack(">I", oid) + old_kind + old


def truncate_msg(oids: list[int], options: int) -> bytes:
    return b"T" + struct.pack(">iB", len(oids), options) + b"".join(struct.pack(">I", o) for o in oids)


def logical_msg(flags: int, lsn: int, prefix: str, content: bytes) -> bytes:
    return b"M" + struct.pack(">BQ", flags, lsn) + cstr(prefix) + struct.pack(">i", len(content)) + content
