"""Memory bounded in bytes: large rows never take the listener down (issue 23).

The listener runs as a real process (its peak RSS is the kernel's ``VmHWM``, start-up included) with the
default ``maxInFlight``, ``maxInFlightBytes`` (64 MiB) and ``batchSize``:

- streaming ~860 MB of ~576 KB rows (TOASTed, incompressible) while nats-server is frozen (SIGSTOP): reading
  pauses at the byte bound, the peak RSS stays far below the data's size, and once NATS is back every row is
  on the stream exactly once, with its id; ``in_flight_bytes`` is back to 0 once idle;
- one 50 MB value, to NATS (max_payload raised) and to Kafka (Tansu; ``maxBatchBytes`` raised), with the
  compiled and the pure-Python paths: it arrives intact, and the peak RSS is a small multiple of its size
  (printed; docs/reliability.md has the figures). A value larger than the broker takes goes the ``onError``
  way: see tests/test_reliability_input.py (``test_oversized_event_*``) and the publishers' tests.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from nats.js.api import DeliverPolicy, StorageType

from tests.support.harness import (
    ListenerProcess,
    config_dict,
    confirmed_lsn,
    current_lsn,
    http_get,
    query,
    sql,
    unique,
    wait_until,
)
from tests.support.services import NatsServer, PostgresServer, TansuServer, free_port

pytestmark = pytest.mark.service

MIB = 1024 * 1024
ROW_BYTES = 576 * 1024  # the documents: ~576 KB of text per row
ROWS = 1500  # ~860 MB in all: 13 times maxInFlightBytes
ROWS_PER_TXN = 100
PEAK_RSS_LIMIT = 300 * MIB
HUGE = 50 * 1000 * 1000  # one 50 MB value
AFTER = 200  # rows of ROW_BYTES after the huge one
ACK_TIMEOUT = 3.0  # the tests' listener.ackTimeout (tests.support.harness.config_dict)


def peak_rss(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/PID/status")


async def scrape(port: int, name: str) -> float:
    """The sum of a metric's samples on the listener's /metrics."""
    _, text = await http_get(port, "/metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"))


def incompressible(size: int) -> str:
    """Random base64 text: PostgreSQL's TOAST compression cannot shrink it (checked with pg_column_size)."""
    return base64.b64encode(os.urandom(size * 3 // 4 + 3)).decode()[:size]


def listener_config(pg: PostgresServer, db: str, publisher: dict[str, Any], port: int) -> dict[str, Any]:
    """The defaults of everything that bounds memory; /metrics on ``port``."""
    cfg = config_dict(pg.port, db, publisher, serverPort=port)
    cfg["monitoring"]["promAddr"] = f":{port}"
    return cfg


async def read_docs(url: str, stream: str, count: int, timeout: float = 120.0) -> dict[int, list[tuple[str, str]]]:
    """Each row's (event id, sha256 of its body) for every message JetStream holds, waiting for ``count``
    (the bodies are checked and dropped as they come: they would take ~1 GB here)."""
    nc = await nats.connect(url)
    seen: dict[int, list[tuple[str, str]]] = {}
    try:
        sub = await nc.jetstream().subscribe(f"{stream}.>", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        deadline = time.monotonic() + timeout
        received = 0
        while time.monotonic() < deadline:
            try:
                msg = await sub.next_msg(timeout=2.0 if received >= count else 5.0)
            except (TimeoutError, nats.errors.TimeoutError):
                if received >= count:
                    break
                continue
            received += 1
            event = orjson.loads(msg.data)
            data = event["data"]
            seen.setdefault(data["id"], []).append((event["id"], hashlib.sha256(data["body"].encode()).hexdigest()))
    finally:
        await nc.close()
    return seen


async def test_large_rows_while_nats_is_frozen_stay_within_the_byte_bound_then_all_arrive_once(
    pg: PostgresServer, fresh_db: str, make_nats: Callable[..., NatsServer], tmp_path: Path,
    procs: list[ListenerProcess],
) -> None:
    broker = make_nats()
    dsn = pg.dsn(fresh_db)
    await sql(dsn, "CREATE TABLE docs (id bigserial PRIMARY KEY, body text)")
    topic = unique("docs")
    port = free_port()
    cfg = listener_config(pg, fresh_db, {"type": "nats", "address": broker.url, "topic": topic}, port)
    proc = ListenerProcess(cfg, tmp_path).start()
    procs.append(proc)
    assert proc.proc is not None
    pid = proc.proc.pid
    await wait_until(lambda: '"msg":"streaming"' in proc.output(), 30, "streaming")
    started_rss = rss(pid)
    block = incompressible(ROW_BYTES)
    expected = {g: hashlib.sha256((f"{g:08d}" + block[8:]).encode()).hexdigest() for g in range(1, ROWS + 1)}

    broker.pause()  # SIGSTOP: the connection stays open, nothing is acknowledged
    try:
        for first in range(1, ROWS + 1, ROWS_PER_TXN):
            last = first + ROWS_PER_TXN - 1
            await sql(dsn, ("INSERT INTO docs (id, body) SELECT g, lpad(g::text, 8, '0') || %s "
                            "FROM generate_series(%s::bigint, %s::bigint) g", (block[8:], first, last)))
        stored = await query(dsn, "SELECT pg_column_size(body), octet_length(body) FROM docs WHERE id = 1")
        assert stored[0][0] >= 0.95 * stored[0][1], f"TOAST compressed the rows: {stored}"

        async def at_the_bound() -> bool:
            return await scrape(port, "in_flight_bytes") >= 64 * MIB

        await wait_until(at_the_bound, 60, "the listener to reach maxInFlightBytes")

        async def timed_out_twice() -> bool:  # the unacknowledged batches were sent again, twice
            return await scrape(port, "publish_errors_total") >= 2 * await scrape(port, "in_flight_events")

        bound_at = time.monotonic()

        async def retrying() -> bool:  # the ack timeouts were noticed: the batches are being sent again
            return await scrape(port, "publish_errors_total") > 0

        await wait_until(retrying, 30, "an ack timeout while NATS is frozen")
        await wait_until(lambda: time.monotonic() - bound_at > 3 * ACK_TIMEOUT, 30, "three ack timeouts")
        in_flight_bytes = await scrape(port, "in_flight_bytes")
        paused_peak = peak_rss(pid)
        assert 64 * MIB <= in_flight_bytes < 64 * MIB + 2 * ROW_BYTES  # the bound (and the event that crossed it)
        assert await confirmed_lsn(dsn, cfg["listener"]["slotName"]) < await current_lsn(dsn)
    finally:
        broker.resume()

    end = await current_lsn(dsn)

    async def confirmed() -> bool:
        return await confirmed_lsn(dsn, cfg["listener"]["slotName"]) >= end

    await wait_until(confirmed, 120, "every row to be acknowledged and confirmed")
    peak = max(paused_peak, peak_rss(pid))  # the kernel updates VmHWM lazily: a later reading can be lower

    async def idle() -> bool:
        return await scrape(port, "in_flight_bytes") == 0 and await scrape(port, "in_flight_events") == 0

    await wait_until(idle, 10, "in_flight_bytes back to 0")
    seen = await read_docs(broker.url, topic, ROWS)
    assert proc.proc.poll() is None, proc.output()[-2000:]
    assert await asyncio.to_thread(proc.terminate) == 0
    print(f"\n{ROWS} rows of {ROW_BYTES} bytes ({ROWS * ROW_BYTES / MIB:.0f} MiB) while NATS was frozen: "
          f"RSS {started_rss / MIB:.0f} MiB when streaming started; in_flight_bytes {in_flight_bytes / MIB:.1f} MiB "
          f"and peak RSS {paused_peak / MIB:.0f} MiB at the bound; peak RSS {peak / MIB:.0f} MiB after all arrived")

    missing = sorted(set(expected) - set(seen))
    assert not missing, f"{len(missing)} rows never arrived, e.g. {missing[:10]}"
    assert set(seen) == set(expected)
    twice = {row: got for row, got in seen.items() if len(got) != 1}
    assert not twice, f"rows on the stream more than once: {list(twice.items())[:3]}"
    wrong = [row for row, got in seen.items() if got[0][1] != expected[row]]
    assert not wrong, f"rows whose body arrived changed: {wrong[:10]}"
    assert peak <= PEAK_RSS_LIMIT, f"peak RSS {peak / MIB:.0f} MiB > {PEAK_RSS_LIMIT / MIB:.0f} MiB"


async def read_kafka_values(bootstrap: str, topic: str, count: int, timeout: float = 120.0) -> list[bytes]:
    """The values of the first ``count`` records on ``topic`` (read with fetch limits above their size)."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None, metadata_max_age_ms=1000,
        max_partition_fetch_bytes=128 * MIB, fetch_max_bytes=128 * MIB,
    )  # fmt: skip
    await consumer.start()
    values: list[bytes] = []
    try:
        deadline = time.monotonic() + timeout
        while len(values) < count and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                values += [bytes(record.value) for record in records if record.value is not None]
    finally:
        await consumer.stop()
    assert len(values) >= count, f"{len(values)} of {count} records on {topic} after {timeout}s"
    return values


async def read_nats_values(url: str, stream: str, count: int, timeout: float = 120.0) -> list[bytes]:
    """The first ``count`` messages of JetStream ``stream``."""
    nc = await nats.connect(url)
    try:
        sub = await nc.jetstream().subscribe(f"{stream}.>", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        return [bytes((await sub.next_msg(timeout=timeout)).data) for _ in range(count)]
    finally:
        await nc.close()


async def memory_stream(url: str, name: str) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().add_stream(name=name, subjects=[f"{name}.>"], storage=StorageType.MEMORY)
    finally:
        await nc.close()


@pytest.mark.parametrize("path", ["compiled", "python"])
@pytest.mark.parametrize("broker", ["nats", "kafka"])
async def test_one_50_mb_value_is_published_intact_with_memory_a_small_multiple_of_it(
    broker: str, path: str, pg: PostgresServer, fresh_db: str, make_nats: Callable[..., NatsServer],
    make_tansu: Callable[..., TansuServer], tmp_path: Path, procs: list[ListenerProcess],
) -> None:
    dsn = pg.dsn(fresh_db)
    await sql(dsn, "CREATE TABLE docs (id bigserial PRIMARY KEY, body text)")
    topic = unique("huge")
    if broker == "nats":
        nats_server = make_nats(max_payload=64 * MIB)  # nats-server's largest
        # JetStream's file store takes 32 MiB at most whatever max_payload says (see the next test): memory
        await memory_stream(nats_server.url, topic)
        publisher: dict[str, Any] = {"type": "nats", "address": nats_server.url, "topic": topic}
    else:
        tansu = make_tansu()
        publisher = {"type": "kafka", "address": tansu.bootstrap, "topic": topic, "idempotent": False,
                     "createTopics": True, "maxBatchBytes": 64 * MIB}
    port = free_port()
    cfg = listener_config(pg, fresh_db, publisher, port)
    env = {"LISTENER_PURE_PYTHON": "1" if path == "python" else "0"}
    proc = ListenerProcess(cfg, tmp_path, env=env).start()
    procs.append(proc)
    assert proc.proc is not None
    pid = proc.proc.pid
    await wait_until(lambda: '"msg":"streaming"' in proc.output(), 30, "streaming")
    await sql(dsn, "INSERT INTO docs (body) VALUES ('small')")  # the relation is known, the broker warmed up
    slot = cfg["listener"]["slotName"]
    end = await current_lsn(dsn)

    async def confirmed() -> bool:
        return await confirmed_lsn(dsn, slot) >= end

    await wait_until(confirmed, 30, "the first row to be published")
    before = peak_rss(pid)
    value = incompressible(HUGE)
    digest = hashlib.sha256(value.encode()).hexdigest()
    await sql(dsn, ("INSERT INTO docs (body) VALUES (%s)", (value,)))
    # then ordinary large rows: libpq's buffer, grown for the huge one, holds dozens of them at a time; the
    # reader takes about a batch's bytes of them per call, not all it holds
    block = incompressible(ROW_BYTES)
    await sql(dsn, ("INSERT INTO docs (body) SELECT %s FROM generate_series(1, %s)", (block, AFTER)))
    end = await current_lsn(dsn)
    await wait_until(confirmed, 120, "the 50 MB row and the rows after it to be acknowledged and confirmed")
    peak = peak_rss(pid)
    starting = next(e for e in proc.logs() if e.get("msg") == "starting")
    assert starting["compiled_hot_path"] is (path == "compiled")
    assert proc.proc.poll() is None, proc.output()[-2000:]
    assert await asyncio.to_thread(proc.terminate) == 0
    del value

    if broker == "nats":
        bodies = await read_nats_values(nats_server.url, topic, 2 + AFTER)
    else:
        bodies = await read_kafka_values(tansu.bootstrap, f"{topic}.public_docs", 2 + AFTER)
    assert sorted(orjson.loads(b)["data"]["id"] for b in bodies) == list(range(1, 3 + AFTER))
    body = bodies[1]
    event = orjson.loads(body)
    assert event["data"]["id"] == 2
    got = event["data"]["body"]
    assert len(got) == HUGE and hashlib.sha256(got.encode()).hexdigest() == digest
    multiple = (peak - before) / len(body)
    print(f"\n{broker}, {path} path: a {len(body) / 1e6:.1f} MB event; peak RSS {before / MIB:.0f} MiB before, "
          f"{peak / MIB:.0f} MiB after: +{(peak - before) / MIB:.0f} MiB = {multiple:.1f} x the event")
    assert multiple < 8, f"the listener took {multiple:.1f} times the event's size"


async def test_a_value_over_the_jetstream_file_store_limit_takes_the_on_error_path(
    pg: PostgresServer, fresh_db: str, make_nats: Callable[..., NatsServer], tmp_path: Path,
    procs: list[ListenerProcess],
) -> None:
    """Under a raised max_payload, JetStream's file store (the stream the listener creates) still refuses a
    message over 32 MiB: for good, so onError decides (skip: the dead-letter subject), not endless retries."""
    dsn = pg.dsn(fresh_db)
    await sql(dsn, "CREATE TABLE docs (id bigserial PRIMARY KEY, body text)")
    nats_server = make_nats(max_payload=64 * MIB)
    topic = unique("filestore")
    port = free_port()
    cfg = listener_config(pg, fresh_db, {"type": "nats", "address": nats_server.url, "topic": topic}, port)
    cfg["listener"].update(onError="skip", deadLetterTopic="dead_letters")
    proc = ListenerProcess(cfg, tmp_path).start()
    procs.append(proc)
    await wait_until(lambda: '"msg":"streaming"' in proc.output(), 30, "streaming")
    await sql(dsn, ("INSERT INTO docs (body) VALUES (%s)", (incompressible(40 * 1000 * 1000),)),
              "INSERT INTO docs (body) VALUES ('after')")
    end = await current_lsn(dsn)

    async def confirmed() -> bool:
        return await confirmed_lsn(dsn, cfg["listener"]["slotName"]) >= end

    await wait_until(confirmed, 60, "confirmation past the refused row")
    assert await asyncio.to_thread(proc.terminate) == 0
    got = [orjson.loads(body) for body in await read_nats_values(nats_server.url, topic, 2)]
    letter, after = sorted(got, key=lambda event: "data" in event)
    assert after["data"]["body"] == "after"
    assert letter["event"] is None and "too large" in letter["eventOmitted"] and "32 MiB" in letter["error"]
    assert letter["table"] == "docs"
    assert not [e for e in proc.logs() if e.get("msg") == "publish not acknowledged; retrying"]
