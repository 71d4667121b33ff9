"""What the operator does inside PostgreSQL: the publication, the logical slot, and reading slot lag.

Every function reads what exists and changes only what differs, so a reconcile can run any number
of times. A publication the operator creates carries a comment naming the resource that owns it
(``COMMENT ON PUBLICATION``): another resource finding that comment gets a conflict instead of
altering it, and a delete drops only what its own resource created. The SQL itself — builders,
catalog queries, the slot's state — is the listener's (:mod:`listener.catalog`), shared by both programs.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

import psycopg

from listener import catalog
from listener.backfill import Request, backfills, request_backfill
from listener.catalog import PublicationDefinition, PublishedTable, SlotState, execute_one, fetch_all, fetch_one
from listener.config import Action, DatabaseConfig
from listener.errors import DatabaseError, DatabaseSetupError
from wal_operator.render import Owner
from wal_operator.spec import PublicationTable, SpecError, WalListenerSpec

_OWNER = re.compile(r"wal-listener-operator uid=(?P<uid>\S+) resource=(?P<resource>\S+) spec=(?P<spec>\S+)")
Connection = psycopg.AsyncConnection[Any]


# The listener's error types: DatabaseError = unreachable right now, try again soon; DatabaseSetupError =
# reachable but set up so it cannot work (privileges, wal_level, version): a person must act.


class Conflict(DatabaseSetupError):
    """Another resource (or something else) owns this slot or publication."""


class MissingTables(DatabaseSetupError):
    """Tables the spec names do not exist (yet)."""


def owner_comment(owner: Owner, spec_hash: str) -> str:
    return f"wal-listener-operator uid={owner.uid} resource={owner.namespace}/{owner.name} spec={spec_hash}"


@dataclass
class PublicationState:
    name: str
    all_tables: bool
    tables: list[str] = field(default_factory=list)
    created_by_operator: bool = False
    changed: bool = False


async def connect(db: DatabaseConfig) -> Connection:
    try:
        conn = await psycopg.AsyncConnection.connect(
            db.conninfo(application_name="wal-listener-operator", connect_timeout="5"), autocommit=True
        )
    except psycopg.OperationalError as exc:
        text = first_line(exc)
        if "password authentication failed" in text or "no pg_hba.conf entry" in text:
            raise DatabaseSetupError(f"PostgreSQL {db.where} refused the login: {text}") from None
        if "does not exist" in text:
            raise DatabaseSetupError(f"PostgreSQL {db.where}: {text}") from None
        raise DatabaseError(f"cannot connect to PostgreSQL at {db.where}: {text}") from None
    return conn


async def check_server(conn: Connection) -> int:
    """The server version number; refuses a server that cannot do logical replication."""
    info = await catalog.server_info(conn)
    if info.wal_level_problem():
        raise DatabaseSetupError(info.wal_level_problem())
    return info.version


# --------------------------------------------------------------------------------------------------
# publication


def desired_tables(spec: WalListenerSpec) -> list[PublicationTable] | None:
    """The publication's tables as the spec asks, or None for FOR ALL TABLES."""
    if spec.publication.tables:
        return list(spec.publication.tables)
    tables = spec.listener.filter.tables
    if tables:
        return [PublicationTable.model_validate({"name": name}) for name in sorted(tables)]
    return None


def desired_actions(spec: WalListenerSpec) -> list[str]:
    """The publish option: only the actions the filter asks for, when it lists tables."""
    tables = spec.listener.filter.tables
    if not tables or spec.publication.tables:
        return [a.value for a in Action]
    wanted = {action for actions in tables.values() for action in actions}
    return [a.value for a in Action if a in wanted] or [a.value for a in Action]


async def resolve_tables(
    conn: Connection, tables: list[PublicationTable]
) -> list[PublishedTable]:
    """Schema-qualify every table ('users' means every schema's users); MissingTables if one is absent."""
    resolved: list[PublishedTable] = []
    missing: list[str] = []
    for table in tables:
        schema, name = catalog.split_table_name(table.name)
        rows = await fetch_all(conn, catalog.RESOLVE_TABLE_QUERY, {"name": name, "schema": schema})
        if not rows:
            missing.append(table.name)
        resolved.extend(PublishedTable(found, relname, tuple(table.columns), table.where) for found, relname in rows)
    if missing:
        raise MissingTables(f"tables not found in the database: {', '.join(missing)}")
    return resolved


