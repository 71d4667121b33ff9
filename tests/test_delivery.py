"""The delivery state machine: batches, acknowledgements, retries, backpressure, the confirmable LSN.

The publisher here is a small in-memory stand-in that records what it was handed and acknowledges
(or fails) each message as the test scripts it; it is a unit test of :class:`Delivery` and of its
per-batch tracker :class:`Acks` (the one ``ackTimeout`` of every broker), not of a broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

import orjson
import pytest

from listener import metrics
from listener.config import NatsPublisherConfig
from listener.delivery import AckResults, Acks, Delivery, publish
from listener.errors import AckTimeout, BrokerConfigError, MessageRejected, MessageTooLarge, PublishError
from listener.message import HeadedMessage, Message, message_size
from listener.publishers.base import Publisher

RETRY_CAP = 0.05  # seconds: the backoff between retries stays tiny


class FakePublisher(Publisher):
    """Acks every message unless scripted otherwise; can hold acks until the test releases them."""

    broker = "fake"

    def __init__(self, *, hold: bool = False, ack_timeout: float = 10.0) -> None:
        super().__init__(NatsPublisherConfig(type="nats", address="fake:1", topic="t"), ack_timeout)
        self.hold = hold
        self.sends: list[list[Message]] = []  # every send call, in call order
        self.held: list[tuple[Acks, AckResults]] = []  # held sends, by send index
        self.outcomes: dict[str, list[PublishError | None]] = {}  # per message id, one per attempt
        self._changed = asyncio.Event()

    def script(self, message_id: str, *outcomes: PublishError | None) -> None:
        """Outcomes of the next attempts at ``message_id`` (afterwards: acked)."""
        self.outcomes[message_id] = list(outcomes)

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    @property
    def ready(self) -> bool:
        return True

    async def publish(self, batch: Sequence[Message], acks: Acks) -> None:
        messages = list(batch)
        self.sends.append(messages)
        results: AckResults = []
        for message in messages:
            queue = self.outcomes.get(message.id)
            results.append(queue.pop(0) if queue else None)
        if self.hold:
            self.held.append((acks, results))
        else:
            for index, result in enumerate(results):
                acks.settle(index, result)
        self._changed.set()

    def release(self, index: int) -> None:
        """Deliver the scripted acknowledgements of held send number ``index``."""
        acks, results = self.held[index]
        for position, result in enumerate(results):
            acks.settle(position, result)

    def sent_ids(self, subject: str | None = None) -> list[str]:
        return [m.id for batch in self.sends for m in batch if subject is None or m.subject == subject]

    async def wait_sends(self, count: int) -> None:
        async with asyncio.timeout(5):
            while len(self.sends) < count:
                self._changed.clear()
                await self._changed.wait()


def msg(ident: str, table: str = "users") -> Message:
    return Message(ident, f"wal.public_{table}", orjson.dumps({"id": ident}), "public", table, "INSERT", None)


async def until(condition: Callable[[], bool]) -> None:
    """Let the event loop run (yielding, no timed sleeps) until ``condition`` holds."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    pytest.fail("condition never became true")


async def settle() -> None:
    """Give the delivery tasks a bounded number of loop turns to process what is ready."""
    for _ in range(20):
        await asyncio.sleep(0)


def counter(name: str, labels: dict[str, str]) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


Factory = Callable[..., Delivery]


@pytest.fixture
async def make_delivery() -> AsyncIterator[Factory]:
    created: list[Delivery] = []

    def make(publisher: Publisher, **kwargs: object) -> Delivery:
        options: dict[str, object] = {"max_in_flight": 100, "batch_size": 10, "retry_cap": RETRY_CAP}
        options.update(kwargs)
        delivery = Delivery(publisher, **options)  # type: ignore[arg-type]
        delivery.start()
        created.append(delivery)
        return delivery

    yield make
    for delivery in created:
        await delivery.close()


async def drained(delivery: Delivery) -> None:
    async with asyncio.timeout(5):
        await delivery.drain()


# -- confirmation ---------------------------------------------------------------------------------------------


async def test_until_settled_ends_when_the_last_batch_in_flight_is_settled(make_delivery: Factory) -> None:
    """The feedback task's coalescing wait: with batches in flight it ends as soon as the last one is settled
    (True); with nothing in flight it is a plain wait of the whole timeout (False)."""
    pub = FakePublisher(hold=True)
    d = make_delivery(pub)
    d.add(msg("a"))
    d.commit(100, 1.0)
    d.seal()
    await pub.wait_sends(1)
    waiting = asyncio.ensure_future(d.until_settled(60.0))
    await settle()
    assert not waiting.done()
    pub.release(0)
    async with asyncio.timeout(5):
        assert await waiting is True
    assert d.confirmed_lsn == 100
    assert await d.until_settled(0.0) is False  # nothing in flight: no early end


