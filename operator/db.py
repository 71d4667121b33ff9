"""What the operator does inside PostgreSQL: the publication, the logical slot, and reading slot lag.

Every function reads what exists and changes only what differs, so a reconcile can run any number
of times. A publication the operator creates carries a comment naming the resource that owns it
(``COMMENT ON PUBLICATION``): another resource finding that comment gets a conflict instead of
altering it, and a delete drops only what its own resource created.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import dict_row

from listener import catalog
from listener.catalog import PublicationDefinition, PublishedTable, execute_one
from listener.config import Action, DatabaseConfig
from wal_operator.render import Owner
from wal_operator.spec import PublicationTable, SpecError, WalListenerSpec

_OWNER = re.compile(r"wal-listener-operator uid=(?P<uid>\S+) resource=(?P<resource>\S+) spec=(?P<spec>\S+)")


class DatabaseUnreachable(Exception):
    """The database cannot be reached right now; try again later."""


class DatabaseRefused(Exception):
    """The database is reachable but refuses (privileges, wal_level, version); a person must act."""


class Conflict(Exception):
    """Another resource (or something else) owns this slot or publication."""


class MissingTables(Exception):
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


@dataclass
class SlotState:
    name: str
    exists: bool
    active: bool = False
    active_pid: int | None = None
    confirmed_lsn: str = ""
    restart_lsn: str = ""
    wal_status: str = ""
    retained_wal_bytes: int = 0
    lag_bytes: int = 0
    lag_seconds: float | None = None
    created: bool = False


async def connect(db: DatabaseConfig) -> psycopg.AsyncConnection[dict[str, Any]]:
    try:
        conn = await psycopg.AsyncConnection.connect(
            db.conninfo(application_name="wal-listener-operator", connect_timeout="5"),
            autocommit=True,
            row_factory=dict_row,
        )
    except psycopg.OperationalError as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "password authentication failed" in text or "no pg_hba.conf entry" in text:
            raise DatabaseRefused(f"PostgreSQL {db.host}:{db.port} refused the login: {text}") from None
        if "does not exist" in text:
            raise DatabaseRefused(f"PostgreSQL {db.host}:{db.port}: {text}") from None
        raise DatabaseUnreachable(f"cannot connect to PostgreSQL at {db.host}:{db.port}: {text}") from None
    return conn


async def check_server(conn: psycopg.AsyncConnection[dict[str, Any]]) -> int:
    """The server version number; refuses a server that cannot do logical replication."""
    row = await (
        await conn.execute(
            "SELECT current_setting('wal_level') AS wal_level, current_setting('server_version_num')::int AS version"
        )
    ).fetchone()
    assert row is not None
    if row["wal_level"] != "logical":
        raise DatabaseRefused(
            f"wal_level is {row['wal_level']}; set wal_level = logical in postgresql.conf and restart PostgreSQL"
        )
    version: int = row["version"]
    return version


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
    conn: psycopg.AsyncConnection[dict[str, Any]], tables: list[PublicationTable]
) -> list[PublishedTable]:
    """Schema-qualify every table ('users' means every schema's users); MissingTables if one is absent."""
    resolved: list[PublishedTable] = []
    missing: list[str] = []
    for table in tables:
        schema, name = catalog.split_table_name(table.name)
        cur = await conn.execute(catalog.RESOLVE_TABLE_QUERY, {"name": name, "schema": schema})
        rows = await cur.fetchall()
        if not rows:
            missing.append(table.name)
        resolved.extend(
            PublishedTable(row["nspname"], row["relname"], tuple(table.columns), table.where) for row in rows
        )
    if missing:
        raise MissingTables(f"tables not found in the database: {', '.join(missing)}")
    return resolved


async def ensure_publication(
    conn: psycopg.AsyncConnection[dict[str, Any]], spec: WalListenerSpec, owner: Owner, server_version: int
) -> PublicationState:
    name = spec.listener.publication_name
    wanted = desired_tables(spec)
    actions = desired_actions(spec)
    if wanted and server_version < 150000 and any(t.where or t.columns for t in wanted):
        raise DatabaseRefused(
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

    row = await (
        await conn.execute(
            "SELECT p.puballtables AS all_tables, obj_description(p.oid, 'pg_publication') AS comment "
            "FROM pg_publication p WHERE p.pubname = %s",
            (name,),
        )
    ).fetchone()
    state = PublicationState(name=name, all_tables=resolved is None, tables=[t.qualified for t in resolved or []])

    try:
        if row is None:
            async with conn.transaction():
                await execute_one(conn, catalog.create_publication(target))
                await execute_one(conn, catalog.comment_on_publication(name, comment))
            state.created_by_operator = state.changed = True
            return state

        found = _OWNER.match(row["comment"] or "")
        if found and found["uid"] != owner.uid:
            raise Conflict(
                f"publication {name} belongs to WalListener {found['resource']} (uid {found['uid']}); "
                "choose another listener.publicationName"
            )
        state.created_by_operator = bool(found)
        current_tables = await _current_tables(conn, name)
        same = (
            (found is None or found["spec"] == spec_hash)
            and bool(row["all_tables"]) == (resolved is None)
            and (resolved is None or sorted(current_tables) == sorted(state.tables))
        )
        if same:
            return state
        async with conn.transaction():
            if bool(row["all_tables"]) != (resolved is None):
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
        raise DatabaseRefused(f"cannot manage publication {name}: {first_line(exc)}") from None
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


async def _current_tables(conn: psycopg.AsyncConnection[dict[str, Any]], name: str) -> list[str]:
    rows = await (
        await conn.execute(
            "SELECT schemaname || '.' || tablename AS t FROM pg_publication_tables WHERE pubname = %s", (name,)
        )
    ).fetchall()
    return [row["t"] for row in rows]


async def drop_publication(conn: psycopg.AsyncConnection[dict[str, Any]], name: str, owner: Owner) -> bool:
    """Drop the publication if this resource created it; True if dropped."""
    row = await (
        await conn.execute(
            "SELECT obj_description(p.oid, 'pg_publication') AS comment FROM pg_publication p WHERE p.pubname = %s",
            (name,),
        )
    ).fetchone()
    if row is None:
        return False
    found = _OWNER.match(row["comment"] or "")
    if not found or found["uid"] != owner.uid:
        return False
    await execute_one(conn, catalog.drop_publication(name))
    return True


# --------------------------------------------------------------------------------------------------
# slot


_SLOT_QUERY = """
SELECT slot_name, plugin, slot_type, database, active, active_pid,
       confirmed_flush_lsn::text AS confirmed_lsn, restart_lsn::text AS restart_lsn,
       coalesce(wal_status, '') AS wal_status,
       coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint AS retained,
       coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::bigint AS lag,
       (SELECT extract(epoch FROM coalesce(r.flush_lag, r.write_lag))::float8
          FROM pg_stat_replication r WHERE r.pid = s.active_pid) AS lag_seconds
FROM pg_replication_slots s WHERE slot_name = %s
"""


def _slot_state(name: str, row: dict[str, Any] | None) -> SlotState:
    if row is None:
        return SlotState(name=name, exists=False)
    return SlotState(
        name=name,
        exists=True,
        active=bool(row["active"]),
        active_pid=row["active_pid"],
        confirmed_lsn=row["confirmed_lsn"] or "",
        restart_lsn=row["restart_lsn"] or "",
        wal_status=row["wal_status"],
        retained_wal_bytes=max(int(row["retained"]), 0),
        lag_bytes=max(int(row["lag"]), 0),
        lag_seconds=_lag_seconds(row),
    )


def _lag_seconds(row: dict[str, Any]) -> float | None:
    """pg_stat_replication's flush lag of the slot's reader; None without a reader.

    PostgreSQL clears the lag columns a while after the reader has caught up and nothing new is
    decoded for it, so a reader without a measured lag is 0 seconds behind.
    """
    if row["active_pid"] is None:
        return None
    return round(float(row["lag_seconds"] or 0.0), 3)


async def slot_status(conn: psycopg.AsyncConnection[dict[str, Any]], name: str) -> SlotState:
    row = await (await conn.execute(_SLOT_QUERY, (name,))).fetchone()
    return _slot_state(name, row)


async def ensure_slot(conn: psycopg.AsyncConnection[dict[str, Any]], name: str, dbname: str) -> SlotState:
    row = await (await conn.execute(_SLOT_QUERY, (name,))).fetchone()
    if row is not None:
        if row["slot_type"] != "logical" or row["plugin"] != "pgoutput" or row["database"] != dbname:
            raise Conflict(
                f"replication slot {name} already exists as a {row['slot_type']} slot "
                f"(plugin {row['plugin'] or '-'}, database {row['database'] or '-'}); it is not a pgoutput "
                f"slot of database {dbname}; choose another listener.slotName or drop that slot"
            )
        if row["wal_status"] == "lost":
            raise DatabaseRefused(
                f"replication slot {name} is invalidated (wal_status lost): changes were lost; drop the slot "
                "(SELECT pg_drop_replication_slot(...)) so the operator creates it anew, then resync consumers"
            )
        return _slot_state(name, row)
    try:
        await conn.execute("SET statement_timeout = '60s'")
        await conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))
    except psycopg.errors.DuplicateObject:
        pass  # created concurrently (the listener itself); read it below
    except psycopg.errors.InsufficientPrivilege as exc:
        raise DatabaseRefused(f"cannot create replication slot {name}: {first_line(exc)}") from None
    except psycopg.errors.ConfigurationLimitExceeded as exc:
        raise DatabaseRefused(f"cannot create replication slot {name}: {first_line(exc)}") from None
    except psycopg.errors.QueryCanceled:
        raise DatabaseUnreachable(
            f"creating replication slot {name} waited 60s for running transactions to finish; retrying"
        ) from None
    finally:
        await conn.execute("RESET statement_timeout")
    state = await slot_status(conn, name)
    state.created = True
    return state


async def drop_slot(conn: psycopg.AsyncConnection[dict[str, Any]], name: str) -> SlotState:
    """Drop the slot if it is inactive; returns its state (``active`` means: not dropped, wait)."""
    state = await slot_status(conn, name)
    if not state.exists or state.active:
        return state
    try:
        await conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
    except psycopg.errors.UndefinedObject:
        pass
    except psycopg.errors.ObjectInUse:
        state.active = True
        return state
    state.exists = False
    return state


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
