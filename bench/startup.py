"""The listener's start-up alone: CPU seconds from exec until its slot is active (streaming), A/B.

Starts a throwaway PostgreSQL and nats-server (the test suite's fixtures), then starts
``python -m listener.cli --config FILE`` with the bench's reference NATS configuration on a fresh slot,
reads the process's CPU seconds the moment the slot becomes active (as bench.run's ``startup`` does),
and kills it. With ``--other DIR`` the listener of another checkout runs too, alternating with this one,
so both are measured in the same sitting; the medians are printed. ``--callgrind`` runs each listener
under valgrind instead and prints its instructions until that moment (``callgrind_control --dump``),
the stable figure on a shared machine (slow: about half a minute per start).

    .venv/bin/python -m bench.startup --runs 7 --other /path/to/main-checkout
    .venv/bin/python -m bench.startup --runs 1 --callgrind --other /path/to/main-checkout
"""

from __future__ import annotations

import argparse
import compileall
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import psycopg
import yaml

from bench import workload as wl
from bench.measure import REPO, create_slot, drop_slot
from tests.support.services import NatsServer, PostgresServer, find_pg_bin, free_port

DBNAME = "bench"


def _config(pg: PostgresServer, nats: NatsServer, slot: str) -> dict[str, Any]:
    return {
        "listener": {"slotName": slot, "serverPort": 0},
        "database": {"host": "127.0.0.1", "port": pg.port, "name": DBNAME, "user": "postgres", "sslMode": "disable"},
        "publisher": {"type": "nats", "address": nats.address, "topic": slot},
        "logger": {"level": "info", "fmt": "json"},
        "monitoring": {"promAddr": f"127.0.0.1:{free_port()}"},
    }


def one_start(source: Path, dsn: str, config: Path, slot: str, callgrind: Path | None) -> float:
    """CPU seconds (or, under callgrind, instructions) of one listener start until its slot is active."""
    command = [sys.executable, "-m", "listener.cli", "--config", str(config)]
    if callgrind is not None:
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={callgrind}", *command]
    proc = subprocess.Popen(command, cwd=source, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    ps = psutil.Process(proc.pid)
    deadline = time.monotonic() + (600 if callgrind else 60)
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            row = conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
            if row is not None and row[0] is not None:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"the listener of {source} did not stream: {err[-2000:]}")
            time.sleep(0.005)
    if callgrind is not None:
        subprocess.run(["callgrind_control", "--dump", str(proc.pid)], check=True, capture_output=True)
        cpu = 0.0
    else:
        t = ps.cpu_times()
        cpu = t.user + t.system
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    if callgrind is not None:
        total = 0
        for dump in callgrind.parent.glob(callgrind.name + "*"):
            found = re.search(r"^summary: (\d+)", dump.read_text(errors="replace"), re.M)
            total = max(total, int(found.group(1)) if found else 0)
            dump.unlink()
        return float(total)
    return cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="starts per checkout")
    parser.add_argument("--other", type=Path, default=None, help="another checkout, measured alternately")
    parser.add_argument("--callgrind", action="store_true", help="instructions under valgrind instead of CPU s")
    args = parser.parse_args()
    sources = {"this": REPO, **({"other": args.other.resolve()} if args.other else {})}
    for source in sources.values():
        compileall.compile_dir(source / "listener", quiet=1)  # as pip install does
    results: dict[str, list[float]] = {name: [] for name in sources}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pg = PostgresServer(find_pg_bin("system"), base_dir=None)
        pg.start()
        nats = NatsServer(base_dir=work).start()
        try:
            pg.create_database(DBNAME)
            dsn = pg.dsn(DBNAME)
            wl.setup_schema(dsn)
            n = 0
            for _ in range(args.runs):
                for name, source in sources.items():
                    n += 1
                    slot = f"startup_{n}"
                    create_slot(dsn, slot)
                    config = work / f"{slot}.yml"
                    config.write_text(yaml.safe_dump(_config(pg, nats, slot), sort_keys=False))
                    value = one_start(source, dsn, config, slot, work / f"cg.{slot}" if args.callgrind else None)
                    results[name].append(value)
                    shown = f"{value / 1e6:,.0f}M instructions" if args.callgrind else f"{value:.3f} CPU s"
                    print(f"{name:6s} {shown}", flush=True)
                    drop_slot(dsn, slot)
        finally:
            nats.cleanup()
            pg.cleanup()
    for name, values in results.items():
        med = statistics.median(values)
        shown = f"{med / 1e6:,.0f}M instructions" if args.callgrind else f"{med:.3f} CPU s"
        print(f"median {name} ({sources[name]}): {shown} over {len(values)} starts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
