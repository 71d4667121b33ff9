"""Google Cloud Pub/Sub publisher (google-cloud-pubsub), also against the emulator.

How acknowledgements are collected: the client is thread based. ``publish`` calls
``PublisherClient.publish`` for every message of the batch, in order, from the event loop (the call
only appends to the client's in-memory batch; the RPCs run in the client's own threads). Each
returned ``concurrent.futures`` future gets a done-callback that stores its outcome in one
per-batch relay; when the last one is in, the relay wakes the event loop once with
``loop.call_soon_threadsafe`` and the outcomes are settled on the batch's tracker there. So the loop
is never blocked and there is one cross-thread wake-up per batch, not one per message. ``None`` in
the results means Pub/Sub returned a message id for it. The client's own retries stop after
``listener.ackTimeout``; what has no result when the delivery stage's deadline passes fails with
:class:`AckTimeout` (the outcomes in by then are handed over first) and is sent again.

Reconnects are gRPC's own. A failure that means "unreachable" marks the publisher not ready; until a
cheap probe RPC (every few seconds) answers again, ``publish`` fails new batches at once instead of
queueing them in the client.

Ordering (``publisher.enableOrdering``): the row key becomes the ordering key, so Pub/Sub delivers
the changes of one row in commit order to subscriptions with message ordering on. The client
retries a failed publish of an ordered message without a deadline; when it gives up anyway
(a non-retryable error such as a deleted topic) it pauses that ordering key and fails the message
and every later one of the same key. This publisher remembers the first message that failed per
key and refuses (with :class:`PublishError`, without sending) every message of that key until that
message is sent again; then it calls ``resume_publish`` and sends it. So a key's events never reach
Pub/Sub out of order, whatever order the delivery stage re-sends them in.

Topics: each subject maps to a topic id (see :func:`topic_id`). A topic is checked once, when the
first event for it is sent: missing and ``createTopics: true`` → created; missing otherwise →
:class:`BrokerConfigError` naming it (raised by ``publish`` before anything of the batch is sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

from google.api_core import exceptions as gexc
from google.api_core.retry import Retry, if_exception_type
from google.cloud import pubsub_v1
from google.cloud.pubsub_v1.publisher.exceptions import (
    MessageTooLargeError,
    PublishToPausedOrderingKeyException,
)

from listener.config import GooglePubSubPublisherConfig
from listener.delivery import Acks
from listener.errors import BrokerConfigError, BrokerUnavailable, MessageRejected, MessageTooLarge, PublishError
from listener.message import Message
from listener.publishers.base import Publisher, Readiness

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 10_000_000  # Pub/Sub's limit for one message (and one publish request)
MAX_ORDERING_KEY_BYTES = 1024
_TOPIC_CHARS = re.compile(r"[A-Za-z0-9\-_.~+]")
# errors the client retries (the same set as the generated client's default for Publish)
_RETRYABLE = (
    gexc.Aborted,
    gexc.Cancelled,
    gexc.DeadlineExceeded,
    gexc.InternalServerError,
    gexc.ResourceExhausted,
    gexc.ServiceUnavailable,
    gexc.Unknown,
)


def topic_id(subject: str) -> str:
    """The Pub/Sub topic id of a topic name.

    Letters, digits and ``- _ . ~ +`` are kept; every other character (``%`` included) becomes
    ``%XX`` per UTF-8 byte, so different names never map to one topic. The result must start with a
    letter, must not start with ``goog`` and must be 3-255 characters long, else
    :class:`BrokerConfigError`.
    """
    encoded = "".join(ch if _TOPIC_CHARS.fullmatch(ch) else "".join(f"%{b:02X}" for b in ch.encode()) for ch in subject)
    if not encoded[:1].isascii() or not encoded[:1].isalpha():
        raise BrokerConfigError(
            f"pubsub: topic name {subject!r} must start with a letter (Pub/Sub topic ids do); "
            "change publisher.topic or map the table with listener.topicsMap"
        )
    if encoded.lower().startswith("goog"):
        raise BrokerConfigError(f"pubsub: topic name {subject!r} may not start with 'goog' in Pub/Sub")
    if not 3 <= len(encoded) <= 255:
        raise BrokerConfigError(
            f"pubsub: topic name {subject!r} becomes topic id {encoded!r}, which is not 3-255 characters; "
            "change publisher.topic or map the table with listener.topicsMap"
        )
    return encoded


def ordering_key(key: bytes | None) -> str:
    """The Pub/Sub ordering key of a row key: its text, or ``sha256:<hex>`` when it is not UTF-8 or
    longer than Pub/Sub's 1024 bytes (the same row always gets the same ordering key)."""
    if not key:
        return ""
    if len(key) <= MAX_ORDERING_KEY_BYTES:
        try:
            return key.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return "sha256:" + hashlib.sha256(key).hexdigest()


