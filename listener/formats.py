"""Stage 6b — formats: the event in the shape its consumers already speak (``publisher.format``).

- ``wal-listener`` (the default): the event of :mod:`listener.event`, byte for byte the Go original's.
- ``cloudevents``: CloudEvents 1.0 around that event. *binary*: the event is the body, the attributes are
  headers named by each broker's protocol binding (:class:`Binding`); *structured*: one
  ``application/cloudevents+json`` body whose ``data`` is the event.
- ``debezium``: Debezium's JSON change event with the values converted as Debezium's PostgreSQL connector
  converts them (``decimal.handling.mode=string``, ``time.precision.mode=adaptive_time_microseconds``);
  schemas disabled, or (``publisher.debezium.schemas``) ``{"schema", "payload"}`` as Kafka Connect's
  JsonConverter writes it with ``schemas.enable=true``, each table's schemas built once per Relation.

And the MESSAGE event of a logical decoding message (``pg_logical_emit_message``: the outbox).
Pure functions and small classes over values: no I/O.
"""

from __future__ import annotations

import base64
import re
import struct
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final
from urllib.parse import quote

import orjson

from listener import __version__, types
from listener.catalog import ColumnFacts
from listener.config import CloudEventsConfig, Config, PublisherType
from listener.message import Message
from listener.pgoutput import PG_EPOCH, UNCHANGED, Relation, Tuple
from listener.types import Converter, TypeRegistry

# ------------------------------------------------------------------------------------------------
# CloudEvents 1.0

#: ``type`` of an event: this prefix and the action in lower case (io.wal-listener.insert, ...message)
CLOUDEVENTS_TYPE_PREFIX: Final = "io.wal-listener."
STRUCTURED_CONTENT_TYPE: Final = "application/cloudevents+json"
DATA_CONTENT_TYPE: Final = "application/json"


@dataclass(frozen=True, slots=True)
class Binding:
    """How a broker carries CloudEvents attributes in binary mode (its CloudEvents protocol binding)."""

    prefix: str  # of every attribute's header: ce- (HTTP-like: NATS, Pub/Sub), ce_ (Kafka), cloudEvents_ (AMQP)
    percent_encoded: bool  # header values percent-encoded as the HTTP binding says (section 3.1.3.2)
    #: binary mode: ``datacontenttype`` as a header of its own (<prefix>datacontenttype) like every other
    #: attribute (NATS), instead of the protocol's content type (HTTP, Pub/Sub, Kafka, AMQP)
    datacontenttype_header: bool = False
    #: the publisher takes the attributes as header lines (:attr:`Message.header_lines`, NATS): the compiled
    #: path writes them so instead of a dict per event
    lines: bool = False


#: the binding of Pub/Sub: ce- attributes, values percent-encoded as in HTTP, the content-type attribute
CE_HEADERS: Final = Binding("ce-", percent_encoded=True)
#: the NATS protocol binding (1.0.3, section 3.1.3.1): every attribute a ce- header, datacontenttype too
#: (ce-datacontenttype); a content-type header of application/cloudevents marks structured mode only
NATS_HEADERS: Final = Binding("ce-", percent_encoded=True, datacontenttype_header=True, lines=True)
#: printable ASCII but space, '"' and '%': what a ce- header value may hold unencoded
_HEADER_SAFE: Final = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')
_PLAIN_HEADER: Final = re.compile(r'[!#-$&-~]*')
#: a header's name and value that its line (nats-py's) holds as they are: printable ASCII, no spaces
_LINE_VALUE: Final = re.compile(r"[!-~]+")


def header_value(text: str, binding: Binding) -> str:
    """An attribute's value as the binding writes it in a header."""
    if not binding.percent_encoded or _PLAIN_HEADER.fullmatch(text):
        return text
    return quote(text, safe=_HEADER_SAFE)


def default_source(cfg: Config) -> str:
    """``//<first database host>/<database name>``: where the events come from, as a URI reference."""
    host = cfg.database.endpoints()[0][0]
    if ":" in host:
        host = f"[{host}]"
    return f"//{host}/{quote(cfg.database.name, safe='')}"


