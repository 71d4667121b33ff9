"""``python -m bench.operator [--resources 30] [--idle 60]``: the operator at platform scale.

kmock (the test suite's Kubernetes API emulator, ``tests/support/kube.py``) is served from this process;
``wal-operator run --standalone`` runs as its own process with its default timings against it; a real
throwaway PostgreSQL (``tests/support/services.py``) holds one database. N ``WalListener``s are applied
at once (one slot and one publication each, on the same table), and the run reports:

* the time from the apply until each resource's ``Ready`` condition is True (every one, the median,
  the last, and the stragglers: resources Ready more than 20 s after the median);
* the operator's CPU seconds and the API requests it sent (counted at kmock by the ``User-Agent``:
  kopf's watches, lists and patches and the operator's own client) per resource, until all are Ready;
* the operator's peak RSS; the PostgreSQL connections it holds;
* idle, once every resource is Ready: the operator's CPU share and API requests/s over ``--idle`` seconds;
* the CPU this process (kmock plus the bench's own bookkeeping) spent, to see which side is the limit.

kmock runs no controllers: this bench plays the Deployment controller, writing
``status.availableReplicas: 1`` (through the API, so watchers see it) onto every listener Deployment the
operator creates or changes, as soon as it sees it (polled every 0.2 s): the pod is "ready" at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import kmock
import psutil

from tests.support.kube import (
    NS,
    WL,
    Emulator,
    _declare,
    _now,
    listener_spec,
    write_kubeconfig,
)
from tests.support.services import PostgresServer, find_pg_bin
from wal_operator.render import MANAGED_BY
from wal_operator.spec import API_GROUP, API_VERSION, KIND, PLURAL

BENCH_AGENT = "wal-bench"
STRAGGLER_S = 20.0


class CountingEmulator(Emulator):
    """kmock counting the requests of everyone but this bench, by method and resource.

    Unless ``as_is``, two differences from kmock that a real API server does not have are taken away:

    * kmock keeps every request it ever served and, to route each new one, scans that whole log once per
      reaction (``request in payload._source`` tests identity against every recorded request): its cost
      per request grows with the number of requests served so far, which is what saturates it near 100
      resources. The log is cut to its last ``_LOG_KEEP`` entries (the request being routed is always
      among them, and every request still waiting for kmock's lock), so the emulator costs the same at the
      10,000th request as at the first.
    * kmock sets no ``metadata.resourceVersion``. kopf uses the version its own patch returned to skip the
      older events still in flight on the watch (its "consistency" wait); without one it takes an event
      from before its own patch for the newest state and runs the create handler a second time. Each
      create and patch here stamps a new version, as an API server does.
    """

    _LOG_KEEP = 16

    def __init__(self, *args: Any, as_is: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counts: Counter[str] = Counter()
        self.total = 0
        self.as_is = as_is
        self._version = 1000
        self._routing: set[int] = set()  # id() of the requests not yet routed (they must stay in the log)

    async def _handle(self, request: Any) -> Any:
        if not self.as_is:
            self._routing.add(id(request))
            log = self._requests
            if len(log) > 4 * self._LOG_KEEP:
                older = [r for r in log[: -self._LOG_KEEP] if id(r) in self._routing]
                log[:] = older + log[-self._LOG_KEEP :]
            if request.action in (kmock.action.CREATE, kmock.action.UPDATE) and isinstance(request.data, dict):
                self._version += 1
                meta = request.data.setdefault("metadata", {})
                if isinstance(meta, dict):
                    meta["resourceVersion"] = str(self._version)
        if not str(request.headers.get("User-Agent", "")).startswith(BENCH_AGENT):
            self.total += 1
            what = request.resource.plural if request.resource is not None else request.url.path
            sub = f"/{request.subresource}" if request.subresource else ""
            action = request.action.name if request.action is not None else request.method
            self.counts[f"{action} {what}{sub}"] += 1
        try:
            return await super()._handle(request)
        finally:
            self._routing.discard(id(request))


def _operator_env(kubeconfig: Path, operator_path: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAL_OPERATOR_") and not k.startswith("PG")}
    env["KUBECONFIG"] = str(kubeconfig)
    if operator_path:  # another version of the operator (the wal_operator package in that folder)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (operator_path, env.get("PYTHONPATH", "")) if p)
    return env


def _rss_peak(proc: psutil.Process) -> int:
    """VmHWM: the process's peak resident set (bytes)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return int(proc.memory_info().rss)


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.n: int = args.resources
        self.names = [f"wl-{i:03d}" for i in range(self.n)]
        self.ready_at: dict[str, float] = {}
        self.available_marked: set[str] = set()
        self.status_writes = 0
        self.trail: dict[str, list[tuple[float, str]]] = {}
        self.t0: float | None = None

    async def _call(self, server: kmock.Server, method: str, path: str, body: Any, ctype: str) -> None:
        headers = {"Content-Type": ctype, "User-Agent": BENCH_AGENT}
        async with server.client.request(method, path, json=body, headers=headers) as rsp:
            text = await rsp.text()
            if rsp.status >= 400:
                raise RuntimeError(f"{method} {path}: {rsp.status} {text[:300]}")

    async def deployment_controller(self, emulator: CountingEmulator, server: kmock.Server) -> None:
        """Play the Deployment controller: a listener Deployment is available as soon as it exists (each sweep
        writes the status of every Deployment that lacks it at once, not one after the other)."""
        while True:
            todo: list[tuple[str, str]] = []
            for (resource, ns, name), obj in list(emulator.objects.items()):
                if getattr(resource, "plural", "") != "deployments" or obj.deleted:
                    continue
                raw = obj.raw
                labels = (raw.get("metadata") or {}).get("labels") or {}
                if labels.get("app.kubernetes.io/managed-by") != MANAGED_BY:
                    continue
                if int((raw.get("status") or {}).get("availableReplicas") or 0) < 1:
                    todo.append((ns, name))
            await asyncio.gather(*(self._mark_available(server, ns, name) for ns, name in todo))
            await asyncio.sleep(0.2)

    async def _mark_available(self, server: kmock.Server, namespace: str, name: str) -> None:
        await self._call(
            server,
            "PATCH",
            f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}/status",
            {"status": {"replicas": 1, "readyReplicas": 1, "availableReplicas": 1, "updatedReplicas": 1}},
            "application/merge-patch+json",
        )
        self.status_writes += 1
        owner = name.removesuffix("-wal-listener")
        if self.t0 is not None:
            self.trail.setdefault(owner, []).append((round(time.monotonic() - self.t0, 1), "pod ready"))

    def _ready(self, emulator: CountingEmulator, name: str, at: float) -> bool:
        """Whether the resource is Ready; notes each change of its Ready reason (for stragglers)."""
        try:
            obj = emulator.objects[WL, NS, name]
        except KeyError:
            return False
        if obj.deleted:
            return False
        reason = "-"
        for cond in (obj.raw.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "Ready":
                reason = f"{cond.get('status')}/{cond.get('reason')}"
        trail = self.trail.setdefault(name, [])
        said = [r for _, r in trail if r != "pod ready"]
        if not said or said[-1] != reason:
            trail.append((round(at, 1), reason))
        return reason.startswith("True/")

    async def run(self) -> dict[str, Any]:
        args = self.args
        settings = {
            "max_replication_slots": self.n + 10,
            "max_wal_senders": 10,
            "max_connections": max(100, 2 * self.n + 20),
        }
        me = psutil.Process()
        with PostgresServer(find_pg_bin("system"), settings=settings) as pg, tempfile.TemporaryDirectory() as tmp:
            dbname = pg.create_database("bench_op")
            pg.execute("CREATE TABLE public.items (id int PRIMARY KEY, name text)", dbname=dbname)
            async with CountingEmulator(as_is=args.kmock_as_is) as emulator, kmock.Server(emulator) as server:
                _declare(emulator)
                url = str(server.url).rstrip("/")
                kubeconfig = write_kubeconfig(Path(tmp) / "kubeconfig", url)
                log_path = Path(args.out) / "operator.log"
                log_path.parent.mkdir(parents=True, exist_ok=True)
                log = log_path.open("w")
                proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before the clock runs
                    [sys.executable, "-m", "wal_operator", "run", "--standalone", "--liveness", ""]
                    + (["--verbose"] if args.verbose else []),
                    env=_operator_env(kubeconfig, args.operator_path),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
                op = psutil.Process(proc.pid)
                controller = asyncio.create_task(self.deployment_controller(emulator, server))
                try:
                    return await self._measure(pg, dbname, emulator, server, op, me)
                finally:
                    controller.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await controller
                    proc.terminate()
                    try:
                        proc.wait(20)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                    log.close()

    async def _measure(
        self,
        pg: PostgresServer,
        dbname: str,
        emulator: CountingEmulator,
        server: kmock.Server,
        op: psutil.Process,
        me: psutil.Process,
    ) -> dict[str, Any]:
        args = self.args
        # the operator is up once kopf watches WalListeners
        deadline = time.monotonic() + 60
        while not any(k.startswith("WATCH wallisteners") for k in emulator.counts):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the operator did not start watching within 60 s; see {args.out}/operator.log")
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        await self._call(
            server,
            "POST",
            f"/api/v1/namespaces/{NS}/secrets",
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "pg-credentials", "namespace": NS, "uid": str(uuid.uuid4())},
                "data": {"password": "eA=="},
            },
            "application/json",
        )
        base_requests, base_counts = emulator.total, Counter(emulator.counts)
        op_cpu0, me_cpu0 = _cpu(op), _cpu(me)

        async def create(i: int, name: str) -> None:
            spec = listener_spec(pg.port, dbname, slot=f"slot_{i:03d}", tables={"public.items": ["insert"]})
            body = {
                "apiVersion": f"{API_GROUP}/{API_VERSION}",
                "kind": KIND,
                "metadata": {
                    "name": name,
                    "namespace": NS,
                    "uid": str(uuid.uuid4()),
                    "resourceVersion": "1",
                    "generation": 1,
                    "creationTimestamp": _now(),
                },
                "spec": spec,
            }
            await self._call(
                server, "POST", f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{NS}/{PLURAL}", body, "application/json"
            )

        t0 = self.t0 = time.monotonic()
        await asyncio.gather(*(create(i, name) for i, name in enumerate(self.names)))
        applied_s = time.monotonic() - t0
        deadline = t0 + args.timeout
        while len(self.ready_at) < self.n and time.monotonic() < deadline:
            for name in self.names:
                if name not in self.ready_at and self._ready(emulator, name, time.monotonic() - t0):
                    self.ready_at[name] = time.monotonic() - t0
            if proc_dead(op):
                raise RuntimeError(f"the operator exited; see {args.out}/operator.log")
            await asyncio.sleep(0.2)
        all_ready_s = time.monotonic() - t0
        op_cpu = _cpu(op) - op_cpu0
        me_cpu = _cpu(me) - me_cpu0
        requests = emulator.total - base_requests
        by_kind = Counter(emulator.counts)
        by_kind.subtract(base_counts)
        rss_ready = _rss_peak(op)
        pg_conns = pg.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'wal-listener-operator'")[
            0
        ][0]

        # idle: everything Ready, nothing changes
        idle: dict[str, Any] = {}
        if args.idle > 0:
            i_req0, i_cpu0, i_me0, i_t0 = emulator.total, _cpu(op), _cpu(me), time.monotonic()
            i_counts0 = Counter(emulator.counts)
            max_conns = 0
            end = i_t0 + args.idle
            while time.monotonic() < end:
                await asyncio.sleep(min(1.0, max(0.0, end - time.monotonic())))
                rows = pg.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'wal-listener-operator'"
                )
                max_conns = max(max_conns, int(rows[0][0]))
            wall = time.monotonic() - i_t0
            i_counts = Counter(emulator.counts)
            i_counts.subtract(i_counts0)
            idle = {
                "seconds": round(wall, 1),
                "operator_cpu_pct": round(100 * (_cpu(op) - i_cpu0) / wall, 2),
                "requests_per_s": round((emulator.total - i_req0) / wall, 2),
                "kmock_and_bench_cpu_pct": round(100 * (_cpu(me) - i_me0) / wall, 2),
                "pg_connections_max": max_conns,
                "requests_by_kind": {k: v for k, v in sorted(i_counts.items()) if v},
            }
        times = sorted(self.ready_at.values())
        median = statistics.median(times) if times else None
        late = median + STRAGGLER_S if median is not None else float("inf")
        stragglers = {n: round(t, 1) for n, t in self.ready_at.items() if t > late}
        order = sorted(self.ready_at, key=lambda n: self.ready_at[n])
        return {
            "resources": self.n,
            "kmock": "as is" if args.kmock_as_is else "request log trimmed, resourceVersion stamped",
            "operator": args.operator_path or "installed",
            "ready_trail_of_last_three": {n: self.trail.get(n, []) for n in order[-3:]},
            "ready_trail_of_not_ready": {n: self.trail.get(n, []) for n in self.names if n not in self.ready_at},
            "applied_s": round(applied_s, 2),
            "ready": len(times),
            "not_ready": [n for n in self.names if n not in self.ready_at],
            "ready_s": {n: round(t, 1) for n, t in sorted(self.ready_at.items(), key=lambda kv: kv[1])},
            "first_ready_s": round(times[0], 1) if times else None,
            "median_ready_s": round(median, 1) if median is not None else None,
            "last_ready_s": round(times[-1], 1) if times else None,
            "all_ready_wall_s": round(all_ready_s, 1),
            "stragglers": stragglers,
            "operator_cpu_s": round(op_cpu, 2),
            "operator_cpu_ms_per_resource": round(1000 * op_cpu / self.n, 1),
            "requests": requests,
            "requests_per_resource": round(requests / self.n, 1),
            "requests_by_kind": {k: v for k, v in sorted(by_kind.items()) if v},
            "operator_rss_peak_mb": round(rss_ready / 2**20, 1),
            "pg_connections_at_ready": pg_conns,
            "kmock_and_bench_cpu_s": round(me_cpu, 2),
            "deployment_status_writes_by_bench": self.status_writes,
            "idle": idle,
        }


