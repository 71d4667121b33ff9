"""The compiled fast path (listener/_hotpath_c/) publishes exactly what the Python stages publish.

Differential tests: the same pgoutput messages go through an EventBuilder with the compiled path and
one without, and every event (id, subject, body bytes, key) must be identical, or both must fail with
the same error. Values are generated to hit every branch of the C code: escapes and control
characters, non-ASCII and invalid UTF-8, NULL and unchanged TOAST, odd integers, timestamps in other
zones and BC, quoted and nested arrays, types the C code hands back to the Python converters. With
transforms (columns left out, each mask, topics from column values, keys) the same holds.
"""

from __future__ import annotations

import hmac
import random
import struct
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from listener import hotpath, types
from listener.catalog import ColumnFacts
from listener.errors import DecodeError
from listener.event import EventBuilder, Transaction
from listener.formats import CE_HEADERS, NATS_HEADERS, Binding, debezium_converter
from listener.message import HeadedMessage, Message
from listener.pgoutput import Column, Relation
from listener.publishers.nats import extra_headers
from listener.transforms import FALLBACK_REASONS
from listener.types import Converter
from tests.support.events import compiled_hot_path, make_config
from tests.support.pgwire import COL_NULL, COL_UNCHANGED, col_text, delete_msg, insert_msg, tuple_data, update_msg

OID = 16400
HASH_KEY = "k3y-for-the-differential-test"

COLUMNS: list[tuple[str, int]] = [
    ("id", types.INT4),
    ("big", types.INT8),
    ("name", types.TEXT),
    ("amount", types.NUMERIC),
    ("active", types.BOOL),
    ("created_at", types.TIMESTAMPTZ),
    ("local_at", types.TIMESTAMP),
    ("tags", 1009),  # text[]
    ("counts", 1007),  # int4[]
    ("flags", 1000),  # bool[]: written by the Python converter
    ("payload", types.JSONB),
    ("ratio", types.FLOAT8),  # Python converter
    ("raw", types.BYTEA),  # Python converter
    ("ref", types.UUID),
    ("day", 1082),  # date: text
    ("weird \"col\"\n", types.TEXT),  # a column name that needs escaping
]

TEXTS = [
    "", "plain", "with \"quotes\" and \\backslash\\", "tab\there", "line\nbreak\r\n", "\x00\x01\x1f\x7f",
    "é ü ß", "日本語", "emoji \U0001F600", "\u2028\u2029", "/slash/", "NULL", "{a,b}", " lead and trail ",
]
INTS = ["0", "1", "-1", "2147483647", "-2147483648", "9223372036854775807", "-9223372036854775808",
        "007", "-0", "+5", " 5", "1_000", "12a", "", "99999999999999999999"]
TIMESTAMPTZ = ["2026-01-02 03:04:05.123456+00", "2026-01-02 03:04:05+00", "2026-01-02 03:04:05+05:30",
               "0044-03-15 12:00:00+00 BC", "infinity", "-infinity", "2026-01-02 03:04:05", "garbage+00",
               "", "+00", "2026-13-45 99:99:99+00"]
TIMESTAMP = ["2026-01-02 03:04:05.5", "2026-01-02 03:04:05", "0044-03-15 12:00:00 BC", "infinity",
             "-infinity", "", "٣2026-01-01 00:00:00"]
TEXT_ARRAYS = ["{}", "{a,b,c}", "{a,NULL,c}", '{"a b",c}', '{"quote \\" in",x}', "{{a,b},{c,d}}",
               "[0:1]={a,b}", "{é,日本}", "{a\tb}", "{,}", "not an array", "{NULLS,null}"]
INT_ARRAYS = ["{}", "{1,2,3}", "{1,NULL,-3}", "{{1,2},{3,4}}", "[1:2]={5,6}", "{1,x}", "{007}", "{ 1}",
              "{9223372036854775807}", "{,}"]
BOOL_ARRAYS = ["{t,f,NULL}", "{}", "{{t},{f}}"]
JSONS = ['{"a": 1}', "[1, 2, 3]", '"string"', "null", '{"nested": {"x": [true, false]}}', "3.14"]
FLOATS = ["1.5", "-0", "NaN", "Infinity", "-Infinity", "1e+300", "0.1", "x"]
BYTEAS = ["\\x", "\\xdeadbeef", "deadbeef"]


# a value of every column in COLUMNS, as pgoutput sends it
TYPICAL = [b"t" + struct.pack(">i", len(v.encode())) + v.encode() for v in (
    "42", "9000000000", "name-42", "42.42", "t", "2026-01-01 00:00:42+00", "2026-01-01 00:00:42", "{tag-2,group-0}",
    "{1,2}", "{t}", '{"i": 42, "label": "item 42"}', "1.5", "\\x00", "a-b", "2026-01-01", "x")]


def value_for(type_oid: int, rng: random.Random) -> bytes:
    """One pgoutput column: text, null, unchanged TOAST, or now and then invalid UTF-8."""
    roll = rng.random()
    if roll < 0.08:
        return COL_NULL
    if roll < 0.10:
        return COL_UNCHANGED
    if roll < 0.11:
        raw = rng.choice([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"ok\xe2\x82", b"\xf4\x90\x80\x80"])
        return b"t" + struct.pack(">i", len(raw)) + raw
    pools: dict[int, list[str]] = {
        types.INT4: INTS, types.INT8: INTS, types.BOOL: ["t", "f", "x", ""], types.TIMESTAMPTZ: TIMESTAMPTZ,
        types.TIMESTAMP: TIMESTAMP, 1009: TEXT_ARRAYS, 1007: INT_ARRAYS, 1000: BOOL_ARRAYS, types.JSONB: JSONS,
        types.FLOAT8: FLOATS, types.BYTEA: BYTEAS,
    }
    pool = pools.get(type_oid, TEXTS)
    text = rng.choice(pool) if rng.random() < 0.8 or pool is TEXTS else rng.choice(TEXTS)
    raw = text.encode()
    return b"t" + struct.pack(">i", len(raw)) + raw


def relation(identity: str, key_columns: tuple[int, ...]) -> Relation:
    full = identity == "f"
    return Relation(OID, "public", "ev\"ents", identity, tuple(
        Column(name, oid, -1, full or i in key_columns) for i, (name, oid) in enumerate(COLUMNS)
    ))


def builders(
    rel: Relation, needs_key: bool, key_from: str | None = None, transforms: list[dict[str, Any]] | None = None
) -> tuple[EventBuilder, EventBuilder]:
    compiled_hot_path()
    cfg = make_config(key_from=key_from or "", publisher={"tombstones": True},  # a DELETE is marked on both paths
                      transforms=transforms, hash_key=HASH_KEY if transforms else "")
    fast = EventBuilder(cfg, types.TypeRegistry(), needs_key=needs_key)
    slow = EventBuilder(cfg, types.TypeRegistry(), needs_key=needs_key, compiled=False)
    assert fast.hot is not None
    primary = ("id", "big") if rel.replica_identity == "f" else ()
    fast.add_relation(rel, primary)
    slow.add_relation(rel, primary)
    return fast, slow


def outcome(builder: EventBuilder, msg: bytes, txn: Transaction) -> Any:
    try:
        out = builder.change(msg, txn)
    except DecodeError as exc:
        return ("error", str(exc), txn.ordinal)
    assert out is not None
    return (out.id, out.subject, out.body, out.key, out.action, out.schema, out.table, out.tombstone, out.headers,
            out.content_type, out.header_lines, txn.ordinal)


def random_tuple(rng: random.Random, columns: int | None = None) -> bytes:
    count = len(COLUMNS) if columns is None else columns
    return tuple_data(*(value_for(COLUMNS[i][1], rng) for i in range(count)))


def random_message(rng: random.Random) -> bytes:
    shape = rng.random()
    count = len(COLUMNS) if rng.random() < 0.97 else rng.randrange(0, len(COLUMNS))  # a short tuple now and then
    new = random_tuple(rng, count)
    if shape < 0.35:
        return insert_msg(OID, new)
    if shape < 0.7:
        old_kind = rng.choice([None, b"K", b"O"])
        old = None if old_kind is None else random_tuple(rng)
        return update_msg(OID, new, old, old_kind or b"K")
    return delete_msg(OID, rng.choice([b"K", b"O"]), random_tuple(rng))


def test_compiled_path_is_built_where_ci_runs() -> None:
    compiled_hot_path()


def test_pure_python_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTENER_PURE_PYTHON", "1")
    assert hotpath.load() is None
    assert EventBuilder(make_config(), types.TypeRegistry(), needs_key=False).hot is None


@pytest.mark.parametrize("identity,key_columns,needs_key,key_from", [
    ("d", (0,), False, None),
    ("d", (0,), True, None),
    ("d", (0, 2), True, None),  # composite key with text that needs escaping
    ("f", (), True, None),
    ("i", (1,), True, "name"),
    ("n", (), True, None),
])
def test_random_changes_match_the_python_path(
    identity: str, key_columns: tuple[int, ...], needs_key: bool, key_from: str | None
) -> None:
    rng = random.Random(f"{identity}{key_columns}{needs_key}")
    fast, slow = builders(relation(identity, key_columns), needs_key, key_from)
    fast_txn = fast.begin(0x1_6B37_4D48, 820_000_000_000_000)
    slow_txn = slow.begin(0x1_6B37_4D48, 820_000_000_000_000)
    taken = marked = 0
    for _ in range(3000):
        msg = random_message(rng)
        expected = outcome(slow, msg, slow_txn)
        marked += expected[0] != "error" and expected[7] is True  # a DELETE to be followed by a tombstone
        before = fast.hot.event  # type: ignore[union-attr]
        assert outcome(fast, msg, fast_txn) == expected, msg
        plan = fast.relations[OID].plan
        assert plan is not None
        if before(msg, plan, "x", None, "y", needs_key) is not None:
            taken += 1
    assert taken > 50  # the compiled path wrote some itself (odd values are common here by design)
    assert (marked > 50) == (needs_key and identity != "n")  # a DELETE without a key has no tombstone



