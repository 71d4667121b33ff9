"""A backfill of large rows is bounded in bytes: ``wal-listener backfill`` of a table of ~576 KB documents
(incompressible, so TOAST keeps them large) with the default config, against real PostgreSQL and
nats-server, keeps the listener's peak RSS under 300 MB and puts every row on the stream exactly once."""

from __future__ import annotations

import asyncio
import base64
import os
from pathlib import Path

import nats
import orjson
import psycopg
import pytest
from nats.js.api import DeliverPolicy

from listener.backfill import PIECE_ROWS_MAX, PIECE_SHARE, backfills, piece_rows, request_backfill
from listener.event import read_event_ids
from tests.support.harness import ListenerProcess, nats_config, query, run_cli, running, sql, unique, wait_until
from tests.support.services import Database, NatsServer, PostgresServer

IN_SESSION_LOOP = pytest.mark.asyncio(loop_scope="session")

#: 1,500 rows of 576,000 bytes: ~860 MB, 13 times the default listener.maxInFlightBytes (64 MiB)
ROWS = 1500
ROW_BYTES = 576_000
PEAK_RSS_MB = 300


def vm_hwm_mb(pid: int) -> float:
    """The kernel's high-water mark of the process's resident set (exact, not sampled)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


async def fill_docs(dsn: str, rows: int, size: int) -> None:
    """``rows`` documents of ``size`` random base64 characters (no repeated substrings: pglz gives up)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        async with conn.cursor() as cur, cur.copy("COPY docs (body) FROM STDIN") as copy:
            for _ in range(rows):
                await copy.write_row((base64.b64encode(os.urandom(size * 3 // 4)).decode(),))


async def read_reads(nats_url: str, stream: str, count: int, timeout: float) -> list[tuple[str, str, int]]:
    """(event id, action, data.id) of every message of ``stream``, waiting until ``count`` are there; the
    bodies are not kept."""
    nc = await nats.connect(nats_url)
    try:
        sub = await nc.jetstream().subscribe(f"{stream}.>", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        out: list[tuple[str, str, int]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            try:
                msg = await sub.next_msg(timeout=1.0 if len(out) < count else 0.5)
            except (TimeoutError, nats.errors.TimeoutError):
                if len(out) >= count:
                    break  # anything beyond count (duplicates) would have come by now
                continue
            event = orjson.loads(msg.data)
            out.append((event["id"], event["action"], int(event["data"]["id"])))
        return out
    finally:
        await nc.close()


@IN_SESSION_LOOP
async def test_backfill_of_large_rows_keeps_the_listener_under_300_mb(
    fresh_db: str, pg: PostgresServer, nats_server: NatsServer, tmp_path: Path, procs: list[ListenerProcess]
) -> None:
    dsn = pg.dsn(fresh_db)
    await sql(dsn, "CREATE TABLE docs (id bigserial PRIMARY KEY, body text)")
    await fill_docs(dsn, ROWS, ROW_BYTES)
    ((stored, total),) = await query(dsn, "SELECT min(pg_column_size(body)), sum(pg_column_size(body)) FROM docs")
    assert stored >= ROW_BYTES * 0.99, f"TOAST compressed the documents to {stored} bytes"
    topic = unique("bfm")
    cfg = nats_config(pg.port, fresh_db, nats_server.url, topic)  # the defaults: maxInFlightBytes 64Mi
    slot = cfg["listener"]["slotName"]
    listener = ListenerProcess(cfg, tmp_path).start()
    procs.append(listener)
    assert listener.proc is not None
    await wait_until(lambda: any(e.get("msg") == "streaming" for e in listener.logs()), 60, "the listener to stream")
    run = await asyncio.to_thread(
        run_cli, ["--config", str(listener.path), "backfill", "public.docs", "--name", "docs"], timeout=600
    )
    assert run.returncode == 0, (run.stdout, run.stderr, listener.output()[-3000:])
    assert run.stdout.splitlines()[-1] == f"backfill docs done: {ROWS:,} rows", run.stdout
    peak = vm_hwm_mb(listener.proc.pid)
    assert await asyncio.to_thread(listener.terminate) == 0
    try:
        events = await read_reads(nats_server.url, topic, ROWS, timeout=300)
    finally:  # ~860 MB in the session's nats-server: not kept for the tests after this one
        nc = await nats.connect(nats_server.url)
        try:
            await nc.jetstream().delete_stream(topic)
        finally:
            await nc.close()
    ((backfill_id,),) = await query(dsn, "SELECT id FROM wal_listener.backfills WHERE name = 'docs'")
    ident = read_event_ids(slot, backfill_id, "public", "docs")
    assert sorted(key for _, _, key in events) == list(range(1, ROWS + 1))  # every row, once
    assert all(action == "READ" for _, action, _ in events)
    assert all(event_id == ident((str(key),)) for event_id, _, key in events)  # the ids a replay would have
    print(f"\nbackfill of {ROWS} rows x {ROW_BYTES} bytes ({total / 2**20:.0f} MiB stored): listener peak RSS "
          f"{peak:.0f} MB")
    assert peak <= PEAK_RSS_MB, f"listener peak RSS {peak:.0f} MB > {PEAK_RSS_MB} MB"


def test_pieces_are_sized_from_the_largest_row_seen() -> None:
    budget = 16 * 2**20
    piece = budget // PIECE_SHARE
    assert piece_rows(0, 10_000, budget, piece) == 1  # nothing seen yet: one row
    assert piece_rows(576_000, 10_000, budget, piece) == 7  # 4 MiB of 576 KB rows
    assert piece_rows(576_000, 10_000, 1_000_000, piece) == 1  # what is left of the budget
    assert piece_rows(50_000_000, 10_000, budget, piece) == 1  # a row larger than the piece: alone
    assert piece_rows(200, 10_000, budget, piece) == PIECE_ROWS_MAX  # small rows: capped
    assert piece_rows(200, 40, budget, piece) == 40  # the rows the chunk may still take


@IN_SESSION_LOOP
async def test_chunks_end_at_their_byte_budget_and_the_next_resumes_after_the_last_key(
    fresh_any_db: Database, nats_server: NatsServer
) -> None:
    """maxInFlightBytes 4Mi: a chunk's budget is 1 MiB, so 120 rows of 100 KB take about a dozen chunks (not
    one of chunkSize rows), and every row is on the stream once, in key order."""
    dsn = fresh_any_db.dsn()
    await sql(dsn, "CREATE TABLE docs (id bigserial PRIMARY KEY, body text)")
    await fill_docs(dsn, 120, 100_000)
    topic = unique("bfb")
    cfg = nats_config(fresh_any_db.server.port, fresh_any_db.name, nats_server.url, topic, maxInFlightBytes="4Mi")
    slot = cfg["listener"]["slotName"]
    async with running(cfg):
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            assert await request_backfill(conn, slot, "bytes", ["docs"]) is not None

        async def done() -> bool:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                (state,) = [b for b in await backfills(conn, slot) if b.name == "bytes"]
            assert state.state != "failed", state.error
            return state.state == "done"

        await wait_until(done, 60, "the backfill done")
        events = await read_reads(nats_server.url, topic, 120, timeout=30)
    ((chunks, rows),) = await query(dsn, "SELECT chunks, rows_done FROM wal_listener.backfills WHERE name = 'bytes'")
    assert rows == 120 and 10 <= chunks <= 14, (chunks, rows)  # ~10.5 rows of 100 KB per 1 MiB
    assert [key for _, _, key in events] == list(range(1, 121))
