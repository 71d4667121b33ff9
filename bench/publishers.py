"""Publisher micro-benchmark: acknowledged messages per second through ``Publisher.send`` alone.

No PostgreSQL, no decoding: N ready-made events of about 400 bytes of JSON go through the publisher the
way the delivery stage drives it (one sender calling ``send`` in order, batches of ``--batch`` events,
up to ``--in-flight`` batches waiting for their acknowledgements at once). The clock runs from the first
``send`` until the last batch is acknowledged; a message counts only when the broker acknowledged it
(JetStream ack, RabbitMQ publisher confirm on a durable exchange + durable queue with persistent
messages, Kafka acks=all).

Brokers: ``nats-server -js``, Tansu and the Pub/Sub emulator are started here on free ports
(tests/support/services.py); RabbitMQ is the machine's at ``--rabbitmq-url`` (a durable queue is bound to
the exchange for the run and deleted after).

``pubsub-raw`` is not the listener: it measures the Pub/Sub emulator's own ceiling with the leanest client
at hand -- the same ``PublishRequest`` bytes the publisher would send (1000 messages each), all built
before the clock starts, sent as raw unary calls on ``--raw-channels`` grpc.aio channels with
``--raw-in-flight`` requests outstanding (comma-separated lists: every combination is run), counting the
message ids Pub/Sub returned.

    .venv/bin/python -m bench.publishers                               # every broker, 200k messages, 3 runs
    .venv/bin/python -m bench.publishers --brokers nats --messages 500000 --runs 5
    .venv/bin/python -m bench.publishers --loop asyncio                # the default loop instead of uvloop
    .venv/bin/python -m bench.publishers --brokers pubsub,pubsub-raw   # the publisher beside the emulator's ceiling
    .venv/bin/python -m bench.publishers --brokers pubsub --ordering   # Pub/Sub with ordering keys (one per event)

Prints one line per run (with this process's CPU time per message: the client's cost, apart from the
broker's) and the best and median per broker; ``--json FILE`` writes them. After each run the broker
is asked how many of the messages it holds (JetStream stream count, RabbitMQ queue depth, Kafka: read
back by id; Pub/Sub: not read back, the publisher counts each request's message ids); a shortfall is
printed. ``--rabbitmq-queue quorum|classic-v2|none`` and ``--kafka-partitions N`` vary the destination.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import orjson

from listener.config import parse_publisher
from listener.message import Message
from listener.publishers import make_publisher
from listener.publishers.base import Publisher

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"


#: bytes of padding in each generated event (``--padding``): 40 gives the reference workload's ~400 bytes
PADDING = 40


def make_messages(topic: str, count: int) -> list[Message]:
    """``count`` events shaped like the reference workload's, ~360 + :data:`PADDING` bytes of JSON each."""
    prefix = uuid.uuid4().hex[:8]
    template = orjson.dumps({
        "id": "@ID@", "schema": "public", "table": "bench", "action": "UPDATE",
        "data": {"id": "@N@", "name": "name-@N@", "amount": "12345.678901", "active": True,
                 "created": "2026-01-02T03:04:05.123456Z", "tags": ["alpha", "beta", "gamma"],
                 "doc": {"k": "@N@", "v": "some text value", "nested": {"a": 1, "b": [1, 2, 3]}}},
        "dataOld": {"id": "@N@"},
        "commitTime": "2026-01-02T03:04:05.123456Z",
        "padding": "x" * PADDING,
    }).replace(b'"@N@"', b"%(n)d").replace(b"@N@", b"%(n)d").replace(b"@ID@", b"%(id)s")
    subject = f"{topic}.public_bench"
    out = []
    for n in range(count):
        event_id = f"{prefix}-0000-4000-8000-{n:012d}"
        body = template % {b"n": n, b"id": event_id.encode()}
        out.append(Message(event_id, subject, body, "public", "bench", "UPDATE", key=b"%d" % n))
    return out


def batches(messages: list[Message], size: int) -> Iterator[list[Message]]:
    for start in range(0, len(messages), size):
        yield messages[start:start + size]