@pytest.mark.usefixtures("frozen_clock")
@pytest.mark.parametrize("fmt", ["wal-listener", "debezium"])
def test_a_table_wider_than_the_stack_arrays_matches_the_python_path(fmt: str) -> None:
    """80 columns: the compiled path takes its column arrays from the heap (more than 64), writes the events
    itself and writes what the Python path writes."""
    rng = random.Random(fmt)
    rel = Relation(OID, "public", "wide", "d", tuple(
        Column(f"c{i}", types.INT8 if i % 2 else types.TEXT, -1, i == 0) for i in range(80)))
    fast, slow = builders(rel, True) if fmt == "wal-listener" else dbz_builders(rel, True, False)

    def row() -> bytes:
        values = [str(rng.randrange(-10**12, 10**12)) if i % 2 else rng.choice(TEXTS) for i in range(80)]
        return tuple_data(*(COL_NULL if i and rng.random() < 0.1 else col_text(v) for i, v in enumerate(values)))

    fast_txn, slow_txn = (b.begin(0x1_6B37_4D48, 820_000_000_000_000) for b in (fast, slow))
    for txn in (fast_txn, slow_txn):
        txn.xid, txn.lsn = 7781, 0x1_6B37_4D50
    hot, info = fast.hot, fast.relations[OID]
    assert hot is not None and (info.plan if fmt == "wal-listener" else info.debezium_plan) is not None

    def compiled(msg: bytes) -> Any:
        if info.debezium_plan is not None:
            return hot.debezium_event(msg, info.debezium_plan, "x", None, 0, 7781, 0x1_6B37_4D50, 0, None, True)
        return hot.event(msg, info.plan, "x", None, "y", True)  # type: ignore[arg-type]

    for msg in [insert_msg(OID, row()), update_msg(OID, row(), row(), b"O"), delete_msg(OID, b"K", row())] * 20:
        assert outcome(fast, msg, fast_txn) == outcome(slow, msg, slow_txn)
        assert compiled(msg) is not None  # the compiled path wrote it, not the Python one


#: characters that must be escaped in a JSON string, and their neighbours that must not be
ESCAPED_CHARACTERS = ['"', "\\", "\x00", "\x08", "\t", "\n", "\x0c", "\r", "\x1f"]
CLEAN_NEIGHBOURS = [" ", "!", "#", "[", "]", "\x7f", "é", "日"]


@pytest.mark.parametrize("special", ESCAPED_CHARACTERS + CLEAN_NEIGHBOURS)
def test_text_is_escaped_like_the_python_path_at_every_offset(special: str) -> None:
    """The compiled path scans text for what JSON escapes 16 bytes, then a word (8 bytes), at a time, and
    escapes each such character found in a block by its bit: one such character at every offset of texts up
    to 40 bytes long, two of them at every distance, runs of them (every byte, every other byte) across the
    blocks, and 4 KB texts (the wide workload's) with it near the end, are written byte for byte as the
    Python path writes them."""
    fast, slow = builders(relation("d", (0,)), needs_key=True)
    txn_fast, txn_slow = fast.begin(0x10, 0), slow.begin(0x10, 0)
    texts = []
    for length in range(0, 41):
        for at in range(length):
            texts.append("a" * at + special + "b" * (length - at - 1))
    for gap in range(0, 20):
        texts.append("x" * 5 + special + "y" * gap + special + "z" * 3)
    for count in range(1, 41):
        texts += [special * count, "a" + special * count, ("b" + special) * count, ("cd" + special) * count]
    body = "0123456789abcdef" * 256  # 4 KB
    texts += [body, body + special, body[:-9] + special + body[-8:], special + body, body.replace("7", special)]
    plan = fast.relations[OID].plan
    assert plan is not None and fast.hot is not None
    for text in texts:
        raw = text.encode()
        row = tuple_data(*[b"t" + struct.pack(">i", len(raw)) + raw if i == 2 else v for i, v in enumerate(TYPICAL)])
        msg = insert_msg(OID, row)
        assert fast.hot.event(msg, plan, "id-1", None, "t", True) is not None  # the compiled path wrote it
        assert outcome(fast, msg, txn_fast) == outcome(slow, msg, txn_slow), text


