"""Byte-level tests of the pgoutput decoder (protocol version 1).

Every message is built by hand with :mod:`struct` following PostgreSQL's "Logical Replication
Message Formats" page (tests/support/pgwire.py), so the tests check the decoder against the
documented wire format, not against itself.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta

import pytest

from listener import pgoutput
from listener.errors import DecodeError
from listener.pgoutput import (
    UNCHANGED,
    Begin,
    Column,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Origin,
    Relation,
    Truncate,
    Type,
    Update,
    decode,
    format_lsn,
    parse_lsn,
    pg_timestamp,
)
from tests.support.pgwire import (
    COL_NULL,
    COL_UNCHANGED,
    begin_msg,
    col_binary,
    col_text,
    commit_msg,
    cstr,
    delete_msg,
    insert_msg,
    logical_msg,
    origin_msg,
    relation_msg,
    truncate_msg,
    tuple_data,
    type_msg,
    update_msg,
)

# -- transaction framing --------------------------------------------------------------------------------


def test_begin() -> None:
    msg = decode(begin_msg(0x1_0000_16B3748, 789_000_123, 4_000_000_000))
    assert msg == Begin(final_lsn=0x1_0000_16B3748, commit_time=789_000_123, xid=4_000_000_000)


def test_commit() -> None:
    msg = decode(commit_msg(0, 0x16B3748, 0x16B3790, 123_456))
    assert msg == Commit(flags=0, commit_lsn=0x16B3748, end_lsn=0x16B3790, commit_time=123_456)


def test_commit_with_negative_timestamp_before_2000() -> None:
    msg = decode(commit_msg(0, 1, 2, -1_000_000))
    assert isinstance(msg, Commit)
    assert pg_timestamp(msg.commit_time) == datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC)


def test_origin() -> None:
    assert decode(origin_msg(0xABCDEF, "node_a")) == Origin(commit_lsn=0xABCDEF, name="node_a")


# -- catalog messages -------------------------------------------------------------------------------------


def test_relation_columns_key_flags_and_typmods() -> None:
    raw = relation_msg(
        16384,
        "public",
        "users",
        "d",
        [(1, "id", 23, -1), (0, "name", 1043, 68), (0, "price", 1700, 655366)],
    )
    assert decode(raw) == Relation(
        oid=16384,
        schema="public",
        name="users",
        replica_identity="d",
        columns=(
            Column("id", 23, -1, True),
            Column("name", 1043, 68, False),
            Column("price", 1700, 655366, False),
        ),
    )


def test_relation_empty_namespace_is_pg_catalog() -> None:
    msg = decode(relation_msg(1259, "", "pg_class", "n", []))
    assert isinstance(msg, Relation)
    assert msg.schema == "pg_catalog"
    assert msg.columns == ()


@pytest.mark.parametrize("identity", ["d", "n", "f", "i"])
def test_relation_replica_identity(identity: str) -> None:
    msg = decode(relation_msg(1, "s", "t", identity, [(1, "a", 25, -1)]))
    assert isinstance(msg, Relation)
    assert msg.replica_identity == identity


def test_relation_unicode_names() -> None:
    msg = decode(relation_msg(7, "schéma", "таблица", "d", [(1, "ключ", 23, -1)]))
    assert isinstance(msg, Relation)
    assert (msg.schema, msg.name, msg.columns[0].name) == ("schéma", "таблица", "ключ")


def test_relation_type_oid_above_signed_range() -> None:
    msg = decode(relation_msg(3_000_000_000, "s", "t", "d", [(0, "c", 3_000_000_001, -1)]))
    assert isinstance(msg, Relation)
    assert msg.oid == 3_000_000_000
    assert msg.columns[0].type_oid == 3_000_000_001


def test_type() -> None:
    assert decode(type_msg(90001, "public", "mood")) == Type(oid=90001, schema="public", name="mood")


def test_type_empty_namespace_is_pg_catalog() -> None:
    assert decode(type_msg(90002, "", "thing")) == Type(oid=90002, schema="pg_catalog", name="thing")


# -- row changes -------------------------------------------------------------------------------------------


def test_insert_text_null_and_multibyte() -> None:
    raw = insert_msg(16384, tuple_data(col_text("42"), COL_NULL, col_text("héllo 🐘 日本")))
    assert decode(raw) == Insert(relation_oid=16384, new=["42", None, "héllo 🐘 日本"])


def test_insert_empty_text_is_not_null() -> None:
    msg = decode(insert_msg(1, tuple_data(col_text(""), COL_NULL)))
    assert isinstance(msg, Insert)
    assert msg.new == ["", None]


def test_insert_binary_column_stays_bytes() -> None:
    msg = decode(insert_msg(1, tuple_data(col_binary(b"\x00\x01\xff"), col_text("x"))))
    assert isinstance(msg, Insert)
    assert msg.new == [b"\x00\x01\xff", "x"]
    assert isinstance(msg.new[0], bytes)


def test_unchanged_toast_is_a_falsy_marker_not_none() -> None:
    msg = decode(update_msg(1, tuple_data(col_text("1"), COL_UNCHANGED, COL_NULL)))
    assert isinstance(msg, Update)
    _, toasted, null = msg.new
    assert toasted is UNCHANGED
    assert toasted is not None
    assert not toasted
    assert null is None
    assert repr(toasted) == "UNCHANGED"


def test_unchanged_marker_is_a_singleton() -> None:
    assert type(UNCHANGED)() is UNCHANGED


def test_update_without_old_tuple() -> None:
    raw = update_msg(5, tuple_data(col_text("1"), col_text("new")))
    assert decode(raw) == Update(relation_oid=5, old=None, old_kind=None, new=["1", "new"])


def test_update_with_old_key() -> None:
    old = tuple_data(col_text("1"), COL_NULL)
    raw = update_msg(5, tuple_data(col_text("2"), col_text("b")), old=old, old_kind=b"K")
    assert decode(raw) == Update(relation_oid=5, old=["1", None], old_kind="K", new=["2", "b"])


def test_update_with_old_full_row() -> None:
    raw = update_msg(
        5, tuple_data(col_text("1"), COL_UNCHANGED), old=tuple_data(col_text("1"), col_text("big")), old_kind=b"O"
    )
    assert decode(raw) == Update(relation_oid=5, old=["1", "big"], old_kind="O", new=["1", UNCHANGED])


@pytest.mark.parametrize("kind", ["K", "O"])
def test_delete(kind: str) -> None:
    raw = delete_msg(9, kind.encode(), tuple_data(col_text("7"), COL_NULL))
    assert decode(raw) == Delete(relation_oid=9, old=["7", None], old_kind=kind)


def test_truncate_several_relations_no_options() -> None:
    assert decode(truncate_msg([16384, 16390, 3_000_000_000], 0)) == Truncate(
        relation_oids=(16384, 16390, 3_000_000_000), cascade=False, restart_identity=False
    )


@pytest.mark.parametrize(
    ("options", "cascade", "restart"),
    [(1, True, False), (2, False, True), (3, True, True)],
)
def test_truncate_options(options: int, cascade: bool, restart: bool) -> None:
    msg = decode(truncate_msg([1], options))
    assert isinstance(msg, Truncate)
    assert (msg.cascade, msg.restart_identity) == (cascade, restart)


# -- logical decoding messages (pg_logical_emit_message) ------------------------------------------------------


def test_message_transactional_text() -> None:
    raw = logical_msg(1, 0x16B3748, "wal_listener", b"heartbeat")
    assert decode(raw) == LogicalMessage(transactional=True, lsn=0x16B3748, prefix="wal_listener", content=b"heartbeat")


def test_message_non_transactional_binary_content() -> None:
    content = bytes(range(256))
    msg = decode(logical_msg(0, 42, "bin", content))
    assert msg == LogicalMessage(transactional=False, lsn=42, prefix="bin", content=content)


def test_message_empty_content() -> None:
    msg = decode(logical_msg(0, 1, "p", b""))
    assert isinstance(msg, LogicalMessage)
    assert msg.content == b""


# -- malformed input ---------------------------------------------------------------------------------------------


def test_empty_buffer() -> None:
    with pytest.raises(DecodeError, match="malformed"):
        decode(b"")


def test_unknown_message_type_names_it() -> None:
    with pytest.raises(DecodeError, match="unknown message type 'Z'"):
        decode(b"Z\x00\x00\x00\x00")


def test_unknown_tuple_column_kind() -> None:
    raw = insert_msg(1, struct.pack(">h", 1) + b"x" + b"\x00" * 8)
    with pytest.raises(DecodeError, match="unknown tuple column kind"):
        decode(raw)


def test_insert_without_new_tuple_marker() -> None:
    raw = b"I" + struct.pack(">I", 1) + b"K" + tuple_data(col_text("1"))
    with pytest.raises(DecodeError, match="Insert"):
        decode(raw)


def test_update_with_bad_new_tuple_marker() -> None:
    raw = b"U" + struct.pack(">I", 1) + b"X" + tuple_data(col_text("1"))
    with pytest.raises(DecodeError, match="Update"):
        decode(raw)


def test_delete_without_old_tuple_marker() -> None:
    raw = b"D" + struct.pack(">I", 1) + b"N" + tuple_data(col_text("1"))
    with pytest.raises(DecodeError, match="Delete"):
        decode(raw)


def test_invalid_utf8_text() -> None:
    raw = insert_msg(1, struct.pack(">h", 1) + b"t" + struct.pack(">i", 2) + b"\xff\xfe")
    with pytest.raises(DecodeError, match="malformed 'I' message"):
        decode(raw)


def test_message_content_shorter_than_length() -> None:
    raw = b"M" + struct.pack(">BQ", 0, 1) + cstr("p") + struct.pack(">i", 10) + b"abc"
    with pytest.raises(DecodeError, match="shorter than its length"):
        decode(raw)


def test_truncate_count_larger_than_payload() -> None:
    raw = b"T" + struct.pack(">iB", 3, 0) + struct.pack(">I", 1)
    with pytest.raises(DecodeError, match="malformed 'T' message"):
        decode(raw)


WELL_FORMED = {
    "begin": begin_msg(1, 2, 3),
    "commit": commit_msg(0, 1, 2, 3),
    "origin": origin_msg(1, "node"),
    "relation": relation_msg(1, "public", "t", "d", [(1, "id", 23, -1), (0, "v", 25, -1)]),
    "type": type_msg(1, "public", "mood"),
    "truncate": truncate_msg([1, 2], 3),
    "message": logical_msg(1, 1, "prefix", b"content"),
    "insert": insert_msg(1, tuple_data(col_text("1"), COL_NULL, col_text("abc"))),
    "update": update_msg(1, tuple_data(col_text("1"), col_text("xyz")), old=tuple_data(col_text("1"), COL_NULL)),
    "delete": delete_msg(1, b"O", tuple_data(col_text("1"), col_binary(b"raw"))),
}

# every kind of message must reject each of its strict prefixes, also one cut inside a column value

@pytest.mark.parametrize(
    "name",
    [
        name
        for name in WELL_FORMED
    ],
)
def test_every_strict_prefix_raises_decode_error(name: str) -> None:
    raw = WELL_FORMED[name]
    decode(raw)  # the whole message is fine
    for cut in range(len(raw)):
        with pytest.raises(DecodeError):
            decode(raw[:cut])


@pytest.mark.parametrize("name", list(WELL_FORMED))
def test_prefixes_never_raise_anything_but_decode_error(name: str) -> None:
    raw = WELL_FORMED[name]
    for cut in range(len(raw)):
        try:
            decode(raw[:cut])
        except DecodeError as exc:
            assert str(exc).startswith("pgoutput: ")
            assert "\n" not in str(exc)


def test_text_value_longer_than_buffer_is_rejected() -> None:
    raw = b"I" + struct.pack(">I", 5) + b"N" + struct.pack(">h", 1) + b"t" + struct.pack(">i", 10) + b"abc"
    with pytest.raises(DecodeError):
        decode(raw)


def test_decode_tuple_returns_position_after_the_tuple() -> None:
    data = tuple_data(col_text("a"), COL_NULL, COL_UNCHANGED, col_binary(b"\x01")) + b"TRAILER"
    values, pos = pgoutput.decode_tuple(b"xx" + data, 2)
    assert values == ["a", None, UNCHANGED, b"\x01"]
    assert (b"xx" + data)[pos:] == b"TRAILER"


# -- LSNs and timestamps ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lsn", "text"),
    [(0, "0/0"), (0x16B3748, "0/16B3748"), (0x1_0000_0000, "1/0"), (2**64 - 1, "FFFFFFFF/FFFFFFFF")],
)
def test_format_and_parse_lsn(lsn: int, text: str) -> None:
    assert format_lsn(lsn) == text
    assert parse_lsn(text) == lsn


def test_parse_lsn_accepts_lower_case() -> None:
    assert parse_lsn("a/16b3748") == (0xA << 32) | 0x16B3748


@pytest.mark.parametrize("lsn", [1, 0xFFFFFFFF, 0x1_0000_0001, 0x2A_0000_00FF, 2**63])
def test_lsn_round_trip(lsn: int) -> None:
    assert parse_lsn(format_lsn(lsn)) == lsn


def test_pg_timestamp() -> None:
    assert pg_timestamp(0) == datetime(2000, 1, 1, tzinfo=UTC)
    moment = pg_timestamp(820_638_245_123_456)  # 9498 days + 03:04:05.123456
    assert moment == datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    assert moment.utcoffset() == timedelta(0)
