"""The Pub/Sub publisher's hand-written protobuf, read back with Google's own generated types."""

from __future__ import annotations

import random

import pytest
from google.pubsub_v1.types import PublishRequest, PublishResponse

from listener.message import Message
from listener.publishers.pubsub import (
    MAX_REQUEST_MESSAGES,
    REQUEST_BYTES,
    Encoder,
    _requests,
    read_message_ids,
    topic_field,
    varint,
)

TOPIC = "projects/p/topics/wal.public_users"


def text(rng: random.Random, longest: int) -> str:
    alphabet = "aé_😀\x00\n\"\\" + "".join(chr(c) for c in range(32, 127))
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(longest)))


def random_message(rng: random.Random) -> tuple[Message, str]:
    headers = {text(rng, 8) + "h": text(rng, 20) for _ in range(rng.randrange(3))} or None
    event = Message(
        id=text(rng, 200) if rng.random() < 0.2 else f"0192c0de-0000-8000-8000-{rng.randrange(10**12):012d}",
        subject="wal.public_users",
        body=rng.randbytes(rng.choice((0, 5, 127, 128, 300, 20_000))),
        schema=text(rng, 10),
        table=text(rng, 140),
        action=rng.choice(("INSERT", "UPDATE", "DELETE", "READ")),
        headers=headers,
        content_type=rng.choice(("", "application/json", "application/cloudevents+json")),
    )
    return event, rng.choice(("", "k", '{"id":1}', text(rng, 300)))


def test_varint_matches_protobuf() -> None:
    for n in (1, 127, 128, 300, 16383, 16384, 2**21 + 5):  # (proto3 writes no empty field)
        topic = "x" * n  # a field's length is a varint: protobuf's own writing of it must be ours
        assert PublishRequest.serialize(PublishRequest(topic=topic)) == b"\x0a" + varint(n) + topic.encode()


def test_requests_are_what_googles_types_read() -> None:
    rng = random.Random(14)
    encoder = Encoder()
    for _ in range(300):
        events = [random_message(rng) for _ in range(rng.randrange(1, 6))]
        request = topic_field(TOPIC) + b"".join(
            encoder.message(event, key.encode()) if key else encoder.message(event) for event, key in events
        )
        parsed = PublishRequest.deserialize(request)
        assert parsed.topic == TOPIC
        assert len(parsed.messages) == len(events)
        for got, (event, key) in zip(parsed.messages, events, strict=True):
            assert got.data == event.body
            assert dict(got.attributes) == event.attributes()
            assert got.ordering_key == key


def test_message_ids_are_counted_from_a_publish_response() -> None:
    for count in (0, 1, 2, 127, 1000):
        response = PublishResponse.serialize(PublishResponse(message_ids=[str(10**15 + n) for n in range(count)]))
        assert read_message_ids(response) == count
    long_ids = PublishResponse.serialize(PublishResponse(message_ids=["x" * 200, "y" * 20_000]))
    assert read_message_ids(long_ids) == 2


def test_an_unexpected_response_field_is_refused() -> None:
    with pytest.raises(ValueError, match="unexpected field tag"):
        read_message_ids(b"\x08\x01")  # a varint field 1: not a PublishResponse


def test_requests_keep_pubsubs_limits() -> None:
    head = topic_field(TOPIC)
    small = [(n, b"\x12\x03abc") for n in range(2500)]
    packed = _requests(head, small)
    assert [len(indices) for indices, _ in packed] == [MAX_REQUEST_MESSAGES, MAX_REQUEST_MESSAGES, 500]
    assert [i for indices, _ in packed for i in indices] == list(range(2500))
    big = [(n, b"\x12" + b"x" * 3_000_000) for n in range(7)]
    sizes = [len(request) for _, request in _requests(head, big)]
    assert all(size <= REQUEST_BYTES + len(head) for size in sizes)
    assert sum(len(indices) for indices, _ in _requests(head, big)) == 7
