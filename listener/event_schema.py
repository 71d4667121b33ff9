"""The JSON Schema (draft 2020-12) of a table's events, as ``wal-listener schema`` prints it.

The envelope (``id``, ``schema``, ``table``, ``action``, ``commitTime``) and ``data``/``dataOld`` typed by
the conversion rules of :mod:`listener.types` — each column's schema is chosen from the converter the
listener uses for its type, so the two cannot disagree:

==========================  ======================================================================
column                      JSON Schema
==========================  ======================================================================
int2/int4/int8/oid/xid      ``integer``
numeric                     ``string``, exact decimal (``NaN``, ``Infinity``, ``-Infinity`` too)
float4/float8               ``number``, or the strings ``NaN``, ``Infinity``, ``-Infinity``
bool                        ``boolean``
json/jsonb                  any value
timestamptz                 ``string``, ``date-time`` in UTC; ``infinity``, BC and years past 9999 as text
timestamp                   ``string`` (``2026-01-02T03:04:05.123456``, ``infinity``...)
bytea                       ``string``, base64
uuid                        ``string``, ``uuid``
enums                       ``string``, one of the labels
arrays                      ``array`` of the element's schema (or null, or a nested array)
domains                     as their base type
anything else               ``string`` (the text form)
==========================  ======================================================================

A column that may be NULL may be ``null``. ``data`` of INSERT and READ holds every column; an UPDATE's
``data`` may lack a column whose value can be stored out of line (an unchanged TOAST value is left out,
never written as null); ``dataOld`` holds the replica identity's columns or, with REPLICA IDENTITY FULL,
all of them, so none is required there. With ``listener.schemaEvents`` the table's SCHEMA events are one
more kind of event. Pure functions: the command (:mod:`listener.schema_cli`) reads the catalog.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

from listener import types
from listener.schema import REPLICA_IDENTITIES
from listener.types import TypeRegistry

DRAFT: Final = "https://json-schema.org/draft/2020-12/schema"
#: int2vector, oidvector: arrays in the catalog, but written without braces: published as their text
VECTORS: Final = frozenset({22, 30})

_NULL: Final = {"type": "null"}
_STRING: Final = {"type": "string"}
_FLOAT: Final = {"anyOf": [{"type": "number"}, {"enum": ["NaN", "Infinity", "-Infinity"]}]}
_NUMERIC: Final = {"type": "string", "pattern": r"^(-?[0-9]+(\.[0-9]+)?|NaN|-?Infinity)$"}
_BYTEA: Final = {"type": "string", "contentEncoding": "base64", "pattern": "^[A-Za-z0-9+/]*={0,2}$"}
_UUID: Final = {"type": "string", "format": "uuid",
                 "pattern": "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"}
#: the month, day and time of day of a timestamp as the listener writes it (after the year)
_AFTER_YEAR: Final = r"-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?"
#: what RFC 3339 cannot write is published as PostgreSQL's text: infinity, BC
_NOT_RFC3339: Final = "-?infinity|.* BC"
_TIMESTAMPTZ: Final = {"anyOf": [
    {"type": "string", "format": "date-time", "pattern": f"^[0-9]{{4}}{_AFTER_YEAR}Z$"},
    {"type": "string", "pattern": f"^([0-9]{{5,}}{_AFTER_YEAR}Z|{_NOT_RFC3339})$"},  # years past 9999 too
]}
_TIMESTAMP: Final = {"type": "string", "pattern": f"^([0-9]{{4,}}{_AFTER_YEAR}|{_NOT_RFC3339})$"}
#: converter -> the JSON its values have (a converter not listed writes the text form: a string)
_CONVERTED: Final[Mapping[Any, Mapping[str, Any]]] = {
    types.to_int: {"type": "integer"},
    types.to_bool: {"type": "boolean"},
    types.to_float: _FLOAT,
    types.to_json: {},
    types.to_bytea: _BYTEA,
    types.to_timestamptz: _TIMESTAMPTZ,
    types.to_timestamp: _TIMESTAMP,
}
_TEXT_FORMS: Final[Mapping[int, Mapping[str, Any]]] = {types.NUMERIC: _NUMERIC, types.UUID: _UUID}

_ID: Final = {"type": "string", "format": "uuid"}
_COMMIT_TIME: Final = {"type": "string", "format": "date-time"}
_EMPTY: Final = {"type": "object", "maxProperties": 0}
_ANNOUNCED: Final = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {"name": _STRING, "type": _STRING, "key": {"type": "boolean"}},
        "required": ["name", "type", "key"],
        "additionalProperties": False,
    },
}


@dataclass(frozen=True, slots=True)
class EventColumn:
    """A column as the table's events carry it."""

    name: str
    type_oid: int
    type_name: str  # format_type: ``numeric(10,2)``
    not_null: bool
    toastable: bool  # a value may be stored out of line: an UPDATE leaves it out of data when unchanged


