"""The compiled fast path, Python side: load it, and describe each relation to it once.

``listener/_hotpath.c`` turns one pgoutput Insert/Update/Delete message into the event's JSON body in
one pass (decode, convert, encode), byte for byte what the pure-Python stages produce, unchanged
TOASTed values included. It handles the common types itself and calls the Python converter for the
others; anything unusual (text that is not UTF-8, a value a converter refuses, a short tuple, a
malformed message) makes it answer ``None`` and the Python stages take that message, with their
error handling and metrics. It also builds the NATS publisher's HPUB frames and scans its acks.

The module is built by ``pip install`` when a C compiler is present (it is optional: without it the
listener runs the pure-Python path). ``LISTENER_PURE_PYTHON=1`` turns it off at run time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, Protocol

import orjson

from listener import types
from listener.types import ArrayConverter, Converter

log = logging.getLogger("listener.hotpath")

# how the C code writes a column (keep in step with the CODE_* enum in _hotpath.c)
TEXT, INT, BOOL, JSON, TIMESTAMPTZ, TIMESTAMP, ARRAY_TEXT, ARRAY_INT, PYTHON = range(9)

Plan = tuple[bytes, tuple[tuple[bytes, int, Converter | None, bool], ...], tuple[int, ...]]


class Module(Protocol):
    def event(
        self, msg: bytes, plan: Plan, ident: str, commit_time: str, want_key: bool, /
    ) -> tuple[bytes, bytes | None] | None: ...

    def read_row(
        self, values: list[bytes | None], plan: Plan, ident: str, read_time: str, want_key: bool, /
    ) -> tuple[bytes, bytes | None] | None: ...

    def set_encoder(self, dumps: Any, /) -> None: ...

    def nats_frames(
        self, batch: list[Any], prefixes: dict[str, str], seq: int, limit: int, header_bytes: int, /
    ) -> tuple[bytes, int] | None: ...

    def nats_acks(self, data: bytes, sid: bytes, /) -> tuple[list[int | tuple[bytes, bytes]], int]: ...


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
) -> Plan:
    """Everything the compiled path needs about one relation, JSON fragments already encoded."""
    columns = tuple(
        (orjson.dumps(name) + b":", code(conv), conv, is_identity)
        for name, conv, is_identity in zip(names, converters, identity, strict=True)
    )
    return orjson.dumps({"schema": schema, "table": table})[1:-1], columns, tuple(key_index)
