"""The steady-rate writer of the latency phase, as its own process (so it never competes with the
consumer for the benchmark's GIL): ``python -m bench.writer DSN RATE SECONDS ROWS_PER_TXN``.

Commits ``ROWS_PER_TXN`` rows per transaction on a fixed schedule so that RATE rows per second are
committed for SECONDS seconds; when it falls behind it catches up without sleeping. Prints one JSON
line: rows committed, seconds, the rate reached and how far it fell behind the schedule at worst.
"""

from __future__ import annotations

import json
import sys
import time

import psycopg

from bench.workload import latency_insert_sql


def write_steadily(dsn: str, rate: float, seconds: float, rows_per_txn: int) -> dict[str, float]:
    statement = latency_insert_sql()
    interval = rows_per_txn / rate
    next_id = 1
    worst_behind = 0.0
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement, (0, -1), prepare=True)  # warm the prepared statement, inserts nothing
        start = time.monotonic()
        due = start
        end = start + seconds
        while due < end:
            conn.execute(statement, (next_id, next_id + rows_per_txn - 1), prepare=True)
            next_id += rows_per_txn
            due += interval
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            else:
                worst_behind = max(worst_behind, now - due)
        elapsed = time.monotonic() - start
    rows = next_id - 1
    return {"rows": rows, "seconds": elapsed, "rate": rows / elapsed, "worst_behind_s": worst_behind}


def main(argv: list[str]) -> int:
    dsn, rate, seconds, rows_per_txn = argv[0], float(argv[1]), float(argv[2]), int(argv[3])
    print(json.dumps(write_steadily(dsn, rate, seconds, rows_per_txn)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
