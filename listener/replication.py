"""Stage 2 — replication: the publication, the slot, the stream and the LSN feedback.

:class:`Database` runs the SQL side over a normal psycopg connection: checks ``wal_level``, makes the
publications (:mod:`listener.publication`) and the pgoutput slot, reads slot health, and looks up
user-defined types. :class:`ReplicationStream` owns a ``replication=database`` connection,
issues ``START_REPLICATION`` and speaks the streaming protocol through psycopg's ``pgconn`` copy-both
calls: XLogData and keepalives in, standby status updates (the confirmed flush LSN) out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from typing import Any

import psycopg
from psycopg import pq

from listener import catalog, hotpath
from listener.catalog import SlotState
from listener.config import Config
from listener.errors import DatabaseError, DatabaseSetupError, SlotInUseError, SlotLostError
from listener.pgoutput import PG_EPOCH, format_lsn
from listener.publication import Publications, publication_dropped
from listener.types import PgType, TypeRegistry

log = logging.getLogger("listener.replication")

# values in the wire form listener.types expects (see its docstring)
SESSION_OPTIONS = (
    "-c DateStyle=ISO -c TimeZone=UTC -c IntervalStyle=iso_8601 -c bytea_output=hex -c extra_float_digits=3"
)

_XLOG_HEADER = struct.Struct(">QQq")  # wal start, wal end, send time
_KEEPALIVE = struct.Struct(">QqB")  # wal end, send time, reply requested
_U64 = struct.Struct(">Q").unpack_from
_STATUS = struct.Struct(">cQQQqB")  # 'r', write, flush, apply, client time, reply requested

_UNIX_TO_PG = (PG_EPOCH.timestamp()) * 1_000_000
#: how long a type named by the stream is looked for before it counts as dropped (see Database.load_types)
TYPE_VISIBLE_WAIT = 1.0


def pg_now() -> int:
    """Microseconds since 2000-01-01 (the protocol's clock)."""
    return int(time.time() * 1_000_000 - _UNIX_TO_PG)


def describe_pg_error(exc: BaseException) -> str:
    """One line for a psycopg error, without the connection string (it may hold a password)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text


def one_line(message: str) -> str:
    """A server error as one line: the message and its DETAIL/HINT, without the ERROR: prefix and the
    multi-line CONTEXT (a walsender error otherwise spans several log lines)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    first = lines[0].removeprefix("ERROR:").removeprefix("FATAL:").strip()
    extra = [line for line in lines[1:] if line.startswith(("DETAIL:", "HINT:"))]
    return "; ".join([first, *extra])


class Database:
    """The SQL side: setup checks, publication, slot, type lookups, slot health."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._conn: psycopg.AsyncConnection[Any] | None = None
        #: whether the last :meth:`ensure_slot` created the slot
        self.slot_created = False
        #: server_version_num, once :meth:`check_server` ran
        self.version = 0
        self.publications = Publications(cfg)

    async def connect(self) -> None:
        try:
            self._conn = await psycopg.AsyncConnection.connect(
                self.cfg.database.conninfo(application_name="wal-listener-sql"), autocommit=True
            )
        except psycopg.OperationalError as exc:
            db = self.cfg.database
            raise DatabaseError(
                f"postgres: cannot connect to {db.where}/{db.name} as {db.user}: {describe_pg_error(exc)}"
            ) from None

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    @property
    def conn(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            raise DatabaseError("postgres: the SQL connection is closed")
        return self._conn

    async def check_server(self) -> None:
        info = await catalog.server_info(self.conn)
        self.version = info.version
        if info.wal_level_problem():
            raise DatabaseSetupError(f"postgres: {info.wal_level_problem()}", reason="wal_level")

    @property
    def server(self) -> str:
        """host:port of the server this connection reached (of several hosts: the one libpq chose)."""
        info = self.conn.info
        return f"{info.host}:{info.port}"

    def failover_wanted(self) -> bool:
        try:
            return catalog.failover_wanted(self.cfg.listener.failover, self.version)
        except ValueError as exc:
            raise DatabaseSetupError(f"postgres: {exc}", reason="setup") from None

    async def synchronized_standbys(self) -> tuple[str, int]:
        """PostgreSQL 17+: synchronized_standby_slots, and how many standbys it names are connected."""
        if self.version < 170000:
            return "", 0
        row = await catalog.fetch_one(self.conn, catalog.SYNCHRONIZED_STANDBYS_QUERY)
        return (str(row[0] or ""), int(row[1] or 0)) if row else ("", 0)

    async def ensure_publication(self, create: bool = True) -> list[str]:
        """Make the publications when missing, keep the listener's own to its config (see
        :mod:`listener.publication`); the names to stream. ``create=False`` (the listener streamed with them
        before): a missing publication was dropped underneath the listener; re-creating it silently would hide
        that the changes made without it are not captured, so it is reported instead."""
        return await self.publications.ensure(self.conn, create=create)

    async def slot(self) -> SlotState | None:
        return await catalog.read_slot(
            self.conn, self.cfg.listener.slot_name, self.cfg.listener.publication_name, self.version or None
        )

    async def ensure_slot(self, create: bool = True) -> SlotState:
        """Create the slot when missing. ``create=False`` (the listener streamed from it before): a
        missing slot was dropped underneath the listener; a new one would silently start after the
        changes made in between, so report it instead (a restart creates it again, knowingly)."""
        name = self.cfg.listener.slot_name
        state = await self.slot()
        self.slot_created = False
        if state is None and not create:
            raise slot_dropped(name)
        if state is None:
            query = catalog.CREATE_FAILOVER_SLOT_QUERY if self.failover_wanted() else catalog.CREATE_SLOT_QUERY
            try:
                await self.conn.execute(query, (name,))
                self.slot_created = True
            except psycopg.errors.DuplicateObject:
                pass
            except psycopg.errors.ObjectNotInPrerequisiteState as exc:
                raise DatabaseSetupError(
                    f"postgres: cannot create slot {name!r}: {describe_pg_error(exc)}", reason="setup"
                ) from None
            except psycopg.errors.ConfigurationLimitExceeded:
                raise DatabaseSetupError(
                    f"postgres: cannot create slot {name!r}: all replication slots are in use; "
                    "raise max_replication_slots in postgresql.conf or drop an unused slot",
                    reason="setup",
                ) from None
            log.info("created replication slot", extra={"fields": {"slot": name, "plugin": "pgoutput"}})
            state = await self.slot()
            assert state is not None
        if state.mismatch(self.cfg.database.name):
            raise DatabaseSetupError(f"postgres: {state.mismatch(self.cfg.database.name)}", reason="setup")
        if state.wal_status == "lost":
            raise slot_invalidated(name)
        return state

    async def drop_slot(self) -> None:
        """Drop the (inactive) slot; nothing when it is gone already."""
        with contextlib.suppress(psycopg.errors.UndefinedObject):
            await self.conn.execute(catalog.DROP_SLOT_QUERY, (self.cfg.listener.slot_name,))

    async def load_types(self, registry: TypeRegistry, oids: list[int]) -> None:
        """Describe user-defined types (and the types they are built on) to the registry. A type made by the
        transaction being decoded may not be visible yet (a transaction is decoded once its commit is in the
        WAL, a moment before other sessions see it): it is looked for again for up to TYPE_VISIBLE_WAIT
        seconds before it counts as dropped (its values then stay text)."""
        todo = registry.missing(oids)
        deadline = time.monotonic() + TYPE_VISIBLE_WAIT
        while todo:
            async with self.conn.cursor() as cur:
                await cur.execute(catalog.PG_TYPE_QUERY, (todo,))
                rows = await cur.fetchall()
            for oid, kind, base, elem, category, delim in rows:
                registry.add(PgType(int(oid), kind, int(base), int(elem), category, delim))
            nested = [int(r[2]) for r in rows if int(r[2])] + [int(r[3]) for r in rows if int(r[3])]
            unseen = registry.missing(todo)
            if unseen and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            else:
                for oid in unseen:  # dropped meanwhile: its text form
                    registry.add(PgType(oid, "b", 0, 0, "U", ","))
                unseen = []
            todo = registry.missing(nested) + unseen

    async def primary_key(self, relation_oid: int) -> tuple[str, ...]:
        """The primary-key column names of a table, in key order (empty when it has none)."""
        return tuple(row[0] for row in await catalog.fetch_all(self.conn, catalog.PRIMARY_KEY_QUERY, (relation_oid,)))

    async def advance_slot(self, lsn: int) -> None:
        """Confirm ``lsn`` without a stream (the slot must be inactive)."""
        await self.conn.execute(catalog.ADVANCE_SLOT_QUERY, (self.cfg.listener.slot_name, format_lsn(lsn)))

    async def emit_heartbeat(self) -> None:
        await self.conn.execute(catalog.HEARTBEAT_QUERY)


class ReplicationStream:
    """One ``START_REPLICATION`` session over a replication connection."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self.pgconn: pq.abc.PGconn | None = None
        self.received_lsn = 0  # the highest WAL end seen in XLogData or keepalives
        self.last_status = 0.0
        self._readable: asyncio.Future[None] | None = None
        self._status_event = asyncio.Event()
        module = hotpath.load()
        #: the compiled reader (many messages per call), when psycopg's libpq could be found
        self._copy_batch = module.copy_batch if module is not None and hotpath.copy_reader(module) else None

    async def connect(self) -> None:
        db = self.cfg.database
        try:
            self._conn = await psycopg.AsyncConnection.connect(
                db.conninfo(replication="database", options=SESSION_OPTIONS), autocommit=True
            )
        except psycopg.OperationalError as exc:
            raise DatabaseError(
                f"postgres: cannot open a replication connection to {db.where}/{db.name} as {db.user}: "
                f"{describe_pg_error(exc)}"
            ) from None
        self.pgconn = self._conn.pgconn

    async def enable_failover(self) -> None:
        """ALTER_REPLICATION_SLOT ... (FAILOVER true): a replication command, so on this connection,
        before streaming (PostgreSQL 17+; the slot must not be in use)."""
        assert self._conn is not None
        try:
            await self._conn.execute(catalog.alter_slot_failover(self.cfg.listener.slot_name))
        except psycopg.Error as exc:
            raise DatabaseSetupError(
                f"postgres: cannot turn failover on for slot {self.cfg.listener.slot_name!r}: "
                f"{describe_pg_error(exc)}; run ALTER_REPLICATION_SLOT {self.cfg.listener.slot_name} (FAILOVER true) "
                "on a replication connection (psql \"dbname=... replication=database\") as a user with REPLICATION, or "
                "set listener.failover: false",
                reason="setup",
            ) from None

    async def start(self, start_lsn: int, publications: list[str]) -> None:
        assert self.pgconn is not None
        pgconn = self.pgconn
        slot = self.cfg.listener.slot_name
        command = (
            f'START_REPLICATION SLOT "{slot}" LOGICAL {format_lsn(start_lsn)} '
            f"(proto_version '1', publication_names '{publication_names(publications)}', messages 'true')"
        )
        pgconn.send_query(command.encode())
        while True:
            pgconn.consume_input()
            if not pgconn.is_busy():
                break
            await self.wait_readable()
        result = pgconn.get_result()
        if result is None or result.status != pq.ExecStatus.COPY_BOTH:
            message = result.get_error_message() if result is not None else pgconn.get_error_message()
            message = one_line(message)
            state = result.error_field(pq.DiagnosticField.SQLSTATE) if result is not None else None
            if state == b"55006":  # object_in_use
                raise SlotInUseError(f"postgres: slot {slot!r} is in use by another process: {message}",
                                     reason="slot_in_use")
            if state == b"42704" and "publication" in message:
                raise publication_dropped(self.cfg.listener.publication_name, message)
            if state == b"42704":
                raise slot_dropped(slot, message)
            if state == b"55000" and "invalidated" in message:
                raise slot_invalidated(slot, message)
            raise DatabaseError(f"postgres: START_REPLICATION failed: {message}")
        pgconn.nonblocking = 1
        log.info("streaming", extra={"fields": {"slot": slot, "from_lsn": format_lsn(start_lsn)}})

    async def wait_readable(self) -> None:
        assert self.pgconn is not None
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        try:
            fd = self.pgconn.socket
        except psycopg.OperationalError as exc:
            raise DatabaseError(f"postgres: replication connection lost: {describe_pg_error(exc)}") from None

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        self._readable = fut
        loop.add_reader(fd, ready)
        # libpq closes the socket itself when a write fails; a closed fd never becomes readable,
        # so look again every second rather than wait on it forever
        timer = loop.call_later(1.0, ready)
        try:
            await fut
        finally:
            timer.cancel()
            loop.remove_reader(fd)
            self._readable = None

    def wake(self) -> None:
        """Make a pending :meth:`wait_readable` return (used on stop)."""
        if self._readable is not None and not self._readable.done():
            self._readable.set_result(None)

    def wake_status(self) -> None:
        """Ask the feedback task to send a status update soon (the confirmable LSN moved)."""
        self._status_event.set()

    async def status_wanted(self, timeout: float) -> None:
        """Wait until :meth:`wake_status` was called or ``timeout`` passed."""
        # Not asyncio.wait_for: on Python 3.11 it swallows a cancellation that arrives together with
        # the event (it returns the result instead), and the feedback task, cancelled at the end of
        # every session, then kept running: the session never ended and the listener hung after a
        # PostgreSQL crash. asyncio.wait never swallows the caller's cancellation.
        waiter = asyncio.ensure_future(self._status_event.wait())
        try:
            await asyncio.wait([waiter], timeout=timeout)
        finally:
            waiter.cancel()
        self._status_event.clear()

    def read_batch(
        self, limit: int, starts: list[int] | None = None, max_bytes: int = 0
    ) -> tuple[list[bytes], int, bytes | None, int]:
        """Up to ``limit`` buffered XLogData messages without blocking: (their pgoutput payloads, the last
        WAL end they carried, another message that stopped the batch (a keepalive) or None, status: 1 more may
        be buffered, 0 nothing is (wait for the socket), -1 the stream ended, -2 the connection failed).
        ``starts`` gets each payload's start LSN. With ``max_bytes``, it also stops once the payloads taken
        hold that many bytes (libpq's buffer, grown once for a huge row, then holds many large rows: they
        stay there instead of being copied out while the delivery stage is full). The compiled reader takes
        them off libpq in one call."""
        assert self.pgconn is not None
        pointer = getattr(self.pgconn, "pgconn_ptr", None)  # every psycopg implementation has it; the abc not
        if self._copy_batch is not None and pointer:
            batch: tuple[list[bytes], int, bytes | None, int] = self._copy_batch(pointer, limit, starts, max_bytes)
            if batch[3] or len(batch[0]) >= limit:
                return batch
            # libpq's buffer ran dry, but while the last batch was turned into events the server most likely
            # sent more: one non-blocking read now spares the wait for the socket (a future, a timer and two
            # epoll_ctl calls: ~15% of the listener's CPU on wide rows, where a buffer holds few messages)
            room = max_bytes - sum(map(len, batch[0])) if max_bytes > 0 else 0
            if max_bytes > 0 and room <= 0:
                return batch
            try:
                self.pgconn.consume_input()
            except psycopg.OperationalError:
                return batch  # the wait and fill() that follow report it
            more: tuple[list[bytes], int, bytes | None, int] = self._copy_batch(
                pointer, limit - len(batch[0]), starts, room)
            if not batch[0]:
                return more
            batch[0].extend(more[0])
            return batch[0], more[1] or batch[1], more[2], more[3]
        payloads: list[bytes] = []
        wal_end = 0
        taken = 0
        get = self.pgconn.get_copy_data
        while len(payloads) < limit and (max_bytes <= 0 or taken < max_bytes):
            try:
                size, data = get(1)
            except psycopg.OperationalError:
                return payloads, wal_end, None, -2
            if size <= 0:
                return payloads, wal_end, None, size
            if data[0] != 0x77 or size < 25:  # not 'w' XLogData
                return payloads, wal_end, bytes(data), 1
            wal_end = _U64(data, 9)[0] or wal_end
            if size > 25:
                taken += size - 25
                payloads.append(bytes(data[25:]))
                if starts is not None:
                    starts.append(_U64(data, 1)[0])
        return payloads, wal_end, None, 1

    def fill(self) -> None:
        """Move what the socket has into libpq's buffer (after :meth:`wait_readable`)."""
        assert self.pgconn is not None
        if self.pgconn.status != pq.ConnStatus.OK:
            raise DatabaseError("postgres: replication connection lost")
        try:
            self.pgconn.consume_input()
        except psycopg.OperationalError as exc:
            raise DatabaseError(f"postgres: replication connection lost: {describe_pg_error(exc)}") from None

    async def stream_error(self) -> DatabaseError:
        """The error that ended the stream (without ever blocking the event loop on libpq)."""
        assert self.pgconn is not None
        pgconn = self.pgconn
        result = None
        try:
            for _ in range(50):  # PQgetResult blocks while busy: read what the server sent first
                pgconn.consume_input()
                if not pgconn.is_busy():
                    result = pgconn.get_result()
                    break
                try:
                    await asyncio.wait_for(self.wait_readable(), 0.1)
                except TimeoutError:
                    pass
        except psycopg.Error:
            result = None
        message = one_line(result.get_error_message() if result is not None else pgconn.get_error_message())
        message = message or "the server ended the stream"
        # the walsender's own words (PostgreSQL 15-18): 'publication "x" does not exist' while decoding
        # after the publication was dropped; 'replication slot "x" does not exist'; 'can no longer get
        # changes from replication slot' / 'This slot has been invalidated' after max_slot_wal_keep_size
        if "publication" in message and "does not exist" in message:
            return publication_dropped(self.cfg.listener.publication_name, message)
        if "invalidated" in message or "can no longer get changes" in message:
            return slot_invalidated(self.cfg.listener.slot_name, message)
        if "slot" in message and "does not exist" in message:
            return slot_dropped(self.cfg.listener.slot_name, message)
        return DatabaseError(f"postgres: replication stream ended: {message}")

    def send_status(self, flush_lsn: int, *, reply: bool = False) -> None:
        """Standby status update: everything up to ``flush_lsn`` is delivered and may be released."""
        assert self.pgconn is not None
        write = max(self.received_lsn, flush_lsn)
        message = _STATUS.pack(b"r", write, flush_lsn, flush_lsn, pg_now(), 1 if reply else 0)
        try:
            queued = self.pgconn.put_copy_data(message)
            self.pgconn.flush()
        except psycopg.Error as exc:
            raise DatabaseError(f"postgres: status update failed: {describe_pg_error(exc)}") from None
        if queued != 1:
            raise DatabaseError("postgres: could not queue a status update on the replication connection")
        self.last_status = time.monotonic()

    async def close(self) -> None:
        if self._conn is not None:
            try:
                await self._conn.close()
            except Exception:
                pass
            self._conn = None
            self.pgconn = None