async def drive(
    publisher: Publisher, messages: list[Message], batch: int, in_flight: int
) -> tuple[float, float, int, int]:
    """Send like the delivery stage; return (seconds, CPU seconds of this process, acked, failed)."""
    slots = asyncio.Semaphore(in_flight)
    acked = failed = 0
    waiting: set[asyncio.Task[None]] = set()

    async def settle(acks: Any) -> None:
        nonlocal acked, failed
        try:
            results = await acks
        finally:
            slots.release()
        for r in results:
            if r is None:
                acked += 1
            else:
                failed += 1

    start, cpu = time.perf_counter(), time.process_time()
    for chunk in batches(messages, batch):
        await slots.acquire()
        acks = await publisher.send(chunk)
        task = asyncio.create_task(settle(acks))
        waiting.add(task)
        task.add_done_callback(waiting.discard)
    await asyncio.gather(*waiting)
    return time.perf_counter() - start, time.process_time() - cpu, acked, failed


class Broker:
    name = ""

    def start(self) -> None:
        pass

    def config(self, topic: str) -> dict[str, Any]:
        raise NotImplementedError

    async def prepare(self, topic: str) -> None:
        pass

    async def held(self, topic: str) -> int | None:
        """How many messages the broker holds for the run (None: it cannot tell)."""
        return None

    async def cleanup(self, topic: str) -> None:
        pass

    def stop(self) -> None:
        pass


class Nats(Broker):
    name = "nats"

    def start(self) -> None:
        from tests.support.services import NatsServer

        self.server = NatsServer().start()

    def config(self, topic: str) -> dict[str, Any]:
        return {"type": "nats", "address": self.server.address, "topic": topic}

    async def held(self, topic: str) -> int | None:
        import nats

        nc = await nats.connect(self.server.url)
        try:
            return int((await nc.jetstream().stream_info(topic)).state.messages)
        finally:
            await nc.close()

    async def cleanup(self, topic: str) -> None:
        import nats

        nc = await nats.connect(self.server.url)
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(topic)
        await nc.close()

    def stop(self) -> None:
        self.server.cleanup()


class Kafka(Broker):
    name = "kafka"

    def start(self) -> None:
        from tests.support.services import TansuServer

        self.server = TansuServer().start()

    def __init__(self, partitions: int = 1) -> None:
        self.partitions = partitions

    def config(self, topic: str) -> dict[str, Any]:
        return {"type": "kafka", "address": self.server.bootstrap, "topic": topic, "idempotent": False,
                "createTopics": True, "partitions": self.partitions}

    async def held(self, topic: str) -> int | None:
        """Distinct event ids in the topic, read back from the start."""
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(f"{topic}.public_bench", bootstrap_servers=self.server.bootstrap,
                                    auto_offset_reset="earliest", enable_auto_commit=False)
        await consumer.start()
        ids: set[bytes] = set()
        try:
            while True:
                got = await consumer.getmany(timeout_ms=3000, max_records=50_000)
                if not got:
                    return len(ids)
                for records in got.values():
                    ids.update(dict(r.headers)["id"] for r in records)
        finally:
            await consumer.stop()

    def stop(self) -> None:
        self.server.cleanup()


#: ``--rabbitmq-queue``: the durable queue bound to the exchange for the run (its arguments), or none
RABBITMQ_QUEUES: dict[str, dict[str, Any] | None] = {
    "classic": {},
    "classic-v2": {"x-queue-version": 2},
    "quorum": {"x-queue-type": "quorum"},
    "none": None,  # nothing bound: RabbitMQ returns every (mandatory) message, then confirms it
}


