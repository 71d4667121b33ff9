"""Event formats on every broker: the default event, CloudEvents (binary and structured, read back with the
``cloudevents`` SDK's own parsers) and Debezium's envelope (compared with Debezium's recorded output).

One workload per run: a row present before the listener starts (a READ event of the initial snapshot),
then INSERT with a transactional logical message, UPDATE, DELETE and TRUNCATE.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings import amqp, http, kafka
from cloudevents.core.formats.json import JSONFormat

from tests.support import debezium
from tests.support.brokers import BROKERS, Broker, Got, Kafka, PubSub, on_shared_service
from tests.support.harness import config_dict, running, sql, unique
from tests.support.services import TansuServer

pytestmark = pytest.mark.service

FORMATS = ["wal-listener", "cloudevents-binary", "cloudevents-structured", "debezium"]
PREFIX = "orders.outbox"  # a logical message prefix (its topic: <topic>.orders.outbox)
ACTIONS = {"READ", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "MESSAGE"}
RECORDED = Path(__file__).parent / "data" / "debezium" / "recorded.json"


@pytest.fixture(params=BROKERS)
async def any_broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    """Each broker on the shared session services."""
    made = on_shared_service(request, request.param, unique("fmt"))
    if isinstance(made, PubSub):
        monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
        monkeypatch.setenv("PUBSUB_EMULATOR_HOST", made.emulator_host)  # the in-process listener
    yield made
    await made.close()


def format_settings(fmt: str) -> dict[str, Any]:
    if fmt.startswith("cloudevents"):
        return {"format": "cloudevents", "cloudEvents": {"mode": fmt.split("-")[1]}}
    return {"format": fmt}


async def run_workload(broker: Broker, dsn: str, cfg: dict[str, Any], count: int = 6) -> list[Got]:
    """The workload of this module through the listener; every event it published (``count`` at least)."""
    topics = ["items", PREFIX]
    await broker.prepare(topics)
    async with running(cfg):
        await broker.read(["items"], 1, settle=False)  # the snapshot's READ is out before the changes
        await sql(
            dsn,
            "BEGIN; INSERT INTO items VALUES (2, 'b', 2.50, '2026-01-02 03:04:05.5');"
            f"SELECT pg_logical_emit_message(true, '{PREFIX}', '{{\"orderId\": 2}}'); COMMIT",
            "UPDATE items SET name = 'b2' WHERE id = 2",
            "DELETE FROM items WHERE id = 1",
            "TRUNCATE items",
        )
        return await broker.read(topics, count)


def action_of(fmt: str, broker: Broker, got: Got) -> str:
    if fmt == "debezium":
        return {"r": "READ", "c": "INSERT", "u": "UPDATE", "d": "DELETE", "t": "TRUNCATE", "m": "MESSAGE"}[
            got.event["op"]
        ]
    event = got.event.get("data", got.event) if fmt == "cloudevents-structured" else got.event
    return str(event["action"])


def parse_cloudevent(broker: Broker, got: Got) -> BaseCloudEvent:
    """The CloudEvent in a broker's message, as the SDK's binding for that protocol reads it."""
    if broker.name == "kafka":
        headers = {k: v.encode() for k, v in got.headers.items()}
        key = got.key if isinstance(got.key, bytes | str) else None
        return kafka.from_kafka(kafka.KafkaMessage(headers=headers, key=key, value=got.raw), JSONFormat())
    if broker.name == "rabbitmq":  # AMQP: the content-type property, headers as application properties
        properties = {"content-type": got.headers["content_type"]}
        application = {k: v for k, v in got.headers.items() if k not in ("content_type", "message_id", "delivery_mode")}
        return amqp.from_amqp(amqp.AMQPMessage(properties, application, got.raw), JSONFormat())
    # NATS headers and Pub/Sub attributes follow the HTTP binding's ce- names
    return http.from_http(http.HTTPMessage(headers=dict(got.headers), body=got.raw), JSONFormat())


@pytest.mark.parametrize("fmt", FORMATS)
async def test_every_action_in_every_format(any_broker: Broker, fmt: str, fresh_db: str, pg: Any) -> None:
    dsn = pg.dsn(fresh_db)
    await sql(
        dsn,
        "CREATE TABLE items (id int PRIMARY KEY, name text, price numeric(8, 2), at timestamp)",
        "INSERT INTO items VALUES (1, 'seed', 1.00, '2026-01-02 03:04:05')",
    )
    publisher = any_broker.publisher(messageKeyFrom="orderId", **format_settings(fmt))
    cfg = config_dict(pg.port, fresh_db, publisher, snapshot={"mode": "initial"}, messages={"prefixes": [PREFIX]})
    # Kafka with the Debezium format: the DELETE is followed by a tombstone (publisher.tombstones' default)
    tombstones = 1 if any_broker.name == "kafka" and fmt == "debezium" else 0
    got = await run_workload(any_broker, dsn, cfg, 6 + tombstones)
    events = [g for g in got if not g.tombstone]
    by_action = {action_of(fmt, any_broker, g): g for g in events}
    assert len(events) == 6 and set(by_action) == ACTIONS, [g.event for g in got]
    assert len(got) == 6 + tombstones
    if tombstones:  # the row's next record (one partition: in order) is the tombstone
        delete = by_action["DELETE"]
        after = [g for g in got[got.index(delete) + 1 :] if g.key == delete.key and g.subject == delete.subject]
        assert [(g.tombstone, g.headers) for g in after] == [(True, {})]
    message = by_action["MESSAGE"]
    assert message.subject == f"{any_broker.topic}.{PREFIX}"
    assert {g.subject for g in got if g is not message} == {f"{any_broker.topic}.public_items"}
    if fmt == "debezium":
        check_debezium(any_broker, by_action, fresh_db)
        return
    events = {a: g.event for a, g in by_action.items()}
    if fmt.startswith("cloudevents"):
        events = {a: check_cloudevent(any_broker, fmt, g, fresh_db) for a, g in by_action.items()}
    check_default(events)
    if any_broker.name == "kafka":  # messageKeyFrom: a field of the message's JSON content
        assert by_action["MESSAGE"].key == b"2"
        assert by_action["INSERT"].key == b"2"  # rows: no such column, the row key


def check_default(events: dict[str, dict[str, Any]]) -> None:
    """The Go original's event, unchanged (also as the data of a CloudEvent)."""
    assert events["READ"]["data"] == {"id": 1, "name": "seed", "price": "1.00", "at": "2026-01-02T03:04:05"}
    assert events["INSERT"]["data"] == {"id": 2, "name": "b", "price": "2.50", "at": "2026-01-02T03:04:05.5"}
    assert events["UPDATE"]["data"]["name"] == "b2"
    assert events["DELETE"]["dataOld"] == {"id": 1}
    assert events["TRUNCATE"]["data"] == {} and events["TRUNCATE"]["dataOld"] == {}
    for action, event in events.items():
        if action != "MESSAGE":
            assert set(event) == {"id", "schema", "table", "action", "data", "dataOld", "commitTime"}
            assert (event["schema"], event["table"], event["action"]) == ("public", "items", action)
    message = events["MESSAGE"]
    assert message == {"id": message["id"], "action": "MESSAGE", "prefix": PREFIX, "content": {"orderId": 2},
                       "commitTime": events["INSERT"]["commitTime"]}
    # a transactional message is a change of its transaction: the next id after the INSERT's
    assert message["id"][:-12] == events["INSERT"]["id"][:-12]
    assert int(message["id"][-12:], 16) == int(events["INSERT"]["id"][-12:], 16) + 1


