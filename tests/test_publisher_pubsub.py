"""The Google Pub/Sub publisher against the Pub/Sub emulator, read back with the subscriber client."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1

from listener.config import PublisherConfig, load_config, parse_publisher
from listener.errors import BrokerConfigError, BrokerUnavailable, ConfigError, MessageTooLarge, PublishError
from listener.message import Message
from listener.publishers import make_publisher
from listener.publishers.pubsub import MAX_MESSAGE_BYTES, PubSubPublisher, ordering_key, topic_id
from tests.support.harness import metric, publish_until_acked, wait_until
from tests.support.services import PubSubEmulator, free_port

pytestmark = pytest.mark.service


def config(project: str, **overrides: Any) -> PublisherConfig:
    values: dict[str, Any] = {
        "type": "google_pubsub",
        "address": "pubsub.googleapis.com:443",
        "topic": "wal_listener",
        "pubSubProjectID": project,
    }
    values.update(overrides)
    return parse_publisher(values)


def unique_project() -> str:
    return f"proj-{uuid.uuid4().hex[:10]}"  # the emulator keeps projects apart: one per test


def message(n: int, *, key: int | None = None, table: str = "users", action: str = "INSERT") -> Message:
    return Message(
        id=f"00000000-0000-0000-0000-{n:012d}",
        subject=f"wal_listener.public_{table}",
        body=b'{"n": %d}' % n,
        schema="public",
        table=table,
        action=action,
        key=None if key is None else b'{"id":%d}' % key,
    )


def number(data: bytes) -> int:
    return int(data[6:-1])


class Admin:
    """Topic and subscription management and pulling, with the library's own clients (run in threads)."""

    def __init__(self, project: str) -> None:
        self.project = project
        self.publisher = pubsub_v1.PublisherClient()
        self.subscriber = pubsub_v1.SubscriberClient()

    def topic(self, table: str = "users") -> str:
        return f"projects/{self.project}/topics/wal_listener.public_{table}"

    async def create_topic(self, table: str = "users") -> None:
        await asyncio.to_thread(self.publisher.create_topic, request={"name": self.topic(table)})

    async def delete_topic(self, table: str = "users") -> None:
        await asyncio.to_thread(self.publisher.delete_topic, request={"topic": self.topic(table)})

    async def subscribe(self, table: str = "users", ordering: bool = False) -> str:
        name = f"projects/{self.project}/subscriptions/sub-{uuid.uuid4().hex[:8]}"
        request = {"name": name, "topic": self.topic(table), "enable_message_ordering": ordering}
        await asyncio.to_thread(self.subscriber.create_subscription, request=request)
        return name

    async def pull(self, subscription: str, count: int, timeout: float = 20.0) -> list[Any]:
        """Received messages (acked) until ``count`` are there and nothing more comes."""
        got: list[Any] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            response = await asyncio.to_thread(
                self.subscriber.pull,
                request={"subscription": subscription, "max_messages": 1000},
                timeout=5,
            )
            received = list(response.received_messages)
            if received:
                got.extend(received)
                await asyncio.to_thread(
                    self.subscriber.acknowledge,
                    request={"subscription": subscription, "ack_ids": [r.ack_id for r in received]},
                )
            elif len(got) >= count:
                break
            else:
                await asyncio.sleep(0.1)
        return [r.message for r in got]




# -- names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("wal_listener.public_users", "wal_listener.public_users"),
        ("wal-listener.a~b+c", "wal-listener.a~b+c"),
        ("wal.public_my table", "wal.public_my%20table"),
        ("wal.public_50%", "wal.public_50%25"),
        ("wal.public_café", "wal.public_caf%C3%A9"),
    ],
)
def test_topic_ids(subject: str, expected: str) -> None:
    assert topic_id(subject) == expected


@pytest.mark.parametrize(
    ("subject", "problem"),
    [
        ("1wal.public_users", "must start with a letter"),
        ("_wal.x", "must start with a letter"),
        ("googwal.x", "may not start with 'goog'"),
        ("ab", "not 3-255 characters"),
        ("w" + "x" * 300, "not 3-255 characters"),
    ],
)
def test_topic_names_pubsub_cannot_hold(subject: str, problem: str) -> None:
    with pytest.raises(BrokerConfigError, match=problem):
        topic_id(subject)