@pytest.mark.parametrize("bad", [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82", b"\xf4\x90\x80\x80", b"\x80"])
def test_invalid_utf8_is_left_to_the_python_path_at_every_offset(bad: bytes) -> None:
    """The compiled UTF-8 check reads ASCII 16 and 8 bytes at a time: an invalid sequence at any offset of
    texts up to 40 bytes long (and near the end of 4 KB) still sends the message to the Python path."""
    fast, slow = builders(relation("d", (0,)), needs_key=True)
    txn_fast, txn_slow = fast.begin(0x10, 0), slow.begin(0x10, 0)
    plan = fast.relations[OID].plan
    assert plan is not None and fast.hot is not None
    raws = [b"a" * at + bad + b"b" * (length - at) for length in range(0, 41) for at in range(length + 1)]
    raws += [b"c" * 4096 + bad, b"c" * 4090 + bad + b"d" * 9]
    for raw in raws:
        row = tuple_data(*[b"t" + struct.pack(">i", len(raw)) + raw if i == 2 else v for i, v in enumerate(TYPICAL)])
        msg = insert_msg(OID, row)
        assert fast.hot.event(msg, plan, "id-1", None, "t", True) is None, raw
        assert outcome(fast, msg, txn_fast) == outcome(slow, msg, txn_slow), raw


def begin_msg(final_lsn: int, micros: int, xid: int) -> bytes:
    return b"B" + struct.pack(">QqI", final_lsn, micros, xid)


def begin_outcome(builder: EventBuilder, msg: bytes) -> Any:
    try:
        return builder.begin_message(msg)
    except (DecodeError, OverflowError) as exc:
        return ("error", type(exc).__name__)


def test_begin_messages_match_the_python_path() -> None:
    """A transaction's shared parts (id prefix and bits, commitTime text, xid) from the compiled Begin
    decoder are the Python path's, for every LSN and commit time (years 1000..9999 compiled, the rest
    and malformed messages in Python), and an event's id built on either is the same."""
    fast, slow = builders(relation("d", (0,)), needs_key=False)
    rng = random.Random("begin")
    year = 365 * 86400 * 10**6
    times = [0, 1, -1, 999_999, 1_000_000, -1_000_000, 86_399_999_999, 86_400_000_000, -86_400_000_001,
             820_000_000_000_000, 59 * 86_400 * 10**6, 60 * 86_400 * 10**6, -(10**6) * 86_400 * 366,
             -31_556_995_200_000_000 - 1, -31_556_995_200_000_000, 252_455_615_999_999_999,
             252_455_616_000_000_000, 2**63 - 1, -(2**63)]
    times += [rng.randrange(-2000 * year, 8000 * year) for _ in range(3000)]
    times += [rng.randrange(-(2**63), 2**63) for _ in range(200)]
    lsns = [0, 1, 2**64 - 1, 0x1_6B37_4D48, *(rng.randrange(2**64) for _ in range(200))]
    compiled = 0
    for i, micros in enumerate(times):
        msg = begin_msg(lsns[i % len(lsns)], micros, rng.randrange(2**32))
        expected = begin_outcome(slow, msg)
        assert begin_outcome(fast, msg) == expected, msg
        compiled += fast._begin_hot is not None and fast._begin_hot(msg, fast._slot_hash) is not None
        if isinstance(expected, Transaction):
            assert outcome(fast, insert_msg(OID, tuple_data(*TYPICAL)), begin_outcome(fast, msg))[0] == \
                outcome(slow, insert_msg(OID, tuple_data(*TYPICAL)), expected)[0]
    assert compiled > 2500
    for bad in (b"B", b"B" + bytes(19), b"C" + bytes(20)):
        assert begin_outcome(fast, bad) == begin_outcome(slow, bad) == ("error", "DecodeError")
    longer = begin_msg(0x1_6B37_4D48, 820_000_000_000_000, 7) + b"x"  # trailing bytes: Python reads the fields
    assert begin_outcome(fast, longer) == begin_outcome(slow, longer)


@pytest.mark.parametrize("action", ["insert", "update", "delete"])
def test_a_typical_row_is_written_by_the_compiled_path(action: str) -> None:
    """The reference benchmark's row shape never falls back to Python."""
    fast, _ = builders(relation("d", (0,)), needs_key=True)
    row = tuple_data(*TYPICAL)
    key = tuple_data(*(b"t" + struct.pack(">i", 2) + b"42" if i == 0 else COL_NULL for i in range(len(COLUMNS))))
    msg = {"insert": insert_msg(OID, row), "update": update_msg(OID, row), "delete": delete_msg(OID, b"K", key)}[action]
    plan = fast.relations[OID].plan
    assert plan is not None and fast.hot is not None
    result = fast.hot.event(msg, plan, "id-", 0x1234, "2026-01-01T00:00:00.000000Z", True)
    assert result is not None
    assert result[0] == "id-000000001234"
    body = orjson.loads(result[1])
    assert body["id"] == result[0]
    assert result[2] == b"42"
    if action == "delete":
        assert body["data"] == {} and body["dataOld"] == {"id": 42}
    else:
        assert body["data"]["created_at"] == "2026-01-01T00:00:42Z"
        assert body["data"]["tags"] == ["tag-2", "group-0"]
        assert body["data"]["payload"] == {"i": 42, "label": "item 42"}
        assert body["data"]["raw"] == "AA=="


@pytest.mark.parametrize("action", ["insert", "update", "delete"])
def test_the_compiled_path_makes_the_message_the_class_would(action: str) -> None:
    """Given the table's shape, event() answers the Message itself: equal, field for field, to the one the
    class makes of its tuple answer; the shape of another table in between is read anew."""
    fast, _ = builders(relation("d", (0,)), needs_key=True)
    row = tuple_data(*TYPICAL)
    key = tuple_data(*(b"t" + struct.pack(">i", 2) + b"42" if i == 0 else COL_NULL for i in range(len(COLUMNS))))
    msg = {"insert": insert_msg(OID, row), "update": update_msg(OID, row), "delete": delete_msg(OID, b"K", key)}[action]
    info = fast.relations[OID]
    assert info.plan is not None and info.shape is not None and fast.hot is not None
    hot, when = fast.hot, "2026-01-01T00:00:00.000000Z"
    done = hot.event(msg, info.plan, "id-", 0x1234, when, True)
    assert done is not None
    expected = Message(done[0], info.subject, done[1], info.schema, info.table, action.upper(), done[2])
    other = (Message, "other.subject", "s", "t", ("I", "U", "D"), *info.shape[5:])
    for shape, wanted in ((info.shape, expected), (other, None), (info.shape, expected)):
        made = hot.event(msg, info.plan, "id-", 0x1234, when, True, None, shape)
        assert type(made) is Message
        if wanted is None:  # the other table's: its subject, schema, table and action names
            assert (made.subject, made.schema, made.table, made.action) == ("other.subject", "s", "t",
                                                                            action[0].upper())
        else:
            assert made == wanted and made.headers is None and made.content_type == "" and made.header_lines == b""
    # fields the class does not have in slots: the class is called
    no_slots = (*info.shape[:5], None, None)
    assert hot.event(msg, info.plan, "id-", 0x1234, when, True, None, no_slots) == expected  # type: ignore[arg-type]


def test_change_makes_the_event_in_one_call_and_leaves_the_rest_to_python() -> None:
    """change() makes a published change of a compiled table whole and counts the transaction's ordinal; an
    action the filter leaves out, another table or a transaction without an id prefix it leaves (None) to
    EventBuilder.change_rest, which publishes the same events."""
    compiled_hot_path()
    cfg = make_config(tables={'ev"ents': ["insert", "update"]})  # DELETE not published
    built = EventBuilder(cfg, types.TypeRegistry(), needs_key=True)
    slow = EventBuilder(cfg, types.TypeRegistry(), needs_key=True, compiled=False)
    for b in (built, slow):
        b.add_relation(relation("d", (0,)))
    hot = built.hot
    assert hot is not None and built.hot_change is not None and OID in built.compiled
    row = tuple_data(*TYPICAL)
    key = tuple_data(*(b"t" + struct.pack(">i", 2) + b"42" if i == 0 else COL_NULL for i in range(len(COLUMNS))))
    txn, slow_txn = built.begin(0x16B374D48, 820_000_000_000_000), slow.begin(0x16B374D48, 820_000_000_000_000)
    made = built.hot_change(insert_msg(OID, row), built.compiled, txn, None)
    assert type(made) is Message and txn.ordinal == 1 and made.action == "INSERT"
    assert outcome(slow, insert_msg(OID, row), slow_txn)[:-1] == (
        made.id, made.subject, made.body, made.key, made.action, made.schema, made.table, made.tombstone,
        made.headers, made.content_type, made.header_lines)
    left = [delete_msg(OID, b"K", key), insert_msg(OID + 1, row)]  # not published; a table it was not given
    for msg in left:
        assert built.hot_change(msg, built.compiled, txn, None) is None and txn.ordinal == 1
    assert built.change_rest(left[0], txn) is None and txn.ordinal == 2  # counted as the Python path counts it
    no_prefix = Transaction(0x16B374D48, txn.commit_time)
    assert built.hot_change(update_msg(OID, row), built.compiled, no_prefix, None) is None
    assert built.change(update_msg(OID, row), no_prefix) is not None and no_prefix.ordinal == 1
    # text that is not UTF-8, which the compiled path leaves to Python: change() tries the compiled call once (in
    # hot_change), then Python takes it (here: the error it raises)
    calls: list[str] = []

    class Counting:
        def __getattr__(self, name: str) -> Any:
            calls.append(name)
            return getattr(hot, name)

    odd = tuple_data(*[b"t" + struct.pack(">i", 1) + b"\xff" if i == 2 else v for i, v in enumerate(TYPICAL)])
    built.hot = Counting()  # type: ignore[assignment]
    txn, slow_txn = built.begin(0x16B374E00, 820_000_000_000_000), slow.begin(0x16B374E00, 820_000_000_000_000)
    assert outcome(built, insert_msg(OID, odd), txn) == outcome(slow, insert_msg(OID, odd), slow_txn)
    assert calls.count("event") == 0 and txn.ordinal == slow_txn.ordinal
    built.hot = hot
    with pytest.raises(TypeError):
        hot.change(insert_msg(OID, row), [], txn, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="a compiled table is"):
        hot.change(insert_msg(OID, row), {OID: (False, built.compiled[OID][1])}, txn, None)  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="transaction_fields"):
        hot.transaction_fields((Transaction.__dict__["ordinal"],))
    with pytest.raises(TypeError, match="transaction_fields"):
        names = ("id", "subject", "body", "schema", "table", "action", "key")
        hot.transaction_fields((*(Message.__dict__[n] for n in names[:6]), "x"))


def test_a_shape_that_is_not_one_raises_a_type_error() -> None:
    fast, _ = builders(relation("d", (0,)), needs_key=False)
    info = fast.relations[OID]
    assert info.plan is not None and info.shape is not None and fast.hot is not None
    msg = insert_msg(OID, tuple_data(*TYPICAL))
    for bad in ((), info.shape[:6], ("not a class", *info.shape[1:]), (*info.shape[:4], "INSERT", *info.shape[5:]),
                (*info.shape[:4], ("INSERT", "UPDATE"), *info.shape[5:])):
        with pytest.raises(TypeError):
            fast.hot.event(msg, info.plan, "id-", 1, "t", False, None, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="CloudEvents or a topic route"):
        fast.hot.event(msg, info.plan, "id-", 1, "t", False, ("ce",), info.shape)  # type: ignore[call-overload]


def test_bad_arguments_raise_type_errors() -> None:
    fast, _ = builders(relation("d", (0,)), needs_key=False)
    assert fast.hot is not None
    with pytest.raises(TypeError):
        fast.hot.event(b"I", ("x", (), ()), "id", None, "t", False)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        fast.hot.event(b"I", (b"", ((b"", "not an int", None, False),), ()), "id", None, "t", False)  # type: ignore[arg-type]
    plan = fast.relations[OID].plan
    assert plan is not None
    with pytest.raises(TypeError):
        fast.hot.event(b"I", plan, b"id", 1, "t", False)  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="below 2\\*\\*48"):
        fast.hot.event(b"I", plan, "id-", 1 << 48, "t", False)
    with pytest.raises(ValueError, match="ASCII"):
        fast.hot.event(b"I", plan, "id-é", 1, "t", False)
    with pytest.raises(TypeError):
        fast.hot.set_encoder(42)


@pytest.mark.parametrize("identity,old_kind", [("d", None), ("f", b"O"), ("d", b"K")])
def test_unchanged_toast_update_is_written_by_the_compiled_path(identity: str, old_kind: bytes | None) -> None:
    """The wide workload's update (a TOASTed column left alone) stays on the compiled path, and the
    column is left out, or taken from the old row where it has it, exactly as the Python path does."""
    fast, slow = builders(relation(identity, (0, 2)), needs_key=True)
    values = TYPICAL
    new = tuple_data(*[COL_UNCHANGED if i in (2, 10) else v for i, v in enumerate(values)])
    old = None if old_kind is None else tuple_data(*[
        v if old_kind == b"O" or i in (0, 2) else COL_NULL for i, v in enumerate(values)])
    msg = update_msg(OID, new, old, old_kind or b"K")
    plan = fast.relations[OID].plan
    assert plan is not None and fast.hot is not None
    assert fast.hot.event(msg, plan, "id-1", None, "t", True) is not None
    assert outcome(fast, msg, fast.begin(0x10, 0)) == outcome(slow, msg, slow.begin(0x10, 0))
    data = orjson.loads(fast.hot.event(msg, plan, "id-1", None, "t", True)[1])["data"]  # type: ignore[index]
    assert ("name" in data) == (old_kind is not None)  # an identity column: the old key has it
    assert ("payload" in data) == (old_kind == b"O")


