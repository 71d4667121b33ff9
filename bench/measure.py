"""Measuring: the listener as its own process (peak RSS, CPU seconds), the time until its slot's
confirmed LSN reaches a workload's end, ``pg_recvlogical`` as the ceiling, py-spy profiles."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil
import psycopg
import yaml

from listener.pgoutput import format_lsn, parse_lsn
from tests.support.services import PostgresServer

REPO = Path(__file__).resolve().parent.parent


class BrokerFailed(Exception):
    """The listener could not deliver to this broker; the message says why (from its log)."""


# --------------------------------------------------------------------------------------------------
# the listener process


class ListenerProcess:
    """``python -m listener.cli --config FILE``, with its resource use read from /proc."""

    def __init__(self, cfg: dict[str, Any], workdir: Path, name: str, env: dict[str, str] | None = None,
                 source: Path | None = None) -> None:
        self.cfg = cfg
        self.source = source or REPO  # the checkout whose listener runs (its ``listener`` package comes first)
        self.name = name
        self.config_path = workdir / f"listener-{name}.yml"
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.log_path = workdir / f"listener-{name}.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self._ps: psutil.Process | None = None
        self.started_at = 0.0
        self.rss_samples: list[tuple[float, float]] = []  # (seconds since start, RSS MB)

    def start(self) -> ListenerProcess:
        with self.log_path.open("ab") as log:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "listener.cli", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.source,
            )  # fmt: skip
        self._ps = psutil.Process(self.proc.pid)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def sample_rss(self) -> None:
        if self._ps is None or not self.alive:
            return
        with contextlib.suppress(psutil.Error):
            rss = self._ps.memory_info().rss / 2**20
            self.rss_samples.append((time.monotonic() - self.started_at, rss))

    def peak_rss_mb(self) -> float:
        """VmHWM: the kernel's own high-water mark of the resident set (exact, not sampled)."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return max((r for _, r in self.rss_samples), default=0.0)

    def rss_mb(self) -> float:
        if self._ps is None:
            return 0.0
        try:
            return self._ps.memory_info().rss / 2**20
        except psutil.Error:
            return 0.0

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the listener used so far."""
        if self._ps is None:
            return 0.0
        try:
            t = self._ps.cpu_times()
        except psutil.Error:
            return 0.0
        return float(t.user + t.system)

    def counters(self) -> dict[str, float]:
        """What the listener used so far, by kind: CPU seconds in user space and in the kernel, minor page
        faults, context switches, read/write system calls and their bytes (/proc/PID/io: a socket's too).
        Empty when the process is gone."""
        return process_counters(self._ps)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (drain, confirm, exit 0); SIGKILL if it takes longer than ``timeout``."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
        return proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def problem(self) -> str:
        """Why the listener is not delivering: its last error (or warning) line, else its output's tail."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no listener log)"
        lines = text.splitlines()
        found = ""
        for line in reversed(lines):
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                if line.startswith("wal-listener:"):  # a fatal one-line error from the CLI
                    return line
                continue
            if isinstance(entry, dict) and str(entry.get("level", "")).lower() in ("error", "critical", "warning"):
                fields = entry.get("fields")
                detail = (fields if isinstance(fields, dict) else entry).get("error")
                found = f"{entry.get('msg') or entry.get('message')}" + (f": {detail}" if detail else "")
                if str(entry.get("level", "")).lower() != "warning":
                    break
        if found:
            return found
        tail = " | ".join(line.strip() for line in lines[-3:])
        return tail[-400:] or "(listener log is empty)"


def published_events(prom_port: int) -> int | None:
    """The listener's own count of acknowledged events (sum of ``published_events_total``)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith("published_events_total"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


# --------------------------------------------------------------------------------------------------
# slots


async def sent_lsn(conn: psycopg.AsyncConnection[Any], pid: int) -> int:
    """How far the walsender ``pid`` has sent the WAL (pg_stat_replication.sent_lsn; 0 when not known)."""
    cur = await conn.execute("SELECT sent_lsn::text FROM pg_stat_replication WHERE pid = %s", (pid,))
    row = await cur.fetchone()
    return parse_lsn(row[0]) if row and row[0] else 0


async def slot_state(conn: psycopg.AsyncConnection[Any], slot: str) -> tuple[int, int | None]:
    """(confirmed_flush_lsn, pid of the walsender reading the slot or None)."""
    cur = await conn.execute(
        "SELECT confirmed_flush_lsn::text, active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)
    )
    row = await cur.fetchone()
    if row is None:
        return 0, None
    return (parse_lsn(row[0]) if row[0] else 0), row[1]


def machine_busy() -> float:
    """CPU seconds the machine was busy so far, summed over all CPUs."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def process_cpu(proc: psutil.Process | None) -> float | None:
    if proc is None:
        return None
    try:
        t = proc.cpu_times()
    except psutil.Error:
        return None
    return float(t.user + t.system)


def process_counters(proc: psutil.Process | None) -> dict[str, float]:
    """ListenerProcess.counters of any process (empty when it is gone or /proc does not say)."""
    if proc is None:
        return {}
    try:
        t = proc.cpu_times()
        found: dict[str, float] = {"user_s": t.user, "system_s": t.system}
        ctx = proc.num_ctx_switches()
        found.update(voluntary_switches=ctx.voluntary, involuntary_switches=ctx.involuntary)
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
        found["minor_faults"] = int(stat[stat.rindex(")") + 2:].split()[7])  # field 10, minflt
        for line in Path(f"/proc/{proc.pid}/io").read_text().splitlines():
            name, _, value = line.partition(": ")
            if name in ("rchar", "wchar", "syscr", "syscw"):
                found[name] = int(value)
    except (psutil.Error, OSError, ValueError, IndexError):
        return {}
    return found


def create_slot(dsn: str, slot: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))