async def test_acked_is_done_when_bytes_drop_and_when_the_confirmed_lsn_moves(make_delivery: Factory) -> None:
    """What the backfill awaits instead of polling: a batch acknowledged out of order (bytes drop, nothing
    confirmable yet) ends one wait; the confirmable LSN moving ends the next; a wait with nothing happening
    stays open."""
    pub = FakePublisher(hold=True)
    d = make_delivery(pub, batch_size=1)
    d.add(msg("a"))
    d.commit(100, 1.0)
    d.add(msg("b"))
    d.commit(200, 1.0)
    d.seal()
    await pub.wait_sends(2)
    first = d.acked()
    await settle()
    assert not first.done()
    pub.release(1)  # the second batch: its bytes are freed, the LSN cannot move past the first one
    async with asyncio.timeout(5):
        await first
    assert d.confirmed_lsn == 0 and d.in_flight == 1
    second = d.acked()
    await settle()
    assert not second.done()
    pub.release(0)
    async with asyncio.timeout(5):
        await second
    assert d.confirmed_lsn == 200
    third = d.acked()
    d.commit(300, 1.0)
    d.seal()  # nothing in flight: confirmable at once, from the reader's side
    assert third.done() and d.confirmed_lsn == 300


async def test_confirms_a_transaction_after_all_its_events_are_acked(make_delivery: Factory) -> None:
    pub = FakePublisher(hold=True)
    d = make_delivery(pub)
    d.add(msg("a"))
    d.add(msg("b"))
    d.commit(100, 1.0)
    d.seal()
    await pub.wait_sends(1)
    await settle()
    assert d.confirmed_lsn == 0
    assert d.in_flight == 2
    pub.release(0)
    await drained(d)
    assert d.confirmed_lsn == 100
    assert d.in_flight == 0
    assert d.idle


async def test_never_confirms_past_a_failed_event(make_delivery: Factory) -> None:
    pub = FakePublisher()
    pub.script("b", PublishError("nope"), PublishError("still no"))
    d = make_delivery(pub, batch_size=2)
    d.add(msg("a"))
    d.add(msg("b"))  # seals batch 1
    d.commit(100, 1.0)
    d.add(msg("c"))
    d.commit(200, 2.0)
    d.seal()
    await pub.wait_sends(2)
    await settle()
    assert d.confirmed_lsn == 0  # "c" is acked, but "b" of the earlier batch is not
    await drained(d)
    assert d.confirmed_lsn == 200
    assert pub.sent_ids() == ["a", "b", "c", "b", "b"]


async def test_failed_event_is_retried_as_the_same_message(make_delivery: Factory) -> None:
    pub = FakePublisher()
    pub.script("x", PublishError("timeout"), PublishError("timeout"))
    d = make_delivery(pub)
    first = msg("x")
    d.add(msg("w"))
    d.add(first)
    d.add(msg("y"))
    d.commit(50, 1.0)
    before = counter("publish_errors_total", {"reason": "publish_failed"})
    await drained(d)
    assert d.confirmed_lsn == 50
    assert pub.sends[0] == [pub.sends[0][0], first, pub.sends[0][2]]
    assert pub.sends[1] == [first] and pub.sends[2] == [first]  # only the failed one, same object, same id
    assert all(m is first for m in pub.sends[1] + pub.sends[2])
    assert counter("publish_errors_total", {"reason": "publish_failed"}) == before + 2
    assert not d.failing


async def test_send_that_raises_counts_as_all_failed_and_is_retried(make_delivery: Factory) -> None:
    class Flaky(FakePublisher):
        calls = 0

        async def publish(self, batch: Sequence[Message], acks: Acks) -> None:
            self.calls += 1
            if self.calls == 1:
                raise PublishError("connection lost")
            await super().publish(batch, acks)

    pub = Flaky()
    d = make_delivery(pub)
    d.add(msg("a"))
    d.add(msg("b"))
    d.commit(10, 1.0)
    await drained(d)
    assert d.confirmed_lsn == 10
    assert pub.sent_ids() == ["a", "b"]


async def test_out_of_order_acks_still_confirm_in_order(make_delivery: Factory) -> None:
    pub = FakePublisher(hold=True)
    confirmations: list[int] = []
    d = make_delivery(pub, on_confirmable=lambda: confirmations.append(d.confirmed_lsn))
    d.add(msg("t1"))
    d.commit(100, 1.0)
    d.seal()
    d.add(msg("t2"))
    d.commit(200, 2.0)
    d.seal()
    d.add(msg("t3"))
    d.commit(300, 3.0)
    d.seal()
    await pub.wait_sends(3)
    pub.release(2)
    pub.release(1)
    await until(lambda: d.in_flight == 1)
    assert d.confirmed_lsn == 0  # batches 2 and 3 are acked, batch 1 is not
    pub.release(0)
    await drained(d)
    assert d.confirmed_lsn == 300
    assert d.confirmed_commit_time == 3.0
    assert confirmations == [300]


async def test_partial_out_of_order_confirms_up_to_the_gap(make_delivery: Factory) -> None:
    pub = FakePublisher(hold=True)
    d = make_delivery(pub)
    for n, lsn in (("a", 100), ("b", 200), ("c", 300)):
        d.add(msg(n))
        d.commit(lsn, lsn / 100)
        d.seal()
    await pub.wait_sends(3)
    pub.release(0)
    pub.release(2)
    await until(lambda: d.in_flight == 1)
    assert d.confirmed_lsn == 100
    pub.release(1)
    await drained(d)
    assert d.confirmed_lsn == 300


