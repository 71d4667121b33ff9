"""A real Patroni-managed PostgreSQL cluster for failover tests: one etcd (v3 API) and Patroni nodes
(two by default), all on 127.0.0.1 with throwaway directories and ports from :func:`free_port`.

Uses the Debian packages ``patroni`` (3.0) and ``etcd-server`` (3.4) and the machine's PostgreSQL
(``find_pg_bin("system")``, 15 here). A missing program raises :class:`ServiceUnavailable`.

::

    with PatroniCluster(slots={"ha_slot": logical_slot("app")}) as cluster:
        cluster.execute("CREATE TABLE t (id int PRIMARY KEY)", dbname="app")
        old = cluster.kill_leader()              # SIGKILL of its Patroni and its PostgreSQL
        new = cluster.wait_leader(other_than=old)
        psycopg.connect(cluster.dsn("app"))      # multi-host, target_session_attrs=read-write

What the cluster is configured with (the settings a user needs for a logical slot to survive a
failover are the ``slots`` / ``use_slots`` / ``hot_standby_feedback`` / ``wal_level`` ones):

- ``slots``: *permanent* logical slots in the DCS configuration. Patroni creates them on the leader
  once their database exists, publishes their ``confirmed_flush_lsn`` in the DCS every HA loop, copies
  them to the replicas (reading the slot's state file on the leader with ``pg_read_binary_file`` and
  restarting the replica's PostgreSQL) and advances the copies with ``pg_replication_slot_advance``.
  A copy is only as recent as the last value Patroni published (``loop_wait``): after a failover the
  consumer may get again what it confirmed in the last second or so. A logical slot that is *not*
  declared permanent is dropped by Patroni as an "unknown replication slot" the next time it reloads
  the slot list (after a PostgreSQL restart, a role change, ...) if nothing is connected to it
  (``ignore_slots`` only stops the dropping; such a slot is never copied and is lost on failover);
- ``use_slots: true`` (a physical slot per replica) with ``hot_standby_feedback: on``: the replica's
  ``catalog_xmin`` then holds back the vacuuming of the catalog rows its copy of the logical slot needs
  (Patroni forces ``hot_standby_feedback`` on replicas that hold permanent logical slots anyway);
- ``wal_level: logical``, ``max_replication_slots`` / ``max_wal_senders`` with room for the listener;
- ``ttl: 10``, ``loop_wait: 1``, ``retry_timeout: 4`` (``ttl >= loop_wait + 2 * retry_timeout``):
  the leader key expires at most ``ttl`` seconds after the leader died, so a failover takes ~10 s;
- for speed only: ``basebackup: checkpoint=fast`` (else a replica's pg_basebackup waits minutes for a
  spread checkpoint of the idle leader), ``wal_receiver_status_interval`` and
  ``wal_retrieve_retry_interval`` of 1 s, ``fsync: off``;
- trust authentication on 127.0.0.1 (and the unix socket) for ``postgres`` and the replication user.

When this process is root, Patroni (and so its PostgreSQL, which refuses root) runs as ``postgres``
in directories that user owns.

Each node logs (Patroni and its PostgreSQL) into ``<node dir>/patroni.log``, etcd into
``<etcd dir>/etcd.log``; :meth:`PatroniCluster.logs` gives their tails for failure messages.

No pytest here; the fixture is ``make_patroni`` in :mod:`tests.support.fixtures`.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Self, TypeVar

import psycopg
import yaml
from psycopg import sql
from psycopg.conninfo import make_conninfo

from listener import throwaway
from listener.throwaway import LOCALHOST, ServiceUnavailable, ThrowawayError, clean_env, free_port
from tests.support.services import Controllable, StartedGroup, find_pg_bin

__all__ = [
    "EtcdServer",
    "PatroniCluster",
    "PatroniNode",
    "find_etcd",
    "find_patroni",
    "logical_slot",
]

_T = TypeVar("_T")

INSTALL_HINT = "apt-get install patroni etcd-server"


def find_patroni() -> Path:
    """The ``patroni`` program (Debian package ``patroni``)."""
    found = shutil.which("patroni")
    if found is None:
        raise ServiceUnavailable(f"Patroni is not installed: {INSTALL_HINT}")
    return Path(found)


def find_etcd() -> Path:
    """The ``etcd`` server program (Debian package ``etcd-server``)."""
    found = shutil.which("etcd")
    if found is None:
        raise ServiceUnavailable(f"etcd is not installed: {INSTALL_HINT}")
    return Path(found)


def logical_slot(database: str, plugin: str = "pgoutput") -> dict[str, str]:
    """A permanent logical slot's entry in the DCS ``slots`` configuration."""
    return {"type": "logical", "database": database, "plugin": plugin}