def check_cloudevent(broker: Broker, fmt: str, got: Got, db: str) -> dict[str, Any]:
    """The SDK reads a CloudEvents 1.0 event whose data is the default event; returns that data."""
    structured = fmt.endswith("structured")
    ce = parse_cloudevent(broker, got)
    data = ce.get_data()
    assert isinstance(data, dict)
    action = str(data["action"])
    assert ce.get_specversion() == "1.0"
    assert ce.get_id() == data["id"]
    assert ce.get_source() == f"//127.0.0.1/{db}"
    assert ce.get_type() == f"io.wal-listener.{action.lower()}"
    assert ce.get_subject() == (PREFIX if action == "MESSAGE" else "public.items")
    assert ce.get_time() == datetime.fromisoformat(data["commitTime"].replace("Z", "+00:00"))
    assert ce.get_datacontenttype() == "application/json"
    content_type = got.headers.get("content_type" if broker.name == "rabbitmq" else "content-type")
    if broker.name == "nats" and not structured:  # the NATS binding: ce-datacontenttype, no content-type
        assert content_type is None and got.headers["ce-datacontenttype"] == "application/json", got.headers
    else:
        assert content_type == ("application/cloudevents+json" if structured else "application/json")
    if not structured:
        assert got.event == data  # binary: the body is the event itself
    return data


