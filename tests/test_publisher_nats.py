"""The NATS JetStream publisher at the publisher level: the bulk write path (HPUB frames written as
one command), the ack fast path inside the client's protocol parser, and what happens while the
client is reconnecting, against a real nats-server."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import uuid
from collections.abc import Callable
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.protocol import command
from nats.protocol.parser import Parser

from listener.config import PublisherConfig, parse_publisher
from listener.errors import (
    AckTimeout,
    BrokerConfigError,
    BrokerUnavailable,
    MessageRejected,
    MessageTooLarge,
    PublishError,
)
from listener.message import HeadedMessage, Message
from listener.publishers import make_publisher
from listener.publishers.nats import NatsPublisher, _Written
from tests.support.events import compiled_hot_path
from tests.support.harness import metric, wait_until
from tests.support.proxy import TcpProxy
from tests.support.services import NatsServer

pytestmark = pytest.mark.service


def config(address: str, topic: str, **overrides: Any) -> PublisherConfig:
    values: dict[str, Any] = {"type": "nats", "address": address, "topic": topic}
    values.update(overrides)
    return parse_publisher(values)


def unique_stream() -> str:
    return f"wal_test_{uuid.uuid4().hex[:10]}"


def message(stream: str, n: int, *, table: str = "users", body: bytes | None = None) -> Message:
    return Message(
        id=f"00000000-0000-0000-0000-{n:012d}",
        subject=f"{stream}.public_{table}",
        body=body if body is not None else b'{"n": %d}' % n,
        schema="public",
        table=table,
        action="INSERT",
    )


async def stream_messages(url: str, stream: str) -> int:
    nc = await nats.connect(url)
    try:
        return int((await nc.jetstream().stream_info(stream)).state.messages)
    finally:
        await nc.close()


async def watch(url: str, stream: str) -> tuple[Client, list[Msg]]:
    """A core NATS subscriber to the stream's subjects and the messages it sees (close it when done)."""
    seen: list[Msg] = []

    async def see(msg: Msg) -> None:
        seen.append(msg)

    watcher = await nats.connect(url)
    await watcher.subscribe(f"{stream}.>", cb=see)
    await watcher.flush()
    return watcher, seen


async def test_batch_arrives_as_nats_py_would_publish_it_in_order(nats_server: NatsServer) -> None:
    stream = unique_stream()
    watcher, seen = await watch(nats_server.url, stream)  # a core subscriber sees every publish as written
    publisher = make_publisher(config(nats_server.address, stream), 5.0)
    assert isinstance(publisher, NatsPublisher)
    await publisher.connect()
    try:
        batch = [message(stream, n, table="users" if n % 3 else "orders") for n in range(3000)]
        batch.append(message(stream, 3000, body=b""))  # an empty body is a message too
        batch.append(message(stream, 3001))
        batch[-1].id = "ereignis-ü-3001"  # header lengths count bytes, not characters
        pending = [await publisher.send(batch[i:i + 1000]) for i in range(0, len(batch), 1000)]
        for acks in pending:
            results = await acks
            assert results == [None] * len(results)
        await wait_until(lambda: len(seen) >= len(batch), 10, "the core subscriber to see every publish")
    finally:
        await publisher.close()
        await watcher.close()
    assert [m.data for m in seen] == [m.body for m in batch]
    assert [m.subject for m in seen] == [m.subject for m in batch]
    assert [m.headers for m in seen] == [{"Nats-Msg-Id": m.id} for m in batch]
    assert await stream_messages(nats_server.url, stream) == len(batch)


async def test_replayed_ids_are_acked_but_stored_once(nats_server: NatsServer) -> None:
    stream = unique_stream()
    publisher = NatsPublisher(config(nats_server.address, stream))
    await publisher.connect()
    try:
        batch = [message(stream, n) for n in range(100)]
        assert await (await publisher.send(batch)) == [None] * 100
        assert await (await publisher.send(batch[:50])) == [None] * 50  # a replay after a crash
    finally:
        await publisher.close()
    assert await stream_messages(nats_server.url, stream) == 100


async def test_per_message_failures_leave_the_rest_of_the_batch_alone(nats_server: NatsServer) -> None:
    stream = unique_stream()
    publisher = NatsPublisher(config(nats_server.address, stream))
    await publisher.connect()
    try:
        assert publisher._nc is not None
        big = message(stream, 1, table="blobs", body=b"x" * publisher._nc.max_payload)
        outside = message(stream, 2)
        outside.subject = f"not_{stream}.public_users"  # no stream listens: JetStream answers 503
        spaced = message(stream, 3)
        spaced.subject = f"{stream}.public users"  # not a subject nats-py would publish to
        before = metric("oversized_events_total", {"table": "blobs"})
        results = await (await publisher.send([message(stream, 0), big, outside, spaced, message(stream, 4)]))
        assert results[0] is None and results[4] is None
        assert isinstance(results[1], MessageTooLarge) and "max_payload" in str(results[1])
        assert not results[1].retryable and results[1].broker == "nats"
        assert isinstance(results[2], MessageRejected) and "no JetStream stream listens" in str(results[2])
        assert isinstance(results[3], MessageRejected) and "invalid subject" in str(results[3])
        assert results[2].retryable and results[3].retryable
        assert metric("oversized_events_total", {"table": "blobs"}) == before + 1
    finally:
        await publisher.close()
    assert await stream_messages(nats_server.url, stream) == 2