def _http(port: int, method: str, path: str, body: Any = None, timeout: float = 5.0) -> tuple[int, Any]:
    """One HTTP request to 127.0.0.1:port; returns (status, the JSON body or its text)."""
    conn = http.client.HTTPConnection(LOCALHOST, port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        text = resp.read().decode("utf-8", "replace")
    finally:
        conn.close()
    try:
        return resp.status, json.loads(text)
    except ValueError:
        return resp.status, text


def _wait_for(check: Callable[[], _T | None], timeout: float, what: str, logs: Callable[[], str]) -> _T:
    """Poll ``check`` until it returns something other than None (exceptions count as "not yet")."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            result = check()
            if result is not None:
                return result
        except Exception as e:
            last = e
        if time.monotonic() > deadline:
            extra = f" (last error: {last!r})" if last is not None else ""
            raise ThrowawayError(f"timed out after {timeout:.0f}s waiting for {what}{extra}\n{logs()}")
        time.sleep(0.1)


# --------------------------------------------------------------------------------------------------
# processes outside the server's own process group (Patroni starts PostgreSQL in a new session)


def _proc_stat(pid: int) -> list[str] | None:
    """The fields after ``pid (comm)`` in /proc/PID/stat: state, ppid, pgrp, ..."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _proc_stat(int(entry.name))
            if fields and len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
                found.append(int(entry.name))
    return found


# --------------------------------------------------------------------------------------------------
# etcd


class EtcdServer(Controllable):
    """A single-member etcd (v3 API, v2 off) on 127.0.0.1 with its data in a throwaway directory."""

    name = "etcd"
    start_timeout = 30.0

    def __init__(
        self,
        port: int | None = None,
        *,
        peer_port: int | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        binary: str | os.PathLike[str] | None = None,
    ) -> None:
        self.binary = Path(binary) if binary is not None else find_etcd()
        self.peer_port = peer_port if peer_port is not None else free_port()
        super().__init__("wal-throwaway-etcd-", base_dir, port)

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT``, what Patroni's ``etcd3.hosts`` takes."""
        return f"{LOCALHOST}:{self._port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def _ports(self) -> list[int]:
        return [self._port, self.peer_port]

    def _command(self) -> list[str]:
        peer = f"http://{LOCALHOST}:{self.peer_port}"
        return [
            str(self.binary),
            "--name", "wal-throwaway",
            "--data-dir", str(self.dir / "data"),
            "--listen-client-urls", self.url,
            "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"wal-throwaway={peer}",
            "--initial-cluster-state", "new",
            "--initial-cluster-token", f"wal-throwaway-{self.dir.name}",
            "--enable-v2=false",
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]  # fmt: skip

    def _popen_kwargs(self) -> dict[str, Any]:
        return {"env": clean_env(drop_prefixes=("ETCD",))}

    def _probe(self) -> None:
        status, body = _http(self._port, "GET", "/health", timeout=2)
        if status != 200 or not isinstance(body, dict) or body.get("health") != "true":
            raise ThrowawayError(f"etcd /health: {status} {body!r}")
        key = base64.b64encode(b"wal-throwaway-probe").decode()
        status, body = _http(self._port, "POST", "/v3/kv/range", {"key": key}, timeout=2)
        if status != 200:
            raise ThrowawayError(f"etcd v3 range: {status} {body!r}")


# --------------------------------------------------------------------------------------------------
# a Patroni node


def _postgres_user() -> pwd.struct_passwd | None:
    """The account Patroni and PostgreSQL run as: ``postgres`` when this process is root, else None."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise ServiceUnavailable(
            "running as root and there is no 'postgres' user: apt-get install postgresql"
        ) from None


class PatroniNode(throwaway.Server):
    """One Patroni process managing one PostgreSQL (its data in ``<dir>/data``).

    ``port`` is PostgreSQL's, ``api_port`` Patroni's REST API. ``start()`` returns once Patroni reports
    PostgreSQL running (a new leader bootstraps with initdb, a replica clones the leader with
    pg_basebackup). ``kill()`` SIGKILLs Patroni *and* its PostgreSQL, which Patroni starts in a session of
    its own. Built by :class:`PatroniCluster`, which gives the shared part of the configuration.
    """

    name = "patroni"
    start_timeout = 90.0
    stop_timeout = 60.0

    def __init__(
        self,
        node_name: str,
        shared_config: Mapping[str, Any],
        *,
        pg_bin: Path,
        patroni_bin: Path,
        parameters: Mapping[str, Any] | None = None,
        port: int | None = None,
        api_port: int | None = None,
        base_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.node_name = node_name
        self.pg_bin = pg_bin
        self.patroni_bin = patroni_bin
        self.api_port = api_port if api_port is not None else free_port()
        self._shared = dict(shared_config)
        self._parameters = dict(parameters or {})
        self._account = _postgres_user()
        super().__init__(f"wal-throwaway-patroni-{node_name}-", base_dir, port)
        if self._account is not None:
            os.chown(self.dir, self._account.pw_uid, self._account.pw_gid)
            for parent in self.dir.parents:  # let postgres walk down to its directory
                with contextlib.suppress(OSError):
                    mode = stat.S_IMODE(parent.stat().st_mode)
                    if not mode & stat.S_IXOTH:
                        parent.chmod(mode | stat.S_IXOTH)

    # -- identity

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def config_path(self) -> Path:
        return self.dir / "patroni.yml"

    @property
    def api_url(self) -> str:
        return f"http://{LOCALHOST}:{self.api_port}"

    @property
    def user(self) -> str:
        return "postgres"

    def dsn(self, dbname: str = "postgres", **kw: str | int) -> str:
        """libpq conninfo for this node only."""
        params: dict[str, str | int] = {
            "host": LOCALHOST,
            "port": self.port,
            "user": self.user,
            "dbname": dbname,
            "sslmode": "disable",
        }
        params.update(kw)
        return make_conninfo("", **params)

    def execute(
        self, query: str, params: tuple[Any, ...] | None = None, *, dbname: str = "postgres"
    ) -> list[tuple[Any, ...]]:
        """Run one statement on this node in autocommit mode; returns its rows (``[]`` when none)."""
        with psycopg.connect(self.dsn(dbname, connect_timeout=3), autocommit=True) as conn:
            cur = conn.execute(query.encode(), params)
            return list(cur.fetchall()) if cur.description is not None else []

    # -- what Patroni says

    def status(self) -> dict[str, Any] | None:
        """Patroni's ``GET /patroni`` (``state``, ``role``, ``timeline``, ...), or None when it does not answer."""
        if not self.running:
            return None
        try:
            code, body = _http(self.api_port, "GET", "/patroni", timeout=2)
        except OSError:
            return None
        return body if code == 200 and isinstance(body, dict) else None

    def role(self) -> str | None:
        """``"leader"``, ``"replica"``, or None (not running, not answering, no PostgreSQL yet)."""
        st = self.status()
        if st is None or st.get("state") != "running":
            return None
        role = st.get("role")
        return "leader" if role in ("master", "primary") else str(role) if role else None

    def in_recovery(self) -> bool:
        row = self.execute("SELECT pg_is_in_recovery()")
        return bool(row[0][0])

    def slot(self, name: str) -> dict[str, Any] | None:
        """The row of ``pg_replication_slots`` for ``name`` on this node, or None."""
        rows = self.execute(
            "SELECT slot_name, slot_type, plugin, database, active, restart_lsn::text,"
            " confirmed_flush_lsn::text, catalog_xmin::text, wal_status"
            " FROM pg_replication_slots WHERE slot_name = %s",
            (name,),
        )
        if not rows:
            return None
        keys = (
            "slot_name", "slot_type", "plugin", "database", "active", "restart_lsn",
            "confirmed_flush_lsn", "catalog_xmin", "wal_status",
        )  # fmt: skip
        return dict(zip(keys, rows[0], strict=True))

    # -- process

    def _config(self) -> dict[str, Any]:
        socket_dir = str(self.dir)
        return {
            **self._shared,
            "name": self.node_name,
            "restapi": {
                "listen": f"{LOCALHOST}:{self.api_port}",
                "connect_address": f"{LOCALHOST}:{self.api_port}",
            },
            "postgresql": {
                "listen": f"{LOCALHOST}:{self.port}",
                "connect_address": f"{LOCALHOST}:{self.port}",
                "data_dir": str(self.data_dir),
                "bin_dir": str(self.pg_bin),
                "pgpass": str(self.dir / "pgpass"),
                # pg_basebackup's default "spread" checkpoint takes minutes on an idle leader
                "basebackup": [{"checkpoint": "fast"}],
                "authentication": {
                    "superuser": {"username": "postgres"},
                    "replication": {"username": "replicator"},
                    "rewind": {"username": "postgres"},
                },
                "pg_hba": [
                    "local all all trust",
                    "local replication all trust",
                    f"host all all {LOCALHOST}/32 trust",
                    f"host replication all {LOCALHOST}/32 trust",
                ],
                "parameters": {
                    "unix_socket_directories": socket_dir,
                    "logging_collector": "off",
                    "log_destination": "stderr",
                    "log_line_prefix": f"%m [%p] pg-{self.node_name} %q%u@%d ",
                    **self._parameters,
                },
            },
        }

    def _env(self) -> dict[str, str]:
        env = clean_env(drop_prefixes=("PG", "PATRONI", "ETCD"))
        env["LC_ALL"] = "C.UTF-8"
        env["PYTHONUNBUFFERED"] = "1"
        if self._account is not None:
            env["HOME"] = str(self.dir)
            env["USER"] = env["LOGNAME"] = self._account.pw_name
        return env

    def _prepare(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self._config(), sort_keys=False))
        if self._account is not None:
            os.chown(self.config_path, self._account.pw_uid, self._account.pw_gid)

    def _command(self) -> list[str]:
        return [str(self.patroni_bin), str(self.config_path)]

    def _popen_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"env": self._env()}
        if self._account is not None:
            kw.update(user=self._account.pw_uid, group=self._account.pw_gid, extra_groups=[])
        return kw

    def _ports(self) -> list[int]:
        return [self.port, self.api_port]

    def _probe(self) -> None:
        code, body = _http(self.api_port, "GET", "/patroni", timeout=2)
        if code != 200 or not isinstance(body, dict):
            raise ThrowawayError(f"GET /patroni: {code} {body!r}")
        scope = (body.get("patroni") or {}).get("scope")
        if scope != self._shared["scope"]:
            raise ThrowawayError(f"port {self.api_port} is another Patroni (scope {scope!r})")
        if body.get("state") != "running":
            raise ThrowawayError(f"PostgreSQL is {body.get('state')!r}")

    def _postmaster_group(self) -> int | None:
        """The process group of this node's postmaster (checked to run in our data directory)."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        except (OSError, ValueError, IndexError):
            return None
        fields = _proc_stat(pid)
        if fields is None or fields[0] in ("Z", "X") or cwd.resolve() != self.data_dir.resolve():
            return None
        pgid = int(fields[2])
        return pgid if pgid not in (0, 1, os.getpgrp()) else None

    def _kill_postgres(self, sig: int = signal.SIGKILL, wait: float = 10.0) -> None:
        pgid = self._postmaster_group()
        if pgid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait
        while _group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if _group_members(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL Patroni and its PostgreSQL (a machine crash, as far as the cluster can tell)."""
        pgid = self._postmaster_group()
        proc = self._proc
        # Both at once, before any waiting: PostgreSQL must not see Patroni go, nor get a gentler signal.
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        if pgid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        super().kill()
        self._kill_postgres()

    def _forget(self, proc: subprocess.Popen[bytes]) -> None:
        super()._forget(proc)
        # Patroni stops its PostgreSQL on SIGTERM; if it could not, do not leave the postmaster behind.
        self._kill_postgres(signal.SIGQUIT, wait=5)

    def _emergency_stop(self) -> None:
        super()._emergency_stop()
        self._kill_postgres(signal.SIGKILL, wait=5)

    def _after_stop_cleanup(self) -> None:
        # A killed postmaster leaves its System V shared memory segment (key and id on line 7 of
        # postmaster.pid); the next start would remove it, but there is none after cleanup.
        ipcrm = shutil.which("ipcrm")
        if self.running or ipcrm is None:
            return
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return
        if len(lines) >= 7 and len(parts := lines[6].split()) == 2 and parts[1].isdigit():
            subprocess.run([ipcrm, "-m", parts[1]], capture_output=True, check=False)

    def __repr__(self) -> str:
        return f"<PatroniNode {self.node_name} {self.state} pg={self.port} api={self.api_port}>"