class RabbitMQ(Broker):
    name = "rabbitmq"

    def __init__(self, url: str, queue: str = "classic") -> None:
        self.url = url
        self.queue_arguments = RABBITMQ_QUEUES[queue]

    def start(self) -> None:
        from tests.support.services import rabbitmq_available

        if not rabbitmq_available(self.url):
            raise RuntimeError(f"no RabbitMQ at {self.url} (apt-get install rabbitmq-server)")

    def config(self, topic: str) -> dict[str, Any]:
        return {"type": "rabbitmq", "address": self.url, "topic": topic}

    async def prepare(self, topic: str) -> None:
        import aio_pika

        connection = await aio_pika.connect(self.url)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(topic, aio_pika.ExchangeType.TOPIC, durable=True)
            if self.queue_arguments is not None:
                queue = await channel.declare_queue(f"{topic}_all", durable=True, arguments=self.queue_arguments)
                await queue.bind(exchange, "#")

    async def held(self, topic: str) -> int | None:
        import aio_pika

        if self.queue_arguments is None:
            return None
        connection = await aio_pika.connect(self.url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(f"{topic}_all", passive=True)
            return int(queue.declaration_result.message_count or 0)

    async def cleanup(self, topic: str) -> None:
        import aio_pika

        connection = await aio_pika.connect(self.url)
        async with connection:
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.queue_delete(f"{topic}_all")
            with contextlib.suppress(Exception):
                await channel.exchange_delete(topic)


class PubSub(Broker):
    """The Pub/Sub emulator (``PUBSUB_EMULATOR_HOST`` is set for this process); a topic per run."""

    name = "pubsub"
    project = "bench"

    def __init__(self, ordering: bool = False) -> None:
        self.ordering = ordering

    def start(self) -> None:
        import os

        from tests.support.services import PubSubEmulator

        self.server = PubSubEmulator().start()
        os.environ["PUBSUB_EMULATOR_HOST"] = self.server.host

    def config(self, topic: str) -> dict[str, Any]:
        return {"type": "google_pubsub", "topic": topic, "pubSubProjectID": self.project, "createTopics": True,
                "enableOrdering": self.ordering}

    def stop(self) -> None:
        self.server.cleanup()


async def raw_pubsub_run(host: str, count: int, channels: int, in_flight: int) -> dict[str, Any]:
    """The emulator's ceiling: pre-built requests of 1000 messages on ``channels`` channels, ``in_flight``
    outstanding; acked = message ids returned."""
    import grpc.aio

    from listener.publishers.pubsub import Encoder, field, read_message_ids, topic_field

    topic = f"pubbench_{uuid.uuid4().hex[:8]}"
    path = f"projects/{PubSub.project}/topics/{topic}.public_bench"
    pool = [grpc.aio.insecure_channel(host) for _ in range(channels)]
    try:
        publish = [c.unary_unary("/google.pubsub.v1.Publisher/Publish") for c in pool]
        await pool[0].unary_unary("/google.pubsub.v1.Publisher/CreateTopic")(field(b"\x0a", path.encode()))
        encoder, head = Encoder(), topic_field(path)
        messages = make_messages(topic, count)
        requests = [head + b"".join(encoder.message(m) for m in chunk) for chunk in batches(messages, 1000)]
        await publish[0](requests[0])  # warm up: connections open
        queue = iter(enumerate(requests))
        acked = 0

        async def worker(n: int) -> None:
            nonlocal acked
            call = publish[n % channels]
            for _, request in queue:
                response = await call(request)
                acked += read_message_ids(response)

        start, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(n) for n in range(in_flight)))
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        for c in pool:
            await c.close()
    return {"broker": "pubsub-raw", "messages": count, "held": None, "seconds": round(seconds, 3), "acked": acked,
            "failed": count - acked, "acked_per_s": round(acked / seconds) if seconds else 0,
            "cpu_s": round(cpu, 3), "cpu_us_per_msg": round(cpu / count * 1e6, 2),
            "channels": channels, "requests_in_flight": in_flight}


async def one_run(broker: Broker, count: int, batch: int, in_flight: int) -> dict[str, Any]:
    topic = f"pubbench_{uuid.uuid4().hex[:8]}"
    await broker.prepare(topic)
    publisher = make_publisher(parse_publisher(broker.config(topic)), ack_timeout=30.0)
    try:
        await publisher.connect()
        messages = make_messages(topic, count)
        # warm up: the topic/stream exists, connections are open, the first batch's lookups are done
        await drive(publisher, make_messages(topic, batch), batch, in_flight)
        seconds, cpu, acked, failed = await drive(publisher, messages, batch, in_flight)
    finally:
        await publisher.close()
    try:
        held = await broker.held(topic)  # the warm-up batch included
    finally:
        await broker.cleanup(topic)
    if held is not None and held != acked + batch:
        print(f"{broker.name}: the broker holds {held} messages, expected {acked + batch}", file=sys.stderr)
    return {"broker": broker.name, "messages": count, "held": held, "seconds": round(seconds, 3), "acked": acked,
            "failed": failed, "acked_per_s": round(acked / seconds) if seconds else 0,
            "cpu_s": round(cpu, 3), "cpu_us_per_msg": round(cpu / count * 1e6, 2)}


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def repeat(
    args: argparse.Namespace, runs: list[dict[str, Any]], label: str,
    work: Callable[[], Coroutine[Any, Any, dict[str, Any]]], **extra: Any,
) -> tuple[list[int], list[float]]:
    """``--runs`` runs of ``work()``, each on a new event loop, a line printed per run: (rates, CPU per msg)."""
    rates, costs = [], []
    for i in range(args.runs):
        with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
            result = runner.run(work())
        result.update(run=i + 1, loop=args.loop, **extra)
        runs.append(result)
        rates.append(result["acked_per_s"])
        costs.append(result["cpu_us_per_msg"])
        print(f"{label} run {i + 1}: {result['acked']:>8} acked, {result['failed']} failed in "
              f"{result['seconds']:7.3f}s = {result['acked_per_s']:>8} acked msgs/s; "
              f"client CPU {result['cpu_us_per_msg']:5.2f} us/msg", flush=True)
    return rates, costs


