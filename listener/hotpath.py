"""The compiled fast path, Python side: load it, and describe each relation to it once.

``listener/_hotpath_c/`` turns one pgoutput Insert/Update/Delete message into the event's JSON body in
one pass (decode, convert, encode), byte for byte what the pure-Python stages produce, unchanged
TOASTed values included. It handles the common types itself and calls the Python converter for the
others; anything unusual (text that is not UTF-8, a value a converter refuses, a short tuple, a
malformed message) makes it answer ``None`` and the Python stages take that message, with their
error handling and metrics. A table's transform (columns left out, masks, the topic from column values)
is part of its plan. It also builds the NATS publisher's HPUB frames and scans its acks, and takes many
replication messages off libpq per call (:func:`copy_reader`).

The module is built by ``pip install`` when a C compiler is present (it is optional: without it the
listener runs the pure-Python path). ``LISTENER_PURE_PYTHON=1`` turns it off at run time.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, overload

import orjson

from listener import formats, types
from listener.transforms import RelationTransform
from listener.types import ArrayConverter, Converter

if TYPE_CHECKING:
    from listener.message import Message

log = logging.getLogger("listener.hotpath")

# how the C code writes a column (keep in step with the CODE_* enum in _hotpath_c/hotpath.h)
TEXT, INT, BOOL, JSON, TIMESTAMPTZ, TIMESTAMP, ARRAY_TEXT, ARRAY_INT, PYTHON = range(9)
# a table's transform (listener/transforms.py): left out, and the masks
DROP, HASH, REDACT, NULLED = range(9, 13)
_TRANSFORM_CODES = {"drop": DROP, "hash": HASH, "redact": REDACT, "null": NULLED}

#: a topic template for the compiled path: (b"<topic>.<topicPrefix>", literal bytes and column indices)
Route = tuple[bytes, tuple[bytes | int, ...]]
#: (schema_table, columns, key_index, None | (prepared hmac key | None, route | None)): see _hotpath_c/hotpath.h
Plan = tuple[
    bytes, tuple[tuple[bytes, int, Converter | None, bool], ...], tuple[int, ...],
    tuple[bytes | None, Route | None] | None,
]


#: publisher.format debezium: (source parts, columns (prefix, code, converter, placeholder JSON), key_index,
#: value head, key head, a READ event's source part, the prepared hash key of a transform, the table's default
#: plan when its transform has a topic route): see _hotpath_c/debezium.c. With a value head (schemas) the bodies
#: debezium_event and debezium_read_row answer are what follows it: the event is the value head + the body
DebeziumPlan = tuple[
    bytes, bytes, bytes, tuple[tuple[bytes, int, Converter | None, bytes], ...], tuple[int, ...], bytes | None,
    bytes | None, bytes, bytes | None, Plan | None,
]

#: event() and debezium_event() make the Message themselves from (class, subject, schema, table, the actions of
#: Insert, Update and Delete, the member descriptors of the class's slots in field order, the defaults of those
#: after the first seven): see _hotpath_c/message.c and listener.event._change_shape
MessageShape = tuple[type, str, str, str, tuple[str, str, str], tuple[Any, ...], tuple[Any, ...]]
#: change() per table: (debezium, its plan, shape, the actions published: INSERT 1 | UPDATE 2 | DELETE 4,
#: tombstones, want_key, with a topic route its RoutedTopics, with CloudEvents the table's compiled ones): see
#: _hotpath_c/message.c and listener.event.EventBuilder._compiled_table
CompiledTable = tuple[bool, "Plan | DebeziumPlan", MessageShape, int, bool, bool, "RoutedTopics | None",
                      "formats.CompiledCloudEvents | None"]
#: a routed table's fallbacks: (the count per reason, a [int] each once it exists, the table's subject, what counts
#: a reason without a count yet and answers the subject)
RoutedTopics = tuple[list[list[int] | None], str, "Callable[[int], str]"]


class Module(Protocol):
    @overload
    def event(
        self, msg: bytes, plan: Plan, prefix: str, number: int | None, commit_time: str, want_key: bool,
        ce: formats.CompiledCloudEvents | None = None, /
    ) -> (tuple[str, bytes, bytes | None] | tuple[str, bytes, bytes | None, str | int]
          | tuple[str, bytes, bytes | None, str | int | None, dict[str, str] | None] | None): ...

    @overload
    def event(
        self, msg: bytes, plan: Plan, prefix: str, number: int | None, commit_time: str, want_key: bool,
        ce: None, shape: MessageShape, /
    ) -> Message | None: ...

    def read_row(
        self, values: list[bytes | None], plan: Plan, ident: str, read_time: str, want_key: bool,
        ce: formats.CompiledCloudEvents | None = None, /
    ) -> (tuple[bytes, bytes | None] | tuple[bytes, bytes | None, str | int]
          | tuple[bytes, bytes | None, str | int | None, dict[str, str] | None] | None): ...

    @overload
    def debezium_event(
        self, msg: bytes, plan: DebeziumPlan, prefix: str, number: int | None, commit_micros: int, xid: int | None,
        lsn: int | None, last_commit: int | None, now_ns: int | None, want_key: bool, /
    ) -> tuple[str, bytes, bytes | None] | tuple[str, bytes, bytes | None, str | int] | None: ...

    @overload
    def debezium_event(
        self, msg: bytes, plan: DebeziumPlan, prefix: str, number: int | None, commit_micros: int, xid: int | None,
        lsn: int | None, last_commit: int | None, now_ns: int | None, want_key: bool, shape: MessageShape, /
    ) -> Message | None: ...

    def change(self, msg: bytes, compiled: dict[int, CompiledTable], txn: Any, debezium: Any, /) -> Message | None: ...

    def transaction_fields(self, fields: tuple[Any, ...], /) -> None: ...

    def debezium_read_row(
        self, values: list[bytes | None], plan: DebeziumPlan, read_micros: int, last_commit: int | None,
        now_ns: int | None, want_key: bool, /
    ) -> tuple[bytes, bytes | None] | tuple[bytes, bytes | None, str | int] | None: ...

    def freeze_clock(self, ns: int | None, /) -> None: ...

    def begin(self, msg: bytes, slot_hash: int, /) -> tuple[int, str, int, str, int, int, int] | None: ...

    def hmac_prepare(self, key: bytes, /) -> bytes: ...

    def hmac_hex(self, prepared: bytes, data: bytes, /) -> str: ...

    def set_encoder(self, dumps: Any, /) -> None: ...

    def nats_frames(
        self, batch: list[Any], prefixes: dict[str, str], seq: int, limit: int, header_bytes: int, /
    ) -> tuple[bytes | list[bytes], int] | None: ...

    def nats_acks(self, data: bytes, sid: bytes, /) -> tuple[list[tuple[int, int] | tuple[bytes, bytes]], int]: ...

    def set_libpq(self, getcopydata: int, freemem: int, /) -> None: ...

    def copy_batch(
        self, pgconn_ptr: int, limit: int, starts: list[int] | None, max_bytes: int = 0, /
    ) -> tuple[list[bytes], int, bytes | None, int]: ...

    def blake2b_prepare(self, key: bytes, data: bytes, /) -> bytes: ...

    def page_sizes(self, result_ptr: int, /) -> tuple[int, int]: ...

    def set_libpq_results(
        self, ntuples: int, nfields: int, getvalue: int, getisnull: int, getlength: int, /
    ) -> None: ...

    def read_page(
        self, result_ptr: int, plan: Plan, ids: bytes, key_index: tuple[int, ...], read_time: str, want_key: bool,
        message: tuple[Any, str, str, str, str, tuple[Any, ...] | None, tuple[Any, ...] | None], /
    ) -> tuple[list[Any], list[Any], int, int]: ...


def load() -> Module | None:
    """The compiled module, or None when it was not built or ``LISTENER_PURE_PYTHON`` is set."""
    if os.environ.get("LISTENER_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        from listener import _hotpath  # type: ignore[attr-defined]
    except ImportError:
        return None
    _hotpath.set_encoder(orjson.dumps)
    module: Module = _hotpath
    return module


_LIBPQ_FILE = re.compile(r"\s(/\S*/libpq[^/\s]*\.so[.\d]*)$")


def psycopg_libpq() -> ctypes.CDLL | None:
    """The libpq psycopg runs on (its own copy for psycopg-binary), opened again to look up functions."""
    from psycopg import pq

    if pq.__impl__ == "python":
        from psycopg.pq import _pq_ctypes

        lib = getattr(_pq_ctypes, "pq", None)
        return lib if isinstance(lib, ctypes.CDLL) else None
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:  # Linux: the files mapped into this process
            paths = {m[1] for m in map(_LIBPQ_FILE.search, maps) if m is not None}
    except OSError:
        return None
    if pq.__impl__ == "binary":
        paths = {p for p in paths if "psycopg_binary" in p}
    if len(paths) != 1:
        return None  # none, or more than one libpq loaded: which one psycopg uses is not known
    return ctypes.CDLL(paths.pop())  # the library already loaded: the same handle, nothing loaded twice


def copy_reader(module: Module | None) -> bool:
    """Point ``module.copy_batch`` at the libpq psycopg uses; False (use psycopg's per-message read) when
    there is no compiled module or that libpq cannot be found."""
    if module is None:
        return False
    try:
        lib = psycopg_libpq()
        if lib is None:
            return False
        getcopydata = ctypes.cast(lib.PQgetCopyData, ctypes.c_void_p).value
        freemem = ctypes.cast(lib.PQfreemem, ctypes.c_void_p).value
    except (OSError, AttributeError, ImportError) as exc:
        log.debug("compiled replication reader off", extra={"fields": {"error": str(exc)}})
        return False
    if not getcopydata or not freemem:
        return False
    module.set_libpq(getcopydata, freemem)
    return True


_RESULT_FUNCTIONS = ("PQntuples", "PQnfields", "PQgetvalue", "PQgetisnull", "PQgetlength")
_page_readers: dict[int, bool] = {}


def page_reader(module: Module) -> bool:
    """Point ``module.read_page`` at the libpq psycopg uses (once per module); False (psycopg's values, one
    Python object per column) when that libpq cannot be found."""
    done = _page_readers.get(id(module))
    if done is not None:
        return done
    ok = False
    try:
        lib = psycopg_libpq()
        if lib is not None:
            addresses = [ctypes.cast(getattr(lib, name), ctypes.c_void_p).value for name in _RESULT_FUNCTIONS]
            if all(addresses):
                module.set_libpq_results(*addresses)  # type: ignore[arg-type]
                ok = True
    except (OSError, AttributeError, ImportError) as exc:
        log.debug("compiled backfill pages off", extra={"fields": {"error": str(exc)}})
    _page_readers[id(module)] = ok
    return ok


_SCALAR_CODES: dict[Any, int] = {
    None: TEXT,
    types.to_int: INT,
    types.to_bool: BOOL,
    types.to_json: JSON,
    types.to_timestamptz: TIMESTAMPTZ,
    types.to_timestamp: TIMESTAMP,
}


def code(converter: Converter | None) -> int:
    """How the compiled path writes a column converted by ``converter``."""
    if isinstance(converter, ArrayConverter) and converter.delimiter == ",":
        if converter.element is None:
            return ARRAY_TEXT
        if converter.element is types.to_int:
            return ARRAY_INT
    return _SCALAR_CODES.get(converter, PYTHON)


def plan(
    schema: str,
    table: str,
    names: Sequence[str],
    converters: Sequence[Converter | None],
    identity: Sequence[bool],
    key_index: Sequence[int],
    transform: RelationTransform | None = None,
    hmac: bytes | None = None,
) -> Plan:
    """Everything the compiled path needs about one relation, JSON fragments already encoded. With a
    ``transform``, ``key_index`` counts its kept columns (as the Python stages do) and ``hmac`` is the hash
    key prepared by the module's ``hmac_prepare``."""
    codes = [code(conv) for conv in converters]
    route: Route | None = None
    shaped: tuple[bytes | None, Route | None] | None = None
    if transform is not None:
        codes = [_TRANSFORM_CODES[c] if c is not None else was for c, was in zip(transform.codes, codes, strict=True)]
        key_index = [transform.kept[k] for k in key_index]
        if transform.route is not None:
            route = (transform.route.head.encode(), tuple(
                part.encode() if isinstance(part, str) else (transform.kept[part] if part >= 0 else -1)
                for part in transform.route.parts
            ))
        shaped = (hmac, route)
    columns = tuple(
        (orjson.dumps(name) + b":", how, conv, is_identity)
        for name, how, conv, is_identity in zip(names, codes, converters, identity, strict=True)
    )
    return orjson.dumps({"schema": schema, "table": table})[1:-1], columns, tuple(key_index), shaped


# Debezium's conversions in the compiled path (keep in step with the DBZ_* enum in _hotpath_c/debezium.c)
DBZ_NUMERIC, DBZ_MICRO_TS, DBZ_MILLI_TS, DBZ_DATE, DBZ_TIME = range(32, 37)
DBZ_BYTEA, DBZ_BIT1, DBZ_INTERVAL, DBZ_TIMETZ = range(37, 41)
_DEBEZIUM_CODES: dict[Any, int] = {
    formats.dbz_numeric: DBZ_NUMERIC,
    formats.dbz_micro_timestamp: DBZ_MICRO_TS,
    formats.dbz_milli_timestamp: DBZ_MILLI_TS,
    formats.dbz_date: DBZ_DATE,
    formats.dbz_time: DBZ_TIME,
    types.to_bytea: DBZ_BYTEA,
    formats.dbz_bit1: DBZ_BIT1,
    formats.dbz_interval: DBZ_INTERVAL,
    formats.dbz_timetz: DBZ_TIMETZ,
}
#: of the default format's codes, those whose converter Debezium shares (the rest: its converter is called)
_SHARED_CODES = frozenset({TEXT, INT, BOOL, TIMESTAMPTZ, ARRAY_TEXT, ARRAY_INT})


def debezium_code(converter: Converter | None) -> int:
    """How the compiled path writes a column Debezium's way (``converter``: :func:`formats.debezium_converter`'s)."""
    special = _DEBEZIUM_CODES.get(converter)
    if special is not None:
        return special
    shared = code(converter)
    return shared if shared in _SHARED_CODES else PYTHON


def _with_schema_head(schema: orjson.Fragment | None) -> bytes | None:
    """``{"schema":<schema>,"payload":`` (formats.with_schema up to the payload), or None without a schema."""
    if schema is None:
        return None
    return orjson.dumps({"schema": schema, "payload": None})[: -len(b"null}")]


def debezium_plan(
    source: tuple[bytes, bytes, bytes, bytes], names: Sequence[str], converters: Sequence[Converter | None],
    table: formats.DebeziumTable, key_index: Sequence[int], transform: RelationTransform | None = None,
    hmac: bytes | None = None, route: Plan | None = None,
) -> DebeziumPlan:
    """Everything the compiled path needs to write one relation's Debezium events: ``source`` from
    :meth:`formats.Debezium.source_parts`, the columns as published (with a ``transform``: its kept columns,
    ``key_index`` counting them, as the Python stages have them), what the events share (``table``). With a
    transform the plan lists every column of the relation, those it leaves out as DROP and its masks as theirs;
    ``hmac``: the hash key prepared by the module's ``hmac_prepare``; ``route``: the table's :func:`plan` when
    the transform has a topic route (the compiled path renders the topic from it as for the default format)."""
    published = [
        (orjson.dumps(name) + b":", debezium_code(conv), conv, orjson.dumps(placeholder))
        for name, conv, placeholder in zip(names, converters, table.unavailable, strict=True)
    ]
    columns = tuple(published)
    if transform is not None:
        dropped = (b"", DROP, None, b"null")
        kept = {i: at for at, i in enumerate(transform.kept)}
        columns = tuple(
            dropped if i not in kept else
            (published[kept[i]] if mask is None else (*published[kept[i]][:1], _TRANSFORM_CODES[mask], None,
                                                      published[kept[i]][3]))
            for i, mask in enumerate(transform.codes)
        )
        key_index = [transform.kept[k] for k in key_index]
    head, db, table_part, read_db = source
    return (head, db, table_part, columns, tuple(key_index), _with_schema_head(table.envelope_schema),
            _with_schema_head(table.key_schema), read_db, hmac, route)
