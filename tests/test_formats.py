"""The event formats as pure functions: CloudEvents attributes and bodies, the MESSAGE event, Debezium's
value conversions, and their config (no services)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from cloudevents.core.bindings import http, kafka
from cloudevents.core.formats.json import JSONFormat

from listener import formats
from listener.catalog import ColumnFacts
from listener.config import Config, KafkaPublisherConfig, load_config
from listener.errors import ConfigError
from listener.event import EventBuilder
from listener.formats import Binding, CloudEvents
from listener.message import Message
from listener.pgoutput import UNCHANGED, Column, Relation
from listener.types import PgType, TypeRegistry
from tests.support.events import make_config

KAFKA = Binding("ce_", percent_encoded=False)
BODY = b'{"id":"e1","schema":"public","table":"items","action":"INSERT","data":{"id":1},"dataOld":{},' \
       b'"commitTime":"2026-01-02T03:04:05.123456Z"}'
TIME = "2026-01-02T03:04:05.123456Z"


def item(**kw: Any) -> Message:
    return Message(**{"id": "e1", "subject": "t.public_items", "body": BODY, "schema": "public", "table": "items",
                      "action": "INSERT", **kw})


def cloudevents(mode: str = "binary", binding: Binding = formats.CE_HEADERS) -> CloudEvents:
    return CloudEvents(formats.CloudEventsConfig(mode=mode), "//pg-a/shop", binding)  # type: ignore[arg-type]


# -- CloudEvents -------------------------------------------------------------------------------------


def test_binary_mode_puts_the_attributes_in_headers_and_leaves_the_body() -> None:
    message = cloudevents()(item(), TIME)
    assert message.body == BODY
    assert message.headers == {
        "ce-specversion": "1.0", "ce-type": "io.wal-listener.insert", "ce-source": "//pg-a/shop",
        "ce-subject": "public.items", "ce-id": "e1", "ce-time": TIME,
    }
    assert message.content_type == "application/json"
    event = http.from_binary(http.HTTPMessage({**message.headers, "content-type": message.content_type},
                                              message.body), JSONFormat())
    assert event.get_data() == orjson.loads(BODY) and event.get_id() == "e1"


def test_nats_binary_mode_carries_datacontenttype_as_a_ce_header() -> None:
    """The NATS protocol binding (1.0.3, 3.1.3.1): every attribute a ce- header, ce-datacontenttype too;
    no content-type header (on NATS that header with application/cloudevents marks structured mode)."""
    message = cloudevents(binding=formats.NATS_HEADERS)(item(), TIME)
    assert message.headers is not None
    assert message.headers["ce-datacontenttype"] == "application/json"
    assert message.content_type == "" and "content-type" not in message.attributes()
    # the SDK's HTTP-style parser (what NATS consumers in Python use) reads the attribute from the ce- header
    event = http.from_http(http.HTTPMessage(message.attributes(), message.body), JSONFormat())
    assert event.get_datacontenttype() == "application/json"
    assert event.get_data() == orjson.loads(BODY) and event.get_id() == "e1"


def test_kafka_binding_names_and_the_sdk_reads_them() -> None:
    message = cloudevents(binding=KAFKA)(item(), TIME)
    assert set(message.headers) == {"ce_specversion", "ce_type", "ce_source", "ce_subject", "ce_id", "ce_time"}
    headers = {k: v.encode() for k, v in message.attributes().items()}
    event = kafka.from_kafka(kafka.KafkaMessage(headers, b"1", message.body), JSONFormat())
    assert (event.get_type(), event.get_subject(), event.get_datacontenttype()) == (
        "io.wal-listener.insert", "public.items", "application/json")


def test_header_values_outside_printable_ascii_are_percent_encoded_where_the_binding_says() -> None:
    odd = item(schema="schéma", table="a b")
    assert cloudevents()(odd, TIME).headers["ce-subject"] == "sch%C3%A9ma.a%20b"
    assert cloudevents(binding=KAFKA)(item(schema="schéma", table="a b"), TIME).headers["ce_subject"] == "schéma.a b"
    event = http.from_binary(http.HTTPMessage(odd.headers, odd.body), JSONFormat())
    assert event.get_subject() == "schéma.a b"


def test_structured_mode_is_one_cloudevents_json_body() -> None:
    message = cloudevents("structured")(item(), TIME)
    assert not message.headers and message.content_type == "application/cloudevents+json"
    envelope = json.loads(message.body)
    assert envelope == {
        "specversion": "1.0", "type": "io.wal-listener.insert", "source": "//pg-a/shop", "subject": "public.items",
        "datacontenttype": "application/json", "id": "e1", "time": TIME, "data": orjson.loads(BODY),
    }
    event = http.from_structured(http.HTTPMessage({"content-type": message.content_type}, message.body), JSONFormat())
    assert event.get_id() == "e1" and event.get_data() == orjson.loads(BODY)


@pytest.mark.parametrize(("host", "name", "source"), [
    ("pg-a", "shop", "//pg-a/shop"),
    ("pg-a:5433,pg-b:5434", "shop", "//pg-a/shop"),
    ("[::1]:5432", "my db", "//[::1]/my%20db"),
])
def test_default_source_is_the_first_host_and_the_database(host: str, name: str, source: str) -> None:
    cfg = Config.model_validate({"listener": {"slotName": "s"}, "database": {"host": host, "name": name, "user": "u"},
                                 "publisher": {"type": "nats", "address": "nats://x", "topic": "t"}})
    assert formats.default_source(cfg) == source


def test_the_default_format_is_not_touched() -> None:
    """format: wal-listener (set or not) builds exactly the Go original's event."""
    rel = Relation(1, "public", "items", "d", (Column("id", 23, -1, True), Column("v", 25, -1, False)))
    bodies = []
    for fmt in (None, "wal-listener"):
        cfg = make_config()
        if fmt is not None:
            cfg = cfg.model_copy(update={"publisher": cfg.publisher.model_copy(update={"format": fmt})})
        builder = EventBuilder(cfg, TypeRegistry(), needs_key=True, compiled=False)
        info = builder.add_relation(rel)
        txn = builder.begin(0x16B3748, 0)
        message = builder.insert(info, txn, ["1", "x"])
        assert message is not None and not message.headers and message.content_type == ""
        bodies.append(message.body)
    assert bodies[0] == bodies[1]
    assert orjson.loads(bodies[0])["data"] == {"id": 1, "v": "x"}


