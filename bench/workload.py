"""The workloads: tables, and the SQL that writes them into the WAL.

Every workload is written while no listener runs, after its replication slots were created, so the
slots retain exactly the WAL the workload produced; the listener and ``pg_recvlogical`` then read the
same range. Rows are generated on the server (``INSERT ... SELECT generate_series``) so that the
client's speed does not shape the WAL.

- ``reference``: a table with int, text, numeric, bool, timestamptz, text[] and jsonb columns;
  N inserts, then N updates, then N deletes, 1000 rows per transaction (3*N events).
- ``wide``: the same columns plus a 4 KB text column stored out of line (TOAST, ``STORAGE
  EXTERNAL``); inserts, updates that leave the 4 KB column alone (pgoutput sends it as "unchanged
  TOAST", which the listener leaves out), deletes; 1000 rows per transaction.
- ``txn-N``: one transaction inserting N rows into a reference-shaped table.
- ``oltp``: N transactions of one row each (the shape of most OLTP databases: a Begin and a Commit per
  change), inserts into a reference-shaped table, committed one by one by a loop on the server.
- ``users``: the reference workload on ``bench_users``, the reference columns plus personal data
  (``tenant_id``, ``email``, ``phone``, ``password_hash``); ``bench.run --variants transform`` streams it with
  and without :data:`USERS_TRANSFORM` (exclude one column, hash one, redact one, route by one).

:data:`VARIANTS` are the listener configurations ``bench.run --variants`` compares with the default one on the
same WAL: the event formats, the transform, every feature on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from listener.pgoutput import parse_lsn

PUBLICATION = "wal-listener"  # the listener's default publication name
TXN_ROWS = 1000

_COLUMNS = """
    id          integer PRIMARY KEY,
    name        text NOT NULL,
    amount      numeric(14, 2) NOT NULL,
    active      boolean NOT NULL,
    created_at  timestamptz NOT NULL,
    tags        text[] NOT NULL,
    payload     jsonb NOT NULL"""

VALUES = """i, 'name-' || i, (i * 1.01)::numeric(14, 2), i %% 2 = 0,
       '2026-01-01 00:00:00+00'::timestamptz + i * interval '1 second',
       ARRAY['tag-' || (i %% 10), 'group-' || (i %% 7)],
       jsonb_build_object('i', i, 'label', 'item ' || i,
                          'nested', jsonb_build_object('even', i %% 2 = 0, 'score', i %% 100))"""

SCHEMA = f"""
CREATE TABLE bench_ref ({_COLUMNS});
CREATE TABLE bench_big ({_COLUMNS});
CREATE TABLE bench_lat ({_COLUMNS});
CREATE TABLE bench_oltp ({_COLUMNS});
CREATE TABLE bench_wide ({_COLUMNS},
    body        text NOT NULL);
CREATE TABLE bench_users ({_COLUMNS},
    tenant_id     integer NOT NULL,
    email         text NOT NULL,
    phone         text NOT NULL,
    password_hash text NOT NULL);
