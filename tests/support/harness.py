"""Helpers for end-to-end tests: configs, the listener in-process or as a real process, consumers, a
background writer."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import orjson
import psycopg
import yaml
from nats.js.api import DeliverPolicy

from listener.app import Listener
from listener.config import Config
from listener.metrics import REGISTRY
from listener.pgoutput import parse_lsn

REPO = Path(__file__).resolve().parents[2]


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def config_dict(pg_port: int, db: str, publisher: dict[str, Any], **listener: Any) -> dict[str, Any]:
    slot = listener.pop("slotName", unique("slot"))
    return {
        "listener": {
            "slotName": slot,
            "serverPort": 0,
            "heartbeatInterval": "1s",
            "refreshConnection": "2s",
            "ackTimeout": "3s",
            **listener,
        },
        "database": {"host": "127.0.0.1", "port": pg_port, "name": db, "user": "postgres"},
        "publisher": publisher,
        "logger": {"level": "info", "fmt": "json"},
        "monitoring": {"promAddr": ""},
    }


def nats_config(pg_port: int, db: str, nats_url: str, topic: str | None = None, **listener: Any) -> dict[str, Any]:
    return config_dict(pg_port, db, {"type": "nats", "address": nats_url, "topic": topic or unique("t")}, **listener)


async def wait_until(
    predicate: Callable[[], Awaitable[bool] | bool], timeout: float = 30.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running(cfg: dict[str, Any] | Config) -> AsyncIterator[Listener]:
    """The listener in this process, streaming; stopped (drained) on exit."""
    config = cfg if isinstance(cfg, Config) else Config.model_validate(cfg)
    listener = Listener(config)
    task = asyncio.create_task(listener.run())

    def streaming() -> bool:
        if task.done():
            task.result()
            raise AssertionError("listener exited early")
        return listener.health.postgres and listener.publisher.ready

    try:
        await wait_until(streaming, 30, "the listener to stream")
        yield listener
    finally:
        listener.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 60)


async def sql(dsn: str, *statements: str | tuple[str, Any]) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for st in statements:
            if isinstance(st, tuple):
                await conn.execute(st[0], st[1])
            else:
                await conn.execute(st)


async def query(dsn: str, text: str, params: Any = None) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(text, params)
        return await cur.fetchall()


async def confirmed_lsn(dsn: str, slot: str) -> int:
    rows = await query(dsn, "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (slot,))
    return parse_lsn(rows[0][0]) if rows and rows[0][0] else 0


async def current_lsn(dsn: str) -> int:
    rows = await query(dsn, "SELECT pg_current_wal_lsn()::text")
    return parse_lsn(rows[0][0])


class Received:
    """An event as a consumer sees it."""

    def __init__(self, subject: str, data: bytes | None, headers: dict[str, str] | None) -> None:
        self.subject = subject
        self.raw = data
        #: the event; empty for a Kafka tombstone (a record whose value is null)
        self.event: dict[str, Any] = orjson.loads(data) if data is not None else {}
        self.headers = headers or {}

    @property
    def tombstone(self) -> bool:
        return self.raw is None

    @property
    def id(self) -> str:
        return str(self.event["id"])

    def __repr__(self) -> str:
        return f"Received({self.subject}, {self.event})"


async def read_stream(
    nats_url: str, stream: str, count: int, timeout: float = 30.0, subject: str | None = None, rest: bool = True
) -> list[Received]:
    """Every message stored in JetStream ``stream`` (in stream order), waiting until ``count`` are there."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout
        while True:  # the listener creates the stream when it starts
            try:
                sub = await js.subscribe(subject or f"{stream}.>", ordered_consumer=True,
                                         deliver_policy=DeliverPolicy.ALL)
                break
            except nats.js.errors.NotFoundError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        out: list[Received] = []
        while len(out) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                msg = await sub.next_msg(timeout=min(left, 1.0))
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            out.append(Received(msg.subject, msg.data, msg.headers))
        # anything beyond count (duplicates) that is already there
        with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
            while rest:
                msg = await sub.next_msg(timeout=0.3)
                out.append(Received(msg.subject, msg.data, msg.headers))
        return out
    finally:
        await nc.close()


def metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


class ListenerProcess:
    """``wal-listener --config FILE`` as a real process (for kill -9, signals, exit codes)."""

    def __init__(self, cfg: dict[str, Any], workdir: Path, env: dict[str, str] | None = None) -> None:
        self.cfg = cfg
        self.path = workdir / f"config-{uuid.uuid4().hex[:6]}.yml"
        self.path.write_text(yaml.safe_dump(cfg))
        self.log = workdir / f"listener-{uuid.uuid4().hex[:6]}.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ListenerProcess:
        self._fh = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "listener.cli", "--config", str(self.path)],
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=REPO,
        )
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.output().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                out.append(orjson.loads(line))
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def run_cli(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "listener.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def publish_until_acked(publisher: Any, batch: list[Any], timeout: float = 60.0) -> int:
    """Re-send what failed, as the delivery stage does, until every message is acknowledged; the attempts.
    Every failure on the way must be a (retryable) ``PublishError``."""
    from listener.errors import PublishError

    attempts = 0
    deadline = time.monotonic() + timeout
    while batch:
        attempts += 1
        results = await (await publisher.send(batch))
        assert all(r is None or isinstance(r, PublishError) for r in results)
        batch = [m for m, r in zip(batch, results, strict=True) if r is not None]
        if batch:
            assert time.monotonic() < deadline, f"still not acknowledged after {timeout}s: {results[:3]}"
            await asyncio.sleep(0.5)
    return attempts


class Writer:
    """Commits numbered rows in small transactions from a thread, until told to stop or done."""

    def __init__(self, dsn: str, transactions: int, rows_per_txn: int, pace: float = 0.01) -> None:
        self.dsn, self.transactions, self.rows, self.pace = dsn, transactions, rows_per_txn, pace
        self.committed = 0  # rows whose transaction committed
        self.errors = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Writer:
        self._thread.start()
        return self

    def _run(self) -> None:
        next_id = 1
        done = 0
        while done < self.transactions:
            try:
                with psycopg.connect(self.dsn, autocommit=False, connect_timeout=5) as conn:
                    while done < self.transactions:
                        with conn.transaction():
                            conn.execute(
                                "INSERT INTO items (id, payload)"
                                " SELECT g, md5(g::text) FROM generate_series(%s::int, %s::int) g",
                                (next_id, next_id + self.rows - 1),
                            )
                        next_id += self.rows
                        done += 1
                        self.committed = next_id - 1
                        threading.Event().wait(self.pace)
            except psycopg.OperationalError:
                self.errors += 1  # PostgreSQL is restarting: try again
                threading.Event().wait(0.2)

    def join(self, timeout: float = 120) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "writer did not finish"


def assert_complete(events: list[Received], rows: int) -> dict[int, set[str]]:
    ids: dict[int, set[str]] = defaultdict(set)
    for r in events:
        ids[r.event["data"]["id"]].add(r.id)
    missing = sorted(set(range(1, rows + 1)) - set(ids))
    assert not missing, (
        f"{len(missing)} of {rows} committed rows never published ({len(events)} events read), e.g. {missing[:10]}"
    )
    changed = {k: v for k, v in ids.items() if len(v) != 1}
    assert not changed, f"replayed events got new ids: {list(changed.items())[:3]}"
    return ids