# -- logical messages ------------------------------------------------------------------------------


@pytest.mark.parametrize(("content", "expected", "encoding"), [
    (b'{"order": 1}', {"order": 1}, None),
    (b'"text"', "text", None),
    (b"12", 12, None),
    (b"not json", "not json", None),
    (b"", "", None),
    (b"\xff\x00", base64.b64encode(b"\xff\x00").decode(), "base64"),
])
def test_message_event_content(content: bytes, expected: Any, encoding: str | None) -> None:
    body, _ = formats.message_body("e1", "outbox", content, TIME)
    event = json.loads(body)
    assert event["content"] == expected and event.get("contentEncoding") == encoding
    assert list(event) == ["id", "action", "prefix", "content", *(["contentEncoding"] if encoding else []),
                           "commitTime"]


@pytest.mark.parametrize(("content", "field", "key"), [
    (b'{"orderId": "o-1"}', "orderId", b"o-1"),
    (b'{"orderId": 7}', "orderId", b"7"),
    (b'{"other": 7}', "orderId", b"outbox"),
    (b"[1]", "orderId", b"outbox"),
    (b'{"orderId": 7}', "", b"outbox"),
])
def test_message_key_from_a_field_of_the_content_else_the_prefix(content: bytes, field: str, key: bytes) -> None:
    _, parsed = formats.message_content(content)
    assert formats.message_key(parsed, field, "outbox") == key


# -- Debezium's conversions ------------------------------------------------------------------------