async def test_transaction_spanning_batches_confirms_only_when_all_are_acked(make_delivery: Factory) -> None:
    pub = FakePublisher(hold=True)
    d = make_delivery(pub, batch_size=2)
    for i in range(5):
        d.add(msg(f"e{i}"))
    d.commit(500, 5.0)
    d.seal()
    await pub.wait_sends(3)
    assert [len(b) for b in pub.sends] == [2, 2, 1]
    pub.release(2)
    pub.release(0)
    await until(lambda: d.in_flight == 2)
    assert d.confirmed_lsn == 0
    pub.release(1)
    await drained(d)
    assert d.confirmed_lsn == 500


# -- empty transactions and idle confirmation -----------------------------------------------------------------


async def test_empty_transaction_confirms_immediately_when_nothing_is_in_flight(make_delivery: Factory) -> None:
    pub = FakePublisher()
    confirmations: list[int] = []
    d = make_delivery(pub, on_confirmable=lambda: confirmations.append(d.confirmed_lsn))
    d.commit(700, 7.0)
    d.seal()
    assert d.confirmed_lsn == 700
    assert confirmations == [700]
    assert pub.sends == []


async def test_empty_transaction_waits_behind_earlier_in_flight_batches(make_delivery: Factory) -> None:
    pub = FakePublisher(hold=True)
    d = make_delivery(pub)
    d.add(msg("a"))
    d.commit(100, 1.0)
    d.seal()
    d.commit(150, 1.5)  # a transaction whose changes were all filtered out
    d.seal()
    await pub.wait_sends(1)
    await settle()
    assert d.confirmed_lsn == 0
    pub.release(0)
    await drained(d)
    assert d.confirmed_lsn == 150
    assert len(pub.sends) == 1  # nothing was sent for the empty transaction


async def test_seal_without_events_or_commit_does_nothing(make_delivery: Factory) -> None:
    pub = FakePublisher()
    d = make_delivery(pub)
    d.seal()
    await drained(d)
    assert d.confirmed_lsn == 0
    assert pub.sends == []


async def test_idle_confirm_advances_when_idle(make_delivery: Factory) -> None:
    pub = FakePublisher()
    d = make_delivery(pub)
    d.idle_confirm(1000)
    assert d.confirmed_lsn == 1000
    d.idle_confirm(900)  # never backwards
    assert d.confirmed_lsn == 1000


async def test_idle_confirm_does_nothing_while_events_are_in_flight(make_delivery: Factory) -> None:
    pub = FakePublisher(hold=True)
    d = make_delivery(pub)
    d.add(msg("a"))
    d.commit(100, 1.0)
    d.seal()
    await pub.wait_sends(1)
    assert not d.idle
    d.idle_confirm(5000)
    assert d.confirmed_lsn == 0
    pub.release(0)
    await drained(d)
    assert d.confirmed_lsn == 100
    d.idle_confirm(5000)
    assert d.confirmed_lsn == 5000


async def test_idle_confirm_does_nothing_with_an_open_batch(make_delivery: Factory) -> None:
    pub = FakePublisher()
    d = make_delivery(pub)
    d.add(msg("a"))  # read but not yet sealed
    d.idle_confirm(5000)
    assert d.confirmed_lsn == 0
    d.commit(100, 1.0)
    await drained(d)
    assert d.confirmed_lsn == 100


# -- backpressure ------------------------------------------------------------------------------------------------


async def test_full_at_max_in_flight_and_wait_for_space_returns_after_acks(make_delivery: Factory) -> None:
    pub = FakePublisher(hold=True)
    d = make_delivery(pub, max_in_flight=3, batch_size=100)
    stop = asyncio.Event()
    d.add(msg("a"))
    d.add(msg("b"))
    assert not d.full
    d.add(msg("c"))
    assert d.full
    waiter = asyncio.create_task(d.wait_for_space(stop))
    await pub.wait_sends(1)  # wait_for_space sealed the open batch so it can be acked
    await settle()
    assert not waiter.done()
    pub.release(0)
    async with asyncio.timeout(5):
        await waiter
    assert not d.full
    assert d.in_flight == 0


async def test_wait_for_space_returns_when_stopped(make_delivery: Factory) -> None:
    pub = FakePublisher(hold=True)
    d = make_delivery(pub, max_in_flight=1)
    stop = asyncio.Event()
    d.add(msg("a"))
    assert d.full
    waiter = asyncio.create_task(d.wait_for_space(stop))
    await pub.wait_sends(1)
    await settle()
    assert not waiter.done()
    stop.set()
    async with asyncio.timeout(5):
        await waiter
    assert d.full  # stopping does not pretend there is room
    pub.release(0)
    await drained(d)


