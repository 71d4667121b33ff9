"""Snapshots and backfills: the rows a table already has, published as READ events while streaming.

A chunk is read with the watermark algorithm of Netflix's DBLog (Andreas & Mehta, 2019):

1. a *low watermark* goes into the WAL (a non-transactional logical message, at its own position);
2. the next keyset page of the table is read (``SELECT ... WHERE (key) > (last key) ORDER BY key
   LIMIT chunkSize``, its own snapshot, taken after the low watermark);
3. a *high watermark* goes into the WAL.

A chunk is bounded in bytes as well as in rows. Its page is read through a server-side cursor (one
snapshot) in pieces, and the chunk ends early once its rows pass its byte budget, a quarter of
``listener.maxInFlightBytes`` (16 MiB by default): the next chunk resumes after the last key read, which
is all the watermark logic needs (a short chunk is a chunk). A piece is sized from the largest row seen so
far (the first piece of a table is one row), so a chunk passes its budget by one piece at most. Another
chunk is read only while the events handed to delivery and not yet acknowledged plus the chunks read and
not yet handed over stay under ``maxInFlightBytes``: the chunks waiting for acks count against the bound
the stream's events do.

Each piece (one FETCH, read on the connection's libpq handle) becomes READ events while libpq holds it: the
compiled ``read_page`` walks the result itself (values, key, id, body, Message; :meth:`EventBuilder.read_page`
is its Python twin), and the next piece is asked for before that, so PostgreSQL reads it meanwhile. A
watermark's statement also takes a transaction id, whose commit flushes the WAL up to it (a walsender sends
only flushed WAL; alone, the message waited for the WAL writer).

The reader meets both watermarks in the stream. Between them it notes the key of every change of the
table; at the high watermark it drops from the chunk every row whose key changed (the stream carries a
state at least as new) and publishes the rest as READ events right there, in stream order. A change
committed after the high watermark comes after the READ events; one committed before the low watermark
is in the chunk already. So for every key the last event is the row's latest state, and streaming never
stops: the chunk is read on its own connection while the reader goes on.

Progress is a row of ``wal_listener.backfills`` per backfill (see :mod:`listener.catalog`): the last key
of the last chunk whose events the broker acknowledged. A restarted listener resumes a running backfill
from there; a chunk it had published before the crash is published again with the same ids (built from
the slot, the backfill, the table and the row's key), which brokers de-duplicate. Requests are rows too:
``wal-listener backfill`` inserts one, the operator inserts one per ``spec.backfills`` entry, and so can
plain SQL (docs/snapshots.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
import psycopg
from psycopg.rows import tuple_row

from listener import catalog, metrics, pgoutput
from listener.catalog import execute_one, fetch_all, fetch_one
from listener.config import Config
from listener.errors import ListenerError
from listener.event import EventBuilder, RelationInfo, RowKey, now_text, read_event_ids, read_id_seed
from listener.filter import TableFilter
from listener.hotpath import psycopg_libpq
from listener.message import Message
from listener.replication import SESSION_OPTIONS, describe_pg_error

log = logging.getLogger("listener.backfill")

#: how often the state table is checked for new requests (seconds); a request announced on
#: :data:`catalog.BACKFILL_CHANNEL` (:func:`request_backfill` does) is looked at when it comes
POLL_INTERVAL = 0.5
#: chunks of one table published and not yet acknowledged, at most (memory: about this many chunks of
#: events, plus two pages of rows being read; in bytes, see :func:`chunk_budget`)
PIPELINE = 2
#: a chunk's byte budget is listener.maxInFlightBytes divided by this
CHUNK_BUDGET_SHARE = 4
#: a piece (one FETCH) aims at this share of the chunk's budget, as far as the largest row seen tells
PIECE_SHARE = 4
#: rows of one FETCH, at most (what a piece can overshoot by when rows grow much larger than those before)
PIECE_ROWS_MAX = 1000
#: how often a chunk waiting for room under maxInFlightBytes, or for its acknowledgement, looks again (seconds)
#: when nothing tells it that acknowledgements came (``run`` without ``acked``)
ROOM_POLL = 0.01
#: the same when told (a safety net only: each acknowledgement and each chunk handed over wakes the waits)
NOTIFIED_POLL = 1.0
#: how often progress is logged while a backfill runs (seconds)
PROGRESS_INTERVAL = 5.0

_U32 = struct.Struct(">I").unpack_from


class BackfillError(ListenerError):
    """A backfill request cannot run as asked (unknown table, no key, a bad ``where``); the message says why."""


@dataclass(frozen=True)
class Request:
    """A row of the state table."""

    id: int
    name: str
    tables: tuple[str, ...]
    where: str
    state: str
    current_table: str | None
    last_key: tuple[str, ...] | None
    tables_done: tuple[str, ...]
    rows_done: int
    rows_estimated: int
    chunks: int
    error: str
    requested_at: Any = None
    started_at: Any = None
    finished_at: Any = None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Request:
        return cls(
            id=int(row[0]),
            name=row[1],
            tables=tuple(row[2] or ()),
            where=row[3] or "",
            state=row[4],
            current_table=row[5],
            last_key=tuple(row[6]) if row[6] is not None else None,
            tables_done=tuple(row[7] or ()),
            rows_done=int(row[8]),
            rows_estimated=int(row[9]),
            chunks=int(row[10]),
            error=row[11] or "",
            requested_at=row[12],
            started_at=row[13],
            finished_at=row[14],
        )


@dataclass(frozen=True)
class Table:
    """A table as a backfill reads it: its columns as pgoutput sends them and the key to page over."""

    oid: int
    schema: str
    name: str
    relation: pgoutput.Relation
    key: tuple[str, ...]  # primary key, else the replica identity index
    estimate: int  # rows, -1: unknown (never analyzed, no statistics yet)
    row_filter: str  # the publication's row filter (PostgreSQL 15+), applied to READ events as to changes

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


# --------------------------------------------------------------------------------------------------
# what requests and the listener both need: the state table and a table's shape


async def ensure_state_table(conn: psycopg.AsyncConnection[Any], name: str = catalog.STATE_TABLE_NAME) -> None:
    """Create the state tables (``wal_listener.backfills``, ``wal_listener.schemas``) if ``name`` is not there;
    one line naming the DDL if not allowed."""
    if (await fetch_one(conn, catalog.STATE_TABLE_EXISTS_QUERY, (name,)) or (False,))[0]:
        return
    try:
        for statement in catalog.state_table_ddl():
            await execute_one(conn, statement)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise BackfillError(
            f"postgres: cannot create the state table {name} "
            f"({describe_pg_error(exc)}); have it created once (wal-listener backfill --print-ddl) "
            "or grant CREATE on the database"
        ) from None


def split_name(name: str) -> tuple[str, str]:
    schema, _, table = name.rpartition(".")
    return schema, table


async def resolve(conn: psycopg.AsyncConnection[Any], name: str) -> list[tuple[str, str]]:
    """``'users'`` -> every schema's users; ``'shop.users'`` -> that one (empty: no such table)."""
    schema, table = split_name(name)
    rows = await fetch_all(conn, catalog.RESOLVE_TABLE_QUERY, {"name": table, "schema": schema})
    return [(str(r[0]), str(r[1])) for r in rows]