async def test_jetstream_rejection_is_a_publish_error(nats_server: NatsServer) -> None:
    stream = unique_stream()
    nc = await nats.connect(nats_server.url)
    try:  # a full stream that discards new messages refuses them with an error in the ack
        await nc.jetstream().add_stream(name=stream, subjects=[f"{stream}.>"], max_msgs=3, discard="new")
    finally:
        await nc.close()
    publisher = NatsPublisher(config(nats_server.address, stream))
    await publisher.connect()
    try:
        results = await (await publisher.send([message(stream, n) for n in range(5)]))
    finally:
        await publisher.close()
    assert results[:3] == [None] * 3
    assert all(isinstance(r, MessageRejected) and r.retryable and "JetStream rejected the message" in str(r)
               for r in results[3:]), results


async def test_the_stream_is_created_with_the_topics_subjects_and_duplicate_window(nats_server: NatsServer) -> None:
    stream = unique_stream()
    publisher = NatsPublisher(config(nats_server.address, stream, duplicateWindow="90s"))
    await publisher.connect()
    await publisher.close()
    nc = await nats.connect(nats_server.url)
    try:
        info = await nc.jetstream().stream_info(stream)
    finally:
        await nc.close()
    assert info.config.subjects == [f"{stream}.>"]
    assert info.config.duplicate_window == 90
    assert (info.config.storage, info.config.retention, info.config.num_replicas) == ("file", "limits", 1)


async def test_a_stream_without_the_topics_subjects_is_refused_with_the_fix(nats_server: NatsServer) -> None:
    stream = unique_stream()
    nc = await nats.connect(nats_server.url)
    try:
        await nc.jetstream().add_stream(name=stream, subjects=[f"elsewhere_{stream}.>"])
    finally:
        await nc.close()
    publisher = NatsPublisher(config(nats_server.address, stream))
    with pytest.raises(BrokerConfigError, match=rf"stream '{stream}' exists with subjects \['elsewhere_{stream}\.>'\]; "
                                                rf"it must include '{stream}\.>'"):
        await publisher.connect()
    assert not publisher.ready


async def test_a_server_without_jetstream_is_refused_with_the_fix(make_nats: Callable[..., NatsServer]) -> None:
    server = make_nats(jetstream=False)
    publisher = NatsPublisher(config(server.address, unique_stream()))
    with pytest.raises(BrokerConfigError, match=r"^nats: JetStream is not enabled on 127\.0\.0\.1:\d+; "
                                                r"start nats-server with -js$"):
        await publisher.connect()


