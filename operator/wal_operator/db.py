"""What the operator does inside PostgreSQL: the publication, the logical slot, reading slot lag, and the DDL
event trigger (spec.listener.ddl.capture).

Every function reads what exists and changes only what differs, so a reconcile can run any number
of times. A publication the operator creates carries a comment naming the resource that owns it
(``COMMENT ON PUBLICATION``): another resource finding that comment gets a conflict instead of
altering it, and a delete drops only what its own resource created. The SQL itself — builders,
catalog queries, the slot's state — is the listener's (:mod:`listener.catalog`), shared by both programs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from listener import catalog
from listener.backfill import Request, backfills, request_backfill
from listener.catalog import PublishedTable, SlotState, execute_one, fetch_all
from listener.config import DatabaseConfig
from listener.ddl import capture_state, ensure_capture
from listener.errors import DatabaseError, DatabaseSetupError
from wal_operator.render import Owner
from wal_operator.spec import PublicationTable, SpecError, WalListenerSpec

Connection = psycopg.AsyncConnection[Any]


# The listener's error types: DatabaseError = unreachable right now, try again soon; DatabaseSetupError =
# reachable but set up so it cannot work (privileges, wal_level, version): a person must act.


class Conflict(DatabaseSetupError):
    """Another resource (or something else) owns this slot or publication."""


class MissingTables(DatabaseSetupError):
    """Tables the spec names do not exist (yet)."""


class TableWithoutReplicaIdentity(DatabaseSetupError):
    """The publication would publish updates/deletes of tables without a replica identity: the
    application's UPDATE and DELETE on them would fail. Nothing is created."""


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


def _asked(spec: WalListenerSpec, table: PublishedTable) -> frozenset[str]:
    """The actions listener.filter asks for ``table`` (every action when the filter does not name it)."""
    tables = spec.listener.filter.tables or {}
    asked = {
        action.value
        for key, actions in tables.items()
        for action in actions
        if catalog.split_table_name(key)[1] == table.name and catalog.split_table_name(key)[0] in ("", table.schema)
    }
    return frozenset(asked) if asked else frozenset(catalog.ALL_ACTIONS)


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


async def plan(
    conn: Connection, spec: WalListenerSpec, current: catalog.PublicationState | None
) -> catalog.PublicationPlan:
    """The publications the spec asks for (:func:`listener.catalog.plan_publications`, the listener's rule);
    :class:`TableWithoutReplicaIdentity` when they would break the application's UPDATE/DELETE. Tables the
    publication holds already are not refused again (the listener reports them)."""
    name = spec.listener.publication_name
    via_root = spec.listener.partition_root
    wanted = desired_tables(spec)
    try:
        if wanted is None:
            rows = await fetch_all(conn, catalog.ALL_WITHOUT_IDENTITY_QUERY)
            problems = {} if current is not None and current.all_tables else catalog.identity_problems(rows)
            return catalog.plan_publications(name, None, problems, via_root=via_root)
        resolved = await resolve_tables(conn, wanted)
        params = {"schemas": [t.schema for t in resolved], "names": [t.name for t in resolved]}
        problems = catalog.identity_problems(await fetch_all(conn, catalog.WITHOUT_IDENTITY_QUERY, params))
        held = current.tables if current is not None else frozenset()
        items = [catalog.WantedTable(t, _asked(spec, t)) for t in resolved]
        return catalog.plan_publications(
            name, items, {t: d for t, d in problems.items() if t not in held}, via_root=via_root
        )
    except catalog.UnsafePublication as exc:
        text = str(exc).removeprefix("postgres: ")
        if wanted is None:
            text += "; FOR ALL TABLES also needs a superuser: list the tables in spec.listener.filter.tables instead"
        raise TableWithoutReplicaIdentity(text) from None


def _definition_hash(target: catalog.PublicationPlan) -> str:
    """A short hash of what the operator makes: a publication whose mark carries it needs no change."""
    definition = [
        {
            "all": each.tables is None,
            "tables": [[t.schema, t.name, t.where, list(t.columns)] for t in each.tables or ()],
            "publish": list(each.publish),
            "viaRoot": each.via_root,
        }
        for each in (target.main, target.inserts)
    ]
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:16]


def _alter(current: catalog.PublicationState, target: catalog.PublicationDefinition) -> list[sql.Composed]:
    """What makes ``current`` ``target`` (row filters and column lists included: tables are SET)."""
    if current.all_tables != (target.tables is None):
        # FOR ALL TABLES cannot be altered into a table list (or back): replace it
        return [catalog.drop_publication(target.name), catalog.create_publication(target)]
    out: list[sql.Composed] = []
    if target.tables:
        out.append(catalog.set_publication_tables(target.name, target.tables))
    elif target.tables is not None:
        out += [catalog.drop_publication_table(target.name, *catalog.split_table_name(q))
                for q in sorted(current.tables)]
    out.append(catalog.set_publication_publish(target.name, target.publish, target.via_root))
    return out


