"""Snapshots and backfills against real PostgreSQL (15 and 18) and nats-server: READ events while streaming."""

from __future__ import annotations

import asyncio
import random
import re
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from listener import catalog
from listener.backfill import backfills, request_backfill
from listener.backfill_cli import _Bar
from tests.support.harness import (
    ListenerProcess,
    Received,
    metric,
    nats_config,
    read_stream,
    run_cli,
    running,
    sql,
    unique,
    wait_until,
)
from tests.support.services import Database, NatsServer, PostgresServer

pytestmark = pytest.mark.asyncio(loop_scope="session")

TABLE = (
    "CREATE TABLE items (id int PRIMARY KEY, name text, price numeric(10,2), tags text[], doc jsonb,"
    " seen timestamptz, flag boolean, blob bytea)"
)
# row g and row g + 1000 differ only in id
ROWS = (
    "INSERT INTO items SELECT g, 'item ' || g %% 1000, (g %% 1000) * 1.5, ARRAY['a', 'b' || g %% 1000],"
    " jsonb_build_object('n', g %% 1000),"
    " '2026-01-02 03:04:05.123456+02'::timestamptz + (g %% 1000) * interval '1 min', g %% 2 = 0,"
    " decode(md5((g %% 1000)::text), 'hex') FROM generate_series(%s::int, %s::int) g"
)


async def _request(dsn: str, slot: str, name: str, tables: list[str], where: str = "") -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        assert await request_backfill(conn, slot, name, tables, where) is not None


async def _state(dsn: str, slot: str, name: str) -> Any:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        found = [b for b in await backfills(conn, slot) if b.name == name]
        return found[0] if found else None


async def _done(dsn: str, slot: str, name: str) -> bool:
    state = await _state(dsn, slot, name)
    if state is not None and state.state == "failed":
        raise AssertionError(f"backfill failed: {state.error}")
    return state is not None and state.state == "done"


def _data_bytes(body: bytes) -> bytes:
    """The ``data`` object of an event body, as the listener wrote it."""
    start = body.index(b'"data":') + len(b'"data":')
    return body[start : body.index(b',"dataOld":')]


def _by_action(events: list[Received], action: str) -> list[Received]:
    return [r for r in events if r.event["action"] == action]


async def test_backfill_publishes_every_row_as_its_insert_would(
    fresh_any_db: Database, nats_server: NatsServer
) -> None:
    dsn = fresh_any_db.dsn()
    await sql(dsn, TABLE, (ROWS, (1, 250)))
    topic = unique("bf")
    cfg = nats_config(fresh_any_db.server.port, fresh_any_db.name, nats_server.url, topic,
                      snapshot={"chunkSize": 40})
    slot = cfg["listener"]["slotName"]
    async with running(cfg):
        await _request(dsn, slot, "all-items", ["items"])
        await wait_until(lambda: _done(dsn, slot, "all-items"), 60, "the backfill done")
        await sql(dsn, (ROWS, (1001, 1250)))
        events = await read_stream(nats_server.url, topic, 500, timeout=60)
    reads = _by_action(events, "READ")
    inserts = _by_action(events, "INSERT")
    assert len(reads) == 250 and len(inserts) == 250
    assert {r.event["data"]["id"] for r in reads} == set(range(1, 251))
    assert all(r.subject == f"{topic}.public_items" and r.event["dataOld"] == {} for r in reads)
    # the same conversion: the data of READ n is byte for byte the data of the INSERT of row n + 1000
    insert_of = {r.event["data"]["id"] - 1000: r for r in inserts}
    for read in reads:
        n = read.event["data"]["id"]
        mine = _data_bytes(read.raw).replace(b'{"id":%d,' % n, b"{", 1)
        theirs = _data_bytes(insert_of[n].raw).replace(b'{"id":%d,' % (n + 1000), b"{", 1)
        assert mine == theirs
    state = await _state(dsn, slot, "all-items")
    assert (state.rows_done, state.chunks) == (250, 7)