def test_nats_py_loads_its_jetstream_client_only_once_it_needs_it(nats_server: NatsServer) -> None:
    # in a process of its own: this one imported nats-py whole before the publisher could defer a part
    script = f"""
import asyncio, sys
from listener.config import parse_publisher
from listener.message import Message
from listener.publishers.nats import NatsPublisher
import nats.errors

async def main():
    publisher = NatsPublisher(parse_publisher({{"type": "nats", "address": "{nats_server.address}", "topic": "lazy"}}))
    await publisher.connect()
    message = Message(id="00000000-0000-0000-0000-000000000001", subject="lazy.public_users", body=b"{{}}",
                      schema="public", table="users", action="INSERT")
    assert await (await publisher.send([message])) == [None]
    assert "nats.js.api" not in sys.modules, "nats.js was imported on the way"
    try:  # nobody answers: the server's reply has a status header, which nats-py reads with nats.js.api
        await publisher._nc.request("nobody.listens.here", b"", timeout=5)
    except nats.errors.NoRespondersError:
        pass
    else:
        raise AssertionError("a request nobody answers was answered")
    assert sys.modules["nats.js"] is nats.js and nats.js.api.Header.STATUS.value == "Status"
    await publisher.close()

asyncio.run(main())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]


def test_ack_bodies() -> None:
    rejection = NatsPublisher._rejection
    assert rejection(b'{"stream":"error","seq":7}') is None  # a stream named "error" acks normally
    duplicate_window = rejection(b'{"error":{"code":400,"err_code":10054,"description":"bad"}}')
    assert isinstance(duplicate_window, MessageRejected) and not duplicate_window.retryable
    for body in (b'{"error":{"code":503,"description":"unavailable"}}', b'{"error": not json'):
        answer = rejection(body)
        assert isinstance(answer, MessageRejected) and answer.retryable, body
    # the file store's own limit (a message over 32 MiB, under a raised max_payload): for good, with the way out
    store = rejection(b'{"error":{"code":503,"err_code":10077,"description":"message too large"},"seq":0}')
    assert isinstance(store, MessageTooLarge) and not store.retryable and "memory storage" in str(store)
    other_store_failure = rejection(b'{"error":{"code":503,"err_code":10077,"description":"disk full"}}')
    assert isinstance(other_store_failure, MessageRejected) and other_store_failure.retryable


async def test_other_subscriptions_and_requests_on_the_client_still_work(nats_server: NatsServer) -> None:
    stream = unique_stream()
    publisher = NatsPublisher(config(nats_server.address, stream))
    await publisher.connect()
    try:
        nc = publisher._nc
        assert nc is not None
        got: list[bytes] = []

        async def take(msg: Msg) -> None:
            got.append(msg.data)

        await nc.subscribe(f"probe.{stream}", cb=take)
        other = await nats.connect(nats_server.url)
        try:
            for n in range(20):
                await other.publish(f"probe.{stream}", b"%d" % n)
            await other.flush()
        finally:
            await other.close()
        acks = await publisher.send([message(stream, n) for n in range(200)])
        info = await nc.jetstream().stream_info(stream)  # a request/reply on the same client
        assert await acks == [None] * 200
        await wait_until(lambda: len(got) == 20, 5, "the other subscription's messages")
        assert got == [b"%d" % n for n in range(20)]
        assert info.config.name == stream
    finally:
        await publisher.close()


async def test_frames_wait_in_the_buffer_while_reconnecting(make_nats: Callable[..., NatsServer]) -> None:
    server = make_nats()
    stream = unique_stream()
    publisher = NatsPublisher(config(server.address, stream), ack_timeout=30.0)
    await publisher.connect()
    try:
        assert await (await publisher.send([message(stream, n) for n in range(10)])) == [None] * 10
        server.stop()
        await wait_until(lambda: not publisher.ready, 10, "the client to notice the outage")
        acks = await publisher.send([message(stream, n) for n in range(10, 110)])
        server.start()  # same port and store: the client reconnects and flushes what it buffered
        assert await acks == [None] * 100
    finally:
        await publisher.close()
    assert await stream_messages(server.url, stream) == 110


async def test_full_buffer_fails_the_rest_of_the_batch(make_nats: Callable[..., NatsServer]) -> None:
    server = make_nats()
    stream = unique_stream()
    publisher = NatsPublisher(config(server.address, stream), ack_timeout=30.0)
    await publisher.connect()
    try:
        nc = publisher._nc
        assert nc is not None
        server.stop()
        await wait_until(lambda: not publisher.ready, 10, "the client to notice the outage")
        nc._max_pending_size = nc.pending_data_size + 1000  # room for a handful of frames
        batch = [message(stream, n) for n in range(50)]
        acks = await publisher.send(batch)
        server.start()
        results = await acks
    finally:
        await publisher.close()
    taken = results.index(next(r for r in results if r is not None))
    assert 0 < taken < 50
    assert results[:taken] == [None] * taken
    assert all(isinstance(r, BrokerUnavailable) and "outbound buffer limit" in str(r) for r in results[taken:]), results
    assert await stream_messages(server.url, stream) == taken


async def test_without_client_internals_it_publishes_one_by_one(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fallback for a nats-py without the internals of the bulk path: publish() and the callback."""
    monkeypatch.setattr("listener.publishers.nats._BULK_ATTRIBUTES", ("_no_such_attribute",))
    monkeypatch.setattr(NatsPublisher, "_take_acks_from_parser", lambda *_: None)
    stream = unique_stream()
    publisher = NatsPublisher(config(nats_server.address, stream))
    await publisher.connect()
    try:
        assert publisher._bulk is False
        outside = message(stream, 1)
        outside.subject = f"not_{stream}.x"
        results = await (await publisher.send([message(stream, 0), outside, message(stream, 2)]))
        assert results[0] is None and results[2] is None
        assert isinstance(results[1], MessageRejected) and "no JetStream stream listens" in str(results[1])
    finally:
        await publisher.close()
    assert await stream_messages(nats_server.url, stream) == 2


# -- the parser fast path, against nats-py's own parser -------------------------------------------


class _Recorder:
    """What nats-py's parser hands to its client, recorded."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self._ps = Parser(self)

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        self.events.append(("msg", sid, bytes(subject), bytes(reply), bytes(data), headers))

    async def _process_ping(self) -> None:
        self.events.append(("ping",))

    async def _process_pong(self) -> None:
        self.events.append(("pong",))

    async def _process_info(self, info: dict[str, Any]) -> None:
        self.events.append(("info", info))

    async def _process_err(self, err: str) -> None:
        self.events.append(("err", err))


def _protocol(rng: random.Random, count: int) -> bytes:
    """A server's side of the protocol: mostly acks for sid 7, mixed with everything else."""
    out = []
    for n in range(count):
        kind = rng.random()
        ack = b'{"stream":"s","seq":%d}' % n
        if kind < 0.7:
            out.append(b"MSG _INBOX.abc.%d 7 %d\r\n%s\r\n" % (n, len(ack), ack))
        elif kind < 0.76:
            out.append(b"MSG other.subject 3 reply.to 5\r\nhello\r\n")
        elif kind < 0.82:
            status = b"NATS/1.0 503\r\n\r\n"
            out.append(b"HMSG _INBOX.abc.%d 7 %d %d\r\n%s\r\n" % (n, len(status), len(status), status))
        elif kind < 0.86:
            out.append(b"MSG _INBOX.abc.%d 8 %d\r\n%s\r\n" % (n, len(ack), ack))  # another sid
        elif kind < 0.88:
            out.append(b"MSG _INBOX.abc.%d 7 0\r\n\r\n" % n)  # an empty payload
        elif kind < 0.9:
            error = b'{"error":{"code":500,"err_code":10077,"description":"stream full"}}'
            out.append(b"MSG _INBOX.abc.%d 7 %d\r\n%s\r\n" % (n, len(error), error))
        else:
            out.append(rng.choice([b"PING\r\n", b"PONG\r\n", b"+OK\r\n", b"INFO {\"max_payload\":1048576}\r\n"]))
    return b"".join(out)


