"""NATS JetStream publisher: pipelined publishes, acks gathered through one reply subscription.

Each event is published with a reply subject ``<inbox>.<seq>`` and the header ``Nats-Msg-Id`` set to
the event id; JetStream answers every publish on its reply subject, so one wildcard subscription
collects all acks and settles each message on the batch's tracker (the delivery stage fails what is
still unacknowledged after ``ackTimeout``; an ack arriving after that is ignored). Replays inside
the stream's duplicate window are dropped by the server (the ack says ``duplicate``). The stream
``publisher.topic`` with subjects ``<topic>.>`` is created when missing. Events of one subject keep
their commit order: one connection, sent in order.

The hot path works in bulk. ``publish`` writes the ``HPUB`` frames of a whole batch itself (the same
bytes nats-py's ``publish`` writes for a message with one header) as one command into the client's
pending buffer and kicks its flusher once, instead of one ``publish`` call per event; a long head many
events share (Debezium's schema block) is not copied into them: the frames come in parts around it, and
uvloop writes the parts as they are with ``writev`` (asyncio's own loop joins them first). nats-py's
buffering rules still hold: while the client is reconnecting the frames wait in its pending buffer
(up to ``pending_size``; what does not fit fails with :class:`BrokerUnavailable`, and so does everything
after it in the batch, so nothing overtakes a message that has to be sent again). When the connection
breaks, the frames of every batch not fully acknowledged (and of first attempts that timed out before the
server answered anything after them) are put at the front of the buffer again, so that after the reconnect
nothing written later is stored before them. Acks are taken from
the protocol parser directly for our reply subscription (no ``Msg`` object, queue hop or callback
task per ack), and runs of complete ack frames at the start of a read are cut off before nats-py's
regex parser sees them; every other frame, and other subscriptions of the client, go nats-py's way.
Where the client does not have the internals this relies on, it falls back to ``publish`` and the
subscription callback.
"""
# ruff: noqa: E402  (nats-py is imported after _import_nats_lean)

from __future__ import annotations

import asyncio
import bisect
import contextlib
import importlib
import logging
import re
import sys
import types
from collections import deque
from collections.abc import Sequence
from typing import Any

from listener.lean import metadata_versions_only


class _Deferred(types.ModuleType):
    """Stands in for a module nats-py imports but the publisher does not use (``nats.js``, JetStream's
    client: ~40 dataclasses, a twelfth of the listener's start-up): the real module is imported the
    first time anything asks it for an attribute (nats-py reads ``nats.js.api`` when a reply carries a
    status header), and from then on is the one ``sys.modules`` and the ``nats`` package hold."""

    def __getattr__(self, name: str) -> Any:
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), name)


def _import_nats_lean() -> None:
    """Import nats-py without what the listener never uses: aiohttp (nats-py imports it when installed,
    only for ``ws://`` servers, not a publisher.address this listener takes), ``nats.js`` (until used;
    the stream is looked up and created through JetStream's API subjects directly) and importlib.metadata
    (listener.lean)."""
    if "nats" in sys.modules:
        return
    missing = "aiohttp" not in sys.modules
    if missing:
        sys.modules["aiohttp"] = None  # type: ignore[assignment]  # "import aiohttp" raises ImportError
    deferred = _Deferred("nats.js")
    sys.modules.setdefault("nats.js", deferred)
    try:
        with metadata_versions_only():  # nats-py asks importlib.metadata for its own version
            import nats.aio.client
    finally:
        if missing:
            del sys.modules["aiohttp"]
    if sys.modules.get("nats.js") is deferred and not hasattr(nats, "js"):
        nats.js = deferred  # what "import nats.js" would have set


_import_nats_lean()

import nats
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.protocol import parser as nats_parser

