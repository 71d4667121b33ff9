"""SCHEMA events (``listener.schemaEvents``): consumers are told when a table changes shape.

pgoutput sends a Relation message before the first change of a table in each session and again after the
table's definition changed, so a Relation message is not a new shape: a reconnect, a restart or any
invalidation (a new index, a comment) sends one too. :class:`SchemaTracker` compares the *shape* each one
describes — the columns' names, their types as ``format_type`` writes them (``numeric(10,2)``), which
columns are part of the replica identity (``key``: what ``dataOld`` carries) and the replica identity
setting — with the last shape this slot announced for the table. When it differs, or the table was never
announced on this slot, it publishes, in the transaction and right before the change::

    {"id", "schema", "table", "action": "SCHEMA", "columns": [{"name", "type", "key"}, ...],
     "previous": [...] | null, "replicaIdentity": "default|index|full|nothing", "commitTime"}

on the table's topic. The comparison waits for that change: a Relation message no change uses is not
announced (with ``publish_via_partition_root`` PostgreSQL sends a partition's own after its root's, and the
change is the root's). Only tables whose changes the filter publishes are announced; the columns are those
:meth:`listener.event.EventBuilder.announced_columns` says the table's events carry.

Once per change, across restarts: each shape announced is written to ``wal_listener.schemas`` at the
position of the change it precedes (the transaction's commit LSN and that change's ordinal) before its event
can be confirmed. A session streaming from position R compares with the last shape announced before R —
what the consumers have — so a transaction read again announces what it announced the first time, with the
same id: a UUID (version 8) hashed from the slot, the commit LSN, the ordinal of the change it precedes and
the table (a change's id is not hashed, so the two kinds cannot collide). When the process starts,
rows at or after R are forgotten: they are written again when their transactions are read again.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg

from listener import catalog, metrics
from listener.backfill import BackfillError, ensure_state_table
from listener.catalog import fetch_all
from listener.config import Config
from listener.errors import DatabaseError, DatabaseSetupError
from listener.event import EventBuilder, RelationInfo, Transaction, hashed_uuid
from listener.message import Message
from listener.pgoutput import Relation, format_lsn
from listener.replication import describe_pg_error

log = logging.getLogger("listener.schema")

#: pgoutput's replica identity letter -> the word a SCHEMA event writes
REPLICA_IDENTITIES = {"d": "default", "i": "index", "f": "full", "n": "nothing"}


@dataclass(frozen=True, slots=True)
class Shape:
    """What a SCHEMA event announces about a table: ``columns`` as the event writes them, and the replica
    identity."""

    columns: list[dict[str, Any]]
    replica_identity: str


def schema_event_id(slot: str, commit_lsn: int, ordinal: int, schema: str, table: str) -> str:
    """The id of the SCHEMA event of ``schema.table`` before change ``ordinal`` of the transaction committed at
    ``commit_lsn``: the same whenever that transaction is read again."""
    parts = "\x00".join(["schema", slot, str(commit_lsn), str(ordinal), schema, table])
    return hashed_uuid(hashlib.blake2b(parts.encode(), digest_size=16).hexdigest())


def schema_body(ident: str, info: RelationInfo, shape: Shape, previous: Shape | None, commit_time: str) -> bytes:
    """The SCHEMA event."""
    return orjson.dumps({
        "id": ident, "schema": info.schema, "table": info.table, "action": "SCHEMA", "columns": shape.columns,
        "previous": None if previous is None else previous.columns, "replicaIdentity": shape.replica_identity,
        "commitTime": commit_time,
    })


class SchemaTracker:
    """Announces the shapes of the tables a slot publishes (see the module's docstring)."""

    def __init__(self, cfg: Config, builder: EventBuilder) -> None:
        self._slot = cfg.listener.slot_name
        self._builder = builder
        #: (type oid, type modifier) -> format_type's name: types are named once per process
        self._types: dict[tuple[int, int], str] = {}
        #: (schema, table) -> the shape last announced on this slot (as of the stream's position)
        self._announced: dict[tuple[str, str], Shape] = {}
        #: relation oid -> the Relation message read since the last change
        self._pending: dict[int, tuple[Relation, RelationInfo]] = {}
        self._started = False

    async def start(self, conn: psycopg.AsyncConnection[Any], lsn: int) -> None:
        """A session streams from ``lsn``: its Relation messages are compared with the shapes announced before
        it. Makes the state table when missing (one line saying how when the listener may not)."""
        try:
            await ensure_state_table(conn, catalog.SCHEMAS_TABLE_NAME)
        except BackfillError as exc:
            raise DatabaseSetupError(f"{exc} (listener.schemaEvents keeps the shapes it announced there)",
                                     reason="setup") from None
        params = {"slot": self._slot, "lsn": format_lsn(lsn)}
        try:
            if not self._started:  # nothing of this process is in flight: what is not confirmed is read again
                await conn.execute(catalog.FORGET_UNCONFIRMED_SCHEMAS_QUERY, params)
                await conn.execute(catalog.FORGET_SUPERSEDED_SCHEMAS_QUERY, params)
            rows = await fetch_all(conn, catalog.ANNOUNCED_SCHEMAS_QUERY, params)
        except psycopg.Error as exc:
            raise _database_error(exc) from None
        self._started = True
        self._pending = {}
        self._announced = {(str(s), str(t)): Shape(_columns(stored), str(identity)) for s, t, stored, identity in rows}

    def relation(self, rel: Relation, info: RelationInfo) -> None:
        """A Relation message: kept until the next change, which says whether it describes the table the change
        is published as (with publish_via_partition_root PostgreSQL also sends the partition's own, unused)."""
        if info.actions:
            self._pending[rel.oid] = (rel, info)

    async def announce(
        self, conn: psycopg.AsyncConnection[Any], txn: Transaction, oids: Sequence[int]
    ) -> list[Message]:
        """A change of the tables ``oids`` follows Relation messages: the SCHEMA events to publish before it
        (none when each shape is the one announced last)."""
        pending, self._pending = self._pending, {}
        out = []
        for oid in oids:
            if oid in pending:
                message = await self._announce(conn, *pending[oid], txn)
                if message is not None:
                    out.append(message)
        return out

    async def _announce(
        self, conn: psycopg.AsyncConnection[Any], rel: Relation, info: RelationInfo, txn: Transaction
    ) -> Message | None:
        columns = self._builder.announced_columns(info, await self._columns(conn, rel))
        shape = Shape(columns, REPLICA_IDENTITIES.get(rel.replica_identity, rel.replica_identity))
        table = (info.schema, info.table)
        previous = self._announced.get(table)
        if shape == previous:
            return None
        ordinal = txn.ordinal + 1  # of the change it precedes
        try:
            await conn.execute(catalog.SAVE_SCHEMA_QUERY, (
                self._slot, info.schema, info.table, format_lsn(txn.final_lsn), ordinal,
                orjson.dumps(shape.columns).decode(), shape.replica_identity))
        except psycopg.Error as exc:
            raise _database_error(exc) from None
        self._announced[table] = shape
        metrics.SCHEMA_CHANGES.labels(info.table).inc()
        log.info("table shape announced (SCHEMA event)", extra={"fields": {
            "schema": info.schema, "table": info.table, "first": previous is None,
            "commit_lsn": format_lsn(txn.final_lsn)}})
        ident = schema_event_id(self._slot, txn.final_lsn, ordinal, info.schema, info.table)
        body = schema_body(ident, info, shape, previous, txn.commit_time)
        message = Message(ident, info.subject, body, info.schema, info.table, "SCHEMA")
        return self._builder.finished(message, txn.commit_time)

    async def _columns(self, conn: psycopg.AsyncConnection[Any], rel: Relation) -> list[dict[str, Any]]:
        types = self._types
        missing = sorted({(c.type_oid, c.type_modifier) for c in rel.columns} - types.keys())
        if missing:
            try:
                oids, mods = [m[0] for m in missing], [m[1] for m in missing]
                rows = await fetch_all(conn, catalog.FORMAT_TYPE_QUERY, (oids, mods))
            except psycopg.Error as exc:
                raise _database_error(exc) from None
            types.update({(int(oid), int(mod)): str(name) for oid, mod, name in rows})
        return [{"name": c.name, "type": types[c.type_oid, c.type_modifier], "key": c.is_key} for c in rel.columns]


def _columns(stored: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Columns as read back from jsonb (which orders an object's keys its own way) in the event's order."""
    return [{"name": c["name"], "type": c["type"], "key": c["key"]} for c in stored]


def _database_error(exc: psycopg.Error) -> DatabaseError:
    return DatabaseError(f"postgres: cannot read or keep the table shapes announced: {describe_pg_error(exc)}")