async def ensure_publication(
    conn: Connection, spec: WalListenerSpec, owner: Owner, server_version: int
) -> PublicationState:
    name = spec.listener.publication_name
    wanted = desired_tables(spec)
    actions = desired_actions(spec)
    if wanted and server_version < 150000 and any(t.where or t.columns for t in wanted):
        raise DatabaseSetupError(
            f"publication row filters and column lists need PostgreSQL 15 or later; the server is "
            f"{server_version // 10000}; remove where/columns from spec.publication.tables"
        )
    resolved = await resolve_tables(conn, wanted) if wanted else None
    target = PublicationDefinition(name, None if resolved is None else tuple(resolved), tuple(actions))
    definition = {
        "all": resolved is None,
        "tables": [[t.schema, t.name, t.where, list(t.columns)] for t in resolved or []],
        "publish": actions,
    }
    spec_hash = hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:16]
    comment = owner_comment(owner, spec_hash)

    row = await fetch_one(conn, catalog.PUBLICATION_QUERY, (name,))
    state = PublicationState(name=name, all_tables=resolved is None, tables=[t.qualified for t in resolved or []])

    try:
        if row is None:
            async with conn.transaction():
                await execute_one(conn, catalog.create_publication(target))
                await execute_one(conn, catalog.comment_on_publication(name, comment))
            state.created_by_operator = state.changed = True
            return state

        all_tables, current_comment = row
        found = _OWNER.match(current_comment or "")
        if found and found["uid"] != owner.uid:
            raise Conflict(
                f"publication {name} belongs to WalListener {found['resource']} (uid {found['uid']}); "
                "choose another listener.publicationName"
            )
        state.created_by_operator = bool(found)
        current_tables = await _current_tables(conn, name)
        same = (
            (found is None or found["spec"] == spec_hash)
            and bool(all_tables) == (resolved is None)
            and (resolved is None or sorted(current_tables) == sorted(state.tables))
        )
        if same:
            return state
        async with conn.transaction():
            if bool(all_tables) != (resolved is None):
                # FOR ALL TABLES cannot be altered into a table list (or back): replace it
                await execute_one(conn, catalog.drop_publication(name))
                await execute_one(conn, catalog.create_publication(target))
            else:
                if resolved is not None:
                    await execute_one(conn, catalog.set_publication_tables(name, resolved))
                await execute_one(conn, catalog.set_publication_publish(name, actions))
            if found is not None:  # a publication someone else created stays theirs
                await execute_one(conn, catalog.comment_on_publication(name, comment))
        state.changed = True
        return state
    except psycopg.errors.InsufficientPrivilege as exc:
        raise DatabaseSetupError(f"cannot manage publication {name}: {first_line(exc)}") from None
    except (
        psycopg.errors.SyntaxError,
        psycopg.errors.UndefinedColumn,
        psycopg.errors.InvalidParameterValue,
        psycopg.errors.FeatureNotSupported,
        psycopg.errors.UndefinedFunction,
        psycopg.errors.DatatypeMismatch,
        psycopg.errors.InvalidColumnReference,
        psycopg.errors.InvalidObjectDefinition,
    ) as exc:
        raise SpecError(f"spec.publication: PostgreSQL refuses publication {name}: {first_line(exc)}") from None


async def _current_tables(conn: Connection, name: str) -> list[str]:
    return [row[0] for row in await fetch_all(conn, catalog.PUBLICATION_TABLES_QUERY, (name,))]


async def drop_publication(conn: Connection, name: str, owner: Owner) -> bool:
    """Drop the publication if this resource created it; True if dropped."""
    row = await fetch_one(conn, catalog.PUBLICATION_QUERY, (name,))
    if row is None:
        return False
    found = _OWNER.match(row[1] or "")
    if not found or found["uid"] != owner.uid:
        return False
    await execute_one(conn, catalog.drop_publication(name))
    return True


# --------------------------------------------------------------------------------------------------
# slot


async def slot_status(conn: Connection, name: str) -> SlotState | None:
    return await catalog.read_slot(conn, name)


def failover_wanted(spec: WalListenerSpec, server_version: int) -> bool:
    try:
        return catalog.failover_wanted(spec.listener.failover, server_version)
    except ValueError as exc:
        raise SpecError(f"spec.{exc}") from None


async def ensure_slot(conn: Connection, name: str, dbname: str, failover: bool = False) -> tuple[SlotState, bool]:
    """The slot (created when missing, with FAILOVER when asked) and whether it was created now."""
    state = await catalog.read_slot(conn, name)
    if state is not None:
        if state.mismatch(dbname):
            raise Conflict(state.mismatch(dbname))
        if state.wal_status == "lost":
            raise DatabaseSetupError(
                f"replication slot {name} is invalidated (wal_status lost): changes were lost; drop the slot "
                "(SELECT pg_drop_replication_slot(...)) so the operator creates it anew, then resync consumers"
            )
        return state, False
    try:
        await conn.execute("SET statement_timeout = '60s'")
        await conn.execute(catalog.CREATE_FAILOVER_SLOT_QUERY if failover else catalog.CREATE_SLOT_QUERY, (name,))
    except psycopg.errors.DuplicateObject:
        pass  # created concurrently (the listener itself); read it below
    except (psycopg.errors.InsufficientPrivilege, psycopg.errors.ConfigurationLimitExceeded) as exc:
        raise DatabaseSetupError(f"cannot create replication slot {name}: {first_line(exc)}") from None
    except psycopg.errors.QueryCanceled:
        raise DatabaseError(
            f"creating replication slot {name} waited 60s for running transactions to finish; retrying"
        ) from None
    finally:
        await conn.execute("RESET statement_timeout")
    state = await catalog.read_slot(conn, name)
    if state is None:
        raise DatabaseError(f"replication slot {name} vanished right after it was created; retrying")
    return state, True


async def drop_slot(conn: Connection, name: str) -> SlotState | None:
    """Drop the slot if it is inactive; returns it as it was (``active``: not dropped, wait), None if gone."""
    state = await catalog.read_slot(conn, name)
    if state is None or state.active:
        return state
    try:
        await conn.execute(catalog.DROP_SLOT_QUERY, (name,))
    except psycopg.errors.UndefinedObject:
        return None
    except psycopg.errors.ObjectInUse:
        return await catalog.read_slot(conn, name)
    return None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------------
# backfills


async def queue_backfills(conn: Connection, spec: WalListenerSpec) -> list[str]:
    """Ask for every ``spec.backfills`` entry not asked for before (a name runs once); the names queued now."""
    queued = []
    for entry in spec.backfills:
        if await request_backfill(conn, spec.listener.slot_name, entry.name, entry.tables, entry.where) is not None:
            queued.append(entry.name)
    return queued


async def backfill_states(conn: Connection, slot: str) -> list[Request]:
    return await backfills(conn, slot)