from listener import hotpath
from listener.config import NatsPublisherConfig, redact_url
from listener.delivery import Acks
from listener.errors import BrokerConfigError, BrokerUnavailable, MessageRejected, MessageTooLarge, PublishError
from listener.formats import NATS_HEADERS
from listener.message import Message, parse_lines
from listener.publishers.base import Publisher, tls_context

log = logging.getLogger("listener.publishers.nats")

# the header block nats-py writes for one ``Nats-Msg-Id`` header: the server's max_payload counts it too
_HEADER_BYTES = len(b"NATS/1.0\r\nNats-Msg-Id: \r\n\r\n")
# what nats-py refuses in a subject on publish (the protocol's separators)
_BAD_SUBJECT = re.compile(r"[ \t\r\n]")
# a header value is one line: nats-py turns CR and LF into spaces
_ONE_LINE = str.maketrans({"\r": " ", "\n": " "})


def extra_headers(message: Message) -> str:
    """The header lines a message carries beside Nats-Msg-Id (CloudEvents attributes, its content type)."""
    lines = [f"{name}: {value.translate(_ONE_LINE).strip()}\r\n" for name, value in (message.headers or {}).items()]
    if message.header_lines:  # already lines (the compiled path's CloudEvents attributes)
        lines.append(message.header_lines.decode())
    if message.content_type:
        lines.append(f"content-type: {message.content_type}\r\n")
    return "".join(lines)


def hpub_prefix(subject: str, inbox: str) -> str:
    """The start of a publish's HPUB line up to its reply subject's sequence number: ``HPUB <subject> <inbox>.``"""
    return f"HPUB {subject} {inbox}."


# the client internals the bulk path writes through (nats-py 2.x)
_BULK_ATTRIBUTES = ("_send_command", "_flush_pending", "_flush_queue", "_max_pending_size", "pending_data_size",
                    "stats", "_pending", "_pending_data_size")


class _Written:
    """The publishes of one batch on the wire: the sequence numbers ``first``..``last`` their reply subjects
    carry, the batch index of each (``indices[seq - first]``; None: ``seq - first`` itself) and what gives their
    frames again (sent again first after a reconnect): the frames as written by the bulk path's Python loop, or
    the batch whose frames the compiled path wrote, all of them, with the reply subjects of ``inbox``: written
    again, the same bytes, only when needed. Holding the frames of every batch until its acks (a copy of every
    event in flight, 64 MiB of them under the default bound) was the cost of large events: their memory came back
    cold and page by page, batch after batch."""

    __slots__ = ("acks", "batch", "first", "frames", "inbox", "indices", "last")

    def __init__(self, acks: Acks, first: int, last: int, frames: bytes, indices: list[int] | None = None,
                 batch: list[Message] | None = None, inbox: str = "") -> None:
        self.acks = acks
        self.first = first
        self.last = last
        self.frames = frames  # the HPUB frames as written (the bulk path's Python loop)
        self.indices = indices
        self.batch = batch  # or the batch the compiled path wrote whole (frames empty)
        self.inbox = inbox

    def wire(self, hot: hotpath.Module | None) -> bytes:
        """The frames as they were written (b"": none to send again)."""
        if self.frames or self.batch is None or hot is None:
            return self.frames
        prefixes = {subject: hpub_prefix(subject, self.inbox) for subject in {m.subject for m in self.batch}}
        built = hot.nats_frames(self.batch, prefixes, self.first - 1, 1 << 62, _HEADER_BYTES)
        if built is None:
            return b""
        return built[0] if isinstance(built[0], bytes) else b"".join(built[0])

    @property
    def rewritable(self) -> bool:
        """Its frames can be written again (:meth:`wire` gives them)."""
        return bool(self.frames or self.batch)

    @property
    def expired(self) -> bool:
        """A first attempt whose ackTimeout passed: its frames may have died unanswered with the connection."""
        return self.acks.timed_out and not self.acks.retry and self.rewritable

    def settle(self, seq: int, stop: int, outcome: PublishError | None) -> None:
        """The publishes ``seq``..``stop - 1`` (within this batch) got ``outcome``."""
        indices = self.indices
        if indices is None:
            if outcome is None:
                self.acks.settle_run(seq - self.first, stop - self.first)
                return
            for index in range(seq - self.first, stop - self.first):
                self.acks.settle(index, outcome)
            return
        for offset in range(seq - self.first, stop - self.first):
            self.acks.settle(indices[offset], outcome)


