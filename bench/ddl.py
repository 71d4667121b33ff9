"""``python -m bench.ddl [--statements 2000] [--rounds 5]``

What DDL capture (``listener.ddl.capture``) costs the application's DDL: the same ``CREATE TABLE``, ``ALTER
TABLE ... ADD COLUMN``, ``DROP TABLE`` triples, one statement per round trip, in a database without the event
trigger and in one with it, rounds alternating; prints the median time per statement and the WAL each statement
writes in both. A throwaway PostgreSQL of the system (as the tests start it); no listener runs: the trigger's
work is all in the statement.
"""

from __future__ import annotations

import argparse
import statistics
import time

import psycopg

from listener import catalog
from listener.ddl import script
from tests.support.services import PostgresServer


def one_round(pg: PostgresServer, dbname: str, statements: int) -> tuple[float, float]:
    """(microseconds per statement, WAL bytes per statement)."""
    with psycopg.connect(pg.dsn(dbname), autocommit=True) as conn:
        start_lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]  # type: ignore[index]
        started = time.perf_counter()
        for _ in range(statements // 3):
            conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
            conn.execute("ALTER TABLE t ADD COLUMN note text")
            conn.execute("DROP TABLE t")
        elapsed = time.perf_counter() - started
        wal = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (start_lsn,)).fetchone()[0]  # type: ignore[index]
    done = statements // 3 * 3
    return elapsed / done * 1e6, float(wal) / done


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ddl", description=__doc__.split("\n\n")[1])
    parser.add_argument("--statements", type=int, default=1500, help="DDL statements per round (1500)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per database, alternating (5)")
    args = parser.parse_args(argv)
    with PostgresServer() as pg:
        for dbname, capture in (("plain", False), ("captured", True)):
            pg.create_database(dbname)
            if capture:
                with psycopg.connect(pg.dsn(dbname), autocommit=True) as conn:
                    conn.execute(script(catalog.ddl_capture_install()).encode())
        results: dict[str, list[tuple[float, float]]] = {"plain": [], "captured": []}
        for _ in range(args.rounds):
            for dbname, found in results.items():
                found.append(one_round(pg, dbname, args.statements))
    for dbname, found in results.items():
        micros = statistics.median(r[0] for r in found)
        wal = statistics.median(r[1] for r in found)
        label = "with the DDL event trigger" if dbname == "captured" else "without it"
        print(f"{label:28} {micros:8.0f} µs per statement  {wal:6.0f} WAL bytes per statement")


if __name__ == "__main__":
    main()
