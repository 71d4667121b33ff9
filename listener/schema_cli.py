"""``wal-listener schema [TABLE...]``: print the JSON Schema (draft 2020-12) of tables' events.

Reads the tables' columns, their types and what the publication publishes of them from the database of the
config (the listener need not run) and prints :mod:`listener.event_schema`'s document: for one table its
schema, for several (or none named: every table the publication publishes and ``listener.filter`` covers)
one schema any of their events validates against. It describes the wal-listener event (the default
format, and the ``data`` of CloudEvents).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, TextIO

import orjson
import psycopg

from listener import catalog
from listener.backfill import BackfillError, named_tables, published_columns, published_tables
from listener.config import Config
from listener.errors import ConfigError
from listener.event_schema import Document, EventColumn
from listener.filter import TableFilter
from listener.replication import Database
from listener.transforms import TEXT_OID, Transforms
from listener.types import TypeRegistry


async def run_schema_command(cfg: Config, tables: Sequence[str], out: TextIO) -> int:
    if cfg.publisher.format == "debezium":
        raise ConfigError(
            "schema: the JSON Schema describes wal-listener events, and publisher.format is debezium (Debezium's "
            "records have their own shape)"
        )
    db = Database(cfg)
    await db.connect()
    try:
        conn = db.conn
        version = (await catalog.server_info(conn)).version
        wanted = TableFilter(cfg.listener.filter)
        transforms = Transforms(cfg.listener, "")
        names = await _tables(conn, cfg, wanted, tables)
        columns: dict[tuple[str, str], list[EventColumn]] = {}
        for schema, table in names:
            row = await catalog.fetch_one(
                conn, catalog.TABLE_QUERY, {"publication": cfg.listener.publication_name, "schema": schema,
                                            "table": table})
            assert row is not None  # resolved just now
            found, _ = await published_columns(conn, cfg.listener.publication_name, schema, table, int(row[0]), version)
            columns[schema, table] = as_published(
                transforms, schema, table,
                [EventColumn(str(c[0]), int(c[1]), str(c[7]), bool(c[5]), bool(c[6])) for c in found],
            )
        registry = TypeRegistry()
        await db.load_types(registry, sorted({c.type_oid for found in columns.values() for c in found}))
        document = Document(registry, await _enum_labels(conn, registry, columns))
        described = {
            f"{schema}.{table}": document.table(schema, table, found, sorted(wanted.actions(schema, table) | {"READ"}),
                                                cfg.listener.schema_events)
            for (schema, table), found in columns.items()
        }
        out.write(orjson.dumps(document.finish(described), option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    finally:
        await db.close()


def as_published(transforms: Transforms, schema: str, table: str, columns: list[EventColumn]) -> list[EventColumn]:
    """The columns as the table's events carry them under its transform (listener.transforms): excluded ones
    left out, hashed or redacted ones text, ones masked to null nullable."""
    transform = transforms.relation(schema, table, [c.name for c in columns], [False] * len(columns))
    if transform is None:
        return columns
    kinds = {transform.names[at]: kind for at, kind in transform.masks}
    out = []
    for i in transform.kept:
        column = columns[i]
        kind = kinds.get(column.name)
        if kind == "null":
            column = dataclasses.replace(column, not_null=False)
        elif kind is not None:
            column = dataclasses.replace(column, type_oid=TEXT_OID, type_name="text")
        out.append(column)
    return out


async def _tables(
    conn: psycopg.AsyncConnection[Any], cfg: Config, wanted: TableFilter, tables: Sequence[str]
) -> list[tuple[str, str]]:
    """The tables named ('users' is every schema's), each existing and covered by listener.filter; none named:
    the publication's."""
    if not tables:
        published = [catalog.split_table_name(name) for name in await published_tables(conn, cfg)]
        if not published:
            raise ConfigError(
                f"schema: publication {cfg.listener.publication_name!r} publishes no table listener.filter covers "
                "(the listener makes it when it first starts); name the tables: wal-listener schema TABLE..."
            )
        return published
    out: list[tuple[str, str]] = []
    for name in tables:
        try:
            out += await named_tables(conn, wanted, name, "schema")
        except BackfillError as exc:
            raise ConfigError(str(exc)) from None
    return out


async def _enum_labels(
    conn: psycopg.AsyncConnection[Any], registry: TypeRegistry, columns: dict[tuple[str, str], list[EventColumn]]
) -> dict[int, list[str]]:
    """The labels of the enum types the columns' values are (arrays and domains looked through)."""
    bases: set[int] = set()
    for found in columns.values():
        for column in found:
            oid = registry.base(column.type_oid)
            while (element := registry.element(oid)) is not None:
                oid = registry.base(element)
            bases.add(oid)
    rows = await catalog.fetch_all(conn, catalog.ENUM_LABELS_QUERY, (sorted(bases),))
    return {int(oid): list(labels) for oid, labels in rows}