Outcomes = list[tuple[int, BaseException | None]]


class _Relay:
    """Outcomes of one batch's messages, put from the client's threads (or the event loop) and handed
    to ``hand_over`` on the event loop: all in one go when the last one is in, or what is in so far
    when :meth:`flush` is called (the delivery stage's deadline passed)."""

    __slots__ = ("hand_over", "items", "left", "lock", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int, hand_over: Callable[[Outcomes], None]) -> None:
        self.loop = loop
        self.hand_over = hand_over
        self.items: Outcomes = []
        self.left = size
        self.lock = threading.Lock()

    def put(self, index: int, outcome: BaseException | None) -> None:
        with self.lock:
            self.items.append((index, outcome))
            self.left -= 1
            last = self.left == 0
        if last:
            self.loop.call_soon_threadsafe(self.flush)

    def flush(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        if items:
            self.hand_over(items)


class PubSubPublisher(Publisher[GooglePubSubPublisherConfig]):
    """Publishes each event to the Pub/Sub topic of its subject in ``publisher.pubSubProjectID``."""

    broker = "pubsub"
    errors = (
        (MessageTooLargeError, MessageTooLarge),
        ((*_RETRYABLE, gexc.RetryError, OSError), BrokerUnavailable),  # Pub/Sub cannot be reached right now
        ((gexc.NotFound, gexc.PermissionDenied, gexc.InvalidArgument, gexc.FailedPrecondition), MessageRejected),
    )

    def __init__(
        self,
        cfg: GooglePubSubPublisherConfig,
        ack_timeout: float = 10.0,
        *,
        rpc_timeout: float = 10.0,
        probe_interval: float = 5.0,
    ) -> None:
        super().__init__(cfg, ack_timeout)
        if not cfg.pub_sub_project_id:
            raise BrokerConfigError("pubsub: publisher.pubSubProjectID is required for publisher.type google_pubsub")
        self.needs_key = cfg.enable_ordering
        self._project = cfg.pub_sub_project_id
        self._rpc_timeout = rpc_timeout
        self._probe_interval = probe_interval
        self._client: Any = None
        self._known_topics: set[str] = set()
        self._readiness = Readiness(self.broker, "Pub/Sub", log)
        self._pending: set[asyncio.Future[Any]] = set()  # the batches (trackers) waiting for results
        # ordering: (topic path, ordering key) -> (sequence number, event id) of the first failed message
        self._paused: dict[tuple[str, str], tuple[int, str]] = {}
        self._paused_lock = threading.Lock()
        self._seq = 0

    # ------------------------------------------------------------------ lifecycle

    def _make_client(self) -> Any:
        cfg = self.cfg
        retry = Retry(
            initial=0.1,
            maximum=5.0,
            multiplier=2.0,
            predicate=if_exception_type(*_RETRYABLE),
            timeout=max(self.ack_timeout, 1.0),  # give up about when the delivery stage stops waiting
        )
        return pubsub_v1.PublisherClient(
            client_options={"api_endpoint": cfg.address} if cfg.address else None,
            batch_settings=pubsub_v1.types.BatchSettings(
                max_bytes=9_000_000,  # below the 10 MB request limit, few large requests
                max_latency=max(cfg.linger_ms, 1) / 1000,
                max_messages=1000,  # Pub/Sub's limit per publish request
            ),
            publisher_options=pubsub_v1.types.PublisherOptions(
                enable_message_ordering=cfg.enable_ordering,
                retry=retry,
                timeout=max(self.ack_timeout, 1.0),
            ),
        )

    async def connect(self) -> None:
        if self._client is not None:
            return
        try:
            client = await asyncio.to_thread(self._make_client)
        except Exception as exc:
            raise BrokerConfigError(
                f"pubsub: cannot create the client ({type(exc).__name__}: {exc}); set "
                "GOOGLE_APPLICATION_CREDENTIALS, or PUBSUB_EMULATOR_HOST for the emulator"
            ) from exc
        try:
            await self._check_project(client)
        except BaseException:
            await asyncio.to_thread(self._shutdown, client)
            raise
        self._client = client
        where = os.environ.get("PUBSUB_EMULATOR_HOST") or self.cfg.address or "pubsub.googleapis.com"
        self._readiness.where = where
        self._readiness.start(self._probe, self._probe_interval)
        log.info("pubsub: connected to %s, project %s", where, self._project)

    async def _check_project(self, client: Any) -> None:
        """One cheap RPC: reachable? project known? (A missing list permission is fine.)"""
        where = os.environ.get("PUBSUB_EMULATOR_HOST") or "Pub/Sub"

        def probe() -> None:
            pager = client.list_topics(
                request={"project": f"projects/{self._project}", "page_size": 1},
                retry=None,
                timeout=self._rpc_timeout,
            )
            next(iter(pager.pages), None)

        try:
            await asyncio.to_thread(probe)
        except gexc.PermissionDenied:
            return
        except gexc.NotFound as exc:
            raise BrokerConfigError(f"pubsub: project {self._project!r} (publisher.pubSubProjectID) not found") from exc
        except (gexc.InvalidArgument, gexc.Unauthenticated) as exc:
            raise BrokerConfigError(
                f"pubsub: project {self._project!r} refused: {exc.message or type(exc).__name__}"
            ) from exc
        except Exception as exc:
            raise BrokerUnavailable(f"pubsub: cannot reach {where}: {type(exc).__name__}: {exc}",
                                    broker=self.broker) from exc

    async def _probe(self) -> None:
        """The readiness probe: the project check again."""
        client = self._client
        if client is not None:
            await self._check_project(client)

    @staticmethod
    def _shutdown(client: Any) -> None:
        with contextlib.suppress(Exception):
            client.stop()  # commits what is batched; results arrive on the futures
        transport = getattr(client, "transport", None) or getattr(getattr(client, "api", None), "transport", None)
        if transport is not None:
            with contextlib.suppress(Exception):
                transport.close()

    async def close(self) -> None:
        await self._readiness.stop()
        client, self._client = self._client, None
        if client is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.to_thread(client.stop)  # commits what is batched
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=self.ack_timeout)
        await asyncio.to_thread(self._shutdown, client)

    @property
    def ready(self) -> bool:
        return self._client is not None and self._readiness.is_up

    # ------------------------------------------------------------------ topics

    async def _ensure_topic(self, path: str) -> None:
        client = self._client
        create = self.cfg.create_topics

        def check() -> str:
            try:
                client.get_topic(request={"topic": path}, retry=None, timeout=self._rpc_timeout)
                return "exists"
            except gexc.NotFound:
                if not create:
                    return "missing"
            except gexc.PermissionDenied:
                return "unknown"  # may publish without topics.get; a missing topic shows on publish
            try:
                client.create_topic(request={"name": path}, retry=None, timeout=self._rpc_timeout)
                return "created"
            except gexc.AlreadyExists:
                return "exists"

        try:
            state = await asyncio.to_thread(check)
        except (gexc.PermissionDenied, gexc.InvalidArgument) as exc:
            raise BrokerConfigError(f"pubsub: cannot create topic {path}: {exc.message or exc}") from exc
        except Exception as exc:
            raise self.error(exc, f"cannot look up topic {path}: {type(exc).__name__}: {exc}") from exc
        if state == "missing":
            raise BrokerConfigError(
                f"pubsub: topic {path} does not exist; create it or set publisher.createTopics: true"
            )
        if state == "created":
            log.info("pubsub: created topic %s", path)
        self._known_topics.add(path)

    def topic_path(self, subject: str) -> str:
        return f"projects/{self._project}/topics/{topic_id(subject)}"

    # ------------------------------------------------------------------ publishing

    async def publish(self, batch: Sequence[Message], acks: Acks) -> None:
        client = self._client
        if client is None or not self._readiness.is_up:
            # Nothing is handed over while Pub/Sub is away: the client would keep retrying it and the
            # delivery stage re-sends it anyway, so it would only come out twice.
            raise BrokerUnavailable(f"pubsub: {'not connected' if client is None else 'unreachable'}",
                                    broker=self.broker)
        paths = {subject: self.topic_path(subject) for subject in dict.fromkeys(m.subject for m in batch)}
        try:
            for path in paths.values():
                if path not in self._known_topics:
                    await self._ensure_topic(path)
        except PublishError as exc:
            self._readiness.down(exc)
            raise

        keys: list[str] = []
        relay = _Relay(asyncio.get_running_loop(), len(batch),
                       lambda outcomes: self._hand_over(acks, batch, keys, outcomes))
        self._pending.add(acks.future)  # close() lets the results of what is handed over arrive
        acks.add_done_callback(lambda done: self._pending.discard(done.future))
        acks.on_timeout(lambda: self._timed_out(acks, relay))
        for index, message in enumerate(batch):
            path = paths[message.subject]
            key = ordering_key(message.key) if self.cfg.enable_ordering else ""
            keys.append(key)
            if len(message.body) > MAX_MESSAGE_BYTES:
                relay.put(index, self._oversized(message))
                continue
            self._seq += 1
            seq = self._seq
            if key:
                refused = self._gate(path, key, message.id)
                if refused is not None:
                    relay.put(index, refused)
                    continue
            try:
                future = client.publish(path, message.body, ordering_key=key, **message.attributes())
            except Exception as exc:
                relay.put(index, exc)
                continue
            future.add_done_callback(self._callback(relay, index, path, key, seq, message.id))

    def _hand_over(self, acks: Acks, batch: Sequence[Message], keys: list[str], outcomes: Outcomes) -> None:
        """Settle what the relay collected (on the event loop)."""
        ok = False
        for index, outcome in outcomes:
            if outcome is None:
                ok = True
                acks.settle(index)
            else:
                acks.settle(index, self._failure(batch[index], keys[index], outcome))
        if ok:
            self._readiness.up()

    def _timed_out(self, acks: Acks, relay: _Relay) -> None:
        relay.flush()  # what is in by now counts
        if not acks.done:
            self._readiness.down(f"no publish result within {self.ack_timeout:g}s")

    def _failure(self, message: Message, key: str, outcome: BaseException) -> PublishError:
        if isinstance(outcome, PublishError):
            return outcome
        if isinstance(outcome, PublishToPausedOrderingKeyException):
            return PublishError(f"pubsub: ordering key {key!r} is paused after an earlier failure; event {message.id}",
                                broker=self.broker)
        kind = self.error_type(outcome)
        if kind is MessageTooLarge:
            return self._oversized(message)
        if kind is BrokerUnavailable:
            self._readiness.down(f"publish failed: {type(outcome).__name__}")
        if isinstance(outcome, gexc.NotFound):
            self._known_topics.discard(self.topic_path(message.subject))  # check it again next time
        detail = getattr(outcome, "message", None) or str(outcome) or type(outcome).__name__
        return self.error(outcome, f"event {message.id} not published: {type(outcome).__name__}: {detail}")

    def _gate(self, path: str, key: str, event_id: str) -> PublishError | None:
        """None: send it (resuming the key when this is the message the key waits for); else refuse."""
        with self._paused_lock:
            paused = self._paused.get((path, key))
            if paused is None:
                return None
            if paused[1] != event_id:
                return PublishError(
                    f"pubsub: ordering key {key!r} of {path} is paused until event {paused[1]} is sent again",
                    broker=self.broker,
                )
            del self._paused[(path, key)]
        self._client.resume_publish(path, key)
        log.info("pubsub: resumed ordering key %r of %s", key, path)
        return None

    def _callback(self, relay: _Relay, index: int, path: str, key: str, seq: int, event_id: str) -> Any:
        def done(future: Any) -> None:  # runs in a client thread (or right away when already done)
            try:
                exc = future.exception()
            except BaseException as cancelled:
                exc = cancelled
            if exc is not None and key and not isinstance(exc, PublishToPausedOrderingKeyException):
                with self._paused_lock:
                    paused = self._paused.get((path, key))
                    if paused is None or seq < paused[0]:
                        self._paused[(path, key)] = (seq, event_id)
            relay.put(index, exc)

        return done

    def _oversized(self, message: Message) -> PublishError:
        return self.too_large(message, len(message.body), MAX_MESSAGE_BYTES, "Pub/Sub's limit per message")