async def test_wait_for_space_with_stop_already_set_returns_at_once(make_delivery: Factory) -> None:
    pub = FakePublisher(hold=True)
    d = make_delivery(pub, max_in_flight=1)
    d.add(msg("a"))
    stop = asyncio.Event()
    stop.set()
    async with asyncio.timeout(5):
        await d.wait_for_space(stop)
    assert d.full
    await pub.wait_sends(1)
    pub.release(0)
    await drained(d)


async def test_partial_ack_frees_room(make_delivery: Factory) -> None:
    pub = FakePublisher(hold=True)
    d = make_delivery(pub, max_in_flight=4, batch_size=2)
    for i in range(4):
        d.add(msg(f"m{i}"))
    assert d.full
    waiter = asyncio.create_task(d.wait_for_space(asyncio.Event()))
    await pub.wait_sends(2)
    pub.release(1)  # the second batch frees two slots
    async with asyncio.timeout(5):
        await waiter
    assert d.in_flight == 2
    assert not d.full
    pub.release(0)
    await drained(d)


async def test_once_full_reading_resumes_only_when_a_whole_batch_fits(make_delivery: Factory) -> None:
    """No silly window: freeing a few slots must not wake the reader to add a few events and seal a tiny
    batch (batches then stayed tiny for good, each its own broker request, while the broker was slower)."""
    pub = FakePublisher(hold=True)
    d = make_delivery(pub, max_in_flight=10, batch_size=4)
    d.add(msg("s0"))
    d.seal()  # a one-event batch, acked on its own below
    for i in range(9):
        d.add(msg(f"m{i}"))
    assert d.full
    waiter = asyncio.create_task(d.wait_for_space(asyncio.Event()))
    await pub.wait_sends(4)  # [s0], [m0..m3], [m4..m7], [m8]
    pub.release(0)  # one slot free: not enough for a batch
    await settle()
    assert not waiter.done()
    pub.release(1)  # five free: a whole batch fits
    async with asyncio.timeout(5):
        await waiter
    assert d.in_flight == 5
    pub.release(2)
    pub.release(3)
    await drained(d)


async def test_in_flight_counts_failed_events_until_they_are_acked(make_delivery: Factory) -> None:
    pub = FakePublisher()
    pub.script("b", PublishError("no"))
    d = make_delivery(pub, max_in_flight=2, batch_size=2)
    d.add(msg("a"))
    d.add(msg("b"))
    assert d.full
    await until(lambda: d.in_flight == 1)  # "a" acked, "b" waiting for its retry
    assert not d.full
    await drained(d)
    assert d.in_flight == 0


# -- the byte bound (maxInFlightBytes) ----------------------------------------------------------------------------

MIB = 1024 * 1024


def sized(ident: str, size: int, key: bytes | None = None) -> Message:
    """An event whose body and key hold ``size`` bytes together."""
    body = b"x" * (size - len(key or b""))
    return Message(ident, "wal.public_docs", body, "public", "docs", "INSERT", key)


async def test_full_at_max_in_flight_bytes_counting_bodies_and_keys(make_delivery: Factory) -> None:
    pub = FakePublisher(hold=True)
    d = make_delivery(pub, max_in_flight=1000, batch_size=1000, max_in_flight_bytes=4 * MIB)
    assert message_size(sized("k", 1000, key=b"123")) == 1000
    for i in range(3):
        assert not d.add(sized(f"m{i}", MIB, key=b"k"))
    assert d.in_flight_bytes == 3 * MIB and not d.full
    assert d.add(sized("m3", MIB))  # the fourth MiB reaches the bound
    assert d.full and d.in_flight == 4
    waiter = asyncio.create_task(d.wait_for_space(asyncio.Event()))
    await pub.wait_sends(4)  # batches of at most maxInFlightBytes / 4: one event each here
    assert [len(batch) for batch in pub.sends] == [1, 1, 1, 1]
    pub.release(0)  # one MiB free = one whole batch (the hysteresis of the event bound, in bytes)
    async with asyncio.timeout(5):
        await waiter
    assert d.in_flight_bytes == 3 * MIB and not d.full
    for index in (1, 2, 3):
        pub.release(index)
    await drained(d)
    assert d.in_flight_bytes == 0 and d.in_flight == 0
    assert metrics.REGISTRY.get_sample_value("in_flight_bytes") == 0


def test_a_headed_message_is_its_head_and_rest() -> None:
    """A HeadedMessage's body is its head and rest joined (once, then kept); setting it replaces both; its size
    counts the head, without joining."""
    m = HeadedMessage(b'{"schema":1,"payload":', "m0", "wal.public_docs", b"{}}", "public", "docs", "INSERT", b"k")
    assert message_size(m) == len(b'{"schema":1,"payload":{}}') + 1 and m.head and m.rest == b"{}}"
    assert m.body == b'{"schema":1,"payload":{}}' and (m.head, m.rest) == (None, m.body)
    assert message_size(m) == len(m.body) + 1
    m.body = b"{}"
    assert (m.head, m.rest, m.body) == (None, b"{}", b"{}")
    plain = Message("m1", "wal.public_docs", b"{}", "public", "docs", "INSERT")
    assert (plain.head, plain.rest) == (None, b"{}")