# -- guarantee 1: no stale overwrite ----------------------------------------------------------------

COUNTERS = "CREATE TABLE counters (id int PRIMARY KEY, v int NOT NULL, pad text)"


async def _writer(dsn: str, stop: asyncio.Event, max_key: int, seed: int) -> int:
    """Random inserts, updates and deletes of keys 1..max_key until stopped; returns the statements run."""
    rnd = random.Random(seed)
    done = 0
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        while not stop.is_set():
            key = rnd.randint(1, max_key)
            kind = rnd.random()
            if kind < 0.6:
                await conn.execute("UPDATE counters SET v = v + 1 WHERE id = %s", (key,))
            elif kind < 0.8:
                await conn.execute("DELETE FROM counters WHERE id = %s", (key,))
            else:
                await conn.execute(
                    "INSERT INTO counters VALUES (%s, 1000, 'new') ON CONFLICT (id) DO UPDATE SET v = counters.v + 1",
                    (key,),
                )
            done += 1
            await asyncio.sleep(0)
    return done


async def test_rows_changed_during_the_backfill_end_in_their_latest_state(
    fresh_any_db: Database, nats_server: NatsServer
) -> None:
    """While a writer inserts, updates and deletes rows of the table under backfill, the last event of every
    key on the broker equals the row's final state (a deleted row's last event is its DELETE, or it never
    appears): the chunks' rows whose keys changed between the watermarks are dropped."""
    dsn = fresh_any_db.dsn()
    await sql(dsn, COUNTERS, "INSERT INTO counters SELECT g, 0, repeat('x', 50) FROM generate_series(1, 3000) g")
    topic = unique("bfw")
    # chunks of 20 rows: 150 windows, and a backfill long enough for the writer to race it (it starts the moment
    # it is requested)
    cfg = nats_config(fresh_any_db.server.port, fresh_any_db.name, nats_server.url, topic,
                      snapshot={"chunkSize": 20})
    slot = cfg["listener"]["slotName"]
    async with running(cfg):
        stop = asyncio.Event()
        writer = asyncio.create_task(_writer(dsn, stop, 3500, seed=7))
        await _request(dsn, slot, "while-writing", ["counters"])
        await wait_until(lambda: _done(dsn, slot, "while-writing"), 120, "the backfill done")
        stop.set()
        statements = await writer
        truth = {int(k): int(v) for k, v in await _rows(dsn, "SELECT id, v FROM counters")}
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            end = (await (await conn.execute("SELECT pg_current_wal_lsn()::text")).fetchone())[0]  # type: ignore[index]
        await wait_until(lambda: _confirmed_past(dsn, slot, end), 60, "the listener caught up")
        events = await read_stream(nats_server.url, topic, 1, timeout=30)
    assert statements > 200  # the writer really raced the backfill
    assert len(_by_action(events, "READ")) > 1000
    last: dict[int, dict[str, Any]] = {}
    for received in events:
        event = received.event
        row = event["data"] or event["dataOld"]
        last[int(row["id"])] = event
    for key in range(1, 3501):
        event = last.get(key)
        if key in truth:
            assert event is not None and event["action"] in ("READ", "INSERT", "UPDATE"), (key, event)
            assert event["data"]["v"] == truth[key], (key, event, truth[key])
        else:
            assert event is None or event["action"] == "DELETE", (key, event)


async def _rows(dsn: str, query: str) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        return await (await conn.execute(query)).fetchall()


async def _confirmed_past(dsn: str, slot: str, lsn: str) -> bool:
    rows = await _rows(dsn, f"SELECT confirmed_flush_lsn >= '{lsn}'::pg_lsn FROM pg_replication_slots "
                            f"WHERE slot_name = '{slot}'")
    return bool(rows and rows[0][0])


# -- guarantee 2: resumable --------------------------------------------------------------------------


