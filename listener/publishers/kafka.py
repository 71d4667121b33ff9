"""Kafka publisher (aiokafka): one producer, acks=all, every event keyed by its row.

How acknowledgements are collected: ``publish`` appends the records of the batch, in order, to record
batches of their partition (aiokafka's ``create_batch``; the partition chosen as ``producer.send``
chooses it: murmur2 of the key) and hands those to aiokafka's accumulator with ``send_batch``, one
future per record batch rather than one ``producer.send`` call, metadata lookup and future per
record. When a record batch's future resolves, its records are settled on the batch's tracker. It
resolves when the partition leader answered the produce request with acks=all, so ``None`` in the
results means "written to every in-sync replica". (Where aiokafka has no batch interface, each
record goes through ``producer.send``.)

Tombstones (``publisher.tombstones``): a message marked :attr:`Message.tombstone` (a DELETE) is written as
two records on its partition, the event and then its key with a null value (no headers); the message is
acknowledged when both are, so the LSN never moves past a DELETE whose tombstone is not written.

Ordering: aiokafka keeps at most one produce request in flight per partition and re-queues a failed
batch at the head of its partition's queue, so records of one key (one partition) are written in the
order they were handed over. With ``publisher.idempotent: true`` (the default) the producer also
never expires a batch: it retries until the broker is back, and sequence numbers stop the retries
from writing duplicates. With ``idempotent: false`` a batch that cannot be delivered within the
request timeout (``listener.ackTimeout``) fails. Either way the results of a batch are in after
``ackTimeout``: what is not acknowledged by then fails with the delivery stage's :class:`AckTimeout`
(which also marks the broker not ready) and is sent again, which can write duplicates (same ``id``
header) and, after an outage, a re-sent record lands after records that were already queued behind it.

Reconnects are aiokafka's own: it re-opens broker connections and refreshes metadata by itself. A
connection-type failure marks the publisher not ready; until a metadata probe (every few seconds)
reaches the cluster again, ``publish`` fails new batches at once instead of piling them up in the
client, and after the outage every topic is looked up (or created) again before it is used. A
transient failure in the middle of a batch stops handing over the rest of the batch (each remaining
message, and each record batch not handed over yet, fails without being sent) so that nothing is
written ahead of a message that the delivery stage will have to re-send.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NodeNotReadyError,
    RecordListTooLargeError,
    RequestTimedOutError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from listener.config import KafkaPublisherConfig
from listener.delivery import Acks
from listener.errors import BrokerConfigError, BrokerUnavailable, MessageTooLarge, PublishError
from listener.formats import Binding
from listener.message import Message
from listener.publishers.base import Publisher, Readiness, tls_context

log = logging.getLogger(__name__)

# Kafka's own rule for topic names (kafka.common.internals.Topic): 1-249 of these characters.
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
# error codes of CreateTopics that are not a problem
_TOPIC_ALREADY_EXISTS = 36
# Kafka's default max.message.bytes; a record above max(this, maxBatchBytes) is refused client-side
_DEFAULT_MAX_REQUEST = 1048576


def security_options(cfg: KafkaPublisherConfig) -> dict[str, Any]:
    """aiokafka's connection keywords for TLS and SASL (shared by the producer and the admin client)."""
    context = tls_context(cfg, "kafka")
    mechanism = cfg.sasl_mechanism or ("PLAIN" if cfg.username else "")
    options: dict[str, Any] = {}
    if mechanism:
        if not cfg.username:
            raise BrokerConfigError(
                f"kafka: publisher.saslMechanism = {mechanism!r} needs publisher.username and publisher.password"
            )
        options["security_protocol"] = "SASL_SSL" if context is not None else "SASL_PLAINTEXT"
        options["sasl_mechanism"] = mechanism
        options["sasl_plain_username"] = cfg.username
        options["sasl_plain_password"] = cfg.password.get_secret_value()
    else:
        options["security_protocol"] = "SSL" if context is not None else "PLAINTEXT"
    if context is not None:
        options["ssl_context"] = context
    return options