def drop_slot(dsn: str, slot: str, timeout: float = 30.0) -> None:
    """Drop a slot once nothing reads it any more (a stopped reader releases it a moment later)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            row = conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
            if row is None:
                return
            if row[0] is not None and time.monotonic() > deadline - timeout / 2:
                conn.execute("SELECT pg_terminate_backend(%s)", (row[0],))
            try:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                return
            except psycopg.errors.ObjectInUse:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


# --------------------------------------------------------------------------------------------------
# end to end: start the listener, wait until its slot confirmed the workload's end LSN


@dataclass
class RunResult:
    seconds: float  # from starting the process until the slot confirmed the end LSN
    startup_s: float  # from starting the process until the slot became active (streaming)
    peak_rss_mb: float
    cpu_s: float
    walsender_cpu_s: float | None = None  # the PostgreSQL process decoding the slot for the listener
    broker_cpu_s: float | None = None  # the broker's server processes over the same time
    machine_busy_s: float | None = None  # CPU seconds the whole machine was busy (all CPUs) over the run
    bench_cpu_s: float | None = None  # this benchmark process over the run
    #: the listener's CPU from the moment it was streaming (startup -- imports, connecting -- left out)
    streaming_cpu_s: float | None = None
    #: ListenerProcess.counters over the same time (user/system CPU, faults, syscalls, bytes)
    streaming_counters: dict[str, float] = field(default_factory=dict)

    @property
    def other_cpu_s(self) -> float | None:
        """CPU seconds of the machine none of the measured processes account for: PostgreSQL's other
        processes, and whatever else runs on the machine (a busy machine makes every figure worse)."""
        if self.machine_busy_s is None:
            return None
        known = self.cpu_s + (self.walsender_cpu_s or 0) + (self.broker_cpu_s or 0) + (self.bench_cpu_s or 0)
        return max(0.0, self.machine_busy_s - known)
    progress: list[tuple[float, int]] = field(default_factory=list)  # (seconds, confirmed LSN)
    #: where the wall time went, seconds from the process start: "streaming" (the slot became active),
    #: "first_sent" / "all_sent" (the walsender's sent_lsn first moved / reached the end LSN),
    #: "first_confirmed", "confirmed" (the end LSN confirmed); polled every 20 ms
    timeline: dict[str, float] = field(default_factory=dict)


async def run_until_confirmed(
    lp: ListenerProcess,
    dsn: str,
    slot: str,
    end_lsn: int,
    *,
    stall_timeout: float = 60.0,
    on_streaming: Callable[[], None] | None = None,
    broker_cpu: Callable[[], float | None] | None = None,
) -> RunResult:
    """Start ``lp`` and return once ``slot``'s confirmed_flush_lsn >= ``end_lsn`` (every event of the
    workload acknowledged by the broker). :class:`BrokerFailed` when the listener exits or makes no
    progress for ``stall_timeout`` seconds. The listener keeps running (the caller stops it)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        start_lsn, _ = await slot_state(conn, slot)
        broker0 = broker_cpu() if broker_cpu is not None else None
        me = psutil.Process()
        machine0, me0 = machine_busy(), process_cpu(me)
        lp.start()
        t0 = lp.started_at
        last_lsn, last_progress, last_rss = start_lsn, t0, 0.0
        startup: float | None = None
        cpu_at_streaming: float | None = None
        counters_at_streaming: dict[str, float] = {}
        walsender: psutil.Process | None = None
        progress: list[tuple[float, int]] = []
        timeline: dict[str, float] = {}
        while True:
            lsn, active_pid = await slot_state(conn, slot)
            now = time.monotonic()
            if active_pid is not None and "all_sent" not in timeline:
                sent = await sent_lsn(conn, active_pid)
                if sent > start_lsn:
                    timeline.setdefault("first_sent", now - t0)
                if sent >= end_lsn:
                    timeline["all_sent"] = now - t0
            if lsn > start_lsn:
                timeline.setdefault("first_confirmed", now - t0)
            if active_pid is not None and startup is None:
                startup = timeline["streaming"] = now - t0
                cpu_at_streaming = lp.cpu_seconds()
                counters_at_streaming = lp.counters()
                with contextlib.suppress(psutil.Error):
                    walsender = psutil.Process(active_pid)
                if on_streaming is not None:
                    on_streaming()
            if lsn > last_lsn:
                last_lsn, last_progress = lsn, now
                progress.append((now - t0, lsn))
            if lsn >= end_lsn:
                elapsed = timeline["confirmed"] = now - t0
                walsender_cpu = process_cpu(walsender)
                broker1 = broker_cpu() if broker_cpu is not None else None
                machine1, me1 = machine_busy(), process_cpu(me)
                counters = lp.counters()
                break
            if not lp.alive:
                raise BrokerFailed(f"the listener exited with code {lp.proc.returncode if lp.proc else '?'}: "
                                   f"{lp.problem()}")
            if now - last_progress > stall_timeout:
                raise BrokerFailed(f"no progress for {stall_timeout:.0f}s (confirmed {format_lsn(last_lsn)}, "
                                   f"end {format_lsn(end_lsn)}): {lp.problem()}")
            if now - last_rss >= 0.1:
                lp.sample_rss()
                last_rss = now
            await asyncio.sleep(0.02)
    cpu = lp.cpu_seconds()
    return RunResult(elapsed, startup if startup is not None else elapsed, lp.peak_rss_mb(), cpu,
                     walsender_cpu, None if broker0 is None or broker1 is None else broker1 - broker0,
                     machine1 - machine0, None if me0 is None or me1 is None else me1 - me0,
                     None if cpu_at_streaming is None else cpu - cpu_at_streaming,
                     {k: v - counters_at_streaming[k] for k, v in counters.items() if k in counters_at_streaming},
                     progress, {k: round(v, 3) for k, v in timeline.items()})


