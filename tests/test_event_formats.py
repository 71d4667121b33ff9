"""Event formats on every broker: the default event, CloudEvents (binary and structured, read back with the
``cloudevents`` SDK's own parsers) and Debezium's envelope (compared with Debezium's recorded output).

One workload per run: a row present before the listener starts (a READ event of the initial snapshot),
then INSERT with a transactional logical message, UPDATE, DELETE and TRUNCATE.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
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


async def run_workload(broker: Broker, dsn: str, cfg: dict[str, Any]) -> list[Got]:
    """The workload of this module through the listener; every event it published."""
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
        return await broker.read(topics, 6)


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
    got = await run_workload(any_broker, dsn, cfg)
    by_action = {action_of(fmt, any_broker, g): g for g in got}
    assert len(got) == 6 and set(by_action) == ACTIONS, [g.event for g in got]
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

#: source fields whose values differ by run (times, positions, versions): compared by type only
_VOLATILE = {"version": str, "ts_ms": int, "ts_us": int, "ts_ns": int, "sequence": str, "txId": (int, type(None)),
             "lsn": (int, type(None)), "snapshot": str, "name": str, "db": str}
#: the differences left between our envelope and Debezium's, as the README lists them
_NOT_NULL_DEFAULTS = {("orders", "customer"): ""}  # Debezium fills a NOT NULL column missing from a key-only row


def _comparable(record: dict[str, Any]) -> dict[str, Any]:
    value = dict(record["value"])
    source = value.pop("source")
    for name, kind in _VOLATILE.items():
        assert isinstance(source.pop(name), kind), (name, record)
    for name in ("ts_ms", "ts_us", "ts_ns"):
        if name in value:
            assert isinstance(value.pop(name), int)
    return {"key": record["key"], "value": value, "source": source, "order": list(record["value"])}


async def test_debezium_envelope_matches_debeziums_recorded_output(fresh_db: str, pg: Any, tansu: TansuServer) -> None:
    """The workload of tests/support/debezium.py, whose Debezium 3.6 output is recorded, through the listener
    on Kafka: the same keys, envelopes, values and field order, but for what the README lists."""
    recorded = json.loads(RECORDED.read_text())
    dsn = pg.dsn(fresh_db)
    await sql(dsn, *(s for s in debezium.SCHEMA.split(";\n") if s.strip()),
              *(s for s in debezium.SNAPSHOT.split(";\n") if s.strip()))
    broker = Kafka(unique("dbz"), tansu.bootstrap)
    cfg = config_dict(pg.port, fresh_db, broker.publisher(format="debezium"), snapshot={"mode": "initial"},
                      messages={"prefixes": ["outbox"]}, topicsMap={"outbox": "app.outbox"})
    topics = ["public_types", "public_orders", "public_full_identity", "public_docs", "app.outbox"]
    expected = [r for r in recorded["snapshot"]] + [r for rs in recorded["steps"].values() for r in rs]
    expected = [r for r in expected if r["value"] is not None]  # no tombstones (see README)
    async with running(cfg):
        await broker.read(topics, len(recorded["snapshot"]), settle=False)
        for _name, statement in debezium.STEPS:
            await sql(dsn, statement)
        got = await broker.read(topics, len(expected))
    records = [{"key": orjson.loads(g.key) if g.key else None, "value": g.event} for g in got]
    # stream order: by the change's LSN (the snapshot's READ events have none and come first, by table and key)
    records.sort(key=lambda r: (r["value"]["source"]["lsn"] or 0, r["value"]["source"]["table"], str(r["key"])))
    expected.sort(key=lambda r: (r["value"]["op"] != "r", r["value"]["source"]["table"] if r["value"]["op"] == "r"
                                 else "", str(r["key"]) if r["value"]["op"] == "r" else ""))
    assert len(records) == len(expected)
    for ours, theirs in zip(records, expected, strict=True):
        theirs = json.loads(json.dumps(theirs))
        value = theirs["value"]
        if value["op"] == "d" and value["before"] is not None:
            for (table, column), default in _NOT_NULL_DEFAULTS.items():
                if value["source"]["table"] == table and value["before"].get(column) == default:
                    value["before"][column] = None
        assert _comparable(ours) == _comparable(theirs)