def raw_runs(broker: PubSub, args: argparse.Namespace, runs: list[dict[str, Any]], summary: list[str]) -> None:
    """``pubsub-raw``: every (channels, in flight) combination, ``--runs`` times each."""
    for channels in (int(c) for c in args.raw_channels.split(",")):
        for in_flight in (int(n) for n in args.raw_in_flight.split(",")):
            rates, costs = repeat(
                args, runs, f"pubsub-raw {channels} ch x {in_flight:>3} requests",
                lambda: raw_pubsub_run(broker.server.host, args.messages, channels, in_flight),  # noqa: B023
            )
            median = round(statistics.median(rates))
            summary.append(f"pubsub-raw best {max(rates):>8} msgs/s   median {median:>8} msgs/s"
                           f"   client CPU {min(costs):.2f} us/msg   ({args.messages} msgs x {args.runs} runs, "
                           f"{channels} channel(s), {in_flight} requests in flight, {args.loop})")


def main(argv: list[str] | None = None) -> int:
    global PADDING
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--brokers", default="nats,rabbitmq,kafka",
                        help="comma-separated: nats,rabbitmq,kafka,pubsub,pubsub-raw")
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=2000, help="events per send() (the listener's batchSize)")
    parser.add_argument("--in-flight", type=int, default=10, help="batches awaiting acks at once")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--rabbitmq-url", default=RABBITMQ_URL)
    parser.add_argument("--kafka-partitions", type=int, default=1, help="partitions of the Kafka topic")
    parser.add_argument("--rabbitmq-queue", choices=sorted(RABBITMQ_QUEUES), default="classic",
                        help="the durable queue bound to the exchange (none: nothing bound)")
    parser.add_argument("--ordering", action="store_true", help="pubsub: enableOrdering (every event its own key)")
    parser.add_argument("--raw-channels", default="1", help="pubsub-raw: gRPC channels, e.g. 1,2")
    parser.add_argument("--raw-in-flight", default="4,16", help="pubsub-raw: requests outstanding, e.g. 4,16,64")
    parser.add_argument("--padding", type=int, default=PADDING,
                        help="bytes of padding per event (4096: the wide workload's size)")
    parser.add_argument("--json", type=Path, help="write the runs as JSON to this file")
    args = parser.parse_args(argv)
    PADDING = args.padding

    known: dict[str, Callable[[], Broker]] = {
        "nats": Nats,
        "kafka": lambda: Kafka(args.kafka_partitions),
        "rabbitmq": lambda: RabbitMQ(args.rabbitmq_url, args.rabbitmq_queue),
        "pubsub": lambda: PubSub(args.ordering),
        "pubsub-raw": PubSub,
    }
    wanted = [b.strip() for b in args.brokers.split(",") if b.strip()]
    unknown = [b for b in wanted if b not in known]
    if unknown:
        parser.error(f"unknown broker(s) {unknown}; choose from {sorted(known)}")

    runs: list[dict[str, Any]] = []
    summary: list[str] = []
    for name in wanted:
        broker = known[name]()
        try:
            broker.start()
        except Exception as exc:
            print(f"{name}: skipped: {exc}", file=sys.stderr)
            continue
        try:
            if name == "pubsub-raw":
                assert isinstance(broker, PubSub)
                raw_runs(broker, args, runs, summary)
                continue
            rates, costs = repeat(
                args, runs, f"{name:9}", lambda: one_run(broker, args.messages, args.batch, args.in_flight),  # noqa: B023
                batch=args.batch, in_flight=args.in_flight,
            )
            summary.append(
                f"{name:9} best {max(rates):>8} msgs/s   median {round(statistics.median(rates)):>8} msgs/s   "
                f"client CPU {min(costs):.2f} us/msg   ({args.messages} msgs x {args.runs} runs, "
                f"batch {args.batch}, {args.in_flight} in flight, {args.loop})")
        finally:
            broker.stop()
    print("\n".join(summary))
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
