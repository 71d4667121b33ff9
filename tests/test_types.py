"""Value conversion: PostgreSQL text form -> the value that ends up in the event's JSON."""

from __future__ import annotations

import base64
import math
from typing import Any

import orjson
import pytest

from listener import types
from listener.types import (
    ConversionError,
    PgType,
    TypeRegistry,
    parse_array,
    to_bool,
    to_bytea,
    to_float,
    to_int,
    to_json,
    to_timestamp,
    to_timestamptz,
)


def as_json(value: Any) -> Any:
    """What a consumer of the event sees: the value serialized with orjson and read back."""
    return orjson.loads(orjson.dumps({"v": value}))["v"]


def convert(oid: int, text: str, registry: TypeRegistry | None = None) -> Any:
    conv = (registry or TypeRegistry()).converter(oid)
    return as_json(text if conv is None else conv(text))


# -- scalars -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("oid", "text", "expected"),
    [
        (types.INT2, "-32768", -32768),
        (types.INT4, "2147483647", 2147483647),
        (types.INT8, "-9223372036854775808", -9223372036854775808),
        (types.OID, "4294967295", 4294967295),
        (28, "12345", 12345),  # xid
    ],
)
def test_integers_are_numbers(oid: int, text: str, expected: int) -> None:
    assert convert(oid, text) == expected
    assert isinstance(convert(oid, text), int)


def test_to_int_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        to_int("12a")


@pytest.mark.parametrize(("text", "expected"), [("t", True), ("f", False)])
def test_bool(text: str, expected: bool) -> None:
    assert convert(types.BOOL, text) is expected
    assert to_bool(text) is expected


@pytest.mark.parametrize("special", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("oid", [types.FLOAT4, types.FLOAT8])
def test_float_specials_are_strings(oid: int, special: str) -> None:
    assert convert(oid, special) == special


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0.1", 0.1), ("1e+308", 1e308), ("-0", -0.0), ("3.14159265358979", 3.14159265358979), ("5e-324", 5e-324)],
)
def test_floats_keep_their_exact_value(text: str, expected: float) -> None:
    value = to_float(text)
    assert isinstance(value, float)
    assert value == expected
    assert math.copysign(1.0, value) == math.copysign(1.0, expected)
    assert repr(as_json(value)) == repr(expected)


def test_float_json_text() -> None:
    assert orjson.dumps(to_float("0.1")) == b"0.1"
    assert orjson.loads(orjson.dumps(to_float("1e308"))) == 1e308


@pytest.mark.parametrize(
    "text",
    ["12345678901234567890.000001", "0.1", "-1.50", "NaN", "1" * 120 + "." + "9" * 60, "Infinity"],
)
def test_numeric_stays_an_exact_string(text: str) -> None:
    assert convert(types.NUMERIC, text) == text


@pytest.mark.parametrize(
    "document",
    ['{"a": [1, 2.5, null, true], "b": {"c": "d"}}', "[]", '"text"', "42", "null", '{"big": 123456789012345678901234}'],
)
@pytest.mark.parametrize("oid", [types.JSON, types.JSONB])
def test_json_is_embedded_as_json(oid: int, document: str) -> None:
    conv = TypeRegistry().converter(oid)
    assert conv is not None
    body = orjson.dumps({"data": {"doc": conv(document)}})
    assert body == b'{"data":{"doc":' + document.encode() + b"}}"


def test_json_embedded_document_round_trips() -> None:
    body = orjson.dumps({"doc": to_json('{"k": [1, "x"]}')})
    assert orjson.loads(body) == {"doc": {"k": [1, "x"]}}


@pytest.mark.parametrize(
    ("text", "raw"),
    [("\\x", b""), ("\\x00ff10", b"\x00\xff\x10"), ("\\xDEADBEEF", b"\xde\xad\xbe\xef")],
)
def test_bytea_hex_becomes_base64(text: str, raw: bytes) -> None:
    value = convert(types.BYTEA, text)
    assert value == base64.b64encode(raw).decode()
    assert base64.b64decode(value) == raw


def test_bytea_escape_format_is_refused() -> None:
    with pytest.raises(ConversionError):
        to_bytea("abc\\000")


@pytest.mark.parametrize("oid", [types.TEXT, types.UUID, 1043, 1042, 1082, 1083, 1266, 1186])
def test_text_like_types_are_their_text(oid: int) -> None:
    assert TypeRegistry().converter(oid) is None


