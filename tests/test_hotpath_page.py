"""A backfill page in one compiled call: ``read_page`` over libpq's result of a real FETCH writes exactly what
the Python twin (:meth:`EventBuilder.read_page` over psycopg's values, pure-Python builder) writes.

Differential: the same PostgreSQL result goes through both, and every event (id, subject, body bytes, key,
action) and every row key must be identical. Values hit the compiled path's branches (escapes, non-ASCII,
NULL, arrays, JSON, timestamps, types it hands back to the Python converters); ids cover one-column and
composite keys with NULLs, long keys (several BLAKE2b blocks) and keyed hashing (a masked key column); a
database in SQL_ASCII gives text that is not UTF-8, which the compiled path leaves to the Python one.
"""

from __future__ import annotations

import random
from typing import Any

import psycopg
import pytest

from listener import hotpath, types
from listener.event import EventBuilder, _message_slots, read_event_ids, read_id_seed
from listener.message import Message
from listener.pgoutput import Column, Relation
from listener.replication import SESSION_OPTIONS
from tests.support.events import compiled_hot_path, make_config
from tests.support.services import PostgresServer

TABLE = (
    'CREATE TABLE page_t (id int PRIMARY KEY, big int8, name text, amount numeric, active bool, created_at timestamptz,'
    " local_at timestamp, tags text[], counts int4[], flags bool[], payload jsonb, ratio float8, raw bytea,"
    ' ref uuid, day date, "weird ""col""\n" text)'
)
TEXTS = ["", "plain", 'with "quotes" and \\backslash\\', "tab\there", "line\nbreak\r\n", "\x01\x1f\x7f", "é ü ß",
         "日本語", "emoji \U0001F600", "\u2028\u2029", "NULL", "{a,b}", " lead and trail ", "long " * 60]
POOLS: dict[str, list[str]] = {
    "big": ["0", "-1", "9223372036854775807", "-9223372036854775808"],
    "amount": ["0", "42.42", "-1e-20", "NaN", "123456789012345678901234567890.5"],
    "active": ["t", "f"],
    "created_at": ["2026-01-02 03:04:05.123456+00", "2026-01-02 03:04:05+05:30", "0044-03-15 12:00:00+00 BC",
                   "infinity", "-infinity"],
    "local_at": ["2026-01-02 03:04:05.5", "0044-03-15 12:00:00 BC", "infinity"],
    "tags": ["{}", "{a,b,c}", "{a,NULL,c}", '{"a b",c}', '{"quote \\" in",x}', "{{a,b},{c,d}}", "{é,日本}"],
    "counts": ["{}", "{1,2,3}", "{1,NULL,-3}", "{{1,2},{3,4}}", "[1:2]={5,6}"],
    "flags": ["{t,f,NULL}", "{}"],
    "payload": ['{"a": 1}', "[1, 2, 3]", '"string"', "null", '{"nested": {"x": [true, false]}}', '{"é": "\\u0001"}'],
    "ratio": ["1.5", "-0", "NaN", "Infinity", "1e+300", "0.1"],
    "raw": ["\\x", "\\xdeadbeef"],
    "ref": ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"],
    "day": ["2026-01-01", "infinity"],
}
COLUMNS = ["id", "big", "name", "amount", "active", "created_at", "local_at", "tags", "counts", "flags", "payload",
           "ratio", "raw", "ref", "day", 'weird "col"\n']
HASH_KEY = "k3y-for-the-page-test"


def rows(count: int, seed: str, ascii_only: bool = False) -> list[list[str | None]]:
    rng = random.Random(seed)
    out: list[list[str | None]] = []
    for n in range(1, count + 1):
        row: list[str | None] = [str(n)]
        for name in COLUMNS[1:]:
            pool = POOLS.get(name, TEXTS)
            value = None if rng.random() < 0.1 else rng.choice(pool)
            row.append(None if ascii_only and value is not None and not value.isascii() else value)
        out.append(row)
    return out


def fill(dsn: str, values: list[list[str | None]]) -> Relation:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(TABLE)
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO page_t SELECT * FROM json_populate_record(NULL::page_t, %s::json)",
                [(psycopg.types.json.Json(dict(zip(COLUMNS, row, strict=True))),) for row in values],
            )
        oids = conn.execute(
            "SELECT atttypid FROM pg_attribute WHERE attrelid = 'page_t'::regclass AND attnum > 0 ORDER BY attnum"
        ).fetchall()
    return Relation(16400, "public", "page_t", "d", tuple(
        Column(name, int(oid), -1, name == "id") for name, (oid,) in zip(COLUMNS, oids, strict=True)
    ))


def builders(rel: Relation, needs_key: bool, transforms: list[dict[str, Any]] | None = None,
             ) -> tuple[EventBuilder, EventBuilder]:
    hot = compiled_hot_path()
    if not hotpath.page_reader(hot):
        pytest.skip("psycopg's libpq cannot be found: read_page is not used")
    cfg = make_config(transforms=transforms, hash_key=HASH_KEY if transforms else "")
    fast = EventBuilder(cfg, types.TypeRegistry(), needs_key=needs_key)
    slow = EventBuilder(cfg, types.TypeRegistry(), needs_key=needs_key, compiled=False)
    fast.add_relation(rel, ("id",))
    slow.add_relation(rel, ("id",))
    return fast, slow


