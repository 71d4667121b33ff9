"""Reliability under crashes and outages, checked from the consumer's side against the source table.

Each test writes with :class:`tests.checker.Workload` (inserts and updates numbered per row), injects
faults while it runs, and then compares the table with what the broker holds (:func:`tests.checker.check`):
nothing missing, nothing out of order per row, no phantom events, ids stable across replays, and
duplicates only where at-least-once allows them.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.checker import WireTap, Workload, check, read_jetstream, table_truth
from tests.support.harness import (
    ListenerProcess,
    Received,
    confirmed_lsn,
    current_lsn,
    http_get,
    nats_config,
    running,
    sql,
    unique,
    wait_until,
)
from tests.support.services import NatsServer, PostgresServer, free_port

pytestmark = pytest.mark.service


def streaming(proc: ListenerProcess, times: int = 1) -> Callable[[], bool]:
    return lambda: proc.output().count('"msg":"streaming"') >= times


async def caught_up(dsn: str, slot: str, timeout: float = 60) -> None:
    """Wait until the slot confirmed everything written so far (so the broker holds all of it)."""
    end = await current_lsn(dsn)

    async def done() -> bool:
        return await confirmed_lsn(dsn, slot) >= end

    await wait_until(done, timeout, "the slot to confirm the end of the WAL")


def kill_and_start(server: PostgresServer | NatsServer) -> None:
    """``kill -9`` the server, then start it again (same port, same data)."""
    server.kill()
    server.start()


async def test_kill_9_four_times_under_load_loses_nothing_and_replays_only_the_unconfirmed_tail(
    fresh_db: str, pg: PostgresServer, nats_server: NatsServer, tmp_path: Path, procs: list[ListenerProcess]
) -> None:
    seed = int(os.environ.get("RELIABILITY_SEED") or time.time_ns() % 2**31)
    rng = random.Random(seed)
    dsn = pg.dsn(fresh_db)
    await sql(dsn, Workload.CREATE)
    topic = unique("kill")
    tap = await WireTap(nats_server.url, topic).start()  # every publish, before JetStream de-duplicates
    cfg = nats_config(pg.port, fresh_db, nats_server.url, topic, batchSize=100)
    slot = cfg["listener"]["slotName"]
    proc = ListenerProcess(cfg, tmp_path).start()
    procs.append(proc)
    await wait_until(streaming(proc), 30, "streaming")
    load = Workload(dsn, transactions=10**6, inserts=10, updates=5, pace=0.004, seed=seed).start()
    kills: list[tuple[int, int]] = []  # (events the tap had read, LSN the slot had confirmed) at each kill
    try:
        for _ in range(4):
            def published(target: int = len(tap.events) + 200) -> bool:
                return len(tap.events) >= target

            await wait_until(published, 60, "the listener to publish")
            await asyncio.sleep(rng.uniform(0.0, 0.4))  # a random point in the stream
            proc.kill()
            await tap.settle(quiet=0.2)  # what the dead process had sent is read before the mark
            kills.append((len(tap.events), await confirmed_lsn(dsn, slot)))
            proc = ListenerProcess(cfg, tmp_path).start()
            procs.append(proc)
        rows = load.rows
        await wait_until(lambda: load.rows >= rows + 500, 60, "commits after the last kill")
        load.stop()
        load.join()
        await caught_up(dsn, slot)
        await tap.settle()
    finally:
        load.stop()
        await tap.close()
    truth = await table_truth(dsn)
    assert len(truth) == load.rows

    wire = check(truth, [r.event for r in tap.events])
    wire.assert_ok()  # nothing missing, ids unchanged, per-row order kept, no phantoms
    outside = wire.duplicates_outside_tail(kills)
    assert not outside, f"re-sent events that had been confirmed (seed {seed}): {outside[:5]}"
    assert max(wire.duplicated.values(), default=1) <= len(kills) + 1

    stream = check(truth, [r.event for r in await read_jetstream(nats_server.url, topic)])
    stream.assert_ok(duplicates=False)  # Nats-Msg-Id = event id: JetStream dropped every replayed copy
    assert await asyncio.to_thread(proc.terminate) == 0
    print(f"seed {seed}: {wire.received} publishes, {len(wire.copies)} replayed copies, kills at {kills}")


async def test_postgres_and_nats_restarted_and_crashed_mid_stream(
    make_pg: Callable[..., PostgresServer], make_nats: Callable[..., NatsServer], tmp_path: Path,
    procs: list[ListenerProcess],
) -> None:
    pg = make_pg()
    pg.create_database("app")
    broker = make_nats()
    dsn = pg.dsn("app")
    await sql(dsn, Workload.CREATE)
    topic = unique("outage")
    cfg = nats_config(pg.port, "app", broker.url, topic, ackTimeout="2s", refreshConnection="1s")
    proc = ListenerProcess(cfg, tmp_path).start()
    procs.append(proc)
    await wait_until(streaming(proc), 30, "streaming")
    load = Workload(dsn, transactions=100_000, inserts=5, updates=3, pace=0.01).start()
    try:
        faults: list[tuple[str, Callable[[], object]]] = [
            ("postgres restart", pg.restart),
            ("postgres crash (kill -9)", lambda: kill_and_start(pg)),
            ("nats restart", broker.restart),
            ("nats crash (kill -9)", lambda: kill_and_start(broker)),
        ]
        for number, (_name, fault) in enumerate(faults, start=1):
            def committed(target: int = load.rows + 100) -> bool:
                return load.rows >= target

            await wait_until(committed, 60, "commits before the fault")
            await asyncio.to_thread(fault)
            if "postgres" in _name:
                await wait_until(streaming(proc, 1 + number), 60, f"streaming again after the {_name}")
        rows = load.rows
        await wait_until(lambda: load.rows >= rows + 100, 60, "commits after the last fault")
    finally:
        load.stop()
        load.join()
    await caught_up(dsn, cfg["listener"]["slotName"], 90)
    truth = await table_truth(dsn)
    assert len(truth) == load.rows  # the workload knows exactly what committed
    report = check(truth, [r.event for r in await read_jetstream(broker.url, topic)])
    report.assert_ok()
    logs = proc.logs()
    assert any("postgres" in e.get("msg", "") for e in logs if e.get("level") == "error"), "outage not reported"
    assert any(e.get("msg") == "nats disconnected; reconnecting" for e in logs)
    assert await asyncio.to_thread(proc.terminate) == 0


def _checked(received: Received) -> dict[str, Any]:
    """What the checker reads of an event: its id and row (a Debezium event's row is its payload's after)."""
    payload = received.event.get("payload")
    if payload is None:
        return received.event
    return {"id": received.headers["Nats-Msg-Id"], "data": payload["after"] or payload["before"]}


@pytest.mark.parametrize("fmt", ["wal-listener", "debezium-schemas"])
async def test_nats_frozen_past_the_ack_timeout_then_killed_keeps_every_row_in_order(
    fresh_db: str, pg: PostgresServer, make_nats: Callable[..., NatsServer], fmt: str
) -> None:
    # Batches time out while the server is frozen, then the server dies with their frames unread. The
    # batches still waiting for an answer are written again first after the reconnect; the timed-out ones,
    # re-sent by the delivery stage behind them, used to land after later changes of the same rows.
    # Debezium with schemas: the frames come in parts around the shared schema head, written again joined.
    broker = make_nats()
    dsn = pg.dsn(fresh_db)
    await sql(dsn, Workload.CREATE)
    topic = unique("frozen_killed")
    cfg = nats_config(pg.port, fresh_db, broker.url, topic, ackTimeout="1s")
    if fmt == "debezium-schemas":
        cfg["publisher"].update(format="debezium", debezium={"schemas": True})
    async with running(cfg) as listener:
        load = Workload(dsn, transactions=100_000, inserts=5, updates=3, pace=0.01).start()
        try:
            for _ in range(3):
                rows = load.rows
                await wait_until(lambda rows=rows: load.rows >= rows + 100, 60, "commits before the freeze")
                broker.pause()
                await wait_until(lambda: listener.delivery.failing, 15, "a batch to time out")
                await asyncio.to_thread(kill_and_start, broker)
                await wait_until(lambda: not listener.delivery.failing, 60, "the retries to be acknowledged")
        finally:
            load.stop()
            load.join()
        await caught_up(dsn, cfg["listener"]["slotName"], 90)
    truth = await table_truth(dsn)
    assert len(truth) == load.rows
    received = await read_jetstream(broker.url, topic)
    if fmt == "debezium-schemas":
        assert len(received[0].raw or b"") > 1024  # a schema head long enough to be a part of its own
    report = check(truth, [_checked(r) for r in received])
    report.assert_ok(duplicates=False)


async def test_broker_frozen_longer_than_ack_timeout_waits_bounded_then_recovers(
    fresh_db: str, pg: PostgresServer, make_nats: Callable[..., NatsServer]
) -> None:
    broker = make_nats()
    dsn = pg.dsn(fresh_db)
    await sql(dsn, Workload.CREATE)
    topic = unique("frozen")
    port = free_port()
    max_in_flight = 300
    cfg = nats_config(pg.port, fresh_db, broker.url, topic, ackTimeout="1s", maxInFlight=max_in_flight,
                      batchSize=50, serverPort=port)
    slot = cfg["listener"]["slotName"]
    async with running(cfg) as listener:
        peak = 0

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, listener.delivery.in_flight)
                await asyncio.sleep(0.002)

        sampler = asyncio.create_task(sample())
        try:
            await sql(dsn, "INSERT INTO items SELECT g, 1, 'before' FROM generate_series(1, 100) g")
            await caught_up(dsn, slot)
            held = await confirmed_lsn(dsn, slot)

            broker.pause()  # SIGSTOP: the connection stays open, nothing answers
            frozen_at = time.monotonic()
            try:
                await sql(dsn, *[f"INSERT INTO items SELECT g, 1, 'during' FROM generate_series({i}, {i + 99}) g"
                                 for i in range(101, 3001, 100)])
                await wait_until(lambda: listener.delivery.failing, 15, "the ack timeout to be noticed")
                await wait_until(lambda: listener.delivery.in_flight >= max_in_flight, 15, "backpressure")
                status, body = await http_get(port, "/ready")
                assert status == 503 and '"broker":false' in body, body
                await wait_until(lambda: time.monotonic() - frozen_at > 3.5, 10, "3 ack timeouts")
                assert await confirmed_lsn(dsn, slot) == held  # nothing confirmed while nothing is acked
                assert listener.delivery.in_flight == max_in_flight  # the reader waits instead of buffering
            finally:
                broker.resume()
            await caught_up(dsn, slot)

            async def ready() -> bool:
                return (await http_get(port, "/ready"))[0] == 200

            await wait_until(ready, 15, "/ready to be 200 again")
        finally:
            sampler.cancel()
    assert peak <= max_in_flight, f"{peak} events in flight, more than maxInFlight={max_in_flight}"
    report = check(await table_truth(dsn), [r.event for r in await read_jetstream(broker.url, topic)])
    report.assert_ok(duplicates=False)
    assert report.received == 3000