class NatsPublisher(Publisher[NatsPublisherConfig]):
    """Publishes events to the JetStream stream ``publisher.topic``."""

    broker = "nats"
    cloudevents = NATS_HEADERS  # the NATS protocol binding: datacontenttype as ce-datacontenttype
    errors = (
        (nats.errors.BadSubjectError, MessageRejected),
        ((nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError,
          nats.errors.ConnectionReconnectingError, nats.errors.OutboundBufferLimitError, nats.errors.NoServersError,
          nats.errors.StaleConnectionError, TimeoutError, OSError), BrokerUnavailable),
    )

    def __init__(self, cfg: NatsPublisherConfig, ack_timeout: float = 10.0) -> None:
        super().__init__(cfg, ack_timeout)
        self._nc: Client | None = None
        self._inbox = ""
        self._seq = 0
        self._windows: deque[_Written] = deque()  # batches with publishes on the wire, in sequence order
        self._batches: dict[Acks, _Written] = {}  # the same, by tracker
        # first attempts that timed out with no answer from the server for anything after them: their frames
        # may be lost with the connection while later ones are not, so they are written again first too
        # (see _resend_unacked); in sequence order
        self._expired: list[_Written] = []
        self._max_payload = 1024 * 1024
        self._closing = False  # close() was called: a closed client is not re-opened
        self._reopening: asyncio.Task[None] | None = None
        self._subjects: dict[str, str] = {}  # checked subject -> the start of its HPUB line
        self._bulk = True  # the client has the internals the bulk write path uses
        self._hot = hotpath.load()  # compiled frame building and ack scanning (None: Python)

    @property
    def servers(self) -> list[str]:
        out = []
        for part in self.cfg.address.split(","):
            part = part.strip()
            out.append(part if "://" in part else f"nats://{part}")
        return out

    async def connect(self) -> None:
        stream = self.cfg.topic
        if any(c in stream for c in ".*> \t"):
            raise BrokerConfigError(
                f"config: publisher.topic = {stream!r} is invalid for NATS: it names the JetStream stream, "
                "which may not contain '.', '*', '>' or spaces"
            )

        client: list[Client] = []  # the client these callbacks belong to

        async def on_error(exc: Exception) -> None:
            if client and client[0] is self._nc:  # not while connecting: connect() reports that itself
                log.warning("nats connection error", extra={"fields": {"error": str(exc) or type(exc).__name__}})

        async def on_disconnect() -> None:
            # not when close() drains the connection at shutdown, nor for a first connection that failed
            if not self._closing and client and client[0] is self._nc:
                log.warning("nats disconnected; reconnecting")
                await self._resend_unacked(client[0])

        async def on_reconnect() -> None:
            from listener import metrics

            metrics.RECONNECTS.labels("broker").inc()
            log.info("nats reconnected")

        async def on_closed() -> None:
            # nats-py closes the client for good on most server errors (-ERR), reconnecting only after
            # network failures: open a new one, or every publish would fail from now on
            if client and client[0] is self._nc and not self._closing:
                self._reopen(client[0])

        kwargs: dict[str, Any] = {}
        if self.cfg.username:
            kwargs["user"] = self.cfg.username
            kwargs["password"] = self.cfg.password.get_secret_value()
        nc = Client()
        client.append(nc)
        try:
            # nats-py retries a first connection forever when reconnecting is allowed (the listener then
            # hung at start while the broker was down, never reporting it, and ignored SIGTERM): bound it
            await asyncio.wait_for(nc.connect(
                servers=self.servers,
                connect_timeout=5,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=1,
                pending_size=32 * 1024 * 1024,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                closed_cb=on_closed,
                tls=tls_context(self.cfg, "nats"),
                **kwargs,
            ), timeout=5.0 * len(self.servers) + 1.0)
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            reason = nc.last_error or exc
            with contextlib.suppress(Exception):
                await nc.close()
            raise BrokerUnavailable(
                f"nats: cannot connect to {redact_url(self.cfg.address)}: {reason or type(reason).__name__}",
                broker=self.broker,
            ) from None
        self._nc = nc
        self._max_payload = nc.max_payload or self._max_payload
        try:
            await self._ensure_stream()
        except BaseException:
            self._nc = None  # first: closing it on purpose must not look like the server closing it
            await nc.close()
            raise
        self._inbox = nc.new_inbox()
        self._subjects = {}
        sub = await nc.subscribe(self._inbox + ".*", cb=self._on_ack, pending_msgs_limit=-1, pending_bytes_limit=-1)
        self._bulk = all(hasattr(nc, name) for name in _BULK_ATTRIBUTES)
        self._take_acks_from_parser(nc, getattr(sub, "_id", None))

    def _reopen(self, closed: Client) -> None:
        if self._reopening is not None and not self._reopening.done():
            return
        log.error("nats: the server closed the connection; connecting again",
                  extra={"fields": {"error": str(closed.last_error or "closed")}})
        self._reopening = asyncio.create_task(self._reconnect(), name="nats-reopen")

    async def _reconnect(self) -> None:
        """Connect a new client after the old one was closed (publishes waiting for an ack on the old
        one fail by the delivery stage's ack timeout and are retried)."""
        delay = 0.5
        while not self._closing:
            try:
                await self.connect()
                log.info("nats reconnected")
                return
            except (PublishError, BrokerConfigError) as exc:
                log.warning("nats: still cannot connect; retrying",
                            extra={"fields": {"error": str(exc), "retry_in_s": delay}})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _stream_api(self, verb: str, body: bytes = b"") -> dict[str, Any]:
        """One request to JetStream's API for the stream ``publisher.topic`` (``$JS.API.STREAM.<verb>.<name>``):
        its JSON answer, which has ``error`` when JetStream refused."""
        assert self._nc is not None
        where = redact_url(self.cfg.address)
        try:
            reply = await self._nc.request(f"$JS.API.STREAM.{verb}.{self.cfg.topic}", body, timeout=10)
        except nats.errors.NoRespondersError:
            raise BrokerConfigError(
                f"nats: JetStream is not enabled on {where}; start nats-server with -js") from None
        except nats.errors.TimeoutError:
            raise BrokerConfigError(
                f"nats: JetStream does not answer on {where}; start nats-server with -js") from None
        answer: dict[str, Any] = orjson.loads(reply.data)
        if answer.get("error", {}).get("code") == 503:
            raise BrokerConfigError(
                f"nats: JetStream is not enabled on {where}; start nats-server with -js") from None
        return answer

    async def _ensure_stream(self) -> None:
        """Check that the stream ``publisher.topic`` takes ``<topic>.>``; create it when missing."""
        name = self.cfg.topic
        subjects = [f"{name}.>"]
        info = await self._stream_api("INFO")
        if info.get("error", {}).get("code") == 404:
            stream = {"name": name, "subjects": subjects, "retention": "limits", "storage": "file",
                      "discard": "old", "num_replicas": 1,
                      "duplicate_window": int(self.cfg.duplicate_window.total_seconds() * 1e9)}
            created = await self._stream_api("CREATE", orjson.dumps(stream))
            if "error" in created:
                reason = created["error"].get("description") or created["error"]
                raise BrokerConfigError(f"nats: cannot create JetStream stream {name!r}: {reason}")
            log.info("created JetStream stream", extra={"fields": {"stream": name, "subjects": subjects}})
            return
        if "error" in info:
            reason = info["error"].get("description") or info["error"]
            raise BrokerConfigError(f"nats: cannot read JetStream stream {name!r}: {reason}")
        have = list(info.get("config", {}).get("subjects") or [])
        if not any(s in (f"{name}.>", ">") for s in have):
            raise BrokerConfigError(
                f"nats: stream {name!r} exists with subjects {have}; it must include '{name}.>' "
                "(add it to the stream or choose another publisher.topic)"
            )

    def _take_acks_from_parser(self, nc: Client, sid: int | None) -> None:
        """Have the client's protocol parser hand the acks of our reply subscription (``sid``) straight
        to :meth:`_ack`; every other message goes the client's usual way. Without the internals this
        needs, acks keep arriving through the subscription callback :meth:`_on_ack`."""
        process_msg = getattr(nc, "_process_msg", None)
        if sid is None or process_msg is None:
            return
        ack = self._ack

        async def take(msg_sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
            if msg_sid == sid:
                status = headers[9:12] if headers and headers[8:9] == b" " else b""  # "NATS/1.0 503"
                try:
                    ack(subject.rpartition(b".")[2], status, data)
                except Exception:  # an exception here would stop the client's read loop for good
                    log.exception("nats: cannot process a JetStream ack")
            else:
                await process_msg(msg_sid, subject, reply, data, headers)

        setattr(nc, "_process_msg", take)  # noqa: B010 - an instance attribute over the method
        self._read_acks_first(nc, sid)

    def _read_acks_first(self, nc: Client, sid: int) -> None:
        """Give the client's protocol parser a fast path for what it reads most: runs of complete
        ``MSG <inbox>.<seq> <sid> <size>`` frames of our ack subscription at the start of a read. They
        are taken off directly; everything from the first other frame (or an incomplete one) on goes
        to nats-py's parser as before, which keeps any partial frame for the next read."""
        parser = getattr(nc, "_ps", None)
        original = getattr(parser, "parse", None)
        if (parser is None or original is None or not all(hasattr(parser, a) for a in ("buf", "state", "needed"))
                or getattr(nats_parser, "AWAITING_CONTROL_LINE", None) is None):
            return
        control_line, crlf = nats_parser.AWAITING_CONTROL_LINE, len(b"\r\n")
        our_sid = str(sid).encode()
        ack = self._ack
        scan = self._hot.nats_acks if self._hot is not None else None
        settle = self._settle

        async def parse(data: bytes = b"") -> None:
            if parser.state != control_line:
                # a message's payload is still missing bytes: let nats-py complete it
                missing = parser.needed + crlf - len(parser.buf)
                if missing >= len(data) or missing <= 0:
                    await original(data)
                    return
                await original(data[:missing])
                data = data[missing:]
                if parser.state != control_line:
                    await original(data)
                    return
            if parser.buf:
                data = bytes(parser.buf) + data
                parser.buf.clear()
            at, end = 0, len(data)
            try:
                if scan is not None:  # compiled: the same walk as the loop below, which then has nothing left
                    answers, at = scan(data, our_sid)
                    for first, second in answers:
                        if first.__class__ is int:  # plain acks of the publishes first..second - 1
                            settle(first, second, None)  # type: ignore[arg-type]
                        else:
                            ack(first, b"", second)  # type: ignore[arg-type]
                while data.startswith(b"MSG ", at):
                    line_end = data.find(b"\r\n", at)
                    if line_end < 0:
                        break
                    fields = data[at + 4:line_end].split(b" ")
                    if len(fields) != 3 or fields[1] != our_sid or not fields[2].isdigit():
                        break
                    start = line_end + 2
                    stop = start + int(fields[2])
                    if stop + 2 > end:
                        break
                    ack(fields[0].rpartition(b".")[2], b"", data[start:stop])
                    at = stop + 2
            except Exception:  # never lose the stream: whatever is left goes to nats-py's parser
                log.exception("nats: cannot process a JetStream ack")
            if at < end:
                await original(data[at:] if at else data)

        setattr(parser, "parse", parse)  # noqa: B010 - an instance attribute over the method

    async def _on_ack(self, msg: Msg) -> None:
        status = (msg.headers or {}).get("Status", "")
        self._ack(msg.subject.rpartition(".")[2].encode(), status.encode(), msg.data)

    def _ack(self, seq_text: bytes, status: bytes, data: bytes) -> None:
        """One JetStream answer: ``seq_text`` is the last token of its reply subject, ``status`` the
        inline status of its header (``b""`` when there is none)."""
        try:
            seq = int(seq_text)
        except ValueError:
            return
        result: PublishError | None = None
        if status == b"503":
            result = MessageRejected(
                f"nats: no JetStream stream listens on this subject (stream {self.cfg.topic!r})", broker="nats"
            )
        elif b'"error"' in data[:20]:
            result = self._rejection(data)
        self._settle(seq, seq + 1, result)

    def _settle(self, seq: int, stop: int, outcome: PublishError | None) -> None:
        """The publishes with sequence numbers ``seq``..``stop - 1`` got ``outcome`` (an ack of a publish
        whose batch is settled already -- it timed out and was retried -- settles nothing)."""
        expired = self._expired
        while expired and expired[0].last < seq:  # the server answered something after them: it had them
            del expired[0]
        windows = self._windows
        while windows and windows[0].acks.done:
            windows.popleft()
        for window in windows:
            if seq > window.last:
                continue
            if stop <= window.first:
                return
            start = max(seq, window.first)
            end = min(stop, window.last + 1)
            window.settle(start, end, outcome)
            if stop <= window.last + 1:
                return
            seq = end

    @staticmethod
    def _rejection(data: bytes) -> MessageRejected | MessageTooLarge | None:
        """The error of a JetStream answer that carries one (it runs inside the client's protocol
        parser, so it never raises)."""
        try:
            answer = orjson.loads(data)
            err = answer.get("error") if isinstance(answer, dict) else answer
        except orjson.JSONDecodeError:
            err = data[:200].decode("utf-8", "replace")
        if not err:
            return None  # e.g. {"stream":"error","seq":1}: an ack from a stream named "error"
        if not isinstance(err, dict):
            return MessageRejected(f"nats: JetStream rejected the message: {err}", broker="nats")
        text = f"nats: JetStream rejected the message: {err.get('description', err)}"
        code = err.get("err_code") or err.get("code")
        if code == 10077 and "message too large" in str(err.get("description", "")):
            # the file store's own limit (a record of 32 MiB at most), below a raised max_payload: for good
            return MessageTooLarge(f"{text} (a stream with file storage takes messages up to 32 MiB whatever "
                                   "max_payload allows; memory storage takes up to max_payload)", broker="nats")
        return MessageRejected(text, broker="nats", retryable=code not in (10054, 400))

    async def _resend_unacked(self, nc: Client) -> None:
        """The connection broke: frames of batches not fully acked may have died with it, while frames
        written after them wait in the client's buffer and would be stored first after the reconnect --
        a later change of a row landing before an earlier one. So every unacked batch's frames go to the
        front of the buffer, in the order they were first sent; JetStream drops the copies it already
        stored (Nats-Msg-Id) and the acks that come back settle the batches. The first attempts that timed
        out before (a server frozen longer than ackTimeout, then gone) go too, in their place: the delivery
        stage re-sends their events, but behind batches written after them."""
        # a first attempt whose ackTimeout has just passed is still in _batches until _forget runs (a callback
        # the event loop has not called yet): it goes too
        unacked = sorted([*(w for w in self._batches.values() if (not w.acks.done and w.rewritable) or w.expired),
                          *self._expired], key=lambda w: w.first)
        frames = b"".join(w.wire(self._hot) for w in unacked)
        if frames:
            try:
                await nc._send_command(frames, priority=True)
            except Exception as exc:  # the batches then fail by their ack timeout and are retried
                log.warning("nats: cannot queue unacked events again", extra={"fields": {"error": str(exc)}})

    def _written(self, acks: Acks, first: int, last: int, frames: bytes, indices: list[int] | None = None,
                 batch: list[Message] | None = None) -> None:
        """Publishes ``first``..``last`` of ``acks``'s batch are on their way: remember them until settled
        (``frames``, or the ``batch`` the compiled path wrote them from)."""
        if last >= first and not acks.done:
            window = self._batches[acks] = _Written(acks, first, last, frames, indices, batch, self._inbox)
            self._windows.append(window)
            acks.add_done_callback(self._forget)

    def _forget(self, acks: Acks) -> None:
        """The batch is settled (acks still to come for it, after its ack timeout, settle nothing)."""
        window = self._batches.pop(acks, None)
        if window is not None:
            with contextlib.suppress(ValueError):
                self._windows.remove(window)
            if window.expired:
                bisect.insort(self._expired, window, key=lambda w: w.first)

    async def publish(self, batch: Sequence[Message], acks: Acks) -> None:
        nc = self._nc
        if nc is None:
            raise BrokerUnavailable("nats: not connected", broker=self.broker)
        if self._bulk:
            await self._send_bulk(nc, batch, acks)
        else:
            await self._send_each(nc, batch, acks)

    def _too_large(self, message: Message) -> PublishError | None:
        # the header counts: a message over max_payload makes the server close the connection
        size = len(message.body) + _HEADER_BYTES + len(message.id)
        if message.headers or message.content_type or message.header_lines:
            size += len(extra_headers(message).encode())
        if size <= self._max_payload:
            return None
        return self.too_large(message, size, self._max_payload, "the server's max_payload",
                              "its Nats-Msg-Id header counted")

    def _refused(self, exc: BaseException) -> PublishError:
        return self.error(exc, f"publish failed: {exc or type(exc).__name__}")

    async def _send_bulk(self, nc: Client, batch: Sequence[Message], acks: Acks) -> None:
        """Write the batch's HPUB frames as one command into the client's pending buffer."""
        refused: nats.errors.Error | None = None
        if nc.is_closed:
            refused = nats.errors.ConnectionClosedError()
        elif nc.is_draining_pubs:
            refused = nats.errors.ConnectionDrainingError()
        # while reconnecting, frames wait in the pending buffer as long as it has room (nats-py's rule)
        room = -1 if nc.is_connected else max(0, nc._max_pending_size - nc.pending_data_size)
        limit = self._max_payload - _HEADER_BYTES
        subjects = self._subjects
        settle = acks.settle
        indices: list[int] = []  # the batch index of each publish written (Python path)
        seq = first = self._seq
        parts: list[bytes] = []
        extend = parts.extend
        size = payload = 0
        index = -1
        built = None
        if self._hot is not None and refused is None and room < 0 and isinstance(batch, list):
            built = self._hot.nats_frames(batch, subjects, seq, limit, _HEADER_BYTES)
        whole: list[Message] | None = None
        if built is not None:  # every message was plain: frames written in one go, seq numbers in order
            whole = batch  # type: ignore[assignment]  # a list (checked above)
            frames = built[0]
            if isinstance(frames, bytes):
                parts.append(frames)
            else:  # cut around the shared heads (Debezium's schema block), which are not copied
                parts = frames
            payload = built[1]
            seq += len(batch)
            batch = ()
        for message in batch:
            index += 1
            body = message.body
            value = message.id
            subject = message.subject
            extra = extra_headers(message) if message.headers or message.content_type or message.header_lines else ""
            if len(body) + len(value) + len(extra) > limit:
                too_large = self._too_large(message)  # counts bytes, not characters
                if too_large is not None:
                    settle(index, too_large)
                    continue
            if subject not in subjects:
                prefix = self._prefix(subject)
                if prefix is None:
                    settle(index, self._refused(nats.errors.BadSubjectError()))
                    continue
            if refused is not None:
                settle(index, self._refused(refused))
                continue
            value = value.strip()
            if "\r" in value or "\n" in value:
                value = value.translate(_ONE_LINE)
            head_text = f"NATS/1.0\r\nNats-Msg-Id: {value}\r\n{extra}\r\n"
            header = len(head_text) if head_text.isascii() else len(head_text.encode())
            seq += 1
            head = f"{subjects[subject]}{seq} {header} {header + len(body)}\r\n{head_text}".encode()
            size += len(head) + len(body) + 2
            if 0 <= room < size:
                # the buffer is full: this message and the rest of the batch fail, none overtakes it
                refused = nats.errors.OutboundBufferLimitError()
                seq -= 1
                settle(index, self._refused(refused))
                continue
            indices.append(index)
            extend((head, body, b"\r\n"))
            payload += len(body)
        self._seq = seq
        if not parts:
            return
        if whole is not None:  # written again from the batch if ever needed, not held until the acks
            self._written(acks, first + 1, seq, b"", None, whole)
        else:
            parts = [b"".join(parts)]
            self._written(acks, first + 1, seq, parts[0], indices)
        try:
            # what _send_command does, for any number of parts at once: the client's flusher writes them as they are
            nc._pending.extend(parts)
            nc._pending_data_size += sum(map(len, parts))
            if 0 < nc._max_pending_size < nc._pending_data_size:
                await nc._flush_pending(force_flush=True)
            if nc._flush_queue is not None and nc._flush_queue.empty():
                await nc._flush_pending()
        except Exception as exc:
            window = self._batches.get(acks)
            if window is not None:
                window.settle(first + 1, seq + 1, self._refused(exc))
            return
        nc.stats["out_msgs"] += seq - first
        nc.stats["out_bytes"] += payload

    def _prefix(self, subject: str) -> str | None:
        """``"HPUB <subject> <inbox>."`` for a subject nats-py would publish to (None: it would not)."""
        if not subject or _BAD_SUBJECT.search(subject):
            return None
        if len(self._subjects) > 10000:
            self._subjects.clear()
        prefix = self._subjects[subject] = hpub_prefix(subject, self._inbox)
        return prefix

    async def _send_each(self, nc: Client, batch: Sequence[Message], acks: Acks) -> None:
        """One ``publish`` per message: for a client without the internals of the bulk path."""
        inbox = self._inbox
        publish = nc.publish
        indices: list[int] = []
        window: _Written | None = None
        for index, message in enumerate(batch):
            too_large = self._too_large(message)
            if too_large is not None:
                acks.settle(index, too_large)
                continue
            self._seq += 1
            seq = self._seq
            indices.append(index)
            if window is None:
                self._written(acks, seq, seq, b"", indices)
                window = self._batches.get(acks)
            else:
                window.last = seq
            headers = {"Nats-Msg-Id": message.id, **(message.headers or {})}
            if message.header_lines:
                headers.update(parse_lines(message.header_lines))
            if message.content_type:
                headers["content-type"] = message.content_type
            try:
                await publish(message.subject, message.body, reply=f"{inbox}.{seq}", headers=headers)
            except Exception as exc:
                acks.settle(index, self._refused(exc))

    async def close(self) -> None:
        self._closing = True
        if self._reopening is not None:
            self._reopening.cancel()
        if self._nc is not None:
            try:
                await self._nc.drain()
            except Exception:
                await self._nc.close()
            self._nc = None

    @property
    def ready(self) -> bool:
        return self._nc is not None and self._nc.is_connected
