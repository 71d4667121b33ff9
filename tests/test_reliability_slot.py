"""The slot or the publication taken away underneath a running listener, the slot used elsewhere, WAL
piling up towards max_slot_wal_keep_size.

Each case must give one clear log line, a metric (``slot_problem{reason}``), ``/ready`` 503 and a
process that stays up (no crash loop that hides the problem) — and never a silently re-created slot or
publication, which would skip the changes made in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.harness import (
    ListenerProcess,
    http_get,
    nats_config,
    query,
    read_stream,
    running,
    sql,
    unique,
    wait_until,
)
from tests.support.services import Database, NatsServer, PostgresServer, free_port

pytestmark = pytest.mark.service


class Watched:
    """A listener process with its probes and metrics on one port."""

    def __init__(self, cfg: dict[str, Any], workdir: Path, procs: list[ListenerProcess]) -> None:
        self.port = free_port()
        cfg["listener"]["serverPort"] = self.port
        cfg["monitoring"]["promAddr"] = f":{self.port}"
        self.cfg = cfg
        self.proc = ListenerProcess(cfg, workdir).start()
        procs.append(self.proc)

    @property
    def slot(self) -> str:
        return str(self.cfg["listener"]["slotName"])

    async def metric(self, name: str, labels: str = "") -> float | None:
        _, text = await http_get(self.port, "/metrics")
        found = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
        return float(found.group(1)) if found else None

    async def ready(self) -> tuple[int, str]:
        return await http_get(self.port, "/ready")

    def lines(self, level: str, text: str) -> list[dict[str, Any]]:
        return [e for e in self.proc.logs() if e.get("level") == level and text in e.get("msg", "")]

    def alive(self) -> bool:
        return self.proc.proc is not None and self.proc.proc.poll() is None

    async def streaming(self, times: int = 1) -> None:
        await wait_until(lambda: self.proc.output().count('"msg":"streaming"') >= times, 30, "streaming")

    async def retried(self, times: int = 3) -> None:
        """Wait until the listener tried to reconnect ``times`` more times (it keeps trying, quietly)."""
        start = await self.metric("reconnects_total", '{target="postgres"}') or 0

        async def done() -> bool:
            return (await self.metric("reconnects_total", '{target="postgres"}') or 0) >= start + times

        await wait_until(done, 30, f"{times} reconnect attempts")

    async def assert_reported_once(self, reason: str, level: str = "error") -> None:
        """One log line for the problem (however often it retried), the metric, /ready 503, alive."""
        await wait_until(lambda: any(e.get("reason") == reason for e in self.proc.logs()), 30, f"the {reason} report")
        await self.retried()
        said = [e for e in self.proc.logs() if e.get("reason") == reason and e.get("level") in ("warning", "error")]
        assert len(said) == 1 and said[0]["level"] == level, said
        assert await self.metric("slot_problem", f'{{reason="{reason}"}}') == 1.0
        status, body = await self.ready()
        assert status == 503 and '"postgres":false' in body, body
        assert self.alive()


async def drop_slot_underneath(dsn: str, slot: str) -> None:
    """Terminate the slot's walsender and drop the slot before the listener takes it again."""
    for _ in range(200):
        with contextlib.suppress(Exception):
            await sql(dsn, ("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                            " WHERE slot_name = %s AND active_pid IS NOT NULL", (slot,)),
                      ("SELECT pg_drop_replication_slot(%s)", (slot,)))
            return
        await asyncio.sleep(0.02)
    raise AssertionError("could not drop the slot")


async def test_slot_dropped_underneath_is_reported_once_and_not_recreated(
    fresh_db: str, pg: PostgresServer, nats_server: NatsServer, tmp_path: Path, procs: list[ListenerProcess]
) -> None:
    dsn = pg.dsn(fresh_db)
    await sql(dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    topic = unique("dropped")
    lsnr = Watched(nats_config(pg.port, fresh_db, nats_server.url, topic, refreshConnection="1s"), tmp_path, procs)
    await lsnr.streaming()
    await sql(dsn, "INSERT INTO t VALUES (1)")
    await read_stream(nats_server.url, topic, 1)
    await drop_slot_underneath(dsn, lsnr.slot)
    await sql(dsn, "INSERT INTO t VALUES (2)")  # made while there is no slot: not captured
    await lsnr.assert_reported_once("slot_dropped")
    assert lsnr.lines("error", "was dropped while the listener ran")
    rows = await query(dsn, "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (lsnr.slot,))
    assert rows == [], "the slot was silently created again: the gap would go unnoticed"
    assert await asyncio.to_thread(lsnr.proc.terminate) == 0


async def test_publication_dropped_is_reported_once_and_not_recreated(
    fresh_any_db: Database, nats_server: NatsServer, tmp_path: Path, procs: list[ListenerProcess]
) -> None:
    db = fresh_any_db
    await sql(db.dsn(), "CREATE TABLE t (id int PRIMARY KEY)")
    topic = unique("nopub")
    lsnr = Watched(nats_config(db.server.port, db.name, nats_server.url, topic, refreshConnection="1s"),
                   tmp_path, procs)
    await lsnr.streaming()
    await sql(db.dsn(), "INSERT INTO t VALUES (1)")
    await read_stream(nats_server.url, topic, 1)
    await sql(db.dsn(), 'DROP PUBLICATION "wal-listener"', "INSERT INTO t VALUES (2)")
    # PostgreSQL 15 fails the stream on the next change; 18 skips changes without a publication (a
    # warning in the server log only): the listener's slot check finds it gone
    await lsnr.assert_reported_once("publication_missing")
    assert lsnr.lines("error", "publication 'wal-listener' was dropped while the listener ran")
    assert await query(db.dsn(), "SELECT 1 FROM pg_publication WHERE pubname = 'wal-listener'") == [], (
        "silently re-created"
    )

    await sql(db.dsn(), 'CREATE PUBLICATION "wal-listener" FOR ALL TABLES')  # what the error says to do
    await sql(db.dsn(), "INSERT INTO t VALUES (3)")
    if db.server.version >= 18:
        # PostgreSQL 18 streams on (row 2 was skipped by the server while the publication was missing)
        await wait_until(lambda: bool(lsnr.lines("info", "streaming again")), 30, "recovery")
        got = await read_stream(nats_server.url, topic, 2)
        assert [r.event["data"]["id"] for r in got] == [1, 3]
        assert await lsnr.metric("slot_problem", '{reason="publication_missing"}') == 0.0
    else:
        # PostgreSQL 15 cannot decode the changes made without the publication: stuck until the slot is
        # dropped (re-snapshot); the listener keeps saying so once, not in a loop
        await lsnr.retried()
        said = [e for e in lsnr.proc.logs() if e.get("reason") == "publication_missing" and e["level"] == "error"]
        assert len(said) == 1
    assert lsnr.alive()
    assert await asyncio.to_thread(lsnr.proc.terminate) == 0


async def test_slot_active_elsewhere_is_reported_once_then_taken_over(
    fresh_db: str, pg: PostgresServer, nats_server: NatsServer, tmp_path: Path, procs: list[ListenerProcess]
) -> None:
    dsn = pg.dsn(fresh_db)
    slot = unique("busy")
    await sql(dsn, "CREATE TABLE t (id int PRIMARY KEY)", 'CREATE PUBLICATION "wal-listener" FOR ALL TABLES',
              ("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,)))
    other = await asyncio.create_subprocess_exec(  # another consumer of the slot
        str(pg.bin_dir / "pg_recvlogical"), "-d", dsn, "--slot", slot, "--start", "-f", "/dev/null",
        "-o", "proto_version=1", "-o", "publication_names=wal-listener",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async def held() -> bool:
            return bool(await query(dsn, "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s AND active",
                                    (slot,)))

        await wait_until(held, 30, "pg_recvlogical to hold the slot")
        topic = unique("busy")
        lsnr = Watched(nats_config(pg.port, fresh_db, nats_server.url, topic, slotName=slot,
                                   refreshConnection="1s"), tmp_path, procs)
        await lsnr.assert_reported_once("slot_in_use", level="warning")
        assert lsnr.lines("warning", "is in use by another process")
    finally:
        other.kill()
        await other.wait()
    await lsnr.streaming()
    await sql(dsn, "INSERT INTO t VALUES (1)")
    assert (await read_stream(nats_server.url, topic, 1))[0].event["data"] == {"id": 1}
    assert await lsnr.metric("slot_problem", '{reason="slot_in_use"}') == 0.0
    assert (await lsnr.ready())[0] == 200
    assert await asyncio.to_thread(lsnr.proc.terminate) == 0


async def test_retained_wal_warns_before_the_slot_is_invalidated_then_reports_the_loss(
    make_pg: Callable[..., PostgresServer], make_nats: Callable[..., NatsServer], tmp_path: Path,
    procs: list[ListenerProcess],
) -> None:
    keep = 128 * 1024 * 1024  # 8 WAL segments of 16 MB
    pg = make_pg(settings={"max_slot_wal_keep_size": "128MB", "wal_init_zero": "off"})
    pg.create_database("app")
    dsn = pg.dsn("app")
    broker = make_nats()
    await sql(dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    topic = unique("lost")
    lsnr = Watched(nats_config(pg.port, "app", broker.url, topic, refreshConnection="1s", ackTimeout="1s"),
                   tmp_path, procs)
    await lsnr.streaming()
    await sql(dsn, "INSERT INTO t VALUES (0)")
    await read_stream(broker.url, topic, 1)

    async def safe_wal() -> float:
        return await lsnr.metric("slot_safe_wal_size_bytes") or 0.0

    await wait_until(lambda: _positive(safe_wal()), 30, "the slot health metrics")
    assert await lsnr.metric("slot_wal_keep_size_bytes") == keep

    broker.pause()  # the listener cannot deliver, so it cannot confirm: the slot holds on to the WAL
    try:
        warned_at = None
        segment = 16 * 1024 * 1024
        for i in range(1, 12):
            before = await safe_wal()
            left = (await query(dsn, "SELECT safe_wal_size FROM pg_replication_slots"))[0][0]
            await sql(dsn, f"INSERT INTO t VALUES ({i})", "SELECT pg_switch_wal()")  # + one 16 MB segment
            if left - segment > keep * 0.2 + segment:
                continue  # still far from the warning threshold: no need to watch this step
            async def sampled(before: float = before) -> bool:
                return await safe_wal() < before

            await wait_until(sampled, 30, "the next slot sample")
            if lsnr.lines("warning", "slot is about to lose WAL"):
                warned_at = i
                break
        assert warned_at is not None, "no warning before max_slot_wal_keep_size was reached"
        status = await query(dsn, "SELECT wal_status, safe_wal_size FROM pg_replication_slots")
        assert status[0][0] in ("reserved", "extended") and 0 < status[0][1] < keep * 0.2, status
        warning = lsnr.lines("warning", "slot is about to lose WAL")[0]
        assert warning["max_slot_wal_keep_size"] == keep and warning["safe_wal_size"] < keep * 0.2

        for i in range(warned_at + 1, warned_at + 8):  # go on until PostgreSQL invalidates the slot
            await sql(dsn, f"INSERT INTO t VALUES ({i})", "SELECT pg_switch_wal()", "CHECKPOINT")
            if (await query(dsn, "SELECT wal_status FROM pg_replication_slots"))[0][0] == "lost":
                break
        assert (await query(dsn, "SELECT wal_status FROM pg_replication_slots"))[0][0] == "lost"
        await lsnr.assert_reported_once("slot_invalidated")
        assert lsnr.lines("error", "is invalidated (wal_status = lost)")
    finally:
        broker.resume()
    logs = lsnr.proc.logs()
    order = [e.get("reason") or e["msg"] for e in logs if e.get("level") in ("warning", "error")]
    assert order.index("slot is about to lose WAL (max_slot_wal_keep_size): catch up or raise the limit") < \
        order.index("slot_invalidated")
    assert lsnr.alive() and (await lsnr.ready())[0] == 503
    assert await asyncio.to_thread(lsnr.proc.terminate) == 0


async def _positive(value: Any) -> bool:
    return bool(await value > 0)


async def _below(value: Any, limit: float) -> bool:
    return bool(await value < limit)


async def test_publication_name_with_quotes_is_quoted_safely(fresh_db: str, pg: PostgresServer,
                                                             nats_server: NatsServer) -> None:
    """A free-form publicationName goes into START_REPLICATION as a quoted identifier inside a string
    literal: a single quote in it broke the command before (a retry loop that never streamed)."""
    dsn = pg.dsn(fresh_db)
    await sql(dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    topic = unique("quoted")
    name = """it's "odd", isn't it"""
    async with running(nats_config(pg.port, fresh_db, nats_server.url, topic, publicationName=name)):
        await sql(dsn, "INSERT INTO t VALUES (1)")
        assert (await read_stream(nats_server.url, topic, 1))[0].event["data"] == {"id": 1}
    assert await query(dsn, "SELECT pubname FROM pg_publication ORDER BY 1") == [(name,), (f"{name}_inserts",)]
