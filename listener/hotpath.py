"""The compiled fast path, Python side: load it, and describe each relation to it once.

``listener/_hotpath.c`` turns one pgoutput Insert/Update/Delete message into the event's JSON body in
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
from collections.abc import Sequence
from typing import Any, Protocol

import orjson

from listener import types
from listener.transforms import RelationTransform
from listener.types import ArrayConverter, Converter

log = logging.getLogger("listener.hotpath")

# how the C code writes a column (keep in step with the CODE_* enum in _hotpath.c)
TEXT, INT, BOOL, JSON, TIMESTAMPTZ, TIMESTAMP, ARRAY_TEXT, ARRAY_INT, PYTHON = range(9)
# a table's transform (listener/transforms.py): left out, and the masks
DROP, HASH, REDACT, NULLED = range(9, 13)
_TRANSFORM_CODES = {"drop": DROP, "hash": HASH, "redact": REDACT, "null": NULLED}

#: a topic template for the compiled path: (b"<topic>.<topicPrefix>", literal bytes and column indices)
Route = tuple[bytes, tuple[bytes | int, ...]]
#: (schema_table, columns, key_index, None | (prepared hmac key | None, route | None)): see _hotpath.c
Plan = tuple[
    bytes, tuple[tuple[bytes, int, Converter | None, bool], ...], tuple[int, ...],
    tuple[bytes | None, Route | None] | None,
]


class Module(Protocol):
    def event(
        self, msg: bytes, plan: Plan, prefix: str, number: int | None, commit_time: str, want_key: bool, /
    ) -> tuple[str, bytes, bytes | None] | tuple[str, bytes, bytes | None, str | int] | None: ...

    def read_row(
        self, values: list[bytes | None], plan: Plan, ident: str, read_time: str, want_key: bool, /
    ) -> tuple[bytes, bytes | None] | tuple[bytes, bytes | None, str | int] | None: ...

    def hmac_prepare(self, key: bytes, /) -> bytes: ...

    def hmac_hex(self, prepared: bytes, data: bytes, /) -> str: ...

    def set_encoder(self, dumps: Any, /) -> None: ...

    def nats_frames(
        self, batch: list[Any], prefixes: dict[str, str], seq: int, limit: int, header_bytes: int, /
    ) -> tuple[bytes, int] | None: ...

    def nats_acks(self, data: bytes, sid: bytes, /) -> tuple[list[tuple[int, int] | tuple[bytes, bytes]], int]: ...

    def set_libpq(self, getcopydata: int, freemem: int, /) -> None: ...

    def copy_batch(
        self, pgconn_ptr: int, limit: int, starts: list[int] | None, max_bytes: int = 0, /
    ) -> tuple[list[bytes], int, bytes | None, int]: ...


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


def _psycopg_libpq() -> ctypes.CDLL | None:
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
        lib = _psycopg_libpq()
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