async def test_kill_9_mid_backfill_resumes_from_the_last_finished_chunk(
    fresh_db: str, pg: PostgresServer, nats_server: NatsServer, tmp_path: Path, procs: list[ListenerProcess]
) -> None:
    dsn = pg.dsn(fresh_db)
    await sql(dsn, COUNTERS, "INSERT INTO counters SELECT g, 0, repeat('y', 200) FROM generate_series(1, 30000) g")
    topic = unique("bfk")
    cfg = nats_config(pg.port, fresh_db, nats_server.url, topic, snapshot={"chunkSize": 250})
    slot = cfg["listener"]["slotName"]
    first = ListenerProcess(cfg, tmp_path).start()
    procs.append(first)
    await _request(dsn, slot, "crash", ["counters"])

    async def some_done() -> bool:
        state = await _state(dsn, slot, "crash")
        return state is not None and state.rows_done >= 5000

    await wait_until(some_done, 60, "a part of the backfill done")
    first.kill()
    before = await _state(dsn, slot, "crash")
    assert before.state == "running" and 0 < before.rows_done < 30000
    second = ListenerProcess(cfg, tmp_path).start()
    procs.append(second)
    await wait_until(lambda: _done(dsn, slot, "crash"), 120, "the backfill done after the restart")
    after = await _state(dsn, slot, "crash")
    # it went on from where it was: the chunks counted are the table's, not the table's plus a restart from zero
    assert after.rows_done == 30000 and after.chunks in (120, 121)
    resumed = [e for e in second.logs() if e.get("msg", "").startswith("backfill resumed")]
    assert resumed and resumed[0]["rows_done"] == before.rows_done
    events = await read_stream(nats_server.url, topic, 30000, timeout=60)
    reads = _by_action(events, "READ")
    ids = [r.id for r in reads]
    assert len(ids) == len(set(ids)) == 30000  # a chunk sent again had the same ids: JetStream dropped the copies
    assert {r.event["data"]["id"] for r in reads} == set(range(1, 30001))
    second.terminate()


# -- initial snapshot, --where, the CLI ---------------------------------------------------------------


async def test_initial_snapshot_when_the_listener_creates_its_slot(
    fresh_any_db: Database, nats_server: NatsServer
) -> None:
    dsn = fresh_any_db.dsn()
    await sql(dsn, COUNTERS, "INSERT INTO counters SELECT g, g, 'p' FROM generate_series(1, 120) g",
              "CREATE TABLE audit (id int PRIMARY KEY)", "INSERT INTO audit SELECT generate_series(1, 10)")
    topic = unique("bfi")
    cfg = nats_config(fresh_any_db.server.port, fresh_any_db.name, nats_server.url, topic,
                      snapshot={"mode": "initial", "chunkSize": 50}, filter={"tables": {"counters": ["insert"]}})
    slot = cfg["listener"]["slotName"]
    async with running(cfg):
        names: list[str] = []

        async def done() -> bool:
            names[:] = [b.name for b in await _all(dsn, slot) if b.state == "done"]
            return bool(names)

        await wait_until(done, 60, "the initial snapshot done")
    events = await read_stream(nats_server.url, topic, 120, timeout=30)
    assert names[0].startswith("initial-")
    assert [r.event["table"] for r in events] == ["counters"] * 120  # audit is not covered by the filter
    assert sorted(r.event["data"]["v"] for r in events) == list(range(1, 121))
    async with running(cfg):  # the slot exists now: no second snapshot
        await asyncio.sleep(1.5)
    assert len(await _all(dsn, slot)) == 1


async def _all(dsn: str, slot: str) -> list[Any]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        return await backfills(conn, slot)


async def _lines(stream: asyncio.StreamReader | None, into: list[str]) -> None:
    while stream is not None and (line := await stream.readline()):
        into.append(line.decode().rstrip("\n"))


