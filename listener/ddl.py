"""DDL events (``listener.ddl.capture``): DDL statements published in commit order with the rows.

An event trigger (``ddl_command_end`` and ``sql_drop``; its SQL is :func:`listener.catalog.ddl_capture_install`)
writes one transactional logical message per DDL statement, prefix ``wal_listener.ddl``, listing the objects
the statement made, changed or dropped (and an empty one after it, which keeps it in order). PostgreSQL decodes
it inside the statement's transaction, in order with that transaction's rows, and never when it rolls back.
Every listener of the database (every slot) reads the same message: one trigger serves them all; a listener
without capture skips the prefix silently. A listener with capture turns each object into a DDL event on
``<topic>.<topicPrefix><ddl.topic>``::

    {"id", "action": "DDL", "command": "ALTER TABLE", "objectType": "table", "object": "public.t",
     "schema": "public", "statement": "ALTER TABLE t ADD COLUMN b int", "commitTime"}

``statement`` is the text the client sent when it held this one statement, else null (several statements
sent as one query string: which of them made the event cannot be told; a command that may carry credentials;
a text longer than 65,536 characters). With ``listener.filter.tables``, only the DDL of those tables and of the
objects on them (indexes, columns, constraints, triggers, partitions) is published.

The trigger needs a superuser to install: the listener (and the operator) install it when they can, idempotently,
and otherwise say in one line what a DBA runs (``wal-listener ddl --print-sql``); the listener streams on.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import orjson
import psycopg
from psycopg import sql

from listener import catalog, pgoutput
from listener.catalog import execute_one, fetch_all, fetch_one
from listener.config import Config
from listener.event import EventBuilder, Transaction
from listener.filter import TableFilter
from listener.message import Message
from listener.replication import describe_pg_error

log = logging.getLogger("listener.ddl")

Connection = psycopg.AsyncConnection[Any]


# --------------------------------------------------------------------------------------------------
# the message the trigger writes


@dataclass(frozen=True, slots=True)
class DdlObject:
    """One object a DDL statement made, changed or dropped, as the trigger saw it."""

    type: str  # PostgreSQL's object type: table, index, table column, view, function...
    identity: str | None  # schema-qualified, quoted where needed: public.t, public."Users", public.f(integer)
    schema: str | None
    table: tuple[str, str] | None = None  # the table it is or belongs to (an index's, a column's...)
    root: tuple[str, str] | None = None  # that table's partitioned root, for a partition
    relid: int | None = None  # that table's oid


@dataclass(frozen=True, slots=True)
class DdlStatement:
    """The content of one ``wal_listener.ddl`` message."""

    command: str  # the statement's command tag: CREATE TABLE, ALTER TABLE, DROP TABLE...
    objects: tuple[DdlObject, ...]
    statement: str | None  # the client's query text (None: left out by the trigger)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _pair(value: Any) -> tuple[str, str] | None:
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
        return value[0], value[1]
    return None


def parse_message(content: bytes) -> DdlStatement:
    """A message's content; ValueError when it is not one the trigger writes."""
    data = orjson.loads(content)
    if not isinstance(data, dict) or not isinstance(data.get("command"), str):
        raise ValueError("not a DDL message: no command")
    objects = data.get("objects")
    if not isinstance(objects, list) or not all(isinstance(o, dict) for o in objects):
        raise ValueError("not a DDL message: no list of objects")
    return DdlStatement(
        command=data["command"],
        objects=tuple(
            DdlObject(
                type=str(o.get("type") or ""),
                identity=_text(o.get("identity")),
                schema=_text(o.get("schema")),
                table=_pair(o.get("table")),
                root=_pair(o.get("root")),
                relid=o["relid"] if isinstance(o.get("relid"), int) else None,
            )
            for o in objects
        ),
        statement=_text(data.get("statement")),
    )


# --------------------------------------------------------------------------------------------------
# statement text: published only when it is the one statement the client sent


def _word_char(char: str) -> bool:
    """A character that continues an identifier (before '$' it makes the '$' part of the name)."""
    return char.isalnum() or char in "_$"


def one_statement(text: str | None) -> str | None:
    """``text`` without the blanks around it when it holds exactly one SQL statement (comments and a trailing
    ``;`` allowed); None when it holds several, or when that cannot be told for sure (an unterminated quote, a
    backslash in a string whose meaning depends on ``standard_conforming_strings``, a ``BEGIN ATOMIC`` body with
    several statements): publishing the text of statements that did not make the event could publish anything,
    passwords included."""
    if text is None:
        return None
    i, end = 0, len(text)
    depth = 0
    statements = 0
    inside = False  # within a statement (a ';' at depth 0 ends it)
    while i < end:
        char = text[i]
        if char.isspace():
            i += 1
            continue
        if text.startswith("--", i):
            newline = text.find("\n", i)
            i = end if newline < 0 else newline + 1
            continue
        if text.startswith("/*", i):
            i = _skip_comment(text, i)
            if i < 0:
                return None
            continue
        if char == ";" and depth == 0:
            inside = False
            i += 1
            continue
        if not inside:
            inside = True
            statements += 1
            if statements > 1:
                return None
        after = _skip_token(text, i)
        if after < 0:
            return None
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                return None
        i = after
    return text.strip() if statements == 1 and depth == 0 else None