def check_debezium(broker: Broker, by_action: dict[str, Got], db: str) -> None:
    events = {a: g.event for a, g in by_action.items()}
    read, insert, update, delete, truncate = (events[a] for a in ("READ", "INSERT", "UPDATE", "DELETE", "TRUNCATE"))
    # timestamp(6): microseconds since the epoch; numeric: exact strings
    assert read["after"] == {"id": 1, "name": "seed", "price": "1.00", "at": 1767323045000000}
    assert read["source"]["snapshot"] == "incremental" and read["before"] is None
    assert insert["after"] == {"id": 2, "name": "b", "price": "2.50", "at": 1767323045500000}
    assert insert["before"] is None and insert["source"]["snapshot"] == "false"
    assert update["after"]["name"] == "b2" and update["before"] is None  # REPLICA IDENTITY DEFAULT
    assert delete["before"] == {"id": 1, "name": None, "price": None, "at": None} and delete["after"] is None
    assert truncate["before"] is None and truncate["after"] is None
    for event in (read, insert, update, delete, truncate):
        assert list(event) == ["before", "after", "source", "transaction", "op", "ts_ms", "ts_us", "ts_ns"]
        source = event["source"]
        assert (source["connector"], source["name"], source["db"]) == ("postgresql", broker.topic, db)
        assert (source["schema"], source["table"]) == ("public", "items")
    assert insert["source"]["txId"] > 0 and insert["source"]["lsn"] > 0
    message = events["MESSAGE"]
    assert list(message) == ["op", "ts_ms", "source", "transaction", "message"]
    assert message["message"] == {"prefix": PREFIX, "content": base64.b64encode(b'{"orderId": 2}').decode()}
    assert message["source"]["txId"] == insert["source"]["txId"]  # transactional: its transaction's
    if broker.name == "kafka":  # Debezium's keys
        assert json.loads(by_action["INSERT"].key or b"") == {"id": 2}
        assert json.loads(by_action["DELETE"].key or b"") == {"id": 1}
        assert by_action["TRUNCATE"].key is None
        assert json.loads(by_action["MESSAGE"].key or b"") == {"prefix": PREFIX}


# -- Debezium's recorded output ---------------------------------------------------------------------

#: what Debezium 3.6 published for the workload of tests/support/debezium.py: JSON converters without schemas,
#: and with them (schemas.enable=true)
RECORDINGS = {False: RECORDED, True: RECORDED.with_name("recorded-schemas.json")}
#: source fields whose values differ by run (times, positions, versions): compared by type only
_VOLATILE = {"version": str, "ts_ms": int, "ts_us": int, "ts_ns": int, "sequence": str, "txId": (int, type(None)),
             "lsn": (int, type(None)), "snapshot": str, "name": str, "db": str}
#: the differences left between our envelope and Debezium's, as docs/formats-debezium.md lists them
_NOT_NULL_DEFAULTS = {("orders", "customer"): ""}  # Debezium fills a NOT NULL column missing from a key-only row


def _split(record: Any, schemas: bool) -> tuple[Any, Any]:
    """(schema, payload) of a key or value as the JsonConverter wrote it (schema None without schemas)."""
    if record is None or not schemas:
        return None, record
    assert set(record) == {"schema", "payload"}, record
    return record["schema"], record["payload"]


def _named(schema: Any, logical: str) -> Any:
    """A schema with the connector's logical name in its names (``shop.public.orders.Value``) made neutral."""
    text = json.dumps(schema)
    return json.loads(text.replace(f'"name": "{logical}.', '"name": "LOGICAL.'))


