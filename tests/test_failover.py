"""A primary fails over with the listener streaming: it follows the new primary (both hosts in
``database.host``) and every committed change is on the stream, with the ids it had, and nothing the new
primary does not have. Real servers only: PostgreSQL 18 with failover slots, PostgreSQL 15 without them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.support.checker import WireTap, Workload, check, read_jetstream, table_truth
from tests.support.harness import ListenerProcess, http_get, nats_config, unique, wait_until
from tests.support.services import NatsServer, free_port
from tests.support.standby import PrimaryStandby

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _listener_config(hosts: str, nats: NatsServer, topic: str, **listener: Any) -> dict[str, Any]:
    cfg = nats_config(5432, "app", nats.url, topic, serverPort=free_port(), **listener)  # hosts carry ports
    cfg["database"]["host"] = hosts
    return cfg


async def _ready(port: int) -> tuple[int, str]:
    try:
        return await http_get(port, "/ready")
    except OSError:
        return 0, ""


async def _max_k(dsn: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        row = await (await conn.execute("SELECT coalesce(max(k), 0) FROM items")).fetchone()
        return int(row[0]) if row else 0


async def _caught_up(dsn: str, slot: str) -> bool:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        row = await (await conn.execute(
            "SELECT confirmed_flush_lsn >= pg_current_wal_lsn() FROM pg_replication_slots WHERE slot_name = %s",
            (slot,),
        )).fetchone()
        return bool(row and row[0])


def _first_after(tap: WireTap, k: int) -> bool:
    return any(r.event["action"] == "INSERT" and r.event["data"].get("k", 0) > k for r in tap.events)


async def test_postgresql_18_failover_slot_follows_the_promoted_standby(
    make_primary_standby: Callable[..., PrimaryStandby], nats_server: NatsServer, tmp_path: Path,
    procs: list[ListenerProcess],
) -> None:
    pair = make_primary_standby(databases=["app"])
    pair.primary.execute(Workload.CREATE, dbname="app")
    topic = unique("ha")
    cfg = _listener_config(pair.hosts(), nats_server, topic, refreshConnection="1s")
    slot, port = cfg["listener"]["slotName"], cfg["listener"]["serverPort"]
    tap = await WireTap(nats_server.url, topic).start()
    listener = ListenerProcess(cfg, tmp_path).start()
    procs.append(listener)
    await wait_until(lambda: _status(port, 200), 30, "the listener streaming")
    _, body = await _ready(port)
    assert '"slot_failover":true' in body and '"synced_standbys":1' in body  # PostgreSQL 18: a failover slot
    load = Workload(pair.dsn("app"), transactions=1_000_000, inserts=5, updates=3, pace=0.005, seed=18).start()
    try:
        await wait_until(lambda: load.rows >= 300, 30, "rows before the failover")
        await asyncio.to_thread(pair.wait_slot_synced, slot, 30)
        await wait_until(lambda: load.rows >= 600, 30, "more rows, some past the synced position")
        killed = time.monotonic()
        await asyncio.to_thread(pair.kill_primary)
        await asyncio.to_thread(pair.promote)
        after = await _max_k(pair.dsn("app"))
        await wait_until(lambda: _first_after(tap, after), 60, "an event of a row written on the new primary")
        gap = time.monotonic() - killed
        await wait_until(lambda: load.rows >= after + 300, 60, "the writer going on against the new primary")
    finally:
        load.stop()
        load.join()
    dsn = pair.dsn("app")
    await wait_until(lambda: _caught_up(dsn, slot), 60, "the listener caught up on the new primary")
    truth = await table_truth(dsn)
    events = [r.event for r in await read_jetstream(nats_server.url, topic)]
    report = check(truth, events)
    report.assert_ok()  # every change the new primary has; no phantom; ids unchanged; in order
    wire = check(truth, [r.event for r in tap.events])
    assert not wire.changed_ids and not wire.unexpected  # what was sent twice was sent with the same id
    assert "Traceback" not in listener.output()
    print(f"\nfailover gap (primary killed -> first event of the new primary): {gap:.2f}s; "
          f"promotion {pair.promoted_in:.2f}s; {len(wire.copies)} events sent again (same ids) after it")
    await tap.close()


async def _status(port: int, code: int) -> bool:
    return (await _ready(port))[0] == code


@pytest.mark.parametrize("on_slot_lost", ["halt", "resnapshot"])
async def test_postgresql_15_failover_without_slot_sync_is_reported_and_resnapshot_recovers(
    make_primary_standby: Callable[..., PrimaryStandby], nats_server: NatsServer, tmp_path: Path,
    procs: list[ListenerProcess], on_slot_lost: str,
) -> None:
    """Before PostgreSQL 17 (and without Patroni) a promoted standby has no logical slot: one line naming
    the cause and the fix, /ready 503; with onSlotLost: resnapshot a new slot and a backfill of everything."""
    from tests.support.services import find_pg_bin

    pair = make_primary_standby(bin_dir=find_pg_bin("system"), databases=["app"], failover_slots=False)
    pair.primary.execute(Workload.CREATE, dbname="app")
    pair.primary.execute("INSERT INTO items SELECT g, 1, 'x' FROM generate_series(1, 50) g", dbname="app")
    topic = unique("ha15")
    cfg = _listener_config(pair.hosts(), nats_server, topic, refreshConnection="1s", onSlotLost=on_slot_lost)
    slot, port = cfg["listener"]["slotName"], cfg["listener"]["serverPort"]
    listener = ListenerProcess(cfg, tmp_path).start()
    procs.append(listener)
    await wait_until(lambda: _status(port, 200), 30, "the listener streaming")
    await asyncio.to_thread(pair.kill_primary)
    await asyncio.to_thread(pair.promote)
    if on_slot_lost == "halt":

        def reported() -> bool:
            return any(e.get("reason") == "slot_missing_after_failover" for e in listener.logs())

        await wait_until(reported, 30, "the missing slot reported")
        (line,) = [e for e in listener.logs() if e.get("reason") == "slot_missing_after_failover"]
        assert f"127.0.0.1:{pair.standby.port}" in line["msg"] and "a failover" in line["msg"]
        assert "sync_replication_slots" in line["msg"] and "Patroni permanent slot" in line["msg"]
        status, body = await _ready(port)
        assert status == 503 and "does not exist" in body
        assert listener.proc is not None and listener.proc.poll() is None
        return
    # resnapshot: a new slot on the new primary, every row of the table published as READ
    dsn = pair.dsn("app")
    await wait_until(lambda: _status(port, 200), 60, "streaming from a new slot")

    async def snapshot_done() -> bool:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            row = await (await conn.execute(
                "SELECT state FROM wal_listener.backfills WHERE slot = %s AND name LIKE 'resnapshot-%%'", (slot,)
            )).fetchone()
            return bool(row and row[0] == "done")

    await wait_until(snapshot_done, 60, "the resnapshot done")
    events = [r.event for r in await read_jetstream(nats_server.url, topic)]
    assert sorted(e["data"]["k"] for e in events if e["action"] == "READ") == list(range(1, 51))


async def test_patroni_permanent_slot_follows_a_failover(
    make_patroni: Callable[..., Any], nats_server: NatsServer, tmp_path: Path, procs: list[ListenerProcess],
) -> None:
    """PostgreSQL 15 managed by Patroni, the listener's slot declared as a permanent slot: Patroni keeps a
    copy on the replica, so after the leader hands over the listener resumes on the new leader."""
    from tests.support.patroni import logical_slot

    slot, topic = unique("patroni"), unique("hap")
    cluster = make_patroni(slots={slot: logical_slot("app")}, databases=["app"])
    cluster.execute(Workload.CREATE, dbname="app")
    cfg = _listener_config(cluster.hosts_config(), nats_server, topic, slotName=slot, refreshConnection="1s")
    port = cfg["listener"]["serverPort"]
    tap = await WireTap(nats_server.url, topic).start()
    listener = ListenerProcess(cfg, tmp_path).start()
    procs.append(listener)
    await wait_until(lambda: _status(port, 200), 30, "the listener streaming from the Patroni leader")
    dsn = cluster.dsn("app")
    load = Workload(dsn, transactions=1_000_000, inserts=5, updates=3, pace=0.005, seed=15).start()
    try:
        await wait_until(lambda: load.rows >= 300, 30, "rows before the failover")
        await asyncio.to_thread(cluster.wait_slots)  # the replica's copy is usable after a promotion
        started = time.monotonic()
        old = cluster.leader()
        new = await asyncio.to_thread(cluster.failover)
        assert new is not old
        after = await _max_k(dsn)
        await wait_until(lambda: _first_after(tap, after), 60, "an event of a row written on the new leader")
        gap = time.monotonic() - started
        await wait_until(lambda: load.rows >= after + 300, 60, "the writer going on against the new leader")
    finally:
        load.stop()
        load.join()
    await wait_until(lambda: _caught_up(dsn, slot), 60, "the listener caught up on the new leader")
    truth = await table_truth(dsn)
    report = check(truth, [r.event for r in await read_jetstream(nats_server.url, topic)])
    report.assert_ok()
    wire = check(truth, [r.event for r in tap.events])
    assert not wire.changed_ids and not wire.unexpected
    print(f"\nPatroni failover gap (switchover asked -> first event of the new leader): {gap:.2f}s; "
          f"{len(wire.copies)} events sent again (same ids) after it")
    await tap.close()
