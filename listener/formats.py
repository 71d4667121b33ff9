"""Stage 6b — formats: the event in the shape its consumers already speak (``publisher.format``).

- ``wal-listener`` (the default): the event of :mod:`listener.event`, byte for byte the Go original's.
- ``cloudevents``: CloudEvents 1.0 around that event. *binary*: the event is the body, the attributes are
  headers named by each broker's protocol binding (:class:`Binding`); *structured*: one
  ``application/cloudevents+json`` body whose ``data`` is the event.
- ``debezium``: Debezium's JSON change event (schemas disabled) with the values converted as Debezium's
  PostgreSQL connector converts them (``decimal.handling.mode=string``,
  ``time.precision.mode=adaptive_time_microseconds``).

And the MESSAGE event of a logical decoding message (``pg_logical_emit_message``: the outbox).
Pure functions and small classes over values: no I/O.
"""

from __future__ import annotations

import base64
import re
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final
from urllib.parse import quote

import orjson

from listener import __version__, types
from listener.config import CloudEventsConfig, Config
from listener.message import Message
from listener.pgoutput import PG_EPOCH, UNCHANGED, Tuple
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


#: the binding of Pub/Sub: ce- attributes, values percent-encoded as in HTTP, the content-type attribute
CE_HEADERS: Final = Binding("ce-", percent_encoded=True)
#: the NATS protocol binding (1.0.3, section 3.1.3.1): every attribute a ce- header, datacontenttype too
#: (ce-datacontenttype); a content-type header of application/cloudevents marks structured mode only
NATS_HEADERS: Final = Binding("ce-", percent_encoded=True, datacontenttype_header=True)
#: printable ASCII but space, '"' and '%': what a ce- header value may hold unencoded
_HEADER_SAFE: Final = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')
_PLAIN_HEADER: Final = re.compile(r'[!#-$&-~]*')


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


class CloudEvents:
    """Turns a finished :class:`Message` into a CloudEvent (the event's own body stays its ``data``)."""

    def __init__(self, cfg: CloudEventsConfig, source: str, binding: Binding) -> None:
        self.structured = cfg.mode == "structured"
        self.source = source
        self.binding = binding
        self._heads: dict[tuple[str, str, str], Any] = {}  # (schema, table, action) -> what is the same each time

    @staticmethod
    def subject(message: Message) -> str:
        """``schema.table``; for a MESSAGE event its prefix."""
        return f"{message.schema}.{message.table}" if message.schema else message.table

    def __call__(self, message: Message, moment: str) -> Message:
        """``moment``: the commit time (the read time of a READ event), RFC 3339."""
        key = (message.schema, message.table, message.action)
        head = self._heads.get(key)
        if head is None:
            head = self._head(message)
            if len(self._heads) < 10000:
                self._heads[key] = head
        if self.structured:
            message.body = b"".join((head, b',"id":"', message.id.encode(), b'","time":"', moment.encode(),
                                     b'","data":', message.body, b"}"))
            message.content_type = STRUCTURED_CONTENT_TYPE
            return message
        headers = dict(head)
        prefix = self.binding.prefix
        headers[prefix + "id"] = header_value(message.id, self.binding)
        headers[prefix + "time"] = moment
        message.headers = headers
        message.content_type = "" if self.binding.datacontenttype_header else DATA_CONTENT_TYPE
        return message

    def _head(self, message: Message) -> Any:
        attributes = {
            "specversion": "1.0",
            "type": CLOUDEVENTS_TYPE_PREFIX + message.action.lower(),
            "source": self.source,
            "subject": self.subject(message),
        }
        if self.structured or self.binding.datacontenttype_header:
            attributes["datacontenttype"] = DATA_CONTENT_TYPE
        if self.structured:
            return orjson.dumps(attributes)[:-1]  # the object left open for id, time and data
        return {self.binding.prefix + name: header_value(value, self.binding) for name, value in attributes.items()}


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
    """A column's conversion as Debezium does it; timestamp(0-3) counts milliseconds (adaptive)."""
    converter = registry.converter(type_oid, DEBEZIUM_SCALARS)
    if converter is dbz_micro_timestamp and 0 <= type_modifier <= 3:
        return dbz_milli_timestamp
    if type_oid == BIT and type_modifier == 1:
        return dbz_bit1
    return converter


@dataclass(slots=True)
class Change:
    """Where a change comes from, as Debezium's ``source`` block says it."""

    commit_micros: int  # protocol commit time (microseconds since 2000-01-01)
    xid: int | None
    lsn: int | None
    snapshot: str = "false"  # "incremental" for the READ events of a backfill


class Debezium:
    """Builds Debezium change events: ``{"before", "after", "source", "transaction", "op", "ts_ms", ...}``
    with the fields in Debezium's order, and its logical message events (``op: m``)."""

    def __init__(self, cfg: Config) -> None:
        self._source_head = {
            "version": f"wal-listener-{__version__}",
            "connector": "postgresql",
            "name": cfg.publisher.topic,
        }
        self._db = cfg.database.name
        self._last_commit: int | None = None

    @staticmethod
    def row(names: Sequence[str], converters: Sequence[Converter | None], values: Tuple) -> dict[str, Any]:
        """Every column, converted; one not sent (an unchanged TOASTed value) as Debezium's placeholder."""
        out: dict[str, Any] = {}
        for name, conv, value in zip(names, converters, values, strict=False):
            if value is UNCHANGED:
                out[name] = UNAVAILABLE
            elif value is None or conv is None:
                out[name] = value
            else:
                out[name] = conv(value)  # type: ignore[arg-type]
        return out

    @staticmethod
    def key(names: Sequence[str], index: Sequence[int], row: Mapping[str, Any]) -> bytes | None:
        """``{"id": 1}``: the key columns and their values."""
        if not index:
            return None
        return orjson.dumps({names[i]: row.get(names[i]) for i in index})

    def source(self, schema: str, table: str, change: Change) -> dict[str, Any]:
        commit_us = change.commit_micros + _PG_EPOCH_US
        last = None if self._last_commit is None else str(self._last_commit)
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
        change: Change,
    ) -> bytes:
        now_ns = time.time_ns()
        return orjson.dumps({
            "before": before, "after": after, "source": self.source(schema, table, change), "transaction": None,
            "op": op, "ts_ms": now_ns // 1_000_000, "ts_us": now_ns // 1000, "ts_ns": now_ns,
        })

    def message(self, prefix: str, content: bytes, change: Change) -> tuple[bytes, bytes]:
        """A logical message's event and its key (``{"prefix": ...}``)."""
        body = orjson.dumps({
            "op": "m", "ts_ms": time.time_ns() // 1_000_000, "source": self.source("", "", change),
            "transaction": None,
            "message": {"prefix": prefix, "content": base64.b64encode(content).decode("ascii")},
        })
        return body, orjson.dumps({"prefix": prefix})

    def committed(self, commit_lsn: int) -> None:
        """A transaction ended: the first part of the next change's ``sequence``."""
        self._last_commit = commit_lsn


_PG_EPOCH_US: Final = int((PG_EPOCH - _UNIX_EPOCH).total_seconds()) * 1_000_000


def moment_micros(moment: str) -> int:
    """An RFC 3339 UTC time (commitTime) as protocol microseconds (since 2000-01-01)."""
    parsed = datetime.fromisoformat(moment.replace("Z", "+00:00"))
    return (parsed - PG_EPOCH) // _MICROS