def _skip_comment(text: str, start: int) -> int:
    """The index after the (nestable) block comment at ``start``; -1 when it does not end."""
    depth, i = 0, start
    while i < len(text):
        if text.startswith("/*", i):
            depth += 1
            i += 2
        elif text.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    return -1


def _skip_token(text: str, i: int) -> int:
    """The index after the quoted literal, quoted identifier or dollar-quoted string at ``i`` (after the
    character at ``i`` when it starts none of them); -1 when it does not end or cannot be read for sure."""
    char = text[i]
    if char == "'":
        escaped = i > 0 and text[i - 1] in "eE" and (i < 2 or not _word_char(text[i - 2]))
        i += 1
        while i < len(text):
            if text[i] == "\\":
                if not escaped:
                    return -1  # its meaning depends on standard_conforming_strings
                i += 2
                continue
            if text[i] == "'":
                if text.startswith("''", i):
                    i += 2
                    continue
                return i + 1
            i += 1
        return -1
    if char == '"':
        close = text.find('"', i + 1)
        while close >= 0 and text.startswith('""', close):
            close = text.find('"', close + 2)
        return -1 if close < 0 else close + 1
    if char == "$" and (i == 0 or not _word_char(text[i - 1])):
        close = text.find("$", i + 1)
        tag = text[i : close + 1] if close >= 0 else ""
        if tag == "$$" or (tag and not tag[1].isdigit() and all(_word_char(c) and c != "$" for c in tag[1:-1])):
            finish = text.find(tag, close + 1)
            return -1 if finish < 0 else finish + len(tag)
    return i + 1


# --------------------------------------------------------------------------------------------------
# the trigger in the database: its state, installing it, removing it (the listener and the operator)


@dataclass(frozen=True, slots=True)
class CaptureState:
    """DDL capture as a database has it."""

    superuser: bool  # the connected user is one (CREATE EVENT TRIGGER needs it)
    function: bool  # the trigger function exists
    current: bool  # ... with this version's body
    triggers: int  # how many of the two event triggers run it
    enabled: int  # ... and are enabled
    error: str = ""  # why installing it failed, when it was tried

    @property
    def installed(self) -> bool:
        return self.function and self.current and self.triggers == len(catalog.DDL_TRIGGERS)

    def problem(self, user: str, database: str) -> tuple[str, str]:
        """(reason, one line saying what is wrong and who fixes it how); ("", "") when DDL is captured."""
        fix = "have a superuser run the SQL that `wal-listener ddl --print-sql` prints, once"
        who = (
            f" ({self.error})" if self.superuser and self.error
            else "" if self.superuser
            else f"; user {user!r} is not a superuser, which event triggers need"
        )
        if not self.function or self.triggers < len(catalog.DDL_TRIGGERS):
            reason = "NotInstalled" if self.superuser else "SuperuserMissing"
            return reason, f"the DDL event trigger is not installed in database {database!r}{who}; {fix}"
        if not self.current:
            return "Outdated", (
                f"the DDL event trigger function in database {database!r} is another wal-listener version's{who}; "
                f"{fix} (DDL events come as the installed version writes them meanwhile)"
            )
        if self.enabled < len(catalog.DDL_TRIGGERS):
            names = " and ".join(f"ALTER EVENT TRIGGER {name} ENABLE" for name, _ in catalog.DDL_TRIGGERS)
            return "Disabled", (
                f"the DDL event triggers of database {database!r} are disabled (ALTER EVENT TRIGGER ... DISABLE), "
                f"so DDL statements are not captured; {names} capture them again"
            )
        return "", ""


async def capture_state(conn: Connection) -> CaptureState:
    row = await fetch_one(conn, catalog.DDL_CAPTURE_QUERY, catalog.DDL_CAPTURE_PARAMS)
    assert row is not None
    return CaptureState(bool(row[0]), bool(row[1]), bool(row[2]), int(row[3]), int(row[4]))


async def ensure_capture(conn: Connection) -> tuple[CaptureState, bool]:
    """Install (or update) the trigger unless this version's is installed; the state after, and whether it
    was installed now. A failed attempt (no right) changes nothing and is in the state's ``error``; enabled
    or disabled triggers are left as they are."""
    state = await capture_state(conn)
    if state.installed:
        return state, False
    try:
        async with conn.transaction():
            for statement in catalog.ddl_capture_install():
                await execute_one(conn, statement)
    except psycopg.Error as exc:
        return replace(await capture_state(conn), error=describe_pg_error(exc)), False
    return await capture_state(conn), True


