"""``python -m bench.run [--brokers nats,kafka,rabbitmq,pubsub] [--rows 200000] [--quick] [--out bench/results]``

Phases, each on a throwaway PostgreSQL and the requested brokers:

1. throughput — for the reference, wide (TOAST), single-huge-transaction and OLTP (one row per
   transaction) workloads: create one
   pgoutput slot for ``pg_recvlogical`` and one per broker, write the workload (no reader running, the
   slots retain the WAL), then time ``pg_recvlogical`` over that WAL range (the ceiling) and, broker
   by broker, the listener process from its start until its slot's confirmed_flush_lsn reaches the
   workload's end LSN (every event acknowledged by the broker); count the events on the broker.
2. latency — the listener streaming, a writer committing small transactions at a steady rate, a
   consumer on the broker timing (receive time - event commitTime) per event.
3. idle — the same listener's CPU over a quiet period.

A broker that cannot be started or whose publisher does not deliver is skipped with the reason and
the run goes on.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil
import psycopg

from bench import workload as wl
from bench.brokers import BROKERS, Broker, Count, RabbitMQ
from bench.measure import (
    REPO,
    BrokerFailed,
    ListenerProcess,
    Profiler,
    create_slot,
    drop_slot,
    machine_busy,
    process_cpu,
    published_events,
    run_ceiling,
    run_until_confirmed,
    slot_state,
    summarize_profile,
    wait_streaming,
)
from bench.report import (
    CEILING,
    Row,
    distribution,
    format_histogram,
    format_profile,
    format_table,
    percentile,
    write_chart,
    write_json,
    write_latency_chart,
)
from listener import __version__
from listener.pgoutput import format_lsn
from tests.support.services import PostgresServer, find_pg_bin, free_port

DBNAME = "bench"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Benchmark wal-listener end to end against pg_recvlogical (see bench/README.md).",
    )
    p.add_argument("--brokers", default="nats,kafka,rabbitmq,pubsub",
                   help="comma-separated: nats, kafka, rabbitmq, pubsub (default: all; one that fails is skipped)")
    p.add_argument("--rows", type=int, default=None,
                   help="reference workload: rows inserted, then updated, then deleted (default 200000; "
                        "--quick 20000)")
    p.add_argument("--wide-rows", type=int, default=None, help="wide (4 KB TOAST) workload rows (default rows/10)")
    p.add_argument("--txn-rows", default=None,
                   help="single-transaction sizes, comma-separated (default 100000,1000000; --quick 10000,100000)")
    p.add_argument("--oltp-rows", type=int, default=None,
                   help="OLTP workload: transactions of one row each (default 100000; --quick 20000)")
    p.add_argument("--rate", type=float, default=None, help="latency phase: rows/s (default 10000; --quick 2000)")
    p.add_argument("--duration", type=float, default=None, help="latency phase: seconds (default 60; --quick 10)")
    p.add_argument("--latency-txn-rows", type=int, default=20, help="latency phase: rows per transaction (20)")
    p.add_argument("--idle", type=float, default=10.0, help="idle phase: seconds (10)")
    p.add_argument("--phases", default="reference,wide,txn,oltp,latency,idle",
                   help="which phases to run (default: reference,wide,txn,oltp,latency,idle)")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test in about two minutes (NATS)")
    p.add_argument("--rabbitmq-queue", choices=("quorum", "classic"), default="quorum",
                   help="type of the queue bound to the RabbitMQ exchange (quorum)")
    p.add_argument("--variants", default="",
                   help="reference phase: also stream the WAL with these listener configurations and compare each "
                        "with the default one (NATS), comma-separated: " + ", ".join(wl.VARIANTS)
                        + " (transform and features stream the users workload, bench_users)")
    p.add_argument("--transform", action="store_true", help="the same as --variants transform")
    p.add_argument("--baseline", default="",
                   help="reference and wide phases: also stream the WAL with the listener of this other checkout (its "
                        "listener/ with the C extension built in place) and compare, like a variant; with --variants, "
                        "that listener runs each variant's config too ('<variant> baseline')")
    p.add_argument("--variant-runs", "--transform-runs", type=int, default=3, dest="variant_runs",
                   help="--variants: listener runs of each kind, alternating, compared by their medians (3)")
    p.add_argument("--profile", action="store_true",
                   help="also run the listener once more on the reference, wide and OLTP workloads under py-spy")
    p.add_argument("--stall-timeout", type=float, default=60.0,
                   help="skip a broker whose listener makes no progress for this many seconds (60)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="where results go (bench/results)")
    args = p.parse_args(argv)
    q = args.quick
    args.rows = args.rows or (20_000 if q else 200_000)
    args.wide_rows = args.wide_rows or max(1000, args.rows // 10)
    args.txn_rows = [int(x) for x in (args.txn_rows or ("10000,100000" if q else "100000,1000000")).split(",") if x]
    args.oltp_rows = args.oltp_rows or (20_000 if q else 100_000)
    args.rate = args.rate or (2000.0 if q else 10_000.0)
    args.duration = args.duration or (10.0 if q else 60.0)
    args.brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    unknown = [b for b in args.brokers if b not in BROKERS]
    if unknown:
        p.error(f"unknown broker(s) {', '.join(unknown)}; choose from {', '.join(BROKERS)}")
    args.phases = {x.strip() for x in args.phases.split(",") if x.strip()}
    args.variants = [x.strip() for x in args.variants.split(",") if x.strip()]
    if args.transform and "transform" not in args.variants:
        args.variants.append("transform")
    unknown = [v for v in args.variants if v not in wl.VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(wl.VARIANTS)}")
    return args


class Received:
    """What the latency consumer saw: receive times, the events' commitTime text, broker metadata."""

    MARKER = b'"commitTime":"'

    def __init__(self) -> None:
        self.received: list[float] = []
        self.commits: list[bytes] = []
        self.metas: list[Any] = []

    def on_event(self, now: float, body: bytes, meta: Any) -> None:
        i = body.rfind(self.MARKER)
        if i >= 0:
            start = i + len(self.MARKER)
            self.received.append(now)
            self.commits.append(body[start: body.index(b'"', start)])
            self.metas.append(meta)