class _Resolved:
    """Stands for a batch waiting for acks: records what each ack settled."""

    done = False

    def __init__(self, events: list[tuple[Any, ...]]) -> None:
        self.events = events

    def settle(self, index: int, result: PublishError | None = None) -> None:
        self.events.append(("resolved", index, None if result is None else str(result)))

    def settle_run(self, start: int, stop: int) -> None:
        for index in range(start, stop):
            self.settle(index)


async def _parse(data: bytes, cuts: list[int], fast: bool, compiled: bool | None = None) -> list[tuple[Any, ...]]:
    """nats-py's parser over ``data`` cut at ``cuts`` (fast=False), or with the publisher's fast path
    in front: its ack hook recorded (compiled=None, Python scanning), or what each ack resolved
    (compiled=True/False: the compiled or the Python scanning)."""
    client = _Recorder()
    if fast:
        publisher = NatsPublisher(config("127.0.0.1:4222", "s"))
        if compiled is None or not compiled:
            publisher._hot = None
        if compiled is None:
            def ack(seq: bytes, status: bytes, payload: bytes) -> None:
                client.events.append(("msg", 7, b"_INBOX.abc." + seq, b"", payload, None))

            publisher._ack = ack  # type: ignore[method-assign,assignment]
        else:
            waiting = _Resolved(client.events)  # publishes 0..999 of one batch: seq n is index n
            publisher._windows.append(_Written(waiting, 0, 999, b""))  # type: ignore[arg-type]
        publisher._read_acks_first(client, 7)  # type: ignore[arg-type]
    start = 0
    for cut in [*cuts, len(data)]:
        await client._ps.parse(data[start:cut])
        start = cut
    return client.events


async def test_parser_fast_path_hands_over_exactly_what_nats_py_parses() -> None:
    rng = random.Random(20261)
    for _ in range(150):
        data = _protocol(rng, 200)
        cuts = sorted(rng.sample(range(1, len(data)), rng.choice([1, 5, 40, 300])))
        assert await _parse(data, cuts, fast=True) == await _parse(data, cuts, fast=False)
    data = _protocol(rng, 40)
    every_byte = list(range(1, len(data)))
    assert await _parse(data, every_byte, fast=True) == await _parse(data, every_byte, fast=False)


async def test_compiled_ack_scanning_resolves_what_the_python_scanning_resolves() -> None:
    compiled_hot_path()
    rng = random.Random(20262)
    resolved: list[tuple[Any, ...]] = []
    for _ in range(150):
        data = _protocol(rng, 200)
        cuts = sorted(rng.sample(range(1, len(data)), rng.choice([1, 5, 40, 300])))
        compiled = await _parse(data, cuts, fast=True, compiled=True)
        assert compiled == await _parse(data, cuts, fast=True, compiled=False)
        resolved += [event for event in compiled if event[0] == "resolved"]
    assert len(resolved) > 3000
    assert any(event[2] is not None for event in resolved)  # error answers went through it too


def test_client_has_the_internals_the_fast_paths_use() -> None:
    """Fails on a nats-py release that renamed them (the publisher would fall back to the slow path)."""
    client = Client()
    for name in ("_send_command", "_flush_pending", "_flush_queue", "_max_pending_size", "stats",
                 "_process_msg", "_ps", "pending_data_size"):
        assert hasattr(client, name), name
    assert all(hasattr(client._ps, name) for name in ("buf", "state", "needed"))


async def test_many_batches_in_flight_all_acked(nats_server: NatsServer) -> None:
    stream = unique_stream()
    publisher = NatsPublisher(config(nats_server.address, stream))
    await publisher.connect()
    try:
        batches = [[message(stream, b * 2000 + n) for n in range(2000)] for b in range(10)]
        pending = [await publisher.send(batch) for batch in batches]
        results = await asyncio.gather(*pending)
    finally:
        await publisher.close()
    assert all(r == [None] * 2000 for r in results)
    assert await stream_messages(nats_server.url, stream) == 20000


