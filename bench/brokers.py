"""The brokers: how each is started, configured for the listener, counted and consumed.

Every broker gets a fresh destination per phase, named by ``topic`` (the listener's
``publisher.topic``): a JetStream stream, a Kafka topic ``<topic>.public_<table>``, a RabbitMQ
exchange with a bound queue, a Pub/Sub topic with a subscription. ``count`` reads how many events the
broker holds; ``consume`` delivers ``(receive time, event body)`` to a callback for the latency phase.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil

from tests.support.services import NatsServer, PubSubEmulator, TansuServer, rabbitmq_available

#: (receive time, event body, the broker's own per-message metadata: see Broker.broker_time)
OnEvent = Callable[[float, bytes, Any], None]


@dataclass
class Count:
    """What the broker holds after a run: distinct event ids and messages (duplicates included)."""

    unique: int | None
    total: int | None
    how: str


class IdCounter:
    """Counts messages and distinct event ids (duplicates are allowed: delivery is at least once)."""

    def __init__(self) -> None:
        self.total = 0
        self.ids: set[str] = set()
        self.last = time.monotonic()
        self._lock = threading.Lock()  # the Pub/Sub client calls back from its own threads

    def add(self, event_id: str | None, body: bytes) -> None:
        event_id = event_id or str(orjson.loads(body)["id"])
        with self._lock:
            self.total += 1
            self.ids.add(event_id)
            self.last = time.monotonic()

    def quiet_for(self) -> float:
        return time.monotonic() - self.last

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"
PUBSUB_PROJECT = "bench"


class Broker:
    name = ""
    label = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.env: dict[str, str] = {}  # for the listener process

    def start(self) -> None:
        """Start (or check) the server; raises with a reason when it cannot be used."""

    def stop(self) -> None:
        pass

    def publisher(self, topic: str) -> dict[str, Any]:
        raise NotImplementedError

    def subject(self, topic: str, table: str) -> str:
        return f"{topic}.public_{table}"

    async def prepare(self, topic: str, table: str) -> None:
        """Create what counting or consuming needs before the first event arrives."""

    async def count(self, topic: str, table: str, expected: int) -> Count:
        """What the broker holds for ``table`` (read back from the start where the broker allows it)."""
        return Count(None, None, "not counted")

    async def consume(self, topic: str, table: str, on_event: OnEvent) -> Callable[[], Any]:
        """Subscribe; returns an async-or-sync close function."""
        raise NotImplementedError

    async def cleanup(self, topic: str, table: str) -> None:
        """Delete the phase's destination so the next one starts empty and memory/disk are freed."""

    async def close_clients(self) -> None:
        """Close the benchmark's own client connections (before the event loop ends)."""

    def version(self) -> str:
        return ""

    #: what :meth:`broker_time` means, for the report ("" when the broker has none)
    broker_time_label = ""

    def broker_time(self, meta: Any) -> float | None:
        """The broker's timestamp of a consumed message (unix seconds), from ``meta``."""
        return None

    def processes(self) -> list[psutil.Process]:
        """The broker's server processes (for their CPU seconds); empty when not ours."""
        return []

    def cpu_seconds(self) -> float | None:
        procs = self.processes()
        if not procs:
            return None
        total = 0.0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system
        return total


def _tree(pid: int | None) -> list[psutil.Process]:
    if pid is None:
        return []
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


# --------------------------------------------------------------------------------------------------