async def test_cli_backfill_with_where_shows_progress_and_exits_0(
    fresh_db: str, pg: PostgresServer, nats_server: NatsServer, tmp_path: Path
) -> None:
    dsn = pg.dsn(fresh_db)
    await sql(dsn, COUNTERS, "INSERT INTO counters SELECT g, g % 10, 'p' FROM generate_series(1, 500000) g",
              "ANALYZE counters")
    topic = unique("bfc")
    cfg = nats_config(pg.port, fresh_db, nats_server.url, topic, snapshot={"chunkSize": 40})  # 1,250 chunks
    slot = cfg["listener"]["slotName"]
    config_file = tmp_path / "config.yml"
    config_file.write_text(yaml.safe_dump(cfg))
    out: list[str] = []
    err: list[str] = []

    async def rows_done() -> int:
        state = await _state(dsn, slot, "v3")
        return int(state.rows_done) if state is not None else 0

    async with running(cfg):
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "listener.cli", "--config", str(config_file), "backfill", "public.counters",
            "--where", "v = 3", "--name", "v3", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        reading = asyncio.gather(_lines(cli.stdout, out), _lines(cli.stderr, err))
        # A fast machine backfills these rows in less than the 2 s between two progress lines: the table is
        # locked to hold the backfill still, first for those 2 s, then again as soon as it moved, until the CLI
        # has shown its rate. The rows and what is printed are the same as in an unhindered backfill.
        async with await psycopg.AsyncConnection.connect(dsn) as locker:
            await wait_until(lambda: bool(err), 30, "the first progress line")
            await locker.execute("LOCK TABLE counters IN ACCESS EXCLUSIVE MODE")
            await asyncio.sleep(_Bar.EVERY)
            held = await rows_done()
            await locker.commit()
            await wait_until(lambda: _changed(rows_done(), held), 30, "the backfill to move on")
            await locker.execute("LOCK TABLE counters IN ACCESS EXCLUSIVE MODE")
            await wait_until(lambda: any("rows/s" in line for line in err), 30, "a progress line with the rate")
            await locker.commit()
        returncode = await asyncio.wait_for(cli.wait(), 60)
        await reading
        status = await asyncio.to_thread(run_cli, ["backfill", "--status", "--config", str(config_file)])
    assert returncode == 0, err
    # the results on stdout, the progress on stderr
    assert out == ["backfill v3 queued for slot " + slot + ": public.counters", "backfill v3 done: 50,000 rows"]
    progress = [line for line in err if "rows/s" in line]  # rows done / the planner's estimate, rate, ETA
    estimate = r"\] [\d,]+/(4[5-9]|5[0-5]),\d{3} rows \(\d+%\)"  # the planner's, about 50,000
    assert progress and all(re.search(estimate, line) for line in progress), err
    assert any("ETA" in line for line in progress), err
    assert len(set(err)) == len(err), err  # no line repeated while nothing moved
    assert "v3" in status.stdout and "done" in status.stdout and "public.counters" in status.stdout
    events = await read_stream(nats_server.url, topic, 50000, timeout=30)
    assert sorted(r.event["data"]["id"] for r in events) == list(range(3, 500001, 10))


async def _changed(now: Awaitable[int], before: int) -> bool:
    return await now != before