async def test_headed_messages_count_their_heads_without_joining_them(make_delivery: Factory) -> None:
    pub = FakePublisher(hold=True)
    d = make_delivery(pub, max_in_flight=1000, batch_size=1000, max_in_flight_bytes=4 * MIB)
    head = b"h" * (MIB // 2)  # shared by every event, counted in each

    def headed(ident: str) -> HeadedMessage:
        return HeadedMessage(head, ident, "wal.public_docs", b"x" * (MIB // 2 - 3), "public", "docs", "INSERT", b"key")

    added = [headed(f"m{i}") for i in range(4)]
    assert not any(d.add(m) for m in added[:3])
    assert d.in_flight_bytes == 3 * MIB and not d.full
    assert d.add(added[3])  # the fourth MiB reaches the bound
    await pub.wait_sends(4)
    for index in range(4):
        pub.release(index)
    await drained(d)
    assert d.in_flight_bytes == 0 and d.in_flight == 0
    assert all(m.head is head for m in added)  # never joined on the way


async def test_resumes_only_when_a_whole_batch_of_bytes_fits(make_delivery: Factory) -> None:
    pub = FakePublisher(hold=True)
    d = make_delivery(pub, max_in_flight=1000, batch_size=1000, max_in_flight_bytes=8 * MIB)  # batches: 2 MiB
    d.add(sized("s0", MIB // 2))
    d.seal()  # a half-MiB batch, acked on its own below
    for i in range(15):
        d.add(sized(f"m{i}", MIB // 2))
    assert d.full
    waiter = asyncio.create_task(d.wait_for_space(asyncio.Event()))
    await pub.wait_sends(5)
    assert [len(batch) for batch in pub.sends] == [1, 4, 4, 4, 3]
    pub.release(0)  # half a MiB free: not enough for a batch
    await settle()
    assert not waiter.done()
    pub.release(1)  # 2.5 MiB free: a whole batch fits
    async with asyncio.timeout(5):
        await waiter
    assert d.in_flight_bytes == 11 * MIB // 2
    for index in (2, 3, 4):
        pub.release(index)
    await drained(d)
    assert d.in_flight_bytes == 0


async def test_an_event_larger_than_the_bound_still_goes_alone(make_delivery: Factory) -> None:
    pub = FakePublisher(hold=True)
    d = make_delivery(pub, max_in_flight=1000, batch_size=1000, max_in_flight_bytes=2 * MIB)
    d.add(msg("before"))
    assert d.add(sized("huge", 5 * MIB, key=b"1"))  # accepted, and the stage is full
    assert d.in_flight_bytes > 5 * MIB
    waiter = asyncio.create_task(d.wait_for_space(asyncio.Event()))
    await pub.wait_sends(2)
    assert [[m.id for m in batch] for batch in pub.sends] == [["before"], ["huge"]]  # a batch of its own
    pub.release(1)  # the huge one acknowledged: room again (only "before" is in flight)
    async with asyncio.timeout(5):
        await waiter
    assert d.in_flight_bytes == message_size(msg("before")) and not d.full
    pub.release(0)
    d.commit(10, 1.0)
    await drained(d)
    assert d.confirmed_lsn == 10


async def test_batches_are_sealed_by_bytes_whatever_batch_size_says(make_delivery: Factory) -> None:
    pub = FakePublisher()
    d = make_delivery(pub, max_in_flight=100_000, batch_size=100_000, max_in_flight_bytes=1024 * MIB)
    for i in range(20):
        d.add(sized(f"m{i}", MIB))
    d.seal()
    await drained(d)
    assert [len(batch) for batch in pub.sends] == [4] * 5  # 4 MiB each
    assert d.in_flight_bytes == 0


async def test_failed_events_keep_their_bytes_until_acked(make_delivery: Factory) -> None:
    pub = FakePublisher()
    pub.script("b", PublishError("no"))
    d = make_delivery(pub, max_in_flight=100, batch_size=2, max_in_flight_bytes=4 * MIB)
    d.add(sized("a", MIB))
    d.add(sized("b", 3 * MIB))
    assert d.full
    await until(lambda: d.in_flight_bytes == 3 * MIB)  # "a" acked, "b" waiting for its retry
    assert not d.full
    await drained(d)
    assert d.in_flight_bytes == 0


# -- draining, batching, order ------------------------------------------------------------------------------------


async def test_drain_waits_for_every_batch(make_delivery: Factory) -> None:
    pub = FakePublisher(hold=True)
    d = make_delivery(pub, batch_size=1)
    for i in range(3):
        d.add(msg(f"m{i}"))
    d.commit(300, 3.0)
    drain = asyncio.create_task(d.drain())
    await pub.wait_sends(3)
    pub.release(0)
    pub.release(2)
    await settle()
    assert not drain.done()
    pub.release(1)
    async with asyncio.timeout(5):
        await drain
    assert d.confirmed_lsn == 300
    assert d.idle


async def test_drain_with_nothing_to_do_returns(make_delivery: Factory) -> None:
    d = make_delivery(FakePublisher())
    await drained(d)
    assert d.idle


async def test_batch_size_splits_batches(make_delivery: Factory) -> None:
    pub = FakePublisher()
    d = make_delivery(pub, batch_size=3)
    for i in range(8):
        d.add(msg(f"m{i}"))
    d.commit(80, 8.0)
    await drained(d)
    assert [len(b) for b in pub.sends] == [3, 3, 2]
    assert d.confirmed_lsn == 80


async def test_sending_order_equals_add_order(make_delivery: Factory) -> None:
    pub = FakePublisher()
    d = make_delivery(pub, batch_size=7)
    expected = [f"m{i:03d}" for i in range(100)]
    for i, ident in enumerate(expected):
        d.add(msg(ident))
        if i % 13 == 12:
            d.commit(i + 1, float(i))
            d.seal()
    d.commit(1000, 100.0)
    await drained(d)
    assert pub.sent_ids() == expected
    assert d.confirmed_lsn == 1000



async def test_caught_up_sends_at_once_when_nothing_waits_for_acks(make_delivery: Factory) -> None:
    pub = FakePublisher(hold=True)
    d = make_delivery(pub)
    d.add(msg("a"))
    d.caught_up()
    await pub.wait_sends(1)
    assert pub.sent_ids() == ["a"]


async def test_caught_up_again_while_a_batch_waits_sends_what_was_read_meanwhile_together(
    make_delivery: Factory,
) -> None:
    pub = FakePublisher(hold=True)
    d = make_delivery(pub)
    d.add(msg("a"))
    d.caught_up()
    await pub.wait_sends(1)
    for ident in ("b", "c", "d"):  # the reader wakes up three times with one event each
        d.add(msg(ident))
        d.caught_up()
    d.commit(40, 4.0)
    await settle()
    assert len(pub.sends) == 1  # the three wait for the first batch's acks
    pub.release(0)
    await pub.wait_sends(2)
    assert [m.id for m in pub.sends[1]] == ["b", "c", "d"]
    pub.release(1)
    await drained(d)
    assert d.confirmed_lsn == 40


async def test_events_read_while_an_earlier_one_is_retried_go_out_after_it(make_delivery: Factory) -> None:
    pub = FakePublisher()
    pub.script("a", MessageRejected("nack"), MessageRejected("nack"))
    d = make_delivery(pub)
    d.add(msg("a"))
    d.commit(10, 1.0)
    d.caught_up()
    await until(lambda: d.failing)
    d.add(msg("b"))
    d.commit(20, 2.0)
    d.caught_up()
    await drained(d)
    assert pub.sent_ids() == ["a", "a", "a", "b"]  # "b" waited until "a" was stored
    assert d.confirmed_lsn == 20


async def test_an_event_refused_for_good_holds_nothing_back(make_delivery: Factory) -> None:
    pub = FakePublisher()
    pub.script("a", *[MessageRejected("rejected", retryable=False)] * 3)
    d = make_delivery(pub, retry_cap=5.0, on_error="halt")
    d.add(msg("a"))
    d.caught_up()
    await until(lambda: d.failing)
    d.add(msg("b"))
    d.caught_up()  # sent at once: no lingering behind a batch that is being retried
    await until(lambda: "b" in pub.sent_ids())
    assert pub.sent_ids() == ["a", "b"]
async def test_published_events_metric_counts_acks(make_delivery: Factory) -> None:
    pub = FakePublisher()
    pub.script("p2", PublishError("once"))
    d = make_delivery(pub)
    labels = {"subject": "wal.public_metric_tbl", "table": "metric_tbl"}
    before = counter("published_events_total", labels)
    d.add(msg("p1", table="metric_tbl"))
    d.add(msg("p2", table="metric_tbl"))
    d.commit(1, 1.0)
    await drained(d)
    assert counter("published_events_total", labels) == before + 2


# -- permanent errors: dead letter or halt ---------------------------------------------------------------------------


async def test_permanent_error_with_skip_goes_to_the_dead_letter_subject(make_delivery: Factory) -> None:
    pub = FakePublisher()
    pub.script("big", MessageTooLarge("message too large"))
    d = make_delivery(pub, on_error="skip", dead_letter_subject="wal.dead_letter")
    before = counter("dead_lettered_events_total", {"table": "dlq_tbl"})
    original = msg("big", table="dlq_tbl")
    d.add(msg("ok1", table="dlq_tbl"))
    d.add(original)
    d.add(msg("ok2", table="dlq_tbl"))
    d.commit(400, 4.0)
    await drained(d)
    assert d.confirmed_lsn == 400
    assert counter("dead_lettered_events_total", {"table": "dlq_tbl"}) == before + 1
    assert pub.sent_ids() == ["ok1", "big", "ok2", "big"]  # the original is not retried
    letter = pub.sends[-1][0]
    assert letter.subject == "wal.dead_letter"
    assert letter.id == "big"
    assert letter.table == "dlq_tbl"
    content = orjson.loads(letter.body)
    assert content["subject"] == original.subject
    assert content["event"] == orjson.loads(original.body)
    assert "message too large" in content["error"]


async def test_dead_letter_failure_retries_the_original(make_delivery: Factory) -> None:
    class DeadLetterDown(FakePublisher):
        refused = 0

        async def publish(self, batch: Sequence[Message], acks: Acks) -> None:
            if batch[0].subject == "wal.dead_letter" and self.refused == 0:
                self.refused += 1
                raise PublishError("dead-letter topic unavailable")
            await super().publish(batch, acks)

    pub = DeadLetterDown()
    pub.script("big", MessageTooLarge("too large"), MessageTooLarge("too large"))
    d = make_delivery(pub, on_error="skip", dead_letter_subject="wal.dead_letter")
    d.add(msg("big", table="dlq2_tbl"))
    d.commit(10, 1.0)
    before = counter("dead_lettered_events_total", {"table": "dlq2_tbl"})
    await drained(d)
    assert d.confirmed_lsn == 10
    assert counter("dead_lettered_events_total", {"table": "dlq2_tbl"}) == before + 1
    assert pub.sent_ids() == ["big", "big", "big"]  # original, original again, then its dead letter
    assert pub.sends[-1][0].subject == "wal.dead_letter"


async def test_permanent_error_with_halt_is_retried_until_acked(make_delivery: Factory) -> None:
    pub = FakePublisher()
    pub.script("big", MessageRejected("rejected", retryable=False), MessageRejected("rejected", retryable=False))
    d = make_delivery(pub, on_error="halt", dead_letter_subject="wal.dead_letter")
    before = counter("dead_lettered_events_total", {"table": "halt_tbl"})
    d.add(msg("big", table="halt_tbl"))
    d.commit(20, 2.0)
    d.seal()
    await pub.wait_sends(1)
    await settle()
    assert d.confirmed_lsn == 0
    await drained(d)
    assert d.confirmed_lsn == 20
    assert pub.sent_ids() == ["big", "big", "big"]
    assert pub.sent_ids("wal.dead_letter") == []
    assert counter("dead_lettered_events_total", {"table": "halt_tbl"}) == before


async def test_failing_flag_while_retrying(make_delivery: Factory) -> None:
    pub = FakePublisher()
    pub.script("r", PublishError("1"), PublishError("2"), PublishError("3"))
    d = make_delivery(pub)
    d.add(msg("r"))
    d.commit(5, 1.0)
    d.seal()
    await pub.wait_sends(2)
    assert d.failing
    await drained(d)
    assert not d.failing
    assert d.confirmed_lsn == 5


async def test_a_batch_sent_again_waits_for_the_answer_to_an_earlier_first_attempt(make_delivery: Factory) -> None:
    pub = FakePublisher(hold=True)
    pub.script("b", PublishError("b1"))
    d = make_delivery(pub, batch_size=1)
    d.add(msg("a"))
    d.add(msg("b"))
    d.commit(10, 1.0)
    d.seal()
    await pub.wait_sends(2)
    pub.release(1)  # "b" fails while "a" has no answer yet: should "a" fail too, it must go first
    await until(lambda: d.failing)
    for _ in range(5):
        await asyncio.sleep(RETRY_CAP)  # several backoffs pass: "b" still waits for its turn
    assert pub.sent_ids() == ["a", "b"]
    pub.release(0)
    await pub.wait_sends(3)
    pub.release(2)
    await drained(d)
    assert pub.sent_ids() == ["a", "b", "b"]
    assert d.confirmed_lsn == 10


async def test_batches_are_sent_again_in_order_each_after_the_earlier_ones_are_acked(make_delivery: Factory) -> None:
    pub = FakePublisher(hold=True)
    pub.script("a", PublishError("a1"))
    pub.script("b", PublishError("b1"))
    pub.script("c", PublishError("c1"))
    d = make_delivery(pub, batch_size=1)
    d.add(msg("a"))
    d.add(msg("b"))
    d.add(msg("c"))
    d.commit(10, 1.0)
    d.seal()
    await pub.wait_sends(3)
    pub.release(2)  # "c" fails first, then "b", then "a": each waits for its backoff, then for its turn
    await until(lambda: d.failing)
    pub.release(1)
    pub.release(0)
    await pub.wait_sends(4)
    await settle()
    assert pub.sent_ids() == ["a", "b", "c", "a"]  # the others wait for "a" to be acknowledged
    d.add(msg("d"))
    d.seal()  # nothing newer goes while events wait to be sent again
    pub.release(3)
    await pub.wait_sends(5)
    await settle()
    assert pub.sent_ids()[4:] == ["b"]
    assert d.failing  # "b" has not been acknowledged yet
    pub.release(4)
    await pub.wait_sends(6)
    pub.release(5)
    await pub.wait_sends(7)
    assert pub.sent_ids()[5:] == ["c", "d"]
    pub.release(6)
    await drained(d)
    assert not d.failing
    assert d.confirmed_lsn == 10


async def test_retryable_rejection_with_skip_is_retried_not_dead_lettered(make_delivery: Factory) -> None:
    pub = FakePublisher()
    pub.script("r", MessageRejected("nack"), MessageRejected("nack"))
    d = make_delivery(pub, on_error="skip", dead_letter_subject="wal.dead_letter")
    before = counter("publish_errors_total", {"reason": "message_rejected"})
    d.add(msg("r", table="nack_tbl"))
    d.commit(30, 3.0)
    await drained(d)
    assert d.confirmed_lsn == 30
    assert pub.sent_ids() == ["r", "r", "r"]
    assert pub.sent_ids("wal.dead_letter") == []
    assert counter("publish_errors_total", {"reason": "message_rejected"}) == before + 2


# -- the ack timeout: one tracker per batch, owned by the delivery stage ------------------------------------------


async def test_batch_without_acks_fails_by_ack_timeout_and_is_retried(make_delivery: Factory) -> None:
    pub = FakePublisher(hold=True, ack_timeout=0.05)
    d = make_delivery(pub)
    before = counter("publish_errors_total", {"reason": "ack_timeout"})
    d.add(msg("a"))
    d.add(msg("b"))
    d.commit(100, 1.0)
    d.seal()
    await pub.wait_sends(2)  # nothing answered within 0.05 s: both sent again
    assert pub.sends[1] == pub.sends[0]
    assert counter("publish_errors_total", {"reason": "ack_timeout"}) == before + 2
    assert d.confirmed_lsn == 0 and d.failing
    pub.release(0)  # a late answer to the first attempt counts for nothing
    await settle()
    assert d.confirmed_lsn == 0
    pub.release(1)
    await drained(d)
    assert d.confirmed_lsn == 100
    assert not d.failing


async def test_ack_timeout_fails_only_what_is_still_waiting() -> None:
    pub = FakePublisher(hold=True)
    acks = await publish(pub, [msg("a"), msg("b"), msg("c")], 0.05)
    acks.settle(1, None)
    acks.settle(2, MessageRejected("nack"))
    results = await asyncio.wait_for(acks, 5)
    assert isinstance(results[0], AckTimeout) and results[1] is None and isinstance(results[2], MessageRejected)
    assert "fake: no acknowledgement within 0.05s" in str(results[0]) and results[0].broker == "fake"
    assert acks.timed_out and acks.done
    acks.settle(0, None)  # late
    assert isinstance(acks.results[0], AckTimeout)


async def test_a_run_of_acks_settles_what_still_waits_and_keeps_earlier_outcomes() -> None:
    acks = Acks(6, "fake")
    acks.settle(2, MessageRejected("nack"))
    acks.settle_run(0, 4)  # index 2 had its outcome already
    assert not acks.done and acks.left == 2
    acks.settle_run(0, 2)  # late duplicates: nothing changes
    assert acks.left == 2
    acks.settle_run(4, 6)
    results = await acks
    assert results[:2] == [None, None] and isinstance(results[2], MessageRejected) and results[3:] == [None] * 3


async def test_tracker_takes_the_first_outcome_and_calls_back_when_done() -> None:
    acks = Acks(3, "fake")
    finished: list[AckResults] = []
    acks.add_done_callback(lambda done: finished.append(list(done.results)))
    acks.settle(0)
    acks.settle(0, PublishError("again"))  # a second answer for the same message is ignored
    assert not acks.done and acks.waiting(1) and not acks.waiting(0)
    acks.fail_rest(PublishError("gone"))
    assert acks.done and not acks.timed_out
    assert [str(r) if r else r for r in await acks] == [None, "gone", "gone"]
    await settle()
    assert len(finished) == 1
    assert await Acks(0) == []  # an empty batch is settled at once


async def test_timeout_callbacks_run_before_the_rest_fails() -> None:
    acks = Acks(2, "fake")
    calls: list[str] = []

    def hand_over() -> None:  # e.g. outcomes collected in other threads
        calls.append("first")
        acks.settle(0)

    acks.on_timeout(hand_over)
    acks.on_timeout(lambda: calls.append("second"))
    acks.expire_after(0.01)
    results = await asyncio.wait_for(acks, 5)
    assert calls == ["first", "second"]
    assert results[0] is None and isinstance(results[1], AckTimeout)


async def test_timer_is_cancelled_once_everything_is_settled() -> None:
    acks = Acks(1, "fake")
    acks.expire_after(0.01)
    acks.settle(0)
    await asyncio.sleep(0.05)
    assert not acks.timed_out and await acks == [None]


async def test_publish_turns_a_raising_publisher_into_failed_results() -> None:
    class Broken(FakePublisher):
        async def publish(self, batch: Sequence[Message], acks: Acks) -> None:
            raise RuntimeError("bug")

    results = await (await publish(Broken(), [msg("a"), msg("b")], 5.0))
    assert all(type(r) is PublishError and "fake: RuntimeError('bug')" in str(r) for r in results)

    class Refused(FakePublisher):
        async def publish(self, batch: Sequence[Message], acks: Acks) -> None:
            raise BrokerConfigError("no such topic")

    with pytest.raises(BrokerConfigError):
        await publish(Refused(), [msg("a")], 5.0)
