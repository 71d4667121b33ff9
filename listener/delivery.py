"""Stage 7 — delivery: pipelined batches to the publisher, retries, backpressure, the confirmable LSN.

Events are appended to an open batch; the reader seals it when it is full or when the replication
socket has nothing more to read right now, so batches are large under load and small when quiet.
Sealed batches are handed to the publisher strictly in order (one sender task), and their
acknowledgements are awaited concurrently, so many batches are in flight at once.

The promise: :attr:`Delivery.confirmed_lsn` only moves to a transaction's end LSN when every event of
that transaction and of every earlier one was acknowledged. A failed event is retried with backoff,
never skipped (``onError: skip`` sends an event the broker will never accept to the dead-letter topic
instead, and counts it). Retries keep the commit order: a batch is sent again only once every batch
before it is acknowledged, and no newer batch is handed over while one waits to be sent again (except
behind a batch whose events the broker refuses for good, under ``onError: halt``: that one holds nothing
back). In-flight events are bounded twice, in events by ``maxInFlight`` and in bytes
by ``maxInFlightBytes`` (an event's body and key, :func:`~listener.message.message_size`): the reader
waits when either is reached, so memory stays flat whatever the size of a transaction or of its rows.
A single event larger than the byte bound still goes (the bound is then reached by it alone: nothing
waits for room that can never come). Batches are bounded the same two ways: ``batchSize`` events, and
:func:`batch_bytes` bytes (3.5 MiB, less under a small ``maxInFlightBytes``); an event of that size or
more goes in a batch of its own.

Acknowledgements are tracked here too, the same way for every broker: each batch handed to the publisher
gets an :class:`Acks` tracker, the publisher reports each message's outcome on it as its client learns
it, and the tracker's deadline (``listener.ackTimeout``, one timer per batch) fails whatever is still
unacknowledged with an :class:`~listener.errors.AckTimeout`, which is retried like any other failure.
An acknowledgement arriving after that is ignored.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from listener import metrics
from listener.errors import AckTimeout, BrokerConfigError, PublishError
from listener.message import Message, message_size

if TYPE_CHECKING:  # the publishers import this module (Acks); delivery needs their type only
    from listener.publishers.base import Publisher

log = logging.getLogger("listener.delivery")

#: the outcome of each message of a batch: None (acknowledged) or why not
AckResults = list[PublishError | None]

_WAITING: Any = object()  # a message without an outcome yet

#: a batch is sealed once its events hold this many bytes, whatever ``batchSize`` says (see :func:`batch_bytes`).
#: 3.5 MiB, not 4: a batch's NATS frames (its bodies and ~150 bytes a message) then stay under glibc's mmap
#: threshold (4 MiB, :mod:`listener.malloc`) and come from the heap, reused batch after batch; a block over it is
#: mmap'd afresh for every batch and faulted in page by page (~10 ms for a batch of 4 KB rows on the bench machine,
#: more than building its events)
BATCH_BYTES = 7 * 512 * 1024


def batch_bytes(max_in_flight_bytes: int) -> int:
    """The bytes after which a batch is sealed: :data:`BATCH_BYTES`, or a quarter of ``maxInFlightBytes``
    when that is smaller, so that several batches are in flight at once (pipelining) even under a small
    bound. A batch holds one event more than this at most (the one that crossed it)."""
    return max(1, min(BATCH_BYTES, max_in_flight_bytes // 4))


class Acks:
    """The acknowledgements of one batch handed to a publisher.

    The publisher reports the outcome of each message by its index in the batch as soon as its client
    knows it (:meth:`settle`: None when acknowledged, else the :class:`PublishError`); the first outcome
    of a message counts and later ones are ignored. Awaiting the tracker yields the results once every
    message has one. The delivery stage sets its deadline (:meth:`expire_after`): what has no outcome by
    then fails with :class:`AckTimeout`.
    """

    __slots__ = ("_on_timeout", "_timer", "broker", "future", "left", "results", "retry", "timed_out")

    def __init__(self, size: int, broker: str = "", retry: bool = False) -> None:
        self.results: list[Any] = [_WAITING] * size
        self.left = size  # messages without an outcome
        self.broker = broker
        self.retry = retry  # the batch's messages were handed to the publisher before (this is a retry)
        self.timed_out = False  # the deadline passed with messages still waiting
        self.future: asyncio.Future[AckResults] = asyncio.get_running_loop().create_future()
        self._timer: asyncio.TimerHandle | None = None
        self._on_timeout: list[Callable[[], None]] = []
        if not size:
            self.future.set_result([])

    def settle(self, index: int, outcome: PublishError | None = None) -> None:
        """Message ``index`` was acknowledged (``outcome`` None) or failed."""
        results = self.results
        if results[index] is not _WAITING:
            return  # it has its outcome already (or timed out): a late answer
        results[index] = outcome
        self.left -= 1
        if not self.left:
            self._finish()

    def settle_run(self, start: int, stop: int) -> None:
        """Messages ``start``..``stop - 1`` were acknowledged (one with an outcome already keeps it)."""
        results = self.results
        waiting = results[start:stop].count(_WAITING)
        if not waiting:
            return
        if waiting == stop - start:
            results[start:stop] = [None] * waiting
        else:
            for index in range(start, stop):
                if results[index] is _WAITING:
                    results[index] = None
        self.left -= waiting
        if not self.left:
            self._finish()

    def fail_rest(self, error: PublishError) -> None:
        """Every message still without an outcome fails with ``error``."""
        if not self.left:
            return
        results = self.results
        for index, result in enumerate(results):
            if result is _WAITING:
                results[index] = error
        self.left = 0
        self._finish()

    @property
    def done(self) -> bool:
        return not self.left

    def waiting(self, index: int) -> bool:
        return self.results[index] is _WAITING

    def add_done_callback(self, callback: Callable[[Acks], None]) -> None:
        """Call ``callback(self)`` once every message has its outcome (timed out ones included)."""
        self.future.add_done_callback(lambda _: callback(self))

    def on_timeout(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when the deadline passes with messages still waiting, before they fail (a
        publisher collecting outcomes elsewhere hands over what it has, or notes that the broker is slow)."""
        self._on_timeout.append(callback)

    def expire_after(self, seconds: float) -> None:
        """The deadline: ``seconds`` from now, what is still waiting fails with :class:`AckTimeout`."""
        if self.left:
            self._timer = asyncio.get_running_loop().call_later(seconds, self._expire, seconds)

    def _expire(self, seconds: float) -> None:
        self._timer = None
        for callback in self._on_timeout:
            if self.left:
                try:
                    callback()
                except Exception:
                    log.exception("publisher: ack timeout callback failed")
        if self.left:
            self.timed_out = True
            prefix = f"{self.broker}: " if self.broker else ""
            self.fail_rest(AckTimeout(f"{prefix}no acknowledgement within {seconds:g}s (listener.ackTimeout)",
                                      broker=self.broker))

    def _finish(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.future.done():
            self.future.set_result(self.results)

    def __await__(self) -> Generator[Any, None, AckResults]:
        return self.future.__await__()


async def publish(publisher: Publisher[Any], messages: Sequence[Message], ack_timeout: float,
                  retry: bool = False) -> Acks:
    """Hand ``messages`` to ``publisher`` with a new tracker whose deadline is ``ack_timeout`` seconds from
    now (``retry``: they were handed over before); await the tracker for the results. A publisher that
    raises fails the whole batch, except with a :class:`BrokerConfigError` (a destination that can never
    work), which is raised."""
    acks = Acks(len(messages), publisher.broker, retry)
    acks.expire_after(ack_timeout)
    try:
        await publisher.publish(messages, acks)
    except BrokerConfigError as exc:
        acks.fail_rest(PublishError(str(exc), broker=publisher.broker, retryable=False))
        raise
    except Exception as exc:
        if not isinstance(exc, PublishError):
            exc = PublishError(f"{publisher.broker}: {exc!r}", broker=publisher.broker)
        acks.fail_rest(exc)
    return acks


@dataclass(slots=True)
class Batch:
    """Events handed to the publisher together, and where their acknowledgement moves the slot."""

    messages: list[Message] = field(default_factory=list)
    size: int = 0  # the bytes of its messages (message_size)
    lsn: int = 0  # the end LSN of the last transaction that committed inside this batch
    commit_time: float = 0.0  # unix time of that commit (for the lag in seconds)
    done: bool = False
    #: some of its events failed in a way that may pass (they are re-sent in order, nothing newer goes meanwhile)
    blocking: bool = False
    #: every event it still has failed for good (``onError: halt``): re-sent alone, holding nothing back
    stuck: bool = False


class Backoff:
    """Exponential backoff with jitter, capped."""

    def __init__(self, first: float = 0.2, cap: float = 30.0) -> None:
        self.first, self.cap, self.attempt = first, cap, 0

    def next(self) -> float:
        delay: float = min(self.cap, self.first * float(2**self.attempt))
        self.attempt += 1
        return delay * (0.5 + random.random() / 2)

    def reset(self) -> None:
        self.attempt = 0


class Delivery:
    """Owns every event between "read from PostgreSQL" and "acknowledged by the broker"."""

    def __init__(
        self,
        publisher: Publisher[Any],
        *,
        max_in_flight: int,
        batch_size: int,
        max_in_flight_bytes: int = 64 * 1024 * 1024,
        retry_cap: float = 30.0,
        ack_timeout: float | None = None,
        on_error: str = "halt",
        dead_letter_subject: str = "",
        on_confirmable: Callable[[], None] | None = None,
    ) -> None:
        self.publisher = publisher
        self.max_in_flight = max_in_flight
        #: ``listener.maxInFlightBytes``: the bytes of events read and not yet acknowledged, at most (plus the
        #: event that crossed it)
        self.max_in_flight_bytes = max_in_flight_bytes
        self.batch_size = batch_size
        #: a batch is sealed once its events hold this many bytes (:func:`batch_bytes`)
        self.max_batch_bytes = batch_bytes(max_in_flight_bytes)
        self.retry_cap = retry_cap
        #: seconds a batch may wait for its acknowledgements (``listener.ackTimeout``)
        self.ack_timeout = publisher.ack_timeout if ack_timeout is None else ack_timeout
        self.on_error = on_error
        self.dead_letter_subject = dead_letter_subject
        self.on_confirmable = on_confirmable
        #: called once when the broker refuses the destination for good (the listener then exits 2)
        self.on_fatal: Callable[[BaseException], None] | None = None
        self.fatal: BaseException | None = None
        self.confirmed_lsn = 0
        self.confirmed_commit_time = 0.0
        # In flight: events and bytes added and not yet acknowledged, as counted at the last fold (see add).
        self._in_flight = 0
        self._in_flight_bytes = 0
        # Once full, reading resumes only when a whole batch fits again: resuming at the first free slot
        # made the reader add a few events, fill up, seal a tiny batch and wait again -- batches shrank
        # to a handful of events for good (each its own broker request) while the broker was the slower.
        self._resume_at = max_in_flight - max(1, min(batch_size, max_in_flight // 2))
        # the same in bytes
        self._resume_bytes = max_in_flight_bytes - min(self.max_batch_bytes, max_in_flight_bytes // 2)
        self._retrying = 0  # batches with events being retried
        self._blocking = 0  # batches whose events failed in a way that may pass (Batch.blocking)
        self._unblocked = asyncio.Event()  # set while _blocking is 0: the sender may hand over new batches
        self._unblocked.set()
        self._progress: list[asyncio.Future[None]] = []  # woken when a batch is done or stuck (see _turn)
        self._lingering = False  # the open batch waits for an earlier batch's acks (see caught_up)
        #: published_events_total's counter per (subject, table), looked up once (topics routed by column
        #: values give a batch many subjects; a lookup costs more than the increment)
        self._published: dict[tuple[str, str], Any] = {}
        self._open = Batch()
        # add() counts bytes down from a grant and compares the open batch's length with a limit, instead of
        # counting up and comparing with four limits: the events and bytes that may still be added before
        # something is due (the open batch is complete, or a bound is reached); then it folds what was added
        # into the counts above and looks (_limit)
        self._events_from = self._events_until = 0  # the open batch's events at the last fold, and add()'s limit
        self._bytes_grant = self._bytes_left = 0
        self._grant()
        self._pending: deque[Batch] = deque()  # sealed, in order, not yet retired
        self._queue: asyncio.Queue[Batch] = asyncio.Queue()
        self._space = asyncio.Event()
        self._space.set()
        # the gauges read this stage when scraped: while the broker does not answer nothing settles to set them
        metrics.IN_FLIGHT.set_function(lambda: float(self.in_flight))
        metrics.IN_FLIGHT_BYTES.set_function(lambda: float(self.in_flight_bytes))
        self._settled = asyncio.Event()
        self._settled.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._sender: asyncio.Task[None] | None = None
        #: futures done at the next acknowledgement (see :meth:`acked`)
        self._ack_waiters: list[asyncio.Future[None]] = []

    # -- reader side ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_loop(), name="delivery-sender")

    def add(self, message: Message) -> bool:
        """Queue one event; True when that made the stage :attr:`full` (the caller then awaits
        :meth:`wait_for_space`). Always takes it, also when it alone is larger than the byte bound.

        Called per event: the common case is an append, a countdown and two comparisons (see :meth:`_grant`)."""
        messages = self._open.messages
        messages.append(message)
        left = self._bytes_left - len(message.rest)  # message_size, inlined
        key = message.key
        if key:
            left -= len(key)
        if message.head is not None:  # a HeadedMessage's head, shared with other events, counts in each
            left -= len(message.head)
        self._bytes_left = left
        if left <= 0 or len(messages) >= self._events_until:
            return self._limit()
        return False

    def _fold(self) -> None:
        """Count what add() took from the grant into the open batch and the in-flight counts."""
        messages = len(self._open.messages)
        size = self._bytes_grant - self._bytes_left
        self._in_flight += messages - self._events_from
        self._in_flight_bytes += size
        self._open.size += size
        self._events_from = messages
        self._bytes_grant = self._bytes_left

    def _grant(self) -> None:
        """What add() may take before :meth:`_limit` is due: until the open batch is complete (batchSize
        events or :func:`batch_bytes`) or a bound is reached (0 or less while :attr:`full`)."""
        messages = self._events_from = len(self._open.messages)
        # add() calls _limit once the open batch holds this many events
        self._events_until = messages + min(self.batch_size - messages, self.max_in_flight - self._in_flight)
        self._bytes_grant = self._bytes_left = min(self.max_batch_bytes - self._open.size,
                                                   self.max_in_flight_bytes - self._in_flight_bytes)

    def _limit(self) -> bool:
        """add() used up its grant: seal the open batch when it is complete, and say whether a bound is
        reached."""
        self._fold()
        batch = self._open
        messages = batch.messages
        if len(messages) > 1 and batch.size >= self.max_batch_bytes:
            size = message_size(messages[-1])
            if size >= self.max_batch_bytes:  # a large event goes out in a batch of its own
                last = messages.pop()
                batch.size -= size
                self._seal()
                batch = self._open
                batch.messages.append(last)
                batch.size = size
        if len(batch.messages) >= self.batch_size or batch.size >= self.max_batch_bytes:
            self._seal()
        self._grant()
        if self.full:
            self._space.clear()
            return True
        return False

    @property
    def in_flight(self) -> int:
        """Events added and not yet acknowledged."""
        return self._in_flight + len(self._open.messages) - self._events_from

    @property
    def in_flight_bytes(self) -> int:
        """Bytes of the events added and not yet acknowledged (:func:`~listener.message.message_size` each)."""
        return self._in_flight_bytes + self._bytes_grant - self._bytes_left

    @property
    def full(self) -> bool:
        """Either bound is reached: ``maxInFlight`` events or ``maxInFlightBytes`` bytes."""
        return self.in_flight >= self.max_in_flight or self.in_flight_bytes >= self.max_in_flight_bytes

    async def wait_for_space(self, stop: asyncio.Event) -> None:
        """Backpressure: wait until acks made room (or ``stop`` is set)."""
        self.seal()
        if stop.is_set():
            return
        space = asyncio.ensure_future(self._space.wait())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([space, stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when the reader is cancelled (the slot watcher ended the session)
            space.cancel()
            stopped.cancel()

    def commit(self, end_lsn: int, commit_time: float) -> None:
        """A transaction ended: its LSN is confirmable once the open batch and all before it are acked."""
        self._open.lsn = end_lsn
        self._open.commit_time = commit_time

    def caught_up(self) -> None:
        """The reader has nothing more buffered: send the open batch now -- unless an earlier batch is
        still waiting for its acknowledgements; then the open one goes out as soon as one is settled
        (Nagle's rule). Under a steady trickle each batch goes out at once (nothing is waiting); when the
        reader catches up with PostgreSQL again and again at full speed, what it read meanwhile goes out
        together instead of one tiny batch (a socket write and a wake-up of the broker) per wake-up of
        the reader. While events are being retried nothing lingers."""
        if self._open.messages and not self._retrying and any(not batch.done for batch in self._pending):
            self._lingering = True
        else:
            self.seal()

    def seal(self) -> None:
        """Hand the open batch to the sender (also an empty one that carries a commit LSN)."""
        self._fold()
        self._seal()
        self._grant()

    def _seal(self) -> None:
        self._lingering = False
        batch = self._open
        if not batch.messages:
            if not batch.lsn:
                return
            if not self._pending:  # nothing before it: confirmable right away
                self._advance(batch.lsn, batch.commit_time)
                self._open = Batch()
                return
        self._open = Batch()
        self._pending.append(batch)
        self._settled.clear()
        if batch.messages:
            self._queue.put_nowait(batch)
        else:
            batch.done = True
            self._retire()

    def idle_confirm(self, lsn: int) -> None:
        """Nothing is in flight and no transaction is open: the server's WAL end can be confirmed."""
        if not self._pending and not self._open.messages and lsn > self.confirmed_lsn:
            self._open.lsn = 0
            self._advance(lsn, 0.0)

    def acked(self) -> asyncio.Future[None]:
        """A future done the next time events are acknowledged (:attr:`in_flight_bytes` drops) or
        :attr:`confirmed_lsn` moves: a task waiting for either awaits it instead of polling (the backfill)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ack_waiters.append(waiter)
        return waiter

    def _wake_acked(self) -> None:
        self._wake(self._ack_waiters)

    @property
    def failing(self) -> bool:
        """True while some event is not acknowledged and being retried."""
        return self._retrying > 0

    @property
    def idle(self) -> bool:
        return not self._pending and not self._open.messages

    async def drain(self) -> None:
        """Seal what is open and wait until every sealed batch is acknowledged."""
        self.seal()
        await self._settled.wait()

    async def until_settled(self, timeout: float) -> bool:
        """Wait ``timeout`` seconds; while sealed batches are in flight, only until the last of them is settled
        when that comes first (the open batch stays open). True when it returned early."""
        if self._settled.is_set():
            await asyncio.sleep(timeout)
            return False
        waiter = asyncio.ensure_future(self._settled.wait())
        try:
            await asyncio.wait([waiter], timeout=timeout)  # not wait_for: see ReplicationStream.status_wanted
        finally:
            waiter.cancel()
        return self._settled.is_set()

    async def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            self._sender = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- publisher side ---------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        while True:
            batch = await self._queue.get()
            if self._blocking:  # nothing newer overtakes events waiting to be sent again
                await self._unblocked.wait()
            acks = await self._send(batch.messages)
            task = asyncio.create_task(self._settle(batch, batch.messages, acks))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, messages: list[Message], retry: bool = False) -> Acks:
        """Hand messages to the publisher (see :func:`publish`); a :class:`BrokerConfigError` stops the listener."""
        try:
            return await publish(self.publisher, messages, self.ack_timeout, retry)
        except BrokerConfigError as exc:
            self.fatal = exc
            if self.on_fatal is not None:
                self.on_fatal(exc)
            raise

    async def _settle(self, batch: Batch, messages: list[Message], acks: Acks) -> None:
        backoff = Backoff(cap=self.retry_cap)
        size = batch.size  # the bytes of ``messages``
        said = ""  # the failure already logged: a retry failing the same way is logged at debug level only
        while True:
            results = await acks
            failed: list[Message] = []
            passing = False  # some failure may pass: the batch is re-sent in its turn (see _turn)
            published: dict[tuple[str, str], int] = {}  # counted once per subject and table, not per event
            for message, result in zip(messages, results, strict=True):
                if result is None:
                    key = (message.subject, message.table)
                    published[key] = published.get(key, 0) + 1
                elif not result.retryable and self.on_error == "skip":
                    if not await self._dead_letter(message, result):
                        failed.append(message)
                        passing = True
                else:
                    failed.append(message)
                    passing = passing or result.retryable
                    metrics.PUBLISH_ERRORS.labels(result.reason).inc()
            for labels, count in published.items():
                counter = self._published.get(labels)
                if counter is None:
                    if len(self._published) >= 10000:
                        self._published.clear()
                    counter = self._published[labels] = metrics.PUBLISHED.labels(*labels)
                counter.inc(count)
            acked = len(messages) - len(failed)
            failed_size = sum(map(message_size, failed)) if failed else 0
            self._fold()
            self._in_flight -= acked
            self._in_flight_bytes -= size - failed_size
            size = failed_size
            self._grant()
            if self._in_flight <= self._resume_at and self._in_flight_bytes <= self._resume_bytes:
                self._space.set()
            if self._ack_waiters and acked:
                self._wake_acked()
            if not failed:
                break
            batch.stuck = not passing
            self._block(batch, passing)
            self._wake(self._progress)  # a batch waiting for its turn may go when this one is stuck
            if not backoff.attempt:
                self._retrying += 1
            delay = backoff.next()
            first = next(r for r in results if r is not None)
            level = logging.WARNING if first.retryable else logging.ERROR
            if str(first) == said:
                level = logging.DEBUG  # one clear line per problem, not one per retry (the metrics count them)
            said = str(first)
            log.log(
                level,
                "publish not acknowledged; retrying",
                extra={"fields": {"events": len(failed), "retry_in_s": round(delay, 2), "error": str(first),
                                  "error_type": type(first).__name__, "reason": first.reason,
                                  "subject": failed[0].subject}},
            )
            await asyncio.sleep(delay)
            if batch.blocking:
                await self._turn(batch)
            messages = failed
            acks = await self._send(messages, retry=True)
        batch.done = True
        if backoff.attempt:
            self._retrying -= 1
            log.info("publish recovered", extra={"fields": {"attempts": backoff.attempt + 1}})
            self._block(batch, False)
        if self._progress:  # batches waiting for their turn (see _turn)
            self._wake(self._progress)
        if self._lingering:
            self.seal()
        self._retire()

    def _block(self, batch: Batch, blocking: bool) -> None:
        """Mark whether ``batch`` has events that failed in a way that may pass: while any batch has, the
        sender hands over no newer batch."""
        if blocking == batch.blocking:
            return
        batch.blocking = blocking
        self._blocking += 1 if blocking else -1
        if self._blocking:
            self._unblocked.clear()
        else:
            self._unblocked.set()

    async def _turn(self, batch: Batch) -> None:
        """Wait until every batch before ``batch`` is acknowledged or stuck. So events sent again go out in the
        order they were first sent, and a later change of a row is not stored ahead of an earlier one that is
        still being retried."""
        while True:
            for earlier in self._pending:
                if earlier is batch:
                    return
                if not earlier.done and not earlier.stuck:
                    break
            else:
                return
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._progress.append(waiter)
            await waiter

    @staticmethod
    def _wake(waiters: list[asyncio.Future[None]]) -> None:
        """Complete and forget every future in ``waiters``."""
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        waiters.clear()

    async def _dead_letter(self, message: Message, error: PublishError) -> bool:
        body = orjson.dumps({"error": str(error), "subject": message.subject, "event": orjson.Fragment(message.body)})
        letter = Message(message.id, self.dead_letter_subject, body, message.schema, message.table, message.action,
                         message.key, {"error": str(error)[:200]})
        try:
            results = await (await publish(self.publisher, [letter], self.ack_timeout))
            first = results[0]
            if first is not None and not first.retryable:
                # the letter carries the event, so an event too large for the broker makes a letter too
                # large as well: record it without the event's body (id, table, action and size kept)
                body = orjson.dumps({"error": str(error), "subject": message.subject, "event": None,
                                     "eventOmitted": f"{len(message.body)} bytes; too large for the broker",
                                     "id": message.id, "schema": message.schema, "table": message.table,
                                     "action": message.action})
                letter.body = body
                results = await (await publish(self.publisher, [letter], self.ack_timeout))
        except Exception:
            return False
        if results[0] is None:
            metrics.DEAD_LETTERED.labels(message.table).inc()
            log.error("event sent to the dead-letter topic",
                      extra={"fields": {"id": message.id, "subject": message.subject,
                                        "dead_letter": self.dead_letter_subject, "error": str(error)}})
            return True
        return False

    def _retire(self) -> None:
        advanced = False
        while self._pending and self._pending[0].done:
            batch = self._pending.popleft()
            if batch.lsn > self.confirmed_lsn:
                self.confirmed_lsn = batch.lsn
                if batch.commit_time:
                    self.confirmed_commit_time = batch.commit_time
                advanced = True
        if not self._pending:
            self._settled.set()
        if advanced:
            if self._ack_waiters:
                self._wake_acked()
            if self.on_confirmable is not None:
                self.on_confirmable()

    def _advance(self, lsn: int, commit_time: float) -> None:
        if lsn > self.confirmed_lsn:
            self.confirmed_lsn = lsn
            if commit_time:
                self.confirmed_commit_time = commit_time
            if self._ack_waiters:
                self._wake_acked()
            if self.on_confirmable is not None:
                self.on_confirmable()