async def ensure_publication(
    conn: Connection, spec: WalListenerSpec, owner: Owner, server_version: int
) -> PublicationState:
    """The publication and its companion for tables without a replica identity (``<name>_inserts``), made
    or altered to the spec by the listener's rule (:func:`plan`); a publication someone else made is used
    as it is, never altered (the operator then makes no companion)."""
    name = spec.listener.publication_name
    wanted = desired_tables(spec)
    if wanted and server_version < 150000 and any(t.where or t.columns for t in wanted):
        raise DatabaseSetupError(
            f"publication row filters and column lists need PostgreSQL 15 or later; the server is "
            f"{server_version // 10000}; remove where/columns from spec.publication.tables"
        )
    current = await catalog.read_publication(conn, name)
    if current is not None and current.owner.kind == "operator" and current.owner.ident != owner.uid:
        raise Conflict(
            f"publication {name} belongs to WalListener {current.owner.resource} (uid {current.owner.ident}); "
            "choose another listener.publicationName"
        )
    if current is not None and current.owner.kind == "listener":
        raise Conflict(
            f"publication {name} was made by the listener of slot {current.owner.ident} (not by the operator); "
            "choose another listener.publicationName"
        )
    mine = current is None or current.owner.kind == "operator"
    if not mine and current is not None:  # someone else's: used as it is, never altered
        tables = [] if current.all_tables else sorted(current.tables)
        return PublicationState(name=name, all_tables=current.all_tables, tables=tables)
    target = await plan(conn, spec, current)
    spec_hash = _definition_hash(target)
    comment = owner_comment(owner, spec_hash)
    state = PublicationState(
        name=name,
        all_tables=target.main.tables is None,
        tables=sorted(t.qualified for t in (*(target.main.tables or ()), *(target.inserts.tables or ()))),
        created_by_operator=True,
    )
    statements: list[sql.Composed] = []
    inserts = await catalog.read_publication(conn, target.inserts.name)
    if inserts is not None and (inserts.owner.kind, inserts.owner.ident) != ("operator", owner.uid):
        raise Conflict(
            f"publication {inserts.name} (the companion of {name} for tables without a replica identity) exists "
            "and was not made for this resource; drop it or choose another listener.publicationName"
        )
    for definition, existing in ((target.main, current), (target.inserts, inserts)):
        if existing is None:
            statements.append(catalog.create_publication(definition))
        elif existing.owner.spec != spec_hash:
            statements += _alter(existing, definition)
        else:
            continue
        statements.append(catalog.comment_on_publication(definition.name, comment))
    if not statements:
        return state
    try:
        async with conn.transaction():
            for statement in statements:
                await execute_one(conn, statement)
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


async def tables_without_identity(conn: Connection, name: str) -> list[str]:
    """Tables the publication (and its companion) publish updates/deletes of without a replica identity."""
    names = [name, catalog.inserts_publication(name)]
    rows = await fetch_all(conn, catalog.PUBLISHED_WITHOUT_IDENTITY_QUERY, {"publications": names})
    problems = catalog.identity_problems(rows)
    return [problems[t] for t in sorted(problems)]


async def drop_publication(conn: Connection, name: str, owner: Owner) -> bool:
    """Drop the publication (and its companion ``<name>_inserts``) if this resource created it; True if dropped."""
    dropped = False
    for each in (name, catalog.inserts_publication(name)):
        current = await catalog.read_publication(conn, each)
        if current is not None and current.owner.kind == "operator" and current.owner.ident == owner.uid:
            await execute_one(conn, catalog.drop_publication(each))
            dropped = dropped or each == name
    return dropped


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


# --------------------------------------------------------------------------------------------------
# DDL capture (spec.listener.ddl.capture): the listener's event trigger, shared by every slot of the database


async def ddl_capture(conn: Connection, spec: WalListenerSpec, *, install: bool) -> tuple[str, str]:
    """Install the DDL event trigger unless it is in place (``install``: try even without superuser, which
    some managed services' admin roles can; else only as a superuser); (reason, problem), problem '' when DDL
    is captured."""
    state = await capture_state(conn)
    if not state.installed and (install or state.superuser):
        state, _ = await ensure_capture(conn)
    return state.problem(conn.info.user, spec.database.name)