class Nats(Broker):
    name = "nats"
    label = "NATS JetStream"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.server: NatsServer | None = None

    def start(self) -> None:
        self.server = NatsServer(base_dir=self.workdir).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.cleanup()

    def version(self) -> str:
        import subprocess

        assert self.server is not None
        out = subprocess.run([str(self.server.binary), "--version"], capture_output=True, text=True, check=False)
        return out.stdout.strip()

    def publisher(self, topic: str) -> dict[str, Any]:
        assert self.server is not None
        return {"type": "nats", "address": self.server.address, "topic": topic}

    def processes(self) -> list[psutil.Process]:
        return _tree(self.server.pid if self.server else None)

    broker_time_label = "stored in the JetStream stream"

    def broker_time(self, meta: Any) -> float | None:
        # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending> (+ domain/account/token in v2)
        tokens = str(meta or "").split(".")
        if len(tokens) == 9:
            return int(tokens[7]) / 1e9
        if len(tokens) >= 11:
            return int(tokens[9]) / 1e9
        return None

    async def _js(self) -> tuple[Any, Any]:
        import nats

        assert self.server is not None
        nc = await nats.connect(self.server.url)
        return nc, nc.jetstream(timeout=30)

    async def count(self, topic: str, table: str, expected: int) -> Count:
        nc, js = await self._js()
        try:
            info = await js.stream_info(topic)
            n = int(info.state.messages)
            # Nats-Msg-Id de-duplication keeps one message per event id inside the duplicate window
            return Count(n, n, "JetStream stream message count (de-duplicated by Nats-Msg-Id)")
        finally:
            await nc.close()

    async def consume(self, topic: str, table: str, on_event: OnEvent) -> Callable[[], Any]:
        from nats.js.api import DeliverPolicy

        nc, js = await self._js()

        async def got(msg: Any) -> None:
            on_event(time.time(), msg.data, msg.reply)

        sub = await js.subscribe(f"{topic}.>", cb=got, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL,
                                 pending_msgs_limit=-1, pending_bytes_limit=-1)

        async def close() -> None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            await nc.close()

        return close

    async def cleanup(self, topic: str, table: str) -> None:
        nc, js = await self._js()
        try:
            with contextlib.suppress(Exception):
                await js.delete_stream(topic)
        finally:
            await nc.close()


# --------------------------------------------------------------------------------------------------


class Kafka(Broker):
    name = "kafka"
    label = "Kafka (Tansu)"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.server: TansuServer | None = None

    def start(self) -> None:
        self.server = TansuServer(base_dir=self.workdir).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.cleanup()

    def publisher(self, topic: str) -> dict[str, Any]:
        assert self.server is not None
        # Tansu has no idempotent producer
        return {"type": "kafka", "address": self.server.bootstrap, "topic": topic, "idempotent": False,
                "createTopics": True}  # fmt: skip

    def processes(self) -> list[psutil.Process]:
        return _tree(self.server.pid if self.server else None)

    broker_time_label = "the record's CreateTime (set by the listener's producer)"

    def broker_time(self, meta: Any) -> float | None:
        return meta / 1000 if isinstance(meta, int) and meta > 0 else None

    async def prepare(self, topic: str, table: str) -> None:
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        assert self.server is not None
        admin = AIOKafkaAdminClient(bootstrap_servers=self.server.bootstrap)
        await admin.start()
        try:
            with contextlib.suppress(Exception):
                await admin.create_topics([NewTopic(self.subject(topic, table), 1, 1)])
        finally:
            await admin.close()

    async def count(self, topic: str, table: str, expected: int) -> Count:
        from aiokafka import AIOKafkaConsumer

        assert self.server is not None
        consumer = AIOKafkaConsumer(self.subject(topic, table), bootstrap_servers=self.server.bootstrap,
                                    group_id=None, auto_offset_reset="earliest", enable_auto_commit=False,
                                    max_partition_fetch_bytes=8 * 2**20)
        await consumer.start()
        counter = IdCounter()
        try:
            while counter.quiet_for() < (2.0 if counter.total >= expected else 10.0):
                batches = await consumer.getmany(timeout_ms=500, max_records=20000)
                for records in batches.values():
                    for r in records:
                        counter.add(dict(r.headers).get("id", b"").decode() or None, r.value)
        finally:
            await consumer.stop()
        return Count(len(counter.ids), counter.total, "read back with a consumer from the earliest offset")

    async def consume(self, topic: str, table: str, on_event: OnEvent) -> Callable[[], Any]:
        from aiokafka import AIOKafkaConsumer

        assert self.server is not None
        consumer = AIOKafkaConsumer(self.subject(topic, table), bootstrap_servers=self.server.bootstrap,
                                    group_id=None, auto_offset_reset="earliest", fetch_max_wait_ms=10)
        await consumer.start()

        async def loop() -> None:
            while True:
                batches = await consumer.getmany(timeout_ms=200)
                now = time.time()
                for records in batches.values():
                    for r in records:
                        on_event(now, r.value, r.timestamp)

        task = asyncio.create_task(loop())

        async def close() -> None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            await consumer.stop()

        return close

    async def cleanup(self, topic: str, table: str) -> None:
        from aiokafka.admin import AIOKafkaAdminClient

        assert self.server is not None
        admin = AIOKafkaAdminClient(bootstrap_servers=self.server.bootstrap)
        await admin.start()
        try:
            with contextlib.suppress(Exception):
                await admin.delete_topics([self.subject(topic, table)])
        finally:
            await admin.close()