@pytest.mark.parametrize(("convert", "text", "expected"), [
    (formats.dbz_date, "1970-01-01", 0),
    (formats.dbz_date, "1969-12-31", -1),
    (formats.dbz_date, "2026-01-02", 20455),
    (formats.dbz_time, "03:04:05.123456", 11045123456),
    (formats.dbz_time, "03:04:05.1", 11045100000),
    (formats.dbz_time, "24:00:00", 86400000000),
    (formats.dbz_timetz, "03:04:05.123456+02", "01:04:05.123456Z"),
    (formats.dbz_timetz, "23:30:00-01:30", "01:00:00Z"),
    (formats.dbz_timetz, "00:00:00+00", "00:00:00Z"),
    (formats.dbz_interval, "P1Y2M3DT4H5M6.789S", 37091106789000),  # as recorded from Debezium
    (formats.dbz_interval, "P-1DT-2H", -93600000000),
    (formats.dbz_interval, "PT0S", 0),
    (formats.dbz_micro_timestamp, "2026-01-02 03:04:05.123456", 1767323045123456),
    (formats.dbz_micro_timestamp, "1969-12-31 23:59:59.999999", -1),
    (formats.dbz_micro_timestamp, "infinity", 9223372036825200000),
    (formats.dbz_micro_timestamp, "-infinity", -9223372036832400000),
    (formats.dbz_milli_timestamp, "2026-01-02 03:04:05.123", 1767323045123),
    (formats.dbz_numeric, "NaN", "NAN"),
    (formats.dbz_numeric, "-0.000100", "-0.000100"),
    (formats.dbz_money, "$12.34", "12.34"),
    (formats.dbz_money, "-$1,234.50", "-1234.50"),
    (formats.dbz_bits, "1010", "Cg=="),
    (formats.dbz_bits, "101", "BQ=="),
    (formats.dbz_bits, "1", "AQ=="),
    (formats.dbz_point, "(1.5,2.5)", {"x": 1.5, "y": 2.5, "wkb": "AQEAAAAAAAAAAAD4PwAAAAAAAARA", "srid": None}),
])
def test_debezium_conversions(convert: Any, text: str, expected: Any) -> None:
    assert convert(text) == expected


def test_debezium_types_row_matches_the_recording() -> None:
    """The built-in types' columns of the recorded row, converted from their text forms in Python."""
    recorded = json.loads((Path(__file__).parent / "data" / "debezium" / "recorded.json").read_text())
    after = recorded["steps"]["insert_types"][0]["value"]["after"]
    texts = {  # the text forms pgoutput sends for the workload's values (DateStyle ISO, TimeZone UTC, ISO intervals)
        "c_int8": (20, "9223372036854775807"), "c_numeric_nan": (1700, "NaN"), "c_float8_nan": (701, "NaN"),
        "c_json": (114, '{"a": [1, 2, {"b": null}]}'), "c_jsonb": (3802, '{"a": "x", "z": 1}'),
        "c_int_array": (1007, "{1,2,3}"), "c_text_array": (1009, '{"a b",c}'),
        "c_timestamptz": (1184, "2026-01-02 01:04:05.123456+00"), "c_timestamp": (1114, "2026-01-02 03:04:05.123456"),
        "c_timestamp_inf": (1114, "infinity"), "c_date": (1082, "2026-01-02"), "c_time3": (1083, "03:04:05.123"),
        "c_timetz": (1266, "03:04:05.123456+02"), "c_interval": (1186, "P1Y2M3DT4H5M6.789S"),
        "c_bytea": (17, "\\x00ff10"), "c_money": (790, "$12.34"), "c_point": (600, "(1.5,2.5)"),
        "c_bit": (1560, "1010"), "c_varbit": (1562, "101"), "c_char": (1042, "ab "),
    }
    registry = TypeRegistry()
    for column, (oid, text) in texts.items():
        convert = formats.debezium_converter(registry, oid, -1)
        assert (convert(text) if convert else text) == after[column], column
    assert formats.debezium_converter(registry, 1114, 3) is formats.dbz_milli_timestamp  # timestamp(3)
    bit1 = formats.debezium_converter(registry, 1560, 1)  # bit(1): a boolean
    assert bit1 is not None and bit1("1") is True and bit1("0") is False


# -- Debezium's schemas -----------------------------------------------------------------------------

RECORDED_SCHEMAS = Path(__file__).parent / "data" / "debezium" / "recorded-schemas.json"
MOOD, POSINT = 90001, 90002  # the workload's enum and domain (tests/support/debezium.py)


def _registry() -> TypeRegistry:
    registry = TypeRegistry()
    registry.add(PgType(MOOD, "e", 0, 0, "E", ","))
    registry.add(PgType(POSINT, "d", 23, 0, "N", ","))
    return registry