ALTER TABLE bench_wide ALTER COLUMN body SET STORAGE EXTERNAL;
"""


@dataclass(frozen=True)
class Workload:
    """One WAL-first workload: its name, table, event count and the function that writes it."""

    name: str
    label: str
    table: str
    events: int
    write: Callable[[psycopg.Connection], None]


def setup_schema(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute(f'CREATE PUBLICATION "{PUBLICATION}" FOR ALL TABLES')


def _chunks(total: int, size: int = TXN_ROWS) -> list[tuple[int, int]]:
    return [(lo, min(lo + size - 1, total)) for lo in range(1, total + 1, size)]


def _in_transactions(conn: psycopg.Connection, statement: str, total: int) -> None:
    for lo, hi in _chunks(total):
        with conn.transaction():
            conn.execute(statement, (lo, hi))


def write_reference(rows: int) -> Callable[[psycopg.Connection], None]:
    def write(conn: psycopg.Connection) -> None:
        _in_transactions(conn, f"INSERT INTO bench_ref SELECT {VALUES} FROM generate_series(%s::int, %s::int) i",
                         rows)
        _in_transactions(
            conn,
            "UPDATE bench_ref SET amount = amount + 1, active = NOT active, name = name || '-u',"
            " payload = payload || '{\"updated\": true}' WHERE id BETWEEN %s AND %s",
            rows,
        )
        _in_transactions(conn, "DELETE FROM bench_ref WHERE id BETWEEN %s AND %s", rows)

    return write


#: bench_users rows spread over this many tenant_id values (the users transform routes a topic per tenant)
USERS_TENANTS = 20
USERS_VALUES = f"""{VALUES}, i %% {USERS_TENANTS}, 'user-' || i || '@example.com', '+1-555-' || lpad(i::text, 7, '0'),
       md5(i::text)"""
#: the transform of bench_users (listener.transforms): exclude one column, hash one, redact one, route by one
USERS_TRANSFORM = {
    "tables": ["public.bench_users"],
    "columns": {"exclude": ["password_hash"]},
    "mask": {"email": "hash", "phone": "redact"},
    "topic": "users.{tenant_id}",
}
USERS_HASH_KEY = "bench-hash-key-0123456789abcdef"


@dataclass(frozen=True)
class Variant:
    """A listener configuration streamed beside the default one over the same WAL (``bench.run --variants``)."""

    name: str
    workload: str  # the workload it streams: "reference" or "users"
    listener: dict[str, Any]  # keys merged into the config's listener section
    publisher: dict[str, Any]  # keys merged into the config's publisher section
    #: another checkout whose listener runs (its listener/ with the C extension built in place; --baseline)
    source: Path | None = None


_TRANSFORM = {"transforms": [USERS_TRANSFORM], "transformsHashKey": USERS_HASH_KEY}
VARIANTS = {v.name: v for v in (
    Variant("cloudevents", "reference", {}, {"format": "cloudevents"}),
    Variant("cloudevents-structured", "reference", {},
            {"format": "cloudevents", "cloudEvents": {"mode": "structured"}}),
    Variant("debezium", "reference", {}, {"format": "debezium"}),
    Variant("debezium-schemas", "reference", {}, {"format": "debezium", "debezium": {"schemas": True}}),
    Variant("transform", "users", _TRANSFORM, {}),
    # the features of the schema-evolution and transforms issues at once (tombstones act on Kafka only)
    Variant("features", "users", {**_TRANSFORM, "schemaEvents": True, "ddl": {"capture": True}}, {"tombstones": True}),
    # the byte bound (listener.maxInFlightBytes, 64Mi by default) out of reach: what the bound costs
    Variant("unbounded", "reference", {"maxInFlightBytes": "1Ti"}, {}),
)}


def baseline(source: str, of: Variant | None = None) -> Variant:
    """The listener of another checkout (``bench.run --baseline DIR``) with the default config, or with the
    config of the variant ``of`` (named ``<variant> baseline``): e.g.
    ``git archive main | tar -x -C DIR && (cd DIR && python setup.py build_ext --inplace)``."""
    if of is None:
        return Variant("baseline", "reference", {}, {}, Path(source).resolve())
    return Variant(f"{of.name} baseline", of.workload, of.listener, of.publisher, Path(source).resolve())


def write_users(rows: int) -> Callable[[psycopg.Connection], None]:
    def write(conn: psycopg.Connection) -> None:
        _in_transactions(
            conn, f"INSERT INTO bench_users SELECT {USERS_VALUES} FROM generate_series(%s::int, %s::int) i", rows
        )
        _in_transactions(
            conn,
            "UPDATE bench_users SET amount = amount + 1, active = NOT active, name = name || '-u',"
            " payload = payload || '{\"updated\": true}' WHERE id BETWEEN %s AND %s",
            rows,
        )
        _in_transactions(conn, "DELETE FROM bench_users WHERE id BETWEEN %s AND %s", rows)

    return write


def write_wide(rows: int) -> Callable[[psycopg.Connection], None]:
    def write(conn: psycopg.Connection) -> None:
        _in_transactions(
            conn,
            f"INSERT INTO bench_wide SELECT {VALUES}, repeat(md5(i::text), 128)"  # 4096 characters
            " FROM generate_series(%s::int, %s::int) i",
            rows,
        )
        _in_transactions(conn, "UPDATE bench_wide SET amount = amount + 1, active = NOT active"
                               " WHERE id BETWEEN %s AND %s", rows)
        _in_transactions(conn, "DELETE FROM bench_wide WHERE id BETWEEN %s AND %s", rows)

    return write


def write_big_transaction(rows: int) -> Callable[[psycopg.Connection], None]:
    def write(conn: psycopg.Connection) -> None:
        with conn.transaction():
            conn.execute(f"INSERT INTO bench_big SELECT {VALUES} FROM generate_series(1, %s::int) i", (rows,))

    return write


def write_oltp(rows: int) -> Callable[[psycopg.Connection], None]:
    def write(conn: psycopg.Connection) -> None:
        # a DO block run outside a transaction block may COMMIT: one transaction per row, no round trips
        values = VALUES.replace("%%", "%")
        conn.execute(
            f"DO $$ BEGIN FOR i IN 1..{int(rows)} LOOP INSERT INTO bench_oltp SELECT {values}; COMMIT; END LOOP; END $$"
        )

    return write


def reference(rows: int) -> Workload:
    return Workload("reference", f"reference {_k(rows)} ins+upd+del", "bench_ref", 3 * rows, write_reference(rows))


def users(rows: int) -> Workload:
    return Workload("users", f"users {_k(rows)} ins+upd+del", "bench_users", 3 * rows, write_users(rows))


def wide(rows: int) -> Workload:
    return Workload("wide", f"wide 4KB TOAST {_k(rows)} i+u+d", "bench_wide", 3 * rows, write_wide(rows))


def big_transaction(rows: int) -> Workload:
    return Workload(f"txn-{_k(rows)}", f"1 txn of {_k(rows)} rows", "bench_big", rows, write_big_transaction(rows))


def oltp(rows: int) -> Workload:
    return Workload("oltp", f"OLTP {_k(rows)} txns of 1 row", "bench_oltp", rows, write_oltp(rows))


def _k(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


def run_workload(dsn: str, workload: Workload) -> tuple[int, float]:
    """Write the workload; returns (end LSN, seconds it took).

    The end LSN is the WAL insert position right after the last commit. A non-transactional logical
    message is written after it, so that the WAL always moves past that position (a reader waiting
    for it never waits on an idle server).
    """
    import time

    with psycopg.connect(dsn, autocommit=True) as conn:
        t0 = time.monotonic()
        workload.write(conn)
        elapsed = time.monotonic() - t0
        row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        assert row is not None
        conn.execute("SELECT pg_logical_emit_message(false, 'wal-listener-bench', 'end')")
    return parse_lsn(row[0]), elapsed


def reset_table(dsn: str, table: str) -> None:
    """Empty a table between workloads (run while no slot is reading)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {table}")
        conn.execute(f"VACUUM {table}")


def latency_insert_sql() -> str:
    return f"INSERT INTO bench_lat SELECT {VALUES} FROM generate_series(%s::int, %s::int) i"