def test_compiled_frames_are_what_nats_py_would_send() -> None:
    """The compiled HPUB frames are byte for byte nats-py's publish(subject, body, reply, headers)."""
    hot = compiled_hot_path()
    inbox = "_INBOX.xyz"
    prefixes = {f"s.{name}": f"HPUB s.{name} {inbox}." for name in ("a", "b.c", "ü")}
    batch = [Message(f"id-{n}", f"s.{['a', 'b.c', 'ü'][n % 3]}", b'{"n": %d}' % n * (n % 5), "public", "t", "INSERT")
             for n in range(50)]
    frames, payload = hot.nats_frames(batch, prefixes, 41, 1024 * 1024, len(b"NATS/1.0\r\nNats-Msg-Id: \r\n\r\n"))
    expected = b"".join(
        command.hpub_cmd(m.subject, f"{inbox}.{42 + n}", b"NATS/1.0\r\nNats-Msg-Id: " + m.id.encode() + b"\r\n\r\n",
                         m.body)
        for n, m in enumerate(batch))
    assert frames == expected
    assert payload == sum(len(m.body) for m in batch)
    header = len(b"NATS/1.0\r\nNats-Msg-Id: \r\n\r\n")
    odd = [
        Message("id 1", "s.a", b"{}", "public", "t", "INSERT"),  # a space: the Python path strips/escapes
        Message("id\r\n", "s.a", b"{}", "public", "t", "INSERT"),
        Message("idé", "s.a", b"{}", "public", "t", "INSERT"),
        Message("id-1", "s.unknown", b"{}", "public", "t", "INSERT"),  # subject not checked yet
        Message("id-1", "s.a", b"x" * 100, "public", "t", "INSERT"),  # over the limit below
    ]
    for message in odd:
        assert hot.nats_frames([batch[0], message], prefixes, 0, 90, header) is None, message
    assert hot.nats_frames([], prefixes, 0, 90, header) == (b"", 0)


@pytest.mark.parametrize("char", [" ", "\x00", "\t", "\r", "\x7f", "\x80", "é", "!", "~"])
def test_ids_are_checked_at_every_offset(char: str) -> None:
    """The compiled frames check an id 8 bytes at a time: a character nats-py would strip or escape (a space,
    a control, DEL, non-ASCII) at any offset of ids up to 24 characters sends the batch to the Python path;
    the printable characters at the ends of the range ("!" and "~") are framed as nats-py frames them."""
    hot = compiled_hot_path()
    prefixes = {"s.a": "HPUB s.a _INBOX.q."}
    header = len(b"NATS/1.0\r\nNats-Msg-Id: \r\n\r\n")
    plain = char in "!~"
    for length in range(1, 25):
        for at in range(length):
            ident = "a" * at + char + "b" * (length - at - 1)
            message = Message(ident, "s.a", b"{}", "public", "t", "INSERT")
            written = hot.nats_frames([message], prefixes, 0, 1024, header)
            if not plain:
                assert written is None, ident
                continue
            assert written is not None, ident
            assert written[0] == command.hpub_cmd(
                "s.a", "_INBOX.q.1", b"NATS/1.0\r\nNats-Msg-Id: " + ident.encode() + b"\r\n\r\n", b"{}"), ident


@pytest.mark.parametrize("sizes", [
    [0, 1, 5000, 3, 300_000, 70_000, 1_000_000, 2],  # the room taken from the first frame is outgrown
    [900_000] * 40,  # a large first frame: the room is not its size times the batch (16 MiB at first)
], ids=["growing", "large"])
def test_compiled_frames_of_any_sizes_are_what_nats_py_would_send(sizes: list[int]) -> None:
    hot = compiled_hot_path()
    prefixes = {"s.a": "HPUB s.a _INBOX.q."}
    batch = [Message(f"id-{n}", "s.a", bytes([65 + n % 26]) * size, "public", "t", "INSERT")
             for n, size in enumerate(sizes)]
    header = len(b"NATS/1.0\r\nNats-Msg-Id: \r\n\r\n")
    frames, payload = hot.nats_frames(batch, prefixes, 7, 1024 * 1024, header)
    assert frames == b"".join(
        command.hpub_cmd(m.subject, f"_INBOX.q.{8 + n}", b"NATS/1.0\r\nNats-Msg-Id: " + m.id.encode() +
                         b"\r\n\r\n", m.body) for n, m in enumerate(batch))
    assert payload == sum(sizes)


@pytest.mark.parametrize("seq", [0, 8, 9, 98, 99, 999_998, 10**12 - 1, 2**62])
def test_compiled_frames_count_sequence_numbers_like_nats_py(seq: int) -> None:
    """Reply subjects and sizes are written by the compiled path's own number formatting: across every
    change of digit count, byte for byte nats-py's; a negative start is left to the Python path."""
    hot = compiled_hot_path()
    prefixes = {"s.a": "HPUB s.a _INBOX.q."}
    batch = [Message(f"id-{n}", "s.a", b"x" * (n * 37), "public", "t", "INSERT") for n in range(4)]
    header = len(b"NATS/1.0\r\nNats-Msg-Id: \r\n\r\n")
    frames, _ = hot.nats_frames(batch, prefixes, seq, 1024 * 1024, header)
    assert frames == b"".join(
        command.hpub_cmd(m.subject, f"_INBOX.q.{seq + 1 + n}", b"NATS/1.0\r\nNats-Msg-Id: " + m.id.encode() +
                         b"\r\n\r\n", m.body) for n, m in enumerate(batch))
    assert hot.nats_frames(batch, prefixes, -1, 1024 * 1024, header) is None