def both(dsn: str, fast: EventBuilder, slow: EventBuilder, key_index: tuple[int, ...], secret: bytes = b"",
         piece: int = 37) -> tuple[list[Any], list[Any], int]:
    """Every row of page_t through read_page (pieces of ``piece`` rows) and through the Python twin; the rows
    the compiled path left to the Python one."""
    fast_info, slow_info = fast.relations[16400], slow.relations[16400]
    reader = fast.page_reader(fast_info)
    assert reader is not None and fast.hot is not None
    seed = read_id_seed("slot_a", 7, "public", "page_t", secret)
    prepared = fast.hot.blake2b_prepare(*seed)
    ident_of = read_event_ids("slot_a", 7, "public", "page_t", secret)
    at = "2026-01-02T03:04:05.000006Z"
    got: list[Any] = []
    expected: list[Any] = []
    left = 0
    names = ", ".join(f'"{c}"' if c != COLUMNS[-1] else '"weird ""col""\n"' for c in COLUMNS)
    with psycopg.connect(dsn, autocommit=True, options=SESSION_OPTIONS) as conn, conn.transaction():
        conn.execute(f"DECLARE c NO SCROLL CURSOR FOR SELECT {names} FROM page_t ORDER BY id")
        while True:
            cur = conn.execute(f"FETCH FORWARD {piece} FROM c", binary=False)
            result = cur.pgresult
            assert result is not None
            if not result.ntuples:
                break
            messages, keys, total, largest = reader(result.pgresult_ptr, prepared, key_index, at)
            values = [[result.get_value(r, c) for c in range(result.nfields)] for r in range(result.ntuples)]
            sizes = [sum(len(v) for v in row if v is not None) for row in values]
            assert (total, largest) == (sum(sizes), max(sizes))
            for row, message, key in zip(values, messages, keys, strict=True):
                if message is None:
                    left += 1
                    assert key is None
                else:
                    got.append((shape(message), key))
                try:
                    (m,), (k,) = slow.read_page(slow_info, [row], ident_of, key_index, at)
                    expected.append((shape(m), k))
                except UnicodeDecodeError:
                    assert message is None  # the Python path owns the error
                    continue
                if message is None:  # the fast builder's Python path writes the row the compiled call left
                    (m,), (k,) = fast.read_page(fast_info, [row], ident_of, key_index, at)
                    got.append((shape(m), k))
    return got, expected, left


def shape(m: Message) -> tuple[Any, ...]:
    return m.id, m.subject, m.body, m.key, m.schema, m.table, m.action, m.headers, m.content_type, m.tombstone


@pytest.mark.parametrize("key_index,needs_key", [((0,), True), ((0,), False), ((2, 0), True), ((2,), True)])
def test_read_page_matches_the_python_twin(pg: PostgresServer, fresh_db: str, key_index: tuple[int, ...],
                                           needs_key: bool) -> None:
    """Keys of one column, of several with NULLs, and of long text (ids over several BLAKE2b blocks)."""
    rel = fill(pg.dsn(fresh_db), rows(400, f"page{key_index}{needs_key}"))
    fast, slow = builders(rel, needs_key)
    got, expected, left = both(pg.dsn(fresh_db), fast, slow, key_index)
    assert len(got) == 400 and left < 400
    assert got == expected


def test_read_page_with_a_transform_and_a_keyed_id(pg: PostgresServer, fresh_db: str) -> None:
    """A table whose transform leaves a column out and masks others (the id's key column among them): the
    compiled page writes what the Python twin writes, ids keyed with transformsHashKey."""
    rel = fill(pg.dsn(fresh_db), rows(300, "transform"))
    transform = {"tables": ["page_t"], "columns": {"exclude": ["day", "raw"]},
                 "mask": {"id": "hash", "name": "redact", "active": "null", "tags": "hash"}}
    fast, slow = builders(rel, True, [transform])
    assert fast.relations[16400].transform is not None
    got, expected, _ = both(pg.dsn(fresh_db), fast, slow, (0,), HASH_KEY.encode(), piece=1000)
    assert len(got) == 300
    assert got == expected


def test_text_that_is_not_utf8_is_left_to_the_python_path(pg: PostgresServer) -> None:
    """In a SQL_ASCII database text may hold any bytes: those rows are None in read_page's lists, and the
    Python path raises for them as it did before; the other rows are the compiled path's."""
    name = "page_sql_ascii"
    pg.execute(f"CREATE DATABASE {name} ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    try:
        dsn = pg.dsn(name)
        rel = fill(dsn, rows(50, "ascii", ascii_only=True))
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "UPDATE page_t SET name = 'bad ' || convert_from('\\xff'::bytea, 'SQL_ASCII') WHERE id % 7 = 0"
            )
        fast, slow = builders(rel, True)
        got, expected, left = both(dsn, fast, slow, (0,))
        assert left == 7
        assert len(expected) == 43 and got == expected
    finally:
        pg.drop_database(name)



def test_read_page_fills_every_field_of_message_itself() -> None:
    # read_page sets each READ event's slots directly; when Message gains a field it does not know, it quietly
    # falls back to calling the class for every row (about twice as slow), as it did once header_lines came
    slots, defaults = _message_slots()
    assert slots is not None and defaults is not None, "listener.event._MESSAGE_FIELDS misses a field of Message"
    made = Message("id", "subject", b"{}", "public", "t", "READ", b"k")
    assert [getattr(made, d.__name__) for d in slots[7:]] == list(defaults)