def _comparable(key: Any, value: Any, schemas: bool, logical: str) -> dict[str, Any]:
    """A record without what differs by run: source fields compared by type, times, the logical name."""
    key_schema, key = _split(key, schemas)
    value_schema, value = _split(value, schemas)
    out = {"key": key, "key_schema": _named(key_schema, logical), "value_schema": _named(value_schema, logical)}
    if value is None:  # a tombstone
        return {**out, "value": None}
    value = json.loads(json.dumps(value))
    if value.get("op") == "d" and value["before"] is not None:
        for (table, column), default in _NOT_NULL_DEFAULTS.items():
            if value["source"]["table"] == table and value["before"].get(column) == default:
                value["before"][column] = None
    order = list(value)
    source = value.pop("source")
    for name, kind in _VOLATILE.items():
        assert isinstance(source.pop(name), kind), (name, value)
    for name in ("ts_ms", "ts_us", "ts_ns"):
        if name in value:
            assert isinstance(value.pop(name), int)
    return {**out, "value": value, "source": source, "order": order}


class _Tail:
    """One consumer of the test's topics for the whole test: what arrived since the last call."""

    def __init__(self, bootstrap: str, topics: list[str]) -> None:
        self.consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                         group_id=None, metadata_max_age_ms=1000)

    async def next(self, count: int, timeout: float = 60.0) -> list[tuple[Any, Any]]:
        """The next ``count`` records as (key, value) parsed, in the order of their partition; then half a second
        more, so a record too many is seen too."""
        got: list[tuple[Any, Any]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batches = await self.consumer.getmany(timeout_ms=500)
            for records in batches.values():
                got += [(None if r.key is None else orjson.loads(r.key),
                         None if r.value is None else orjson.loads(r.value)) for r in records]
            if len(got) >= count and not batches:
                break
        return got


@pytest.mark.parametrize("schemas", [False, True], ids=["schemas-disabled", "schemas-enabled"])
async def test_debezium_envelope_matches_debeziums_recorded_output(
    fresh_db: str, pg: Any, tansu: TansuServer, schemas: bool
) -> None:
    """The workload of tests/support/debezium.py, whose Debezium 3.6 output is recorded, through the listener
    on Kafka, step by step: the same records (tombstones included), keys, envelopes, values, field order and,
    with schemas, the same schemas of keys and values, but for what docs/formats-debezium.md lists."""
    recorded = json.loads(RECORDINGS[schemas].read_text())
    logical = recorded["config"]["topic.prefix"]
    dsn = pg.dsn(fresh_db)
    await sql(dsn, *(s for s in debezium.SCHEMA.split(";\n") if s.strip()),
              *(s for s in debezium.SNAPSHOT.split(";\n") if s.strip()))
    broker = Kafka(unique("dbz"), tansu.bootstrap)
    publisher = broker.publisher(format="debezium", debezium={"schemas": schemas})
    cfg = config_dict(pg.port, fresh_db, publisher, snapshot={"mode": "initial"},
                      messages={"prefixes": ["outbox"]}, topicsMap={"outbox": "app.outbox"})
    topics = [broker.topic_of(t) for t in ("public_types", "public_orders", "public_full_identity", "public_docs",
                                           "app.outbox")]
    tail = _Tail(tansu.bootstrap, topics)
    await tail.consumer.start()
    try:
        async with running(cfg):
            snapshot = await tail.next(len(recorded["snapshot"]))

            def by_row(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
                return sorted(records, key=lambda r: (r["source"]["table"], str(r["key"])))

            ours = by_row([_comparable(k, v, schemas, broker.topic) for k, v in snapshot])
            theirs = by_row([_comparable(r["key"], r["value"], schemas, logical) for r in recorded["snapshot"]])
            assert ours == theirs
            for name, statement in debezium.STEPS:
                await sql(dsn, statement)
                expected = recorded["steps"][name]
                got = await tail.next(len(expected))
                assert [_comparable(k, v, schemas, broker.topic) for k, v in got] == [
                    _comparable(r["key"], r["value"], schemas, logical) for r in expected
                ], name
    finally:
        await tail.consumer.stop()