def random_row(rng: random.Random) -> list[bytes | None]:
    """A backfilled row: each column's text form (None for NULL), as the chunk's SELECT returns it."""
    row: list[bytes | None] = []
    for _, oid in COLUMNS:
        value = value_for(oid, rng)
        while value == COL_UNCHANGED:  # a SELECT has no unchanged TOAST
            value = value_for(oid, rng)
        row.append(None if value == COL_NULL else value[5:])
    return row


@pytest.mark.parametrize("identity,key_columns,needs_key", [("d", (0,), True), ("f", (), True), ("d", (0, 2), False)])
def test_backfilled_rows_match_the_python_path(identity: str, key_columns: tuple[int, ...], needs_key: bool) -> None:
    """READ events: the compiled read_row writes what the Python path writes (and the data of a READ is
    the data its INSERT would carry)."""
    rng = random.Random(f"read{identity}{key_columns}")
    fast, slow = builders(relation(identity, key_columns), needs_key)
    fast_info, slow_info = fast.relations[OID], slow.relations[OID]
    taken = 0
    for n in range(2000):
        row = random_row(rng)
        ident, at = f"id-{n}", "2026-01-02T03:04:05.000006Z"
        try:
            expected: Any = slow.read(slow_info, row, ident, at)
            expected = (expected.body, expected.key, expected.action)
        except UnicodeDecodeError:
            expected = "invalid utf-8"
        try:
            got: Any = fast.read(fast_info, row, ident, at)
            got = (got.body, got.key, got.action)
        except UnicodeDecodeError:
            got = "invalid utf-8"
        assert got == expected, row
        assert fast_info.plan is not None and fast.hot is not None
        if fast.hot.read_row(row, fast_info.plan, ident, at, needs_key) is not None:
            taken += 1
            insert = fast.change(insert_msg(OID, tuple_data(*(COL_NULL if v is None else b"t" + struct.pack(
                ">i", len(v)) + v for v in row))), fast.begin(1, 0))
            assert insert is not None
            data = insert.body[insert.body.index(b'"data":') : insert.body.index(b',"dataOld"')]
            assert data in got[0]  # byte for byte the INSERT's data
    assert taken > 50  # the compiled path wrote some itself (odd values are common here by design)


# transforms (listener/transforms.py): each shape of the table's columns, masks, topics and keys
TRANSFORMS: dict[str, dict[str, Any]] = {
    "exclude, every mask, topic, key": {
        "tables": ['ev"ents'], "columns": {"exclude": ["day", "raw"]},
        "mask": {"name": "hash", "amount": "redact", "active": "null", "tags": "hash", "payload": "redact"},
        "topic": "by.{ref}.{name}", "key": ["ref", "id"],
    },
    "include without the key column, masked key": {
        "tables": ["public.*"], "columns": {"include": ["big", "name", "created_at", "counts", 'weird "col"\n']},
        "mask": {"big": "hash", "created_at": "null"}, "key": ["big"],
    },
    "topic from an identity column, default key": {
        "tables": ["other.x", "public.ev\"ents"], "columns": {"exclude": ["payload"]},
        "mask": {"ratio": "hash"}, "topic": "t-{id}",
    },
    "masks only": {"tables": ['ev"ents'], "mask": {"id": "hash", "name": "redact", "local_at": "null"}},
}


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("identity,key_columns", [("d", (0,)), ("f", ()), ("d", (0, 2))])
def test_random_changes_with_transforms_match_the_python_path(
    name: str, identity: str, key_columns: tuple[int, ...]
) -> None:
    rng = random.Random(f"{name}{identity}{key_columns}")
    fast, slow = builders(relation(identity, key_columns), True, transforms=[TRANSFORMS[name]])
    assert fast.relations[OID].transform is not None
    fast_txn = fast.begin(0x1_6B37_4D48, 820_000_000_000_000)
    slow_txn = slow.begin(0x1_6B37_4D48, 820_000_000_000_000)
    taken = 0
    plan = fast.relations[OID].plan
    assert plan is not None and fast.hot is not None
    for _ in range(2000):
        msg = random_message(rng)
        assert outcome(fast, msg, fast_txn) == outcome(slow, msg, slow_txn), msg
        if fast.hot.event(msg, plan, "x", None, "y", True) is not None:
            taken += 1
    assert taken > 50


@pytest.mark.parametrize("name", TRANSFORMS)
def test_backfilled_rows_with_transforms_match_the_python_path(name: str) -> None:
    rng = random.Random(f"read{name}")
    fast, slow = builders(relation("d", (0,)), True, transforms=[TRANSFORMS[name]])
    fast_info, slow_info = fast.relations[OID], slow.relations[OID]
    taken = 0
    for n in range(1000):
        row = random_row(rng)
        results = []
        for built, info in ((fast, fast_info), (slow, slow_info)):
            try:
                got = built.read(info, row, f"id-{n}", "2026-01-02T03:04:05Z")
                results.append((got.subject, got.body, got.key))
            except UnicodeDecodeError:
                results.append(("invalid utf-8",))
        assert results[0] == results[1], row
        assert fast_info.plan is not None and fast.hot is not None
        taken += fast.hot.read_row(row, fast_info.plan, "i", "t", True) is not None
    assert taken > 50