# -- timestamps ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-01-02 03:04:05", "2026-01-02T03:04:05"),
        ("2026-01-02 03:04:05.1", "2026-01-02T03:04:05.1"),
        ("2026-01-02 03:04:05.123456", "2026-01-02T03:04:05.123456"),
        ("infinity", "infinity"),
        ("-infinity", "-infinity"),
        ("0044-03-15 12:00:00 BC", "0044-03-15 12:00:00 BC"),
    ],
)
def test_timestamp_without_zone(text: str, expected: str) -> None:
    assert to_timestamp(text) == expected
    assert convert(types.TIMESTAMP, text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # the connection's TimeZone=UTC fast path
        ("2026-01-02 03:04:05+00", "2026-01-02T03:04:05Z"),
        ("2026-01-02 03:04:05.1+00", "2026-01-02T03:04:05.1Z"),
        ("2026-01-02 03:04:05.12+00", "2026-01-02T03:04:05.12Z"),
        ("2026-01-02 03:04:05.123456+00", "2026-01-02T03:04:05.123456Z"),
        ("0500-01-01 00:00:00+00", "0500-01-01T00:00:00Z"),
        # real offsets converted to UTC
        ("2026-01-02 03:04:05+05:30", "2026-01-01T21:34:05Z"),
        ("2026-01-02 03:04:05.1+05:30", "2026-01-01T21:34:05.1Z"),
        ("2026-01-02 03:04:05.123-03:30", "2026-01-02T06:34:05.123Z"),
        ("2026-01-02 03:04:05.123456-03:30", "2026-01-02T06:34:05.123456Z"),
        ("2026-01-02 03:04:05.000100+05", "2026-01-01T22:04:05.0001Z"),
        ("2026-01-02 03:04:05+05:30:15", "2026-01-01T21:33:50Z"),
        ("1900-01-01 00:00:00+05:53:28", "1899-12-31T18:06:32Z"),
        ("2025-12-31 23:30:00-01", "2026-01-01T00:30:00Z"),
        # not expressible in RFC 3339: as sent
        ("infinity", "infinity"),
        ("-infinity", "-infinity"),
        ("0044-03-15 12:00:00+00 BC", "0044-03-15 12:00:00+00 BC"),
    ],
)
def test_timestamptz_is_rfc3339_utc(text: str, expected: str) -> None:
    assert to_timestamptz(text) == expected
    assert convert(types.TIMESTAMPTZ, text) == expected


def test_timestamptz_offset_path_keeps_four_digit_year() -> None:
    assert to_timestamptz("0500-01-01 00:00:00+05:30") == "0499-12-31T18:30:00Z"


def test_timestamptz_fast_and_offset_paths_agree() -> None:
    assert to_timestamptz("2026-06-30 12:00:00.25+00") == to_timestamptz("2026-06-30 14:00:00.25+02")


def test_timestamptz_garbage_is_a_conversion_error() -> None:
    with pytest.raises(ConversionError):
        to_timestamptz("2026-13-45 99:00:00+05")


# -- arrays --------------------------------------------------------------------------------------------------


def test_int_array_one_dimension() -> None:
    assert convert(1007, "{1,2,3}") == [1, 2, 3]


def test_int_array_two_dimensions_with_null() -> None:
    assert convert(1007, "{{1,2},{3,NULL}}") == [[1, 2], [3, None]]


def test_empty_array() -> None:
    assert convert(1007, "{}") == []
    assert convert(1009, "{}") == []


def test_array_with_explicit_bounds() -> None:
    assert convert(1007, "[0:1]={1,2}") == [1, 2]
    assert convert(1007, "[0:1][1:2]={{1,2},{3,4}}") == [[1, 2], [3, 4]]


def test_text_array_quoting() -> None:
    text = r'{"a,b","c}d","{x}","e\"f","g\\h"," sp ","NULL",NULL,"",plain}'
    assert convert(1009, text) == ["a,b", "c}d", "{x}", 'e"f', "g\\h", " sp ", "NULL", None, "", "plain"]


def test_text_array_multibyte() -> None:
    assert convert(1009, '{日本,"é ü",🐘}') == ["日本", "é ü", "🐘"]


def test_text_array_two_dimensions_quoted() -> None:
    assert convert(1009, '{{"a b",c},{d,"e,f"}}') == [["a b", "c"], ["d", "e,f"]]


def test_numeric_array_elements_stay_exact_strings() -> None:
    assert convert(1231, "{1.50,NaN,12345678901234567890.000001,NULL}") == [
        "1.50",
        "NaN",
        "12345678901234567890.000001",
        None,
    ]


def test_bool_array() -> None:
    assert convert(1000, "{t,f,NULL}") == [True, False, None]


def test_float_array_specials() -> None:
    assert convert(1022, "{0.1,NaN,-Infinity}") == [0.1, "NaN", "-Infinity"]


