"""Google Cloud Pub/Sub publisher (google-cloud-pubsub), also against the emulator.

How acknowledgements are collected: the client is thread based. ``send`` calls
``PublisherClient.publish`` for every message of the batch, in order, from the event loop (the call
only appends to the client's in-memory batch; the RPCs run in the client's own threads). Each
returned ``concurrent.futures`` future gets a done-callback that stores its outcome in one
per-batch record; when the last one is in, the record wakes the event loop once with
``loop.call_soon_threadsafe``. So the loop is never blocked and there is one cross-thread wake-up
per batch, not one per message. ``None`` in the results means Pub/Sub returned a message id for it.
A batch's results are in after ``listener.ackTimeout`` at the latest (the client's own retries stop
then too); what has no result by then is a :class:`PublishError`, sent again by the delivery stage.

Reconnects are gRPC's own. A failure that means "unreachable" marks the publisher not ready; until a
cheap probe RPC (every few seconds) answers again, ``send`` fails new batches at once instead of
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
:class:`BrokerConfigError` naming it (raised by ``send`` before anything of the batch is sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import threading
from collections.abc import Awaitable, Sequence
from typing import Any

from google.api_core import exceptions as gexc
from google.api_core.retry import Retry, if_exception_type
from google.cloud import pubsub_v1
from google.cloud.pubsub_v1.publisher.exceptions import (
    MessageTooLargeError,
    PublishToPausedOrderingKeyException,
)

from listener.config import PublisherConfig
from listener.errors import BrokerConfigError, PermanentPublishError, PublishError
from listener.metrics import OVERSIZED
from listener.publishers.base import AckResults, Message, Publisher

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


class _AckTimeout(PublishError):
    """No result within ``listener.ackTimeout``."""


# outcomes that mean "Pub/Sub cannot be reached right now"
_TRANSIENT = (*_RETRYABLE, gexc.RetryError, _AckTimeout)


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


class _BatchAcks:
    """Outcomes of one batch, filled from the client's threads; resolves one asyncio future."""

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int) -> None:
        self.loop = loop
        self.outcomes: list[BaseException | None] = [None] * size
        self.settled = [False] * size
        self.remaining = size
        self.closed = False
        self.lock = threading.Lock()
        self.future: asyncio.Future[None] = loop.create_future()
        if size == 0:
            self.future.set_result(None)

    def settle(self, index: int, outcome: BaseException | None) -> None:
        with self.lock:
            if self.closed or self.settled[index]:
                return
            self.outcomes[index] = outcome
            self.settled[index] = True
            self.remaining -= 1
            last = self.remaining == 0
        if last:
            self.loop.call_soon_threadsafe(self._finish)

    def expire(self, error: BaseException) -> None:
        """The deadline passed: every message still waiting gets ``error``; later outcomes are ignored."""
        with self.lock:
            self.closed = True
            for index, settled in enumerate(self.settled):
                if not settled:
                    self.outcomes[index] = error
                    self.settled[index] = True

    def _finish(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


class PubSubPublisher(Publisher):
    """Publishes each event to the Pub/Sub topic of its subject in ``publisher.pubSubProjectID``."""

    def __init__(
        self,
        cfg: PublisherConfig,
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
        self._ready = False
        self._probe: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Future[None]] = set()
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
        self._ready = True
        self._probe = asyncio.create_task(self._probe_loop(), name="pubsub-probe")
        where = os.environ.get("PUBSUB_EMULATOR_HOST") or "pubsub.googleapis.com"
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
        except (gexc.GoogleAPICallError, gexc.RetryError, OSError) as exc:
            raise PublishError(f"pubsub: cannot reach {where}: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            raise PublishError(f"pubsub: cannot reach {where}: {type(exc).__name__}: {exc}") from exc

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self._probe_interval)
            client = self._client
            if client is None:
                return
            try:
                await self._check_project(client)
            except PublishError:
                if self._ready:
                    log.warning("pubsub: unreachable")
                self._ready = False
            except BrokerConfigError:
                self._ready = False
            else:
                if not self._ready:
                    log.info("pubsub: reachable again")
                self._ready = True

    @staticmethod
    def _shutdown(client: Any) -> None:
        with contextlib.suppress(Exception):
            client.stop()  # commits what is batched; results arrive on the futures
        transport = getattr(client, "transport", None) or getattr(getattr(client, "api", None), "transport", None)
        if transport is not None:
            with contextlib.suppress(Exception):
                transport.close()

    async def close(self) -> None:
        self._ready = False
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
            self._probe = None
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
        return self._client is not None and self._ready

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
            raise PublishError(f"pubsub: cannot look up topic {path}: {type(exc).__name__}: {exc}") from exc
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

    async def send(self, batch: Sequence[Message]) -> Awaitable[AckResults]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ack_timeout
        acks = _BatchAcks(loop, len(batch))
        no_keys = [""] * len(batch)
        client = self._client
        if client is None or not self._ready:
            # Nothing is handed over while Pub/Sub is away: the client would keep retrying it and the
            # delivery stage re-sends it anyway, so it would only come out twice.
            reason = "not connected" if client is None else "unreachable"
            for index in range(len(batch)):
                acks.settle(index, PublishError(f"pubsub: {reason}"))
            return asyncio.ensure_future(self._results(acks, batch, no_keys, deadline))
        paths = {subject: self.topic_path(subject) for subject in dict.fromkeys(m.subject for m in batch)}
        try:
            for path in paths.values():
                if path not in self._known_topics:
                    await self._ensure_topic(path)
        except PublishError as exc:
            self._ready = False
            for index in range(len(batch)):
                acks.settle(index, exc)
            return asyncio.ensure_future(self._results(acks, batch, no_keys, deadline))

        keys: list[str] = []
        for index, message in enumerate(batch):
            path = paths[message.subject]
            key = ordering_key(message.key) if self.cfg.enable_ordering else ""
            keys.append(key)
            if len(message.body) > MAX_MESSAGE_BYTES:
                acks.settle(index, self._oversized(message))
                continue
            self._seq += 1
            seq = self._seq
            if key:
                refused = self._gate(path, key, message.id)
                if refused is not None:
                    acks.settle(index, refused)
                    continue
            try:
                future = client.publish(path, message.body, ordering_key=key, **message.attributes())
            except MessageTooLargeError:
                acks.settle(index, self._oversized(message))
                continue
            except Exception as exc:
                acks.settle(index, PublishError(f"pubsub: cannot publish event {message.id}: {exc!r}"))
                continue
            future.add_done_callback(self._callback(acks, index, path, key, seq, message.id))
        return asyncio.ensure_future(self._results(acks, batch, keys, deadline))

    def _gate(self, path: str, key: str, event_id: str) -> PublishError | None:
        """None: send it (resuming the key when this is the message the key waits for); else refuse."""
        with self._paused_lock:
            paused = self._paused.get((path, key))
            if paused is None:
                return None
            if paused[1] != event_id:
                return PublishError(
                    f"pubsub: ordering key {key!r} of {path} is paused until event {paused[1]} is sent again"
                )
            del self._paused[(path, key)]
        self._client.resume_publish(path, key)
        log.info("pubsub: resumed ordering key %r of %s", key, path)
        return None

    def _callback(self, acks: _BatchAcks, index: int, path: str, key: str, seq: int, event_id: str) -> Any:
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
            acks.settle(index, exc)

        return done

    def _unreachable(self, outcome: BaseException) -> None:
        if self._ready:
            log.warning("pubsub: publish failed (%s); holding new batches until Pub/Sub answers again", outcome)
            self._ready = False

    def _oversized(self, message: Message) -> PermanentPublishError:
        OVERSIZED.labels(message.table).inc()
        return PermanentPublishError(
            f"pubsub: event {message.id} of {message.schema}.{message.table} is {len(message.body)} bytes; "
            f"Pub/Sub accepts at most {MAX_MESSAGE_BYTES} bytes per message"
        )

    async def _results(
        self, acks: _BatchAcks, batch: Sequence[Message], keys: list[str], deadline: float
    ) -> AckResults:
        self._pending.add(acks.future)
        try:
            timeout = max(0.0, deadline - asyncio.get_running_loop().time())
            await asyncio.wait_for(asyncio.shield(acks.future), timeout)
        except TimeoutError:
            acks.expire(_AckTimeout(f"pubsub: no publish result within {self.ack_timeout:g}s"))
        finally:
            self._pending.discard(acks.future)
        results: AckResults = []
        ok = False
        for message, key, outcome in zip(batch, keys, acks.outcomes, strict=True):
            if outcome is None:
                ok = True
                results.append(None)
            elif isinstance(outcome, PublishError):
                if isinstance(outcome, _AckTimeout):
                    self._unreachable(outcome)
                results.append(outcome)
            elif isinstance(outcome, PublishToPausedOrderingKeyException):
                results.append(
                    PublishError(f"pubsub: ordering key {key!r} is paused after an earlier failure; event {message.id}")
                )
            else:
                if isinstance(outcome, _TRANSIENT):
                    self._unreachable(outcome)
                if isinstance(outcome, gexc.NotFound):
                    self._known_topics.discard(self.topic_path(message.subject))  # check it again next time
                detail = getattr(outcome, "message", None) or str(outcome) or type(outcome).__name__
                results.append(
                    PublishError(f"pubsub: event {message.id} not published: {type(outcome).__name__}: {detail}")
                )
        if ok:
            self._ready = True
        return results