async def wait_streaming(lp: ListenerProcess, dsn: str, slot: str, timeout: float = 60.0) -> float:
    """Start ``lp`` and wait until it streams from ``slot`` (the slot exists and is active)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        lp.start()
        while True:
            _, active_pid = await slot_state(conn, slot)
            if active_pid is not None:
                return time.monotonic() - lp.started_at
            if not lp.alive:
                raise BrokerFailed(f"the listener exited with code {lp.proc.returncode if lp.proc else '?'}: "
                                   f"{lp.problem()}")
            if time.monotonic() - lp.started_at > timeout:
                raise BrokerFailed(f"not streaming after {timeout:.0f}s: {lp.problem()}")
            await asyncio.sleep(0.05)


# --------------------------------------------------------------------------------------------------
# the ceiling: pg_recvlogical over the same WAL range


@dataclass
class CeilingResult:
    seconds: float
    cpu_s: float  # pg_recvlogical's own CPU (the walsender's decoding is the server's)
    peak_rss_mb: float
    command: list[str]


def _spawn(cmd: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    with log_path.open("ab") as log:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)


def _wait4_nohang(pid: int) -> tuple[int, int, Any]:
    return os.wait4(pid, os.WNOHANG)


def _vm_hwm_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


async def run_ceiling(pg: PostgresServer, dbname: str, slot: str, publication: str, end_lsn: int,
                      log_path: Path, timeout: float = 900.0) -> CeilingResult:
    """``pg_recvlogical`` (from the server's own bin directory) streams ``slot`` with pgoutput up to
    ``end_lsn`` into /dev/null; the wall time is the ceiling for reading that WAL range."""
    exe = pg.bin_dir / "pg_recvlogical"
    if not exe.is_file():
        found = shutil.which("pg_recvlogical")
        if found is None:
            raise FileNotFoundError(f"{exe} not found (apt-get install postgresql-client)")
        exe = Path(found)
    cmd = [
        str(exe), "-d", pg.dsn(dbname), "--slot", slot, "--start", "--no-loop",
        "-o", "proto_version=1", "-o", f'publication_names="{publication}"',
        "--endpos", format_lsn(end_lsn), "-f", "/dev/null", "--status-interval", "10",
    ]  # fmt: skip
    t0 = time.monotonic()
    proc = _spawn(cmd, log_path)
    hwm = 0.0
    while True:
        # (not ru_maxrss: Linux carries the forking parent's high-water mark over the exec)
        hwm = max(hwm, _vm_hwm_mb(proc.pid))
        pid, status, usage = _wait4_nohang(proc.pid)
        if pid:
            break
        if time.monotonic() - t0 > timeout:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"pg_recvlogical did not reach {format_lsn(end_lsn)} in {timeout:.0f}s")
        await asyncio.sleep(0.005)
    elapsed = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = await asyncio.to_thread(log_path.read_text, errors="replace")
        raise RuntimeError(f"pg_recvlogical exited with code {proc.returncode}: {tail[-500:]}")
    return CeilingResult(elapsed, usage.ru_utime + usage.ru_stime, hwm, cmd)


# --------------------------------------------------------------------------------------------------
# py-spy


def find_py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.is_file() else shutil.which("py-spy")


class Profiler:
    """``py-spy record --format raw`` attached to a running process until :meth:`stop`."""

    def __init__(self, pid: int, out: Path, log: Path, rate: int = 200) -> None:
        exe = find_py_spy()
        if exe is None:
            raise FileNotFoundError("py-spy not found: pip install py-spy")
        self.out = out
        with log.open("ab") as fh:
            self.proc = subprocess.Popen(
                [exe, "record", "--pid", str(pid), "--format", "raw", "--rate", str(rate), "--nonblocking",
                 "--output", str(out), "--duration", "3600"],
                stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def summarize_profile(raw: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares per function, and per area (our stages, libraries, the loop),
    from py-spy's raw (collapsed stacks) output."""
    selfs: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    areas: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";")]
        frames = [f for f in frames if f]
        if not frames:
            continue
        total += count
        selfs[frames[-1]] = selfs.get(frames[-1], 0) + count
        for name in set(frames):
            inclusive[name] = inclusive.get(name, 0) + count
        area = _area(frames[-1])
        areas[area] = areas.get(area, 0) + count

    def ranked(d: dict[str, int]) -> list[dict[str, Any]]:
        return [{"function": k, "samples": v, "pct": round(100 * v / total, 1)}
                for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    # the frames every stack starts with (runpy, main, asyncio.run, the event loop) say nothing
    inclusive = {k: v for k, v in inclusive.items() if k.split(" (")[0] not in _ENTRY_FRAMES}
    return {"samples": total, "self": ranked(selfs), "inclusive": ranked(inclusive),
            "areas": ranked(areas)}


_ENTRY_FRAMES = {
    "<module>", "_run_module_as_main", "_run_code", "main", "run", "Runner.run", "run_until_complete",
    "run_forever", "BaseEventLoop.run_forever", "BaseEventLoop.run_until_complete", "BaseEventLoop._run_once",
    "_run_once", "Handle._run", "_run", "_serve",
}


def _frame_name(frame: str) -> str:
    """``decode (listener/pgoutput.py:120)`` -> ``decode (listener/pgoutput.py)``; drops thread/process
    labels py-spy puts first."""
    frame = frame.strip()
    if " (" not in frame or not frame.endswith(")"):
        return ""
    func, _, where = frame.partition(" (")
    where = where[:-1].rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    where = where.replace(str(REPO) + "/", "")
    return f"{func} ({where})"


def _area(name: str) -> str:
    where = name.rsplit("(", 1)[-1].rstrip(")")
    if where == "<string>":
        return "dataclass __init__ (<string>)"
    if where.startswith("listener/"):
        return where.removesuffix(".py")
    for lib in ("nats", "psycopg", "uvloop", "aiokafka", "aio_pika", "aiormq", "pamqp", "google", "grpc",
                "orjson", "prometheus_client", "asyncio"):
        if where.startswith(lib) or f"/{lib}/" in where:
            return lib
    return where or name
