"""Stage 7 — delivery: pipelined batches to the publisher, retries, backpressure, the confirmable LSN.

Events are appended to an open batch; the reader seals it when it is full or when the replication
socket has nothing more to read right now, so batches are large under load and small when quiet.
Sealed batches are handed to the publisher strictly in order (one sender task), and their
acknowledgements are awaited concurrently, so many batches are in flight at once.

The promise: :attr:`Delivery.confirmed_lsn` only moves to a transaction's end LSN when every event of
that transaction and of every earlier one was acknowledged. A failed event is retried with backoff,
never skipped (``onError: skip`` sends an event the broker will never accept to the dead-letter topic
instead, and counts it). In-flight events are bounded by ``maxInFlight``: the reader waits, so memory
stays flat whatever the size of a transaction.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

from listener import metrics
from listener.errors import BrokerConfigError, PermanentPublishError
from listener.publishers.base import AckResults, Message, Publisher

log = logging.getLogger("listener.delivery")


@dataclass(slots=True)
class Batch:
    messages: list[Message] = field(default_factory=list)
    lsn: int = 0  # the end LSN of the last transaction that committed inside this batch
    commit_time: float = 0.0  # unix time of that commit (for the lag in seconds)
    done: bool = False


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
        publisher: Publisher,
        *,
        max_in_flight: int,
        batch_size: int,
        retry_cap: float = 30.0,
        on_error: str = "halt",
        dead_letter_subject: str = "",
        on_confirmable: Callable[[], None] | None = None,
    ) -> None:
        self.publisher = publisher
        self.max_in_flight = max_in_flight
        self.batch_size = batch_size
        self.retry_cap = retry_cap
        self.on_error = on_error
        self.dead_letter_subject = dead_letter_subject
        self.on_confirmable = on_confirmable
        #: called once when the broker refuses the destination for good (the listener then exits 2)
        self.on_fatal: Callable[[BaseException], None] | None = None
        self.fatal: BaseException | None = None
        self.confirmed_lsn = 0
        self.confirmed_commit_time = 0.0
        self.in_flight = 0
        # Once full, reading resumes only when a whole batch fits again: resuming at the first free slot
        # made the reader add a few events, fill up, seal a tiny batch and wait again -- batches shrank
        # to a handful of events for good (each its own broker request) while the broker was the slower.
        self._resume_at = max_in_flight - max(1, min(batch_size, max_in_flight // 2))
        self._retrying = 0  # batches with events being retried
        self._open = Batch()
        self._pending: deque[Batch] = deque()  # sealed, in order, not yet retired
        self._queue: asyncio.Queue[Batch] = asyncio.Queue()
        self._space = asyncio.Event()
        self._space.set()
        self._settled = asyncio.Event()
        self._settled.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._sender: asyncio.Task[None] | None = None

    # -- reader side ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_loop(), name="delivery-sender")

    def add(self, message: Message) -> None:
        """Queue one event (the caller checks :attr:`full` and awaits :meth:`wait_for_space`)."""
        self._open.messages.append(message)
        self.in_flight += 1
        if self.in_flight >= self.max_in_flight:
            self._space.clear()
        if len(self._open.messages) >= self.batch_size:
            self.seal()

    @property
    def full(self) -> bool:
        return self.in_flight >= self.max_in_flight

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

    def seal(self) -> None:
        """Hand the open batch to the sender (also an empty one that carries a commit LSN)."""
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
            acks = await self._send(batch.messages)
            task = asyncio.create_task(self._settle(batch, batch.messages, acks))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, messages: list[Message]) -> asyncio.Future[AckResults]:
        """Hand messages to the publisher; a send that raises counts as every message failed, except a
        :class:`BrokerConfigError` (a destination that can never work), which stops the listener."""
        try:
            awaitable = await self.publisher.send(messages)
            return asyncio.ensure_future(awaitable)
        except BrokerConfigError as exc:
            self.fatal = exc
            if self.on_fatal is not None:
                self.on_fatal(exc)
            raise
        except Exception as exc:
            failed: asyncio.Future[AckResults] = asyncio.get_running_loop().create_future()
            failed.set_result([exc] * len(messages))
            return failed

    async def _settle(self, batch: Batch, messages: list[Message], acks: asyncio.Future[AckResults]) -> None:
        backoff = Backoff(cap=self.retry_cap)
        said = ""  # the failure already logged: a retry failing the same way is logged at debug level only
        while True:
            results = await acks
            failed: list[Message] = []
            published: dict[tuple[str, str], int] = {}  # counted once per subject and table, not per event
            for message, result in zip(messages, results, strict=True):
                if result is None:
                    key = (message.subject, message.table)
                    published[key] = published.get(key, 0) + 1
                elif isinstance(result, PermanentPublishError) and self.on_error == "skip":
                    if not await self._dead_letter(message, result):
                        failed.append(message)
                else:
                    failed.append(message)
                    metrics.PUBLISH_ERRORS.labels(type(result).__name__).inc()
            for (subject, table), count in published.items():
                metrics.PUBLISHED.labels(subject, table).inc(count)
            acked = len(messages) - len(failed)
            self.in_flight -= acked
            if self.in_flight <= self._resume_at:
                self._space.set()
            if not failed:
                break
            if not backoff.attempt:
                self._retrying += 1
            delay = backoff.next()
            first = next(r for r in results if r is not None)
            level = logging.ERROR if isinstance(first, PermanentPublishError) else logging.WARNING
            if str(first) == said:
                level = logging.DEBUG  # one clear line per problem, not one per retry (the metrics count them)
            said = str(first)
            log.log(
                level,
                "publish not acknowledged; retrying",
                extra={"fields": {"events": len(failed), "retry_in_s": round(delay, 2), "error": str(first),
                                  "error_type": type(first).__name__, "subject": failed[0].subject}},
            )
            await asyncio.sleep(delay)
            messages = failed
            acks = await self._send(messages)
        if backoff.attempt:
            self._retrying -= 1
            log.info("publish recovered", extra={"fields": {"attempts": backoff.attempt + 1}})
        batch.done = True
        self._retire()

    async def _dead_letter(self, message: Message, error: BaseException) -> bool:
        body = orjson.dumps({"error": str(error), "subject": message.subject, "event": orjson.Fragment(message.body)})
        letter = Message(message.id, self.dead_letter_subject, body, message.schema, message.table, message.action,
                         message.key, {"error": str(error)[:200]})
        try:
            results = await (await self.publisher.send([letter]))
            if isinstance(results[0], PermanentPublishError):
                # the letter carries the event, so an event too large for the broker makes a letter too
                # large as well: record it without the event's body (id, table, action and size kept)
                body = orjson.dumps({"error": str(error), "subject": message.subject, "event": None,
                                     "eventOmitted": f"{len(message.body)} bytes; too large for the broker",
                                     "id": message.id, "schema": message.schema, "table": message.table,
                                     "action": message.action})
                letter.body = body
                results = await (await self.publisher.send([letter]))
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
        metrics.IN_FLIGHT.set(self.in_flight)
        if advanced and self.on_confirmable is not None:
            self.on_confirmable()

    def _advance(self, lsn: int, commit_time: float) -> None:
        if lsn > self.confirmed_lsn:
            self.confirmed_lsn = lsn
            if commit_time:
                self.confirmed_commit_time = commit_time
            if self.on_confirmable is not None:
                self.on_confirmable()