async def describe(
    conn: psycopg.AsyncConnection[Any], publication: str, schema: str, name: str, server_version: int
) -> Table:
    """The table as a backfill reads it; :class:`BackfillError` when it cannot be backfilled."""
    row = await fetch_one(conn, catalog.TABLE_QUERY, {"publication": publication, "schema": schema, "table": name})
    if row is None:
        raise BackfillError(f"backfill: table {schema}.{name} does not exist")
    oid, identity, published = int(row[0]), str(row[1]), bool(row[2])
    reltuples, live = int(row[3]), int(row[4])
    if not published:
        raise BackfillError(
            f"backfill: table {schema}.{name} is not in publication {publication!r}: its changes are not streamed, "
            "so its rows cannot be kept consistent; add it to the publication first"
        )
    columns, row_filter = await published_columns(conn, publication, schema, name, oid, server_version)
    primary = sorted((int(c[3]), str(c[0])) for c in columns if int(c[3]))
    index = sorted((int(c[4]), str(c[0])) for c in columns if int(c[4]))
    key = tuple(n for _, n in primary) or tuple(n for _, n in index)
    if not key:
        raise BackfillError(
            f"backfill: table {schema}.{name} has no primary key or replica identity index to read it in order; "
            f"add one (ALTER TABLE {schema}.{name} ADD PRIMARY KEY (...), or REPLICA IDENTITY USING INDEX ...)"
        )
    relation = pgoutput.Relation(
        oid,
        schema,
        name,
        identity,
        tuple(pgoutput.Column(str(c[0]), int(c[1]), int(c[2]), _in_identity(identity, c)) for c in columns),
    )
    # reltuples is -1 until the first VACUUM or ANALYZE; the statistics' live rows (then the planner's
    # guess from the table's size, see estimate()) still give a total for the progress bar
    rows = reltuples if reltuples >= 0 else live if live > 0 else -1
    return Table(oid, schema, name, relation, key, rows, row_filter)


async def published_columns(
    conn: psycopg.AsyncConnection[Any], publication: str, schema: str, name: str, oid: int, server_version: int
) -> tuple[list[tuple[Any, ...]], str]:
    """The columns of a table its events carry (:data:`catalog.COLUMNS_QUERY` rows; PostgreSQL 15+: those of
    the publication's column list) and the publication's row filter of it ('' : none)."""
    columns = await fetch_all(conn, catalog.COLUMNS_QUERY, (oid,))
    row_filter = ""
    if server_version >= 150000:
        pub = await fetch_one(conn, catalog.PUBLICATION_TABLE_QUERY, (publication, schema, name))
        if pub is not None:
            if pub[0] is not None:
                columns = [c for c in columns if c[0] in pub[0]]
            row_filter = str(pub[1] or "")
    return columns, row_filter


def _in_identity(identity: str, column: Sequence[Any]) -> bool:
    """Whether pgoutput flags the column as part of the replica identity (COLUMNS_QUERY row)."""
    if identity == "f":
        return True
    if identity == "d":
        return int(column[3]) > 0
    return identity == "i" and int(column[4]) > 0


async def check_where(conn: psycopg.AsyncConnection[Any], schema: str, name: str, where: str) -> None:
    """Refuse a ``where`` that is not one valid boolean expression over the table, before anything runs."""
    try:
        query = catalog.check_where_query(schema, name, where)
    except catalog.ExpressionError as exc:
        raise BackfillError(f"backfill: --where {exc}") from None
    try:
        async with conn.transaction():
            await conn.execute("SET TRANSACTION READ ONLY")
            await conn.execute(query)
    except psycopg.errors.Error as exc:
        if isinstance(exc, psycopg.OperationalError):
            raise
        raise BackfillError(f"backfill: --where is not valid for {schema}.{name}: {describe_pg_error(exc)}") from None


