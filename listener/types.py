"""Stage 4 — types: convert column values from PostgreSQL's text form to their natural JSON form.

Conversion is chosen once per column by type OID (a precomputed converter list per relation), so
the hot path is one call per value. Nothing is made up: a value that cannot be converted is
published as its text form and counted, never turned into a zero or a null.

=====================  =================================================================
PostgreSQL type        JSON
=====================  =================================================================
int2/int4/int8/oid     number
numeric                string, exact (``"12345678901234567890.000001"``, ``"NaN"``)
float4/float8          number; ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` as strings
bool                   true / false
json/jsonb             the document itself (embedded as sent, not re-parsed)
arrays                 lists (nested for multi-dimensional), elements converted by type
timestamptz            RFC 3339 in UTC: ``"2026-01-02T03:04:05.123456Z"``
timestamp              ``"2026-01-02T03:04:05.123456"`` (no zone: none is stored)
date, time, timetz     PostgreSQL's ISO text
interval               ISO 8601 (``"P1DT2H"``)
bytea                  base64
uuid, text, enums...   string
domains                as their base type
anything else          its text form (composites, ranges, hstore, geometric, network...)
±infinity timestamps   ``"infinity"`` / ``"-infinity"``
=====================  =================================================================

The replication connection sets ``DateStyle=ISO``, ``TimeZone=UTC``, ``IntervalStyle=iso_8601``,
``bytea_output=hex`` and ``extra_float_digits=3`` so the text forms above are what arrives.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import orjson

Converter = Callable[[str], Any]


class ConversionError(ValueError):
    """A value that did not have the form its type promises."""


def to_int(text: str) -> int:
    value = int(text)
    if not -(1 << 63) <= value < (1 << 64):  # past what JSON encoders write as a number
        raise ConversionError(f"integer out of the 64-bit range: {text!r}")
    return value


def to_bool(text: str) -> bool:
    return text == "t"


_FLOAT_SPECIAL: Final = {"NaN": "NaN", "Infinity": "Infinity", "-Infinity": "-Infinity"}


def to_float(text: str) -> float | str:
    special = _FLOAT_SPECIAL.get(text)
    if special is not None:
        return special
    return float(text)


def to_json(text: str) -> orjson.Fragment:
    return orjson.Fragment(text)


def to_bytea(text: str) -> str:
    if text.startswith("\\x"):
        return base64.b64encode(bytes.fromhex(text[2:])).decode("ascii")
    raise ConversionError("bytea value is not in hex form (bytea_output=hex)")


def to_timestamp(text: str) -> str:
    """``2026-01-02 03:04:05.1`` -> ``2026-01-02T03:04:05.1``; BC and infinity stay as sent."""
    if text[0].isdigit() and not text.endswith(" BC"):
        return text.replace(" ", "T", 1)
    return text


def _utc_text(moment: datetime) -> str:
    micros = moment.microsecond
    base = (f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}"
            f"T{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}")
    if micros:
        base += f".{micros:06d}".rstrip("0")
    return base + "Z"


def to_timestamptz(text: str) -> str:
    """Any offset -> UTC RFC 3339. The connection's TimeZone=UTC makes ``+00`` the fast path."""
    if text.endswith("+00") and text[0].isdigit():
        return text[:-3].replace(" ", "T", 1) + "Z"
    if not text[0].isdigit() or text.endswith(" BC"):
        return text  # infinity, -infinity, BC dates: RFC 3339 cannot express them
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConversionError(f"not a timestamp with time zone: {text!r}") from None
    if moment.tzinfo is None:
        raise ConversionError(f"timestamp without an offset: {text!r}")
    return _utc_text(moment.astimezone(UTC))


# ---------------------------------------------------------------------------------------------
# arrays


def parse_array(text: str, element: Converter | None, delimiter: str = ",") -> list[Any]:
    """Parse PostgreSQL's array text (``{1,2,NULL}``, ``{{"a b",c},{d,e}}``, ``[0:1]={1,2}``)."""
    if text.startswith("["):  # explicit bounds
        text = text[text.index("=") + 1 :]
    simple = '"' not in text and "\\" not in text and text.count("{") == 1 == text.count("}")
    if simple and text.startswith("{") and text.endswith("}"):
        inner = text[1:-1]  # the common case: one dimension, nothing quoted
        if not inner:
            return []
        if element is None:
            return [None if part == "NULL" else part for part in inner.split(delimiter)]
        return [None if part == "NULL" else element(part) for part in inner.split(delimiter)]
    result, pos = _parse_level(text, 0, element, delimiter)
    if pos != len(text):
        raise ConversionError(f"trailing characters in array literal at {pos}")
    return result


def _parse_level(text: str, pos: int, element: Converter | None, delimiter: str) -> tuple[list[Any], int]:
    if text[pos] != "{":
        raise ConversionError(f"array literal must start with '{{' at {pos}")
    pos += 1
    items: list[Any] = []
    if text[pos] == "}":
        return items, pos + 1
    while True:
        char = text[pos]
        if char == "{":
            sub, pos = _parse_level(text, pos, element, delimiter)
            items.append(sub)
        elif char == '"':
            pos += 1
            chunks = []
            while True:
                char = text[pos]
                if char == "\\":
                    chunks.append(text[pos + 1])
                    pos += 2
                elif char == '"':
                    pos += 1
                    break
                else:
                    end = pos
                    while text[end] not in '\\"':
                        end += 1
                    chunks.append(text[pos:end])
                    pos = end
            value = "".join(chunks)
            items.append(element(value) if element is not None else value)
        else:
            end = pos
            while text[end] != delimiter and text[end] != "}":
                end += 1
            raw = text[pos:end].strip()
            pos = end
            if raw == "NULL":
                items.append(None)
            else:
                items.append(element(raw) if element is not None else raw)
        char = text[pos]
        if char == delimiter:
            pos += 1
        elif char == "}":
            return items, pos + 1
        else:
            raise ConversionError(f"unexpected {char!r} in array literal at {pos}")


