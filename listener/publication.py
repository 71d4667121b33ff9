"""Stage 2 (setup) — the publications a listener streams, made so they never break the application's writes.

PostgreSQL refuses an application's UPDATE and DELETE on a table without a replica identity as soon as any
publication publishes updates or deletes of it. So the listener publishes only what its config asks
(the rule is :func:`listener.catalog.plan_publications`, shared with the operator):

* with ``listener.filter.tables``: ``FOR TABLE`` those tables (``users`` is every schema's ``users``),
  ``publish`` only the actions asked; a table without a replica identity for which only inserts (and
  truncates) are asked goes into the companion publication ``<name>_inserts``; asked for updates or
  deletes, it is refused (:class:`~listener.errors.PublicationRefused`, exit 2) before anything is made;
* without a filter: ``FOR ALL TABLES``, refused while the database has a table without a replica identity.

Both publications are made together, before the slot (a publication made after the slot's position cannot
be decoded by PostgreSQL 15-17), and carry the listener's mark (a comment naming the slot). Publications
with that mark follow the config at every start (tables added and dropped, ``publish`` set); a publication
someone else made is used as it is, never altered; one the listener of another slot made is refused.
Tables of the filter that do not exist yet are added when they appear (:meth:`Publications.watch`, run by
the periodic slot check), and tables that lose their replica identity later are reported there.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from listener import catalog, metrics
from listener.catalog import PublicationPlan, PublicationState, PublishedTable, WantedTable, fetch_all
from listener.config import Config
from listener.errors import DatabaseSetupError, PublicationRefused

log = logging.getLogger("listener.publication")

Connection = psycopg.AsyncConnection[Any]


class Publications:
    """The publications of one listener: what it streams (:attr:`names`), made and kept to its config."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.slot = cfg.listener.slot_name
        self.name = cfg.listener.publication_name
        self.inserts_name = catalog.inserts_publication(self.name)
        #: what START_REPLICATION streams (publication_names)
        self.names: list[str] = [self.name]
        #: the publications carry this listener's mark: it keeps them to its config
        self.own = False
        #: filter keys without a table yet (added by :meth:`watch` when they appear)
        self.missing: tuple[str, ...] = ()
        self._said_missing: tuple[str, ...] = ()
        self._said_refused: set[str] = set()
        self._said_without_identity: tuple[str, ...] = ()

    # -- at every (re)connect --------------------------------------------------------------------------

    async def ensure(self, conn: Connection, *, create: bool) -> list[str]:
        """Make the publications when missing (``create``) or keep the listener's own to the config; the
        names to stream. ``create`` False (the listener streamed before): a missing publication was dropped
        underneath it, which is reported instead (see :func:`listener.replication.publication_dropped`)."""
        main = await catalog.read_publication(conn, self.name)
        if main is None and not create:
            raise publication_dropped(self.name)
        owner = catalog.PublicationOwner() if main is None else main.owner
        if owner.kind == "listener" and owner.ident != self.slot:
            raise PublicationRefused(
                f"postgres: publication {self.name!r} was made by the listener of slot {owner.ident!r}, which keeps "
                "it to its own listener.filter; give this listener a publication of its own (listener.publicationName)"
            )
        self.own = main is None or owner.kind == "listener"
        inserts = await catalog.read_publication(conn, self.inserts_name)
        if self.own:
            plan = await self._plan(conn, main)
            await self._apply(conn, plan, main, inserts, create=create)
            inserts = await catalog.read_publication(conn, self.inserts_name)
            owner = catalog.PublicationOwner("listener", self.slot)
        else:
            await self._check_partitions(conn)
        companion = inserts is not None and owner.kind != "" and (inserts.owner.kind, inserts.owner.ident) == (
            owner.kind, owner.ident)
        self.names = [self.name, self.inserts_name] if companion else [self.name]
        return self.names

    async def _plan(self, conn: Connection, main: PublicationState | None) -> PublicationPlan:
        """The publications the config asks for; refuses what would break the application's writes. A table
        the publication holds already is not refused again (the periodic check reports it, see :meth:`watch`)."""
        via_root = self.cfg.listener.partition_root
        tables = self.cfg.listener.filter.tables
        if tables is None:
            problems = catalog.identity_problems(await fetch_all(conn, catalog.ALL_WITHOUT_IDENTITY_QUERY))
            if main is not None and main.all_tables:
                problems = {}  # made before: the periodic check reports these tables
            return self._refuse_or(lambda: catalog.plan_publications(self.name, None, problems, via_root=via_root))
        wanted, missing = await self._resolve(conn, tables)
        self.missing = missing
        problems = await self._without_identity(conn, [w.table for w in wanted])
        held = main.tables if main is not None else frozenset()
        problems = {t: d for t, d in problems.items() if t not in held}
        asked = frozenset(str(a.value) for actions in tables.values() for a in actions)
        plan = self._refuse_or(
            lambda: catalog.plan_publications(self.name, wanted, problems, via_root=via_root, asked=asked)
        )
        if missing and missing != self._said_missing:
            log.warning(
                "listener.filter.tables names tables that do not exist (yet); they are added to the publication "
                "when they appear",
                extra={"fields": {"tables": list(missing), "publication": self.name}},
            )
        self._said_missing = missing
        return plan

    def _refuse_or(self, plan: Any) -> PublicationPlan:
        try:
            result: PublicationPlan = plan()
        except catalog.UnsafePublication as exc:
            raise PublicationRefused(str(exc)) from None
        return result

    async def _resolve(
        self, conn: Connection, tables: dict[str, Any]
    ) -> tuple[list[WantedTable], tuple[str, ...]]:
        """The filter's tables, schema-qualified ('users': every schema's), and the keys with no table."""
        wanted: list[WantedTable] = []
        missing: list[str] = []
        for key, actions in tables.items():
            schema, name = catalog.split_table_name(key)
            rows = await fetch_all(conn, catalog.RESOLVE_TABLE_QUERY, {"name": name, "schema": schema})
            if not rows:
                missing.append(key)
            asked = frozenset(str(a.value) for a in actions)
            wanted.extend(WantedTable(PublishedTable(str(s), str(t)), asked) for s, t in rows)
        return wanted, tuple(missing)

    @staticmethod
    async def _without_identity(conn: Connection, tables: list[PublishedTable]) -> dict[str, str]:
        if not tables:
            return {}
        params = {"schemas": [t.schema for t in tables], "names": [t.name for t in tables]}
        return catalog.identity_problems(await fetch_all(conn, catalog.WITHOUT_IDENTITY_QUERY, params))

    async def _apply(
        self,
        conn: Connection,
        plan: PublicationPlan,
        main: PublicationState | None,
        inserts: PublicationState | None,
        *,
        create: bool,
    ) -> None:
        """Create or alter both publications to ``plan``, in one transaction, with the listener's mark."""
        if main is not None and inserts is None and not create:
            raise publication_dropped(self.inserts_name)
        mark = catalog.listener_mark(self.slot)
        statements = []
        for target, current in ((plan.main, main), (plan.inserts, inserts)):
            if current is None:
                statements += [catalog.create_publication(target), catalog.comment_on_publication(target.name, mark)]
            else:
                changes = catalog.publication_changes(current, target)
                statements += changes
                if changes and current.all_tables != (target.tables is None):
                    statements.append(catalog.comment_on_publication(target.name, mark))  # replaced: mark again
        if not statements:
            return
        try:
            async with conn.transaction():
                for statement in statements:
                    await catalog.execute_one(conn, statement)
        except psycopg.errors.InsufficientPrivilege as exc:
            all_tables = plan.main.tables is None
            raise DatabaseSetupError(
                f"postgres: user {self.cfg.database.user!r} may not "
                f"{'create' if main is None else 'alter'} publication {self.name!r}"
                f"{' FOR ALL TABLES (that needs a superuser)' if all_tables else ''}: "
                f"{str(exc).strip().splitlines()[0]}; have it made by its owner or a superuser, or list the tables "
                "in listener.filter.tables (FOR TABLE needs ownership of the tables)",
                reason="setup",
            ) from None
        except psycopg.errors.DuplicateObject:
            return  # made meanwhile by another process: the next start sees it
        tables = "all tables" if plan.main.tables is None else [t.qualified for t in plan.main.tables]
        log.info(
            "created publications" if main is None else "publications altered to follow listener.filter",
            extra={"fields": {"publication": self.name, "tables": tables, "publish": list(plan.main.publish),
                              "inserts_only": [t.qualified for t in plan.inserts.tables or ()]}},
        )

    async def _check_partitions(self, conn: Connection) -> None:
        """A publication someone else made that publishes partitions as tables of their own: said once."""
        if not self.cfg.listener.partition_root:
            return
        rows = await fetch_all(conn, catalog.PARTITIONED_WITHOUT_ROOT_QUERY, (self.name,))
        if rows:
            quoted = '"' + self.name.replace('"', '""') + '"'
            log.warning(
                "the publication publishes the changes of partitioned tables as their partitions' (each partition "
                f"its own table and topic); to publish them as the partitioned table, run ALTER PUBLICATION {quoted} "
                "SET (publish_via_partition_root = true)",
                extra={"fields": {"publication": self.name, "tables": [str(r[0]) for r in rows]}},
            )

    # -- periodically, while streaming -----------------------------------------------------------------

    async def watch(self, conn: Connection) -> None:
        """Add the filter's tables that appeared since (own publications), and report tables the streamed
        publications publish updates or deletes of that have no replica identity (the gauge and one ERROR
        line per change of the set)."""
        if self.own and self.missing:
            await self._add_appeared(conn)
        rows = await fetch_all(conn, catalog.PUBLISHED_WITHOUT_IDENTITY_QUERY, {"publications": self.names})
        problems = catalog.identity_problems(rows)
        metrics.PUBLICATION_TABLES_WITHOUT_IDENTITY.set(len(problems))
        found = tuple(problems[t] for t in sorted(problems))
        if found and found != self._said_without_identity:
            log.error(
                "tables of the publication have no replica identity: the application's UPDATE and DELETE on them "
                "fail while the publication publishes updates/deletes; give each a primary key or run ALTER TABLE "
                "... REPLICA IDENTITY FULL (or USING INDEX ...), or take them out of the publication",
                extra={"fields": {"tables": list(found), "publications": self.names}},
            )
        elif not found and self._said_without_identity:
            log.info("every table of the publication has a replica identity again",
                     extra={"fields": {"publications": self.names}})
        self._said_without_identity = found

    async def _add_appeared(self, conn: Connection) -> None:
        tables = self.cfg.listener.filter.tables or {}
        wanted, missing = await self._resolve(conn, {key: tables[key] for key in self.missing})
        if not wanted:
            return
        main = await catalog.read_publication(conn, self.name)
        inserts = await catalog.read_publication(conn, self.inserts_name)
        if main is None or inserts is None:
            return  # dropped: the slot check reports it
        problems = await self._without_identity(conn, [w.table for w in wanted])
        added: list[str] = []
        still: set[str] = set(missing)
        for item in wanted:
            key = next(k for k in self.missing if _names(k, item.table))
            try:
                plan = catalog.plan_publications(self.name, [item], problems)
            except catalog.UnsafePublication as exc:
                still.add(key)
                if item.table.qualified not in self._said_refused:
                    self._said_refused.add(item.table.qualified)
                    log.error(f"{exc}; the table is not added", extra={"fields": {"table": item.table.qualified}})
                continue
            target = plan.main if plan.main.tables else plan.inserts
            current = main if target is plan.main else inserts
            if item.table.qualified not in current.tables:
                try:
                    await catalog.execute_one(conn, catalog.add_publication_table(target.name, item.table))
                except psycopg.errors.DuplicateObject:
                    pass
                except psycopg.Error as exc:
                    still.add(key)
                    log.warning("could not add a table of listener.filter to the publication; retrying",
                                extra={"fields": {"table": item.table.qualified, "error": str(exc).strip()}})
                    continue
                added.append(f"{item.table.qualified} ({target.name})")
        self.missing = tuple(k for k in self.missing if k in still)
        if added:
            log.info("tables of listener.filter appeared and were added to the publication",
                     extra={"fields": {"tables": added}})
        self._said_missing = self.missing


def _names(key: str, table: PublishedTable) -> bool:
    """Whether the filter key ``key`` ('users' or 'shop.users') names ``table``."""
    schema, name = catalog.split_table_name(key)
    return name == table.name and schema in ("", table.schema)


def publication_dropped(publication: str, server_message: str = "") -> DatabaseSetupError:
    said = f" ({server_message})" if server_message else ""
    quoted = '"' + publication.replace('"', '""') + '"'
    return DatabaseSetupError(
        f"postgres: publication {publication!r} was dropped while the listener ran{said}: changes made without "
        "it are not captured (PostgreSQL 18 skips them, 15-17 cannot decode past them); create it again "
        f"(restart the listener, or CREATE PUBLICATION {quoted} ... as it was), and if the stream stays stuck drop "
        "the slot, re-snapshot and restart the listener",
        reason="publication_missing",
    )