def test_routed_topics_at_the_length_limit_and_past_the_topic_cache_match_the_python_path() -> None:
    """The compiled route renders its topic in a fixed buffer of the limit's size (249 bytes) and keeps the
    last topics it made for reuse: names one byte either side of the limit (a 3-byte escape crossing it too)
    and 600 tenants in turn, twice (more than the compiled path keeps), give the Python path's topics."""
    fast, slow = builders(relation("d", (0,)), True, transforms=[{"tables": ['ev"ents'], "topic": "by.{ref}"}])
    fast_txn = fast.begin(0x1_6B37_4D48, 820_000_000_000_000)
    slow_txn = slow.begin(0x1_6B37_4D48, 820_000_000_000_000)
    room = 249 - len("wal_listener.by.")
    refs = ["a" * (room - 1), "a" * room, "a" * (room + 1), "a" * (room - 3) + ".", "a" * (room - 2) + ".",
            "é" * (room // 6), "é" * (room // 6 + 1)]  # "." is written "_2e", "é" "_c3_a9"
    refs += [f"tenant {n % 600}" for n in range(1200)]
    subjects = []
    for ref in refs:
        values = list(TYPICAL)
        values[13] = col_text(ref)
        msg = insert_msg(OID, tuple_data(*values))
        got = outcome(fast, msg, fast_txn)
        assert got == outcome(slow, msg, slow_txn), ref
        subjects.append(got[1])
    own = 'wal_listener.public_ev"ents'  # too long: the table's own topic
    assert subjects[:7] == ["wal_listener.by." + "a" * (room - 1), "wal_listener.by." + "a" * room, own,
                            "wal_listener.by." + "a" * (room - 3) + "_2e", own,
                            "wal_listener.by." + "_c3_a9" * (room // 6), own]
    assert subjects[7] == "wal_listener.by.tenant_200" and subjects[607] == subjects[7]
    # the compiled change() made them; a topic too long goes to the table's own, its reason counted once
    info = fast.relations[OID]
    assert fast.hot_change is not None and OID in fast.compiled and info.route is not None
    cell = info.fallbacks[FALLBACK_REASONS.index("too_long")]
    assert cell is not None
    counted = cell[0]
    values = list(TYPICAL)
    values[13] = col_text("a" * (room + 1))
    made = fast.hot_change(insert_msg(OID, tuple_data(*values)), fast.compiled, fast_txn, None)
    assert made is not None and made.subject == own and cell[0] == counted + 1
    # once the reason's count exists, change() adds to it in place: what counts a new reason is not called
    entry = fast.compiled[OID]
    route = entry[6]
    assert route is not None and route[0] is info.fallbacks

    def uncalled(reason: int) -> str:
        raise AssertionError(f"called for reason {reason}")

    moved = {OID: (*entry[:6], (route[0], route[1], uncalled), None)}
    made = fast.hot_change(insert_msg(OID, tuple_data(*values)), moved, fast_txn, None)  # type: ignore[arg-type]
    assert made is not None and made.subject == own and cell[0] == counted + 2
    # a reason without a count yet goes to it (here: what it raises), and a route that is not one is refused
    info.fallbacks[FALLBACK_REASONS.index("too_long")] = None
    with pytest.raises(AssertionError, match="called for reason"):
        fast.hot_change(insert_msg(OID, tuple_data(*values)), moved, fast_txn, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="a route is"):
        fast.hot_change(insert_msg(OID, tuple_data(*values)), {OID: (*entry[:6], route[2], None)}, fast_txn, None)  # type: ignore[dict-item]


def test_a_typical_row_with_a_transform_stays_on_the_compiled_path() -> None:
    """What a transform does, on the compiled path: columns left out, masks, the topic and the key."""
    fast, _ = builders(relation("d", (0,)), True, transforms=[TRANSFORMS["exclude, every mask, topic, key"]])
    plan = fast.relations[OID].plan
    assert plan is not None and fast.hot is not None
    result = fast.hot.event(insert_msg(OID, tuple_data(*TYPICAL)), plan, "id-", 1, "t", True)
    assert result is not None and len(result) == 4
    data = orjson.loads(result[1])["data"]
    assert "day" not in data and "raw" not in data
    name_hash = hmac.new(HASH_KEY.encode(), b"name-42", "sha256").hexdigest()
    assert data["name"] == name_hash
    assert data["tags"] == hmac.new(HASH_KEY.encode(), b"{tag-2,group-0}", "sha256").hexdigest()
    assert (data["amount"], data["active"], data["payload"]) == ("[redacted]", None, "[redacted]")
    assert data["id"] == 42 and data["ref"] == "a-b"
    assert result[2] == orjson.dumps(["a-b", "42"])
    assert result[3] == f"wal_listener.by.a-b.{name_hash}"


# -- publisher.format cloudevents (listener/_hotpath_c/cloudevents.c) ---------------------------------------------

#: each broker's binding: Pub/Sub's (and the default), NATS's, Kafka's, RabbitMQ's
CE_BINDINGS = {"ce-": CE_HEADERS, "nats": NATS_HEADERS, "kafka": Binding("ce_", percent_encoded=False),
               "amqp": Binding("cloudEvents_", percent_encoded=False)}


def ce_builders(mode: str, binding: Binding, transform: str | None) -> tuple[EventBuilder, EventBuilder]:
    compiled_hot_path()
    cfg = make_config(publisher={"format": "cloudevents", "cloudEvents": {"mode": mode, "source": "//pg a/db%"}},
                      transforms=None if transform is None else [TRANSFORMS[transform]],
                      hash_key=HASH_KEY if transform else "")
    fast = EventBuilder(cfg, types.TypeRegistry(), needs_key=True, binding=binding)
    slow = EventBuilder(cfg, types.TypeRegistry(), needs_key=True, compiled=False, binding=binding)
    for built in (fast, slow):
        built.add_relation(relation("d", (0, 2)))
    assert fast.relations[OID].ce is not None
    return fast, slow


def ce_message(message: Any) -> Any:
    """What each broker publishes of a message: the attributes, the NATS header lines (the compiled path writes
    them as lines for NATS, formats.Binding.lines; the Python path as a dict), the rest."""
    return (message.id, message.subject, message.body, message.key, message.action, message.attributes(),
            extra_headers(message), message.tombstone)


@pytest.mark.parametrize("transform", [None, "exclude, every mask, topic, key"])
@pytest.mark.parametrize("binding", CE_BINDINGS)
@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_cloudevents_match_the_python_path(mode: str, binding: str, transform: str | None) -> None:
    """The compiled path wraps changes and backfilled rows (its own and those the Python stages take) in the
    CloudEvent, attributes and headers in order, exactly as formats.CloudEvents does; an id the binding would
    percent-encode is left to the Python path."""
    rng = random.Random(f"ce{mode}{binding}{transform}")
    fast, slow = ce_builders(mode, CE_BINDINGS[binding], transform)
    fast_txn = fast.begin(0x1_6B37_4D48, 820_000_000_000_000)
    slow_txn = slow.begin(0x1_6B37_4D48, 820_000_000_000_000)
    plan, ce = fast.relations[OID].plan, fast.relations[OID].ce
    assert plan is not None and fast.hot is not None
    taken = 0
    for _ in range(1500):
        msg = random_message(rng)
        outcomes = []
        for built, txn in ((fast, fast_txn), (slow, slow_txn)):
            try:
                outcomes.append((ce_message(built.change(msg, txn)), txn.ordinal))
            except DecodeError as exc:
                outcomes.append((str(exc), txn.ordinal))
        assert outcomes[0] == outcomes[1], msg
        taken += fast.hot.event(msg, plan, "x-", 1, "2026-01-01T00:00:00.000001Z", True, ce) is not None
    assert taken > 50
    for n in range(600):
        row = random_row(rng)
        ident = f"id-{n}" if n % 5 else f'id %"é {n}'  # one the ce- bindings percent-encode
        results = []
        for built in (fast, slow):
            try:
                results.append(ce_message(built.read(built.relations[OID], row, ident, "2026-01-02T03:04:05Z")))
            except UnicodeDecodeError:
                results.append("invalid utf-8")
        assert results[0] == results[1], (row, ident)


@pytest.mark.parametrize("mode,binding", [("structured", "nats"), ("binary", "nats"), ("binary", "kafka")])
def test_cloudevents_of_a_typical_row_are_written_by_the_compiled_path(mode: str, binding: str) -> None:
    fast, _ = ce_builders(mode, CE_BINDINGS[binding], None)
    info = fast.relations[OID]
    assert info.plan is not None and info.ce is not None and fast.hot is not None
    done = fast.hot.event(insert_msg(OID, tuple_data(*TYPICAL)), info.plan, "id-", 1, "t", True, info.ce)
    assert done is not None and len(done) == 5 and done[3] is None
    if mode == "structured":
        assert done[4] is None and orjson.loads(done[1])["data"]["id"] == "id-000000000001"
    elif binding == "nats":  # the header lines themselves
        assert done[4] == (b"ce-specversion: 1.0\r\nce-type: io.wal-listener.insert\r\nce-source: //pg%20a/db%25\r\n"
                           b'ce-subject: public.ev%22ents\r\nce-datacontenttype: application/json\r\n'
                           b"ce-id: id-000000000001\r\nce-time: t\r\n")
    else:
        assert list(done[4]) == ["ce_specversion", "ce_type", "ce_source", "ce_subject", "ce_id", "ce_time"]
    with pytest.raises(TypeError):
        fast.hot.event(insert_msg(OID, tuple_data(*TYPICAL)), info.plan, "id-", 1, "t", True, ("bad",))


@pytest.mark.parametrize("mode,binding", [("structured", "nats"), ("binary", "nats"), ("binary", "kafka")])
def test_change_makes_cloudevents_in_one_call(mode: str, binding: str) -> None:
    """The compiled change() makes a CloudEvents table's Message itself, the one the Python path makes: the
    content type from the table's shape, the attributes as header lines (a binding that takes lines: the Python
    path's dict written as lines), as a dict, or none (structured mode); a Debezium table with CloudEvents is
    refused."""
    fast, slow = ce_builders(mode, CE_BINDINGS[binding], None)
    entry = fast.compiled[OID]
    assert fast.hot_change is not None and entry[7] is fast.relations[OID].ce
    fast_txn = fast.begin(0x1_6B37_4D48, 820_000_000_000_000)
    slow_txn = slow.begin(0x1_6B37_4D48, 820_000_000_000_000)
    for msg in (insert_msg(OID, tuple_data(*TYPICAL)), delete_msg(OID, b"O", tuple_data(*TYPICAL))):
        made = fast.hot_change(msg, fast.compiled, fast_txn, None)
        assert made is not None and fast_txn.ordinal == slow_txn.ordinal + 1
        python = slow.change(msg, slow_txn)
        assert python is not None and ce_message(made) == ce_message(python)
        assert made.content_type == python.content_type and made.tombstone is python.tombstone is False
        assert bool(made.header_lines) == (mode == "binary" and binding == "nats")
        assert (made.headers is not None) == (mode == "binary" and binding != "nats")
    with pytest.raises(TypeError, match="no CloudEvents"):
        fast.hot_change(insert_msg(OID, tuple_data(*TYPICAL)), {OID: (True, *entry[1:])}, fast_txn, None)


@pytest.mark.parametrize("char", [" ", "\x00", "\r", "\x7f", "é", "!", "~"])
def test_cloudevents_times_nats_py_would_change_are_left_to_the_python_path(char: str) -> None:
    """The compiled ce-time header line checks the time 8 bytes at a time (as the frames check ids): a character
    nats-py would strip or escape at any offset of times up to 32 characters leaves the event to the Python path;
    "!" and "~", the ends of the printable range, are written into the line."""
    fast, _ = ce_builders("binary", CE_BINDINGS["nats"], None)
    info = fast.relations[OID]
    assert info.plan is not None and info.ce is not None and fast.hot is not None
    msg = insert_msg(OID, tuple_data(*TYPICAL))
    for length in range(1, 33):
        for at in range(length):
            time = "1" * at + char + "2" * (length - at - 1)
            done = fast.hot.event(msg, info.plan, "id-", 1, time, True, info.ce)
            if char in "!~":
                assert done is not None and done[4].endswith(b"ce-time: " + time.encode() + b"\r\n"), time
            else:
                assert done is None, time


@pytest.mark.parametrize("length", [*range(0, 130), 1000, 65536])
def test_the_compiled_hmac_is_hmac_sha256(length: int) -> None:
    """The C implementation of HMAC-SHA256 against Python's (OpenSSL's), over every padding case and keys
    shorter and longer than a block."""
    module = compiled_hot_path()
    rng = random.Random(length)
    data = rng.randbytes(length)
    for key in (b"", b"k", HASH_KEY.encode(), rng.randbytes(64), rng.randbytes(65), rng.randbytes(200)):
        expected = hmac.new(key, data, "sha256").hexdigest()
        assert module.hmac_hex(module.hmac_prepare(key), data) == expected  # SHA extensions where the CPU has them
        assert module.hmac_hex(module.hmac_prepare(key), data, True) == expected  # the portable code


# -- publisher.format debezium (listener/_hotpath_c/debezium.c) ---------------------------------------------

MOOD, POSINT, MOOD_ARRAY = 90001, 90002, 90003
#: the type-coverage table of the Debezium workload (tests/support/debezium.py: every type of docs/formats.md and
#: the ones Debezium treats specially), with the type modifiers pgoutput sends, and a few more (arrays, bit(1))
DBZ_COLUMNS: list[tuple[str, int, int]] = [
    ("id", 23, -1), ("c_int2", 21, -1), ("c_int4", 23, -1), ("c_int8", 20, -1), ("c_oid", 26, -1),
    ("c_numeric", 1700, 1310730), ("c_numeric_free", 1700, -1), ("c_float4", 700, -1), ("c_float8", 701, -1),
    ("c_bool", 16, -1), ("c_json", 114, -1), ("c_jsonb", 3802, -1), ("c_int_array", 1007, -1),
    ("c_text_array", 1009, -1), ("c_timestamptz", 1184, -1), ("c_timestamp", 1114, -1), ("c_timestamp3", 1114, 3),
    ("c_date", 1082, -1), ("c_time", 1083, -1), ("c_time3", 1083, 3), ("c_timetz", 1266, -1),
    ("c_interval", 1186, -1), ("c_bytea", 17, -1), ("c_uuid", 2950, -1), ("c_text", 25, -1), ("c_varchar", 1043, 24),
    ("c_char", 1042, 7), ("c_enum", MOOD, -1), ("c_domain", POSINT, -1), ("c_inet", 869, -1), ("c_cidr", 650, -1),
    ("c_macaddr", 829, -1), ("c_money", 790, -1), ("c_int4range", 3904, -1), ("c_point", 600, -1),
    ("c_bit", 1560, 4), ("c_varbit", 1562, 8), ("c_bit1", 1560, 1), ("c_xml", 142, -1),
    ("c_int8_array", 1016, -1), ("c_date_array", 1182, -1), ("c_tstz_array", 1185, -1), ("c_numeric_array", 1231, -1),
    ("c_bool_array", 1000, -1), ("c_jsonb_array", 3807, -1), ("c_mood_array", MOOD_ARRAY, -1), ("c_xid", 28, -1),
    ('weird "col"\n', 25, -1),
]
DBZ_POOLS: dict[int, list[str]] = {
    21: INTS, 23: INTS, 20: INTS, 26: INTS, 28: INTS, POSINT: INTS,
    1700: ["12345678901234.123456", "0.000000000000000000000001", "NaN", "-0.000100", "Infinity", "-Infinity", "0"],
    700: FLOATS, 701: FLOATS, 16: ["t", "f", "x", ""],
    114: [*JSONS, '{"a": [1, 2, {"b": null}]}'], 3802: JSONS, 1007: INT_ARRAYS, 1016: INT_ARRAYS, 1009: TEXT_ARRAYS,
    1184: TIMESTAMPTZ,
    1114: ["2026-01-02 03:04:05.123456", "2026-01-02 03:04:05.123", "2026-01-02 03:04:05", "1969-12-31 23:59:59.999999",
           "1970-01-01 00:00:00", "0001-01-01 00:00:00", "9999-12-31 23:59:59.999999", "2024-02-29 12:00:00",
           "2023-02-29 12:00:00", "2026-01-02 03:04:05.1234567", "2026-01-02T03:04:05", "10000-01-01 00:00:00",
           "0044-03-15 12:00:00 BC", "infinity", "-infinity", "", "٣026-01-01 00:00:00", "2026-01-02 24:00:00",
           "2026-1-02 03:04:05", "0000-01-01 00:00:00", "2026-01-02 03:04:05.", "2026-01-02 03:04:60"],
    1082: ["2026-01-02", "1970-01-01", "1969-12-31", "0001-01-01", "9999-12-31", "2024-02-29", "2023-02-29",
           "0044-03-15 BC", "infinity", "-infinity", "20260102", "2026-W01-1", "", "10000-01-01", "٣026-01-01",
           "2026-13-01", "2026-00-10"],
    1083: ["03:04:05.123456", "03:04:05", "24:00:00", "03:04:05.1", "03:04:05.1234567", "3:04:05", "03:04", "",
           "03:04:05.", "99:99:99", "03:04:05.000000"],
    1266: ["03:04:05.123456+02", "23:30:00-01:30", "00:00:00+00", "03:04:05.120+05:30:15", "03:04:05.000+00",
           "03:04:05-00:30", "03:04:05+0230", "03:04:05.+02", "24:00:00+00", "garbage", "03:04:05+02:",
           "12:00:00+14", "03:04:05.5-0230", "03:04:05+02:30:", "03:04:05+02:3", ""],
    1186: ["P1Y2M3DT4H5M6.789S", "P-1DT-2H", "PT0S", "PT", "P", "P1M", "PT1.5H", "P1Y-2M", "PT-0.000001S",
           "P178000000Y", "PT2562047788H", "P1W", "-P1D", "P1DT", "PT5.S", "PT.5S", "P1234567890123456D", "P1D2D",
           "P3DT4H5M6S", "PT-6.5S", "P-178000000Y-11M-30DT-2562047788H-59M-59.999999S", "",
           "P\u0661D"],  # an Arabic-Indic digit: a digit to Python's regex
    17: ["\\x", "\\x00ff10", "\\xdeadbeef", "\\xDEADBEEF", "deadbeef", "\\xabc", "\\xzz", "\\xde ad", "\\x00",
         "\\x0001", "\\x000102", "\\x00010203", "\\x0001020304", "\\xfbff"],
    790: ["$12.34", "-$1,234.50", "($5.00)", "$0.00"], 3904: ["[1,10)", "empty"],
    600: ["(1.5,2.5)", "(1,2)", "(-0,1e+300)", "garbage"], 1560: ["1010", "0000", "1", "0", ""],
    1562: ["101", "1", "", "11111111"], 1182: ["{2026-01-02,NULL}", "{}", "{infinity}", "{x}"],
    1185: ["{\"2026-01-02 03:04:05+00\"}", "{}", "{NULL}"], 1231: ["{1.5,NaN,NULL}", "{}"],
    1000: BOOL_ARRAYS, 3807: ['{"{\\"a\\": 1}",null}', "{}"], MOOD_ARRAY: ["{sad,happy}", "{}", "{NULL}"],
}


def dbz_value(type_oid: int, rng: random.Random, convert: Converter | None, clean: bool) -> bytes:
    """One pgoutput column of a Debezium test table: mostly a value of its type, now and then any text, a NULL,
    an unchanged TOAST value or invalid UTF-8; ``clean``: only values its converter takes."""
    roll = rng.random()
    if roll < 0.05:
        return COL_NULL
    if roll < 0.07:
        return COL_UNCHANGED
    if roll < 0.075 and not clean:
        raw = rng.choice([b"\xff", b"\xc0\x80", b"ok\xe2\x82"])
        return b"t" + struct.pack(">i", len(raw)) + raw
    pool = DBZ_POOLS.get(type_oid, TEXTS)
    for _ in range(20):
        text = rng.choice(pool) if rng.random() < 0.97 or pool is TEXTS else rng.choice(TEXTS)
        if clean and convert is not None:
            try:
                convert(text)
            except Exception:  # not a clean value
                continue
        return col_text(text)
    return COL_NULL


def dbz_registry() -> types.TypeRegistry:
    registry = types.TypeRegistry()
    registry.add(types.PgType(MOOD, "e", 0, 0, "E", ","))
    registry.add(types.PgType(POSINT, "d", 23, 0, "N", ","))
    registry.add(types.PgType(MOOD_ARRAY, "b", 0, MOOD, "A", ","))
    return registry


def dbz_relation(identity: str, key_columns: tuple[int, ...]) -> Relation:
    full = identity == "f"
    return Relation(OID, "public", "ty\"pes", identity, tuple(
        Column(name, oid, modifier, full or i in key_columns) for i, (name, oid, modifier) in enumerate(DBZ_COLUMNS)
    ))


def dbz_builders(
    rel: Relation, needs_key: bool, schemas: bool, publisher: dict[str, Any] | None = None, key_from: str = "",
    transforms: list[dict[str, Any]] | None = None,
) -> tuple[EventBuilder, EventBuilder]:
    compiled_hot_path()
    cfg = make_config(key_from=key_from, publisher={"format": "debezium", "debezium": {"schemas": schemas},
                                                   **(publisher or {})},
                      transforms=transforms, hash_key=HASH_KEY if transforms else "")
    fast = EventBuilder(cfg, dbz_registry(), needs_key=needs_key)
    slow = EventBuilder(cfg, dbz_registry(), needs_key=needs_key, compiled=False)
    assert fast.hot is not None and slow.hot is None
    primary = ("id", "c_int8") if rel.replica_identity == "f" else ()
    facts = {"id": ColumnFacts(True), "c_text": ColumnFacts(True), "c_enum": ColumnFacts(False, "sad,ok,happy"),
             "c_mood_array": ColumnFacts(False, "sad,ok,happy")} if schemas else None
    for built in (fast, slow):
        built.add_relation(rel, primary, facts)
    assert fast.relations[OID].debezium_plan is not None and slow.relations[OID].debezium_plan is None
    return fast, slow


def dbz_outcome(builder: EventBuilder, msg: bytes, txn: Transaction) -> Any:
    """What the builder publishes for ``msg``, or the error it raises (a value no converter takes)."""
    try:
        out = builder.change(msg, txn)
    except Exception as exc:  # the same error on both paths is the promise
        return ("error", type(exc).__name__, str(exc), txn.ordinal)
    assert out is not None
    return (out.id, out.subject, out.body, out.key, out.action, out.schema, out.table, out.tombstone, out.headers,
            out.content_type, out.header_lines, txn.ordinal)


def dbz_whole(plan: Any, body: bytes) -> bytes:
    """The event a compiled Debezium call's body stands for: with schemas it follows the plan's value head."""
    return (plan[5] or b"") + body


def dbz_message(rng: random.Random, converters: tuple[Converter | None, ...]) -> bytes:
    """An Insert, Update or Delete of the Debezium test table; most of them (clean) only of values that convert."""
    clean = rng.random() < 0.6

    def row(count: int | None = None) -> bytes:
        n = len(DBZ_COLUMNS) if count is None else count
        return tuple_data(*(dbz_value(DBZ_COLUMNS[i][1], rng, converters[i], clean) for i in range(n)))

    count = len(DBZ_COLUMNS) if rng.random() < 0.98 else rng.randrange(0, len(DBZ_COLUMNS))
    shape = rng.random()
    if shape < 0.35:
        return insert_msg(OID, row(count))
    if shape < 0.7:
        old_kind = rng.choice([None, b"K", b"O"])
        return update_msg(OID, row(count), None if old_kind is None else row(), old_kind or b"K")
    return delete_msg(OID, rng.choice([b"K", b"O"]), row(count))


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The envelope's ts_ms/ts_us/ts_ns are the time of writing: the same on both paths."""
    monkeypatch.setattr(time, "time_ns", lambda: 1_767_323_045_123_456_789)
    module = hotpath.load()
    if module is not None:  # the compiled path reads the same clock itself (now_ns None)
        module.freeze_clock(1_767_323_045_123_456_789)
    yield
    if module is not None:
        module.freeze_clock(None)


@pytest.mark.usefixtures("frozen_clock")
@pytest.mark.parametrize("schemas", [False, True], ids=["schemas-disabled", "schemas-enabled"])
@pytest.mark.parametrize("identity,key_columns,needs_key,key_from,publisher", [
    ("d", (0,), True, "", None),
    ("d", (0,), False, "", None),
    ("d", (0, 24), True, "", None),  # a composite key with a text column
    ("f", (), True, "", None),  # REPLICA IDENTITY FULL: the primary key (id, c_int8) keys it
    ("i", (1,), True, "c_timestamp", None),  # messageKeyFrom: a converted column
    ("n", (), True, "", None),
    ("d", (0,), True, "", {"type": "nats", "address": "localhost:4222"}),  # no key schema off Kafka
])
def test_debezium_changes_match_the_python_path(
    schemas: bool, identity: str, key_columns: tuple[int, ...], needs_key: bool, key_from: str,
    publisher: dict[str, Any] | None,
) -> None:
    rng = random.Random(f"dbz{schemas}{identity}{key_columns}{needs_key}{key_from}{publisher}")
    fast, slow = dbz_builders(dbz_relation(identity, key_columns), needs_key, schemas, publisher, key_from)
    plan = fast.relations[OID].debezium_plan
    assert plan is not None and fast.hot is not None
    taken = errors = 0
    lsn = 0x1_6B37_4D48
    for n in range(1500):
        if n % 50 == 0:  # a new transaction now and then: the sequence's previous commit, xid, commit time
            if n:
                fast.commit(lsn)
                slow.commit(lsn)
            lsn += 0x1000 + n
            xid = None if n % 200 == 0 else 700 + n
            commit = rng.choice([820_000_000_000_000, 0, -1, -946_684_800_000_001])
            fast_txn, slow_txn = fast.begin(lsn, commit, xid), slow.begin(lsn, commit, xid)
        change_lsn = None if n % 7 == 0 else lsn - 100 + n % 50
        fast_txn.lsn = slow_txn.lsn = change_lsn
        msg = dbz_message(rng, slow.relations[OID].converters)
        expected = dbz_outcome(slow, msg, slow_txn)
        errors += expected[0] == "error"
        assert dbz_outcome(fast, msg, fast_txn) == expected, msg
        taken += fast.hot.debezium_event(msg, plan, "x", None, commit, xid, change_lsn, None, 0, needs_key) is not None
    assert taken > 600  # the compiled path wrote most of them itself
    assert errors > 10  # and values no converter takes were among them (both paths raise the same error)


@pytest.mark.usefixtures("frozen_clock")
@pytest.mark.parametrize("schemas", [False, True], ids=["schemas-disabled", "schemas-enabled"])
@pytest.mark.parametrize("action", ["insert", "update", "delete", "update-toast"])
def test_the_recorded_types_row_is_written_by_the_compiled_path(schemas: bool, action: str) -> None:
    """The Debezium workload's row of every type, in the text forms pgoutput sends: written in C (types whose
    conversion is Python's only are called per value), the same bytes as the Python path's."""
    texts = [
        "3", "-32768", "2147483647", "9223372036854775807", "4294967295", "12345678901234.123456",
        "0.000000000000000000000001", "1.5", "3.141592653589793", "t", '{"a": [1, 2, {"b": null}]}',
        '{"a": "x", "z": 1}', "{1,2,3}", '{"a b",c}', "2026-01-02 01:04:05.123456+00", "2026-01-02 03:04:05.123456",
        "2026-01-02 03:04:05.123", "2026-01-02", "03:04:05.123456", "03:04:05.123", "03:04:05.123456+02",
        "P1Y2M3DT4H5M6.789S", "\\x00ff10", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "text ✓", "varchar", "ab ",
        "happy", "7", "192.168.1.1/24", "10.0.0.0/8", "08:00:2b:01:02:03", "$12.34", "[1,10)", "(1.5,2.5)", "1010",
        "101", "1", "<a>1</a>", "{1,NULL}", "{2026-01-02}", '{"2026-01-02 03:04:05+00"}', "{1.5,NaN}", "{t,f}",
        '{"{\\"a\\": 1}"}', "{sad,happy}", "4242", "x",
    ]
    assert len(texts) == len(DBZ_COLUMNS)
    row = [col_text(t) for t in texts]
    fast, slow = dbz_builders(dbz_relation("f", ()), True, schemas)
    new = tuple_data(*row)
    msg = {"insert": insert_msg(OID, new), "update": update_msg(OID, new, new, b"O"),
           "delete": delete_msg(OID, b"O", new),
           "update-toast": update_msg(OID, tuple_data(*[COL_UNCHANGED if i in (12, 22, 24) else v
                                                        for i, v in enumerate(row)]))}[action]
    plan = fast.relations[OID].debezium_plan
    assert plan is not None and fast.hot is not None
    done = fast.hot.debezium_event(msg, plan, "id-", 0x1234, 820_000_000_000_000, 770, 0x16B374D48, 0x16B374C00,
                                   time.time_ns(), True)
    assert done is not None and done[0] == "id-000000001234"
    txn = (fast.begin(0x16B374D48, 820_000_000_000_000, 770), slow.begin(0x16B374D48, 820_000_000_000_000, 770))
    assert dbz_outcome(fast, msg, txn[0]) == dbz_outcome(slow, msg, txn[1])
    # with schemas the compiled path's event carries the table's schema head beside its own bytes (never copied)
    event = fast.change(msg, fast.begin(0x16B374D48, 820_000_000_000_000, 770))
    assert type(event) is (HeadedMessage if schemas else Message) and (event.head is plan[5] or not schemas)
    body = orjson.loads(dbz_whole(plan, done[1]))
    payload = body["payload"] if schemas else body
    row_out = payload["before" if action == "delete" else "after"]
    if action == "update-toast":
        assert row_out["c_int_array"] == list(b"__debezium_unavailable_value")  # int4[]: the placeholder's bytes
        assert row_out["c_text"] == "__debezium_unavailable_value"
    else:
        assert (row_out["c_timestamp"], row_out["c_timestamp3"], row_out["c_date"]) == (
            1767323045123456, 1767323045123, 20455)
        assert (row_out["c_interval"], row_out["c_bytea"], row_out["c_numeric_free"]) == (
            37091106789000, "AP8Q", "0.000000000000000000000001")
        assert row_out["c_timetz"] == "01:04:05.123456Z" and row_out["c_json"] == '{"a": [1, 2, {"b": null}]}'
    assert payload["source"]["lsn"] == 0x16B374D48
    assert payload["source"]["sequence"] == f'["{0x16B374C00}","{0x16B374D48}"]'


def test_debezium_bad_arguments_raise_type_errors() -> None:
    fast, _ = dbz_builders(dbz_relation("d", (0,)), True, False)
    plan = fast.relations[OID].debezium_plan
    assert plan is not None and fast.hot is not None
    msg = insert_msg(OID, tuple_data(*[col_text("1")] * len(DBZ_COLUMNS)))
    with pytest.raises(TypeError):
        fast.hot.debezium_event(msg, plan[:-1], "id", None, 0, None, None, None, 0, True)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        fast.hot.debezium_event(msg, (*plan[:4], (len(DBZ_COLUMNS),), *plan[5:]),  # type: ignore[call-overload]
                                "id", None, 0, None, None, None, 0, True)
    with pytest.raises(TypeError):
        fast.hot.debezium_event(msg, plan, "id", None, 0, "7", None, None, 0, True)  # type: ignore[call-overload]
    # a negative LSN (never sent) is the Python path's to write
    assert fast.hot.debezium_event(msg, plan, "id", None, 0, None, -1, None, 0, True) is None
    with pytest.raises(ValueError):
        fast.hot.freeze_clock(-5)


@pytest.mark.parametrize("schemas", [False, True], ids=["schemas-disabled", "schemas-enabled"])
def test_debezium_now_none_reads_the_clock_and_a_plan_checked_once_stays_valid(schemas: bool) -> None:
    """now_ns None: the envelope's ts_* are the time of writing, read by the compiled path (time.time_ns's clock);
    the same body as with that time given. A plan is checked once: its events after the first give the same."""
    fast, _ = dbz_builders(dbz_relation("d", (0,)), True, schemas)
    plan = fast.relations[OID].debezium_plan
    assert plan is not None and fast.hot is not None
    msg = insert_msg(OID, tuple_data(*[col_text(t) if t is not None else COL_NULL for t in [
        "7", *[None] * (len(DBZ_COLUMNS) - 1)]]))
    before = time.time_ns()
    done = fast.hot.debezium_event(msg, plan, "id", None, 1, 2, 3, 4, None, True)
    after = time.time_ns()
    assert done is not None
    body = orjson.loads(dbz_whole(plan, done[1]))
    envelope = body["payload"] if schemas else body
    assert before <= envelope["ts_ns"] <= after
    assert envelope["ts_ms"] == envelope["ts_ns"] // 1_000_000 and envelope["ts_us"] == envelope["ts_ns"] // 1000
    for _ in range(3):
        again = fast.hot.debezium_event(msg, plan, "id", None, 1, 2, 3, 4, envelope["ts_ns"], True)
        assert again == done
    fast.hot.freeze_clock(1_767_323_045_123_456_789)
    try:
        frozen = fast.hot.debezium_event(msg, plan, "id", None, 1, 2, 3, 4, None, True)
    finally:
        fast.hot.freeze_clock(None)
    assert frozen == fast.hot.debezium_event(msg, plan, "id", None, 1, 2, 3, 4, 1_767_323_045_123_456_789, True)


@pytest.mark.usefixtures("frozen_clock")
@pytest.mark.parametrize("column", range(1, len(DBZ_COLUMNS)), ids=[c[0].strip() for c in DBZ_COLUMNS[1:]])
def test_every_debezium_value_of_the_pools_matches_the_python_path(column: int) -> None:
    """Value by value (each of its type's pool and every text): a two-column table (id, the column), so a value
    the C code converts is compared on its own, not only inside a row another column sends to Python."""
    name, oid, modifier = DBZ_COLUMNS[column]
    rel = Relation(OID, "public", "one", "d", (Column("id", 23, -1, True), Column(name, oid, modifier, False)))
    cfg = make_config(publisher={"format": "debezium"})
    fast = EventBuilder(cfg, dbz_registry(), needs_key=True)
    slow = EventBuilder(cfg, dbz_registry(), needs_key=True, compiled=False)
    for built in (fast, slow):
        built.add_relation(rel)
    written = 0
    for text in [*DBZ_POOLS.get(oid, []), *TEXTS, *TIMESTAMPTZ, *INTS]:
        msg = insert_msg(OID, tuple_data(col_text("1"), col_text(text)))
        expected = dbz_outcome(slow, msg, slow.begin(0x10, 0, 5))
        assert dbz_outcome(fast, msg, fast.begin(0x10, 0, 5)) == expected, text
        written += expected[0] != "error"
    assert written > 0


@pytest.mark.usefixtures("frozen_clock")
@pytest.mark.parametrize("schemas", [False, True], ids=["schemas-disabled", "schemas-enabled"])
@pytest.mark.parametrize("identity,key_columns,needs_key", [("d", (0,), True), ("f", (), True), ("d", (0, 24), False)])
def test_debezium_backfilled_rows_match_the_python_path(
    schemas: bool, identity: str, key_columns: tuple[int, ...], needs_key: bool
) -> None:
    """READ events of a backfill (op r, snapshot incremental): debezium_read_row writes what the Python path
    writes, and the row its INSERT would carry."""
    rng = random.Random(f"dbzread{schemas}{identity}{key_columns}")
    fast, slow = dbz_builders(dbz_relation(identity, key_columns), needs_key, schemas)
    fast_info, slow_info = fast.relations[OID], slow.relations[OID]
    converters = slow_info.converters
    taken = 0
    for n in range(800):
        if n % 100 == 0:
            at = f"2026-01-02T03:04:{n // 100:02d}.{n:06d}Z"
            if n:
                fast.commit(0x1000 + n)
                slow.commit(0x1000 + n)
        clean = rng.random() < 0.7
        row: list[bytes | None] = []
        for i, (_, oid, _) in enumerate(DBZ_COLUMNS):
            value = dbz_value(oid, rng, converters[i], clean)
            while value == COL_UNCHANGED:  # a SELECT has no unchanged TOAST
                value = dbz_value(oid, rng, converters[i], clean)
            row.append(None if value == COL_NULL else value[5:])
        results = []
        for built, info in ((fast, fast_info), (slow, slow_info)):
            try:
                got = built.read(info, row, f"id-{n}", at)
                results.append((got.id, got.subject, got.body, got.key, got.action, got.tombstone))
            except Exception as exc:  # the same error on both paths
                results.append(("error", type(exc).__name__, str(exc)))
        assert results[0] == results[1], row
        assert fast_info.debezium_plan is not None and fast.hot is not None
        done = fast.hot.debezium_read_row(row, fast_info.debezium_plan, 0, None, 0, needs_key)
        if done is not None:
            taken += 1
            body = orjson.loads(dbz_whole(fast_info.debezium_plan, done[0]))
            payload = body["payload"] if schemas else body
            assert payload["op"] == "r" and payload["source"]["snapshot"] == "incremental"
    assert taken > 300


#: transforms of the Debezium test table
DBZ_TRANSFORMS: dict[str, dict[str, Any]] = {
    "exclude, every mask, key": {
        "tables": ['ty"pes'], "columns": {"exclude": ["c_date", "c_bytea"]},
        "mask": {"c_text": "hash", "c_numeric": "redact", "c_bool": "null", "c_text_array": "hash",
                 "c_jsonb": "redact", "c_timestamp": "hash", "c_interval": "null"},
        "key": ["c_uuid", "id"],
    },
    "include without the key column, masked key": {
        "tables": ["public.*"], "columns": {"include": ["c_int8", "c_text", "c_timestamptz", "c_int_array",
                                                        'weird "col"\n']},
        "mask": {"c_int8": "hash", "c_timestamptz": "null"}, "key": ["c_int8"],
    },
    "masks only": {"tables": ['ty"pes'], "mask": {"id": "hash", "c_text": "redact", "c_timestamp": "null"}},
    "a route": {"tables": ['ty"pes'], "columns": {"exclude": ["c_json"]}, "topic": "t-{id}.{c_text}"},
    "a route, masks, key": {"tables": ['ty"pes'], "mask": {"c_text": "hash", "c_varchar": "null", "c_int4": "redact"},
                            "topic": "by.{c_uuid}.{c_text}.{c_enum}", "key": ["c_text"]},
}


def dbz_converters() -> tuple[Converter | None, ...]:
    """Debezium's converter of every column of the test table (whatever a transform keeps)."""
    registry = dbz_registry()
    return tuple(debezium_converter(registry, oid, modifier) for _, oid, modifier in DBZ_COLUMNS)


@pytest.mark.usefixtures("frozen_clock")
@pytest.mark.parametrize("schemas", [False, True], ids=["schemas-disabled", "schemas-enabled"])
@pytest.mark.parametrize("name", DBZ_TRANSFORMS)
@pytest.mark.parametrize("identity,key_columns", [("d", (0,)), ("f", ())])
def test_debezium_changes_with_transforms_match_the_python_path(
    schemas: bool, name: str, identity: str, key_columns: tuple[int, ...]
) -> None:
    """A table's transform (columns left out, masks, its key) on the compiled path: changes and READ events."""
    rng = random.Random(f"dbzt{schemas}{name}{identity}")
    fast, slow = dbz_builders(dbz_relation(identity, key_columns), True, schemas, transforms=[DBZ_TRANSFORMS[name]])
    info = fast.relations[OID]
    converters = dbz_converters()
    txn = fast.begin(0x1_6B37_4D48, 820_000_000_000_000, 9), slow.begin(0x1_6B37_4D48, 820_000_000_000_000, 9)
    taken = 0
    for n in range(600):
        msg = dbz_message(rng, converters)
        expected = dbz_outcome(slow, msg, txn[1])
        assert dbz_outcome(fast, msg, txn[0]) == expected, msg
        plan = info.debezium_plan
        if plan is not None and fast.hot is not None:
            taken += fast.hot.debezium_event(msg, plan, "x", None, 0, None, None, None, 0, True) is not None
        if n % 3 == 0:  # a backfilled row: its READ event
            row: list[bytes | None] = []
            for i, (_, oid, _) in enumerate(DBZ_COLUMNS):
                value = dbz_value(oid, rng, converters[i], True)
                row.append(None if value in (COL_NULL, COL_UNCHANGED) else value[5:])
            reads = []
            for built in (fast, slow):
                try:
                    got = built.read(built.relations[OID], row, f"id-{n}", "2026-01-02T03:04:05Z")
                    reads.append((got.subject, got.body, got.key))
                except Exception as exc:  # the same error on both paths
                    reads.append(("error", type(exc).__name__, str(exc)))
            assert reads[0] == reads[1], row
    assert taken > 200
