"""PostgreSQL SQL shared by the listener and the operator: pure builders and one-statement execution.

Everything a user or a resource supplies reaches SQL in one of three ways, and only these:

* a name (table, column, publication, slot) as ``sql.Identifier`` — never spliced as text;
* a value as a query parameter, or as ``sql.Literal`` where PostgreSQL takes no parameters (DDL);
* an expression (a publication row filter, a backfill ``--where``) checked by
  :func:`check_expression` so that it cannot leave the parentheses it is put in, and executed by
  :func:`execute_one`, which uses the extended query protocol: the server refuses a second statement.

The builders return ``sql.Composed`` and touch no connection, so they are tested without a server.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from psycopg import AsyncConnection, sql
from psycopg.rows import tuple_row

from listener.pgoutput import parse_lsn

#: an unquoted PostgreSQL identifier, at most 63 bytes (NAMEDATALEN - 1)
IDENTIFIER_PATTERN = r"[A-Za-z_][A-Za-z0-9_$]{0,62}"
#: ``table`` or ``schema.table``
TABLE_NAME_PATTERN = rf"^(?:{IDENTIFIER_PATTERN}\.)?{IDENTIFIER_PATTERN}$"
#: a publication name a resource may use: letters, digits, ``_`` and ``-``
PUBLICATION_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$"
#: the longest row filter or ``--where`` accepted
MAX_EXPRESSION_LENGTH = 4096

_IDENTIFIER = re.compile(IDENTIFIER_PATTERN)
_TABLE_NAME = re.compile(TABLE_NAME_PATTERN)
_CLOSING = {")": "(", "]": "["}


class ExpressionError(ValueError):
    """A user-supplied SQL expression was refused before it reached the server."""


def is_identifier(name: str) -> bool:
    """True for a plain (unquoted) identifier: letters, digits, ``_`` and ``$``, not starting with a digit."""
    return _IDENTIFIER.fullmatch(name) is not None


def is_table_name(name: str) -> bool:
    """True for ``table`` or ``schema.table`` made of plain identifiers."""
    return _TABLE_NAME.fullmatch(name) is not None


def check_expression(text: str) -> str:
    """Return ``text`` if it is a single SQL expression that stays inside the parentheses it is put in.

    Refused: an empty text, ``;``, comments (``--``, ``/*``), ``$`` (dollar quoting, parameters),
    backslashes (their meaning depends on ``standard_conforming_strings``), control characters,
    unterminated quotes, and parentheses or brackets that do not pair up outside string literals and
    quoted identifiers. What remains is checked by PostgreSQL itself when the statement runs.
    """
    if not text.strip():
        raise ExpressionError("is empty; give a boolean SQL expression such as status = 'paid'")
    if len(text) > MAX_EXPRESSION_LENGTH:
        raise ExpressionError(f"is {len(text)} characters long; at most {MAX_EXPRESSION_LENGTH} are allowed")
    stack: list[str] = []
    i, end = 0, len(text)
    while i < end:
        char = text[i]
        if char in "'\"":
            i = _skip_quoted(text, i)
            continue
        if char == ";":
            raise ExpressionError("must be one expression: ';' is not allowed")
        if text.startswith(("--", "/*"), i):
            raise ExpressionError("must not contain SQL comments (-- or /*)")
        if char == "$":
            raise ExpressionError("must not contain '$' (dollar quoting or parameters)")
        if char == "\\":
            raise ExpressionError("must not contain a backslash")
        if char < " " and char not in "\t\n\r":
            raise ExpressionError(f"must not contain the control character {char!r}")
        if char in "([":
            stack.append(char)
        elif char in ")]":
            if not stack or stack.pop() != _CLOSING[char]:
                raise ExpressionError(f"has an unmatched {char!r}")
        i += 1
    if stack:
        raise ExpressionError(f"has an unclosed {stack[-1]!r}")
    return text


def _skip_quoted(text: str, start: int) -> int:
    """The index just after the quoted literal or identifier starting at ``start`` (doubled quotes escape)."""
    quote = text[start]
    i = start + 1
    while True:
        close = text.find(quote, i)
        if close < 0:
            what = "string literal" if quote == "'" else "quoted identifier"
            raise ExpressionError(f"has an unterminated {what}")
        inner = text[i:close]
        if "\\" in inner:
            raise ExpressionError("must not contain a backslash")
        if "\x00" in inner:
            raise ExpressionError("must not contain a NUL character")
        if text.startswith(quote, close + 1):
            i = close + 2
            continue
        return close + 1


# --------------------------------------------------------------------------------------------------
# publications

#: the actions a publication can publish, in the order PostgreSQL writes them
ALL_ACTIONS = ("insert", "update", "delete", "truncate")
#: what may be published for a table without a replica identity: once any publication publishes UPDATE or
#: DELETE for such a table, PostgreSQL refuses the application's UPDATE and DELETE on it
SAFE_WITHOUT_IDENTITY = frozenset({"insert", "truncate"})
#: the companion publication of ``<name>``: tables without a replica identity that publish only inserts
INSERTS_SUFFIX = "_inserts"
#: the longest identifier PostgreSQL keeps (NAMEDATALEN - 1 bytes; longer ones are cut with a notice)
MAX_NAME_BYTES = 63


@dataclass(frozen=True)
class PublishedTable:
    """A schema-qualified table of a publication, with an optional column list and row filter."""

    schema: str
    name: str
    columns: tuple[str, ...] = ()
    where: str = ""

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True)
class PublicationDefinition:
    """What a publication should hold: ``tables`` None means FOR ALL TABLES, ``()`` no table (yet)."""

    name: str
    tables: tuple[PublishedTable, ...] | None
    publish: tuple[str, ...] = ALL_ACTIONS
    #: publish_via_partition_root: changes of partitions as their root table (None: the server's default)
    via_root: bool | None = None


def table_clause(table: PublishedTable) -> sql.Composed:
    """``TABLE "s"."t" ("a", "b") WHERE (expr)`` with the expression checked."""
    parts: list[sql.Composable] = [sql.SQL("TABLE "), sql.Identifier(table.schema, table.name)]
    if table.columns:
        parts += [sql.SQL(" ("), sql.SQL(", ").join(sql.Identifier(c) for c in table.columns), sql.SQL(")")]
    if table.where:
        parts += [sql.SQL(" WHERE ("), sql.SQL(check_expression(table.where)), sql.SQL(")")]
    return sql.Composed(parts)


def _target(tables: Sequence[PublishedTable] | None) -> sql.Composable:
    if tables is None:
        return sql.SQL(" FOR ALL TABLES")
    if not tables:
        return sql.SQL("")  # a publication without tables: they are added when they exist
    return sql.SQL(" FOR ") + sql.SQL(", ").join(table_clause(t) for t in tables)


def _options(publish: Sequence[str], via_root: bool | None) -> sql.Composed:
    options = [sql.SQL("publish = {}").format(sql.Literal(", ".join(publish)))]
    if via_root is not None:
        options.append(sql.SQL("publish_via_partition_root = {}").format(sql.SQL("true" if via_root else "false")))
    return sql.SQL(", ").join(options)


def create_publication(definition: PublicationDefinition) -> sql.Composed:
    return sql.SQL("CREATE PUBLICATION {}{} WITH ({})").format(
        sql.Identifier(definition.name), _target(definition.tables), _options(definition.publish, definition.via_root)
    )


def set_publication_tables(name: str, tables: Sequence[PublishedTable]) -> sql.Composed:
    return sql.SQL("ALTER PUBLICATION {} SET {}").format(
        sql.Identifier(name), sql.SQL(", ").join(table_clause(t) for t in tables)
    )


def set_publication_publish(name: str, publish: Sequence[str], via_root: bool | None = None) -> sql.Composed:
    return sql.SQL("ALTER PUBLICATION {} SET ({})").format(sql.Identifier(name), _options(publish, via_root))


def add_publication_table(name: str, table: PublishedTable) -> sql.Composed:
    return sql.SQL("ALTER PUBLICATION {} ADD {}").format(sql.Identifier(name), table_clause(table))


def drop_publication_table(name: str, schema: str, table: str) -> sql.Composed:
    return sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(sql.Identifier(name), sql.Identifier(schema, table))


def comment_on_publication(name: str, comment: str) -> sql.Composed:
    return sql.SQL("COMMENT ON PUBLICATION {} IS {}").format(sql.Identifier(name), sql.Literal(comment))


def drop_publication(name: str) -> sql.Composed:
    return sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(name))


def inserts_publication(name: str) -> str:
    """The companion of publication ``name`` for tables without a replica identity (inserts only)."""
    head = name.encode()[: MAX_NAME_BYTES - len(INSERTS_SUFFIX)].decode(errors="ignore")
    return head + INSERTS_SUFFIX


# -- who made a publication: the mark in its comment ------------------------------------------------

_LISTENER_MARK = re.compile(r"^wal-listener slot=(?P<slot>[a-z0-9_]+)")
_OPERATOR_MARK = re.compile(r"^wal-listener-operator uid=(?P<uid>\S+) resource=(?P<resource>\S+) spec=(?P<spec>\S+)")


@dataclass(frozen=True)
class PublicationOwner:
    """Who made a publication, read from its comment. ``kind`` '' : someone else (used as it is, never altered)."""

    kind: Literal["", "listener", "operator"] = ""
    #: the listener's slot, or the operator's resource uid
    ident: str = ""
    resource: str = ""  # operator: namespace/name of the WalListener
    spec: str = ""  # operator: hash of what it made the publication from


def publication_owner(comment: str | None) -> PublicationOwner:
    if found := _LISTENER_MARK.match(comment or ""):
        return PublicationOwner("listener", found["slot"])
    if found := _OPERATOR_MARK.match(comment or ""):
        return PublicationOwner("operator", found["uid"], found["resource"], found["spec"])
    return PublicationOwner()


def listener_mark(slot: str) -> str:
    """The comment of a publication the listener of ``slot`` made (and keeps to its listener.filter)."""
    return f"wal-listener slot={slot}: made by the listener of this slot, which keeps it to its listener.filter"


# -- the rule: which publications, with which tables and actions (both programs) --------------------


@dataclass(frozen=True)
class WantedTable:
    """A table to publish (schema-qualified) and the actions asked for it (lower case)."""

    table: PublishedTable
    actions: frozenset[str]


@dataclass(frozen=True)
class PublicationPlan:
    """The publications behind one listener: ``main`` holds every table with a replica identity (publishing
    the union of the actions asked), ``inserts`` the tables without one, which may only publish inserts
    and truncates (a publication's actions apply to all its tables)."""

    main: PublicationDefinition
    inserts: PublicationDefinition

    @property
    def names(self) -> list[str]:
        return [self.main.name, self.inserts.name]


class UnsafePublication(ValueError):
    """Publishing as asked would make the application's UPDATE or DELETE fail on tables without a replica
    identity; the message names them, what would break and the fixes."""

    def __init__(self, message: str, tables: Sequence[str]) -> None:
        super().__init__(message)
        self.tables = tuple(tables)


def unsafe_publication(publication: str, tables: Sequence[str], *, all_tables: bool = False) -> UnsafePublication:
    """The one line refusing to publish updates/deletes of ``tables`` (no replica identity)."""
    names = ", ".join(tables)
    where = (
        "or list the tables to publish in listener.filter.tables (FOR ALL TABLES would publish updates of every "
        "table)"
        if all_tables
        else "or leave them out of listener.filter.tables, or publish only insert (and truncate) for them"
    )
    return UnsafePublication(
        f"postgres: refusing to make publication {publication!r} publish updates/deletes of {names}: they have no "
        "replica identity, so the application's UPDATE and DELETE on them would fail (\"cannot update table ... "
        "because it does not have a replica identity and publishes updates\"); give each a primary key, or run "
        "ALTER TABLE ... REPLICA IDENTITY FULL (or REPLICA IDENTITY USING INDEX ...), " + where,
        tables,
    )


def plan_publications(
    name: str,
    wanted: Sequence[WantedTable] | None,
    without_identity: Mapping[str, str],
    *,
    via_root: bool | None = None,
    asked: frozenset[str] | None = None,
) -> PublicationPlan:
    """The publications for ``wanted`` (None: every table, FOR ALL TABLES).

    ``without_identity``: the schema-qualified tables among ``wanted`` (for FOR ALL TABLES: in the whole
    database) with no usable replica identity (themselves or one of their partitions), each with its
    description for a message (:func:`identity_problems`). Such a table goes into the ``inserts``
    publication when only inserts (and truncates) are asked for it; asked for updates or deletes, or present
    at all under FOR ALL TABLES, it is refused (:class:`UnsafePublication`). ``main`` publishes ``asked``
    (the actions of every table named, also of those that do not exist yet), by default those of ``wanted``.
    """
    inserts_name = inserts_publication(name)
    inserts_only = tuple(a for a in ALL_ACTIONS if a in SAFE_WITHOUT_IDENTITY)
    if wanted is None:
        if without_identity:
            raise unsafe_publication(name, [without_identity[t] for t in sorted(without_identity)], all_tables=True)
        return PublicationPlan(
            PublicationDefinition(name, None, ALL_ACTIONS, via_root),
            PublicationDefinition(inserts_name, (), inserts_only, via_root),
        )
    keyed: list[PublishedTable] = []
    keyless: list[PublishedTable] = []
    refused: list[str] = []
    for item in wanted:
        if item.table.qualified not in without_identity:
            keyed.append(item.table)
        elif item.actions <= SAFE_WITHOUT_IDENTITY:
            keyless.append(item.table)
        else:
            refused.append(item.table.qualified)
    if refused:
        raise unsafe_publication(name, [without_identity[t] for t in sorted(set(refused))])
    if asked is None:
        asked = frozenset().union(*(item.actions for item in wanted))
    publish = tuple(a for a in ALL_ACTIONS if a in asked) or ALL_ACTIONS
    return PublicationPlan(
        PublicationDefinition(name, tuple(_unique(keyed)), publish, via_root),
        PublicationDefinition(inserts_name, tuple(_unique(keyless)), inserts_only, via_root),
    )


def _unique(tables: Sequence[PublishedTable]) -> list[PublishedTable]:
    """Each table once, in name order (a bare name and a qualified one may resolve to the same table)."""
    return sorted({t.qualified: t for t in tables}.values(), key=lambda t: t.qualified)


@dataclass(frozen=True)
class PublicationState:
    """A publication as the catalog has it (see :data:`PUBLICATION_QUERY`)."""

    name: str
    all_tables: bool
    comment: str
    publish: tuple[str, ...]
    via_root: bool
    tables: frozenset[str] = frozenset()  # schema-qualified members (FOR TABLE), not the partitions under them

    @property
    def owner(self) -> PublicationOwner:
        return publication_owner(self.comment)


def publication_changes(current: PublicationState, target: PublicationDefinition) -> list[sql.Composed]:
    """The statements that make ``current`` what ``target`` describes (tables without row filters or column
    lists: the listener's own publications). Empty when nothing differs."""
    if current.all_tables != (target.tables is None):
        # FOR ALL TABLES cannot be altered into a table list (or back): replace it
        return [drop_publication(target.name), create_publication(target)]
    out: list[sql.Composed] = []
    if target.tables is not None:
        wanted = {t.qualified: t for t in target.tables}
        out += [add_publication_table(target.name, wanted[q]) for q in sorted(wanted.keys() - current.tables)]
        gone = sorted(current.tables - wanted.keys())
        out += [drop_publication_table(target.name, *split_table_name(q)) for q in gone]
    via_root = current.via_root if target.via_root is None else target.via_root
    if tuple(target.publish) != current.publish or via_root != current.via_root:
        out.append(set_publication_publish(target.name, target.publish, target.via_root))
    return out


#: the tables a name resolves to: 'users' is every schema's users, 'shop.users' only that one
RESOLVE_TABLE_QUERY = (
    "SELECT n.nspname, c.relname FROM pg_catalog.pg_class c "
    "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relkind IN ('r', 'p') AND c.relname = %(name)s AND (%(schema)s = '' OR n.nspname = %(schema)s) "
    "AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%%' "
    "ORDER BY 1"
)


def split_table_name(name: str) -> tuple[str, str]:
    """``'shop.users'`` -> ``('shop', 'users')``; ``'users'`` -> ``('', 'users')``."""
    schema, _, table = name.rpartition(".")
    return schema, table


#: the publication as the catalog has it: FOR ALL TABLES?, its comment (who made it), what it publishes,
#: publish_via_partition_root
PUBLICATION_QUERY = (
    "SELECT p.puballtables, pg_catalog.obj_description(p.oid, 'pg_publication'),"
    " array_remove(ARRAY[CASE WHEN p.pubinsert THEN 'insert' END, CASE WHEN p.pubupdate THEN 'update' END,"
    " CASE WHEN p.pubdelete THEN 'delete' END, CASE WHEN p.pubtruncate THEN 'truncate' END], NULL),"
    " p.pubviaroot,"
    " ARRAY(SELECT n.nspname || '.' || c.relname FROM pg_catalog.pg_publication_rel r"
    "  JOIN pg_catalog.pg_class c ON c.oid = r.prrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
    "  WHERE r.prpubid = p.oid)"
    " FROM pg_catalog.pg_publication p WHERE p.pubname = %s"
)


def publication_state(name: str, row: Sequence[Any]) -> PublicationState:
    """A :data:`PUBLICATION_QUERY` row."""
    return PublicationState(name, bool(row[0]), str(row[1] or ""), tuple(row[2]), bool(row[3]), frozenset(row[4]))


async def read_publication(conn: AsyncConnection[Any], name: str) -> PublicationState | None:
    row = await fetch_one(conn, PUBLICATION_QUERY, (name,))
    return None if row is None else publication_state(name, row)


#: the schema-qualified tables a publication publishes (FOR ALL TABLES: every table; partitions as their
#: root when it publishes via the root)
PUBLICATION_TABLES_QUERY = (
    "SELECT schemaname || '.' || tablename FROM pg_catalog.pg_publication_tables WHERE pubname = %s"
)

# -- tables without a replica identity ---------------------------------------------------------------

#: a leaf table ``l`` on which UPDATE and DELETE fail once a publication publishes them: REPLICA IDENTITY
#: NOTHING, DEFAULT without a usable primary key, or USING INDEX whose index is gone (an index that is not
#: valid and immediate cannot serve, as PostgreSQL's relcache decides)
_NO_IDENTITY = (
    "(l.relreplident = 'n'"
    " OR (l.relreplident = 'd' AND NOT EXISTS (SELECT FROM pg_catalog.pg_index i"
    "  WHERE i.indrelid = l.oid AND i.indisprimary AND i.indisvalid AND i.indimmediate))"
    " OR (l.relreplident = 'i' AND NOT EXISTS (SELECT FROM pg_catalog.pg_index i"
    "  WHERE i.indrelid = l.oid AND i.indisreplident AND i.indisvalid AND i.indimmediate)))"
)
#: each leaf of the candidate tables ``c`` (a table is its own only leaf; a partitioned table has its
#: partitions, which pg_partition_tree lists), permanent (unlogged tables are never published), with the
#: schema-qualified candidate and leaf
_LEAVES = (
    " CROSS JOIN LATERAL (SELECT c.oid AS relid, true AS isleaf WHERE c.relkind = 'r' UNION ALL"
    "  SELECT pt.relid, pt.isleaf FROM pg_catalog.pg_partition_tree(c.oid) pt WHERE c.relkind = 'p') AS t"
    " JOIN pg_catalog.pg_class l ON l.oid = t.relid JOIN pg_catalog.pg_namespace ln ON ln.oid = l.relnamespace"
    f" WHERE t.isleaf AND l.relkind = 'r' AND l.relpersistence = 'p' AND {_NO_IDENTITY}"
)
_QUALIFIED = "SELECT DISTINCT n.nspname || '.' || c.relname, ln.nspname || '.' || l.relname"
#: (table, leaf) of the tables named (schemas[i].names[i]) whose leaves lack a replica identity
WITHOUT_IDENTITY_QUERY = (
    f"{_QUALIFIED} FROM unnest(%(schemas)s::text[], %(names)s::text[]) AS w(schema, name)"
    " JOIN pg_catalog.pg_namespace n ON n.nspname = w.schema"
    " JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = w.name"
    f"{_LEAVES} ORDER BY 1, 2"
)
#: the same for every table FOR ALL TABLES would publish (user tables: oid >= FirstNormalObjectId)
ALL_WITHOUT_IDENTITY_QUERY = (
    f"{_QUALIFIED} FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
    f"{_LEAVES} AND c.oid >= 16384 AND c.relkind IN ('r', 'p') AND NOT c.relispartition ORDER BY 1, 2"
)
#: the same for the tables of the publications named (%(publications)s) that publish updates or deletes
PUBLISHED_WITHOUT_IDENTITY_QUERY = (
    f"{_QUALIFIED} FROM pg_catalog.pg_publication p"
    " JOIN pg_catalog.pg_publication_tables w ON w.pubname = p.pubname"
    " JOIN pg_catalog.pg_namespace n ON n.nspname = w.schemaname"
    " JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = w.tablename"
    f"{_LEAVES} AND p.pubname = ANY(%(publications)s) AND (p.pubupdate OR p.pubdelete) ORDER BY 1, 2"
)


def identity_problems(rows: Sequence[Sequence[Any]]) -> dict[str, str]:
    """(table, leaf) rows of the queries above -> table: its description for a message, ``public.t`` or
    ``public.ev (partitions public.ev_1, public.ev_2)``."""
    leaves: dict[str, list[str]] = {}
    for table, leaf in rows:
        leaves.setdefault(str(table), []).extend([] if leaf == table else [str(leaf)])
    return {
        table: table if not parts else f"{table} (partition{'s' if len(parts) > 1 else ''} {', '.join(parts)})"
        for table, parts in leaves.items()
    }


#: partitioned tables a publication holds whose changes it publishes as their partitions' (no
#: publish_via_partition_root): each partition then has a topic of its own
PARTITIONED_WITHOUT_ROOT_QUERY = (
    "SELECT n.nspname || '.' || c.relname FROM pg_catalog.pg_publication p"
    " JOIN pg_catalog.pg_class c ON c.relkind = 'p' AND NOT c.relispartition"
    " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
    " WHERE p.pubname = %s AND NOT p.pubviaroot AND (p.puballtables OR EXISTS (SELECT FROM"
    "  pg_catalog.pg_publication_rel r WHERE r.prpubid = p.oid AND r.prrelid = c.oid)) AND c.oid >= 16384"
    " ORDER BY 1"
)


# --------------------------------------------------------------------------------------------------
# the server, slots, types, keys


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What the listener checks of the server before it streams."""

    wal_level: str
    version: int  # server_version_num, e.g. 150007

    def wal_level_problem(self) -> str:
        """What to do when logical decoding is off ('' when it is on)."""
        if self.wal_level == "logical":
            return ""
        return (
            f"wal_level is {self.wal_level!r}; set wal_level = logical in postgresql.conf "
            "(with max_replication_slots >= 1 and max_wal_senders >= 1) and restart PostgreSQL"
        )


SERVER_QUERY = (
    "SELECT pg_catalog.current_setting('wal_level'), pg_catalog.current_setting('server_version_num')::int"
)


@dataclass(frozen=True, slots=True)
class SlotState:
    """A replication slot as ``pg_replication_slots`` (and ``pg_stat_replication``) report it; LSNs as ints."""

    name: str
    plugin: str | None
    slot_type: str
    database: str | None
    active: bool
    active_pid: int | None
    confirmed_flush_lsn: int
    restart_lsn: int
    wal_status: str | None
    safe_wal_size: int | None
    current_lsn: int
    wal_keep_size: int = -1  # max_slot_wal_keep_size in bytes; -1: no limit
    publication_exists: bool = True
    #: how far behind the reader is in time (pg_stat_replication flush lag); None without a reader
    lag_seconds: float | None = None
    #: PostgreSQL 17+: created with FAILOVER (standbys with sync_replication_slots keep a copy); None before
    failover: bool | None = None
    #: PostgreSQL 17+: this server is a standby and the slot is its synchronized copy
    synced: bool | None = None

    @property
    def retained_wal_bytes(self) -> int:
        """WAL the slot keeps on the server's disk."""
        return max(0, self.current_lsn - self.restart_lsn) if self.restart_lsn else 0

    @property
    def lag_bytes(self) -> int:
        """WAL not yet confirmed by the reader."""
        return max(0, self.current_lsn - self.confirmed_flush_lsn) if self.confirmed_flush_lsn else 0

    def mismatch(self, dbname: str) -> str:
        """Why this slot cannot be the listener's for ``dbname`` ('' when it can)."""
        if self.slot_type != "logical" or self.plugin != "pgoutput" or self.database != dbname:
            return (
                f"replication slot {self.name!r} exists as a {self.slot_type} slot (plugin {self.plugin or '-'}, "
                f"database {self.database or '-'}), not a pgoutput slot of database {dbname!r}; "
                "drop it or choose another listener.slotName"
            )
        return ""


def slot_query(server_version: int) -> str:
    """The slot's state (:func:`slot_state` reads a row); PostgreSQL 17+ also says failover and synced."""
    failover = "s.failover, s.synced" if server_version >= 170000 else "NULL::bool, NULL::bool"
    return (
        "SELECT s.slot_name, s.plugin, s.slot_type, s.database, s.active, s.active_pid,"
        " s.confirmed_flush_lsn::text, s.restart_lsn::text, s.wal_status, s.safe_wal_size,"
        " pg_catalog.pg_current_wal_lsn()::text,"
        " pg_catalog.pg_size_bytes(pg_catalog.current_setting('max_slot_wal_keep_size')),"
        " EXISTS (SELECT FROM pg_catalog.pg_publication WHERE pubname = %(publication)s),"
        " (SELECT extract(epoch FROM coalesce(r.flush_lag, r.write_lag))::float8"
        "  FROM pg_catalog.pg_stat_replication r WHERE r.pid = s.active_pid),"
        f" {failover}"
        " FROM pg_catalog.pg_replication_slots s WHERE s.slot_name = %(slot)s"
    )


CREATE_SLOT_QUERY = "SELECT pg_catalog.pg_create_logical_replication_slot(%s, 'pgoutput')"
#: PostgreSQL 17+: a slot standbys with sync_replication_slots keep a copy of
CREATE_FAILOVER_SLOT_QUERY = "SELECT pg_catalog.pg_create_logical_replication_slot(%s, 'pgoutput', false, false, true)"
#: PostgreSQL 17+: synchronized_standby_slots, and how many of the physical slots it names are being read
SYNCHRONIZED_STANDBYS_QUERY = (
    "SELECT pg_catalog.current_setting('synchronized_standby_slots'),"
    " (SELECT count(*) FROM pg_catalog.pg_replication_slots WHERE slot_type = 'physical' AND active"
    "  AND slot_name = ANY (string_to_array(replace(pg_catalog.current_setting('synchronized_standby_slots'),"
    " ' ', ''), ',')))::int"
)


def failover_wanted(setting: str, server_version: int) -> bool:
    """listener.failover (auto, true, false) on a server: auto is on for PostgreSQL 17+, the first with
    failover slots; true before 17 is a ValueError saying what to do instead."""
    if setting == "auto":
        return server_version >= 170000
    if setting == "true" and server_version < 170000:
        raise ValueError(
            f"listener.failover is true but the server is PostgreSQL {server_version // 10000}; failover slots "
            "need 17+: set it to auto or false (and keep the slot as a Patroni permanent slot to survive a failover)"
        )
    return setting == "true"


def alter_slot_failover(slot: str) -> bytes:
    """The replication command that turns FAILOVER on for an existing slot (PostgreSQL 17+)."""
    return b'ALTER_REPLICATION_SLOT "' + slot.replace('"', '""').encode() + b'" (FAILOVER true)'


DROP_SLOT_QUERY = "SELECT pg_catalog.pg_drop_replication_slot(%s)"
ADVANCE_SLOT_QUERY = "SELECT pg_catalog.pg_replication_slot_advance(%s, %s::pg_lsn)"
HEARTBEAT_QUERY = "SELECT pg_catalog.pg_logical_emit_message(false, 'wal-listener-heartbeat', '')"
#: the primary-key column names of a table, in key order
PRIMARY_KEY_QUERY = (
    "SELECT a.attname FROM pg_catalog.pg_index i"
    " CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)"
    " JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
    " WHERE i.indrelid = %s AND i.indisprimary ORDER BY k.ord"
)
#: per column of a table: whether it is NOT NULL, and the labels of its enum type (or of its array's element
#: type) in their order, joined by commas (NULL: not an enum)
COLUMN_FACTS_QUERY = (
    "SELECT a.attname, a.attnotnull,"
    " (SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder) FROM pg_catalog.pg_enum e"
    " WHERE e.enumtypid IN (a.atttypid, t.typelem))"
    " FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid"
    " WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped"
)


@dataclass(frozen=True, slots=True)
class ColumnFacts:
    """What the catalog says about a column beyond pgoutput's Relation message (for Debezium's schemas)."""

    not_null: bool
    enum_labels: str | None = None  # "sad,ok,happy": the labels of its enum type, or of its array's element type


async def column_facts(conn: AsyncConnection[Any], relation_oid: int) -> dict[str, ColumnFacts]:
    """Column name -> :class:`ColumnFacts` of a table (:data:`COLUMN_FACTS_QUERY`)."""
    rows = await fetch_all(conn, COLUMN_FACTS_QUERY, (relation_oid,))
    return {str(name): ColumnFacts(bool(not_null), labels) for name, not_null, labels in rows}


#: every table's columns in order (the transforms' check at start): schema, table, column names
TABLE_COLUMNS_QUERY = (
    "SELECT n.nspname::text, c.relname::text, array_agg(a.attname::text ORDER BY a.attnum)"
    " FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
    " JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped"
    " WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
    " GROUP BY n.nspname, c.relname"
)
#: what the type registry needs to convert values of user-defined types
PG_TYPE_QUERY = (
    "SELECT oid::int8, typtype::text, typbasetype::int8, typelem::int8, typcategory::text, typdelim::text"
    " FROM pg_catalog.pg_type WHERE oid = ANY(%s)"
)


def slot_state(row: Sequence[Any]) -> SlotState:
    """A :data:`SLOT_QUERY` row as a :class:`SlotState`."""
    active_pid = row[5]
    return SlotState(
        name=row[0],
        plugin=row[1],
        slot_type=row[2],
        database=row[3],
        active=bool(row[4]),
        active_pid=active_pid,
        confirmed_flush_lsn=parse_lsn(row[6]) if row[6] else 0,
        restart_lsn=parse_lsn(row[7]) if row[7] else 0,
        wal_status=row[8],
        safe_wal_size=row[9],
        current_lsn=parse_lsn(row[10]),
        wal_keep_size=int(row[11]),
        publication_exists=bool(row[12]),
        # PostgreSQL clears the lag columns a while after the reader caught up: then it is 0 behind
        lag_seconds=None if active_pid is None else round(float(row[13] or 0.0), 3),
        failover=row[14],
        synced=row[15],
    )


# --------------------------------------------------------------------------------------------------
# backfills: the state table, a table's shape, chunks, watermarks

#: the schema the listener keeps its backfill state in (never published)
STATE_SCHEMA = "wal_listener"
STATE_TABLE = "backfills"
#: the table shapes each slot announced in SCHEMA events (listener.schemaEvents)
SCHEMAS_TABLE = "schemas"
BACKFILL_STATES = ("requested", "running", "done", "failed")
#: the prefix of the logical messages that delimit a chunk in the WAL
WATERMARK_PREFIX = "wal_listener.watermark"


def state_table_ddl() -> list[sql.Composed]:
    """The statements that create the backfill state table (each runs on its own; idempotent)."""
    schema = sql.Identifier(STATE_SCHEMA)
    table = sql.Identifier(STATE_SCHEMA, STATE_TABLE)
    states = sql.SQL(", ").join(sql.Literal(s) for s in BACKFILL_STATES)
    return [
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} ("
            "id bigserial PRIMARY KEY, "
            "slot text NOT NULL, "
            "name text NOT NULL, "
            "tables text[] NOT NULL, "
            "where_clause text NOT NULL DEFAULT '', "
            "state text NOT NULL DEFAULT 'requested' CHECK (state IN ({})), "
            "current_table text, "
            "last_key text[], "
            "tables_done text[] NOT NULL DEFAULT '{{}}', "
            "rows_done bigint NOT NULL DEFAULT 0, "
            "rows_estimated bigint NOT NULL DEFAULT 0, "
            "chunks bigint NOT NULL DEFAULT 0, "
            "error text NOT NULL DEFAULT '', "
            "requested_at timestamptz NOT NULL DEFAULT now(), "
            "started_at timestamptz, "
            "finished_at timestamptz, "
            "updated_at timestamptz NOT NULL DEFAULT now(), "
            "UNIQUE (slot, name))"
        ).format(table, states),
        # one row per shape a slot announced (SCHEMA event), at the position of the change it preceded: the
        # listener's state as of a position is the last row before it (see listener.schema)
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} ("
            "slot text NOT NULL, "
            "schema_name text NOT NULL, "
            "table_name text NOT NULL, "
            "commit_lsn pg_lsn NOT NULL, "
            "ordinal integer NOT NULL, "
            "columns jsonb NOT NULL, "
            "replica_identity text NOT NULL, "
            "announced_at timestamptz NOT NULL DEFAULT now(), "
            "PRIMARY KEY (slot, schema_name, table_name, commit_lsn, ordinal))"
        ).format(sql.Identifier(STATE_SCHEMA, SCHEMAS_TABLE)),
    ]


def state_table_grants(role: str) -> list[sql.Composed]:
    """What a DBA grants a listener role that may not create the state tables itself."""
    table = sql.Identifier(STATE_SCHEMA, STATE_TABLE)
    who = sql.Identifier(role)
    return [
        sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(STATE_SCHEMA), who),
        sql.SQL("GRANT SELECT, INSERT, UPDATE ON {} TO {}").format(table, who),
        sql.SQL("GRANT USAGE ON SEQUENCE {} TO {}").format(
            sql.Identifier(STATE_SCHEMA, f"{STATE_TABLE}_id_seq"), who
        ),
        sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {}").format(
            sql.Identifier(STATE_SCHEMA, SCHEMAS_TABLE), who
        ),
    ]


#: whether the state table exists; read off the catalog, which needs no USAGE on the schema (to_regclass does:
#: a schema a DBA made for the DDL event trigger would make it fail for every other role)
STATE_TABLE_EXISTS_QUERY = (
    "SELECT EXISTS (SELECT FROM (SELECT %s::text AS name) AS w, pg_catalog.pg_class c"
    " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
    " WHERE n.nspname = pg_catalog.split_part(w.name, '.', 1) AND c.relname = pg_catalog.split_part(w.name, '.', 2))"
)
STATE_TABLE_NAME = f"{STATE_SCHEMA}.{STATE_TABLE}"
SCHEMAS_TABLE_NAME = f"{STATE_SCHEMA}.{SCHEMAS_TABLE}"

# -- SCHEMA events: the shapes a slot announced ------------------------------------------------------

#: a shape announced (written before its event can be confirmed; written again, the same, on a replay)
SAVE_SCHEMA_QUERY = (
    f"INSERT INTO {SCHEMAS_TABLE_NAME} (slot, schema_name, table_name, commit_lsn, ordinal, columns,"
    " replica_identity) VALUES (%s, %s, %s, %s::pg_lsn, %s, %s::jsonb, %s)"
    " ON CONFLICT (slot, schema_name, table_name, commit_lsn, ordinal)"
    " DO UPDATE SET columns = EXCLUDED.columns, replica_identity = EXCLUDED.replica_identity"
)
#: shapes announced in transactions the stream sends again from this position (%(lsn)s): a new process
#: announces them again when (and if) it reads them
FORGET_UNCONFIRMED_SCHEMAS_QUERY = (
    f"DELETE FROM {SCHEMAS_TABLE_NAME} WHERE slot = %(slot)s AND commit_lsn >= %(lsn)s::pg_lsn"
)
#: shapes followed by a newer one before this position: no longer needed
FORGET_SUPERSEDED_SCHEMAS_QUERY = (
    f"DELETE FROM {SCHEMAS_TABLE_NAME} s WHERE s.slot = %(slot)s AND s.commit_lsn < %(lsn)s::pg_lsn"
    f" AND EXISTS (SELECT FROM {SCHEMAS_TABLE_NAME} n WHERE n.slot = s.slot AND n.schema_name = s.schema_name"
    "  AND n.table_name = s.table_name AND (n.commit_lsn, n.ordinal) > (s.commit_lsn, s.ordinal)"
    "  AND n.commit_lsn < %(lsn)s::pg_lsn)"
)
#: the last shape of each table announced before this position (what the stream from there is compared with)
ANNOUNCED_SCHEMAS_QUERY = (
    "SELECT DISTINCT ON (schema_name, table_name) schema_name, table_name, columns, replica_identity"
    f" FROM {SCHEMAS_TABLE_NAME} WHERE slot = %(slot)s AND commit_lsn < %(lsn)s::pg_lsn"
    " ORDER BY schema_name, table_name, commit_lsn DESC, ordinal DESC"
)
#: the labels of enum types, in their order
ENUM_LABELS_QUERY = (
    "SELECT enumtypid::int8, array_agg(enumlabel::text ORDER BY enumsortorder) FROM pg_catalog.pg_enum"
    " WHERE enumtypid = ANY(%s::int8[]::oid[]) GROUP BY 1"
)
#: PostgreSQL's name of each (type oid, type modifier): ``numeric(10,2)``, ``character varying(20)``
FORMAT_TYPE_QUERY = (
    "SELECT t.oid, t.mod, pg_catalog.format_type(t.oid::oid, t.mod)"
    " FROM unnest(%s::int8[], %s::int4[]) AS t(oid, mod)"
)

#: the channel a new backfill request is announced on (payload: the slot), so that the listener starts it at
#: once instead of at its next look at the state table (a request by plain SQL waits for that look)
BACKFILL_CHANNEL = "wal_listener_backfill"
NOTIFY_BACKFILL_QUERY = "SELECT pg_catalog.pg_notify(%s, %s)"
LISTEN_BACKFILL_QUERY = sql.SQL("LISTEN {}").format(sql.Identifier(BACKFILL_CHANNEL))
#: a backfill request (what `wal-listener backfill`, the operator and plain SQL do); nothing if the name
#: was requested before for this slot
REQUEST_BACKFILL_QUERY = (
    f"INSERT INTO {STATE_TABLE_NAME} (slot, name, tables, where_clause) VALUES (%s, %s, %s, %s)"
    " ON CONFLICT (slot, name) DO NOTHING RETURNING id"
)
BACKFILL_COLUMNS = (
    "id, name, tables, where_clause, state, current_table, last_key, tables_done, rows_done, rows_estimated,"
    " chunks, error, requested_at, started_at, finished_at"
)
#: the next backfill of a slot to run (a running one first: resumed after a restart)
NEXT_BACKFILL_QUERY = (
    f"SELECT {BACKFILL_COLUMNS} FROM {STATE_TABLE_NAME} WHERE slot = %s AND state IN ('running', 'requested')"
    " ORDER BY state = 'requested', id LIMIT 1"
)
BACKFILLS_QUERY = f"SELECT {BACKFILL_COLUMNS} FROM {STATE_TABLE_NAME} WHERE slot = %s ORDER BY id"
BACKFILL_QUERY = f"SELECT {BACKFILL_COLUMNS} FROM {STATE_TABLE_NAME} WHERE slot = %s AND name = %s"
START_BACKFILL_QUERY = (
    f"UPDATE {STATE_TABLE_NAME} SET state = 'running', started_at = coalesce(started_at, now()),"
    " rows_estimated = %s, updated_at = now() WHERE id = %s"
)
BACKFILL_PROGRESS_QUERY = (
    f"UPDATE {STATE_TABLE_NAME} SET current_table = %s, last_key = %s, rows_done = rows_done + %s,"
    " chunks = chunks + 1, updated_at = now() WHERE id = %s"
)
BACKFILL_TABLE_DONE_QUERY = (
    f"UPDATE {STATE_TABLE_NAME} SET tables_done = array_append(tables_done, %s), current_table = NULL,"
    " last_key = NULL, updated_at = now() WHERE id = %s"
)
FINISH_BACKFILL_QUERY = (
    f"UPDATE {STATE_TABLE_NAME} SET state = %s, error = %s, finished_at = now(), updated_at = now() WHERE id = %s"
)

#: the tables of a publication
PUBLISHED_TABLES_QUERY = (
    "SELECT schemaname, tablename FROM pg_catalog.pg_publication_tables WHERE pubname = %s ORDER BY 1, 2"
)
#: the watermarks: non-transactional logical messages, at their own position in the WAL. Such a message is not
#: flushed by itself (before PostgreSQL 17's flush argument), and a walsender sends only flushed WAL: on a quiet
#: server the WAL writer flushed it up to wal_writer_delay (200 ms) later, twice per chunk. txid_current() gives
#: the statement's transaction an id, so its commit flushes the WAL up to the message at once.
WATERMARK_QUERY = "SELECT pg_catalog.pg_logical_emit_message(false, %s, %s)::text, pg_catalog.txid_current()"

#: one table as a backfill sees it: oid, replica identity, in the publication?, and two row counts:
#: reltuples (-1: never vacuumed or analyzed) and the statistics' live tuples (kept without ANALYZE)
TABLE_QUERY = (
    "SELECT c.oid, c.relreplident::text,"
    " EXISTS (SELECT FROM pg_catalog.pg_publication_tables t"
    "  WHERE t.pubname = %(publication)s AND t.schemaname = n.nspname AND t.tablename = c.relname),"
    " c.reltuples::bigint, coalesce(s.n_live_tup, 0)"
    " FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
    " LEFT JOIN pg_catalog.pg_stat_all_tables s ON s.relid = c.oid"
    " WHERE n.nspname = %(schema)s AND c.relname = %(table)s AND c.relkind IN ('r', 'p')"
)
#: its columns as pgoutput sends them (no dropped or generated ones), with the replica identity flag and
#: the position in the primary key (0: not in it) and in the replica identity index; NOT NULL?, may a value
#: be stored out of line (TOAST: left out of an UPDATE's data when unchanged)?, the type's name
COLUMNS_QUERY = (
    "SELECT a.attname, a.atttypid::int8, a.atttypmod,"
    " coalesce((SELECT k.n FROM unnest(pk.indkey) WITH ORDINALITY AS k(att, n) WHERE k.att = a.attnum), 0),"
    " coalesce((SELECT k.n FROM unnest(ri.indkey) WITH ORDINALITY AS k(att, n) WHERE k.att = a.attnum), 0),"
    " a.attnotnull, a.attlen = -1 AND a.attstorage <> 'p', pg_catalog.format_type(a.atttypid, a.atttypmod)"
    " FROM pg_catalog.pg_attribute a"
    " LEFT JOIN pg_catalog.pg_index pk ON pk.indrelid = a.attrelid AND pk.indisprimary"
    " LEFT JOIN pg_catalog.pg_index ri ON ri.indrelid = a.attrelid AND ri.indisreplident"
    " WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''"
    " ORDER BY a.attnum"
)
#: PostgreSQL 15+: the publication's column list and row filter of a table (NULL: all columns / all rows)
PUBLICATION_TABLE_QUERY = (
    "SELECT attnames, rowfilter FROM pg_catalog.pg_publication_tables"
    " WHERE pubname = %s AND schemaname = %s AND tablename = %s"
)


def chunk_query(
    schema: str, table: str, columns: Sequence[str], key: Sequence[str], *, after: bool, where: Sequence[str] = ()
) -> sql.Composed:
    """One keyset page of ``columns`` in key order: ``WHERE (key) > (%s, ...)`` when ``after``, each
    expression of ``where`` (a checked ``--where``, the publication's row filter) in its own parentheses,
    ``LIMIT %s``. Values come back in their text form, as pgoutput sends them."""
    keys = sql.SQL(", ").join(sql.Identifier(k) for k in key)
    conditions: list[sql.Composable] = []
    if after:
        conditions.append(
            sql.SQL("({}) > ({})").format(keys, sql.SQL(", ").join(sql.Placeholder() for _ in key))
        )
    conditions.extend(sql.SQL("({})").format(sql.SQL(check_expression(w))) for w in where)
    filters = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("")
    return sql.SQL("SELECT {} FROM {}{} ORDER BY {} LIMIT {}").format(
        sql.SQL(", ").join(sql.Identifier(c) for c in columns),
        sql.Identifier(schema, table),
        filters,
        keys,
        sql.Placeholder(),
    )


#: the server-side cursor a chunk is read through (one per connection, closed with its transaction)
CHUNK_CURSOR = "wal_listener_chunk"


def declare_chunk_cursor(query: sql.Composable, name: str = CHUNK_CURSOR) -> sql.Composed:
    """``DECLARE name NO SCROLL CURSOR FOR query``: a chunk's page (:func:`chunk_query`, its parameters bound
    with the DECLARE) read in pieces within one snapshot, so a page of large rows is never in memory whole."""
    return sql.SQL("DECLARE {} NO SCROLL CURSOR FOR {}").format(sql.Identifier(name), query)


def fetch_chunk_rows(count: int, name: str = CHUNK_CURSOR) -> sql.Composed:
    """``FETCH FORWARD count FROM name``: the next piece of a chunk (FETCH takes no parameters: the count is
    an integer literal)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"fetch count must be a positive integer, not {count!r}")
    return sql.SQL("FETCH FORWARD {} FROM {}").format(sql.Literal(count), sql.Identifier(name))


def estimate_query(schema: str, table: str, where: Sequence[str]) -> sql.Composed:
    """``EXPLAIN (FORMAT JSON)`` of the rows a backfill with ``where`` reads: the planner's estimate (from
    the table's current size when it was never analyzed)."""
    conditions = sql.SQL(" AND ").join(sql.SQL("({})").format(sql.SQL(check_expression(w))) for w in where)
    filters = sql.SQL(" WHERE ") + conditions if where else sql.SQL("")
    return sql.SQL("EXPLAIN (FORMAT JSON) SELECT 1 FROM {}{}").format(sql.Identifier(schema, table), filters)


def check_where_query(schema: str, table: str, where: str) -> sql.Composed:
    """A query that fails when ``where`` is not a valid boolean expression over the table (reads no row)."""
    return sql.SQL("SELECT 1 FROM {} WHERE ({}) LIMIT 0").format(
        sql.Identifier(schema, table), sql.SQL(check_expression(where))
    )


# --------------------------------------------------------------------------------------------------
# DDL capture: one event trigger function and two event triggers, shared by every listener of a database

#: the prefix of the transactional logical messages the DDL event trigger writes (one per DDL statement)
DDL_PREFIX = "wal_listener.ddl"
#: the function the event triggers run (in :data:`STATE_SCHEMA`)
DDL_FUNCTION = "capture_ddl"
#: the event triggers (their names are the database's, not a schema's) and the event each fires on
DDL_TRIGGERS = (("wal_listener_ddl_end", "ddl_command_end"), ("wal_listener_ddl_drop", "sql_drop"))
#: the longest statement text a DDL message carries, in characters (at most 256 KiB of UTF-8); a longer one is
#: left out (a cut text could hold the start of another statement)
DDL_STATEMENT_LIMIT = 65536
#: commands whose text may hold credentials (OPTIONS (password ...), CONNECTION '...'): their text is
#: never written into the WAL
DDL_SECRET_COMMANDS = ("% USER MAPPING", "% SERVER", "% SUBSCRIPTION")
#: the version of the message's content (its "v")
DDL_MESSAGE_VERSION = 1

# The function body. Everything it does happens inside one block that catches every error: an error raised in
# an event trigger function aborts the DDL statement, and this function must never break anyone's DDL. A DDL
# it could not capture gets a WARNING (caught too, should even that fail); its DECLARE has no initializers
# because those run outside the block. One message per statement, listing its objects:
# - ddl_command_end: the commands the statement ran whose tag is the statement's (CREATE TABLE, not the
#   CREATE SEQUENCE of a serial column or the CREATE INDEX of its primary key; all when none has it), each
#   with the table it is or belongs to (index, column, constraint, trigger, rule, policy, default) and, for
#   a partition, its root; a DROP statement has none here;
# - sql_drop, for DROP statements only (ALTER TABLE ... DROP COLUMN is reported at ddl_command_end): the
#   objects the statement names, and the tables, views and sequences it drops with CASCADE;
# never the listener's own schema, never temporary objects. The statement text is left out for commands
# that may carry credentials and when it is longer than DDL_STATEMENT_LIMIT characters.
# The message is followed by an empty one (the listeners skip it): the block is a subtransaction, and PostgreSQL
# files a message at the end of its WAL record, where the statement's next change in the enclosing transaction
# begins; merging the two, decoding may put that change first. The empty message takes the tie instead.
_DDL_BODY = """
DECLARE
  found jsonb;
  query text;
BEGIN
  BEGIN
    query := pg_catalog.current_query();
    IF TG_EVENT = 'sql_drop' THEN
      IF TG_TAG NOT LIKE 'DROP %' THEN
        RETURN;
      END IF;
      SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
               'type', d.object_type, 'identity', d.object_identity, 'schema', d.schema_name,
               'relid', CASE WHEN d.object_type IN ('table', 'view', 'materialized view', 'foreign table')
                             THEN d.objid::int8 END,
               'table', CASE WHEN d.object_type IN ('table', 'view', 'materialized view', 'foreign table',
                                                    'table constraint', 'trigger', 'rule', 'policy')
                             THEN pg_catalog.to_jsonb(d.address_names[1:2]) END) ORDER BY d.ordinality)
        INTO found
        FROM pg_catalog.pg_event_trigger_dropped_objects() WITH ORDINALITY AS d
       WHERE (d.original OR (d.normal AND d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass))
         AND NOT d.is_temporary
         AND d.schema_name IS DISTINCT FROM {schema}
         AND NOT (d.object_type = 'schema' AND d.object_identity = {schema});
    ELSE
      SELECT coalesce(pg_catalog.jsonb_agg(o.object ORDER BY o.ordinality) FILTER (WHERE o.own),
                      pg_catalog.jsonb_agg(o.object ORDER BY o.ordinality))
        INTO found
        FROM (SELECT c.ordinality, c.command_tag = TG_TAG AS own, pg_catalog.jsonb_build_object(
                       'type', c.object_type, 'identity', c.object_identity, 'schema', c.schema_name,
                       'relid', r.oid::int8,
                       'table', CASE WHEN r.oid IS NOT NULL
                                     THEN pg_catalog.jsonb_build_array(rn.nspname, r.relname) END,
                       'root', CASE WHEN r.relispartition THEN
                                 (SELECT pg_catalog.jsonb_build_array(pn.nspname, p.relname)
                                    FROM pg_catalog.pg_class p
                                    JOIN pg_catalog.pg_namespace pn ON pn.oid = p.relnamespace
                                   WHERE p.oid = pg_catalog.pg_partition_root(r.oid)) END) AS object
                FROM pg_catalog.pg_event_trigger_ddl_commands() WITH ORDINALITY AS c
                LEFT JOIN LATERAL (SELECT CASE c.classid
                         WHEN 'pg_catalog.pg_class'::pg_catalog.regclass THEN coalesce(
                           (SELECT i.indrelid FROM pg_catalog.pg_index i WHERE i.indexrelid = c.objid), c.objid)
                         WHEN 'pg_catalog.pg_constraint'::pg_catalog.regclass THEN
                           (SELECT k.conrelid FROM pg_catalog.pg_constraint k WHERE k.oid = c.objid)
                         WHEN 'pg_catalog.pg_trigger'::pg_catalog.regclass THEN
                           (SELECT t.tgrelid FROM pg_catalog.pg_trigger t WHERE t.oid = c.objid)
                         WHEN 'pg_catalog.pg_rewrite'::pg_catalog.regclass THEN
                           (SELECT w.ev_class FROM pg_catalog.pg_rewrite w WHERE w.oid = c.objid)
                         WHEN 'pg_catalog.pg_policy'::pg_catalog.regclass THEN
                           (SELECT y.polrelid FROM pg_catalog.pg_policy y WHERE y.oid = c.objid)
                         WHEN 'pg_catalog.pg_attrdef'::pg_catalog.regclass THEN
                           (SELECT a.adrelid FROM pg_catalog.pg_attrdef a WHERE a.oid = c.objid)
                       END AS relid) AS x ON true
                LEFT JOIN pg_catalog.pg_class r ON r.oid = x.relid AND r.relkind IN ('r', 'p', 'v', 'm', 'f')
                LEFT JOIN pg_catalog.pg_namespace rn ON rn.oid = r.relnamespace
               WHERE c.schema_name IS DISTINCT FROM 'pg_temp'
                 AND c.schema_name IS DISTINCT FROM {schema}
                 AND NOT (c.object_type = 'schema' AND c.object_identity = {schema})) AS o;
    END IF;
    IF found IS NULL THEN
      RETURN;
    END IF;
    PERFORM pg_catalog.pg_logical_emit_message(true, {prefix}, pg_catalog.jsonb_build_object(
      'v', {version}, 'command', TG_TAG, 'objects', found,
      'statement', CASE WHEN {secret} OR pg_catalog.length(query) > {limit} THEN NULL ELSE query END)::text);
    PERFORM pg_catalog.pg_logical_emit_message(true, {prefix}, '');
  EXCEPTION WHEN OTHERS THEN
    BEGIN
      RAISE WARNING 'wal_listener: this DDL statement was not captured as a DDL event: % (SQLSTATE %)',
        SQLERRM, SQLSTATE;
    EXCEPTION WHEN OTHERS THEN
      NULL;
    END;
  END;
END
"""


def _text(literal: str) -> str:
    """A constant as an SQL string literal."""
    return sql.Literal(literal).as_string(None)


#: the function's body as PostgreSQL keeps it (``prosrc``; see _DDL_BODY): a listener compares it to tell an
#: installed function of another version
DDL_FUNCTION_BODY = _DDL_BODY.format(
    schema=_text(STATE_SCHEMA),
    prefix=_text(DDL_PREFIX),
    version=DDL_MESSAGE_VERSION,
    limit=DDL_STATEMENT_LIMIT,
    secret=" OR ".join(f"TG_TAG LIKE {_text(pattern)}" for pattern in DDL_SECRET_COMMANDS),
)
_DOLLAR = "$wal_listener$"


def ddl_capture_install(role: str = "") -> list[sql.Composed]:
    """What installs (or updates) DDL capture, each statement on its own, in one transaction: idempotent, and
    serialized between listeners starting together. The function is replaced; a trigger is made only when it
    is missing (one a DBA disabled stays disabled). Needs a superuser (CREATE EVENT TRIGGER). ``role``: a
    listener's role that keeps its backfill state in the schema this may create (USAGE and CREATE on it)."""
    function = sql.Identifier(STATE_SCHEMA, DDL_FUNCTION)
    creates = sql.SQL("").join(
        sql.SQL(
            "  IF NOT EXISTS (SELECT FROM pg_catalog.pg_event_trigger WHERE evtname = {name}"
            " AND evtfoid = {signature}::pg_catalog.regprocedure) THEN\n"
            "    DROP EVENT TRIGGER IF EXISTS {trigger};\n"
            "    CREATE EVENT TRIGGER {trigger} ON {event} EXECUTE FUNCTION {function}();\n"
            "  END IF;\n"
        ).format(
            name=sql.Literal(name),
            signature=sql.Literal(f"{STATE_SCHEMA}.{DDL_FUNCTION}()"),
            trigger=sql.Identifier(name),
            event=sql.SQL(event),
            function=function,
        )
        for name, event in DDL_TRIGGERS
    )
    return [
        sql.SQL("SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext({}))").format(sql.Literal(DDL_PREFIX)),
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(STATE_SCHEMA)),
        sql.Composed([
            sql.SQL("CREATE OR REPLACE FUNCTION {}() RETURNS event_trigger LANGUAGE plpgsql SECURITY DEFINER"
                    " SET search_path = pg_catalog, pg_temp AS ").format(function),
            sql.SQL(_DOLLAR + DDL_FUNCTION_BODY + _DOLLAR),
        ]),
        sql.SQL("COMMENT ON FUNCTION {}() IS {}").format(
            function,
            sql.Literal(f"wal-listener: writes one '{DDL_PREFIX}' logical message per DDL statement for the listeners "
                        "with listener.ddl.capture (never fails the statement)"),
        ),
        sql.Composed([sql.SQL(f"DO {_DOLLAR}\nBEGIN\n"), creates, sql.SQL(f"END\n{_DOLLAR}")]),
        *([sql.SQL("GRANT USAGE, CREATE ON SCHEMA {} TO {}").format(sql.Identifier(STATE_SCHEMA), sql.Identifier(role))]
          if role else []),
    ]


def ddl_capture_remove() -> list[sql.Composed]:
    """What removes DDL capture (the triggers, then the function; the schema stays: it holds backfill state)."""
    drops = [sql.SQL("DROP EVENT TRIGGER IF EXISTS {}").format(sql.Identifier(name)) for name, _ in DDL_TRIGGERS]
    return [*drops, sql.SQL("DROP FUNCTION IF EXISTS {}()").format(sql.Identifier(STATE_SCHEMA, DDL_FUNCTION))]


#: DDL capture as installed: superuser?, the function exists?, its body is this version's?, how many of the
#: two triggers run it, and how many of those are enabled
DDL_CAPTURE_QUERY = (
    "SELECT pg_catalog.current_setting('is_superuser') = 'on', f.oid IS NOT NULL,"
    " coalesce(f.prosrc = %(body)s, false),"
    " (SELECT count(*) FROM pg_catalog.pg_event_trigger e WHERE e.evtfoid = f.oid AND e.evtname = ANY(%(names)s))::int,"
    " (SELECT count(*) FROM pg_catalog.pg_event_trigger e WHERE e.evtfoid = f.oid AND e.evtname = ANY(%(names)s)"
    "  AND e.evtenabled <> 'D')::int"
    " FROM (SELECT) AS one LEFT JOIN (SELECT p.oid, p.prosrc FROM pg_catalog.pg_proc p"
    "  JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace"
    "  WHERE n.nspname = %(schema)s AND p.proname = %(function)s AND p.pronargs = 0) AS f ON true"
)
DDL_CAPTURE_PARAMS = {
    "body": DDL_FUNCTION_BODY,
    "names": [name for name, _ in DDL_TRIGGERS],
    "schema": STATE_SCHEMA,
    "function": DDL_FUNCTION,
}
#: the logical slots of the connected database (while any remains, a listener may still need DDL capture)
DATABASE_SLOTS_QUERY = (
    "SELECT slot_name FROM pg_catalog.pg_replication_slots"
    " WHERE slot_type = 'logical' AND database = pg_catalog.current_database() ORDER BY 1"
)
#: tables (and partitioned tables) named any of %s, with their oids: which of them a filter names is decided
#: by :class:`listener.filter.TableFilter`
TABLE_OIDS_QUERY = (
    "SELECT c.oid::int8, n.nspname, c.relname FROM pg_catalog.pg_class c"
    " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') AND c.relname = ANY(%s)"
)


# --------------------------------------------------------------------------------------------------
# reads (any row factory) and execution


async def fetch_one(
    conn: AsyncConnection[Any], query: str | sql.Composed, params: Any = None
) -> tuple[Any, ...] | None:
    """One row as a tuple, whatever the connection's row factory."""
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(query, params)
        return await cur.fetchone()


async def fetch_all(
    conn: AsyncConnection[Any], query: str | sql.Composed, params: Any = None
) -> list[tuple[Any, ...]]:
    """Every row as a tuple, whatever the connection's row factory."""
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(query, params)
        return await cur.fetchall()


async def server_info(conn: AsyncConnection[Any]) -> ServerInfo:
    row = await fetch_one(conn, SERVER_QUERY)
    assert row is not None
    return ServerInfo(str(row[0]), int(row[1]))


async def read_slot(
    conn: AsyncConnection[Any], slot: str, publication: str = "", server_version: int | None = None
) -> SlotState | None:
    """The slot, or None when it does not exist."""
    if server_version is None:
        server_version = conn.info.server_version
    row = await fetch_one(conn, slot_query(server_version), {"slot": slot, "publication": publication})
    return None if row is None else slot_state(row)



async def execute_one(conn: AsyncConnection[Any], query: sql.Composed | sql.SQL, params: Any = None) -> None:
    """Run ``query`` as exactly one statement.

    psycopg sends a query without parameters through the simple query protocol, where the server runs
    every statement of a ``;``-separated text. Asking for binary results makes it use the extended
    protocol (Parse/Bind/Execute) instead, and the server refuses a text holding more than one
    statement ("cannot insert multiple commands into a prepared statement").
    """
    await conn.execute(query, params, binary=True)