async def estimate(conn: psycopg.AsyncConnection[Any], table: Table, where: Sequence[str]) -> int:
    """Rows the backfill of ``table`` reads: the planner's estimate with a filter or when the catalog has
    no count yet (the planner then goes by the table's size), else the catalog's count."""
    if not where and table.estimate >= 0:
        return table.estimate
    row = await fetch_one(conn, catalog.estimate_query(table.schema, table.name, where))
    try:
        return int(row[0][0]["Plan"]["Plan Rows"]) if row else 0
    except (KeyError, IndexError, TypeError, ValueError):
        return 0


# --------------------------------------------------------------------------------------------------
# the chunk between its watermarks


@dataclass
class Chunk:
    """One keyset page, from its low watermark to its high watermark."""

    backfill: int
    number: int
    table: Table
    oid: int
    key_names: tuple[str, ...]
    events: list[Message] = field(default_factory=list)  # the READ events of the rows read
    keys: list[RowKey] = field(default_factory=list)  # each one's row key (the same position)
    last_key: tuple[str, ...] | None = None
    count: int = 0  # rows read
    size: int = 0  # bytes of the rows read (their text form): what counts against the byte budget
    last: bool = False  # the page reached the end of the table (the cursor ran out before chunkSize rows)
    sent: int = 0  # READ events handed to delivery at the high watermark
    open: bool = False  # the reader has passed the low watermark
    truncated: bool = False
    changed: set[tuple[str | None, ...]] = field(default_factory=set)
    published: asyncio.Future[int] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Backfiller:
    """Runs the backfills of one slot; the reader calls :meth:`note_change`, :meth:`note_truncate` and
    :meth:`watermark` for what it meets in the stream."""

    def __init__(self, cfg: Config, builder: EventBuilder) -> None:
        self.cfg = cfg
        self.builder = builder
        self._filter = TableFilter(cfg.listener.filter)
        self._slot = cfg.listener.slot_name
        self._run = f"{time.time_ns():x}"  # watermarks of an earlier process are not this one's
        self._chunks: dict[tuple[int, int], Chunk] = {}
        #: relation oid -> its chunks with an open window (two at most: one is read while the one before it is
        #: built); the reader notes the keys of the relation's changes for them
        self.watching: dict[int, list[Chunk]] = {}
        self.running: Request | None = None
        self._in_flight_bytes: Callable[[], int] = lambda: 0
        self._unacked = 0  # bytes of the chunks handed to delivery, not yet acknowledged
        #: a future done at delivery's next acknowledgement (None: the waits poll, :data:`ROOM_POLL`)
        self._acked: Callable[[], Awaitable[None]] | None = None
        self._waiters: list[asyncio.Future[None]] = []  # woken when a chunk is handed over or acknowledged

    # -- the reader's side -------------------------------------------------------------------------

    def note_change(self, buf: bytes) -> None:
        """An Insert/Update/Delete of a table with an open window: note the key(s) it touches."""
        chunks = self.watching.get(_U32(buf, 1)[0])
        if not chunks:
            return
        chunk = chunks[0]
        info = self.builder.relations.get(chunk.oid)
        if info is None:
            return
        positions = [info.names.index(n) for n in chunk.key_names if n in info.names]
        if len(positions) != len(chunk.key_names):
            for open_chunk in chunks:
                open_chunk.truncated = True  # the key columns changed under the chunk: it is not published
            return
        msg = pgoutput.decode(buf)
        tuples: list[pgoutput.Tuple] = []
        if isinstance(msg, pgoutput.Insert):
            tuples.append(msg.new)
        elif isinstance(msg, pgoutput.Update):
            tuples.append(msg.new)
            if msg.old is not None:
                tuples.append(msg.old)
        elif isinstance(msg, pgoutput.Delete):
            tuples.append(msg.old)
        for values in tuples:
            key = tuple(_text(values[i]) for i in positions)
            for open_chunk in chunks:
                open_chunk.changed.add(key)

    def note_truncate(self, oid: int) -> None:
        for chunk in self.watching.get(oid, ()):
            chunk.truncated = True

    def watermark(self, content: bytes) -> Chunk | None:
        """A watermark of this listener: at a low one the window opens; at a high one the chunk is
        returned with its rows filtered, for the reader to publish."""
        try:
            mark = orjson.loads(content)
            key = (int(mark["backfill"]), int(mark["chunk"]))
            if mark["slot"] != self._slot or mark["run"] != self._run:
                return None
        except (ValueError, KeyError, TypeError):
            return None
        chunk = self._chunks.get(key)
        if chunk is None:
            return None
        if mark.get("kind") == "low":
            chunk.open = True
            self.watching.setdefault(chunk.oid, []).append(chunk)
            return None
        self._chunks.pop(key, None)
        self._wake()  # held_bytes dropped: a chunk waiting for room may go
        chunks = self.watching.get(chunk.oid, [])
        if chunk in chunks:
            chunks.remove(chunk)
        if not chunks:
            self.watching.pop(chunk.oid, None)
        if not chunk.open:
            chunk.truncated = True  # never saw its low watermark: nothing can be said about its rows
        return chunk

    def events(self, chunk: Chunk) -> list[Message]:
        """The chunk's READ events whose keys did not change between its watermarks (once: the chunk lets go
        of them, delivery holds them from here)."""
        changed = chunk.changed
        if chunk.truncated:
            events = []
        elif changed:
            events = [message for key, message in zip(chunk.keys, chunk.events, strict=True) if key not in changed]
        else:
            events = chunk.events  # the common case: no row of the chunk changed in its window
        chunk.sent = len(events)
        chunk.events = []
        chunk.keys = []
        chunk.changed = set()
        if events:
            self._unacked += chunk.size
        else:
            chunk.size = 0
        return events

    def held_bytes(self) -> int:
        """Bytes of the chunks read and not yet handed to delivery (their rows, then their events)."""
        return sum(chunk.size for chunk in self._chunks.values())

    def in_flight_bytes(self) -> int:
        """Bytes the backfill counts as in flight: the events delivery holds, not yet acknowledged (the
        stream's too), and at least those of the chunks handed to it and not yet acknowledged."""
        return max(self._in_flight_bytes(), self._unacked)

    # -- the backfill task -------------------------------------------------------------------------

    async def run(
        self,
        confirmed: Callable[[], int],
        stopping: asyncio.Event,
        load_types: Callable[[list[int]], Awaitable[None]],
        in_flight_bytes: Callable[[], int] = lambda: 0,
        acked: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Poll for requests and run them, one at a time, until cancelled (the session ends). ``confirmed``
        is the LSN delivery may confirm; ``load_types`` describes user-defined types to the converters;
        ``in_flight_bytes`` the bytes of events delivery holds, not yet acknowledged; ``acked`` an awaitable
        done at delivery's next acknowledgement (:meth:`Delivery.acked`), which the waits for room and for a
        chunk's acknowledgement await instead of polling."""
        self._load_types = load_types
        self._in_flight_bytes = in_flight_bytes
        self._acked = acked
        conn = await self._connect()
        try:
            version = (await catalog.server_info(conn)).version
            await conn.execute(catalog.LISTEN_BACKFILL_QUERY)
            while not stopping.is_set():
                request = await self._next(conn)
                if request is None:
                    await _announced(conn, stopping, POLL_INTERVAL)
                    continue
                try:
                    await self._run_one(conn, version, request, confirmed, stopping)
                except psycopg.OperationalError:
                    raise  # the connection is gone: the next session resumes the backfill
                except (psycopg.Error, ValueError) as exc:  # this backfill cannot go on; others may
                    error = f"backfill {request.name}: {describe_pg_error(exc)}"
                    log.error("backfill failed", extra={"fields": {"backfill": request.name, "error": error}})
                    await conn.execute(catalog.FINISH_BACKFILL_QUERY, ("failed", error, request.id))
        except psycopg.OperationalError as exc:
            log.warning("backfills paused: the database connection was lost; they resume with the next session",
                        extra={"fields": {"error": describe_pg_error(exc)}})
        finally:
            self.running = None
            self._unacked = 0
            self._chunks.clear()
            self.watching.clear()
            await conn.close()

    async def _next(self, conn: psycopg.AsyncConnection[Any]) -> Request | None:
        exists = await fetch_one(conn, catalog.STATE_TABLE_EXISTS_QUERY, (catalog.STATE_TABLE_NAME,))
        if not exists or not exists[0]:
            return None
        row = await fetch_one(conn, catalog.NEXT_BACKFILL_QUERY, (self._slot,))
        return Request.from_row(row) if row is not None else None

    async def _run_one(
        self,
        conn: psycopg.AsyncConnection[Any],
        version: int,
        request: Request,
        confirmed: Callable[[], int],
        stopping: asyncio.Event,
    ) -> None:
        try:
            tables = await self._plan(conn, version, request)
        except BackfillError as exc:
            await conn.execute(catalog.FINISH_BACKFILL_QUERY, ("failed", str(exc), request.id))
            log.error("backfill refused", extra={"fields": {"backfill": request.name, "error": str(exc)}})
            return
        where = [request.where] if request.where else []
        if request.state == "requested":
            total = 0
            for table in tables:
                total += await estimate(conn, table, [*where, *([table.row_filter] if table.row_filter else [])])
            await conn.execute(catalog.START_BACKFILL_QUERY, (total, request.id))
            row = await fetch_one(conn, catalog.BACKFILL_QUERY, (self._slot, request.name))
            request = Request.from_row(row) if row is not None else request
            fields: dict[str, Any] = {"backfill": request.name, "tables": [t.qualified for t in tables],
                                      "rows_estimated": total}
            log.info("backfill started", extra={"fields": fields})
        else:
            fields = {"backfill": request.name, "table": request.current_table, "rows_done": request.rows_done}
            schema, _, name = (request.current_table or "").partition(".")
            if self.builder.transforms.find(schema, name) is None:  # a transformed table's key may be masked
                fields["after_key"] = list(request.last_key or ())
            log.info("backfill resumed from its last acknowledged chunk", extra={"fields": fields})
        self.running = request
        progress = _Progress(request)
        for table in tables:
            if table.qualified in request.tables_done:
                continue
            after = request.last_key if request.current_table == table.qualified else None
            metrics.BACKFILL_RUNNING.labels(table.name).set(1)
            try:
                await self._table(conn, request, table, after, where, confirmed, stopping, progress)
            finally:
                metrics.BACKFILL_RUNNING.labels(table.name).set(0)
            if stopping.is_set():
                return
            await conn.execute(catalog.BACKFILL_TABLE_DONE_QUERY, (table.qualified, request.id))
        await conn.execute(catalog.FINISH_BACKFILL_QUERY, ("done", "", request.id))
        self.running = None
        log.info("backfill done", extra={"fields": {"backfill": request.name, "rows": progress.rows,
                                                    "seconds": round(progress.elapsed, 1)}})

    def _hidden_key(self, table: Table) -> list[str]:
        """The key columns of ``table`` its transform masks or leaves out (its READ ids are then keyed)."""
        entry = self.builder.transforms.find(table.schema, table.name)
        if entry is None:
            return []
        return [k for k in table.key if k in entry.mask or not entry.columns.keeps(k)]

    async def _plan(self, conn: psycopg.AsyncConnection[Any], version: int, request: Request) -> list[Table]:
        tables: list[Table] = []
        for name in request.tables:
            found = await resolve(conn, name)
            if not found:
                raise BackfillError(f"backfill: table {name} does not exist")
            for schema, table in found:
                described = await describe(conn, self.cfg.listener.publication_name, schema, table, version)
                hidden = self._hidden_key(described)
                if hidden and not self.builder.transforms.hash_key:
                    raise BackfillError(
                        f"backfill: {described.qualified}: listener.transforms masks or leaves out its key column(s) "
                        f"{', '.join(hidden)}, and READ event ids are made from the key; set "
                        "listener.transformsHashKey so that they are keyed"
                    )
                if request.where:
                    await check_where(conn, schema, table, request.where)
                tables.append(described)
        return tables

    async def _table(
        self,
        conn: psycopg.AsyncConnection[Any],
        request: Request,
        table: Table,
        after: tuple[str, ...] | None,
        where: list[str],
        confirmed: Callable[[], int],
        stopping: asyncio.Event,
        progress: _Progress,
    ) -> None:
        size = self.cfg.listener.snapshot.chunk_size
        filters = [*where, *([table.row_filter] if table.row_filter else [])]
        names = tuple(c.name for c in table.relation.columns)
        key_index = tuple(names.index(k) for k in table.key)
        await self._load_types([c.type_oid for c in table.relation.columns])
        facts = await catalog.column_facts(conn, table.oid) if self.builder.wants_column_facts else None
        info = self.builder.relation_info(table.relation, table.key, facts)
        secret = self.builder.transforms.hash_key if self._hidden_key(table) else b""
        ids = _Ids(self.builder, info, read_event_ids(self._slot, request.id, table.schema, table.name, secret),
                   read_id_seed(self._slot, request.id, table.schema, table.name, secret), key_index)
        # A pipeline: pages are read and turned into events (low watermark, SELECT) on one connection while
        # the page before gets its high watermark on another, and the one before that is acknowledged. Key
        # ranges of pages do not overlap, so neither does what their windows decide.
        pages: asyncio.Queue[Chunk | None] = asyncio.Queue(maxsize=1)

        async def read_pages() -> None:
            nonlocal after
            number = request.chunks
            largest = 0  # bytes of the largest row of the chunk before: sizes the next chunk's first piece
            while not stopping.is_set():
                await self._room(stopping)
                if stopping.is_set():
                    break
                number += 1
                chunk = Chunk(request.id, number, table, table.oid, table.key)
                self._chunks[(request.id, number)] = chunk
                await self._mark(read_conn, chunk, "low")
                largest = await self._read_chunk(read_conn, chunk, names, after, filters, size, largest, ids)
                if chunk.keys:
                    after = tuple(k or "" for k in chunk.keys[-1])
                chunk.last_key = after
                await pages.put(chunk)
                if chunk.last:
                    break
            await pages.put(None)

        read_conn = await self._connect()
        reader = asyncio.create_task(read_pages(), name="backfill-pages")
        published: deque[Chunk] = deque()  # handed to the reader, not yet acknowledged (in order)
        try:
            while (chunk := await pages.get()) is not None:
                await self._mark(conn, chunk, "high")
                published.append(chunk)
                # record what is acknowledged; wait only when more than PIPELINE chunks are not
                while published and (len(published) > PIPELINE or self._settled(published[0], confirmed)):
                    if not await self._acknowledged(conn, request, published.popleft(), confirmed, stopping,
                                                    progress):
                        return
            while published:
                if not await self._acknowledged(conn, request, published.popleft(), confirmed, stopping, progress):
                    return
            await reader  # its errors, if any
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            await read_conn.close()

    @staticmethod
    def _settled(chunk: Chunk, confirmed: Callable[[], int]) -> bool:
        return chunk.published.done() and confirmed() >= chunk.published.result()

    async def _acknowledged(
        self,
        conn: psycopg.AsyncConnection[Any],
        request: Request,
        chunk: Chunk,
        confirmed: Callable[[], int],
        stopping: asyncio.Event,
        progress: _Progress,
    ) -> bool:
        """Wait until the chunk's READ events (and everything before them) are acknowledged, then record
        its last key as the backfill's progress; False when stopping first."""
        lsn = await chunk.published  # the reader handed its events to delivery at this position
        while confirmed() < lsn:
            if stopping.is_set():
                return False
            await self._changed(stopping)
        published = chunk.sent
        self._unacked -= chunk.size
        chunk.size = 0
        self._wake()  # in_flight_bytes() may have dropped: a chunk waiting for room may go
        table = chunk.table
        await conn.execute(catalog.BACKFILL_PROGRESS_QUERY,
                           (table.qualified, list(chunk.last_key or ()), published, request.id))
        metrics.SNAPSHOT_ROWS.labels(table.name).inc(published)
        metrics.SNAPSHOT_CHUNKS.labels(table.name).inc()
        progress.add(published, table.qualified)
        return True

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        """A connection whose text values look like pgoutput's (the replication session's settings)."""
        return await psycopg.AsyncConnection.connect(
            self.cfg.database.conninfo(application_name="wal-listener-backfill", options=SESSION_OPTIONS),
            autocommit=True,
        )

    async def _mark(self, conn: psycopg.AsyncConnection[Any], chunk: Chunk, kind: str) -> None:
        content = orjson.dumps(
            {"slot": self._slot, "run": self._run, "backfill": chunk.backfill, "chunk": chunk.number, "kind": kind}
        ).decode()
        await conn.execute(catalog.WATERMARK_QUERY, (catalog.WATERMARK_PREFIX, content))

    def budget(self) -> int:
        """A chunk's byte budget: a quarter of listener.maxInFlightBytes (16 MiB by default)."""
        return max(1, self.cfg.listener.max_in_flight_bytes // CHUNK_BUDGET_SHARE)

    async def _room(self, stopping: asyncio.Event) -> None:
        """Wait until a chunk's budget fits under listener.maxInFlightBytes beside the events delivery holds
        (the chunks waiting for acks among them, the stream's too) and the chunks read but not handed to it
        yet; when nothing is held a chunk is read whatever the stream holds (a backfill always moves on)."""
        room = self.cfg.listener.max_in_flight_bytes - self.budget()
        while not stopping.is_set() and (self._unacked or self._chunks):
            if self.in_flight_bytes() + self.held_bytes() <= room:
                return
            await self._changed(stopping)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _changed(self, stopping: asyncio.Event) -> None:
        """Wait until delivery acknowledges events, a chunk is handed over or acknowledged, or ``stopping``;
        without ``acked`` (or as a safety net) at most a poll interval. The caller checks its condition
        before calling, with no await in between, so a wake-up between the check and this wait is not lost
        (the waiters are registered here, before the first await)."""
        if stopping.is_set():
            return
        own: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(own)
        waits: list[asyncio.Future[Any]] = [own, asyncio.ensure_future(stopping.wait())]
        if self._acked is not None:
            waits.append(asyncio.ensure_future(self._acked()))
        try:
            await asyncio.wait(waits, timeout=ROOM_POLL if self._acked is None else NOTIFIED_POLL,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()

    async def _read_chunk(
        self,
        conn: psycopg.AsyncConnection[Any],
        chunk: Chunk,
        names: tuple[str, ...],
        after: tuple[str, ...] | None,
        filters: list[str],
        size: int,
        largest: int,
        ids: _Ids,
    ) -> int:
        """Read one page into ``chunk`` (its rows' READ events and keys), through a cursor in pieces until
        ``size`` rows, the end of the table (``chunk.last``) or the chunk's byte budget; the largest row of the
        chunk (bytes, in text form). ``largest`` is the one of the chunk before (0: none yet), which sizes the
        first piece. Each piece is turned into events while libpq holds it (the compiled ``read_page``
        reads the result itself; else psycopg's values go through :meth:`EventBuilder.read_page`)."""
        table = chunk.table
        query = catalog.chunk_query(table.schema, table.name, names, table.key, after=after is not None,
                                    where=filters)
        budget = self.budget()
        piece_target = max(1, budget // PIECE_SHARE)
        sized = _result_size()
        read_time = now_text()  # the READ events' commitTime: when the chunk was read
        events, keys = chunk.events, chunk.keys
        async with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
            # parameters: extended protocol, bound with the DECLARE; the cursor sees one snapshot, taken now
            await cur.execute(catalog.declare_chunk_cursor(query), [*(after or ()), size])
            want = piece_rows(largest, size, budget, piece_target)
            await _send(conn, catalog.fetch_chunk_rows(want).as_bytes(conn))
            try:
                while True:
                    result = await _receive(conn)
                    got = result.ntuples
                    # the piece's bytes and largest row first: they decide the next piece, asked for before this
                    # one is turned into events, so that PostgreSQL reads it meanwhile
                    total, biggest = ids.sizes(result)
                    if sized is not None and got:
                        total = sized(result)  # libpq's own count of the piece's memory
                    largest = max(biggest, largest if chunk.count else 0)  # this chunk's largest row so far
                    chunk.size += total
                    chunk.count += got
                    asked = want
                    more = got == asked and chunk.count < size and chunk.size < budget
                    if more:
                        want = piece_rows(largest, size - chunk.count, budget - chunk.size, piece_target)
                        await _send(conn, catalog.fetch_chunk_rows(want).as_bytes(conn))
                    if got:
                        ids.read(result, read_time, events, keys)
                    del result
                    if got < asked:  # the cursor ran out before chunkSize rows: the table's last page
                        chunk.last = True
                    if not more:
                        break
            except BaseException:
                if conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.ACTIVE:
                    with contextlib.suppress(Exception):  # the piece asked for, read and dropped: the rollback runs
                        await _receive(conn)
                raise
        return largest


class _Ids:
    """Turns the pieces of one table's pages into READ events: the compiled ``read_page`` over libpq's result
    when the table's events allow it, else psycopg's values through :meth:`EventBuilder.read_page`."""

    def __init__(self, builder: EventBuilder, info: RelationInfo, ident_of: Callable[[Sequence[str | None]], str],
                 seed: tuple[bytes, bytes], key_index: tuple[int, ...]) -> None:
        self.builder = builder
        self.info = info
        self.ident_of = ident_of
        self.key_index = key_index
        self.compiled = builder.page_reader(info)
        self.prepared = builder.hot.blake2b_prepare(*seed) if self.compiled is not None and builder.hot else b""
        self._piece: list[list[bytes | None]] = []  # the values of the piece sizes() measured (the Python path)

    def sizes(self, result: psycopg.pq.abc.PGresult) -> tuple[int, int]:
        """The bytes of the piece's values and of its largest row (0, 0 for none)."""
        if not result.ntuples:
            return 0, 0
        if self.compiled is not None and self.builder.hot is not None:
            return self.builder.hot.page_sizes(cast(Any, result).pgresult_ptr)
        columns = range(result.nfields)
        value = result.get_value
        self._piece = [[value(r, c) for c in columns] for r in range(result.ntuples)]
        rows = list(map(_row_bytes, self._piece))
        return sum(rows), max(rows)

    def read(self, result: psycopg.pq.abc.PGresult, read_time: str, events: list[Message],
             keys: list[RowKey]) -> None:
        """Append the events and keys of the piece's rows."""
        if self.compiled is not None:
            built, found, _, _ = self.compiled(cast(Any, result).pgresult_ptr, self.prepared, self.key_index,
                                               read_time)
            if None in found:  # rows the compiled path left to the Python one (not valid UTF-8, a converter's no)
                for r, key in enumerate(found):
                    if key is None:
                        row = [result.get_value(r, c) for c in range(result.nfields)]
                        (built[r],), (found[r],) = self.builder.read_page(self.info, [row], self.ident_of,
                                                                          self.key_index, read_time)
            events.extend(cast(list[Message], built))
            keys.extend(cast(list[RowKey], found))
            return
        piece, self._piece = self._piece, []  # sizes() took the values of this piece
        messages, piece_keys = self.builder.read_page(self.info, piece, self.ident_of, self.key_index, read_time)
        events.extend(messages)
        keys.extend(piece_keys)


async def _send(conn: psycopg.AsyncConnection[Any], query: bytes) -> None:
    """Send a FETCH (simple protocol: text values) on the connection's libpq handle; :func:`_receive` reads
    its result. Between the two the connection is busy: nothing else may use it."""
    loop = asyncio.get_running_loop()
    async with conn.lock:
        pgconn = conn.pgconn
        pgconn.send_query(query)
        while pgconn.flush():  # the query not written whole yet (a FETCH is short: hardly ever)
            writable: asyncio.Future[None] = loop.create_future()
            loop.add_writer(pgconn.socket, writable.set_result, None)
            try:
                await writable
            finally:
                loop.remove_writer(pgconn.socket)


async def _receive(conn: psycopg.AsyncConnection[Any]) -> psycopg.pq.abc.PGresult:
    """The result of the FETCH :func:`_send` sent, as libpq made it. The socket is watched once for the whole
    piece: psycopg's execute adds and removes its reader, a timer and a future at every read of the socket,
    and a piece of 1,000 rows arrives in tens of reads."""
    loop = asyncio.get_running_loop()
    async with conn.lock:
        pgconn = conn.pgconn
        fd = pgconn.socket
        waiter: list[asyncio.Future[None]] = []

        def wake() -> None:
            if waiter and not waiter[0].done():
                waiter[0].set_result(None)

        result: psycopg.pq.abc.PGresult | None = None
        loop.add_reader(fd, wake)
        try:
            while True:
                pgconn.consume_input()
                if pgconn.is_busy():
                    waiter[:] = [loop.create_future()]
                    await waiter[0]
                    continue
                got = pgconn.get_result()
                if got is None:
                    break
                if result is None:
                    result = got
        finally:
            loop.remove_reader(fd)
    if result is None or result.status != psycopg.pq.ExecStatus.TUPLES_OK:
        if result is None:
            raise psycopg.OperationalError("backfill: FETCH returned no result")
        raise psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
    return result


def piece_rows(largest: int, rows_left: int, bytes_left: int, piece_bytes: int) -> int:
    """Rows of a chunk's next FETCH: as many rows of the largest size seen (``largest`` bytes; 0: none seen
    yet, then one row) as fit in a piece's share of the budget and in what is left of it, at least one, at
    most :data:`PIECE_ROWS_MAX` and the rows the chunk may still take."""
    if largest <= 0:
        return 1
    return max(1, min(PIECE_ROWS_MAX, rows_left, min(piece_bytes, bytes_left) // largest))


class _Progress:
    """Rows, rate and ETA of a running backfill, logged every few seconds."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.rows = 0
        self.done_before = request.rows_done
        self.started = time.monotonic()
        self.logged = self.started

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def add(self, rows: int, table: str) -> None:
        self.rows += rows
        now = time.monotonic()
        if now - self.logged < PROGRESS_INTERVAL:
            return
        self.logged = now
        rate = self.rows / max(self.elapsed, 1e-6)
        done = self.done_before + self.rows
        left = max(0, self.request.rows_estimated - done)
        log.info("backfill progress", extra={"fields": {
            "backfill": self.request.name, "table": table, "rows": done,
            "rows_estimated": self.request.rows_estimated, "rows_per_s": round(rate),
            "eta_s": round(left / rate) if rate > 0 else None}})


@functools.cache
def _result_size() -> Callable[[psycopg.pq.abc.PGresult], int] | None:
    """libpq's ``PQresultMemorySize`` of a result psycopg holds (the bytes its rows take in libpq), when the
    libpq psycopg runs on can be found; else None."""
    try:
        lib = psycopg_libpq()
        if lib is None:
            return None
        function = lib.PQresultMemorySize
    except (OSError, AttributeError, ImportError):
        return None
    function.argtypes = [ctypes.c_void_p]
    function.restype = ctypes.c_size_t

    def size(result: psycopg.pq.abc.PGresult) -> int:
        return int(function(cast(Any, result).pgresult_ptr))  # the C pointer (not in psycopg's protocol)

    return size


def _row_bytes(row: list[bytes | None]) -> int:
    return sum(map(len, filter(None, row)))


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


async def _announced(conn: psycopg.AsyncConnection[Any], stopping: asyncio.Event, seconds: float) -> None:
    """Wait until a request is announced on the connection (it LISTENs on :data:`catalog.BACKFILL_CHANNEL`),
    ``stopping`` is set, or ``seconds`` passed. Announcements that came during other queries are in psycopg's
    backlog and end the wait at once."""

    async def first() -> None:
        async for _ in conn.notifies(timeout=seconds, stop_after=1):
            pass

    announced = asyncio.ensure_future(first())
    stopped = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait([announced, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not announced.done():
            announced.cancel()  # no query in flight: the connection only stops waiting for notifications
        with contextlib.suppress(asyncio.CancelledError):
            await announced


# --------------------------------------------------------------------------------------------------
# asking for a backfill (the CLI, the operator, the listener's initial snapshot and resnapshot)


async def request_backfill(
    conn: psycopg.AsyncConnection[Any], slot: str, name: str, tables: Sequence[str], where: str = ""
) -> int | None:
    """Queue a backfill; its id, or None when ``name`` was requested for this slot before."""
    await ensure_state_table(conn)
    row = await fetch_one(conn, catalog.REQUEST_BACKFILL_QUERY, (slot, name, list(tables), where))
    if row is None:
        return None
    await fetch_one(conn, catalog.NOTIFY_BACKFILL_QUERY, (catalog.BACKFILL_CHANNEL, slot))  # at commit
    return int(row[0])


async def validate_request(
    conn: psycopg.AsyncConnection[Any], cfg: Config, tables: Sequence[str], where: str = ""
) -> list[str]:
    """Check an explicit backfill before it is asked for: every table exists, is published and not excluded
    by ``listener.filter``, has a key to page over, and ``where`` is one valid expression over it. Returns the
    schema-qualified names ('users' is every schema's users); :class:`BackfillError` says what is wrong."""
    if not tables:
        raise BackfillError("backfill: name at least one table")
    version = (await catalog.server_info(conn)).version
    wanted = TableFilter(cfg.listener.filter)
    out: list[str] = []
    for name in tables:
        for schema, table in await named_tables(conn, wanted, name, "backfill"):
            await describe(conn, cfg.listener.publication_name, schema, table, version)
            if where:
                await check_where(conn, schema, table, where)
            out.append(f"{schema}.{table}")
    return out


async def named_tables(
    conn: psycopg.AsyncConnection[Any], wanted: TableFilter, name: str, command: str
) -> list[tuple[str, str]]:
    """The tables ``name`` names ('users': every schema's), each existing and covered by ``listener.filter``;
    else :class:`BackfillError`, its message starting with ``command``."""
    if not catalog.is_table_name(name):
        raise BackfillError(f"{command}: {name!r} is not a table name: use 'table' or 'schema.table'")
    found = await resolve(conn, name)
    if not found:
        raise BackfillError(f"{command}: table {name} does not exist")
    for schema, table in found:
        if not wanted.covers(schema, table):
            raise BackfillError(
                f"{command}: table {schema}.{table} is excluded by listener.filter.tables, so none of its rows is "
                "published; add it to the filter first"
            )
    return found


async def published_tables(conn: psycopg.AsyncConnection[Any], cfg: Config) -> list[str]:
    """The tables an initial snapshot reads: the publication's, as far as ``listener.filter`` covers them."""
    rows = await fetch_all(conn, catalog.PUBLISHED_TABLES_QUERY, (cfg.listener.publication_name,))
    wanted = TableFilter(cfg.listener.filter)
    return [f"{s}.{t}" for s, t in rows if wanted.covers(s, t)]


async def backfills(conn: psycopg.AsyncConnection[Any], slot: str) -> list[Request]:
    """Every backfill of ``slot`` (none when the state table does not exist)."""
    exists = await fetch_one(conn, catalog.STATE_TABLE_EXISTS_QUERY, (catalog.STATE_TABLE_NAME,))
    if not exists or not exists[0]:
        return []
    return [Request.from_row(r) for r in await fetch_all(conn, catalog.BACKFILLS_QUERY, (slot,))]

