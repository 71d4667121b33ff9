"""The table filter and the event builder: what a consumer of the published events sees."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from listener import metrics, types
from listener.config import FilterConfig
from listener.event import EventBuilder, Transaction, commit_time_text
from listener.filter import ALL_ACTIONS, TableFilter
from listener.message import Message
from listener.pgoutput import UNCHANGED, Column, Relation
from tests.support.events import make_config

# -- TableFilter ---------------------------------------------------------------------------------------------


def table_filter(tables: dict[str, list[str]] | None) -> TableFilter:
    return TableFilter(FilterConfig.model_validate({"tables": tables}))


def test_no_tables_publishes_every_action_of_every_table() -> None:
    flt = table_filter(None)
    assert flt.actions("public", "users") == {"INSERT", "UPDATE", "DELETE", "TRUNCATE"}
    assert flt.actions("any", "thing") == ALL_ACTIONS


def test_empty_tables_mapping_publishes_nothing() -> None:
    assert table_filter({}).actions("public", "users") == frozenset()


def test_bare_table_name_matches_any_schema() -> None:
    flt = table_filter({"users": ["insert", "update"]})
    assert flt.actions("public", "users") == {"INSERT", "UPDATE"}
    assert flt.actions("shop", "users") == {"INSERT", "UPDATE"}
    assert flt.actions("public", "orders") == frozenset()


def test_qualified_name_matches_only_its_schema() -> None:
    flt = table_filter({"shop.orders": ["delete"]})
    assert flt.actions("shop", "orders") == {"DELETE"}
    assert flt.actions("public", "orders") == frozenset()


def test_bare_and_qualified_entries_combine() -> None:
    flt = table_filter({"users": ["insert"], "shop.users": ["truncate"]})
    assert flt.actions("shop", "users") == {"INSERT", "TRUNCATE"}
    assert flt.actions("public", "users") == {"INSERT"}


def test_names_are_case_sensitive_like_postgres_identifiers() -> None:
    flt = table_filter({"Users": ["insert"]})
    assert flt.actions("public", "Users") == {"INSERT"}
    assert flt.actions("public", "users") == frozenset()


# -- EventBuilder fixtures -------------------------------------------------------------------------------------

FINAL_LSN = 0x16B3748
COMMIT_MICROS = 820_638_245_123_456  # 2026-01-02T03:04:05.123456Z


def builder(needs_key: bool = False, **kwargs: Any) -> EventBuilder:
    return EventBuilder(make_config(**kwargs), types.TypeRegistry(), needs_key=needs_key)


def users(oid: int = 16384, identity: str = "d", schema: str = "public", name: str = "users") -> Relation:
    """id int4 (primary key), name text, doc jsonb (TOAST-able), score numeric."""
    full = identity == "f"  # pgoutput flags every column as part of the identity under FULL
    return Relation(
        oid,
        schema,
        name,
        identity,
        (
            Column("id", types.INT4, -1, True),
            Column("name", types.TEXT, -1, full),
            Column("doc", types.JSONB, -1, full),
            Column("score", types.NUMERIC, -1, full),
        ),
    )


def order_lines(oid: int = 16500) -> Relation:
    """(order_id int8, line int2) composite primary key, qty int4."""
    return Relation(
        oid,
        "shop",
        "order_lines",
        "d",
        (
            Column("order_id", types.INT8, -1, True),
            Column("line", types.INT2, -1, True),
            Column("qty", types.INT4, -1, False),
        ),
    )


def txn(final_lsn: int = FINAL_LSN) -> Transaction:
    return Transaction(final_lsn, commit_time_text(COMMIT_MICROS))


def body(message: Message | None) -> dict[str, Any]:
    assert message is not None
    parsed: dict[str, Any] = orjson.loads(message.body)
    return parsed


def skipped_count(table: str) -> float:
    return metrics.REGISTRY.get_sample_value("filter_skipped_events_total", {"table": table}) or 0.0


def conversion_errors(table: str, column: str) -> float:
    return metrics.REGISTRY.get_sample_value("conversion_errors_total", {"table": table, "column": column}) or 0.0


# -- the event body ------------------------------------------------------------------------------------------


def test_insert_event_body_and_subject() -> None:
    eb = builder()
    info = eb.add_relation(users())
    msg = eb.insert(info, txn(), ["1", "Ann", '{"a": [1, 2]}', "12.50"])
    assert msg is not None
    assert msg.subject == "wal_listener.public_users"
    event = body(msg)
    assert set(event) == {"id", "schema", "table", "action", "data", "dataOld", "commitTime"}
    assert event["schema"] == "public"
    assert event["table"] == "users"
    assert event["action"] == "INSERT"
    assert event["data"] == {"id": 1, "name": "Ann", "doc": {"a": [1, 2]}, "score": "12.50"}
    assert event["dataOld"] == {}
    assert event["commitTime"] == "2026-01-02T03:04:05.123456Z"
    assert event["id"] == msg.id
    assert (msg.schema, msg.table, msg.action) == ("public", "users", "INSERT")


def test_null_is_published_as_null() -> None:
    eb = builder()
    info = eb.add_relation(users())
    assert body(eb.insert(info, txn(), ["1", None, None, None]))["data"] == {
        "id": 1,
        "name": None,
        "doc": None,
        "score": None,
    }


def test_topic_prefix_and_topics_map() -> None:
    eb = builder(prefix="pre_", topics_map={"public_users": "notifier"})
    mapped = eb.add_relation(users())
    other = eb.add_relation(order_lines())
    assert eb.insert(mapped, txn(), ["1", "a", None, None]).subject == "wal_listener.pre_notifier"  # type: ignore[union-attr]
    assert eb.insert(other, txn(), ["1", "1", "3"]).subject == "wal_listener.pre_shop_order_lines"  # type: ignore[union-attr]


def test_topics_map_key_is_schema_underscore_table() -> None:
    eb = builder(topics_map={"users": "wrong", "shop_users": "shop_people"})
    assert eb.add_relation(users()).subject == "wal_listener.public_users"
    assert eb.add_relation(users(oid=2, schema="shop")).subject == "wal_listener.shop_people"


def test_update_with_default_identity_has_empty_data_old() -> None:
    eb = builder()
    info = eb.add_relation(users())
    event = body(eb.update(info, txn(), None, None, ["1", "Bob", "[]", "1"]))
    assert event["action"] == "UPDATE"
    assert event["data"] == {"id": 1, "name": "Bob", "doc": [], "score": "1"}
    assert event["dataOld"] == {}


def test_update_with_old_key_gives_only_key_columns() -> None:
    eb = builder()
    info = eb.add_relation(users())
    event = body(eb.update(info, txn(), ["1", None, None, None], "K", ["2", "Bob", "{}", "1"]))
    assert event["dataOld"] == {"id": 1}
    assert event["data"] == {"id": 2, "name": "Bob", "doc": {}, "score": "1"}


def test_update_with_full_identity_gives_the_whole_old_row() -> None:
    eb = builder()
    info = eb.add_relation(users(identity="f"))
    event = body(eb.update(info, txn(), ["1", "Ann", '{"v": 1}', "1.0"], "O", ["1", "Bob", '{"v": 2}', "2.0"]))
    assert event["dataOld"] == {"id": 1, "name": "Ann", "doc": {"v": 1}, "score": "1.0"}
    assert event["data"] == {"id": 1, "name": "Bob", "doc": {"v": 2}, "score": "2.0"}


def test_unchanged_toast_is_left_out_not_null() -> None:
    eb = builder()
    info = eb.add_relation(users())
    event = body(eb.update(info, txn(), None, None, ["1", "Bob", UNCHANGED, "3"]))
    assert event["data"] == {"id": 1, "name": "Bob", "score": "3"}
    assert "doc" not in event["data"]


def test_unchanged_toast_with_old_key_stays_left_out() -> None:
    eb = builder()
    info = eb.add_relation(users())
    event = body(eb.update(info, txn(), ["1", None, None, None], "K", ["2", "Bob", UNCHANGED, "3"]))
    assert "doc" not in event["data"]
    assert event["dataOld"] == {"id": 1}


def test_unchanged_toast_filled_from_old_row_under_replica_identity_full() -> None:
    eb = builder()
    info = eb.add_relation(users(identity="f"))
    old = ["1", "Ann", '{"big": "document"}', "1"]
    event = body(eb.update(info, txn(), old, "O", ["1", "Bob", UNCHANGED, "2"]))
    assert event["data"] == {"id": 1, "name": "Bob", "doc": {"big": "document"}, "score": "2"}
    assert event["dataOld"]["doc"] == {"big": "document"}


def test_unchanged_toast_with_null_in_old_row_is_filled_as_null() -> None:
    eb = builder()
    info = eb.add_relation(users(identity="f"))
    event = body(eb.update(info, txn(), ["1", "Ann", None, "1"], "O", ["1", "Bob", UNCHANGED, "2"]))
    assert event["data"]["doc"] is None


def test_insert_of_unchanged_marker_is_left_out() -> None:
    eb = builder()
    info = eb.add_relation(users())
    assert body(eb.insert(info, txn(), ["1", UNCHANGED, None, "0"]))["data"] == {"id": 1, "doc": None, "score": "0"}


@pytest.mark.parametrize(
    ("kind", "expected"), [("K", {"id": 7}), ("O", {"id": 7, "name": "x", "doc": 1, "score": "2"})]
)
def test_delete(kind: str, expected: dict[str, Any]) -> None:
    eb = builder()
    info = eb.add_relation(users(identity="f" if kind == "O" else "d"))
    old = ["7", "x", "1", "2"] if kind == "O" else ["7", None, None, None]
    event = body(eb.delete(info, txn(), old, kind))
    assert event["action"] == "DELETE"
    assert event["data"] == {}
    assert event["dataOld"] == expected


def test_truncate() -> None:
    eb = builder()
    info = eb.add_relation(users())
    msg = eb.truncate(info, txn())
    event = body(msg)
    assert event["action"] == "TRUNCATE"
    assert (event["data"], event["dataOld"]) == ({}, {})
    assert msg is not None and msg.key is None


def test_relation_message_replaces_the_previous_definition() -> None:
    eb = builder()
    eb.add_relation(users())
    renamed = Relation(
        16384, "public", "users", "d", (Column("id", types.INT4, -1, True), Column("email", 25, -1, False))
    )
    info = eb.add_relation(renamed)
    assert eb.relations[16384] is info
    assert body(eb.insert(info, txn(), ["1", "a@b"]))["data"] == {"id": 1, "email": "a@b"}


# -- filter in the builder ------------------------------------------------------------------------------------


def test_filtered_actions_return_none_and_are_counted() -> None:
    eb = builder(tables={"filtered_tbl": ["insert"]})
    info = eb.add_relation(users(name="filtered_tbl"))
    before = skipped_count("filtered_tbl")
    t = txn()
    assert eb.insert(info, t, ["1", "a", None, None]) is not None
    assert eb.update(info, t, None, None, ["1", "b", None, None]) is None
    assert eb.delete(info, t, ["1", None, None, None], "K") is None
    assert eb.truncate(info, t) is None
    assert skipped_count("filtered_tbl") == before + 3


def test_table_not_in_filter_is_skipped_entirely() -> None:
    eb = builder(tables={"users": ["insert"]})
    info = eb.add_relation(users(name="not_listed_tbl"))
    before = skipped_count("not_listed_tbl")
    assert eb.insert(info, txn(), ["1", "a", None, None]) is None
    assert skipped_count("not_listed_tbl") == before + 1


def test_filter_by_schema() -> None:
    eb = builder(tables={"shop.users": ["insert"]})
    public = eb.add_relation(users(oid=1, name="users"))
    shop = eb.add_relation(users(oid=2, schema="shop", name="users"))
    assert eb.insert(public, txn(), ["1", "a", None, None]) is None
    assert eb.insert(shop, txn(), ["1", "a", None, None]) is not None


# -- ids ------------------------------------------------------------------------------------------------------------


def test_id_is_a_uuid_version_8() -> None:
    eb = builder()
    info = eb.add_relation(users())
    msg = eb.insert(info, txn(), ["1", "a", None, None])
    assert msg is not None
    parsed = uuid.UUID(msg.id)
    assert parsed.version == 8
    assert parsed.variant == uuid.RFC_4122
    assert str(parsed) == msg.id


def test_same_change_replayed_gets_the_same_id() -> None:
    first, replay = builder(), builder()
    a = first.insert(first.add_relation(users()), txn(), ["1", "a", None, None])
    b = replay.insert(replay.add_relation(users()), txn(), ["1", "different payload", None, None])
    assert a is not None and b is not None
    assert a.id == b.id


def test_ids_differ_by_slot_lsn_and_ordinal() -> None:
    def first_id(slot: str, lsn: int) -> str:
        eb = builder(slot=slot)
        msg = eb.insert(eb.add_relation(users()), txn(lsn), ["1", "a", None, None])
        assert msg is not None
        return msg.id

    base = first_id("slot_a", FINAL_LSN)
    assert first_id("slot_b", FINAL_LSN) != base
    assert first_id("slot_a", FINAL_LSN + 1) != base
    assert first_id("slot_a", FINAL_LSN + (1 << 32)) != base  # same low word, other WAL segment
    eb = builder()
    info = eb.add_relation(users())
    t = txn()
    ids = [eb.insert(info, t, [str(i), "a", None, None]).id for i in range(1000)]  # type: ignore[union-attr]
    assert len(set(ids)) == 1000
    assert ids[0] == base


def test_ids_are_distinct_across_many_lsns() -> None:
    eb = builder()
    info = eb.add_relation(users())
    lsns = [0, 1, 0xFFFFFFFF, 1 << 32, (1 << 48) + 5, 2**64 - 1, 0x12345678_9ABCDEF0]
    ids = {eb.insert(info, txn(lsn), ["1", "a", None, None]).id for lsn in lsns}  # type: ignore[union-attr]
    assert len(ids) == len(lsns)
    assert all(uuid.UUID(i).version == 8 for i in ids)


def test_ordinal_counts_filtered_changes_too() -> None:
    everything = builder()
    all_info = everything.add_relation(users())
    t_all = txn()
    everything.update(all_info, t_all, None, None, ["1", "a", None, None])
    expected = everything.insert(all_info, t_all, ["2", "b", None, None])

    only_inserts = builder(tables={"users": ["insert"]})
    ins_info = only_inserts.add_relation(users())
    t_ins = txn()
    assert only_inserts.update(ins_info, t_ins, None, None, ["1", "a", None, None]) is None
    got = only_inserts.insert(ins_info, t_ins, ["2", "b", None, None])
    assert got is not None and expected is not None
    assert got.id == expected.id


# -- message keys --------------------------------------------------------------------------------------------------


def test_no_key_when_the_publisher_does_not_need_one() -> None:
    eb = builder(needs_key=False)
    msg = eb.insert(eb.add_relation(users()), txn(), ["1", "a", None, None])
    assert msg is not None and msg.key is None


def test_single_primary_key() -> None:
    eb = builder(needs_key=True)
    info = eb.add_relation(users())
    assert eb.insert(info, txn(), ["42", "a", None, None]).key == b"42"  # type: ignore[union-attr]
    assert eb.update(info, txn(), None, None, ["42", "b", None, None]).key == b"42"  # type: ignore[union-attr]


def test_composite_primary_key_is_a_json_array() -> None:
    eb = builder(needs_key=True)
    info = eb.add_relation(order_lines())
    msg = eb.insert(info, txn(), ["1001", "3", "5"])
    assert msg is not None and msg.key is not None
    assert orjson.loads(msg.key) == ["1001", "3"]


def test_delete_takes_the_old_key() -> None:
    eb = builder(needs_key=True)
    info = eb.add_relation(order_lines())
    msg = eb.delete(info, txn(), ["1001", "3", None], "K")
    assert msg is not None and msg.key is not None
    assert orjson.loads(msg.key) == ["1001", "3"]


def test_update_with_unchanged_key_column_falls_back_to_old_key() -> None:
    eb = builder(needs_key=True)
    info = eb.add_relation(users())
    msg = eb.update(info, txn(), ["9", None, None, None], "K", [UNCHANGED, "x", None, None])
    assert msg is not None and msg.key == b"9"


def test_message_key_from_overrides_the_identity() -> None:
    eb = builder(needs_key=True, key_from="name")
    info = eb.add_relation(users())
    assert eb.insert(info, txn(), ["1", "tenant-7", None, None]).key == b"tenant-7"  # type: ignore[union-attr]


def test_message_key_from_an_absent_column_falls_back_to_identity() -> None:
    eb = builder(needs_key=True, key_from="no_such_column")
    info = eb.add_relation(users())
    assert eb.insert(info, txn(), ["5", "x", None, None]).key == b"5"  # type: ignore[union-attr]


def test_table_without_identity_has_no_key() -> None:
    eb = builder(needs_key=True)
    rel = Relation(77, "public", "log", "n", (Column("line", types.TEXT, -1, False),))
    msg = eb.insert(eb.add_relation(rel), txn(), ["hello"])
    assert msg is not None and msg.key is None


def test_null_single_key_gives_no_key() -> None:
    eb = builder(needs_key=True, key_from="name")
    msg = eb.insert(eb.add_relation(users()), txn(), ["1", None, None, None])
    assert msg is not None and msg.key is None


# -- commit time -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("micros", "expected"),
    [
        (0, "2000-01-01T00:00:00.000000Z"),
        (COMMIT_MICROS, "2026-01-02T03:04:05.123456Z"),
        (820_638_245_000_000, "2026-01-02T03:04:05.000000Z"),
        (-1, "1999-12-31T23:59:59.999999Z"),
    ],
)
def test_commit_time_text(micros: int, expected: str) -> None:
    text = commit_time_text(micros)
    assert text == expected
    assert datetime.fromisoformat(text).tzinfo == UTC


# -- values that fail conversion -----------------------------------------------------------------------------------


def test_unconvertible_value_is_published_as_text_and_counted() -> None:
    eb = builder()
    rel = Relation(
        901,
        "public",
        "conv_err_tbl",
        "d",
        (
            Column("id", types.INT4, -1, True),
            Column("n", types.INT4, -1, False),
            Column("b", types.BYTEA, -1, False),
        ),
    )
    info = eb.add_relation(rel)
    before_n, before_b = conversion_errors("conv_err_tbl", "n"), conversion_errors("conv_err_tbl", "b")
    event = body(eb.insert(info, txn(), ["1", "not-a-number", "\\x0102"]))
    assert event["data"] == {"id": 1, "n": "not-a-number", "b": "AQI="}
    assert conversion_errors("conv_err_tbl", "n") == before_n + 1
    assert conversion_errors("conv_err_tbl", "b") == before_b
    body(eb.insert(info, txn(), ["2", "also bad", "zz"]))
    assert conversion_errors("conv_err_tbl", "n") == before_n + 2
    assert conversion_errors("conv_err_tbl", "b") == before_b + 1


def test_unknown_type_is_published_as_its_text() -> None:
    eb = builder()
    rel = Relation(902, "public", "geo", "d", (Column("id", types.INT4, -1, True), Column("p", 600, -1, False)))
    assert body(eb.insert(eb.add_relation(rel), txn(), ["1", "(1.5,2)"]))["data"] == {"id": 1, "p": "(1.5,2)"}


def test_array_and_timestamptz_columns() -> None:
    eb = builder()
    rel = Relation(
        903,
        "public",
        "mixed",
        "d",
        (Column("tags", 1009, -1, False), Column("at", types.TIMESTAMPTZ, -1, False), Column("f", 701, -1, False)),
    )
    event = body(eb.insert(eb.add_relation(rel), txn(), ['{a,"b c",NULL}', "2026-01-02 03:04:05.5+00", "NaN"]))
    assert event["data"] == {"tags": ["a", "b c", None], "at": "2026-01-02T03:04:05.5Z", "f": "NaN"}


def test_full_identity_key_is_stable_across_updates_of_one_row() -> None:
    eb = builder(needs_key=True)
    info = eb.add_relation(users(identity="f"), primary_key=("id",))  # the app looks it up in pg_index
    first = eb.update(info, txn(), ["1", "Ann", "{}", "1"], "O", ["1", "Bob", "{}", "1"])
    second = eb.update(info, txn(), ["1", "Bob", "{}", "1"], "O", ["1", "Cid", "{}", "2"])
    assert first is not None and second is not None
    assert first.key == second.key