# --------------------------------------------------------------------------------------------------


class RabbitMQ(Broker):
    name = "rabbitmq"
    label = "RabbitMQ (publisher confirms)"

    #: the type of the queue bound to the exchange (the listener publishes the same either way):
    #: "quorum" (RabbitMQ's replicated durable queue) or "classic"; see bench/README.md
    queue_type = "quorum"

    def __init__(self, workdir: Path, url: str = RABBITMQ_URL) -> None:
        super().__init__(workdir)
        self.url = url
        self._conn: Any = None
        self._channel: Any = None

    def start(self) -> None:
        if not rabbitmq_available(self.url):
            raise RuntimeError(f"no RabbitMQ at {self.url} (apt-get install rabbitmq-server)")

    def publisher(self, topic: str) -> dict[str, Any]:
        return {"type": "rabbitmq", "address": self.url, "topic": topic}

    def processes(self) -> list[psutil.Process]:
        """The machine's RabbitMQ (not started by the bench): its Erlang VM, found by name."""
        found = []
        for proc in psutil.process_iter(["name", "username"]):
            if proc.info["name"] == "beam.smp" and proc.info["username"] == "rabbitmq":
                found.append(proc)
        return found

    def _queue(self, topic: str) -> str:
        return f"{topic}_all"

    async def _open(self) -> Any:
        import aio_pika

        if self._conn is None or self._conn.is_closed:
            self._conn = await aio_pika.connect(self.url)
            self._channel = await self._conn.channel()
        return self._channel

    async def prepare(self, topic: str, table: str) -> None:
        import aio_pika

        channel = await self._open()
        exchange = await channel.declare_exchange(topic, aio_pika.ExchangeType.TOPIC, durable=True)
        arguments = {"x-queue-type": "quorum"} if self.queue_type == "quorum" else {}
        queue = await channel.declare_queue(self._queue(topic), durable=True, auto_delete=False, arguments=arguments)
        await queue.bind(exchange, "#")

    async def count(self, topic: str, table: str, expected: int) -> Count:
        channel = await self._open()
        queue = await channel.declare_queue(self._queue(topic), passive=True)
        held = int(queue.declaration_result.message_count)
        await channel.set_qos(prefetch_count=5000)
        counter = IdCounter()

        async def got(message: Any) -> None:
            counter.add(message.message_id, message.body)

        tag = await queue.consume(got, no_ack=True)
        try:
            while True:
                if counter.total >= held or counter.quiet_for() > 5.0:
                    break
                await asyncio.sleep(0.1)
        finally:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
        return Count(len(counter.ids), held, "drained the queue bound to the exchange")

    async def consume(self, topic: str, table: str, on_event: OnEvent) -> Callable[[], Any]:
        import aio_pika

        channel = await self._open()
        await channel.set_qos(prefetch_count=5000)
        queue = await channel.get_queue(self._queue(topic))

        async def got(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            on_event(time.time(), message.body, None)

        tag = await queue.consume(got, no_ack=True)

        async def close() -> None:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)

        return close

    async def cleanup(self, topic: str, table: str) -> None:
        with contextlib.suppress(Exception):
            channel = await self._open()
            await channel.queue_delete(self._queue(topic))
            await channel.exchange_delete(topic)

    async def close_clients(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(Exception):
                await conn.close()


# --------------------------------------------------------------------------------------------------


class PubSub(Broker):
    name = "pubsub"
    label = "Google Pub/Sub (emulator)"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.server: PubSubEmulator | None = None

    def start(self) -> None:
        self.server = PubSubEmulator(base_dir=self.workdir).start()
        self.env = {"PUBSUB_EMULATOR_HOST": self.server.host}
        os.environ["PUBSUB_EMULATOR_HOST"] = self.server.host  # for this process's own clients

    def stop(self) -> None:
        if self.server is not None:
            self.server.cleanup()

    def processes(self) -> list[psutil.Process]:
        return _tree(self.server.pid if self.server else None)

    broker_time_label = "the message's publish_time (set by the emulator on receipt)"

    def broker_time(self, meta: Any) -> float | None:
        try:
            return float(meta.timestamp())
        except (AttributeError, ValueError, TypeError):
            return None

    def publisher(self, topic: str) -> dict[str, Any]:
        return {"type": "google_pubsub", "address": "pubsub-emulator", "topic": topic,
                "pubSubProjectID": PUBSUB_PROJECT, "createTopics": True}  # fmt: skip

    def _paths(self, topic: str, table: str) -> tuple[str, str]:
        from listener.publishers.pubsub import topic_id

        tid = topic_id(self.subject(topic, table))
        return f"projects/{PUBSUB_PROJECT}/topics/{tid}", f"projects/{PUBSUB_PROJECT}/subscriptions/{tid}-bench"

    async def prepare(self, topic: str, table: str) -> None:
        from google.cloud import pubsub_v1

        topic_path, sub_path = self._paths(topic, table)

        def create() -> None:
            publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
            with contextlib.suppress(Exception):
                publisher.create_topic(request={"name": topic_path})
            with contextlib.suppress(Exception):
                subscriber.create_subscription(request={"name": sub_path, "topic": topic_path,
                                                        "ack_deadline_seconds": 60})

        await asyncio.to_thread(create)

    async def count(self, topic: str, table: str, expected: int) -> Count:
        counter = IdCounter()
        close = await self.consume(topic, table, lambda _t, _b, _m: None, counter=counter)
        try:
            while True:
                if counter.quiet_for() > (3.0 if counter.total >= expected else 15.0):
                    break
                await asyncio.sleep(0.2)
        finally:
            await asyncio.to_thread(close)
        return Count(len(counter.ids), counter.total, "pulled back from a subscription made before the run")

    async def consume(self, topic: str, table: str, on_event: OnEvent,
                      counter: IdCounter | None = None) -> Callable[[], Any]:
        from google.cloud import pubsub_v1

        _, sub_path = self._paths(topic, table)
        subscriber = pubsub_v1.SubscriberClient()

        def got(message: Any) -> None:
            on_event(time.time(), message.data, message.publish_time)
            if counter is not None:
                counter.add(message.attributes.get("id"), message.data)
            message.ack()

        future = subscriber.subscribe(
            sub_path, got, flow_control=pubsub_v1.types.FlowControl(max_messages=10000)
        )

        def close() -> None:
            future.cancel()
            with contextlib.suppress(Exception):
                future.result(timeout=10)
            subscriber.close()

        return close

    async def cleanup(self, topic: str, table: str) -> None:
        from google.cloud import pubsub_v1

        topic_path, sub_path = self._paths(topic, table)

        def delete() -> None:
            with contextlib.suppress(Exception):
                pubsub_v1.SubscriberClient().delete_subscription(request={"subscription": sub_path})
            with contextlib.suppress(Exception):
                pubsub_v1.PublisherClient().delete_topic(request={"topic": topic_path})

        await asyncio.to_thread(delete)


BROKERS: dict[str, type[Broker]] = {"nats": Nats, "kafka": Kafka, "rabbitmq": RabbitMQ, "pubsub": PubSub}