class Document:
    """One JSON Schema document for the events of one or more tables (array types shared in ``$defs``)."""

    def __init__(self, registry: TypeRegistry, enum_labels: Mapping[int, Sequence[str]]) -> None:
        self._registry = registry
        self._labels = enum_labels
        self._defs: dict[str, Any] = {}

    def value(self, oid: int) -> dict[str, Any]:
        """The schema of a non-null value of type ``oid``."""
        registry = self._registry
        base = registry.base(oid)
        if base in VECTORS:
            return dict(_STRING)
        element = registry.element(base)
        if element is not None:
            return {"$ref": self._array(element)}
        converted = _CONVERTED.get(registry.converter(base))
        if converted is not None:
            return dict(converted)
        if base in self._labels:
            return {"type": "string", "enum": list(self._labels[base])}
        return dict(_TEXT_FORMS.get(base, _STRING))

    def _array(self, element: int) -> str:
        name = f"array_of_{element}"
        ref = f"#/$defs/{name}"
        if name not in self._defs:
            self._defs[name] = {}  # taken: the element's schema may refer to it
            self._defs[name] = {"type": "array", "items": {"anyOf": [self.value(element), _NULL, {"$ref": ref}]}}
        return ref

    def column(self, column: EventColumn) -> dict[str, Any]:
        value = self.value(column.type_oid)
        typed = value if column.not_null or not value else {"anyOf": [value, _NULL]}
        return {"description": column.type_name, **typed}

    def table(
        self, schema: str, table: str, columns: Sequence[EventColumn], actions: Sequence[str], schema_events: bool
    ) -> dict[str, Any]:
        """The schema of one table's events: one branch per kind of event its topic carries (``actions``
        published, READ from backfills, SCHEMA with ``schema_events``)."""
        name = f"columns of {schema}.{table}"
        self._defs[name] = {"type": "object", "properties": {c.name: self.column(c) for c in columns},
                            "additionalProperties": False}
        ref = "#/$defs/" + _pointer(name)

        def row(required: Sequence[str]) -> dict[str, Any]:
            return {"$ref": ref, "required": list(required)} if required else {"$ref": ref}

        every = row([c.name for c in columns])
        branches: list[dict[str, Any]] = []
        if "INSERT" in actions or "READ" in actions:
            kinds = [a for a in ("INSERT", "READ") if a in actions]
            branches.append(_event(schema, table, kinds, data=every, old=_EMPTY))
        if "UPDATE" in actions:
            branches.append(_event(schema, table, ["UPDATE"], data=row([c.name for c in columns if not c.toastable]),
                                   old=row([])))
        if "DELETE" in actions:
            branches.append(_event(schema, table, ["DELETE"], data=_EMPTY, old=row([])))
        if "TRUNCATE" in actions:
            branches.append(_event(schema, table, ["TRUNCATE"], data=_EMPTY, old=_EMPTY))
        if schema_events:
            branches.append(_object({
                "id": _ID, "schema": {"const": schema}, "table": {"const": table}, "action": {"const": "SCHEMA"},
                "columns": _ANNOUNCED, "previous": {"anyOf": [_ANNOUNCED, _NULL]},
                "replicaIdentity": {"enum": list(REPLICA_IDENTITIES.values())}, "commitTime": _COMMIT_TIME,
            }))
        return {"title": f"{schema}.{table}", "description": f"The events of {schema}.{table} (wal-listener)",
                "oneOf": branches}

    def finish(self, tables: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
        """The document: one table's schema itself; several: any one of them (``$defs`` by name)."""
        if len(tables) == 1:
            return {"$schema": DRAFT, **next(iter(tables.values())), "$defs": self._defs}
        return {"$schema": DRAFT, "title": "wal-listener events",
                "oneOf": [{"$ref": "#/$defs/" + _pointer(name)} for name in tables], "$defs": {**self._defs, **tables}}


def _pointer(name: str) -> str:
    """``name`` as a step of a JSON pointer in a URI fragment."""
    return quote(name.replace("~", "~0").replace("/", "~1"), safe="")


def _event(schema: str, table: str, kinds: Sequence[str], *, data: Any, old: Any) -> dict[str, Any]:
    return _object({"id": _ID, "schema": {"const": schema}, "table": {"const": table},
                    "action": {"enum": list(kinds)}, "data": data, "dataOld": old, "commitTime": _COMMIT_TIME})


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}