def _nats_py_headers(message: Message) -> dict[str, str]:
    """The headers the listener sends with a message, as given to nats-py's publish()."""
    headers = {"Nats-Msg-Id": message.id, **message.headers}
    if message.content_type:
        headers["content-type"] = message.content_type
    return headers


def _nats_py_header_block(headers: dict[str, str]) -> bytes:
    return b"NATS/1.0\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items()) + b"\r\n"


def test_compiled_frames_carry_a_formats_headers_as_nats_py_would() -> None:
    """CloudEvents binary mode: ce- headers and a content type beside Nats-Msg-Id, in the compiled frames."""
    hot = compiled_hot_path()
    inbox = "_INBOX.xyz"
    prefixes = {"s.a": f"HPUB s.a {inbox}."}
    batch = [Message(f"id-{n}", "s.a", b'{"n": %d}' % n, "public", "t", "INSERT",
                     headers={"ce-id": f"id-{n}", "ce-subject": "public.t", "ce-time": "2026-01-02T03:04:05Z"},
                     content_type="application/json" if n % 2 else "") for n in range(6)]
    header = len(b"NATS/1.0\r\nNats-Msg-Id: \r\n\r\n")
    frames, _ = hot.nats_frames(batch, prefixes, 0, 1024 * 1024, header)
    expected = b"".join(command.hpub_cmd(m.subject, f"{inbox}.{1 + n}", _nats_py_header_block(_nats_py_headers(m)),
                                         m.body) for n, m in enumerate(batch))
    assert frames == expected
    lined = Message("id-7", "s.a", b"{}", "public", "t", "INSERT", header_lines=b"ce-id: id-7\r\nce-time: t\r\n")
    assert hot.nats_frames([lined], prefixes, 0, 1024 * 1024, header)[0] == command.hpub_cmd(
        "s.a", f"{inbox}.1", _nats_py_header_block({"Nats-Msg-Id": "id-7", "ce-id": "id-7", "ce-time": "t"}), b"{}")
    for odd in ({"ce-subject": "schéma.t"}, {"ce-subject": " padded"}, {"bad:name": "x"}, {"ce-x": "a\r\nb"}):
        message = Message("id-9", "s.a", b"{}", "public", "t", "INSERT", headers=odd)
        assert hot.nats_frames([message], prefixes, 0, 1024, header) is None, odd  # the Python path takes it


@pytest.mark.parametrize("count", [1, 3, 40])
def test_compiled_frames_longer_than_their_estimate_are_written_whole(count: int) -> None:
    """The compiled frames are written into bytes sized up front (the bodies and a guess per HPUB line and
    header): lines and headers far over the guess -- a long subject, a long id, many headers, empty bodies --
    grow it, byte for byte nats-py's frames still."""
    hot = compiled_hot_path()
    subject = "s." + "x" * 300
    prefixes = {subject: f"HPUB {subject} _INBOX.q."}
    headers = {f"ce-h{k}": "v" * 50 for k in range(8)}
    batch = [Message(f"id-{n}-" + "i" * 250, subject, b"", "public", "t", "INSERT", headers=headers)
             for n in range(count)]
    header = len(b"NATS/1.0\r\nNats-Msg-Id: \r\n\r\n")
    frames, payload = hot.nats_frames(batch, prefixes, 7, 1024 * 1024, header)
    assert frames == b"".join(command.hpub_cmd(m.subject, f"_INBOX.q.{8 + n}",
                                               _nats_py_header_block(_nats_py_headers(m)), m.body)
                              for n, m in enumerate(batch))
    assert payload == 0


def test_compiled_frames_of_headed_messages_are_what_nats_py_would_send() -> None:
    """A HeadedMessage (Debezium's schema head shared by a table's events, then the event's own bytes) is framed
    as its whole body, head and rest one after the other, without joining them: byte for byte nats-py's frames of
    the joined body, beside plain messages, heads of any size, a rest that is empty or long, one already joined;
    the limit counts the head. A long head is not even copied into the frames: they come in parts, the head itself
    one of them each time."""
    hot = compiled_hot_path()
    prefixes = {"s.a": "HPUB s.a _INBOX.q."}
    heads = [b'{"schema":{"type":"struct"},"payload":', b"h" * 5000, b"x"]
    batch: list[Message] = []
    for n in range(30):
        rest = b'{"n":%d}}' % n * (n % 4) if n != 13 else b"r" * 100_000  # a long rest after a long head too
        batch.append(Message(f"id-{n}", "s.a", heads[n % 3] + rest, "public", "t", "INSERT") if n % 5 == 4
                     else HeadedMessage(heads[n % 3], f"id-{n}", "s.a", rest, "public", "t", "INSERT"))
    assert batch[7].body == heads[1] + b'{"n":7}}' * 3  # joined once, kept joined: framed the same
    header = len(b"NATS/1.0\r\nNats-Msg-Id: \r\n\r\n")
    frames, payload = hot.nats_frames(batch, prefixes, 7, 1024 * 1024, header)
    assert all(m.head for n, m in enumerate(batch) if n % 5 != 4 and n != 7)  # nothing was joined to frame it
    whole = [(m.head or b"") + m.rest for m in batch]
    assert isinstance(frames, list)
    assert b"".join(frames) == b"".join(
        command.hpub_cmd(m.subject, f"_INBOX.q.{8 + n}", b"NATS/1.0\r\nNats-Msg-Id: " + m.id.encode() +
                         b"\r\n\r\n", whole[n]) for n, m in enumerate(batch))
    assert payload == sum(map(len, whole))
    long_head = [part for part in frames if part is heads[1]]
    assert len(long_head) == sum(1 for n, m in enumerate(batch) if m.head is heads[1])  # every one, as it is
    copied = b"|".join(part for part in frames if part is not heads[1]).count(b"h" * 5000)
    assert copied == sum(1 for n, m in enumerate(batch) if m.head is None and whole[n].startswith(heads[1]))
    short = [HeadedMessage(heads[0], f"id-{n}", "s.a", b"{}}", "public", "t", "INSERT") for n in range(3)]
    assert isinstance(hot.nats_frames(short, prefixes, 0, 1024 * 1024, header)[0], bytes)  # short heads: one buffer
    over = HeadedMessage(b"h" * 80, "id-1", "s.a", b"{}}", "public", "t", "INSERT")  # its rest alone fits
    assert hot.nats_frames([over], prefixes, 0, 80, header) is None  # the Python path says it is too large