def test_debezium_schema_of_every_recorded_column() -> None:
    """Each column of the recorded types row: our schema is the one Debezium 3.6 wrote (type modifiers as
    pgoutput sends them: timestamp(3) -> 3, bit(4) -> 4, varbit(8) -> 8, numeric(20,6) -> 1310730)."""
    recorded = json.loads(RECORDED_SCHEMAS.read_text())
    value = recorded["steps"]["insert_types"][0]["value"]["schema"]
    fields = {f["field"]: f for f in value["fields"][1]["fields"]}  # "after"
    columns = {  # name -> (type OID, modifier)
        "id": (23, -1), "c_int2": (21, -1), "c_int4": (23, -1), "c_int8": (20, -1), "c_oid": (26, -1),
        "c_numeric": (1700, 1310730), "c_numeric_free": (1700, -1), "c_numeric_nan": (1700, -1), "c_float4": (700, -1),
        "c_float8": (701, -1), "c_float8_nan": (701, -1), "c_bool": (16, -1), "c_json": (114, -1),
        "c_jsonb": (3802, -1), "c_int_array": (1007, -1), "c_text_array": (1009, -1), "c_timestamptz": (1184, -1),
        "c_timestamp": (1114, -1), "c_timestamp3": (1114, 3), "c_timestamp_inf": (1114, -1), "c_date": (1082, -1),
        "c_time": (1083, -1), "c_time3": (1083, 3), "c_timetz": (1266, -1), "c_interval": (1186, -1),
        "c_interval_neg": (1186, -1), "c_bytea": (17, -1), "c_uuid": (2950, -1), "c_text": (25, -1),
        "c_varchar": (1043, 24), "c_char": (1042, 7), "c_enum": (MOOD, -1), "c_domain": (POSINT, -1),
        "c_inet": (869, -1), "c_cidr": (650, -1), "c_macaddr": (829, -1), "c_money": (790, -1),
        "c_int4range": (3904, -1), "c_point": (600, -1), "c_bit": (1560, 4), "c_varbit": (1562, 8), "c_xml": (142, -1),
    }
    assert set(columns) == set(fields)
    registry = _registry()
    for name, (oid, modifier) in columns.items():
        schema = formats.debezium_schema(registry, oid, modifier, name != "id", "sad,ok,happy" if oid == MOOD else None)
        assert {**schema, "field": name} == fields[name], name
        assert list({**schema, "field": name}) == list(fields[name]), name  # the JsonConverter's key order


@pytest.mark.parametrize(("oid", "modifier", "labels", "expected"), [
    # what Debezium 3.6.3 wrote for columns outside the committed workload (probed once with the recorder)
    (1562, -1, None, {"type": "bytes", "optional": True, "name": "io.debezium.data.Bits", "version": 1,
                      "parameters": {"length": "2147483647"}}),  # varbit without a length
    (1562, 1, None, {"type": "boolean", "optional": True}),  # varbit(1)
    (1560, 1, None, {"type": "boolean", "optional": True}),  # bit(1)
    (1185, -1, None, {"type": "array", "items": {"type": "string", "optional": True,
                                                 "name": "io.debezium.time.ZonedTimestamp", "version": 1},
                      "optional": True}),  # timestamptz[]
    (1182, -1, None, {"type": "array", "items": {"type": "int32", "optional": True, "name": "io.debezium.time.Date",
                                                 "version": 1}, "optional": True}),  # date[]
    (1231, -1, None, {"type": "array", "items": {"type": "string", "optional": True}, "optional": True}),  # numeric[]
    (1000, -1, None, {"type": "array", "items": {"type": "boolean", "optional": True}, "optional": True}),  # bool[]
    (90003, -1, "sad,ok,happy", {"type": "array", "items": {
        "type": "string", "optional": False, "name": "io.debezium.data.Enum", "version": 1,
        "parameters": {"allowed": "sad,ok,happy"}}, "optional": True}),  # mood[]: Debezium's enum item is required
    (3908, -1, None, {"type": "string", "optional": True}),  # tsrange
    (19, -1, None, {"type": "string", "optional": True}),  # name
    (18, -1, None, {"type": "string", "optional": True}),  # "char"
])
def test_debezium_schema_beyond_the_recording(oid: int, modifier: int, labels: str | None, expected: Any) -> None:
    registry = _registry()
    registry.add(PgType(90003, "b", 0, MOOD, "A", ","))  # mood[]
    schema = formats.debezium_schema(registry, oid, modifier, True, labels)
    assert (schema, list(schema)) == (expected, list(expected))