async def remove_capture(conn: Connection) -> tuple[str, str]:
    """Remove the trigger unless a logical slot of the database remains (a listener of another slot may need
    it): (removed, kept, failed or '' when there was none; one line saying what happened)."""
    if not (await capture_state(conn)).function:
        return "", ""
    slots = [str(row[0]) for row in await fetch_all(conn, catalog.DATABASE_SLOTS_QUERY)]
    if slots:
        return "kept", f"the DDL event trigger is kept: slots {', '.join(slots)} of the database may still need it"
    try:
        async with conn.transaction():
            for statement in catalog.ddl_capture_remove():
                await execute_one(conn, statement)
    except psycopg.Error as exc:
        return "failed", (
            f"cannot remove the DDL event trigger ({describe_pg_error(exc)}); a superuser can run the SQL that "
            "`wal-listener ddl --print-drop-sql` prints"
        )
    return "removed", "removed the DDL event trigger: no slot of the database is left to read its messages"


def script(statements: Sequence[sql.Composable]) -> str:
    """Statements as one psql script, in one transaction."""
    return "BEGIN;\n" + "".join(f"{s.as_string(None)};\n" for s in statements) + "COMMIT;"


# --------------------------------------------------------------------------------------------------
# the listener's side


class DdlEvents:
    """What a listener with ``listener.ddl.capture`` does: keep the trigger installed when it may, and turn
    each ``wal_listener.ddl`` message into the DDL events of its objects (each counts as a change of its
    transaction: ids are deterministic like the rows')."""

    def __init__(self, cfg: Config, builder: EventBuilder) -> None:
        self._builder = builder
        self._filter = TableFilter(cfg.listener.filter)
        self._names = [key.rpartition(".")[2] for key in cfg.listener.filter.tables or {}]
        self._everything = cfg.listener.filter.tables is None
        self.subject = f"{cfg.publisher.topic}.{cfg.publisher.topic_prefix}{cfg.listener.ddl.topic}"
        self._key = cfg.database.name.encode()  # one key: every DDL event of the database in one partition, in order
        self._user, self._database = cfg.database.user, cfg.database.name
        #: oids of the filter's tables: the DDL of a table renamed away from the filter's name is still its DDL
        self._known: set[int] = set()
        self._said = ""
        self._said_bad = False

    async def prepare(self, conn: Connection) -> None:
        """At every session: install or update the trigger when this user may (else say once what a DBA runs;
        streaming goes on without DDL events), and learn the oids of the filter's tables."""
        where = {"database": self._database}
        try:
            state, installed = await ensure_capture(conn)
        except psycopg.Error as exc:  # the session's next step finds out about a lost connection
            log.warning("DDL event trigger: could not check it", extra={"fields": {**where, "error": str(exc).strip()}})
            return
        if installed:
            log.info("DDL event trigger installed", extra={"fields": where})
        _, problem = state.problem(self._user, self._database)
        if problem and problem != self._said:
            log.warning(f"listener.ddl.capture: {problem}; streaming goes on without DDL events until then",
                        extra={"fields": {**where, "user": self._user}})
        elif not problem and self._said:
            log.info("DDL event trigger in place: DDL statements are captured", extra={"fields": where})
        self._said = problem
        if self._names:
            with contextlib.suppress(psycopg.Error):
                rows = await fetch_all(conn, catalog.TABLE_OIDS_QUERY, (self._names,))
                self._known.update(int(oid) for oid, schema, table in rows if self._filter.covers(schema, table))

    def events(self, msg: pgoutput.LogicalMessage, txn: Transaction) -> list[Message]:
        """The DDL events of one message (those the filter takes), each the next change of ``txn``; none for the
        empty message that follows each one (see :data:`listener.catalog.DDL_FUNCTION_BODY`)."""
        if not msg.content:
            txn.ordinal += 1
            return []
        try:
            ddl = parse_message(msg.content)
        except ValueError as exc:
            txn.ordinal += 1
            if not self._said_bad:
                self._said_bad = True
                log.error("a wal_listener.ddl message could not be read; skipped",
                          extra={"fields": {"error": str(exc), "lsn": pgoutput.format_lsn(msg.lsn)}})
            return []
        statement = one_statement(ddl.statement)
        out = []
        for obj in ddl.objects:
            if not self._wanted(ddl.command, obj):
                txn.ordinal += 1  # counted like a filtered row: later ids do not depend on the filter
                continue
            fields = {"command": ddl.command, "objectType": obj.type, "object": obj.identity, "schema": obj.schema,
                      "statement": statement}
            out.append(self._builder.custom(txn, self.subject, "DDL", fields, obj.identity or "", self._key))
        return out

    def _wanted(self, command: str, obj: DdlObject) -> bool:
        """Every object without ``filter.tables``; with it, the tables it names and the objects on them (by the
        table's or its root's name, or by the oid of a table the filter named until this rename)."""
        if self._everything:
            return True
        named = any(t is not None and self._filter.covers(*t) for t in (obj.table, obj.root))
        if obj.relid is None:
            return named
        if named and not command.startswith("DROP "):
            self._known.add(obj.relid)
            return True
        if obj.relid in self._known:
            self._known.discard(obj.relid)  # dropped, or renamed away from the filter: its last DDL event
            return True
        return named