#: what the compiled path takes to write a table's CloudEvents (see listener/_hotpath_c/cloudevents.c): the heads
#: of its INSERT, UPDATE, DELETE and READ events, the id's and the time's header names (binary mode; as the start
#: of their header lines when the binding takes lines) and whether the binding percent-encodes
CompiledCloudEvents = tuple[tuple[Any, Any, Any, Any], str | None, str | None, bool]
#: the actions of a table's events in the order of CompiledCloudEvents' heads
COMPILED_ACTIONS: Final = ("INSERT", "UPDATE", "DELETE", "READ")


class CloudEvents:
    """Turns a finished :class:`Message` into a CloudEvent (the event's own body stays its ``data``)."""

    def __init__(self, cfg: CloudEventsConfig, source: str, binding: Binding) -> None:
        self.structured = cfg.mode == "structured"
        self.source = source
        self.binding = binding
        self._heads: dict[tuple[str, str, str], Any] = {}  # (schema, table, action) -> what is the same each time
        #: the message's content type once wrapped
        self.content_type = STRUCTURED_CONTENT_TYPE if self.structured else (
            "" if binding.datacontenttype_header else DATA_CONTENT_TYPE)

    @staticmethod
    def subject(message: Message) -> str:
        """``schema.table``; for a MESSAGE event its prefix."""
        return f"{message.schema}.{message.table}" if message.schema else message.table

    def __call__(self, message: Message, moment: str) -> Message:
        """``moment``: the commit time (the read time of a READ event), RFC 3339."""
        key = (message.schema, message.table, message.action)
        head = self._heads.get(key)
        if head is None:
            head = self._head(*key)
            if len(self._heads) < 10000:
                self._heads[key] = head
        if self.structured:
            message.body = b"".join((head, b',"id":"', message.id.encode(), b'","time":"', moment.encode(),
                                     b'","data":', message.body, b"}"))
            message.content_type = self.content_type
            return message
        headers = dict(head)
        prefix = self.binding.prefix
        headers[prefix + "id"] = header_value(message.id, self.binding)
        headers[prefix + "time"] = moment
        message.headers = headers
        message.content_type = self.content_type
        return message

    def compiled(self, schema: str, table: str) -> CompiledCloudEvents:
        """What the compiled path takes to write the CloudEvents of ``schema.table`` as :meth:`__call__` does."""
        heads = tuple(self._head(schema, table, action) for action in COMPILED_ACTIONS)
        if self.structured:
            return heads, None, None, False
        id_name, time_name = sys.intern(self.binding.prefix + "id"), sys.intern(self.binding.prefix + "time")
        if self.binding.lines and all(_LINE_VALUE.fullmatch(f"{n}{v}") for h in heads for n, v in h.items()):
            lines = tuple("".join(f"{name}: {value}\r\n" for name, value in head.items()).encode() for head in heads)
            return lines, f"{id_name}: ", f"\r\n{time_name}: ", True  # type: ignore[return-value]
        # the id and the time in their places already: each event's copy of the head only replaces their values
        heads = tuple({**head, id_name: "", time_name: ""} for head in heads)
        return heads, id_name, time_name, self.binding.percent_encoded

    def _head(self, schema: str, table: str, action: str) -> Any:
        attributes = {
            "specversion": "1.0",
            "type": CLOUDEVENTS_TYPE_PREFIX + action.lower(),
            "source": self.source,
            "subject": f"{schema}.{table}" if schema else table,
        }
        if self.structured or self.binding.datacontenttype_header:
            attributes["datacontenttype"] = DATA_CONTENT_TYPE
        if self.structured:
            return orjson.dumps(attributes)[:-1]  # the object left open for id, time and data
        # interned: the compiled NATS frame writer knows them as plain once seen (listener/_hotpath_c/frames.c)
        return {sys.intern(self.binding.prefix + name): sys.intern(header_value(value, self.binding))
                for name, value in attributes.items()}


# ------------------------------------------------------------------------------------------------
# logical decoding messages (the outbox)


