"""``python -m bench.backfill [--rows 1000000] [--chunk-size 10000] [--out bench/results]``

A backfill of the reference table (the 8-column ``bench_ref`` of :mod:`bench.workload`, N rows already
in it) to NATS JetStream, and beside it, in the same run, the streaming catch-up of N updates of the same
rows, 1000 per transaction (the listener started after they were written):

- backfill: rows/s from the request until the state row says done (every chunk acknowledged by the
  broker), the listener's CPU per row and its peak RSS (VmHWM), the rows on the stream;
- catch-up: events/s from the listener's start until its slot confirmed the workload's end LSN.

Run with ``--rows 2000000`` for the memory bound of a 2-million-row table at the default chunk size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import psycopg

from bench import workload as wl
from bench.measure import REPO, ListenerProcess, run_until_confirmed, wait_streaming
from listener.backfill import backfills, request_backfill
from listener.pgoutput import parse_lsn
from tests.support.services import NatsServer, PostgresServer, find_pg_bin, free_port

DBNAME = "bench"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.backfill", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="rows in the table (1000000)")
    p.add_argument("--chunk-size", type=int, default=10_000, help="listener.snapshot.chunkSize (10000)")
    p.add_argument("--no-catch-up", action="store_true", help="only the backfill")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="where results go (bench/results)")
    return p.parse_args(argv)


def config(pg: PostgresServer, nats: NatsServer, slot: str, topic: str, chunk: int) -> dict[str, Any]:
    return {
        "listener": {"slotName": slot, "serverPort": 0, "snapshot": {"chunkSize": chunk}},
        "database": {"host": "127.0.0.1", "port": pg.port, "name": DBNAME, "user": "postgres", "sslMode": "disable"},
        "publisher": {"type": "nats", "address": nats.url, "topic": topic},
        "logger": {"level": "info", "fmt": "json"},
        "monitoring": {"promAddr": f"127.0.0.1:{free_port()}"},
    }


async def stream_count(nats: NatsServer, stream: str) -> int:
    import nats as nats_client

    nc = await nats_client.connect(nats.url)
    try:
        info = await nc.jetstream().stream_info(stream)
        return int(info.state.messages)
    finally:
        await nc.close()


async def backfill_run(pg: PostgresServer, nats: NatsServer, rows: int, chunk: int, logs: Path) -> dict[str, Any]:
    dsn = pg.dsn(DBNAME)
    lp = ListenerProcess(config(pg, nats, "bench_backfill", "backfill", chunk), logs, "backfill")
    try:
        await wait_streaming(lp, dsn, "bench_backfill")
        cpu0 = lp.cpu_seconds()
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            t0 = time.monotonic()
            await request_backfill(conn, "bench_backfill", "bench", ["public.bench_ref"])
            while True:
                lp.sample_rss()
                (state,) = await backfills(conn, "bench_backfill")
                if state.state in ("done", "failed"):
                    break
                if not lp.alive:
                    raise RuntimeError(f"the listener exited: {lp.problem()}")
                await asyncio.sleep(0.05)
            seconds = time.monotonic() - t0
        if state.state == "failed":
            raise RuntimeError(f"backfill failed: {state.error}")
        cpu = lp.cpu_seconds() - cpu0
        on_stream = await stream_count(nats, "backfill")
        return {"rows": state.rows_done, "seconds": round(seconds, 2), "rows_per_s": round(state.rows_done / seconds),
                "listener_cpu_s": round(cpu, 2), "cpu_us_per_row": round(cpu / max(state.rows_done, 1) * 1e6, 2),
                "peak_rss_mb": round(lp.peak_rss_mb(), 1), "chunks": state.chunks, "on_stream": on_stream}
    finally:
        lp.stop()


async def catch_up_run(pg: PostgresServer, nats: NatsServer, rows: int, logs: Path) -> dict[str, Any]:
    dsn = pg.dsn(DBNAME)
    slot = "bench_catchup"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        for lo in range(1, rows + 1, wl.TXN_ROWS):
            conn.execute("UPDATE bench_ref SET amount = amount + 1, active = NOT active WHERE id BETWEEN %s AND %s",
                         (lo, min(lo + wl.TXN_ROWS - 1, rows)))
        end = parse_lsn(conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])  # type: ignore[index]
    lp = ListenerProcess(config(pg, nats, slot, "catchup", 10_000), logs, "catchup")
    try:
        result = await run_until_confirmed(lp, dsn, slot, end)
    finally:
        lp.stop()
    return {"events": rows, "seconds": round(result.seconds, 2), "events_per_s": round(rows / result.seconds),
            "cpu_us_per_event": round(result.cpu_s / rows * 1e6, 2), "peak_rss_mb": round(result.peak_rss_mb, 1)}


async def main_async(args: argparse.Namespace) -> int:
    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with PostgresServer(find_pg_bin("system")) as pg, NatsServer() as nats:
        pg.create_database(DBNAME)
        dsn = pg.dsn(DBNAME)
        wl.setup_schema(dsn)
        print(f"== writing {args.rows:,} rows into bench_ref", flush=True)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"INSERT INTO bench_ref SELECT {wl.VALUES} FROM generate_series(1, %s::int) i", (args.rows,))
            conn.execute("VACUUM ANALYZE bench_ref")
        print(f"== backfill of {args.rows:,} rows, chunkSize {args.chunk_size:,}", flush=True)
        results: dict[str, Any] = {"rows": args.rows, "chunk_size": args.chunk_size,
                                   "backfill": await backfill_run(pg, nats, args.rows, args.chunk_size, logs)}
        print(json.dumps(results["backfill"]), flush=True)
        if not args.no_catch_up:
            print(f"== streaming catch-up of {args.rows:,} updates", flush=True)
            results["catch_up"] = await catch_up_run(pg, nats, args.rows, logs)
            print(json.dumps(results["catch_up"]), flush=True)
    path = out / f"backfill-{args.rows}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"== written {path}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