def test_frames_written_again_from_the_batch_are_the_frames_written() -> None:
    """A batch the compiled path wrote whole keeps no copy of its frames until its acks: after a reconnect they are
    written again from the batch, the same bytes (its HeadedMessages joined since or not)."""
    hot = compiled_hot_path()
    inbox = "_INBOX.xyz"
    prefixes = {f"s.{name}": f"HPUB s.{name} {inbox}." for name in ("a", "b")}
    heads = [b'{"schema":{"type":"struct"},"payload":',
             b'{"schema":{"type":"struct","x":"%s"},"payload":' % (b"y" * 2000)]
    batch: list[Message] = [
        HeadedMessage(heads[n % 4 // 2], f"id-{n}", f"s.{'ab'[n % 2]}", b'{"n":%d}}' % n, "public", "t", "INSERT")
        if n % 3
        else Message(f"id-{n}", "s.a", b'{"n": %d}' % n, "public", "t", "INSERT", header_lines=b"ce-id: x\r\n")
        for n in range(20)]
    parts, _ = hot.nats_frames(batch, prefixes, 41, 1024 * 1024, len(b"NATS/1.0\r\nNats-Msg-Id: \r\n\r\n"))
    assert isinstance(parts, list)  # the long head was not copied: the frames came in parts
    assert batch[1].body.startswith(heads[0]) and batch[2].body.startswith(heads[1])  # joined since
    written = _Written(None, 42, 61, b"", None, batch, inbox)  # type: ignore[arg-type]
    assert written.wire(hot) == b"".join(parts)
    assert _Written(None, 42, 61, b"kept", [4], None, inbox).wire(hot) == b"kept"  # type: ignore[arg-type]


@pytest.mark.parametrize("path", ["compiled", "python", "one by one"])
async def test_headed_messages_arrive_whole(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """HeadedMessages reach a subscriber as their whole bodies on every write path: the compiled frames, the bulk
    path's Python loop and publish() one by one; with a short head copied into the frames and with a long one
    (the compiled path hands that one to the socket as it is, between the frames' parts)."""
    if path == "one by one":
        monkeypatch.setattr("listener.publishers.nats._BULK_ATTRIBUTES", ("_no_such_attribute",))
        monkeypatch.setattr(NatsPublisher, "_take_acks_from_parser", lambda *_: None)
    stream = unique_stream()
    watcher, seen = await watch(nats_server.url, stream)
    publisher = make_publisher(config(nats_server.address, stream), 5.0)
    if path == "python":
        monkeypatch.setattr(publisher, "_hot", None)
    await publisher.connect()
    short = b'{"schema":{"type":"struct","fields":[]},"payload":'
    long = b'{"schema":{"type":"struct","fields":[' + b",".join(b'{"field":"f%d"}' % n for n in range(200)) + \
        b'],"name":"v"},"payload":'
    heads = [short, long, long, short, long]
    batch = [HeadedMessage(heads[n], f"id-{n}", f"{stream}.public_t", b'{"n":%d}}' % n, "public", "t", "INSERT")
             for n in range(5)]
    try:
        assert await (await publisher.send(batch)) == [None] * 5
        await wait_until(lambda: len(seen) >= 5, 10, "every publish")
    finally:
        await publisher.close()
        await watcher.close()
    assert [m.data for m in seen] == [heads[n] + b'{"n":%d}}' % n for n in range(5)]


async def test_a_formats_headers_arrive_with_each_message(nats_server: NatsServer) -> None:
    """Headers (CloudEvents attributes) reach a subscriber on the compiled and on the Python path alike."""
    stream = unique_stream()
    watcher, seen = await watch(nats_server.url, stream)  # a core subscriber sees every publish as written
    publisher = make_publisher(config(nats_server.address, stream), 5.0)
    await publisher.connect()
    try:
        batch = [message(stream, n) for n in range(4)]
        for n, m in enumerate(batch):
            m.headers = {"ce-id": m.id, "ce-subject": "schéma.t" if n == 3 else "public.t"}  # 3: Python path
            m.content_type = "application/json"
        assert await (await publisher.send(batch)) == [None] * 4
        await wait_until(lambda: len(seen) >= 4, 10, "every publish")
    finally:
        await publisher.close()
        await watcher.close()
    assert [m.headers for m in seen] == [_nats_py_headers(m) for m in batch]


@pytest.mark.parametrize("bulk", [True, False])
async def test_header_lines_arrive_as_the_headers_they_spell(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch, bulk: bool
) -> None:
    """Header lines (CloudEvents attributes the compiled path rendered, Message.header_lines) reach a subscriber
    as headers: in the compiled frames, the bulk path's Python loop (a message it has to take) and one by one."""
    if not bulk:
        monkeypatch.setattr("listener.publishers.nats._BULK_ATTRIBUTES", ("_no_such_attribute",))
        monkeypatch.setattr(NatsPublisher, "_take_acks_from_parser", lambda *_: None)
    stream = unique_stream()
    watcher, seen = await watch(nats_server.url, stream)  # a core subscriber sees every publish as written
    publisher = make_publisher(config(nats_server.address, stream), 5.0)
    await publisher.connect()
    batches = [[message(stream, n) for n in range(3)], [message(stream, n) for n in range(3, 6)]]
    try:
        for batch in batches:
            for m in batch:
                m.header_lines = f"ce-id: {m.id}\r\nce-time: 2026-01-02T03:04:05Z\r\n".encode()
            if batch is batches[1]:
                batch[2].headers = {"ce-x": "schéma"}  # the bulk path's Python loop takes this batch
            assert await (await publisher.send(batch)) == [None] * 3
        await wait_until(lambda: len(seen) >= 6, 10, "every publish")
    finally:
        await publisher.close()
        await watcher.close()
    expected = [{"Nats-Msg-Id": m.id, **(m.headers or {}), "ce-id": m.id, "ce-time": "2026-01-02T03:04:05Z"}
                for m in batches[0] + batches[1]]
    assert [m.headers for m in seen] == expected
    assert [m.attributes()["ce-time"] for m in batches[0]] == ["2026-01-02T03:04:05Z"] * 3


async def test_frames_lost_with_the_connection_are_sent_again_before_later_ones(
    nats_server: NatsServer, make_proxy: Callable[..., TcpProxy]
) -> None:
    """A batch written just before the connection died (its bytes never reached the server) must not be
    overtaken by a batch buffered during the outage: after the reconnect the stream holds them in order."""
    proxy = make_proxy("127.0.0.1", nats_server.port)
    stream = unique_stream()
    publisher = NatsPublisher(config(proxy.address, stream), ack_timeout=30.0)
    await publisher.connect()
    try:
        proxy.pause()  # what is written now is held by the proxy...
        first = await publisher.send([message(stream, n) for n in range(10)])
        proxy.stop()  # ...and lost with the connection
        await wait_until(lambda: not publisher.ready, 10, "the client to notice the outage")
        later = await publisher.send([message(stream, n) for n in range(10, 20)])
        proxy.start()
        assert await first == [None] * 10
        assert await later == [None] * 10
    finally:
        await publisher.close()
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        assert (await js.stream_info(stream)).state.messages == 20
        ids = [(await js.get_msg(stream, seq)).headers["Nats-Msg-Id"] for seq in range(1, 21)]  # type: ignore[index]
    finally:
        await nc.close()
    assert ids == [message(stream, n).id for n in range(20)]


async def test_unacknowledged_batch_fails_by_ack_timeout_and_late_acks_are_ignored(
    nats_server: NatsServer, make_proxy: Callable[..., TcpProxy]
) -> None:
    """The delivery stage's deadline fails what JetStream did not answer; the publisher forgets those
    publishes, so their acks arriving later settle nothing (the retry is the one that counts)."""
    proxy = make_proxy("127.0.0.1", nats_server.port)
    stream = unique_stream()
    publisher = NatsPublisher(config(proxy.address, stream), ack_timeout=0.5)
    await publisher.connect()
    try:
        batch = [message(stream, n) for n in range(10)]
        proxy.pause()  # bytes stop flowing, the connection stays open: no acks come
        results = await (await publisher.send(batch))
        assert all(isinstance(r, AckTimeout) and "no acknowledgement within 0.5s" in str(r) for r in results)
        await asyncio.sleep(0)
        assert not publisher._windows and publisher._batches == {}
        proxy.resume()  # the publishes reach the stream now, and their acks come back to nobody
        await wait_until(lambda: publisher.ready, 10, "the connection to carry bytes again")
        assert await (await publisher.send(batch)) == [None] * 10  # the retry; JetStream drops the copies
        assert not publisher._windows and publisher._batches == {}
    finally:
        await publisher.close()
    assert await stream_messages(nats_server.url, stream) == 10
