"""Google Cloud Pub/Sub publisher: batched ``Publish`` RPCs over one gRPC channel, also to the emulator.

The lean path: no Google client library on the way, no threads of ours. Each event is encoded by hand
into its ``PubsubMessage`` protobuf bytes (:class:`Encoder`: data, the attributes map, the ordering key)
and the events of a batch are packed into ``PublishRequest`` bytes (topic + up to 1000 messages /
9 MB). Each request is one raw unary call ``/google.pubsub.v1.Publisher/Publish`` on a ``grpc.aio``
channel that sends bytes as they are (:class:`Rpc`), so gRPC only moves bytes; many requests are in
flight at once on that one HTTP/2 connection, and their answers come back on the event loop.

Delivery: a message counts as published only when Pub/Sub's ``PublishResponse`` returned a message id
for it (one id per message of the request, in order); only then is it settled on its batch's
:class:`~listener.delivery.Acks` tracker, and the delivery stage confirms the LSN only after that. A
request failing with a transient status (``UNAVAILABLE``, ``RESOURCE_EXHAUSTED``, ``ABORTED``,
``INTERNAL``, ``UNKNOWN``) is sent again with backoff until ``listener.ackTimeout`` has passed since it
was first sent; any other failure fails its messages at once, as the type of its status (see
:meth:`PubSubPublisher.error_type`), and the delivery stage sends them again. What has no result when
the delivery stage's deadline passes fails with :class:`~listener.errors.AckTimeout`.

Reachability: gRPC reconnects by itself (backoff capped at a few seconds). A failure that means
"unreachable" marks the publisher not ready; until a cheap probe RPC (``ListTopics``, every few
seconds) answers again, ``publish`` fails new batches at once instead of queueing them.

Ordering (``publisher.enableOrdering``): the row key becomes the ordering key. Pub/Sub wants every
message of one request to have the same ordering key, and keeps the order of one key only when its
requests do not overlap, so each (topic, ordering key) has a :class:`KeyQueue`: its messages, in the
order they were handed over, go out in requests of that key only, one request at a time. When one
fails for good, or one of its messages timed out before it was sent, the key is paused: the publisher
remembers the first message that failed and refuses (with :class:`PublishError`, without sending) every
message of that key until that message is sent again; then the key resumes with it. So a key's events
never reach Pub/Sub out of order, whatever order the delivery stage re-sends them in. Events without an
ordering key (TRUNCATE) take the unordered path.

Topics: each subject maps to a topic id (see :func:`topic_id`). A topic is checked once, when the
first event for it is sent (raw ``GetTopic``/``CreateTopic`` on the same channel): missing and
``createTopics: true`` → created; missing otherwise → :class:`BrokerConfigError` naming it (raised by
``publish`` before anything of the batch is sent).

Where it connects: ``PUBSUB_EMULATOR_HOST`` set → that host, plaintext, no credentials. Otherwise
``publisher.address`` (default ``pubsub.googleapis.com:443``) over TLS with Application Default
Credentials (``google.auth.default()``; the OAuth token is added to every call by google-auth's gRPC
metadata plugin, with google-api-core's channel helper, as the Google client library does).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import urllib.parse
from collections import deque
from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio

from listener.config import GooglePubSubPublisherConfig
from listener.delivery import Acks
from listener.errors import BrokerConfigError, BrokerUnavailable, MessageRejected, PublishError
from listener.message import Message
from listener.publishers.base import Publisher, Readiness

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 10_000_000  # Pub/Sub's limit for one message (and one publish request)
MAX_REQUEST_MESSAGES = 1000  # Pub/Sub's limit of messages per publish request
REQUEST_BYTES = 9_000_000  # requests are packed up to this size (below the 10 MB limit); a bigger message goes alone
MAX_ORDERING_KEY_BYTES = 1024
DEFAULT_ENDPOINT = "pubsub.googleapis.com:443"
SCOPES = ("https://www.googleapis.com/auth/cloud-platform", "https://www.googleapis.com/auth/pubsub")
_SERVICE = "/google.pubsub.v1.Publisher/"
_TOPIC_CHARS = re.compile(r"[A-Za-z0-9\-_.~+]")
_CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.keepalive_time_ms", 30_000),  # as the Google client: notice a dead connection under load
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 3_000),  # back soon after Pub/Sub is (gRPC's default: 2 min)
)
#: statuses sent again (the Google client's default retry set for Publish, minus CANCELLED/DEADLINE_EXCEEDED)
_TRANSIENT = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
})  # fmt: skip
#: status -> our error type (anything else: a plain PublishError)
_KINDS: dict[grpc.StatusCode, type[PublishError]] = {
    **dict.fromkeys((*_TRANSIENT, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED), BrokerUnavailable),
    **dict.fromkeys(
        (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT,
         grpc.StatusCode.FAILED_PRECONDITION),
        MessageRejected,
    ),
}


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


# ---------------------------------------------------------------------------------------------------
# protobuf by hand: the few messages this publisher sends and reads

_SMALL_VARINTS = [bytes((n,)) for n in range(128)]


def varint(n: int) -> bytes:
    """``n`` (>= 0) as a protobuf varint."""
    if n < 128:
        return _SMALL_VARINTS[n]
    out = bytearray()
    while n >= 128:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field(tag: bytes, value: bytes) -> bytes:
    """A length-delimited field: ``tag`` (one byte: number << 3 | 2), length, ``value``."""
    return tag + varint(len(value)) + value


def _attribute(key: str, value: str) -> bytes:
    """One entry of ``PubsubMessage.attributes`` (field 2, a map entry {key=1, value=2})."""
    return field(b"\x12", field(b"\x0a", key.encode()) + field(b"\x12", value.encode()))


def read_message_ids(response: bytes) -> int:
    """How many message ids a ``PublishResponse`` (``repeated string message_ids = 1``) holds."""
    count = position = 0
    end = len(response)
    while position < end:
        tag = response[position]
        length = response[position + 1]
        position += 2
        if length & 0x80:  # a longer varint
            length &= 0x7F
            shift = 7
            while True:
                byte = response[position]
                position += 1
                length |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    break
                shift += 7
        if tag == 0x0A:
            count += 1
        elif tag & 7 != 2:
            raise ValueError(f"unexpected field tag {tag} in a PublishResponse")
        position += length
    return count


class Encoder:
    """Turns events into ``PublishRequest.messages`` entries (field 2 of the request, ready to join).

    ``PubsubMessage``: data = 1 (the event body), attributes = 2 (``Message.attributes()``), ordering_key
    = 5. The schema/table/action attributes repeat from event to event and are encoded once each.
    """

    __slots__ = ("_fixed",)

    def __init__(self) -> None:
        self._fixed: dict[tuple[str, str, str], bytes] = {}

    def message(self, m: Message, key: bytes = b"") -> bytes:
        """The entry for ``m`` with ordering key ``key`` (UTF-8, empty: none)."""
        fixed = self._fixed.get((m.schema, m.table, m.action))
        if fixed is None:
            fixed = _attribute("schema", m.schema) + _attribute("table", m.table) + _attribute("action", m.action)
            if len(self._fixed) > 10_000:
                self._fixed.clear()
            self._fixed[(m.schema, m.table, m.action)] = fixed
        event_id = m.id.encode()
        size = len(event_id)
        if size < 120:  # the common case (a UUID): every length is one byte
            id_entry = b"\x12%c\x0a\x02id\x12%c%b" % (size + 6, size, event_id)
        else:
            id_entry = _attribute("id", m.id)
        body = m.body
        if m.headers or m.content_type:
            extra = b"".join(_attribute(k, v) for k, v in (m.headers or {}).items())
            if m.content_type:
                extra += _attribute("content-type", m.content_type)
            inner = b"".join((b"\x0a", varint(len(body)), body, id_entry, fixed, extra))
        else:
            inner = b"".join((b"\x0a", varint(len(body)), body, id_entry, fixed))
        if key:
            inner += field(b"\x2a", key)
        return b"\x12" + varint(len(inner)) + inner


def topic_field(path: str) -> bytes:
    """``PublishRequest.topic`` (field 1), the start of every request to ``path``."""
    return field(b"\x0a", path.encode())


# ---------------------------------------------------------------------------------------------------
# the channel


class Rpc:
    """One ``grpc.aio`` channel to Pub/Sub and raw unary calls on it (bytes in, bytes out).

    :meth:`open` picks the endpoint: ``PUBSUB_EMULATOR_HOST`` (plaintext, no credentials) or
    ``address`` over TLS with Application Default Credentials. :meth:`close` ends the channel.
    """

    def __init__(self, channel: grpc.aio.Channel, where: str, emulator: bool) -> None:
        self.channel = channel
        self.where = where
        self.emulator = emulator
        self._methods: dict[str, grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = {}

    @classmethod
    async def open(cls, address: str) -> Rpc:
        """The channel for this environment; :class:`BrokerConfigError` when there are no credentials."""
        emulator = os.environ.get("PUBSUB_EMULATOR_HOST", "")
        if emulator:
            return cls(grpc.aio.insecure_channel(emulator, options=_CHANNEL_OPTIONS), emulator, True)
        target = address or DEFAULT_ENDPOINT
        if ":" not in target.rsplit("]", 1)[-1]:
            target += ":443"
        import google.auth
        import google.auth.exceptions
        from google.api_core import grpc_helpers_async

        try:  # may ask the metadata server: not on the event loop
            credentials, _ = await asyncio.to_thread(google.auth.default, scopes=SCOPES)
        except google.auth.exceptions.GoogleAuthError as exc:
            raise BrokerConfigError(
                f"pubsub: no Google credentials ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                "set GOOGLE_APPLICATION_CREDENTIALS, or PUBSUB_EMULATOR_HOST for the emulator"
            ) from None
        channel = grpc_helpers_async.create_channel(
            target, credentials=credentials, default_scopes=SCOPES,
            default_host=DEFAULT_ENDPOINT.rsplit(":", 1)[0], options=list(_CHANNEL_OPTIONS),
        )  # fmt: skip
        return cls(channel, target, False)

    def method(self, name: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
        """The raw call of ``google.pubsub.v1.Publisher.<name>`` (no (de)serializers: bytes pass as they are)."""
        call = self._methods.get(name)
        if call is None:
            call = self._methods[name] = self.channel.unary_unary(_SERVICE + name)
        return call

    async def call(self, name: str, request: bytes, timeout: float, routing: str) -> bytes:
        """One call; ``routing`` is its ``x-goog-request-params`` (e.g. ``topic=projects/p/topics/t``).
        Raises ``grpc.aio.AioRpcError``."""
        response: bytes = await self.method(name)(request, timeout=timeout, metadata=routing_header(routing))
        return response

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.channel.close()


def routing_header(params: str) -> tuple[tuple[str, str], ...]:
    """The ``x-goog-request-params`` metadata of a call whose resource is ``name=value``."""
    name, _, value = params.partition("=")
    return (("x-goog-request-params", f"{name}={urllib.parse.quote(value, safe='/')}"),)


def status_name(exc: grpc.aio.AioRpcError) -> str:
    """``NOT_FOUND`` -> ``NotFound``."""
    return "".join(part.title() for part in exc.code().name.split("_"))


def describe(exc: BaseException) -> str:
    """``Status: details`` of a failed call, else ``Type: text``."""
    if isinstance(exc, grpc.aio.AioRpcError):
        details = (exc.details() or "").splitlines()
        return f"{status_name(exc)}: {details[0] if details else exc.code().name}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# ---------------------------------------------------------------------------------------------------
# the publisher

#: one message waiting in a key queue: its batch's tracker, its index there, its encoded entry, the event
Entry = tuple[Acks, int, bytes, Message]


class KeyQueue:
    """The messages of one (topic, ordering key) not yet sent, in order; ``busy`` while one task sends them."""

    __slots__ = ("busy", "entries")

    def __init__(self) -> None:
        self.entries: deque[Entry] = deque()
        self.busy = False


class PubSubPublisher(Publisher[GooglePubSubPublisherConfig]):
    """Publishes each event to the Pub/Sub topic of its subject in ``publisher.pubSubProjectID``."""

    broker = "pubsub"
    errors = ((OSError, BrokerUnavailable),)  # gRPC statuses: see error_type

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
        self._rpc: Rpc | None = None
        self._encoder = Encoder()
        self._known_topics: set[str] = set()
        self._topic_fields: dict[str, tuple[str, bytes]] = {}  # subject -> (topic path, PublishRequest.topic)
        self._readiness = Readiness(self.broker, "Pub/Sub", log)
        self._pending: set[asyncio.Future[Any]] = set()  # the batches (trackers) waiting for results
        self._tasks: set[asyncio.Task[None]] = set()  # requests in flight (and their retries)
        self._queues: dict[tuple[str, str], KeyQueue] = {}  # ordering: messages per (topic path, key)
        # ordering: (topic path, ordering key) -> event id of the first message that failed
        self._paused: dict[tuple[str, str], str] = {}

    # ------------------------------------------------------------------ lifecycle

    async def connect(self) -> None:
        if self._rpc is not None:
            return
        try:
            rpc = await Rpc.open(self.cfg.address)
        except BrokerConfigError:
            raise
        except Exception as exc:
            raise BrokerConfigError(
                f"pubsub: cannot create the channel ({describe(exc)}); set "
                "GOOGLE_APPLICATION_CREDENTIALS, or PUBSUB_EMULATOR_HOST for the emulator"
            ) from exc
        try:
            await self._check_project(rpc)
        except BaseException:
            await rpc.close()
            raise
        self._rpc = rpc
        self._readiness.where = rpc.where
        self._readiness.start(self._probe, self._probe_interval)
        log.info("pubsub: connected to %s, project %s", rpc.where, self._project)

    async def _check_project(self, rpc: Rpc) -> None:
        """One cheap RPC (``ListTopics``, one page of 1): reachable? project known? A missing list
        permission is fine."""
        project = f"projects/{self._project}"
        try:
            await rpc.call("ListTopics", field(b"\x0a", project.encode()) + b"\x10\x01", self._rpc_timeout,
                           f"project={project}")
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.PERMISSION_DENIED:
                return
            if code == grpc.StatusCode.NOT_FOUND:
                raise BrokerConfigError(
                    f"pubsub: project {self._project!r} (publisher.pubSubProjectID) not found"
                ) from None
            if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED):
                raise BrokerConfigError(f"pubsub: project {self._project!r} refused: {describe(exc)}") from None
            raise BrokerUnavailable(f"pubsub: cannot reach {rpc.where}: {describe(exc)}", broker=self.broker) from None

    async def _probe(self) -> None:
        """The readiness probe: the project check again."""
        if self._rpc is not None:
            await self._check_project(self._rpc)

    async def close(self) -> None:
        await self._readiness.stop()
        rpc = self._rpc
        if rpc is None:
            return
        if self._pending:  # let the results of what is sent arrive
            await asyncio.wait(set(self._pending), timeout=self.ack_timeout)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=1.0)
        self._rpc = None
        await rpc.close()

    @property
    def ready(self) -> bool:
        return self._rpc is not None and self._readiness.is_up

    # ------------------------------------------------------------------ topics

    def topic_path(self, subject: str) -> str:
        return f"projects/{self._project}/topics/{topic_id(subject)}"

    async def _ensure_topic(self, rpc: Rpc, path: str) -> None:
        request = field(b"\x0a", path.encode())
        try:
            try:
                await rpc.call("GetTopic", request, self._rpc_timeout, f"topic={path}")
                state = "exists"
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                    state = "unknown"  # may publish without topics.get; a missing topic shows on publish
                elif exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                elif not self.cfg.create_topics:
                    raise BrokerConfigError(
                        f"pubsub: topic {path} does not exist; create it or set publisher.createTopics: true"
                    ) from None
                else:
                    try:
                        await rpc.call("CreateTopic", request, self._rpc_timeout, f"name={path}")
                        state = "created"
                    except grpc.aio.AioRpcError as created:
                        if created.code() != grpc.StatusCode.ALREADY_EXISTS:
                            raise
                        state = "exists"
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT):
                raise BrokerConfigError(f"pubsub: cannot create topic {path}: {describe(exc)}") from None
            raise self.error(exc, f"cannot look up topic {path}: {describe(exc)}") from None
        if state == "created":
            log.info("pubsub: created topic %s", path)
        self._known_topics.add(path)

    # ------------------------------------------------------------------ publishing

    async def publish(self, batch: Sequence[Message], acks: Acks) -> None:
        rpc = self._rpc
        if rpc is None or not self._readiness.is_up:
            # Nothing is sent while Pub/Sub is away: the delivery stage re-sends it anyway.
            raise BrokerUnavailable(f"pubsub: {'not connected' if rpc is None else 'unreachable'}",
                                    broker=self.broker)
        topics = self._topic_fields
        for subject in {m.subject for m in batch}:
            known = topics.get(subject)
            if known is None:
                path = self.topic_path(subject)
                known = topics[subject] = (path, topic_field(path))
            if known[0] not in self._known_topics:
                try:
                    await self._ensure_topic(rpc, known[0])
                except PublishError as exc:
                    self._readiness.down(exc)
                    raise
        self._pending.add(acks.future)  # close() lets the results of what is sent arrive
        acks.add_done_callback(lambda done: self._pending.discard(done.future))
        acks.on_timeout(lambda: self._timed_out(acks))

        encode = self._encoder.message
        ordered = self.cfg.enable_ordering
        groups: dict[str, list[tuple[int, bytes]]] = {}  # subject -> (index, entry) without an ordering key
        started: list[tuple[str, str, KeyQueue]] = []
        for index, message in enumerate(batch):
            body_size = len(message.body)
            if body_size > MAX_MESSAGE_BYTES:
                acks.settle(index, self._oversized(message, body_size))
                continue
            key = ordering_key(message.key) if ordered else ""
            entry = encode(message, key.encode()) if key else encode(message)
            path, head = topics[message.subject]
            if len(entry) + len(head) > MAX_MESSAGE_BYTES:  # its request alone would be over the limit
                acks.settle(index, self._oversized(message, len(entry) + len(head)))
                continue
            if key:
                queue = self._queues.get((path, key))
                if queue is None:
                    queue = self._queues[(path, key)] = KeyQueue()
                queue.entries.append((acks, index, entry, message))
                if not queue.busy:
                    queue.busy = True
                    started.append((path, key, queue))
                continue
            group = groups.get(message.subject)
            if group is None:
                group = groups[message.subject] = []
            group.append((index, entry))
        for subject, group in groups.items():
            path, head = topics[subject]
            for indices, request in _requests(head, group):
                self._spawn(self._send(rpc, path, request, acks, indices, batch))
        for path, key, queue in started:
            self._spawn(self._drain(rpc, path, key, queue))

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, rpc: Rpc, path: str, request: bytes, acks: Acks, indices: list[int],
                    batch: Sequence[Message]) -> None:
        """One request of unordered messages (``indices`` of ``batch``): settle them by its result."""
        failure = await self._call_publish(rpc, path, request, len(indices))
        if failure is None:
            settle = acks.settle
            for index in indices:
                settle(index)
            return
        for index in indices:
            if acks.waiting(index):
                acks.settle(index, self._failure(batch[index], failure))

    async def _call_publish(self, rpc: Rpc, path: str, request: bytes, count: int) -> BaseException | None:
        """Send ``request`` (``count`` messages) until Pub/Sub returned their ids (None) or it failed for
        good (the error); transient statuses are retried with backoff within ``ack_timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ack_timeout
        publish = rpc.method("Publish")
        metadata = routing_header(f"topic={path}")
        delay = 0.1
        while True:
            try:
                response = await publish(request, timeout=max(deadline - loop.time(), 0.001), metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _TRANSIENT and loop.time() + delay < deadline:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                return exc
            except Exception as exc:
                return exc
            got = read_message_ids(response)
            if got != count:
                return PublishError(f"pubsub: Pub/Sub returned {got} message ids for {count} messages",
                                    broker=self.broker)
            self._readiness.up()
            return None

    async def _drain(self, rpc: Rpc, path: str, key: str, queue: KeyQueue) -> None:
        """Send the messages of one ordering key in order, one request at a time, until none is left."""
        entries = queue.entries
        try:
            while entries:
                taken: list[Entry] = []
                size = 0
                while entries and len(taken) < MAX_REQUEST_MESSAGES:
                    entry = entries[0]
                    if taken and size + len(entry[2]) > REQUEST_BYTES:
                        break
                    entries.popleft()
                    refused = self._gate(path, key, entry)
                    if refused is not None:
                        if entry[0].waiting(entry[1]):
                            entry[0].settle(entry[1], refused)
                        continue
                    taken.append(entry)
                    size += len(entry[2])
                if not taken:
                    continue
                head = self._topic_fields[taken[0][3].subject][1]
                request = head + b"".join(entry[2] for entry in taken)
                failure = await self._call_publish(rpc, path, request, len(taken))
                if failure is None:
                    for acks, index, _, _ in taken:
                        acks.settle(index)
                    continue
                first = taken[0][3]
                self._paused.setdefault((path, key), first.id)
                log.warning("pubsub: ordering key %r of %s paused at event %s: %s", key, path, first.id,
                            describe(failure))
                for acks, index, _, message in taken:
                    if acks.waiting(index):
                        acks.settle(index, self._failure(message, failure))
        finally:
            queue.busy = False
            if not entries and self._queues.get((path, key)) is queue:
                del self._queues[(path, key)]

    def _gate(self, path: str, key: str, entry: Entry) -> PublishError | None:
        """None: send this message (resuming the key when it is the one the key waits for); else why not."""
        acks, index, _, message = entry
        paused = self._paused.get((path, key))
        if paused is None:
            if acks.waiting(index):
                return None
            # its batch timed out before it was sent: it comes again later, so nothing after it may go first
            self._paused[(path, key)] = message.id
            paused = message.id
        elif paused == message.id and acks.waiting(index):
            del self._paused[(path, key)]
            log.info("pubsub: resumed ordering key %r of %s", key, path)
            return None
        return PublishError(f"pubsub: ordering key {key!r} of {path} is paused until event {paused} is sent again",
                            broker=self.broker)

    def _timed_out(self, acks: Acks) -> None:
        if not acks.done:
            self._readiness.down(f"no publish result within {self.ack_timeout:g}s")

    def error_type(self, exc: BaseException) -> type[PublishError]:
        """A failed call by its gRPC status (transient ones: :class:`BrokerUnavailable`; NOT_FOUND,
        PERMISSION_DENIED, INVALID_ARGUMENT, FAILED_PRECONDITION: :class:`MessageRejected`)."""
        if isinstance(exc, grpc.aio.AioRpcError):
            return _KINDS.get(exc.code(), PublishError)
        return super().error_type(exc)

    def _failure(self, message: Message, outcome: BaseException) -> PublishError:
        if isinstance(outcome, PublishError):
            return outcome
        kind = self.error_type(outcome)
        if kind is BrokerUnavailable:
            self._readiness.down(f"publish failed: {describe(outcome)}")
        if isinstance(outcome, grpc.aio.AioRpcError) and outcome.code() == grpc.StatusCode.NOT_FOUND:
            self._known_topics.discard(self._topic_fields[message.subject][0])  # check it again next time
        return self.error(outcome, f"event {message.id} not published: {describe(outcome)}")

    def _oversized(self, message: Message, size: int) -> PublishError:
        return self.too_large(message, size, MAX_MESSAGE_BYTES, "Pub/Sub's limit per message")


def _requests(head: bytes, group: list[tuple[int, bytes]]) -> list[tuple[list[int], bytes]]:
    """``group`` (index, entry) packed into requests of at most 1000 messages / :data:`REQUEST_BYTES`."""
    out: list[tuple[list[int], bytes]] = []
    indices: list[int] = []
    parts: list[bytes] = [head]
    size = len(head)
    for index, entry in group:
        if indices and (len(indices) == MAX_REQUEST_MESSAGES or size + len(entry) > REQUEST_BYTES):
            out.append((indices, b"".join(parts)))
            indices, parts, size = [], [head], len(head)
        indices.append(index)
        parts.append(entry)
        size += len(entry)
    if indices:
        out.append((indices, b"".join(parts)))
    return out