def bootstrap_servers(address: str) -> list[str]:
    servers = [part.strip() for part in address.split(",") if part.strip()]
    if not servers:
        raise BrokerConfigError(f"kafka: publisher.address = {address!r} names no bootstrap server")
    return servers


def check_topic_name(topic: str) -> None:
    if not _TOPIC_NAME.fullmatch(topic) or topic in (".", ".."):
        raise BrokerConfigError(
            f"kafka: topic name {topic!r} is not valid in Kafka (1-249 letters, digits, '.', '_', '-'); "
            "map its table to a valid name with listener.topicsMap"
        )


class KafkaPublisher(Publisher[KafkaPublisherConfig]):
    """Publishes each event to the Kafka topic named by its subject, keyed by the row's key."""

    broker = "kafka"
    errors = (
        ((MessageSizeTooLargeError, RecordListTooLargeError), MessageTooLarge),
        # the broker is not reachable right now
        ((KafkaConnectionError, NodeNotReadyError, RequestTimedOutError, KafkaTimeoutError, TimeoutError, OSError),
         BrokerUnavailable),
    )
    needs_key = True
    cloudevents = Binding("ce_", percent_encoded=False)  # the Kafka protocol binding

    def __init__(
        self,
        cfg: KafkaPublisherConfig,
        ack_timeout: float = 10.0,
        *,
        request_timeout_ms: int | None = None,
        probe_interval: float = 5.0,
    ) -> None:
        super().__init__(cfg, ack_timeout)
        # Produce requests and metadata waits give up about when the delivery stage stops waiting.
        self._request_timeout_ms = request_timeout_ms or max(1000, int(ack_timeout * 1000))
        self._probe_interval = probe_interval
        self._producer: Any = None
        self._admin: Any = None
        self._known_topics: set[str] = set()
        self._readiness = Readiness(self.broker, f"broker {cfg.address}", log)
        self._max_request = max(_DEFAULT_MAX_REQUEST, cfg.max_batch_bytes)
        self._header_tails: dict[tuple[str, str, str], tuple[tuple[str, bytes], ...]] = {}

    # ------------------------------------------------------------------ lifecycle

    def _client_options(self) -> dict[str, Any]:
        return {
            "bootstrap_servers": bootstrap_servers(self.cfg.address),
            "request_timeout_ms": self._request_timeout_ms,
            **security_options(self.cfg),
        }

    async def connect(self) -> None:
        if self._producer is not None:
            return
        options = self._client_options()
        cfg = self.cfg
        producer = AIOKafkaProducer(
            client_id="wal-listener",
            acks="all",
            enable_idempotence=cfg.idempotent,
            compression_type=None if cfg.compression == "none" else cfg.compression,
            linger_ms=cfg.linger_ms,
            max_batch_size=cfg.max_batch_bytes,
            max_request_size=self._max_request,
            **options,
        )
        try:
            await producer.start()
        except (TimeoutError, KafkaConnectionError, OSError) as exc:
            await self._stop_quietly(producer)
            raise BrokerUnavailable(f"kafka: cannot reach {cfg.address}: {exc}", broker=self.broker) from exc
        except KafkaError as exc:
            await self._stop_quietly(producer)
            if cfg.idempotent:
                raise BrokerConfigError(
                    f"kafka: {cfg.address} refused the idempotent producer ({type(exc).__name__}); "
                    "set publisher.idempotent: false if the broker does not support idempotence"
                ) from exc
            raise BrokerConfigError(f"kafka: {cfg.address} refused the producer: {exc!r}") from exc
        except RuntimeError as exc:  # e.g. the compression library is not installed
            await self._stop_quietly(producer)
            raise BrokerConfigError(f"kafka: {exc}") from exc
        self._producer = producer
        if cfg.create_topics:
            admin = AIOKafkaAdminClient(client_id="wal-listener-admin", **options)
            try:
                await admin.start()
            except (TimeoutError, KafkaError, OSError) as exc:
                await self.close()
                raise BrokerUnavailable(f"kafka: cannot reach {cfg.address}: {exc}", broker=self.broker) from exc
            self._admin = admin
        self._readiness.start(self._probe, self._probe_interval, self._known_topics.clear)
        log.info("kafka: connected to %s", cfg.address)

    @staticmethod
    async def _stop_quietly(producer: Any) -> None:
        with contextlib.suppress(Exception):
            await producer.stop()

    async def close(self) -> None:
        await self._readiness.stop()
        if self._admin is not None:
            admin, self._admin = self._admin, None
            with contextlib.suppress(Exception):
                await admin.close()
        if self._producer is not None:
            producer, self._producer = self._producer, None
            try:
                # flushes what is buffered; an idempotent producer would wait for an absent broker forever
                await asyncio.wait_for(producer.stop(), max(5.0, 2 * self.ack_timeout))
            except TimeoutError:
                log.warning("kafka: closed with events still unacknowledged; they are sent again after restart")
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(producer.client.close(), 5.0)
            except Exception as exc:
                log.warning("kafka: error while closing the producer: %r", exc)

    @property
    def ready(self) -> bool:
        return self._producer is not None and self._readiness.is_up

    async def _probe(self) -> None:
        """Metadata from the cluster (the readiness probe: it also notices an idle broker going away; when
        the broker comes back, every topic is looked up, or created, again: it may be a new or wiped one)."""
        producer = self._producer
        if producer is not None:
            await producer.client.fetch_all_metadata()

    # ------------------------------------------------------------------ topics

    async def _ensure_topic(self, topic: str) -> None:
        """Create (createTopics) or look up a topic the first time it is used.

        Raises :class:`BrokerConfigError` for a topic that cannot exist, :class:`PublishError` when the
        broker cannot be asked right now.
        """
        check_topic_name(topic)
        if self._admin is not None:
            try:
                response = await self._admin.create_topics(
                    [NewTopic(topic, self.cfg.partitions, self.cfg.replication_factor)]
                )
            except (TimeoutError, KafkaError, OSError) as exc:
                raise self.error(exc, f"cannot create topic {topic!r}: {exc!r}") from exc
            for name, code, *rest in response.topic_errors:
                if code not in (0, _TOPIC_ALREADY_EXISTS):
                    detail = rest[0] if rest and rest[0] else f"error code {code}"
                    raise BrokerConfigError(
                        f"kafka: cannot create topic {name!r} with publisher.partitions={self.cfg.partitions} "
                        f"and publisher.replicationFactor={self.cfg.replication_factor}: {detail}"
                    )
                if code == 0:
                    log.info("kafka: created topic %s", name)
        try:
            await self._producer.partitions_for(topic)
        except UnknownTopicOrPartitionError:
            # Either the topic is missing (and the broker does not create topics) or the broker is down.
            try:
                metadata = await self._producer.client.fetch_all_metadata()
            except (TimeoutError, KafkaError, OSError) as exc:
                raise self.error(exc, f"cannot look up topic {topic!r}: {exc!r}") from exc
            if topic not in metadata.topics():
                raise BrokerConfigError(
                    f"kafka: topic {topic!r} does not exist and the broker does not create topics; "
                    "create it or set publisher.createTopics: true"
                ) from None
            raise BrokerUnavailable(f"kafka: topic {topic!r} has no partition leader yet", broker=self.broker) from None
        except TopicAuthorizationFailedError:
            raise BrokerConfigError(
                f"kafka: user {self.cfg.username or '(anonymous)'!r} may not write to topic {topic!r}"
            ) from None
        except (TimeoutError, KafkaError, OSError) as exc:
            raise self.error(exc, f"cannot look up topic {topic!r}: {exc!r}") from exc
        self._known_topics.add(topic)

    # ------------------------------------------------------------------ publishing

    def _down(self, exc: BaseException) -> None:
        """A connection-type failure: refuse new batches until the probe reaches the broker again."""
        if self.error_type(exc) is BrokerUnavailable:
            self._readiness.down(repr(exc))

    async def publish(self, batch: Sequence[Message], acks: Acks) -> None:
        producer = self._producer
        if producer is None or not self._readiness.is_up:
            # Nothing is handed over while the broker is away: records queued now would only pile up
            # in the client (the delivery stage re-sends them anyway) and come out as duplicates.
            reason = "not connected" if producer is None else f"broker {self.cfg.address} unreachable"
            raise BrokerUnavailable(f"kafka: {reason}", broker=self.broker)
        try:
            for topic in dict.fromkeys(m.subject for m in batch):
                if topic not in self._known_topics:
                    await self._ensure_topic(topic)
        except PublishError as exc:
            self._readiness.down(exc)
            raise
        acks.on_timeout(self._timed_out)
        if all(hasattr(producer, name) for name in ("create_batch", "send_batch", "_partitioner")):
            await self._send_bulk(producer, batch, acks)
        else:
            await self._send_each(producer, batch, acks)

    def _timed_out(self) -> None:
        self._readiness.down(f"no acknowledgement within {self.ack_timeout:g}s")

    def _settle_on(
        self, acks: Acks, batch: Sequence[Message], indices: list[int], parts: dict[int, int]
    ) -> Callable[[Any], None]:
        """The done-callback of a record batch's future: settles the events it holds. ``parts``: events whose
        records (the event and its tombstone) went out in more than one record batch -> how many are not
        acknowledged yet; such an event is acknowledged with the last of them (and fails with the first failure)."""

        def done(future: Any) -> None:
            if future.cancelled():
                exc: BaseException | None = asyncio.CancelledError()
            else:
                exc = future.exception()
            if exc is None:
                self._readiness.up()
                for index in indices:
                    if parts.get(index, 1) > 1:
                        parts[index] -= 1
                        continue
                    acks.settle(index)
                return
            for index in indices:
                acks.settle(index, self._failure(batch[index], exc))

        return done

    def _failure(self, message: Message, exc: BaseException) -> PublishError:
        if isinstance(exc, PublishError):
            return exc
        if self.error_type(exc) is MessageTooLarge:
            return self._oversized(message, exc)
        self._down(exc)
        return self.error(exc, f"{message.subject!r} not acknowledged: {exc!r}")

    def _headers(self, message: Message) -> list[tuple[str, bytes]]:
        """The record headers: :meth:`Message.attributes`, encoded (the repeating part cached)."""
        if message.headers or message.content_type:
            return [(k, v.encode()) for k, v in message.attributes().items()]
        key = (message.schema, message.table, message.action)
        tail = self._header_tails.get(key)
        if tail is None:
            tail = (("schema", message.schema.encode()), ("table", message.table.encode()),
                    ("action", message.action.encode()))
            if len(self._header_tails) < 10000:
                self._header_tails[key] = tail
        return [("id", message.id.encode()), *tail]

    async def _send_bulk(self, producer: Any, batch: Sequence[Message], acks: Acks) -> None:
        """Append the batch's records, in order, to record batches of their partition (``create_batch``)
        and hand those over with ``send_batch``: one future per record batch instead of one per event,
        no per-event metadata lookups. Partitions are chosen as ``producer.send`` chooses them."""
        cluster = producer.client.cluster
        partitioner = producer._partitioner
        layouts: dict[str, tuple[list[int], list[int]]] = {}
        stop = len(batch)  # the first message that cannot be handed over: nothing after it is
        error: PublishError | None = None
        for index, message in enumerate(batch):
            topic = message.subject
            if topic in layouts:
                continue
            try:
                partitions = await producer.partitions_for(topic)  # the cached metadata, or waits for it
            except (TimeoutError, KafkaError, OSError) as exc:
                error = self._not_queued(topic, exc)
                stop = index
                break
            layouts[topic] = (list(partitions), list(cluster.available_partitions_for_topic(topic) or ()))

        open_batches: dict[tuple[str, int], _Records] = {}
        in_order: list[_Records] = []
        parts: dict[int, int] = {}  # see _settle_on

        def append(topic: str, partition: int, key: bytes | None, value: bytes | None,
                   headers: list[tuple[str, bytes]], index: int) -> _Records:
            """One record at the end of its partition's open record batch."""
            records = open_batches.get((topic, partition))
            if records is None or records.builder.append(timestamp=None, key=key, value=value, headers=headers) is None:
                # full (or the first of its partition): a new record batch, which takes at least one record
                records = open_batches[topic, partition] = _Records(topic, partition, producer.create_batch())
                in_order.append(records)
                records.builder.append(timestamp=None, key=key, value=value, headers=headers)
            if not records.indices or records.indices[-1] != index:
                records.indices.append(index)
            return records

        for index in range(stop):
            message = batch[index]
            topic, key, body = message.subject, message.key, message.body
            every, available = layouts[topic]
            partition = every[0] if len(every) == 1 else partitioner(key, every, available)
            headers = self._headers(message)
            # producer.send's own check; only a body of half the limit or more can fail it
            if len(body) > self._max_request // 2:
                size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, body, headers)
                if size > self._max_request:
                    acks.settle(index, self._oversized(message, MessageSizeTooLargeError(
                        f"The message is {size} bytes when serialized which is larger than the maximum request "
                        "size you have configured with the max_request_size configuration")))
                    continue
            records = append(topic, partition, key, body, headers, index)
            if message.tombstone and append(topic, partition, key, None, [], index) is not records:
                parts[index] = 2  # the tombstone opened the partition's next record batch

        for records in in_order:
            if error is None:
                records.builder.close()  # complete: no lingering for more records, it goes out at once
                try:
                    future = await producer.send_batch(records.builder, records.topic, partition=records.partition)
                except (TimeoutError, KafkaError, OSError) as exc:
                    # Do not hand over anything after a record batch that was not taken: it would overtake it.
                    error = self._not_queued(records.topic, exc)
                else:
                    future.add_done_callback(self._settle_on(acks, batch, records.indices, parts))
                    continue
            for index in records.indices:
                acks.settle(index, error)
        for index in range(stop, len(batch)):
            acks.settle(index, error)

    def _not_queued(self, topic: str, exc: BaseException) -> PublishError:
        self._down(exc)
        if isinstance(exc, UnknownTopicOrPartitionError):
            self._known_topics.discard(topic)  # look it up (or create it) again
        return self.error(exc, f"could not queue the event for {topic!r}: {exc!r}")

    async def _send_each(self, producer: Any, batch: Sequence[Message], acks: Acks) -> None:
        """One ``producer.send`` per record: for an aiokafka without the batch interface."""
        parts: dict[int, int] = {}  # see _settle_on
        for index, message in enumerate(batch):
            records: list[tuple[bytes | None, list[tuple[str, bytes]]]] = [(message.body, self._headers(message))]
            if message.tombstone:
                records.append((None, []))
                parts[index] = 2
            for value, headers in records:
                try:
                    future = await producer.send(message.subject, value, key=message.key, headers=headers)
                except (TimeoutError, KafkaError, OSError) as exc:
                    if self.error_type(exc) is MessageTooLarge:
                        acks.settle(index, self._oversized(message, exc))
                        break
                    # Do not hand over anything after a message that was not taken: it would overtake it.
                    error = self._not_queued(message.subject, exc)
                    for rest in range(index, len(batch)):
                        acks.settle(rest, error)
                    return
                future.add_done_callback(self._settle_on(acks, batch, [index], parts))

    def _oversized(self, message: Message, exc: BaseException) -> PublishError:
        return self.too_large(message, len(message.body), self._max_request,
                              "what the broker or the max request size accepts", str(exc))


class _Records:
    """A record batch being filled for one partition, and which events of the batch it holds."""

    __slots__ = ("builder", "indices", "partition", "topic")

    def __init__(self, topic: str, partition: int, builder: Any) -> None:
        self.topic = topic
        self.partition = partition
        self.builder = builder
        self.indices: list[int] = []