async def test_a_table_never_analyzed_gets_an_estimate_and_one_chunk_prints_no_progress(
    fresh_db: str, pg: PostgresServer, nats_server: NatsServer, tmp_path: Path
) -> None:
    """No ANALYZE (reltuples -1): the estimate comes from the statistics or the table's size; a backfill done
    in one chunk prints its two result lines and no "0 rows" progress."""
    dsn = pg.dsn(fresh_db)
    await sql(dsn, COUNTERS, "INSERT INTO counters SELECT g, g % 10, 'p' FROM generate_series(1, 3000) g")
    cfg = nats_config(pg.port, fresh_db, nats_server.url, unique("bfn"))
    config_file = tmp_path / "config.yml"
    config_file.write_text(yaml.safe_dump(cfg))
    async with running(cfg):
        run = await asyncio.to_thread(run_cli, ["--config", str(config_file), "backfill", "counters", "--name", "n"])
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "backfill n done: 3,000 rows", run.stdout
    assert len(run.stdout.splitlines()) == 2 and run.stderr.strip() == "", (run.stdout, run.stderr)
    state = await _state(dsn, cfg["listener"]["slotName"], "n")
    assert 1000 <= state.rows_estimated <= 10000, state.rows_estimated


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["nopk"], "table public.nopk has no primary key or replica identity index"),
        (["nosuch"], "table nosuch does not exist"),
        (["counters", "--where", "v <<< 3"], "--where is not valid for public.counters"),
        (["counters", "--where", "true) ; DROP TABLE counters; --"], "unmatched ')'"),
        (["counters", "--where", "v = 1) OR (true"], "unmatched ')'"),
        (["counters", "--where", "pg_sleep(1) IS NULL; SELECT 1"], "must be one expression"),
        (["audit"], "table public.audit is excluded by listener.filter.tables"),
        (['counters"; DROP TABLE counters; --'], "is not a table name"),
    ],
    ids=["no-key", "unknown", "bad-where", "where-injection", "where-breakout", "second-statement", "filtered",
         "table-injection"],
)
async def test_cli_refuses_in_one_line_before_anything_runs(
    fresh_db: str, pg: PostgresServer, tmp_path: Path, args: list[str], expected: str
) -> None:
    dsn = pg.dsn(fresh_db)
    await sql(dsn, COUNTERS, "CREATE TABLE nopk (a int, b text)", "CREATE TABLE audit (id int PRIMARY KEY)",
              "CREATE PUBLICATION p FOR ALL TABLES")
    cfg = nats_config(pg.port, fresh_db, "nats://127.0.0.1:1", unique("t"), publicationName="p",
                      filter={"tables": {"counters": ["insert"], "nopk": ["insert"]}})
    config_file = tmp_path / "config.yml"
    config_file.write_text(yaml.safe_dump(cfg))
    run = await asyncio.to_thread(run_cli, ["--config", str(config_file), "backfill", *args])
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1 and expected in run.stderr, run.stderr
    # nothing ran: the table is there and nothing was queued
    assert await _rows(dsn, "SELECT count(*) FROM counters") == [(0,)]
    assert await _all(dsn, cfg["listener"]["slotName"]) == []


# -- guarantee 4: streaming never stops --------------------------------------------------------------


async def test_other_tables_stream_and_the_slot_advances_during_a_backfill(
    fresh_db: str, pg: PostgresServer, nats_server: NatsServer
) -> None:
    """Changes of other tables go out between the backfill's READ events (in stream order, not after it),
    and the slot's confirmed LSN moves on while it runs."""
    dsn = pg.dsn(fresh_db)
    await sql(dsn, COUNTERS, "INSERT INTO counters SELECT g, 0, repeat('z', 300) FROM generate_series(1, 60000) g",
              "CREATE TABLE orders (id serial PRIMARY KEY)")
    topic = unique("bfs")
    cfg = nats_config(pg.port, fresh_db, nats_server.url, topic, snapshot={"chunkSize": 300})
    slot = cfg["listener"]["slotName"]
    confirmed: set[str] = set()
    async with running(cfg):
        stop = asyncio.Event()

        async def orders() -> None:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                while not stop.is_set():
                    await conn.execute("INSERT INTO orders DEFAULT VALUES")
                    await asyncio.sleep(0.01)

        writer = asyncio.create_task(orders())
        await _request(dsn, slot, "big", ["counters"])
        while not await _done(dsn, slot, "big"):
            state = await _state(dsn, slot, "big")
            if state is not None and state.state == "running":
                rows = await _rows(dsn, f"SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
                                        f"WHERE slot_name = '{slot}'")
                confirmed.add(rows[0][0])
            await asyncio.sleep(0.02)
        stop.set()
        await writer
        count = (await _rows(dsn, "SELECT count(*) FROM orders"))[0][0]
        events = await read_stream(nats_server.url, topic, 60000 + count, timeout=60)
    tables = [r.event["table"] for r in events]
    first, last = tables.index("counters"), len(tables) - 1 - tables[::-1].index("counters")
    assert tables.count("counters") == 60000
    assert "orders" in tables[first:last]  # orders streamed while the backfill ran
    assert len(confirmed) > 1  # and the slot's confirmed LSN moved on meanwhile