def message_content(content: bytes) -> tuple[Any, Any]:
    """A message's content for the event and, when it is JSON, its parsed value (else None).

    JSON content is embedded as sent; other UTF-8 text becomes a string; bytes that are not UTF-8 become
    base64 (the event then says ``"contentEncoding": "base64"``)."""
    try:
        text = content.decode()
    except UnicodeDecodeError:
        return None, None
    try:
        parsed = orjson.loads(content)
    except orjson.JSONDecodeError:
        return text, None
    return orjson.Fragment(content), parsed


def message_body(ident: str, prefix: str, content: bytes, moment: str) -> tuple[bytes, Any]:
    """The MESSAGE event ``{"id", "action", "prefix", "content", "commitTime"}`` and the parsed content."""
    value, parsed = message_content(content)
    event: dict[str, Any] = {"id": ident, "action": "MESSAGE", "prefix": prefix}
    if value is None and content:
        event["content"] = base64.b64encode(content).decode("ascii")
        event["contentEncoding"] = "base64"
    else:
        event["content"] = value if value is not None else ""
    event["commitTime"] = moment
    return orjson.dumps(event), parsed


def message_key(parsed: Any, field: str, prefix: str) -> bytes:
    """The key of a MESSAGE event: the content's ``field`` (messageKeyFrom) when it has one, else the prefix."""
    if field and isinstance(parsed, dict) and parsed.get(field) is not None:
        value = parsed[field]
        return value.encode() if isinstance(value, str) else orjson.dumps(value)
    return prefix.encode()


# ------------------------------------------------------------------------------------------------
# Debezium

#: what Debezium writes for a value that was not sent (an unchanged TOASTed column)
UNAVAILABLE: Final = "__debezium_unavailable_value"
_EPOCH_DAY: Final = date(1970, 1, 1).toordinal()
_UNIX_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROS: Final = timedelta(microseconds=1)
#: Debezium's days per month for intervals (365.25 / 12)
DAYS_PER_MONTH: Final = 30.4375
_INTERVAL: Final = re.compile(
    r"P(?:(?P<Y>-?\d+)Y)?(?:(?P<M>-?\d+)M)?(?:(?P<D>-?\d+)D)?"
    r"(?:T(?:(?P<h>-?\d+)H)?(?:(?P<m>-?\d+)M)?(?:(?P<s>-?\d+(?:\.\d+)?)S)?)?"
)


def dbz_date(text: str) -> int | str:
    """date -> days since 1970-01-01."""
    if not text[0].isdigit() or text.endswith(" BC"):
        return text
    return date.fromisoformat(text).toordinal() - _EPOCH_DAY


def dbz_time(text: str) -> int:
    """time -> microseconds since midnight (MicroTime)."""
    hours, minutes, seconds = text.split(":")
    whole, _, fraction = seconds.partition(".")
    micros = int((fraction + "000000")[:6]) if fraction else 0
    return ((int(hours) * 60 + int(minutes)) * 60 + int(whole)) * 1_000_000 + micros


