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
from typing import Any

import orjson
import pytest

from listener import hotpath, types
from listener.errors import DecodeError
from listener.event import EventBuilder, Transaction
from listener.pgoutput import Column, Relation
from tests.support.events import compiled_hot_path, make_config
from tests.support.pgwire import COL_NULL, COL_UNCHANGED, delete_msg, insert_msg, tuple_data, update_msg

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
    return (out.id, out.subject, out.body, out.key, out.action, out.schema, out.table, out.tombstone, txn.ordinal)


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
        marked += expected[-2] is True  # a DELETE to be followed by a tombstone
        before = fast.hot.event  # type: ignore[union-attr]
        assert outcome(fast, msg, fast_txn) == expected, msg
        plan = fast.relations[OID].plan
        assert plan is not None
        if before(msg, plan, "x", None, "y", needs_key) is not None:
            taken += 1
    assert taken > 50  # the compiled path wrote some itself (odd values are common here by design)
    assert (marked > 50) == (needs_key and identity != "n")  # a DELETE without a key has no tombstone


#: characters that must be escaped in a JSON string, and their neighbours that must not be
ESCAPED_CHARACTERS = ['"', "\\", "\x00", "\x08", "\t", "\n", "\x0c", "\r", "\x1f"]
CLEAN_NEIGHBOURS = [" ", "!", "#", "[", "]", "\x7f", "é", "日"]


@pytest.mark.parametrize("special", ESCAPED_CHARACTERS + CLEAN_NEIGHBOURS)
def test_text_is_escaped_like_the_python_path_at_every_offset(special: str) -> None:
    """The compiled path scans text for what JSON escapes a word (8 bytes) at a time: one such character
    at every offset of texts up to 40 bytes long, two of them at every distance, and 4 KB texts (the
    wide workload's) with it near the end, are written byte for byte as the Python path writes them."""
    fast, slow = builders(relation("d", (0,)), needs_key=True)
    txn_fast, txn_slow = fast.begin(0x10, 0), slow.begin(0x10, 0)
    texts = []
    for length in range(0, 41):
        for at in range(length):
            texts.append("a" * at + special + "b" * (length - at - 1))
    for gap in range(0, 20):
        texts.append("x" * 5 + special + "y" * gap + special + "z" * 3)
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
        fast.hot.event(b"I", plan, b"id", 1, "t", False)  # type: ignore[arg-type]
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