# --------------------------------------------------------------------------------------------------
# the cluster


class PatroniCluster(StartedGroup):
    """etcd and ``nodes`` Patroni nodes (two by default) forming one cluster named ``scope``.

    ``slots``: permanent replication slots, e.g. ``{"ha_slot": logical_slot("app")}``; their databases
    (and ``databases``) are created on the leader once the replicas stream. ``parameters`` adds to or
    overrides the PostgreSQL settings of the DCS configuration; ``dcs`` to the rest of it (``ttl``,
    ``maximum_lag_on_failover``, ...).

    ``start()`` (or ``with``) returns once there is a leader and a streaming replica, and the permanent
    slots are on every node, safe to use after a failover (:meth:`wait_slots`). ``node0`` is the first
    leader.
    """

    DEFAULT_PARAMETERS: Mapping[str, Any] = {
        "wal_level": "logical",
        "hot_standby": "on",
        "hot_standby_feedback": "on",
        "max_replication_slots": 20,
        "max_wal_senders": 20,
        "wal_keep_size": "256MB",
        "wal_log_hints": "on",  # pg_rewind, for an old leader rejoining
        "wal_receiver_status_interval": "1s",  # hot_standby_feedback reaches the leader within a second
        "wal_retrieve_retry_interval": "1s",  # a replica retries streaming every second, not every 5
        "max_connections": 100,
        "fsync": "off",  # a process crash loses nothing; only an OS crash would
        "timezone": "UTC",
    }

    def __init__(
        self,
        *,
        slots: Mapping[str, Mapping[str, Any]] | None = None,
        databases: Iterable[str] = (),
        nodes: int = 2,
        ttl: int = 10,
        loop_wait: int = 1,
        retry_timeout: int = 4,
        parameters: Mapping[str, Any] | None = None,
        dcs: Mapping[str, Any] | None = None,
        pg_bin: str | os.PathLike[str] | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        scope: str | None = None,
    ) -> None:
        if nodes < 2:
            raise ValueError("a failover needs at least two nodes")
        patroni_bin = find_patroni()
        find_etcd()
        self.pg_bin = Path(pg_bin) if pg_bin is not None else find_pg_bin("system")
        for program in ("initdb", "pg_ctl", "pg_basebackup", "pg_rewind", "postgres"):
            if not (self.pg_bin / program).is_file():
                raise ServiceUnavailable(f"{self.pg_bin / program} does not exist: apt-get install postgresql")
        self.scope = scope or f"wal-{uuid.uuid4().hex[:8]}"
        self.slots = {name: dict(value) for name, value in (slots or {}).items()}
        wanted = [*databases, *(v["database"] for v in self.slots.values() if v.get("type") == "logical")]
        self.databases = list(dict.fromkeys(wanted))
        self._cleaned = False
        self.etcd = EtcdServer(base_dir=base_dir)
        self.dcs_config: dict[str, Any] = {
            "ttl": ttl,
            "loop_wait": loop_wait,
            "retry_timeout": retry_timeout,
            "maximum_lag_on_failover": 16 * 1024 * 1024,
            "postgresql": {
                "use_slots": True,
                "use_pg_rewind": True,
                "parameters": {**self.DEFAULT_PARAMETERS, **(parameters or {})},
            },
            "slots": self.slots,
            **(dcs or {}),
        }
        shared = {
            "scope": self.scope,
            "namespace": "/wal-throwaway/",
            "log": {"level": "INFO", "format": "%(asctime)s %(levelname)s: %(message)s"},
            "etcd3": {"hosts": [self.etcd.endpoint], "protocol": "http"},
            "bootstrap": {
                "dcs": self.dcs_config,
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, "data-checksums"],
            },
        }
        self.nodes: list[PatroniNode] = []
        try:
            for i in range(nodes):
                self.nodes.append(
                    PatroniNode(f"node{i}", shared, pg_bin=self.pg_bin, patroni_bin=patroni_bin, base_dir=base_dir)
                )
        except BaseException:
            self.cleanup()
            raise
        self.started_in: float | None = None  #: seconds the last start() took

    # -- lifecycle

    def start(self) -> Self:
        """Start etcd, bootstrap the first node, start the other nodes (they clone the leader), create
        the databases the slots need, and wait until the permanent slots exist on every node and are safe
        to use after a failover (:meth:`wait_slots`)."""
        if self._cleaned:
            raise ThrowawayError("PatroniCluster: start() after cleanup()")
        t0 = time.monotonic()
        try:
            self.etcd.start()
            first, *others = self.nodes
            first.start()
            self.wait_leader(timeout=60)
            for node in others:
                node.start()
            self.wait_ready(timeout=60)
            # Only now: Patroni creates the slots once their database exists, and a slot created before
            # a replica's pg_basebackup would start in WAL the replica never had (see wait_slots).
            for name in self.databases:
                self.create_database(name)
            self.wait_slots(timeout=60)
        except BaseException:
            self.kill()
            raise
        self.started_in = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Stop the nodes (replicas first, so the leader does not fail over) and etcd. Keeps the data."""
        errors: list[BaseException] = []
        for node in sorted(self.nodes, key=lambda n: n.role() == "leader"):
            try:
                node.stop()
            except Exception as e:
                errors.append(e)
        self.etcd.stop()
        if errors:
            raise errors[0]

    def kill(self) -> None:
        """SIGKILL everything (keeps the directories and logs)."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.kill()
        with contextlib.suppress(Exception):
            self.etcd.kill()

    def cleanup(self) -> None:
        """Stop everything and delete the directories. The cluster cannot be started again."""
        try:
            with contextlib.suppress(Exception):
                self.stop()
        finally:
            for node in self.nodes:
                node.cleanup()
            self.etcd.cleanup()
            self._cleaned = True

    # -- who is who

    def _leader_now(self, other_than: PatroniNode | None = None) -> PatroniNode | None:
        for node in self.nodes:
            if node is other_than or node.role() != "leader":
                continue
            with contextlib.suppress(psycopg.Error):
                if not node.in_recovery():
                    return node
        return None

    def leader(self) -> PatroniNode:
        """The node Patroni calls the leader and whose PostgreSQL is out of recovery."""
        node = self._leader_now()
        if node is None:
            raise ThrowawayError(f"no leader: {self.describe()}")
        return node

    def _streaming_replica(self) -> PatroniNode | None:
        for node in self.nodes:
            if node.role() != "replica":
                continue
            with contextlib.suppress(psycopg.Error):
                rows = node.execute("SELECT status FROM pg_stat_wal_receiver")
                if rows and rows[0][0] == "streaming":
                    return node
        return None

    def replica(self) -> PatroniNode:
        """A running replica that streams from the leader."""
        node = self._streaming_replica()
        if node is None:
            raise ThrowawayError(f"no streaming replica: {self.describe()}")
        return node

    def wait_ready(self, timeout: float = 60.0) -> tuple[PatroniNode, PatroniNode]:
        """Wait for a leader and a streaming replica; returns ``(leader, replica)``."""

        def ready() -> tuple[PatroniNode, PatroniNode] | None:
            leader = self._leader_now()
            replica = self._streaming_replica() if leader is not None else None
            return (leader, replica) if leader is not None and replica is not None else None

        return _wait_for(ready, timeout, "a leader and a streaming replica", self.logs)

    def wait_leader(self, other_than: PatroniNode | None = None, timeout: float = 30.0) -> PatroniNode:
        """Wait for a leader (other than ``other_than``) that accepts writes; returns it."""
        what = "a leader" + (f" other than {other_than.node_name}" if other_than is not None else "")
        return _wait_for(lambda: self._leader_now(other_than), timeout, what, self.logs)

    def describe(self) -> str:
        """One line per node: name, ports, Patroni's state and role."""
        lines = []
        for node in self.nodes:
            st = node.status() or {}
            lines.append(
                f"{node.node_name}: pg={node.port} api={node.api_port} {node.state} "
                f"state={st.get('state')} role={st.get('role')} timeline={st.get('timeline')}"
            )
        return "; ".join(lines)

    def logs(self, lines: int = 40) -> str:
        """The tails of every node's log and etcd's, for failure messages."""
        parts = [f"cluster: {self.describe()}"]
        parts += [node.log_tail(lines) for node in self.nodes]
        parts.append(self.etcd.log_tail(lines // 2))
        return "\n".join(parts)

    # -- connecting

    def dsn(self, dbname: str = "postgres", **kw: str | int) -> str:
        """A libpq multi-host conninfo of all nodes with ``target_session_attrs=read-write``: it reaches
        whichever node is the leader."""
        params: dict[str, str | int] = {
            "host": ",".join(LOCALHOST for _ in self.nodes),
            "port": ",".join(str(n.port) for n in self.nodes),
            "dbname": dbname,
            "user": "postgres",
            "target_session_attrs": "read-write",
            "sslmode": "disable",
        }
        params.update(kw)
        return make_conninfo("", **params)

    def hosts_config(self) -> str:
        """``127.0.0.1:P1,127.0.0.1:P2``: the listener's ``database.host`` for this cluster."""
        return ",".join(f"{LOCALHOST}:{n.port}" for n in self.nodes)

    def execute(
        self, query: str, params: tuple[Any, ...] | None = None, *, dbname: str = "postgres"
    ) -> list[tuple[Any, ...]]:
        """Run one statement on the leader (autocommit); returns its rows."""
        return self.leader().execute(query, params, dbname=dbname)

    def create_database(self, name: str) -> str:
        """``CREATE DATABASE name`` on the leader unless it exists; returns the name."""
        leader = self.leader()
        if not leader.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)):
            with psycopg.connect(leader.dsn(connect_timeout=3), autocommit=True) as conn:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name

    # -- slots

    def wait_slot(
        self, name: str, node: PatroniNode | None = None, *, min_lsn: str | None = None, timeout: float = 30.0
    ) -> dict[str, Any]:
        """Wait until slot ``name`` exists on ``node`` (default: the leader) and, with ``min_lsn``, its
        ``confirmed_flush_lsn`` (a physical slot's ``restart_lsn``) reached it; returns its row."""

        def check() -> dict[str, Any] | None:
            target = node if node is not None else self.leader()
            row = target.slot(name)
            if row is None:
                return None
            if min_lsn is not None:
                lsn = row["confirmed_flush_lsn"] or row["restart_lsn"]
                if lsn is None:
                    return None
                reached = target.execute("SELECT %s::pg_lsn >= %s::pg_lsn", (lsn, min_lsn))[0][0]
                if not reached:
                    return None
            return row

        where = node.node_name if node is not None else "the leader"
        what = f"slot {name} on {where}" + (f" at {min_lsn} or later" if min_lsn else "")
        return _wait_for(check, timeout, what, self.logs)

    def slots_safe(self, replica: PatroniNode) -> bool:
        """Whether ``replica``'s copies of the permanent logical slots are safe to use once it is promoted:

        - PostgreSQL: the catalog_xmin that the replica's hot_standby_feedback holds on the leader (on the
          replica's physical slot) is set and not newer than any copy's catalog_xmin, so the leader keeps
          the catalog rows the copies need;
        - Patroni: since it last started the replica's PostgreSQL (which it does to copy a slot), it logged
          "Logical slot NAME is safe to be used after a failover" for every slot. Until then, a promotion
          logs "Logical replication slots that might be unsafe to use after promote".
        """
        logical = [name for name, value in self.slots.items() if value.get("type") == "logical"]
        if not logical:
            return True
        physical = self.leader().slot(replica.node_name)  # Patroni names a member's physical slot after it
        if physical is None or physical["catalog_xmin"] is None:
            return False
        held = int(physical["catalog_xmin"])
        for name in logical:
            copy = replica.slot(name)
            if copy is None or copy["catalog_xmin"] is None or held > int(copy["catalog_xmin"]):
                return False
        text = replica.log_path.read_text(errors="replace")
        since_start = text[max(0, text.rfind("INFO: postmaster pid=")) :]
        return all(f"Logical slot {name} is safe to be used after a failover" in since_start for name in logical)

    def wait_slots(self, timeout: float = 60.0) -> None:
        """Wait until every permanent slot exists on the leader and on every replica, a replica streams
        again (Patroni restarts a replica's PostgreSQL to copy the slots to it), and the copies are safe
        to use after a promotion (:meth:`slots_safe`). Call it again before crashing the leader.

        Patroni copies a slot again (one more restart of the replica's PostgreSQL) whenever advancing the
        replica's copy fails, e.g. with "requested WAL segment ... has already been removed" when the
        slot's restart_lsn is older than the replica's first WAL (a slot created before the replica's
        pg_basebackup and not consumed since): the copy is then unready again for a moment."""
        leader, _ = self.wait_ready(timeout)
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(1.0, deadline - time.monotonic())

        replicas = [n for n in self.nodes if n is not leader and n.running]
        for name in self.slots:
            self.wait_slot(name, leader, timeout=left())
            for node in replicas:
                self.wait_slot(name, node, timeout=left())
        self.wait_ready(left())
        for node in replicas:
            _wait_for(
                lambda node=node: self.slots_safe(node) or None, left(), f"safe slots on {node.node_name}", self.logs
            )

    def wait_replayed(self, replica: PatroniNode | None = None, timeout: float = 30.0) -> str:
        """Wait until ``replica`` (default: every streaming replica) replayed the leader's current WAL
        position; returns that position."""
        lsn = str(self.execute("SELECT pg_current_wal_lsn()::text")[0][0])
        targets = [replica] if replica is not None else [n for n in self.nodes if n.role() == "replica"]
        for target in targets:

            def replayed(target: PatroniNode = target) -> bool | None:
                row = target.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,))
                return True if row and row[0][0] else None

            _wait_for(replayed, timeout, f"{target.node_name} to replay {lsn}", self.logs)
        return lsn

    # -- failures

    def failover(self, to: PatroniNode | None = None, timeout: float = 60.0) -> PatroniNode:
        """A planned switchover through Patroni's REST API (``POST /switchover``) from the leader to
        ``to`` (default: a streaming replica); returns the new leader once it accepts writes. The old
        leader rejoins as a replica by itself (:meth:`wait_ready` waits for it)."""
        leader = self.leader()
        target = to if to is not None else self.replica()
        if target is leader:
            raise ValueError(f"{target.node_name} is already the leader")
        code, body = _http(
            leader.api_port,
            "POST",
            "/switchover",
            {"leader": leader.node_name, "candidate": target.node_name},
            timeout=timeout,
        )
        if code != 200:
            raise ThrowawayError(f"switchover {leader.node_name} -> {target.node_name}: {code} {body!r}\n{self.logs()}")
        new = self.wait_leader(other_than=leader, timeout=timeout)
        if new is not target:
            raise ThrowawayError(f"switched over to {new.node_name}, not {target.node_name}")
        return new

    def kill_leader(self) -> PatroniNode:
        """SIGKILL the leader's Patroni and PostgreSQL; returns that node. A replica takes over once the
        leader key expires in etcd (``ttl``). ``node.start()`` brings the node back (as a replica)."""
        leader = self.leader()
        leader.kill()
        return leader

    def __repr__(self) -> str:
        return f"<PatroniCluster {self.scope} {self.describe()}>"