# -- guarantee 6: a lost slot is snapshotted again -----------------------------------------------------


async def test_resnapshot_after_the_slot_was_dropped(
    fresh_db: str, pg: PostgresServer, nats_server: NatsServer
) -> None:
    dsn = pg.dsn(fresh_db)
    await sql(dsn, COUNTERS, "INSERT INTO counters SELECT g, g, 'p' FROM generate_series(1, 300) g")
    topic = unique("bfr")
    cfg = nats_config(pg.port, fresh_db, nats_server.url, topic, onSlotLost="resnapshot",
                      snapshot={"chunkSize": 100})
    slot = cfg["listener"]["slotName"]
    before = metric("slot_resnapshots_total")
    async with running(cfg) as listener:
        await sql(dsn, ("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = %s",
                        (slot,)))
        await wait_until(lambda: _slot_gone_or_inactive(dsn, slot), 30, "the slot released")
        await sql(dsn, ("SELECT pg_drop_replication_slot(%s)", (slot,)))

        async def resnapshotted() -> bool:
            return any(b.state == "done" and b.name.startswith("resnapshot-") for b in await _all(dsn, slot))

        await wait_until(resnapshotted, 60, "a new slot and a backfill of every published table")
        assert listener.health.postgres
    assert metric("slot_resnapshots_total") == before + 1
    events = await read_stream(nats_server.url, topic, 300, timeout=30)
    assert sorted(r.event["data"]["id"] for r in events if r.event["action"] == "READ") == list(range(1, 301))
    assert await _rows(dsn, f"SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'") == [(1,)]


async def _slot_gone_or_inactive(dsn: str, slot: str) -> bool:
    rows = await _rows(dsn, f"SELECT active FROM pg_replication_slots WHERE slot_name = '{slot}'")
    return not rows or not rows[0][0]


# -- least privilege ----------------------------------------------------------------------------------


async def test_a_listener_without_create_privilege_uses_a_state_table_a_dba_made(
    fresh_db: str, pg: PostgresServer, nats_server: NatsServer
) -> None:
    """The least-privilege path: `wal-listener backfill --print-ddl ROLE` run once by a DBA; the listener
    role has REPLICATION and SELECT on the table, no CREATE anywhere."""
    dsn = pg.dsn(fresh_db)
    role = unique("cdc")
    ddl = "; ".join(s.as_string(None) for s in [*catalog.state_table_ddl(), *catalog.state_table_grants(role)])
    await sql(dsn, COUNTERS, "INSERT INTO counters SELECT g, g, 'p' FROM generate_series(1, 50) g",
              f"CREATE ROLE {role} LOGIN REPLICATION", f"GRANT SELECT ON counters TO {role}",
              "REVOKE CREATE ON SCHEMA public FROM PUBLIC", f"REVOKE CREATE ON DATABASE {fresh_db} FROM PUBLIC",
              "CREATE PUBLICATION p FOR ALL TABLES", ddl)
    topic = unique("bfp")
    cfg = nats_config(pg.port, fresh_db, nats_server.url, topic, publicationName="p")
    cfg["database"]["user"] = role
    slot = cfg["listener"]["slotName"]
    async with running(cfg):
        async with await psycopg.AsyncConnection.connect(pg.dsn(fresh_db, user=role), autocommit=True) as conn:
            assert await request_backfill(conn, slot, "least", ["public.counters"]) is not None
        await wait_until(lambda: _done(dsn, slot, "least"), 60, "the backfill done")
    events = await read_stream(nats_server.url, topic, 50, timeout=30)
    assert len(_by_action(events, "READ")) == 50
