"""No WAL pinned behind a quiet slot: the confirmed LSN keeps up with the server when the watched
database is idle, when only other databases on the server change, and with the optional heartbeat.
(A fully filtered database is covered by tests/test_listener_nats.py; WAL piling up towards
max_slot_wal_keep_size by tests/test_reliability_slot.py.)"""

from __future__ import annotations

import pytest

from listener.pgoutput import parse_lsn
from tests.support.checker import Workload
from tests.support.harness import (
    confirmed_lsn,
    current_lsn,
    nats_config,
    query,
    read_stream,
    running,
    sql,
    unique,
    wait_until,
)
from tests.support.services import NatsServer, PostgresServer

pytestmark = pytest.mark.service


async def _confirmed_at_least(dsn: str, slot: str, target: int) -> bool:
    return await confirmed_lsn(dsn, slot) >= target


async def test_idle_database_confirms_the_server_wal_end(
    fresh_db: str, pg: PostgresServer, nats_server: NatsServer
) -> None:
    dsn = pg.dsn(fresh_db)
    cfg = nats_config(pg.port, fresh_db, nats_server.url, unique("idle"))
    slot = cfg["listener"]["slotName"]
    async with running(cfg):
        for _ in range(3):  # WAL the server writes by itself (segment switches, checkpoints), none of it ours
            await sql(dsn, "SELECT pg_switch_wal()", "CHECKPOINT")

            async def followed(end: int = await current_lsn(dsn)) -> bool:
                return await confirmed_lsn(dsn, slot) >= end

            await wait_until(followed, 20, "the slot to follow")


@pytest.mark.parametrize("heartbeat", [False, True], ids=["keepalives", "emitHeartbeat"])
async def test_quiet_database_on_a_busy_server_keeps_up(
    fresh_db: str, pg: PostgresServer, nats_server: NatsServer, heartbeat: bool
) -> None:
    quiet = pg.dsn(fresh_db)
    busy_name = pg.create_database(unique("busy"))
    busy = pg.dsn(busy_name)
    try:
        await sql(busy, Workload.CREATE)
        await sql(quiet, "CREATE TABLE nothing_happens (id int PRIMARY KEY)")
        topic = unique("quiet")
        cfg = nats_config(pg.port, fresh_db, nats_server.url, topic, emitHeartbeat=heartbeat)
        slot = cfg["listener"]["slotName"]
        probe = unique("probe")  # a second slot on the quiet database, to look at what it has in its WAL
        await sql(quiet, ("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (probe,)))
        async with running(cfg):
            load = Workload(busy, transactions=200, inserts=50, updates=10, pace=0.005).start()
            try:
                for _ in range(3):
                    def committed(target: int = load.done + 40) -> bool:
                        return load.done >= target

                    await wait_until(committed, 30, "busy commits elsewhere")

                    async def followed(end: int = await current_lsn(quiet)) -> bool:
                        return await confirmed_lsn(quiet, slot) >= end

                    await wait_until(followed, 20, "the quiet slot to follow the busy server")
            finally:
                load.stop()
                load.join()
            end = await current_lsn(quiet)
            await wait_until(lambda: _confirmed_at_least(quiet, slot, end), 20, "the quiet slot to follow")
            # nothing was published: the heartbeats are not events
            assert await read_stream(nats_server.url, topic, 0, timeout=5) == []
            restart_before = await _restart_lsn(quiet, slot)
            await sql(quiet, "CHECKPOINT")  # logs the running transactions: the slot can release WAL
            await wait_until(lambda: _restart_moved(quiet, slot, restart_before), 20, "restart_lsn to advance")
        changes = await query(quiet, "SELECT data FROM pg_logical_slot_peek_changes(%s, NULL, NULL)", (probe,))
        heartbeats = [c for (c,) in changes if "wal-listener-heartbeat" in c]
        assert bool(heartbeats) == heartbeat, changes[:5]
    finally:
        pg.drop_database(busy_name)


async def _restart_lsn(dsn: str, slot: str) -> int:
    rows = await query(dsn, "SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (slot,))
    return parse_lsn(rows[0][0])


async def _restart_moved(dsn: str, slot: str, before: int) -> bool:
    return await _restart_lsn(dsn, slot) > before