def test_timestamptz_array() -> None:
    text = '{"2026-01-02 03:04:05+00","2026-01-02 03:04:05.5+05:30",infinity,NULL}'
    assert convert(1185, text) == ["2026-01-02T03:04:05Z", "2026-01-01T21:34:05.5Z", "infinity", None]


def test_jsonb_array() -> None:
    text = r'{"{\"a\": 1}","[1, 2]","\"s\"",NULL}'
    assert convert(3807, text) == [{"a": 1}, [1, 2], "s", None]


def test_bytea_array() -> None:
    assert convert(1001, r'{"\\x0102",NULL}') == [base64.b64encode(b"\x01\x02").decode(), None]


def test_uuid_array_is_strings() -> None:
    text = "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11,NULL}"
    assert convert(2951, text) == ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", None]


def test_array_with_custom_delimiter() -> None:
    assert parse_array("{(1,1),(0,0);(2,2),(1,1)}", None, ";") == ["(1,1),(0,0)", "(2,2),(1,1)"]


@pytest.mark.parametrize("text", ["1,2}", "{1,2}x", "{1,2}}"])
def test_malformed_array_is_a_conversion_error(text: str) -> None:
    with pytest.raises(ConversionError):
        parse_array(text, to_int)


@pytest.mark.parametrize("text", ["{1,2", '{"a', ""])
def test_truncated_array_is_refused(text: str) -> None:
    # the event stage publishes any value whose conversion raises as its text form
    with pytest.raises((ConversionError, IndexError)):
        parse_array(text, to_int)


# -- the registry ------------------------------------------------------------------------------------------------


def test_unknown_oid_has_no_converter_and_is_reported_missing() -> None:
    registry = TypeRegistry()
    assert registry.converter(987654) is None
    assert registry.missing([23, 987654, 1007]) == [987654]
    assert not registry.known(987654)


def test_domain_over_int4_converts_as_int() -> None:
    registry = TypeRegistry()
    registry.add(PgType(oid=90000, kind="d", base_oid=types.INT4, element_oid=0, category="N", delimiter=","))
    assert registry.known(90000)
    assert registry.missing([90000]) == []
    assert convert(90000, "42", registry) == 42


def test_domain_over_numeric_stays_exact() -> None:
    registry = TypeRegistry()
    registry.add(PgType(oid=90010, kind="d", base_oid=types.NUMERIC, element_oid=0, category="N", delimiter=","))
    assert convert(90010, "0.10", registry) == "0.10"


def test_array_of_enum_is_list_of_strings() -> None:
    registry = TypeRegistry()
    registry.add(PgType(oid=90001, kind="e", base_oid=0, element_oid=0, category="E", delimiter=","))
    registry.add(PgType(oid=90002, kind="b", base_oid=0, element_oid=90001, category="A", delimiter=","))
    assert convert(90001, "happy", registry) == "happy"
    assert convert(90002, '{happy,"so so",NULL}', registry) == ["happy", "so so", None]


def test_array_of_domain_over_int() -> None:
    registry = TypeRegistry()
    registry.add(PgType(oid=90003, kind="d", base_oid=types.INT8, element_oid=0, category="N", delimiter=","))
    registry.add(PgType(oid=90004, kind="b", base_oid=0, element_oid=90003, category="A", delimiter=","))
    assert convert(90004, "{1,NULL,3}", registry) == [1, None, 3]


def test_domain_over_int_array() -> None:
    registry = TypeRegistry()
    registry.add(PgType(oid=90005, kind="d", base_oid=1007, element_oid=0, category="A", delimiter=","))
    assert convert(90005, "{4,5}", registry) == [4, 5]


@pytest.mark.parametrize(
    ("kind", "category", "text"),
    [("c", "C", '(1,"a b")'), ("r", "R", "[1,10)"), ("m", "R", "{[1,3),[5,7)}"), ("b", "U", "a=>1")],
)
def test_composites_ranges_and_extension_types_stay_text(kind: str, category: str, text: str) -> None:
    registry = TypeRegistry()
    registry.add(PgType(oid=90006, kind=kind, base_oid=0, element_oid=0, category=category, delimiter=","))
    assert registry.converter(90006) is None
    assert convert(90006, text, registry) == text


def test_array_of_user_type_with_semicolon_delimiter() -> None:
    registry = TypeRegistry()
    registry.add(PgType(oid=90007, kind="b", base_oid=0, element_oid=603, category="A", delimiter=";"))
    assert convert(90007, "{(1,1),(0,0);(3,3),(2,2)}", registry) == ["(1,1),(0,0)", "(3,3),(2,2)"]
