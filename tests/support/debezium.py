"""The workload behind the Debezium compatibility test: one table per concern, rows present before the
connector starts (snapshot READ events), then one transaction per step while streaming.

Debezium's real output for exactly this workload is recorded in ``tests/data/debezium/recorded.json``
(see ``tests/support/debezium_record/``); the test runs the same steps through the listener with
``publisher.format: debezium`` and compares the two event for event.
"""

from __future__ import annotations

#: every type of the type table in docs/formats.md, plus the ones Debezium treats specially
SCHEMA = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE TABLE public.types (
    id integer PRIMARY KEY,
    c_int2 smallint, c_int4 integer, c_int8 bigint, c_oid oid,
    c_numeric numeric(20, 6), c_numeric_free numeric, c_numeric_nan numeric,
    c_float4 real, c_float8 double precision, c_float8_nan double precision,
    c_bool boolean, c_json json, c_jsonb jsonb,
    c_int_array integer[], c_text_array text[],
    c_timestamptz timestamptz, c_timestamp timestamp, c_timestamp3 timestamp(3), c_timestamp_inf timestamp,
    c_date date, c_time time, c_time3 time(3), c_timetz timetz,
    c_interval interval, c_interval_neg interval,
    c_bytea bytea, c_uuid uuid, c_text text, c_varchar varchar(20), c_char char(3),
    c_enum mood, c_domain posint, c_inet inet, c_cidr cidr, c_macaddr macaddr,
    c_money money, c_int4range int4range, c_point point, c_bit bit(4), c_varbit varbit(8),
    c_xml xml
);
CREATE TABLE public.orders (id bigint PRIMARY KEY, customer text NOT NULL, total numeric(10, 2), note text);
CREATE TABLE public.full_identity (id integer PRIMARY KEY, name text, qty integer);
ALTER TABLE public.full_identity REPLICA IDENTITY FULL;
CREATE TABLE public.docs (id integer PRIMARY KEY, title text, body text);
ALTER TABLE public.docs ALTER COLUMN body SET STORAGE EXTERNAL;
"""

#: a row with a value in every column (the same literal is used for the snapshot row and a streamed one)
_TYPES_VALUES = """
    {id}, -32768, 2147483647, 9223372036854775807, 4294967295,
    12345678901234.123456, 0.000000000000000000000001, 'NaN',
    1.5, 3.141592653589793, 'NaN',
    true, '{{"a": [1, 2, {{"b": null}}]}}', '{{"z": 1, "a": "x"}}',
    '{{1,2,3}}', '{{"a b","c"}}',
    '2026-01-02 03:04:05.123456+02', '2026-01-02 03:04:05.123456', '2026-01-02 03:04:05.123', 'infinity',
    '2026-01-02', '03:04:05.123456', '03:04:05.123', '03:04:05.123456+02',
    '1 year 2 mons 3 days 04:05:06.789', '-1 days -02:00:00',
    '\\x00ff10', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'text ✓', 'varchar', 'ab',
    'happy', 7, '192.168.1.1/24', '10.0.0.0/8', '08:00:2b:01:02:03',
    12.34, '[1,10)', '(1.5,2.5)', B'1010', B'101',
    '<a>1</a>'
"""

SNAPSHOT = f"""
INSERT INTO public.types VALUES ({_TYPES_VALUES.format(id=1)});
INSERT INTO public.types (id) VALUES (2);
INSERT INTO public.orders VALUES (1, 'ada', 10.50, 'first');
"""

#: (step name, SQL run as one transaction) in order, while the connector streams
STEPS: list[tuple[str, str]] = [
    ("insert_types", f"INSERT INTO public.types VALUES ({_TYPES_VALUES.format(id=3)})"),
    ("insert_types_nulls", "INSERT INTO public.types (id) VALUES (4)"),
    ("insert_order", "INSERT INTO public.orders VALUES (2, 'bob', 99.99, NULL)"),
    ("update_order", "UPDATE public.orders SET total = 100.00, note = 'paid' WHERE id = 2"),
    ("delete_order", "DELETE FROM public.orders WHERE id = 1"),
    ("insert_full", "INSERT INTO public.full_identity VALUES (1, 'x', 1)"),
    ("update_full", "UPDATE public.full_identity SET qty = 2 WHERE id = 1"),
    ("delete_full", "DELETE FROM public.full_identity WHERE id = 1"),
    # a value stored out of line (TOAST) that an update leaves unchanged: pgoutput does not send it
    ("insert_doc",
     "INSERT INTO public.docs SELECT 1, 't', string_agg(md5(i::text), '') FROM generate_series(1, 300) i"),
    ("update_doc_title", "UPDATE public.docs SET title = 't2' WHERE id = 1"),
    ("message_transactional", "SELECT pg_logical_emit_message(true, 'outbox', '{\"order\": 2, \"event\": \"paid\"}')"),
    ("message_plain", "SELECT pg_logical_emit_message(false, 'outbox', 'not json')"),
    ("truncate_orders", "TRUNCATE public.orders"),
]