def test_varbit_1_is_a_boolean_value_too() -> None:
    convert = formats.debezium_converter(TypeRegistry(), 1562, 1)
    assert convert is not None and convert("1") is True


def test_unchanged_toast_placeholder_has_the_columns_type() -> None:
    """As Debezium 3.6.3 wrote them for an UPDATE that left TOASTed values unchanged (probed once)."""
    assert formats.unavailable(25) == formats.unavailable(3802) == "__debezium_unavailable_value"
    assert formats.unavailable(17) == "X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ=="  # bytea: the text's bytes
    assert formats.unavailable(1009) == ["__debezium_unavailable_value"]  # text[]
    assert formats.unavailable(1007)[:4] == [95, 95, 100, 101]  # int4[]: the text's bytes as numbers
    rel = Relation(1, "public", "docs", "d", (Column("id", 23, -1, True), Column("blob", 17, -1, False),
                                              Column("tags", 1009, -1, False)))
    builder = EventBuilder(make_config(publisher={"format": "debezium"}), TypeRegistry(), needs_key=True)
    info = builder.add_relation(rel)
    message = builder.update(info, builder.begin(1, 0), None, None, ["1", UNCHANGED, UNCHANGED])
    assert message is not None
    assert orjson.loads(message.body)["after"] == {"id": 1, "blob": formats.unavailable(17),
                                                    "tags": ["__debezium_unavailable_value"]}


def _debezium_builder(publisher: dict[str, Any]) -> tuple[EventBuilder, Any]:
    builder = EventBuilder(make_config(publisher={"format": "debezium", "debezium": {"schemas": True}, **publisher}),
                           TypeRegistry(), needs_key=True)
    rel = Relation(7, "public", "items", "d", (Column("id", 23, -1, True), Column("name", 25, -1, False),
                                               Column("qty", 23, -1, False)))
    facts = {"id": ColumnFacts(True), "name": ColumnFacts(True), "qty": ColumnFacts(False)}
    return builder, builder.add_relation(rel, (), facts)


def test_debezium_schemas_wrap_key_and_value_with_the_tables_schemas() -> None:
    builder, info = _debezium_builder({})
    message = builder.insert(info, builder.begin(1, 0), ["1", "a", None])
    assert message is not None
    value, key = orjson.loads(message.body), orjson.loads(message.key or b"")
    assert list(value) == list(key) == ["schema", "payload"]
    assert value["payload"]["after"] == {"id": 1, "name": "a", "qty": None}
    assert value["schema"]["name"] == "wal_listener.public.items.Envelope" and value["schema"]["version"] == 2
    after = value["schema"]["fields"][1]
    assert after["name"] == "wal_listener.public.items.Value" and after["field"] == "after"
    assert [(f["field"], f["type"], f["optional"]) for f in after["fields"]] == [
        ("id", "int32", False), ("name", "string", False), ("qty", "int32", True)]  # NOT NULL from the catalog
    assert key == {"schema": {"type": "struct", "fields": [{"type": "int32", "optional": False, "field": "id"}],
                              "optional": False, "name": "wal_listener.public.items.Key"}, "payload": {"id": 1}}
    # built once per Relation, spliced into every event
    assert info.debezium is not None and info.debezium.envelope_schema is builder.relations[7].debezium.envelope_schema
    body, message_key = builder._debezium.message("outbox", b"x", formats.Change(0, None, None))  # type: ignore[union-attr]
    assert orjson.loads(body)["schema"]["name"] == "io.debezium.connector.postgresql.MessageValue"
    assert orjson.loads(message_key)["payload"] == {"prefix": "outbox"}


def test_debezium_schemas_leave_a_pubsub_ordering_key_plain() -> None:
    """Off Kafka the key only orders messages: it stays Debezium's key without a schema."""
    builder, info = _debezium_builder({"type": "google_pubsub", "pubSubProjectID": "p", "address": ""})
    message = builder.insert(info, builder.begin(1, 0), ["1", "a", None])
    assert message is not None and message.key == b'{"id":1}'
    assert list(orjson.loads(message.body)) == ["schema", "payload"]
    _, message_key = builder._debezium.message("outbox", b"x", formats.Change(0, None, None))  # type: ignore[union-attr]
    assert message_key == b'{"prefix":"outbox"}'