def _delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else round(after - before, 2)


def _per_event(counters: dict[str, float], events: int) -> dict[str, float]:
    """ListenerProcess.counters once streaming, per event (CPU in µs)."""
    if not counters or not events:
        return {}
    return {("user_us" if k == "user_s" else "system_us" if k == "system_s" else k):
            round((1e6 if k.endswith("_s") else 1) * v / events, 4) for k, v in counters.items()}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def say(text: str) -> None:
    print(text, flush=True)


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _tag(variant: wl.Variant | None) -> str:
    """What a variant's slot and topic names end with ("" for the default configuration)."""
    return f"_{_key(variant.name)}" if variant else ""


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out).resolve()
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.rows: list[Row] = []
        self.skipped: dict[str, str] = {}
        self.latency_series: dict[str, list[dict[str, float]]] = {}
        self.latency_distributions: dict[str, dict[str, Any]] = {}  # broker -> percentiles + histogram
        self.profiles: dict[str, Any] = {}
        self.brokers: list[Broker] = []
        self.pg: PostgresServer | None = None
        self.meta: dict[str, Any] = {}
        self._listeners: list[ListenerProcess] = []

    # -- helpers ----------------------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        assert self.pg is not None
        return self.pg.dsn(DBNAME)

    def live(self) -> list[Broker]:
        return [b for b in self.brokers if b.name not in self.skipped]

    def skip(self, broker: str, reason: str) -> None:
        self.skipped[broker] = reason
        say(f"   !! skipping {broker}: {reason}")

    def listener_config(self, slot: str, publisher: dict[str, Any], prom_port: int,
                        listener: dict[str, Any] | None = None) -> dict[str, Any]:
        assert self.pg is not None
        return {
            "listener": {"slotName": slot, "serverPort": 0, **(listener or {})},
            "database": {"host": "127.0.0.1", "port": self.pg.port, "name": DBNAME, "user": "postgres",
                         "sslMode": "disable"},
            "publisher": publisher,
            "logger": {"level": "info", "fmt": "json"},
            "monitoring": {"promAddr": f"127.0.0.1:{prom_port}"},
        }  # fmt: skip

    def new_listener(self, broker: Broker, slot: str, topic: str, name: str,
                     variant: wl.Variant | None = None) -> tuple[ListenerProcess, int]:
        prom = free_port()
        publisher = {**broker.publisher(topic), **(variant.publisher if variant else {})}
        config = self.listener_config(slot, publisher, prom, variant.listener if variant else None)
        lp = ListenerProcess(config, self.logs, name, broker.env, variant.source if variant else None)
        self._listeners.append(lp)
        return lp, prom

    # -- the run ----------------------------------------------------------------------------------

    async def run(self) -> int:
        a = self.args
        t_start = time.monotonic()
        try:
            await self.setup()
            if "reference" in a.phases:
                named = [wl.VARIANTS[v] for v in a.variants]
                # with --baseline: the other checkout's listener in the default config and in each variant's
                chosen = [*named, *([wl.baseline(a.baseline), *(wl.baseline(a.baseline, v) for v in named)]
                                    if a.baseline else [])]
                await self.throughput(wl.reference(a.rows), profile=a.profile,
                                      variants=[v for v in chosen if v.workload == "reference"])
                on_users = [v for v in chosen if v.workload == "users"]
                if on_users:
                    await self.throughput(wl.users(a.rows), variants=on_users)
            if "wide" in a.phases:
                await self.throughput(wl.wide(a.wide_rows), profile=a.profile,
                                      variants=[wl.baseline(a.baseline)] if a.baseline else [])
            if "txn" in a.phases:
                for n in a.txn_rows:
                    await self.throughput(wl.big_transaction(n))
            if "oltp" in a.phases:
                await self.throughput(wl.oltp(a.oltp_rows), profile=a.profile)
            if "latency" in a.phases or "idle" in a.phases:
                for broker in self.live():
                    await self.latency_and_idle(broker)
        finally:
            for lp in self._listeners:
                lp.kill()
            for b in self.brokers:
                with contextlib.suppress(Exception):
                    await b.close_clients()
                with contextlib.suppress(Exception):
                    b.stop()
            if self.pg is not None:
                with contextlib.suppress(Exception):
                    self.pg.cleanup()
        self.meta["total_seconds"] = round(time.monotonic() - t_start, 1)
        self.report()
        return 0

    async def setup(self) -> None:
        a = self.args
        # the listener as installed: pip writes its bytecode at install time, while a checkout run with
        # PYTHONDONTWRITEBYTECODE=1 compiles every module at each listener start (~0.1 CPU s of start-up)
        compileall.compile_dir(REPO / "listener", quiet=1)
        say(f"wal-listener bench: brokers {', '.join(a.brokers)}; reference {a.rows:,} rows; "
            f"results in {self.out}")
        self.pg = PostgresServer(find_pg_bin("system"), base_dir=None)
        self.pg.start()
        self.pg.create_database(DBNAME)
        wl.setup_schema(self.dsn)
        version = self.pg.execute("SHOW server_version")[0][0]
        say(f"PostgreSQL {version} on port {self.pg.port} ({self.pg.bin_dir})")
        for name in a.brokers:
            broker = BROKERS[name](Path(tempfile.gettempdir()))
            if isinstance(broker, RabbitMQ):
                broker.queue_type = a.rabbitmq_queue
            try:
                broker.start()
            except Exception as exc:
                self.skip(name, f"cannot start: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
                with contextlib.suppress(Exception):
                    broker.stop()
                continue
            self.brokers.append(broker)
            say(f"{broker.label} ready")
        self.meta = self.machine_info(version)
        if "rabbitmq" in a.brokers:
            self.meta["rabbitmq_queue"] = a.rabbitmq_queue
        from listener import hotpath

        self.meta["compiled_hot_path"] = hotpath.load() is not None  # LISTENER_PURE_PYTHON=1 reaches the listener too
        before = machine_busy()
        await asyncio.sleep(2.0)
        load = 100 * (machine_busy() - before) / 2.0
        self.meta["busy_pct_of_one_cpu_before_start"] = round(load, 1)
        if load > 25:
            say(f"!! the machine is already busy ({load:.0f}% of a CPU before the benchmark starts): "
                "other work competes with what is measured; the figures will be lower than on a quiet machine")

    def machine_info(self, pg_version: str) -> dict[str, Any]:
        a = self.args
        cpu = ""
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        try:
            commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, check=False).stdout.strip()
            dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "listener"],
                                        capture_output=True, text=True, check=False).stdout.strip())
        except OSError:
            commit, dirty = "", False
        try:
            import uvloop  # noqa: F401

            loop = "uvloop"
        except ImportError:
            loop = "asyncio"
        versions = {b.name: b.version() for b in self.brokers if b.version()}
        return {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(), "cpu_model": cpu, "platform": platform.platform(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "event_loop": loop, "postgresql": pg_version,
            "broker_versions": versions, "listener_version": __version__,
            "git_commit": commit + ("-dirty" if dirty else ""),
            "settings": {
                "quick": a.quick, "brokers": a.brokers, "rows": a.rows, "wide_rows": a.wide_rows,
                "txn_rows": a.txn_rows, "oltp_rows": a.oltp_rows, "rate": a.rate, "duration": a.duration,
                "latency_txn_rows": a.latency_txn_rows, "idle": a.idle, "rows_per_transaction": wl.TXN_ROWS,
                "listener_config": "defaults, except serverPort 0, promAddr on a free port, sslMode disable",
            },
        }  # fmt: skip

    # -- throughput -------------------------------------------------------------------------------

    async def throughput(self, work: wl.Workload, profile: bool = False,
                         variants: Sequence[wl.Variant] = ()) -> None:
        """``variants``: each broker's listener runs over the WAL with the default config and with each variant,
        alternating, ``--variant-runs`` times each (own slots and topics), and the medians are compared."""
        key = _key(work.name)
        say(f"\n== {work.label}: {work.events:,} events")
        brokers = self.live()
        slots = {CEILING: f"bench_ceiling_{key}", **{b.name: f"bench_{b.name}_{key}" for b in brokers}}
        runs: list[tuple[int, wl.Variant | None]] = (
            [(n, v) for n in range(self.args.variant_runs) for v in (None, *variants)] if variants else [])
        for n, variant in runs[1:]:
            slots.update({f"{b.name}:{n}:{_tag(variant)}": f"bench_{b.name}_{key}_{n}{_tag(variant)}"
                          for b in brokers})
        if profile:
            slots.update({f"{b.name}:profile": f"bench_{b.name}_{key}_prof" for b in brokers})
        for slot in slots.values():
            create_slot(self.dsn, slot)
        start_lsn = self._current_lsn()
        end_lsn, write_s = await asyncio.to_thread(wl.run_workload, self.dsn, work)
        wal_mb = (end_lsn - start_lsn) / 2**20
        say(f"   wrote the WAL in {write_s:.1f}s: {wal_mb:,.0f} MB, {format_lsn(start_lsn)} .. {format_lsn(end_lsn)}")

        ceiling: float | None = None
        try:
            c = await run_ceiling(self.pg, DBNAME, slots[CEILING], wl.PUBLICATION, end_lsn,  # type: ignore[arg-type]
                                  self.logs / f"pg_recvlogical-{key}.log")
            ceiling = work.events / c.seconds
            self.rows.append(Row(CEILING, work.name, work.label, work.events, c.seconds, ceiling, 100.0,
                                 peak_rss_mb=c.peak_rss_mb, cpu_s=c.cpu_s,
                                 extra={"wal_mb": round(wal_mb, 1), "write_seconds": round(write_s, 2)}))
            say(f"   {CEILING}: {c.seconds:.2f}s = {ceiling:,.0f} changes/s")
        except Exception as exc:
            say(f"   !! {CEILING} failed: {exc}")
        finally:
            drop_slot(self.dsn, slots[CEILING])

        for broker in brokers:
            await self._listener_run(broker, work, key, slots[broker.name], end_lsn, ceiling, wal_mb)
            for n, variant in runs[1:]:
                await self._listener_run(broker, work, f"{key}_{n}", slots[f"{broker.name}:{n}:{_tag(variant)}"],
                                         end_lsn, ceiling, wal_mb, variant)
            for variant in variants:
                self._compare_variant(broker, work, variant)
        if profile:
            for broker in brokers:
                slot = slots[f"{broker.name}:profile"]
                if broker.name in self.skipped:
                    drop_slot(self.dsn, slot)
                    continue
                await self._profile_run(broker, work, key, slot, end_lsn)
        await asyncio.to_thread(wl.reset_table, self.dsn, work.table)

    def _current_lsn(self) -> int:
        from listener.pgoutput import parse_lsn

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        assert row is not None
        return parse_lsn(row[0])

    def _compare_variant(self, broker: Broker, work: wl.Workload, variant: wl.Variant) -> None:
        """A variant's cost: the medians of its runs' rate and CPU per event beside the default runs', and its
        CPU per event once streaming as a multiple of the same runs' walsender CPU per change."""

        def median(name: str, value: Callable[[Row], Any]) -> float | None:
            found = sorted(v for r in self.rows if r.broker == broker.name and r.workload == name
                           and (v := value(r)) is not None)
            return found[len(found) // 2] if found else None

        def versus_walsender(r: Row) -> float | None:
            streaming, walsender = r.extra.get("streaming_cpu_per_event_us"), r.extra.get("walsender_cpu_per_change_us")
            return streaming / walsender if streaming and walsender else None

        medians = {
            name: (median(name, lambda r: r.events_per_s), median(name, lambda r: r.extra.get("cpu_per_event_us")),
                   median(name, lambda r: r.extra.get("streaming_cpu_per_event_us")), median(name, versus_walsender))
            for name in (work.name, f"{work.name}+{variant.name}")
        }
        (rate, cpu, streaming, ratio), (rate_v, cpu_v, streaming_v, ratio_v) = medians.values()
        if not rate or not rate_v or cpu is None or cpu_v is None:
            return
        extra: dict[str, Any] = {
            "rate_ratio": round(rate_v / rate, 3), "cpu_per_event_us_delta": round(cpu_v - cpu, 2),
            "median_events_per_s": [round(rate), round(rate_v)], "median_cpu_per_event_us": [cpu, cpu_v],
        }
        if streaming is not None and streaming_v is not None:
            extra["streaming_cpu_per_event_us_delta"] = round(streaming_v - streaming, 2)
            extra["streaming_cpu_ratio"] = round(streaming_v / streaming, 3)
            extra["median_streaming_cpu_per_event_us"] = [streaming, streaming_v]
        if ratio is not None and ratio_v is not None:
            extra["median_streaming_cpu_vs_walsender"] = [round(ratio, 2), round(ratio_v, 2)]
        self.meta.setdefault("variants_vs_plain", {}).setdefault(broker.name, {})[variant.name] = extra
        runs = self.args.variant_runs
        say(f"   {variant.name} vs default ({broker.name}, {work.name}, medians of {runs} runs each): "
            f"{rate_v:,.0f} vs {rate:,.0f} events/s = {100 * extra['rate_ratio']:.0f}%; CPU per "
            f"event {cpu_v:.2f} vs {cpu:.2f} µs ({extra['cpu_per_event_us_delta']:+.2f})"
            + (f", once streaming {streaming_v:.2f} vs {streaming:.2f} µs = {extra['streaming_cpu_ratio']:.2f}x"
               if "streaming_cpu_ratio" in extra else "")
            + (f"; once streaming / walsender per change {ratio_v:.2f}x vs {ratio:.2f}x"
               if ratio is not None and ratio_v is not None else ""))

    async def _listener_run(self, broker: Broker, work: wl.Workload, key: str, slot: str, end_lsn: int,
                            ceiling: float | None, wal_mb: float, variant: wl.Variant | None = None) -> None:
        topic = f"bench_{key}{_tag(variant)}"  # key: the workload's, and the run's number
        name = f"{work.name}+{variant.name}" if variant else work.name
        if broker.name in self.skipped or (variant and broker.name != "nats"):
            if variant and broker.name != "nats":
                say(f"   {broker.name}: no {variant.name} run (variants are compared on NATS only)")
            drop_slot(self.dsn, slot)
            return
        lp, prom = self.new_listener(broker, slot, topic, f"{broker.name}-{key}{_tag(variant)}", variant)
        try:
            await broker.prepare(topic, work.table)
            try:
                res = await run_until_confirmed(lp, self.dsn, slot, end_lsn, stall_timeout=self.args.stall_timeout,
                                                broker_cpu=broker.cpu_seconds)
            except BrokerFailed as exc:
                self.skip(broker.name, f"{work.name}: {exc}")
                return
            acked = published_events(prom)
            code = lp.stop()
            try:
                count = await broker.count(topic, work.table, work.events)
            except Exception as exc:
                count = Count(None, None, f"count failed: {type(exc).__name__}: {exc}")
            rate = work.events / res.seconds
            streaming = res.seconds - res.startup_s
            notes = []
            if count.unique is None:
                notes.append(count.how)
            elif count.unique < work.events:
                notes.append(f"MISSING: the broker holds {count.unique:,} distinct events of {work.events:,} "
                             f"({count.how})")
            elif count.unique > work.events + (1 if variant and variant.listener.get("schemaEvents") else 0):
                # schemaEvents: one SCHEMA event for the workload's table comes before its first change
                notes.append(f"the broker holds {count.unique:,} distinct ids, expected {work.events:,}")
            if count.total is not None and count.unique is not None and count.total > count.unique:
                notes.append(f"{count.total - count.unique:,} duplicate messages on the broker (at-least-once "
                             "re-sends)")
            if acked is not None and acked < work.events:
                notes.append(f"the listener counted only {acked:,} acked events")
            if code not in (0, None):
                notes.append(f"listener exit code {code} on SIGTERM")
            other = res.other_cpu_s
            if other is not None and other > 0.25 * res.seconds:
                notes.append(f"other processes kept {100 * other / res.seconds:.0f}% of a CPU busy during the run")
            label = f"{work.label} + {variant.name}" if variant else work.label
            row = Row(broker.name, name, label, work.events, res.seconds, rate,
                      100 * rate / ceiling if ceiling else None, peak_rss_mb=res.peak_rss_mb, cpu_s=res.cpu_s,
                      note="; ".join(notes),
                      extra={"startup_s": round(res.startup_s, 2),
                             "events_per_s_after_startup": round(work.events / streaming) if streaming > 0 else None,
                             "broker_distinct_events": count.unique, "broker_messages": count.total,
                             "count_method": count.how, "published_events_total": acked,
                             "exit_code": code, "wal_mb": round(wal_mb, 1),
                             "walsender_cpu_s": None if res.walsender_cpu_s is None else round(res.walsender_cpu_s, 2),
                             "broker_cpu_s": None if res.broker_cpu_s is None else round(res.broker_cpu_s, 2),
                             "bench_cpu_s": None if res.bench_cpu_s is None else round(res.bench_cpu_s, 2),
                             "other_cpu_s": None if other is None else round(other, 2),
                             "cpu_per_event_us": round(1e6 * res.cpu_s / work.events, 2),
                             "streaming_cpu_s": None if res.streaming_cpu_s is None else round(res.streaming_cpu_s, 2),
                             "streaming_cpu_per_event_us": None if res.streaming_cpu_s is None
                             else round(1e6 * res.streaming_cpu_s / work.events, 2),
                             "walsender_cpu_per_change_us": None if res.walsender_cpu_s is None
                             else round(1e6 * res.walsender_cpu_s / work.events, 2),
                             "streaming_per_event": _per_event(res.streaming_counters, work.events),
                             "timeline_s": res.timeline,
                             "rss_samples_mb": [(round(t, 2), round(r, 1)) for t, r in lp.rss_samples[::5]]})
            self.rows.append(row)
            ok = ("all on the broker" if count.unique == work.events and count.total == count.unique
                  else row.note)
            say(f"   {broker.name}: {res.seconds:.2f}s (startup {res.startup_s:.2f}s) = {rate:,.0f} events/s"
                + (f" = {row.pct_of_ceiling:.0f}% of ceiling" if row.pct_of_ceiling else "")
                + f"; peak RSS {res.peak_rss_mb:.0f} MB; CPU {res.cpu_s:.1f}s; {ok}")
            say("      timeline (s from exec): " + ", ".join(
                f"{k} {v:.2f}" for k, v in sorted(res.timeline.items(), key=lambda kv: kv[1])))
            say(f"      CPU s: listener {res.cpu_s:.1f}, its walsender {_fmt(res.walsender_cpu_s)}, "
                f"{broker.name} server {_fmt(res.broker_cpu_s)}, bench {_fmt(res.bench_cpu_s)}, "
                f"anything else {_fmt(other)}; wall {res.seconds:.1f}s on {os.cpu_count()} CPUs")
            if res.walsender_cpu_s:
                streaming = ("" if res.streaming_cpu_s is None else
                             f" ({1e6 * res.streaming_cpu_s / work.events:.2f} once streaming, startup left out)")
                ratio = "" if res.streaming_cpu_s is None else \
                    f" (listener once streaming = {res.streaming_cpu_s / res.walsender_cpu_s:.2f}x the walsender)"
                say(f"      CPU per event: listener {1e6 * res.cpu_s / work.events:.2f} µs{streaming}, "
                    f"walsender {1e6 * res.walsender_cpu_s / work.events:.2f} µs per change{ratio}")
            per = row.extra["streaming_per_event"]
            if per:
                say(f"      once streaming, per event: user {per['user_us']:.2f} µs, system {per['system_us']:.2f} µs, "
                    f"{per['minor_faults']:.2f} page faults; {per['syscw']:.3f} writes ({per['wchar']:,.0f} B), "
                    f"{per['syscr']:.3f} reads ({per['rchar']:,.0f} B), {per['voluntary_switches']:.3f} waits")
        except Exception as exc:
            self.skip(broker.name, f"{work.name}: {type(exc).__name__}: {exc}")
        finally:
            lp.kill()
            with contextlib.suppress(Exception):
                drop_slot(self.dsn, slot)
            with contextlib.suppress(Exception):
                await broker.cleanup(topic, work.table)

    async def _profile_run(self, broker: Broker, work: wl.Workload, key: str, slot: str, end_lsn: int) -> None:
        topic = f"bench_{key}_prof"
        lp, _ = self.new_listener(broker, slot, topic, f"{broker.name}-{key}-profile")
        raw = self.out / f"profile-{broker.name}-{key}.txt"
        raw.unlink(missing_ok=True)
        profiler: list[Profiler] = []
        try:
            await broker.prepare(topic, work.table)

            def attach() -> None:
                profiler.append(Profiler(lp.pid, raw, self.logs / f"py-spy-{broker.name}.log"))

            res = await run_until_confirmed(lp, self.dsn, slot, end_lsn, stall_timeout=self.args.stall_timeout,
                                            on_streaming=attach)
            for p in profiler:
                p.stop()
            lp.stop()
            if not raw.is_file():
                say(f"   !! py-spy wrote no profile (see {self.logs / f'py-spy-{broker.name}.log'})")
                return
            summary = summarize_profile(raw)
            summary.update({"raw": str(raw), "seconds_under_py_spy": round(res.seconds, 2),
                            "events_per_s_under_py_spy": round(work.events / res.seconds)})
            summary["workload"] = work.label
            self.profiles[f"{broker.name} {work.name}"] = summary
            say(f"   {broker.name} under py-spy: {res.seconds:.2f}s ({work.events / res.seconds:,.0f} events/s); "
                f"raw stacks in {raw}")
        except Exception as exc:
            say(f"   !! profile of {broker.name} failed: {type(exc).__name__}: {exc}")
        finally:
            for p in profiler:
                p.stop()
            lp.kill()
            with contextlib.suppress(Exception):
                drop_slot(self.dsn, slot)
            with contextlib.suppress(Exception):
                await broker.cleanup(topic, work.table)

    # -- latency and idle -------------------------------------------------------------------------

    async def latency_and_idle(self, broker: Broker) -> None:
        a = self.args
        topic, table, slot = "bench_lat", "bench_lat", f"bench_{broker.name}_lat"
        label = f"steady {a.rate / 1000:g}k rows/s x {a.duration:g}s"
        say(f"\n== {broker.name}: {label}, {a.latency_txn_rows} rows per transaction"
            + (f"; then idle {a.idle:g}s" if "idle" in a.phases else ""))
        lp, _ = self.new_listener(broker, slot, topic, f"{broker.name}-latency")
        got = Received()
        close: Any = None
        try:
            await broker.prepare(topic, table)
            startup = await wait_streaming(lp, self.dsn, slot)
            close = await broker.consume(topic, table, got.on_event)
            await asyncio.sleep(1.0)
            if "latency" in a.phases:
                await self._steady(broker, lp, slot, label, startup, got)
            if "idle" in a.phases:
                await asyncio.sleep(3.0)  # let the last acks and status updates settle
                lp.sample_rss()
                cpu0, t0 = lp.cpu_seconds(), time.monotonic()
                await asyncio.sleep(a.idle)
                cpu, secs = lp.cpu_seconds() - cpu0, time.monotonic() - t0
                pct = 100 * cpu / secs
                self.rows.append(Row(broker.name, "idle", f"idle {a.idle:g}s: {pct:.2f}% of a core", None, secs,
                                     peak_rss_mb=lp.rss_mb(), cpu_s=cpu,
                                     extra={"cpu_pct": round(pct, 3), "rss_is": "current RSS, not peak"}))
                say(f"   idle: {cpu:.3f} CPU s in {secs:.1f}s = {pct:.2f}% of a core; RSS {lp.rss_mb():.0f} MB")
        except BrokerFailed as exc:
            self.skip(broker.name, f"latency: {exc}")
        except Exception as exc:
            self.skip(broker.name, f"latency: {type(exc).__name__}: {exc}")
        finally:
            if close is not None:
                with contextlib.suppress(Exception):
                    result = close()
                    if asyncio.iscoroutine(result):
                        await result
            lp.stop(30)
            lp.kill()
            with contextlib.suppress(Exception):
                drop_slot(self.dsn, slot)
            with contextlib.suppress(Exception):
                await broker.cleanup(topic, table)
            await asyncio.to_thread(wl.reset_table, self.dsn, table)

    async def _walsender(self, slot: str) -> psutil.Process | None:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            _, pid = await slot_state(conn, slot)
        try:
            return psutil.Process(pid) if pid else None
        except psutil.Error:
            return None

    @staticmethod
    async def _sample_cpu(t0: float, samples: dict[int, dict[str, float | None]], lp: ListenerProcess,
                          walsender: psutil.Process | None, broker: Broker, me: psutil.Process) -> None:
        """Per second of the steady phase: CPU % (of one core) of each process involved, and of the machine."""

        def read() -> tuple[float | None, ...]:
            m = psutil.cpu_times()
            return (lp.cpu_seconds(), process_cpu(walsender), broker.cpu_seconds(), process_cpu(me),
                    sum(m) - m.idle - m.iowait, time.monotonic())

        before = read()
        while True:
            await asyncio.sleep(1.0 - (time.time() - t0) % 1.0)
            now = read()
            span = (now[5] or 1.0) - (before[5] or 0.0)
            names = ("listener_cpu_pct", "walsender_cpu_pct", "broker_cpu_pct", "bench_cpu_pct",
                     "machine_cpu_pct")
            samples[int(time.time() - t0) - 1] = {
                name: None if b is None or a is None else round(100 * (a - b) / span, 1)
                for name, b, a in zip(names, before[:5], now[:5], strict=True)
            }
            before = now

    async def _steady(self, broker: Broker, lp: ListenerProcess, slot: str, label: str, startup: float,
                      got: Received) -> None:
        a = self.args
        walsender = await self._walsender(slot)
        me = psutil.Process()
        cpu0 = lp.cpu_seconds()
        others0 = (process_cpu(walsender), broker.cpu_seconds(), process_cpu(me),
                   resource.getrusage(resource.RUSAGE_CHILDREN), psutil.cpu_times())
        t0 = time.time()
        samples: dict[int, dict[str, float | None]] = {}
        sampler = asyncio.create_task(self._sample_cpu(t0, samples, lp, walsender, broker, me))
        writer = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.writer", self.dsn, str(a.rate), str(a.duration), str(a.latency_txn_rows),
            stdout=asyncio.subprocess.PIPE, cwd=str(REPO),
        )
        assert writer.stdout is not None
        reader = asyncio.create_task(writer.stdout.read())
        while writer.returncode is None:
            lp.sample_rss()
            if not lp.alive:
                writer.kill()
                raise BrokerFailed(f"the listener exited: {lp.problem()}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(writer.wait(), 0.2)
        out = json.loads((await reader).decode() or "{}")
        expected = int(out.get("rows", 0))
        deadline = time.monotonic() + 30
        last, last_change = len(got.received), time.monotonic()
        while len(got.received) < expected and time.monotonic() < deadline and time.monotonic() - last_change < 10:
            await asyncio.sleep(0.1)
            if len(got.received) != last:
                last, last_change = len(got.received), time.monotonic()
        wall = time.time() - t0
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        cpu = lp.cpu_seconds() - cpu0
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        machine = psutil.cpu_times()
        busy = (sum(machine) - machine.idle - machine.iowait) - (sum(others0[4]) - others0[4].idle - others0[4].iowait)
        contention = {
            "listener_cpu_s": round(cpu, 2),
            "walsender_cpu_s": _delta(others0[0], process_cpu(walsender)),
            "broker_cpu_s": _delta(others0[1], broker.cpu_seconds()),
            "bench_consumer_cpu_s": _delta(others0[2], process_cpu(me)),
            "writer_cpu_s": round(children.ru_utime + children.ru_stime - others0[3].ru_utime - others0[3].ru_stime, 2),
            "machine_busy_pct_of_all_cpus": round(100 * busy / (wall * (os.cpu_count() or 1)), 1),
            "machine_busy_cpu_s": round(busy, 2),
            "wall_s": round(wall, 2),
        }
        known = sum(v or 0 for k, v in contention.items() if k.endswith("_cpu_s") and k != "machine_busy_cpu_s")
        # PostgreSQL's backend for the writer, its other processes, and anything else on the machine
        contention["other_cpu_s"] = round(max(0.0, busy - known), 2)
        n = len(got.received)
        if n == 0:
            raise BrokerFailed(f"the consumer received nothing of {expected:,} events: {lp.problem()}")
        lat_ms, to_broker_ms, from_broker_ms = [], [], []
        series: dict[int, list[float]] = {}
        cache: dict[bytes, float] = {}
        for now, raw, meta in zip(got.received, got.commits, got.metas, strict=True):
            commit = cache.get(raw)
            if commit is None:
                commit = cache[raw] = dt.datetime.fromisoformat(raw.decode()).timestamp()
            ms = (now - commit) * 1000
            lat_ms.append(ms)
            series.setdefault(int(now - t0), []).append(ms)
            stamp = broker.broker_time(meta)
            if stamp is not None:
                to_broker_ms.append((stamp - commit) * 1000)
                from_broker_ms.append((now - stamp) * 1000)
        ordered = sorted(lat_ms)
        dist = self.latency_distributions[broker.name] = distribution(ordered)
        p50, p90, p99 = dist["p50_ms"], dist["p90_ms"], dist["p99_ms"]
        self.latency_series[broker.name] = [
            {"t": float(sec), "n": len(v), "p50_ms": round(percentile(sorted(v), 50), 2),
             "p99_ms": round(percentile(sorted(v), 99), 2), "max_ms": round(max(v), 2), **samples.get(sec, {})}
            for sec, v in sorted(series.items())
        ]  # fmt: skip
        split: dict[str, Any] = {}
        if to_broker_ms:
            tb, fb = sorted(to_broker_ms), sorted(from_broker_ms)
            split = {"broker_timestamp": broker.broker_time_label,
                     "commit_to_broker_p50_ms": round(percentile(tb, 50), 2),
                     "commit_to_broker_p99_ms": round(percentile(tb, 99), 2),
                     "broker_to_consumer_p50_ms": round(percentile(fb, 50), 2),
                     "broker_to_consumer_p99_ms": round(percentile(fb, 99), 2)}
        notes = []
        if out.get("rate", a.rate) < 0.97 * a.rate:
            notes.append(f"the writer reached only {out['rate']:,.0f} rows/s")
        if n < expected:
            notes.append(f"consumer received {n:,} of {expected:,} events")
        if contention["machine_busy_pct_of_all_cpus"] > 90:
            notes.append(f"the machine was {contention['machine_busy_pct_of_all_cpus']:.0f}% busy (all CPUs): "
                         "latency here is CPU contention as much as the listener")
        if split:
            notes.append(f"commit -> {broker.broker_time_label}: p50/p99 {split['commit_to_broker_p50_ms']:.1f} / "
                         f"{split['commit_to_broker_p99_ms']:.1f} ms; then -> consumer: "
                         f"{split['broker_to_consumer_p50_ms']:.1f} / {split['broker_to_consumer_p99_ms']:.1f} ms")
        self.rows.append(Row(broker.name, "steady", label, n, out.get("seconds"), out.get("rate"),
                             p50_ms=p50, p90_ms=p90, p99_ms=p99, peak_rss_mb=lp.peak_rss_mb(), cpu_s=cpu,
                             note="; ".join(notes),
                             extra={"writer": out, "max_ms": dist["max_ms"], "p999_ms": dist["p999_ms"],
                                    "startup_s": round(startup, 2),
                                    "cpu_pct": round(100 * cpu / max(out.get("seconds", 1), 1e-9), 1),
                                    **split, "cpu": contention}))
        say(f"   {n:,} events at {out.get('rate', 0):,.0f} rows/s: latency p50 {p50:.1f} ms, p90 {p90:.1f} ms, "
            f"p99 {p99:.1f} ms, max {ordered[-1]:.1f} ms" + (f" ({notes[-1]})" if split else ""))
        say(format_histogram(broker.name, dist))
        say("   CPU s during the phase: " + ", ".join(f"{k.removesuffix('_cpu_s')} {v}" for k, v in contention.items()
                                                     if k.endswith("_cpu_s") and v is not None)
            + f"; machine {contention['machine_busy_pct_of_all_cpus']}% busy")

    # -- output -----------------------------------------------------------------------------------

    def report(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        say("\n" + format_table(self.rows))
        if self.skipped:
            say("\nskipped:")
            for name, reason in self.skipped.items():
                say(f"  {name}: {reason}")
        for name, summary in self.profiles.items():
            say("\n" + format_profile(name.split()[0], summary))
        write_json(self.out / "results.json", self.meta, self.rows, self.skipped, self.latency_series, self.profiles,
                   self.latency_distributions)
        chart = self.out / "bench.png"
        title = (f"wal-listener {__version__} on {self.meta.get('cpus')} CPUs ({self.meta.get('cpu_model', '')}), "
                 f"PostgreSQL {self.meta.get('postgresql', '')}, {self.meta.get('date', '')}")
        try:
            write_chart(chart, self.rows, self.latency_series, title)
        except Exception as exc:
            say(f"(no chart: {type(exc).__name__}: {exc}; pip install -e '.[bench]')")
            chart = None  # type: ignore[assignment]
        if chart and self.latency_distributions:
            latency_chart = self.out / "latency.png"
            write_latency_chart(latency_chart, self.latency_distributions, title)
            say(f"latency histogram: {latency_chart}")
        say(f"\nresults: {self.out / 'results.json'}" + (f", chart: {chart}" if chart else "")
            + f", logs: {self.logs}; total {self.meta.get('total_seconds')}s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(Bench(args).run())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