def slot_dropped(slot: str, server_message: str = "") -> SlotLostError:
    said = f" ({server_message})" if server_message else ""
    return SlotLostError(
        f"postgres: slot {slot!r} was dropped while the listener ran{said}: changes made since then are not "
        "captured; re-snapshot what you need, then restart the listener to create the slot again",
        reason="slot_dropped",
    )


def slot_missing_after_failover(slot: str, now: str, before: str) -> SlotLostError:
    return SlotLostError(
        f"postgres: slot {slot!r} does not exist on {now}, the server the listener reached after {before} "
        "(a failover): the slot did not follow, so changes made since are not streamed. Keep it on standbys: on "
        "PostgreSQL 17+ with listener.failover on and sync_replication_slots = on (with hot_standby_feedback) on "
        "each standby; before 17 as a Patroni permanent slot. With listener.onSlotLost: resnapshot the listener "
        "creates it again and backfills every published table",
        reason="slot_missing_after_failover",
    )


def slot_invalidated(slot: str, server_message: str = "") -> SlotLostError:
    said = f" ({server_message})" if server_message else ""
    return SlotLostError(
        f"postgres: slot {slot!r} is invalidated (wal_status = lost){said}: the WAL it needed was removed "
        "(max_slot_wal_keep_size) and changes were lost; drop the slot, re-snapshot and restart the listener",
        reason="slot_invalidated",
    )


def publication_names(names: list[str]) -> str:
    """The ``publication_names`` option's value inside its string literal: a comma-separated list of quoted
    identifiers (``""`` escapes a double quote), with each ``'`` doubled for the literal around it."""
    return ",".join('"' + name.replace('"', '""') + '"' for name in names).replace("'", "''")


def parse_keepalive(data: bytes | memoryview) -> tuple[int, bool]:
    """``k`` message: (server WAL end, reply requested)."""
    end, _, reply = _KEEPALIVE.unpack_from(data, 1)
    return end, bool(reply)