# -- config ----------------------------------------------------------------------------------------

BASE = """\
listener:
  slotName: s1
{listener}
database:
  name: db
  user: postgres
publisher:
  type: nats
  address: nats://localhost:4222
  topic: t
{publisher}
"""


def load(tmp_path: Path, listener: str = "", publisher: str = "") -> Config:
    path = tmp_path / "config.yml"
    path.write_text(BASE.format(listener=listener, publisher=publisher))
    return load_config(path, {})


def test_format_settings_load_with_their_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    assert cfg.publisher.format == "wal-listener" and cfg.listener.messages.prefixes == []
    assert (cfg.publisher.cloud_events.mode, cfg.publisher.cloud_events.source) == ("binary", "")
    cfg = load(tmp_path, "  messages:\n    prefixes: [outbox]",
               "  format: cloudevents\n  cloudEvents:\n    mode: structured\n    source: //pg/shop")
    assert cfg.publisher.format == "cloudevents" and cfg.publisher.cloud_events.mode == "structured"
    assert cfg.listener.messages.prefixes == ["outbox"]


def test_tombstones_default_to_the_format_on_kafka(tmp_path: Path) -> None:
    def tombstones(publisher: str) -> bool:
        path = tmp_path / "config.yml"
        path.write_text(BASE.format(listener="", publisher=publisher).replace("type: nats", "type: kafka"))
        cfg = load_config(path, {})
        assert isinstance(cfg.publisher, KafkaPublisherConfig)
        return cfg.publisher.writes_tombstones

    assert tombstones("") is False  # the default event: unchanged
    assert tombstones("  format: debezium") is True  # as Debezium does
    assert tombstones("  format: debezium\n  tombstones: false") is False
    assert tombstones("  tombstones: true") is True


def test_tombstones_on_another_broker_are_dropped_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "config.yml"
    path.write_text(BASE.format(listener="", publisher="  tombstones: true"))
    warnings: list[str] = []
    load_config(path, {}, warnings)
    assert warnings == ["config: publisher.tombstones does nothing for publisher.type nats; ignored"]


@pytest.mark.parametrize(("listener", "publisher", "words"), [
    ("", "  format: avro", ["publisher.format", "'wal-listener', 'cloudevents' or 'debezium'"]),
    ("", "  debezium:\n    schemas: true", ["publisher.debezium.schemas", "publisher.format: debezium"]),
    ("", "  format: debezium\n  debezium:\n    schemas: 2", ["publisher.debezium.schemas", "boolean"]),
    ("", "  cloudEvents:\n    mode: batch", ["publisher.cloudEvents.mode", "'binary' or 'structured'"]),
    ("  messages:\n    prefixes: ['a b']", "", ["listener.messages.prefixes", "without spaces"]),
    ("  messages:\n    prefixes: ['wal_listener.watermark']", "", ["listener.messages.prefixes", "listener's own"]),
    ("  messages:\n    prefixes: [x, x]", "", ["listener.messages.prefixes", "twice"]),
])
def test_bad_format_settings_are_one_line_naming_the_key(
    tmp_path: Path, listener: str, publisher: str, words: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, listener, publisher)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_debezium_sequence_has_no_previous_commit_for_the_first_transaction_after_a_start() -> None:
    """As docs/formats.md says: the first part is the previous commit this process saw; null right after a
    (re)start, for READ events before any commit too."""
    debezium = formats.Debezium(make_config())
    first = debezium.source("public", "t", formats.Change(commit_micros=0, xid=7, lsn=200))
    read = debezium.source("public", "t", formats.Change(commit_micros=0, xid=None, lsn=None, snapshot="incremental"))
    assert json.loads(first["sequence"]) == [None, "200"] and json.loads(read["sequence"]) == [None, None]
    debezium.committed(150)
    later = debezium.source("public", "t", formats.Change(commit_micros=0, xid=8, lsn=300))
    assert json.loads(later["sequence"]) == ["150", "300"]