def test_ordering_keys() -> None:
    assert ordering_key(None) == "" and ordering_key(b"") == ""
    assert ordering_key(b'{"id":1}') == '{"id":1}'
    hashed = ordering_key(b"\xff\xfe")
    assert hashed.startswith("sha256:") and hashed == ordering_key(b"\xff\xfe")
    long_key = ordering_key(b"k" * 2000)
    assert long_key.startswith("sha256:") and len(long_key) < 1024


def test_missing_project_id_is_a_one_line_config_error(tmp_path: Any) -> None:
    path = tmp_path / "config.yml"
    path.write_text(
        "listener: {slotName: s1}\ndatabase: {name: db, user: u}\n"
        "publisher: {type: google_pubsub, address: x, topic: wal}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert "pubSubProjectID is required" in str(info.value) and "\n" not in str(info.value)


# -- against the emulator -----------------------------------------------------------------------------


async def test_events_arrive_with_attributes_on_created_topics(pubsub_env: str) -> None:
    project = unique_project()
    admin = Admin(project)
    publisher = make_publisher(config(project, create_topics=True), 5.0)
    assert isinstance(publisher, PubSubPublisher) and publisher.needs_key is False
    await publisher.connect()
    try:
        assert publisher.ready
        # the topics do not exist yet: the first event creates them; subscribe right after that
        assert await (await publisher.send([message(0), message(1, table="orders")])) == [None, None]
        users, orders = await admin.subscribe("users"), await admin.subscribe("orders")
        actions = ["INSERT", "UPDATE", "DELETE", "TRUNCATE"]
        batch = [message(n, table="orders" if n % 5 == 0 else "users", action=actions[n % 4]) for n in range(2, 1502)]
        assert await (await publisher.send(batch)) == [None] * len(batch)
    finally:
        await publisher.close()
    assert not publisher.ready
    got_users = await admin.pull(users, sum(1 for m in batch if m.table == "users"))
    got_orders = await admin.pull(orders, sum(1 for m in batch if m.table == "orders"))
    sent = {m.id: m for m in batch}
    assert sorted(number(g.data) for g in got_users) == [n for n in range(2, 1502) if n % 5]
    assert sorted(number(g.data) for g in got_orders) == [n for n in range(2, 1502) if n % 5 == 0]
    for got in (*got_users, *got_orders):
        m = sent[got.attributes["id"]]
        assert got.data == m.body
        assert dict(got.attributes) == {"id": m.id, "schema": "public", "table": m.table, "action": m.action}
        assert got.ordering_key == ""


async def test_missing_topic_without_create_topics_is_a_config_error_naming_it(pubsub_env: str) -> None:
    project = unique_project()
    publisher = PubSubPublisher(config(project), 5.0)
    await publisher.connect()
    try:
        with pytest.raises(BrokerConfigError) as info:
            await publisher.send([message(1)])
        text = str(info.value)
        assert f"topic projects/{project}/topics/wal_listener.public_users does not exist" in text
        assert "publisher.createTopics: true" in text and "\n" not in text
        # created by someone else: now it works
        await Admin(project).create_topic()
        assert await (await publisher.send([message(1)])) == [None]
    finally:
        await publisher.close()


async def test_ordering_keys_keep_each_rows_order(pubsub_env: str) -> None:
    project = unique_project()
    admin = Admin(project)
    await admin.create_topic()
    subscription = await admin.subscribe(ordering=True)
    publisher = PubSubPublisher(config(project, enable_ordering=True), 10.0)
    assert publisher.needs_key is True
    await publisher.connect()
    try:
        pending = [await publisher.send([message(b * 300 + n, key=n % 7) for n in range(300)]) for b in range(5)]
        for acks in pending:
            assert await acks == [None] * 300
    finally:
        await publisher.close()
    got = await admin.pull(subscription, 1500)
    assert len({number(g.data) for g in got}) == 1500
    for key in range(7):
        mine = [g for g in got if g.ordering_key == f'{{"id":{key}}}']
        numbers = [number(g.data) for g in mine]
        assert numbers == sorted(numbers)
        assert numbers == [n for n in range(1500) if n % 300 % 7 == key]


async def test_oversized_event_is_a_permanent_error_and_counted(pubsub_env: str) -> None:
    project = unique_project()
    publisher = PubSubPublisher(config(project, create_topics=True), 10.0)
    await publisher.connect()
    try:
        big = message(2, table="blobs")
        big.body = b'"' + b"x" * MAX_MESSAGE_BYTES + b'"'
        near = message(3, table="blobs")  # under the data limit, over the request limit with its attributes
        near.body = b"x" * (MAX_MESSAGE_BYTES - 10)
        before = metric("oversized_events_total", {"table": "blobs"})
        results = await (await publisher.send([message(1, table="blobs"), big, near, message(4, table="blobs")]))
        assert results[0] is None and results[3] is None
        for result in results[1:3]:
            assert isinstance(result, MessageTooLarge) and "limit per message of 10000000 bytes" in str(result)
        assert metric("oversized_events_total", {"table": "blobs"}) == before + 2
    finally:
        await publisher.close()


async def test_unreachable_emulator_at_connect_is_a_publish_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
    publisher = PubSubPublisher(config(unique_project()), 2.0, rpc_timeout=2.0)
    started = time.monotonic()
    with pytest.raises(PublishError, match=r"pubsub: cannot reach 127\.0\.0\.1:"):
        await publisher.connect()
    assert time.monotonic() - started < 10
    assert not publisher.ready


async def test_emulator_stopped_mid_stream_then_back_nothing_skipped(
    make_pubsub: Callable[..., PubSubEmulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    emulator = make_pubsub()
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emulator.host)
    project = unique_project()
    admin = Admin(project)
    publisher = PubSubPublisher(config(project, create_topics=True), 3.0, rpc_timeout=2.0, probe_interval=0.5)
    await publisher.connect()
    try:
        assert await (await publisher.send([message(n) for n in range(20)])) == [None] * 20

        emulator.stop()
        outage = [message(n) for n in range(20, 120)]
        started = time.monotonic()
        results = await (await publisher.send(outage))
        assert all(isinstance(r, PublishError) for r in results), results[:2]
        assert time.monotonic() - started < 3.0 + 3.0  # about ackTimeout, no hang
        await wait_until(lambda: not publisher.ready, 15, "ready to turn false")
        started = time.monotonic()
        refused = await (await publisher.send(outage[:5]))  # refused at once while it is away
        assert all(isinstance(r, BrokerUnavailable) for r in refused) and time.monotonic() - started < 1

        emulator.start()  # in-memory: it comes back without topics and subscriptions
        await wait_until(lambda: publisher.ready, 60, "ready to turn true again")
        await admin.create_topic()
        subscription = await admin.subscribe()
        await publish_until_acked(publisher, outage)
    finally:
        await publisher.close()
    got = await admin.pull(subscription, len(outage))
    assert {number(g.data) for g in got} == set(range(20, 120)), "an event of the outage is missing"


async def test_ordering_key_failure_pauses_the_key_until_its_first_failed_event_is_resent(
    pubsub_env: str,
) -> None:
    project = unique_project()
    admin = Admin(project)
    await admin.create_topic()
    publisher = PubSubPublisher(config(project, enable_ordering=True), 10.0)
    await publisher.connect()
    try:
        assert await (await publisher.send([message(n, key=1) for n in range(5)])) == [None] * 5
        await admin.delete_topic()  # every publish now fails with NotFound, which is not retried
        results = await (await publisher.send([message(n, key=1) for n in range(5, 10)]))
        assert all(isinstance(r, PublishError) for r in results), results
        assert "NotFound" in str(results[0])

        await admin.create_topic()
        subscription = await admin.subscribe(ordering=True)
        # a later event of the paused key is refused (not sent) while the first failed one is outstanding
        later = await (await publisher.send([message(7, key=1), message(100, key=2)]))
        assert isinstance(later[0], PublishError) and "is paused until event" in str(later[0])
        assert message(5).id in str(later[0])
        assert later[1] is None  # other keys are not affected
        # re-sending from the first failed event resumes the key
        await publish_until_acked(publisher, [message(n, key=1) for n in range(5, 10)])
    finally:
        await publisher.close()
    got = await admin.pull(subscription, 6)
    assert [number(g.data) for g in got if g.ordering_key == '{"id":1}'] == [5, 6, 7, 8, 9]


async def test_topic_deleted_mid_stream_is_created_again(pubsub_env: str) -> None:
    project = unique_project()
    admin = Admin(project)
    publisher = PubSubPublisher(config(project, create_topics=True), 10.0)
    await publisher.connect()
    try:
        assert await (await publisher.send([message(1)])) == [None]
        await admin.delete_topic()
        results = await (await publisher.send([message(2)]))
        assert isinstance(results[0], PublishError) and "NotFound" in str(results[0])
        assert await (await publisher.send([message(2)])) == [None]  # looked up again, created
    finally:
        await publisher.close()
    with pytest.raises(gexc.AlreadyExists):
        await admin.create_topic()