def proc_dead(proc: psutil.Process) -> bool:
    try:
        return bool(proc.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def report(result: dict[str, Any]) -> str:
    r = result
    lines = [
        f"operator bench: {r['resources']} WalListeners applied at once (creates took {r['applied_s']} s); "
        f"kmock: {r['kmock']}; operator: {r['operator']}",
        "  kmock has no Deployment controller: the bench marks each listener Deployment available "
        "(status.availableReplicas=1 via the API) as soon as it sees it",
        f"  Ready: {r['ready']}/{r['resources']}; first {r['first_ready_s']} s, median {r['median_ready_s']} s, "
        f"last {r['last_ready_s']} s after the apply",
        f"  stragglers (> median + {STRAGGLER_S:.0f} s): {r['stragglers'] or 'none'}",
    ]
    for name, trail in {**r["ready_trail_of_last_three"], **r["ready_trail_of_not_ready"]}.items():
        lines.append(f"    {name}: " + " -> ".join(f"{reason} at {t} s" for t, reason in trail))
    if r["not_ready"]:
        lines.append(f"  NOT Ready within the timeout: {', '.join(r['not_ready'])}")
    lines += [
        f"  operator CPU until all Ready: {r['operator_cpu_s']} s = {r['operator_cpu_ms_per_resource']} ms "
        "per resource",
        f"  API requests until all Ready: {r['requests']} = {r['requests_per_resource']} per resource",
        "    " + ", ".join(f"{k}: {v}" for k, v in r["requests_by_kind"].items()),
        f"  operator peak RSS {r['operator_rss_peak_mb']} MB; PostgreSQL connections held at Ready: "
        f"{r['pg_connections_at_ready']}",
        f"  kmock + bench CPU meanwhile: {r['kmock_and_bench_cpu_s']} s",
    ]
    idle = r.get("idle") or {}
    if idle:
        lines += [
            f"  idle over {idle['seconds']} s: operator {idle['operator_cpu_pct']}% of a core, "
            f"{idle['requests_per_s']} requests/s, kmock + bench {idle['kmock_and_bench_cpu_pct']}%, "
            f"PostgreSQL connections max {idle['pg_connections_max']}",
            "    " + ", ".join(f"{k}: {v}" for k, v in idle["requests_by_kind"].items()),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.operator", description=__doc__.split("\n")[0])
    parser.add_argument("--resources", type=int, default=30, help="WalListeners applied at once")
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of idle measurement once all are Ready")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up waiting for Ready after this long")
    parser.add_argument(
        "--kmock-as-is",
        action="store_true",
        help="kmock as the tests run it: its whole request log kept (its cost per request grows with every "
        "request served) and no resourceVersion (kopf may run a create handler twice)",
    )
    parser.add_argument(
        "--operator-path",
        help="run the wal_operator package found in this folder instead of the installed one (to compare two "
        "versions in one sitting, e.g. `git archive main operator | tar -x -C /tmp/base` then /tmp/base/operator)",
    )
    parser.add_argument("--verbose", action="store_true", help="the operator logs at DEBUG (slower)")
    parser.add_argument("--out", default="bench/results/operator", help="results.json and operator.log go here")
    args = parser.parse_args(argv)
    result = asyncio.run(Bench(args).run())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(report(result))
    print(f"  details: {out / 'results.json'}, operator log: {out / 'operator.log'}")
    return 0 if not result["not_ready"] else 1


if __name__ == "__main__":
    sys.exit(main())
