"""Stage 8 — app: wire the stages together and keep them running.

One :class:`Listener` per process and slot: connect the broker, then (again and again, with backoff,
until stopped) connect PostgreSQL, make sure the publication and slot exist, stream, decode, convert,
filter, build events, hand them to delivery, and confirm LSNs back as delivery allows. Serves the
probes and metrics, answers keepalives, watches the slot's health. ``stop()`` (SIGTERM/SIGINT) stops
reading, drains what is in flight, confirms and returns 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from listener import metrics, pgoutput
from listener.backfill import Backfiller, published_tables, request_backfill
from listener.catalog import DDL_PREFIX, TABLE_COLUMNS_QUERY, WATERMARK_PREFIX, SlotState, column_facts, fetch_all
from listener.config import Config, redact_url
from listener.delivery import Backoff, Delivery
from listener.errors import (
    BrokerConfigError,
    DatabaseError,
    DatabaseSetupError,
    PublishError,
    SlotInUseError,
    SlotLostError,
)
from listener.event import CHANGE_ACTIONS, EventBuilder, Transaction
from listener.message import Message
from listener.observability import Health, HttpServer, metrics_route, register_secrets, split_addr
from listener.pgoutput import PG_EPOCH, format_lsn
from listener.publication import publication_dropped
from listener.publishers import make_publisher
from listener.publishers.base import Publisher
from listener.replication import (
    Database,
    ReplicationStream,
    parse_keepalive,
    slot_dropped,
    slot_missing_after_failover,
)
from listener.types import TypeRegistry

if TYPE_CHECKING:
    from listener.ddl import DdlEvents  # imported when listener.ddl.capture is on
    from listener.schema import SchemaTracker  # imported when listener.schemaEvents is on

log = logging.getLogger("listener.app")

_PG_EPOCH_UNIX = PG_EPOCH.timestamp()
_U32 = struct.Struct(">I").unpack_from
_COMMIT = struct.Struct(">BQQq").unpack_from  # a Commit message after its tag: flags, commit LSN, end LSN, time
#: replication messages the reader takes off the connection per call (then it looks at stop and keepalives);
#: also at most about a batch's bytes of them (Delivery.max_batch_bytes)
READ_BATCH = 256

# a slot with less than this share of max_slot_wal_keep_size left before it is invalidated gets a warning
# (a fixed number of bytes warned all the time under a small limit and too late under a large one)
SAFE_WAL_WARNING_FRACTION = 0.2


def wal_at_risk(wal_status: str | None, safe_wal_size: int | None, wal_keep_size: int) -> bool:
    """Whether the slot is close to losing WAL it still needs (max_slot_wal_keep_size)."""
    if wal_status in ("unreserved", "lost"):
        return True
    if safe_wal_size is None or wal_keep_size <= 0:
        return False  # no limit: the slot never loses WAL
    return safe_wal_size < wal_keep_size * SAFE_WAL_WARNING_FRACTION


class Listener:
    """The whole data path for one slot."""

    def __init__(self, cfg: Config, publisher: Publisher[Any] | None = None) -> None:
        self.cfg = cfg
        register_secrets(cfg)  # logs, /ready and Sentry hide them, whatever a client library says
        ack_timeout = cfg.listener.ack_timeout.total_seconds()
        self.publisher = publisher or make_publisher(cfg.publisher, ack_timeout)
        self.registry = TypeRegistry()
        self.builder = EventBuilder(cfg, self.registry, needs_key=self.publisher.needs_key,
                                    binding=self.publisher.cloudevents)
        dead_letter = (
            f"{cfg.publisher.topic}.{cfg.listener.dead_letter_topic}" if cfg.listener.dead_letter_topic else ""
        )
        self.delivery = Delivery(
            self.publisher,
            max_in_flight=cfg.listener.max_in_flight,
            max_in_flight_bytes=cfg.listener.max_in_flight_bytes,
            batch_size=cfg.listener.batch_size,
            retry_cap=cfg.listener.refresh_connection.total_seconds(),
            ack_timeout=ack_timeout,
            on_error=cfg.listener.on_error,
            dead_letter_subject=dead_letter,
        )
        self.delivery.on_fatal = lambda _exc: self.stop()
        #: hands an event to delivery (database.debug: logs it first, as published)
        self._add = self._logged_add if cfg.database.debug else self.delivery.add
        self._transforms_checked = False
        self.health = Health()
        self.health.broker = lambda: self.publisher.ready and not self.delivery.failing
        metrics.READY.set_function(lambda: 1.0 if self.health.is_ready() else 0.0)
        self._stopping = asyncio.Event()
        self._stream: ReplicationStream | None = None
        self._db: Database | None = None
        self._servers: list[HttpServer] = []
        self._sent_lsn = 0
        self.server_wal_end = 0
        # set once a session streamed: from then on a missing slot or publication was dropped underneath
        # the listener and is reported, not silently created again
        self._streamed = False
        self._problem_reason = ""  # the reasoned problem last logged (logged once, not on every retry)
        self._problem_reasons: set[str] = set()
        self._streaming_since: float | None = None
        self._drain_until: float | None = None
        self.backfiller = Backfiller(cfg, self.builder)
        #: SCHEMA events (listener.schemaEvents)
        self.schemas: SchemaTracker | None = None
        if cfg.listener.schema_events:
            from listener.schema import SchemaTracker

            self.schemas = SchemaTracker(cfg, self.builder)
        #: listener.ddl.capture: DDL statements as DDL events
        self.ddl: DdlEvents | None = None
        if cfg.listener.ddl.capture:
            from listener.ddl import DdlEvents

            self.ddl = DdlEvents(cfg, self.builder)
        self._check_now = asyncio.Event()  # run the periodic checks now (a DDL event: a table may have appeared)
        self._server = ""  # host:port of the server the last session streamed from
        self._warned_unsynced = False
        #: the slot was lost and listener.onSlotLost is resnapshot: create it again, then backfill everything
        self._resnapshot = False

    # -- lifecycle --------------------------------------------------------------------------------

    def stop(self) -> None:
        if not self._stopping.is_set():
            log.info("stopping: draining in-flight events")
            self._stopping.set()
            if self._stream is not None:
                self._stream.wake()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def _start_http(self) -> None:
        lc, mon = self.cfg.listener, self.cfg.monitoring
        routes = {"/healthz": self.health.healthz, "/ready": self.health.ready}
        if lc.server_port:
            both = dict(routes)
            if mon.prom_addr and split_addr(mon.prom_addr)[1] == lc.server_port:
                both["/metrics"] = metrics_route
            self._servers.append(HttpServer("", lc.server_port, both))
        if mon.prom_addr and split_addr(mon.prom_addr)[1] != lc.server_port:
            host, port = split_addr(mon.prom_addr)
            self._servers.append(HttpServer(host, port, {"/metrics": metrics_route, **routes}))
        for server in self._servers:
            await server.start()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _connect_publisher(self) -> None:
        backoff = Backoff(first=0.5, cap=self.cfg.listener.refresh_connection.total_seconds())
        while not self.stopping:
            try:
                await self.publisher.connect()
                log.info("broker connected", extra={"fields": {"type": self.cfg.publisher.type.value,
                                                               "address": redact_url(self.cfg.publisher.address)}})
                return
            except BrokerConfigError:
                raise
            except PublishError as exc:
                delay = backoff.next()
                self.health.problem = str(exc)
                log.error("broker unreachable; retrying",
                          extra={"fields": {"error": str(exc), "retry_in_s": round(delay, 2)}})
                metrics.RECONNECTS.labels("broker").inc()
                await self._sleep(delay)

    async def run(self) -> int:
        """Run until :meth:`stop`; returns the process exit code."""
        await self._start_http()
        try:
            await self._connect_publisher()
            self.delivery.start()
            metrics.UP.labels("broker").set_function(lambda: 1.0 if self.publisher.ready else 0.0)
            backoff = Backoff(first=0.5, cap=self.cfg.listener.refresh_connection.total_seconds())
            while not self.stopping:
                started = time.monotonic()
                try:
                    await self._session()
                except SlotInUseError as exc:
                    self._report(exc, logging.WARNING)
                except SlotLostError as exc:
                    if self.cfg.listener.on_slot_lost == "resnapshot":
                        await self._lost_slot(exc)
                    else:
                        self._report(exc, logging.ERROR)
                        backoff.attempt = max(backoff.attempt, 30)  # no tight crash loop: retry slowly
                except DatabaseSetupError as exc:
                    self._report(exc, logging.ERROR)
                    backoff.attempt = max(backoff.attempt, 30)
                except DatabaseError as exc:
                    self._report(exc, logging.ERROR)
                finally:
                    self.health.postgres = False
                    metrics.UP.labels("postgres").set(0)
                    await self._close_session()
                if self.stopping:
                    break
                if time.monotonic() - started > 60:
                    backoff.reset()
                metrics.RECONNECTS.labels("postgres").inc()
                await self._sleep(backoff.next())
            await self._shutdown()
            if self.delivery.fatal is not None:
                raise self.delivery.fatal
            return 0
        finally:
            for server in self._servers:
                await server.close()
            await self.delivery.close()
            with contextlib.suppress(Exception):
                await self.publisher.close()

    def _report(self, exc: Exception, level: int) -> None:
        self.health.problem = str(exc)
        reason = getattr(exc, "reason", "")
        fields: dict[str, Any] = {"error_type": type(exc).__name__}
        if self._streaming_since is not None and time.monotonic() - self._streaming_since > 60:
            self._problem_reason = ""  # it streamed for a while since: a new occurrence is news again
        self._streaming_since = None
        if reason:
            # a lasting problem (slot dropped, invalidated, in use; publication missing...): say it once,
            # keep it visible in the slot_problem gauge and /ready, retry quietly. A stream that starts
            # and fails again at once (a re-created publication on PostgreSQL 15) is the same problem.
            fields["reason"] = reason
            metrics.SLOT_PROBLEM.labels(reason).set(1)
            self._problem_reasons.add(reason)
            if reason == self._problem_reason:
                level = logging.DEBUG
            self._problem_reason = reason
        log.log(level, str(exc), extra={"fields": fields})

    async def _lost_slot(self, exc: SlotLostError) -> None:
        """listener.onSlotLost: resnapshot — a new slot, and every published table backfilled."""
        log.error(
            "replication slot lost: creating it again and backfilling every published table (onSlotLost: resnapshot)",
            extra={"fields": {"slot": self.cfg.listener.slot_name, "error": str(exc)}},
        )
        metrics.SLOT_RESNAPSHOTS.inc()
        self.health.problem = str(exc)
        if self._db is not None:
            with contextlib.suppress(Exception):
                await self._db.drop_slot()  # an invalidated slot is in the way of the new one
        self._resnapshot = True

    def _problem_solved(self) -> None:
        if self._problem_reason:
            log.info("streaming again", extra={"fields": {"after": self._problem_reason}})
        self._streaming_since = time.monotonic()
        for reason in self._problem_reasons:
            metrics.SLOT_PROBLEM.labels(reason).set(0)

    async def _drain(self) -> None:
        if self.delivery.fatal is not None:
            return  # nothing more will be acknowledged: exit with the error
        # one grace period for the whole shutdown: the session's drain and the final one share it
        # (before, a broker that never acknowledged made shutdown wait twice as long)
        first = self._drain_until is None
        if self._drain_until is None:
            self._drain_until = time.monotonic() + max(5.0, 3 * self.cfg.listener.ack_timeout.total_seconds())
        try:
            await asyncio.wait_for(self.delivery.drain(), max(0.0, self._drain_until - time.monotonic()))
        except TimeoutError:
            if first:  # said once, not again by the final drain
                log.error("shutdown: events still unacknowledged; they will be re-sent after restart",
                          extra={"fields": {"in_flight": self.delivery.in_flight,
                                            "in_flight_bytes": self.delivery.in_flight_bytes}})

    async def _shutdown(self) -> None:
        await self._drain()
        if self.delivery.confirmed_lsn > self._sent_lsn:
            # the stream is gone (PostgreSQL was down): confirm through SQL on the now inactive slot
            db = Database(self.cfg)
            try:
                await db.connect()
                await db.advance_slot(self.delivery.confirmed_lsn)
                self._sent_lsn = self.delivery.confirmed_lsn
            except Exception as exc:
                log.warning("shutdown: could not confirm the last LSN; it will be re-read after restart",
                            extra={"fields": {"error": str(exc)}})
            finally:
                await db.close()
        log.info("stopped", extra={"fields": {"confirmed_lsn": format_lsn(self.delivery.confirmed_lsn)}})

    async def _close_session(self) -> None:
        if self._stream is not None:
            await self._stream.close()
            self._stream = None
        if self._db is not None:
            await self._db.close()
            self._db = None

    # -- one PostgreSQL session -------------------------------------------------------------------

    async def _session(self) -> None:
        db = self._db = Database(self.cfg)
        await db.connect()
        await db.check_server()
        publications = await db.ensure_publication(create=not self._streamed)
        if self.ddl is not None:
            await self.ddl.prepare(db.conn)
        try:
            slot = await db.ensure_slot(create=not self._streamed or self._resnapshot)
        except SlotLostError as exc:
            if exc.reason == "slot_dropped" and self._server and db.server != self._server:
                raise slot_missing_after_failover(self.cfg.listener.slot_name, db.server, self._server) from None
            raise
        if not self._transforms_checked and self.builder.transforms.entries:
            await self._check_transforms(db)
        if db.slot_created:
            await self._snapshot_on_new_slot(db, slot.confirmed_flush_lsn)
        if slot.active:
            raise SlotInUseError(
                f"postgres: slot {slot.name!r} is in use by another process (pid {slot.active_pid}); "
                "another listener reads it — waiting for it to be released",
                reason="slot_in_use",
            )
        stream = self._stream = ReplicationStream(self.cfg)
        await stream.connect()
        if slot.failover is False and db.failover_wanted():
            await stream.enable_failover()
            log.info("failover turned on for the slot: standbys with sync_replication_slots keep a copy",
                     extra={"fields": {"slot": slot.name}})
            slot = await db.ensure_slot(create=False)
        await self._check_failover(db, slot)
        start = max(slot.confirmed_flush_lsn, self.delivery.confirmed_lsn)
        if self.schemas is not None:
            await self.schemas.start(db.conn, start)
        await stream.start(start, publications)
        self._sent_lsn = max(self._sent_lsn, slot.confirmed_flush_lsn)
        self._streamed = True
        self._server = db.server
        self._problem_solved()
        self.health.postgres = True
        self.health.problem = ""
        metrics.UP.labels("postgres").set(1)
        self.delivery.on_confirmable = stream.wake_status
        watcher = asyncio.create_task(self._watch_slot(db), name="slot-health")
        backfills = asyncio.create_task(
            self.backfiller.run(
                lambda: self.delivery.confirmed_lsn,
                self._stopping,
                lambda oids: db.load_types(self.registry, oids),
                lambda: self.delivery.in_flight_bytes,
                self.delivery.acked,
            ),
            name="backfills",
        )
        tasks = [asyncio.create_task(self._feedback(stream), name="feedback"), watcher, backfills]
        reader = asyncio.create_task(self._read(stream, db), name="reader")
        try:
            # the slot watcher ends the session when the slot or the publication is gone (PostgreSQL 18
            # keeps streaming without a publication, skipping every change: the stream alone never says)
            await asyncio.wait([reader, watcher], return_when=asyncio.FIRST_COMPLETED)
            if not reader.done():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
                watcher.result()
            reader.result()
            await self._drain()  # stopping: settle what is in flight while the stream can still confirm
        finally:
            if not reader.done():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
            self.delivery.on_confirmable = None
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._send_status(stream)

    async def _check_failover(self, db: Database, slot: SlotState) -> None:
        """The slot's failover state into metrics and /ready; a failover slot whose changes may reach the
        listener before any standby (synchronized_standby_slots empty) is warned about once."""
        standby_slots, synced = await db.synchronized_standbys()
        metrics.SLOT_FAILOVER.set(1 if slot.failover else 0)
        metrics.SLOT_SYNCED_STANDBYS.set(synced)
        self.health.details = {"server": db.server, "slot_failover": bool(slot.failover), "synced_standbys": synced}
        if slot.failover and not standby_slots and not self._warned_unsynced:
            self._warned_unsynced = True
            log.warning(
                "the slot has failover on but the primary's synchronized_standby_slots is empty: the listener may "
                "publish changes no standby has received yet, which a new primary after a failover never had "
                "(phantom events); set synchronized_standby_slots to the standbys' physical slots",
                extra={"fields": {"slot": slot.name, "server": db.server}},
            )

    async def _check_transforms(self, db: Database) -> None:
        """Once per process: warn about listener.transforms entries naming columns or tables the database
        does not have (not fatal: they may be added later)."""
        rows = await fetch_all(db.conn, TABLE_COLUMNS_QUERY)
        for warning in self.builder.transforms.check({(schema, table): columns for schema, table, columns in rows}):
            log.warning(warning)
        self._transforms_checked = True

    def _logged_add(self, message: Message) -> bool:
        """database.debug: the event as it is published (transforms applied), then to delivery."""
        log.debug("event", extra={"fields": {"id": message.id, "subject": message.subject, "action": message.action,
                                             "body": message.body[:4096].decode(errors="replace")}})
        return self.delivery.add(message)

    async def _snapshot_on_new_slot(self, db: Database, lsn: int) -> None:
        """A slot just created: with snapshot.mode initial (or after a lost slot, onSlotLost resnapshot),
        ask for a backfill of every published table, ordered with the stream from the slot's start."""
        resnapshot, self._resnapshot = self._resnapshot, False
        if not resnapshot and self.cfg.listener.snapshot.mode != "initial":
            return
        kind = "resnapshot" if resnapshot else "initial"
        tables = await published_tables(db.conn, self.cfg)
        if not tables:
            log.warning(f"{kind} snapshot: the publication has no table the filter covers; nothing to backfill")
            return
        name = f"{kind}-{format_lsn(lsn)}"
        await request_backfill(db.conn, self.cfg.listener.slot_name, name, tables)
        log.info(f"{kind} snapshot requested", extra={"fields": {"backfill": name, "tables": tables}})

    def _send_status(self, stream: ReplicationStream, reply: bool = False) -> None:
        lsn = self.delivery.confirmed_lsn
        try:
            stream.send_status(lsn, reply=reply)
        except DatabaseError:
            stream.wake()  # the reader finds out what happened to the connection
            return
        self._sent_lsn = max(self._sent_lsn, lsn)
        metrics.CONFIRMED_LSN.set(lsn)
        metrics.RECEIVED_LSN.set(stream.received_lsn)
        if self.server_wal_end:
            metrics.LAG_BYTES.set(max(0, self.server_wal_end - lsn))

    async def _feedback(self, stream: ReplicationStream) -> None:
        """Standby status updates: soon after the confirmable LSN moves, and every heartbeatInterval."""
        interval = self.cfg.listener.heartbeat_interval.total_seconds()
        early = False  # the last coalescing wait ended early (everything in flight was settled)
        while True:
            await stream.status_wanted(min(interval, 1.0))
            due = time.monotonic() - stream.last_status >= interval
            if self.delivery.confirmed_lsn != self._sent_lsn or due:
                self._send_status(stream)
            if self.delivery.idle:
                metrics.LAG_SECONDS.set(0)
            elif self.delivery.confirmed_commit_time:
                metrics.LAG_SECONDS.set(max(0.0, time.time() - self.delivery.confirmed_commit_time))
            # coalesce bursts of confirmations, but not the last of a burst: when the batches in flight are all
            # settled within the 50 ms, their LSN is confirmed at once (a run's end waited up to 50 ms here for its
            # final confirmation). Nothing in flight, or the last wait ended early: the full 50 ms (a trickle of
            # small batches, each settled before the next, gets at most two status updates per 50 ms, not one
            # per batch)
            if early:
                early = False
                await asyncio.sleep(0.05)
            else:
                early = await self.delivery.until_settled(0.05)

    async def _watch_slot(self, db: Database) -> None:
        """Every heartbeatInterval: heartbeat (optional), slot health metrics, the retained-WAL warning.
        Raises (ending the session) when the slot or the publication was dropped underneath."""
        interval = max(1.0, self.cfg.listener.heartbeat_interval.total_seconds())
        warned = False
        while True:
            await self._next_check(interval)
            try:
                if self.cfg.listener.emit_heartbeat:
                    await db.emit_heartbeat()
                state = await db.slot()
            except Exception as exc:
                log.debug("slot health check failed", extra={"fields": {"error": str(exc)}})
                continue
            if state is None:
                raise slot_dropped(self.cfg.listener.slot_name)
            if not state.publication_exists:
                raise publication_dropped(self.cfg.listener.publication_name)
            metrics.SLOT_RETAINED_BYTES.set(max(0, state.current_lsn - state.restart_lsn))
            safe = state.safe_wal_size
            metrics.SLOT_SAFE_WAL_BYTES.set(-1 if safe is None else safe)
            metrics.SLOT_WAL_KEEP_BYTES.set(state.wal_keep_size)
            for status in metrics.WAL_STATUSES:
                metrics.SLOT_WAL_STATUS.labels(status).set(1 if state.wal_status == status else 0)
            at_risk = wal_at_risk(state.wal_status, safe, state.wal_keep_size)
            if at_risk and not warned:
                log.warning(
                    "slot is about to lose WAL (max_slot_wal_keep_size): catch up or raise the limit",
                    extra={"fields": {"slot": state.name, "wal_status": state.wal_status, "safe_wal_size": safe,
                                      "max_slot_wal_keep_size": state.wal_keep_size,
                                      "retained_wal": max(0, state.current_lsn - state.restart_lsn)}},
                )
            warned = at_risk
            # after the slot's figures and their warning: the metrics and the line tell the same moment
            await self._check_failover(db, state)
            try:
                await db.publications.watch(db.conn)
            except Exception as exc:
                log.warning("publication check failed", extra={"fields": {"error": str(exc).strip()}})

    async def _next_check(self, interval: float) -> None:
        """Wait for the next periodic check: heartbeatInterval, or until a DDL event asks for it at once."""
        waiter = asyncio.ensure_future(self._check_now.wait())
        try:
            await asyncio.wait([waiter], timeout=interval)  # not wait_for: see ReplicationStream.status_wanted
        finally:
            waiter.cancel()
        self._check_now.clear()

    async def _read(self, stream: ReplicationStream, db: Database) -> None:
        """The hot loop: copy data (a batch of buffered messages at a time) -> pgoutput -> events -> delivery."""
        delivery = self.delivery
        builder = self.builder
        relations = builder.relations
        decode = pgoutput.decode
        hot_change, compiled, debezium = builder.hot_change, builder.compiled, builder.debezium
        change = builder.change_rest  # for what hot_change leaves
        begin = builder.begin_message
        committed = builder.commit
        read_batch = stream.read_batch
        read_bytes = delivery.max_batch_bytes
        add = self._add
        txn: Transaction | None = None
        received = 0
        backfiller = self.backfiller
        watching = backfiller.watching  # relations with an open backfill window (usually none)
        starts: list[int] | None = [] if builder.wants_lsn else None  # each change's own LSN (Debezium)
        stopping = self._stopping
        announcing = False  # Relation messages were read and SCHEMA events may be due (listener.schemaEvents)
        yielded = False  # the reader found nothing buffered and let the other tasks run once before waiting
        while not stopping.is_set():
            payloads, wal_end, other, status = read_batch(READ_BATCH, starts, read_bytes)
            if payloads:
                yielded = False
            if wal_end:
                received = wal_end
            position = 0
            for buf in payloads:
                out = None
                if starts is not None:
                    if txn is not None:
                        txn.lsn = starts[position]
                    position += 1
                tag = buf[0]
                if tag in CHANGE_ACTIONS:  # Insert, Update, Delete: the hot path
                    if watching:
                        backfiller.note_change(buf)
                    if announcing:
                        announcing = False
                        await self._announce(db, txn, (_U32(buf, 1)[0],))  # type: ignore[arg-type]
                    if hot_change is not None:
                        out = hot_change(buf, compiled, txn, debezium)
                    if out is None:
                        out = change(buf, txn)  # type: ignore[arg-type]
                elif tag == 0x42:  # Begin: once per transaction, which is once per row in OLTP workloads
                    txn = begin(buf)
                elif tag == 0x43:  # Commit
                    if len(buf) < 26:
                        decode(buf)  # raises DecodeError: says what is wrong
                    _flags, commit_lsn, end_lsn, micros = _COMMIT(buf, 1)
                    delivery.commit(end_lsn, micros / 1e6 + _PG_EPOCH_UNIX)
                    committed(commit_lsn)
                    txn = None
                else:
                    msg = decode(buf)
                    kind = type(msg)
                    if kind is pgoutput.Relation:
                        await self._relation(msg, db)  # type: ignore[arg-type]
                        announcing = self.schemas is not None
                    elif kind is pgoutput.LogicalMessage:
                        if msg.prefix == WATERMARK_PREFIX:  # type: ignore[union-attr]
                            await self._watermark(msg)  # type: ignore[arg-type]
                        elif msg.prefix == DDL_PREFIX and self.ddl is not None and txn is not None:  # type: ignore[union-attr]
                            await self._ddl(msg, txn, db)  # type: ignore[arg-type]
                        elif msg.transactional and txn is not None:  # type: ignore[union-attr]
                            out = builder.message(msg, txn)  # type: ignore[arg-type]
                        else:
                            await self._message(msg)  # type: ignore[arg-type]
                    elif kind is pgoutput.Truncate:
                        if announcing:
                            announcing = False
                            await self._announce(db, txn, msg.relation_oids)  # type: ignore[arg-type,union-attr]
                        for oid in msg.relation_oids:  # type: ignore[union-attr]
                            if watching:
                                backfiller.note_truncate(oid)
                            truncated = builder.truncate(relations[oid], txn)  # type: ignore[arg-type]
                            if truncated is not None:
                                add(truncated)
                full = add(out) if out is not None else delivery.full
                if full:
                    await delivery.wait_for_space(stopping)
                    if stopping.is_set():
                        return  # the rest stays unconfirmed: read again after a restart
            if starts is not None:
                starts.clear()
            if other is not None and other[0] == 0x6B:  # 'k' keepalive
                end, reply = parse_keepalive(other)
                self.server_wal_end = end
                metrics.SERVER_WAL_END.set(end)
                if txn is None:
                    delivery.seal()
                    delivery.idle_confirm(end)
                if reply:
                    self._send_status(stream)
            if status > 0:
                continue
            if status == 0:
                delivery.caught_up()
                if received > stream.received_lsn:
                    stream.received_lsn = received  # the gauge follows with the next status update
                if not yielded:
                    # Nothing buffered now, but while the other tasks publish what was read and take the acks
                    # in, the server most likely sends more: look again after them before waiting for the
                    # socket (a wait registers and drops the socket with the loop: a future, a timer and ~6
                    # syscalls, once every ~17 events on wide rows)
                    yielded = True
                    await asyncio.sleep(0)
                else:
                    yielded = False
                    await stream.wait_readable()
                stream.fill()
                continue
            raise await stream.stream_error()

    async def _watermark(self, msg: pgoutput.LogicalMessage) -> None:
        """A backfill watermark: at a chunk's high one, its READ events go out here, in stream order."""
        chunk = self.backfiller.watermark(msg.content)
        if chunk is None:
            return
        delivery = self.delivery
        add = self._add
        for event in self.backfiller.events(chunk):
            if add(event):  # that made delivery full
                await delivery.wait_for_space(self._stopping)
        delivery.commit(msg.lsn, time.time())
        if not chunk.published.done():
            chunk.published.set_result(msg.lsn)

    async def _ddl(self, msg: pgoutput.LogicalMessage, txn: Transaction, db: Database) -> None:
        """A DDL statement: its DDL events, in its transaction's order. A table of listener.filter may have
        appeared: the publication check runs at once instead of at the next heartbeatInterval."""
        assert self.ddl is not None
        for event in self.ddl.events(msg, txn):
            self._add(event)
            if self.delivery.full:
                await self.delivery.wait_for_space(self._stopping)
        if db.publications.missing:
            self._check_now.set()

    async def _message(self, msg: pgoutput.LogicalMessage) -> None:
        """A non-transactional logical message: published at once, confirmed on its own."""
        event = self.builder.message(msg, None)
        if event is None:
            return
        self._add(event)
        # confirmed past its own position (restarting there would decode it again)
        self.delivery.commit(msg.lsn + 1, time.time())
        if self.delivery.full:
            await self.delivery.wait_for_space(self._stopping)

    async def _relation(self, rel: pgoutput.Relation, db: Database) -> None:
        """A table's description: registered for its changes (and for a SCHEMA event before the next one)."""
        oids = [c.type_oid for c in rel.columns]
        if self.registry.missing(oids):
            await db.load_types(self.registry, oids)
        primary_key: tuple[str, ...] = ()
        if rel.replica_identity == "f" and self.publisher.needs_key:
            primary_key = await db.primary_key(rel.oid)
        facts = await column_facts(db.conn, rel.oid) if self.builder.wants_column_facts else None
        info = self.builder.add_relation(rel, primary_key, facts)
        if self.schemas is not None:
            self.schemas.relation(rel, info)

    async def _announce(self, db: Database, txn: Transaction, oids: Sequence[int]) -> None:
        """Before a change of the tables ``oids``: the SCHEMA events due, in its transaction."""
        assert self.schemas is not None
        for event in await self.schemas.announce(db.conn, txn, oids):
            self._add(event)
            if self.delivery.full:
                await self.delivery.wait_for_space(self._stopping)
