"""Consumers of Kafka, RabbitMQ, Google Pub/Sub and NATS JetStream for end-to-end tests: each broker's own
client reads back what the listener published, with its headers and key, as :class:`Got` objects.

A :class:`Broker` is how one broker is configured (its ``publisher`` section), prepared (queues and
subscriptions made before the first event) and read.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import aio_pika
import pytest
from aiokafka import AIOKafkaConsumer
from google.cloud import pubsub_v1

from tests.support.harness import Received, read_stream

__all__ = ["BROKERS", "Broker", "Got", "Kafka", "Nats", "PubSub", "RabbitMQ", "on_shared_service"]


class Got(Received):
    """An event as the broker's consumer saw it, with the broker's key / ordering key."""

    def __init__(self, subject: str, data: bytes | None, headers: dict[str, str], key: bytes | str | None) -> None:
        super().__init__(subject, data, headers)
        self.key = key


class Broker:
    """How one broker is configured, prepared and read in these tests."""

    name = ""

    def __init__(self, topic: str) -> None:
        self.topic = topic  # publisher.topic: the first part of every topic name
        self.env: dict[str, str] = {}  # for the listener process
        self.seen: list[Got] = []  # what destructive consumers (queues, subscriptions) received so far

    def publisher(self, **extra: Any) -> dict[str, Any]:
        raise NotImplementedError

    async def prepare(self, tables: list[str]) -> None:
        """Create what a consumer needs before the first event (queues, subscriptions). ``tables``: tables of
        schema public (``orders``) or topic names after ``topic.`` (``public_orders``, ``outbox``): see
        :meth:`topic_of`."""

    async def read(self, tables: list[str], count: int, timeout: float = 60.0, settle: bool = True) -> list[Got]:
        """Every event of ``tables`` published so far (from the start), waiting until ``count`` are there."""
        raise NotImplementedError

    def topic_of(self, name: str) -> str:
        """The topic of a table of schema public (``orders``), or of the name after ``topic.`` when it has a
        ``_`` or a ``.`` in it (``public_orders``, ``x.outbox``)."""
        return f"{self.topic}.{name if '_' in name or '.' in name else 'public_' + name}"

    async def close(self) -> None:
        pass


class Kafka(Broker):
    name = "kafka"

    def __init__(self, topic: str, bootstrap: str) -> None:
        super().__init__(topic)
        self.bootstrap = bootstrap

    def publisher(self, **extra: Any) -> dict[str, Any]:
        # Tansu has no idempotent producer; createTopics so that the topics exist before the first read
        return {"type": "kafka", "address": self.bootstrap, "topic": self.topic, "idempotent": False,
                "createTopics": True, "partitions": 2, **extra}  # fmt: skip

    async def read(self, tables: list[str], count: int, timeout: float = 60.0, settle: bool = True) -> list[Got]:
        topics = [self.topic_of(t) for t in tables]
        consumer = AIOKafkaConsumer(
            *topics, bootstrap_servers=self.bootstrap, auto_offset_reset="earliest", group_id=None,
            metadata_max_age_ms=1000,
        )  # fmt: skip
        await consumer.start()
        got: list[Got] = []
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=1000)
                for records in batches.values():
                    for r in records:
                        headers = {k: v.decode() for k, v in r.headers}
                        got.append(Got(r.topic, r.value, headers, r.key))
                if len(got) >= count and (not batches or not settle):
                    break
        finally:
            await consumer.stop()
        return got


class RabbitMQ(Broker):
    name = "rabbitmq"

    def __init__(self, topic: str, url: str, address: str | None = None) -> None:
        super().__init__(topic)
        self.url = url  # the consumer's (direct) connection
        self.address = address or url  # the listener's
        self.connection: aio_pika.abc.AbstractConnection | None = None
        self.queue: aio_pika.abc.AbstractQueue | None = None

    def publisher(self, **extra: Any) -> dict[str, Any]:
        return {"type": "rabbitmq", "address": self.address, "topic": self.topic, **extra}

    async def prepare(self, tables: list[str]) -> None:
        self.connection = await aio_pika.connect(self.url)
        channel = await self.connection.channel()
        exchange = await channel.declare_exchange(self.topic, aio_pika.ExchangeType.TOPIC, durable=True)
        self.queue = await channel.declare_queue(f"q_{self.topic}", exclusive=True)
        await self.queue.bind(exchange, f"{self.topic}.#")

    async def read(self, tables: list[str], count: int, timeout: float = 60.0, settle: bool = True) -> list[Got]:
        assert self.queue is not None
        got = self.seen
        deadline = time.monotonic() + timeout
        quiet_until = 0.0
        while time.monotonic() < deadline:
            m = await self.queue.get(no_ack=True, fail=False, timeout=5)
            if m is None:
                if len(got) >= count and (time.monotonic() > quiet_until or not settle):
                    break
                await asyncio.sleep(0.05)
                continue
            headers = {k: str(v) for k, v in (m.headers or {}).items()}
            headers["message_id"] = m.message_id or ""
            headers["content_type"] = m.content_type or ""
            headers["delivery_mode"] = str(int(m.delivery_mode or 0))
            got.append(Got(m.routing_key or "", m.body, headers, None))
            quiet_until = time.monotonic() + 0.5
            if not settle and len(got) >= count:
                break
        return list(got)

    async def close(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(Exception):
                channel = await self.connection.channel()
                await channel.exchange_delete(self.topic)
            await self.connection.close()


class PubSub(Broker):
    name = "pubsub"

    def __init__(self, topic: str, emulator_host: str, listener_host: str | None = None) -> None:
        super().__init__(topic)
        self.project = f"proj-{uuid.uuid4().hex[:10]}"
        self.emulator_host = emulator_host
        self.env = {"PUBSUB_EMULATOR_HOST": listener_host or emulator_host}
        self.subscriptions: dict[str, str] = {}

    def publisher(self, **extra: Any) -> dict[str, Any]:
        return {"type": "google_pubsub", "address": "emulator", "topic": self.topic,
                "pubSubProjectID": self.project, "enableOrdering": True, **extra}  # fmt: skip

    def _clients(self) -> tuple[Any, Any]:
        with _emulator_env(self.emulator_host):
            return pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()

    async def prepare(self, tables: list[str]) -> None:
        publisher, subscriber = self._clients()
        for table in tables:
            topic = f"projects/{self.project}/topics/{self.topic_of(table)}"
            name = f"projects/{self.project}/subscriptions/sub-{table}"
            await asyncio.to_thread(publisher.create_topic, request={"name": topic})
            await asyncio.to_thread(
                subscriber.create_subscription,
                request={"name": name, "topic": topic, "enable_message_ordering": True},
            )
            self.subscriptions[table] = name

    async def read(self, tables: list[str], count: int, timeout: float = 60.0, settle: bool = True) -> list[Got]:
        _, subscriber = self._clients()
        got = self.seen
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            received = []
            for table in tables:
                response = await asyncio.to_thread(
                    subscriber.pull, request={"subscription": self.subscriptions[table], "max_messages": 1000},
                    timeout=5,
                )  # fmt: skip
                if response.received_messages:
                    received.extend(response.received_messages)
                    await asyncio.to_thread(
                        subscriber.acknowledge,
                        request={"subscription": self.subscriptions[table],
                                 "ack_ids": [r.ack_id for r in response.received_messages]},
                    )  # fmt: skip
                for r in response.received_messages:
                    m = r.message
                    topic = self.topic_of(table)
                    got.append(Got(topic, m.data, dict(m.attributes), m.ordering_key))
            if len(got) >= count and not settle:
                break
            if not received:
                if len(got) >= count:
                    break
                await asyncio.sleep(0.2)
        return list(got)


@contextlib.contextmanager
def _emulator_env(host: str) -> Iterator[None]:
    old = os.environ.get("PUBSUB_EMULATOR_HOST")
    os.environ["PUBSUB_EMULATOR_HOST"] = host
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PUBSUB_EMULATOR_HOST", None)
        else:
            os.environ["PUBSUB_EMULATOR_HOST"] = old


class Nats(Broker):
    name = "nats"

    def __init__(self, topic: str, url: str) -> None:
        super().__init__(topic)
        self.url = url

    def publisher(self, **extra: Any) -> dict[str, Any]:
        return {"type": "nats", "address": self.url, "topic": self.topic, **extra}

    async def read(self, tables: list[str], count: int, timeout: float = 60.0, settle: bool = True) -> list[Got]:
        wanted = {self.topic_of(t) for t in tables}
        stored = await read_stream(self.url, self.topic, count, timeout=timeout, rest=settle)
        return [Got(r.subject, r.raw, dict(r.headers), None) for r in stored if r.subject in wanted]


#: the brokers by the names tests parametrize them with
BROKERS = ("nats", "kafka", "rabbitmq", "pubsub")


def on_shared_service(request: pytest.FixtureRequest, name: str, topic: str) -> Broker:
    """The broker ``name`` on the test session's shared service (its fixture is taken from ``request``)."""
    if name == "nats":
        return Nats(topic, request.getfixturevalue("nats_server").url)
    if name == "kafka":
        return Kafka(topic, request.getfixturevalue("tansu").bootstrap)
    if name == "rabbitmq":
        return RabbitMQ(topic, request.getfixturevalue("rabbitmq_url"))
    return PubSub(topic, request.getfixturevalue("pubsub_emulator").host)