def _local_timestamp(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


#: what Debezium publishes for timestamp 'infinity' and '-infinity' (the PostgreSQL JDBC driver's constants)
TIMESTAMP_INFINITY: Final = {"infinity": 9223372036825200000, "-infinity": -9223372036832400000}


def dbz_micro_timestamp(text: str) -> int | str:
    """timestamp(4-6) -> microseconds since the epoch (MicroTimestamp)."""
    if not text[0].isdigit() or text.endswith(" BC"):
        return TIMESTAMP_INFINITY.get(text, text)
    return (_local_timestamp(text) - _UNIX_EPOCH) // _MICROS


def dbz_milli_timestamp(text: str) -> int | str:
    """timestamp(0-3) -> milliseconds since the epoch (Timestamp)."""
    if text in TIMESTAMP_INFINITY:
        return TIMESTAMP_INFINITY[text]
    micros = dbz_micro_timestamp(text)
    return micros // 1000 if isinstance(micros, int) else micros


def dbz_numeric(text: str) -> str:
    """numeric -> its exact text (decimal.handling.mode=string); NaN as Debezium writes it."""
    return "NAN" if text == "NaN" else text


def dbz_timetz(text: str) -> str:
    """timetz -> the time in UTC with a Z (ZonedTime)."""
    match = re.fullmatch(r"(\d\d):(\d\d):(\d\d)(\.\d+)?([+-]\d\d)(?::?(\d\d))?(?::?(\d\d))?", text)
    if match is None:
        raise types.ConversionError(f"not a time with time zone: {text!r}")
    hours, minutes, seconds, fraction, off_h, off_m, off_s = match.groups()
    offset = int(off_h) * 3600 + (1 if off_h[0] == "+" else -1) * (int(off_m or 0) * 60 + int(off_s or 0))
    total = (int(hours) * 3600 + int(minutes) * 60 + int(seconds) - offset) % 86400
    return f"{total // 3600:02d}:{total // 60 % 60:02d}:{total % 60:02d}{(fraction or '').rstrip('0').rstrip('.')}Z"


def dbz_interval(text: str) -> int:
    """interval (ISO 8601 text) -> microseconds, a month counted as 30.4375 days (MicroDuration)."""
    match = _INTERVAL.fullmatch(text)
    if match is None or text == "P":
        raise types.ConversionError(f"not an ISO 8601 interval: {text!r}")
    part = match.groupdict()
    months = int(part["Y"] or 0) * 12 + int(part["M"] or 0)
    days = months * DAYS_PER_MONTH + int(part["D"] or 0)
    seconds = ((days * 24 + int(part["h"] or 0)) * 60 + int(part["m"] or 0)) * 60 + float(part["s"] or 0)
    return int(seconds * 1e6)


def dbz_money(text: str) -> str:
    """money ('$1,234.56', '-$1.00') -> the amount as a decimal string."""
    negative = text.startswith("-") or text.startswith("(")
    digits = "".join(c for c in text if c.isdigit() or c == ".")
    return f"-{digits}" if negative else digits


def dbz_point(text: str) -> dict[str, Any]:
    """point '(x,y)' -> Debezium's geometry Point struct (x, y, WKB, no SRID)."""
    x_text, y_text = text.strip("()").split(",")
    x, y = float(x_text), float(y_text)
    wkb = struct.pack("<BIdd", 1, 1, x, y)
    return {"x": x, "y": y, "wkb": base64.b64encode(wkb).decode("ascii"), "srid": None}


def dbz_bit1(text: str) -> bool:
    """bit(1) -> a boolean."""
    return text == "1"


def dbz_bits(text: str) -> str:
    """bit(n), varbit -> the bits as bytes, least significant byte first, in base64 (Bits)."""
    number = int(text, 2) if text else 0
    length = max(1, (len(text) + 7) // 8)
    return base64.b64encode(number.to_bytes(length, "little")).decode("ascii")


BIT, VARBIT, MONEY, POINT, DATE, TIME, TIMETZ, INTERVAL = 1560, 1562, 790, 600, 1082, 1083, 1266, 1186

#: type OID -> Debezium's conversion of its text form (None: the text as a string)
DEBEZIUM_SCALARS: Final[dict[int, Converter | None]] = {
    **types.SCALARS,
    types.JSON: None,
    types.JSONB: None,
    types.NUMERIC: dbz_numeric,
    types.TIMESTAMP: dbz_micro_timestamp,
    DATE: dbz_date,
    TIME: dbz_time,
    TIMETZ: dbz_timetz,
    INTERVAL: dbz_interval,
    MONEY: dbz_money,
    POINT: dbz_point,
    BIT: dbz_bits,
    VARBIT: dbz_bits,
}


def debezium_converter(registry: TypeRegistry, type_oid: int, type_modifier: int) -> Converter | None:
    """A column's conversion as Debezium does it; timestamp(0-3) counts milliseconds (adaptive); bit(1) and
    varbit(1) are booleans."""
    converter = registry.converter(type_oid, DEBEZIUM_SCALARS)
    if converter is dbz_micro_timestamp and 0 <= type_modifier <= 3:
        return dbz_milli_timestamp
    if type_oid in (BIT, VARBIT) and type_modifier == 1:
        return dbz_bit1
    return converter


# ------------------------------------------------------------------------------------------------
# Debezium's schemas (publisher.debezium.schemas): Kafka Connect schemas as the JsonConverter writes them


def connect_schema(
    kind: str, *, optional: bool = True, name: str | None = None, version: int | None = None, doc: str | None = None,
    parameters: dict[str, str] | None = None, default: Any = None, fields: list[dict[str, Any]] | None = None,
    items: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A Connect schema with its keys in the JsonConverter's order (a field adds ``"field"`` last)."""
    schema: dict[str, Any] = {"type": kind}
    if fields is not None:
        schema["fields"] = fields
    if items is not None:
        schema["items"] = items
    schema["optional"] = optional
    for key, value in (("name", name), ("version", version), ("doc", doc), ("parameters", parameters),
                       ("default", default)):
        if value is not None:
            schema[key] = value
    return schema


def _field(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "field": name}


XML = 142
#: type OID -> Connect type and logical name of Debezium's schema for it (with the conversions above);
#: any other type is a plain string
_DEBEZIUM_TYPES: Final[dict[int, tuple[str, str | None]]] = {
    types.BOOL: ("boolean", None),
    types.BYTEA: ("bytes", None),
    types.INT2: ("int16", None),
    types.INT4: ("int32", None),
    types.INT8: ("int64", None),
    types.OID: ("int64", None),
    types.FLOAT4: ("float", None),
    types.FLOAT8: ("double", None),
    types.JSON: ("string", "io.debezium.data.Json"),
    types.JSONB: ("string", "io.debezium.data.Json"),
    types.UUID: ("string", "io.debezium.data.Uuid"),
    XML: ("string", "io.debezium.data.Xml"),
    types.TIMESTAMPTZ: ("string", "io.debezium.time.ZonedTimestamp"),
    types.TIMESTAMP: ("int64", "io.debezium.time.MicroTimestamp"),
    DATE: ("int32", "io.debezium.time.Date"),
    TIME: ("int64", "io.debezium.time.MicroTime"),
    TIMETZ: ("string", "io.debezium.time.ZonedTime"),
    INTERVAL: ("int64", "io.debezium.time.MicroDuration"),
}
_POINT_FIELDS: Final = [
    _field("x", connect_schema("double", optional=False)),
    _field("y", connect_schema("double", optional=False)),
    _field("wkb", connect_schema("bytes")),
    _field("srid", connect_schema("int32")),
]


def debezium_schema(
    registry: TypeRegistry, type_oid: int, type_modifier: int, optional: bool, enum_labels: str | None = None
) -> dict[str, Any]:
    """The schema Debezium writes for a column of this type (without the column's name): the type of the
    value :func:`debezium_converter` writes, its logical name and parameters."""
    info = registry.info(type_oid)
    element = types.ARRAYS.get(type_oid) or (info.element_oid if info is not None and info.category == "A" else 0)
    if element:
        element_info = registry.info(element)
        is_enum = element_info is not None and element_info.kind == "e" and enum_labels is not None
        # the element converter ignores the modifier (timestamp(3)[] counts microseconds too)
        items = debezium_schema(registry, element, -1, not is_enum, enum_labels)
        return connect_schema("array", optional=optional, items=items)
    if info is not None and info.kind == "d" and info.base_oid:
        return debezium_schema(registry, info.base_oid, type_modifier, optional, enum_labels)
    if info is not None and info.kind == "e" and enum_labels is not None:
        return connect_schema("string", optional=optional, name="io.debezium.data.Enum", version=1,
                              parameters={"allowed": enum_labels})
    if type_oid == POINT:
        return connect_schema("struct", fields=_POINT_FIELDS, optional=optional,
                              name="io.debezium.data.geometry.Point", version=1, doc="Geometry (POINT)")
    if type_oid in (BIT, VARBIT):
        if type_modifier == 1:
            return connect_schema("boolean", optional=optional)
        length = str(type_modifier) if type_modifier > 0 else "2147483647"  # varbit without a length
        return connect_schema("bytes", optional=optional, name="io.debezium.data.Bits", version=1,
                              parameters={"length": length})
    if type_oid == types.TIMESTAMP and 0 <= type_modifier <= 3:
        return connect_schema("int64", optional=optional, name="io.debezium.time.Timestamp", version=1)
    kind, name = _DEBEZIUM_TYPES.get(type_oid, ("string", None))
    return connect_schema(kind, optional=optional, name=name, version=1 if name else None)


def _plain(*fields: tuple[str, str, bool]) -> list[dict[str, Any]]:
    """Fields of types without a logical name: (name, type, optional)."""
    return [_field(name, connect_schema(kind, optional=optional)) for name, kind, optional in fields]


#: the ``source`` block's schema (the PostgreSQL connector's, version 1)
_SOURCE_SCHEMA: Final = connect_schema(
    "struct", optional=False, name="io.debezium.connector.postgresql.Source", version=1,
    fields=[
        *_plain(("version", "string", False), ("connector", "string", False), ("name", "string", False),
                ("ts_ms", "int64", False)),
        _field("snapshot", connect_schema(
            "string", name="io.debezium.data.Enum", version=1, default="false",
            parameters={"allowed": "true,first,first_in_data_collection,last_in_data_collection,last,false,"
                                   "incremental"},
        )),
        *_plain(("db", "string", False), ("sequence", "string", True), ("ts_us", "int64", True),
                ("ts_ns", "int64", True), ("schema", "string", False), ("table", "string", False),
                ("txId", "int64", True), ("lsn", "int64", True), ("xmin", "int64", True), ("origin", "string", True),
                ("origin_lsn", "int64", True)),
    ],
)
#: the ``transaction`` block's schema (always null here: no transaction metadata)
_TRANSACTION_SCHEMA: Final = connect_schema(
    "struct", name="event.block", version=1,
    fields=_plain(("id", "string", False), ("total_order", "int64", False), ("data_collection_order", "int64", False)),
)
_TIMES: Final = [_field(name, connect_schema("int64")) for name in ("ts_ms", "ts_us", "ts_ns")]
#: a logical message's key and value schemas
MESSAGE_KEY_SCHEMA: Final = orjson.Fragment(orjson.dumps(connect_schema(
    "struct", optional=False, name="io.debezium.connector.postgresql.MessageKey", version=1,
    fields=[_field("prefix", connect_schema("string"))],
)))
MESSAGE_VALUE_SCHEMA: Final = orjson.Fragment(orjson.dumps(connect_schema(
    "struct", optional=False, name="io.debezium.connector.postgresql.MessageValue", version=1,
    fields=[
        _field("op", connect_schema("string", optional=False)),
        _TIMES[0],
        _field("source", _SOURCE_SCHEMA),
        _field("transaction", _TRANSACTION_SCHEMA),
        _field("message", connect_schema(
            "struct", optional=False, name="io.debezium.connector.postgresql.Message", version=1,
            fields=[_field("prefix", connect_schema("string")), _field("content", connect_schema("bytes"))],
        )),
    ],
)))


def unavailable(type_oid: int) -> Any:
    """What Debezium writes for an unchanged TOASTed value of a column of this type: its placeholder text, as
    bytes for bytea, in a list for text and JSON arrays, as a list of its bytes for int4, int8 and date arrays."""
    if type_oid == types.BYTEA:
        return base64.b64encode(UNAVAILABLE.encode()).decode("ascii")
    if type_oid in _TEXT_ARRAYS:
        return [UNAVAILABLE]
    if type_oid in _NUMBER_ARRAYS:
        return list(UNAVAILABLE.encode())
    return UNAVAILABLE


_TEXT_ARRAYS: Final = frozenset({1009, 1015, 199, 3807})  # text[], varchar[], json[], jsonb[]
_NUMBER_ARRAYS: Final = frozenset({1007, 1016, 1182})  # int4[], int8[], date[]


@dataclass(frozen=True, slots=True)
class DebeziumTable:
    """What the Debezium events of one table share, computed once per Relation message."""

    unavailable: tuple[Any, ...]  # per column: what an unchanged TOASTed value is written as
    #: publisher.debezium.schemas: the key's schema (None: no key) and the envelope's, as JSON to splice in
    key_schema: orjson.Fragment | None = None
    envelope_schema: orjson.Fragment | None = None


def table_schemas(
    logical_name: str, schema: str, table: str, columns: Sequence[tuple[str, dict[str, Any]]], key_index: Sequence[int]
) -> tuple[orjson.Fragment | None, orjson.Fragment]:
    """The key schema (None: no key) and the envelope schema of a table's events from each column's name and
    :func:`debezium_schema`; named ``<logical_name>.<schema>.<table>.Key`` / ``.Value`` / ``.Envelope`` as
    Debezium names them."""
    prefix = f"{logical_name}.{schema}.{table}"
    value = connect_schema("struct", name=f"{prefix}.Value", fields=[_field(n, s) for n, s in columns])
    envelope = connect_schema(
        "struct", optional=False, name=f"{prefix}.Envelope", version=2,
        fields=[_field("before", value), _field("after", value), _field("source", _SOURCE_SCHEMA),
                _field("transaction", _TRANSACTION_SCHEMA), _field("op", connect_schema("string", optional=False)),
                *_TIMES],
    )
    key = None
    if key_index:
        key = orjson.Fragment(orjson.dumps(connect_schema(
            "struct", optional=False, name=f"{prefix}.Key", fields=[_field(*columns[i]) for i in key_index]
        )))
    return key, orjson.Fragment(orjson.dumps(envelope))


def with_schema(schema: orjson.Fragment, payload: Any) -> bytes:
    """``{"schema": ..., "payload": ...}``: the JsonConverter's record with schemas enabled."""
    return orjson.dumps({"schema": schema, "payload": payload})


@dataclass(slots=True)
class Change:
    """Where a change comes from, as Debezium's ``source`` block says it."""

    commit_micros: int  # protocol commit time (microseconds since 2000-01-01)
    xid: int | None
    lsn: int | None
    snapshot: str = "false"  # "incremental" for the READ events of a backfill


class Debezium:
    """Builds Debezium change events: ``{"before", "after", "source", "transaction", "op", "ts_ms", ...}``
    with the fields in Debezium's order, and its logical message events (``op: m``); with schemas
    (``publisher.debezium.schemas``) each inside ``{"schema", "payload"}``."""

    def __init__(self, cfg: Config) -> None:
        self._source_head = {
            "version": f"wal-listener-{__version__}",
            "connector": "postgresql",
            "name": cfg.publisher.topic,
        }
        self._db = cfg.database.name
        #: the LSN of the last commit seen: the first part of ``sequence`` (None right after a start)
        self.last_commit: int | None = None
        self.schemas = cfg.publisher.debezium.schemas
        #: the key carries its schema where it is a record's key that Kafka Connect reads; elsewhere (a Pub/Sub
        #: ordering key) a key that changed with the table's shape would break the order of a row's events
        self._key_schemas = self.schemas and cfg.publisher.type == PublisherType.KAFKA

    def table(
        self, registry: TypeRegistry, rel: Relation, key_index: Sequence[int],
        facts: Mapping[str, ColumnFacts] | None,
    ) -> DebeziumTable:
        """What the events of ``rel`` share. With ``publisher.debezium.schemas`` its schemas: a column is
        optional unless it is NOT NULL (``facts``; without them, unless it is part of the key)."""
        placeholders = tuple(unavailable(column.type_oid) for column in rel.columns)
        if not self.schemas:
            return DebeziumTable(placeholders)
        columns = []
        for i, column in enumerate(rel.columns):
            fact = facts.get(column.name) if facts is not None else None
            optional = not fact.not_null if fact is not None else i not in key_index
            schema = debezium_schema(registry, column.type_oid, column.type_modifier, optional,
                                     fact.enum_labels if fact is not None else None)
            columns.append((column.name, schema))
        key, envelope = table_schemas(self._source_head["name"], rel.schema, rel.name, columns, key_index)
        return DebeziumTable(placeholders, key if self._key_schemas else None, envelope)

    @staticmethod
    def row(
        names: Sequence[str], converters: Sequence[Converter | None], values: Tuple, table: DebeziumTable
    ) -> dict[str, Any]:
        """Every column, converted; one not sent (an unchanged TOASTed value) as Debezium's placeholder."""
        out: dict[str, Any] = {}
        for name, conv, value, placeholder in zip(names, converters, values, table.unavailable, strict=False):
            if value is UNCHANGED:
                out[name] = placeholder
            elif value is None or conv is None:
                out[name] = value
            else:
                out[name] = conv(value)  # type: ignore[arg-type]
        return out

    @staticmethod
    def key(names: Sequence[str], index: Sequence[int], row: Mapping[str, Any], table: DebeziumTable) -> bytes | None:
        """``{"id": 1}``: the key columns and their values (with its schema on Kafka, with schemas)."""
        if not index:
            return None
        payload = {names[i]: row.get(names[i]) for i in index}
        return orjson.dumps(payload) if table.key_schema is None else with_schema(table.key_schema, payload)

    def source(self, schema: str, table: str, change: Change) -> dict[str, Any]:
        commit_us = change.commit_micros + _PG_EPOCH_US
        last = None if self.last_commit is None else str(self.last_commit)
        return {
            **self._source_head,
            "ts_ms": commit_us // 1000,
            "snapshot": change.snapshot,
            "db": self._db,
            "sequence": orjson.dumps([last, None if change.lsn is None else str(change.lsn)]).decode(),
            "ts_us": commit_us,
            "ts_ns": commit_us * 1000,
            "schema": schema,
            "table": table,
            "txId": change.xid,
            "lsn": change.lsn,
            "xmin": None,
            "origin": None,
            "origin_lsn": None,
        }

    def envelope(
        self, schema: str, table: str, op: str, before: dict[str, Any] | None, after: dict[str, Any] | None,
        change: Change, table_schema: orjson.Fragment | None = None,
    ) -> bytes:
        now_ns = time.time_ns()
        event = {
            "before": before, "after": after, "source": self.source(schema, table, change), "transaction": None,
            "op": op, "ts_ms": now_ns // 1_000_000, "ts_us": now_ns // 1000, "ts_ns": now_ns,
        }
        return orjson.dumps(event) if table_schema is None else with_schema(table_schema, event)

    def message(self, prefix: str, content: bytes, change: Change) -> tuple[bytes, bytes]:
        """A logical message's event and its key (``{"prefix": ...}``)."""
        event = {
            "op": "m", "ts_ms": time.time_ns() // 1_000_000, "source": self.source("", "", change),
            "transaction": None,
            "message": {"prefix": prefix, "content": base64.b64encode(content).decode("ascii")},
        }
        key = {"prefix": prefix}
        body = with_schema(MESSAGE_VALUE_SCHEMA, event) if self.schemas else orjson.dumps(event)
        return body, with_schema(MESSAGE_KEY_SCHEMA, key) if self._key_schemas else orjson.dumps(key)

    def committed(self, commit_lsn: int) -> None:
        """A transaction ended: the first part of the next change's ``sequence``."""
        self.last_commit = commit_lsn

    def source_parts(self, schema: str, table: str) -> tuple[bytes, bytes, bytes, bytes]:
        """The ``source`` block of a change's event (:meth:`source`) as the compiled path writes it around what
        varies by change: the JSON up to ``ts_ms``, from there to the sequence's parts, from ``ts_ns`` to
        ``txId``; and the second part for a READ event (snapshot ``incremental``)."""
        db = orjson.dumps(self._db)
        return (
            b',"source":' + orjson.dumps(self._source_head)[:-1] + b',"ts_ms":',
            b',"snapshot":"false","db":' + db + b',"sequence":"[',
            b',"schema":' + orjson.dumps(schema) + b',"table":' + orjson.dumps(table) + b',"txId":',
            b',"snapshot":"incremental","db":' + db + b',"sequence":"[',
        )


_PG_EPOCH_US: Final = int((PG_EPOCH - _UNIX_EPOCH).total_seconds()) * 1_000_000


def moment_micros(moment: str) -> int:
    """An RFC 3339 UTC time (commitTime) as protocol microseconds (since 2000-01-01)."""
    parsed = datetime.fromisoformat(moment.replace("Z", "+00:00"))
    return (parsed - PG_EPOCH) // _MICROS