class ArrayConverter:
    """The converter of an array type: its element converter and delimiter stay visible (the compiled
    fast path writes simple arrays of text and integers itself)."""

    __slots__ = ("delimiter", "element")

    def __init__(self, element: Converter | None, delimiter: str = ",") -> None:
        self.element = element
        self.delimiter = delimiter

    def __call__(self, text: str) -> list[Any]:
        return parse_array(text, self.element, self.delimiter)


def array_of(element: Converter | None, delimiter: str = ",") -> Converter:
    return ArrayConverter(element, delimiter)


# ---------------------------------------------------------------------------------------------
# the registry

BOOL, BYTEA, INT8, INT2, INT4, OID, JSON, FLOAT4, FLOAT8 = 16, 17, 20, 21, 23, 26, 114, 700, 701
NUMERIC, UUID, JSONB, TIMESTAMP, TIMESTAMPTZ, TEXT = 1700, 2950, 3802, 1114, 1184, 25

# scalar type OID -> converter (None: the text itself is the JSON value)
SCALARS: Final[dict[int, Converter | None]] = {
    BOOL: to_bool,
    BYTEA: to_bytea,
    INT8: to_int,
    INT2: to_int,
    INT4: to_int,
    OID: to_int,
    28: to_int,  # xid
    5069: to_int,  # xid8
    JSON: to_json,
    3802: to_json,
    FLOAT4: to_float,
    FLOAT8: to_float,
    NUMERIC: None,
    UUID: None,
    TEXT: None,
    1043: None,  # varchar
    1042: None,  # bpchar
    18: None,  # char
    19: None,  # name
    TIMESTAMP: to_timestamp,
    TIMESTAMPTZ: to_timestamptz,
    1082: None,  # date
    1083: None,  # time
    1266: None,  # timetz
    1186: None,  # interval
}

# array type OID -> element type OID (built-in types; user types are looked up in pg_type)
ARRAYS: Final[dict[int, int]] = {
    1000: BOOL, 1001: BYTEA, 1002: 18, 1003: 19, 1005: INT2, 1007: INT4, 1009: TEXT, 1014: 1042,
    1015: 1043, 1016: INT8, 1021: FLOAT4, 1022: FLOAT8, 1028: OID, 1115: TIMESTAMP, 1182: 1082,
    1183: 1083, 1185: TIMESTAMPTZ, 1187: 1186, 1231: NUMERIC, 1270: 1266, 199: JSON, 3807: JSONB,
    2951: UUID, 1011: 28, 271: 5069,
}


@dataclass(frozen=True, slots=True)
class PgType:
    """What pg_type says about a type that is not built in."""

    oid: int
    kind: str  # typtype: b(ase) c(omposite) d(omain) e(num) p(seudo) r(ange) m(ultirange)
    base_oid: int  # typbasetype (domains)
    element_oid: int  # typelem (arrays)
    category: str  # typcategory: A for arrays
    delimiter: str


class TypeRegistry:
    """Type OID -> converter, for built-ins up front and for user types as pg_type describes them."""

    def __init__(self) -> None:
        self._user: dict[int, PgType] = {}

    def known(self, oid: int) -> bool:
        return oid in SCALARS or oid in ARRAYS or oid in self._user

    def add(self, info: PgType) -> None:
        self._user[info.oid] = info

    def info(self, oid: int) -> PgType | None:
        """What pg_type said about a type that is not built in (None: built in or not looked up)."""
        return self._user.get(oid)

    def missing(self, oids: list[int]) -> list[int]:
        """OIDs (and, transitively, their element or base types) that must be looked up first."""
        return [oid for oid in oids if not self.known(oid)]

    def base(self, oid: int) -> int:
        """The type a value of type ``oid`` is converted as: a domain's base type (through domains of domains)."""
        info = self._user.get(oid)
        while info is not None and info.kind == "d" and info.base_oid:
            oid = info.base_oid
            info = self._user.get(oid)
        return oid

    def element(self, oid: int) -> int | None:
        """The element type of array type ``oid`` (None: ``oid`` is no array type)."""
        if oid in ARRAYS:
            return ARRAYS[oid]
        info = self._user.get(oid)
        return info.element_oid if info is not None and info.category == "A" and info.element_oid else None

    def converter(self, oid: int, scalars: Mapping[int, Converter | None] = SCALARS) -> Converter | None:
        """The converter of type ``oid``: from ``scalars`` (another event format may bring its own), arrays
        of them, domains as their base type; None: the text itself."""
        if oid in scalars:
            return scalars[oid]
        if oid in ARRAYS:
            return array_of(self.converter(ARRAYS[oid], scalars))
        info = self._user.get(oid)
        if info is None:
            return None  # unknown: its text form
        if info.kind == "d" and info.base_oid:
            return self.converter(info.base_oid, scalars)
        if info.category == "A" and info.element_oid:
            return array_of(self.converter(info.element_oid, scalars), info.delimiter or ",")
        return None  # enums, composites, ranges, extension types: text


