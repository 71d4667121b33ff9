"""The consumer-side checker: compare what a broker holds with what the database says happened.

The source table of a reliability test has a row key ``k`` and a sequence column ``seq``: a row is
inserted with ``seq = 1`` and every update sets ``seq = seq + 1`` (see :class:`Workload`). So the table
alone says which events must exist: for a row with ``seq = n``, the changes ``(k, 1) .. (k, n)``.
:func:`check` compares that truth with the events a consumer read, in the order it read them, and
reports:

- **missing**: a committed change that never arrived;
- **duplicated**: a change that arrived more than once (allowed for the unconfirmed tail after a crash:
  :meth:`Report.duplicates_outside_tail` says which copies are not explained by it);
- **changed ids**: a change that arrived again under another id (never allowed: ids are deterministic);
- **out of order**: a row's changes arriving in another order than committed (first copies only; a
  replayed tail naturally repeats older changes);
- **unexpected**: events for changes the table does not have (phantoms).

An event id also carries the commit LSN of its transaction (see ``listener.event.event_id``), which
:func:`id_lsn` reads back: the replayed tail after a crash must start at or after the LSN the slot had
confirmed when the listener died.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import nats
import psycopg
from nats.js.api import DeliverPolicy

from tests.support.harness import Received

Change = tuple[int, int]  # (row key, sequence number)


def id_lsn(event_id: str) -> tuple[int, int]:
    """(commit LSN, ordinal in the transaction) packed into an event id by ``listener.event.event_id``."""
    parts = event_id.split("-")
    hi, mid, lo, node = int(parts[1], 16), int(parts[2], 16) & 0x0FFF, int(parts[3], 16) & 0x3FFF, int(parts[4], 16)
    tail, ordinal = node >> 26, node & 0x3FFFFFF
    return (hi << 48) | (mid << 36) | (lo << 22) | tail, ordinal


def change_of(event: dict[str, Any], key: str = "k", seq: str = "seq") -> Change | None:
    data = event.get("data") or {}
    if key in data and seq in data:
        return int(data[key]), int(data[seq])
    return None


@dataclass
class Copy:
    change: Change
    id: str
    position: int  # index in the order the consumer read the events


@dataclass
class Report:
    """What the consumer got, measured against the table."""

    expected: int = 0
    received: int = 0
    missing: list[Change] = field(default_factory=list)
    duplicated: dict[Change, int] = field(default_factory=dict)  # change -> number of copies (> 1)
    changed_ids: dict[Change, set[str]] = field(default_factory=dict)
    out_of_order: list[tuple[int, int, int]] = field(default_factory=list)  # (key, seq before, seq after)
    unexpected: list[Change] = field(default_factory=list)
    copies: list[Copy] = field(default_factory=list)  # every second or later copy, in reading order

    @property
    def ok(self) -> bool:
        """Nothing missing, no changed ids, nothing out of order, no phantoms (duplicates allowed)."""
        return not (self.missing or self.changed_ids or self.out_of_order or self.unexpected)

    def summary(self) -> str:
        def some(items: Iterable[Any]) -> str:
            items = list(items)
            return f"{len(items)} {items[:5]}"

        return (
            f"expected {self.expected} changes, received {self.received} events: missing {some(self.missing)}, "
            f"duplicated {some(self.duplicated.items())}, changed ids {some(self.changed_ids.items())}, "
            f"out of order {some(self.out_of_order)}, unexpected {some(self.unexpected)}"
        )

    def assert_ok(self, *, duplicates: bool = True) -> None:
        assert self.ok, self.summary()
        if not duplicates:
            assert not self.duplicated, "duplicates where none may be: " + self.summary()

    def duplicates_outside_tail(self, kills: Sequence[tuple[int, int]]) -> list[Copy]:
        """Copies not explained by a crash: ``kills`` is ``[(position, confirmed LSN)]``, the number of
        events read before each kill and the LSN the slot had confirmed then. A copy read after a kill
        must belong to a transaction that committed at or after that LSN (the unconfirmed tail)."""
        wrong = []
        for copy in self.copies:
            before = [lsn for position, lsn in kills if position <= copy.position]
            if not before or id_lsn(copy.id)[0] < max(before):
                wrong.append(copy)
        return wrong


async def table_truth(dsn: str, table: str = "items", key: str = "k", seq: str = "seq") -> dict[int, int]:
    """Row key -> its current sequence number (the number of changes the row had)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(f"SELECT {key}, {seq} FROM {table}")
        return {int(k): int(s) for k, s in await cur.fetchall()}


def check(truth: dict[int, int], events: Sequence[dict[str, Any]], key: str = "k", seq: str = "seq") -> Report:
    """Compare ``events`` (in the order a consumer read them) with the table's ``truth``."""
    report = Report(expected=sum(truth.values()), received=len(events))
    count: Counter[Change] = Counter()
    ids: dict[Change, set[str]] = defaultdict(set)
    last: dict[int, int] = {}
    for position, event in enumerate(events):
        change = change_of(event, key, seq)
        if change is None:
            continue
        count[change] += 1
        ids[change].add(str(event["id"]))
        k, s = change
        if count[change] > 1:
            report.copies.append(Copy(change, str(event["id"]), position))
            continue
        if s < last.get(k, 0):
            report.out_of_order.append((k, last[k], s))
        last[k] = max(last.get(k, 0), s)
        if k not in truth or s > truth[k]:
            report.unexpected.append(change)
    report.missing = [(k, s) for k, n in sorted(truth.items()) for s in range(1, n + 1) if (k, s) not in count]
    report.duplicated = {c: n for c, n in count.items() if n > 1}
    report.changed_ids = {c: i for c, i in ids.items() if len(i) > 1}
    return report


# -- reading the broker ----------------------------------------------------------------------------


async def read_jetstream(nats_url: str, stream: str, timeout: float = 60.0) -> list[Received]:
    """Every message the JetStream ``stream`` holds right now, in stream order."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        total = info.state.messages
        out: list[Received] = []
        if total == 0:
            return out
        sub = await js.subscribe(f"{stream}.>", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        deadline = time.monotonic() + timeout
        while len(out) < total and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
                msg = await sub.next_msg(timeout=1.0)
                out.append(Received(msg.subject, msg.data, msg.headers))
        assert len(out) == total, f"read {len(out)} of the {total} messages of stream {stream}"
        return out
    finally:
        await nc.close()


class WireTap:
    """A plain NATS subscription on ``<topic>.>``: every publish the listener makes, retries and
    replays included (JetStream's de-duplication happens only in the stream). Start it before the
    listener, in the test's event loop."""

    def __init__(self, nats_url: str, topic: str) -> None:
        self.url, self.topic = nats_url, topic
        self.events: list[Received] = []
        self._nc: Any = None

    async def start(self) -> WireTap:
        self._nc = await nats.connect(self.url)

        async def on_msg(msg: Any) -> None:
            self.events.append(Received(msg.subject, msg.data, msg.headers))

        await self._nc.subscribe(f"{self.topic}.>", cb=on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1)
        await self._nc.flush()
        return self

    async def settle(self, quiet: float = 0.5, timeout: float = 30.0) -> None:
        """Wait until nothing new arrived for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        seen = -1
        while len(self.events) != seen and time.monotonic() < deadline:
            seen = len(self.events)
            await asyncio.sleep(quiet)

    async def close(self) -> None:
        if self._nc is not None:
            await self._nc.close()


# -- the source of truth -----------------------------------------------------------------------------


class Workload:
    """Writes to ``items(k int PRIMARY KEY, seq int, payload text)`` from a thread: each transaction
    inserts new rows (``seq = 1``) and updates random earlier ones (``seq = seq + 1``), the way
    :func:`check` expects. Reconnects when PostgreSQL goes away; a transaction whose COMMIT got no
    answer is looked up, so :attr:`committed` is exact."""

    CREATE = "CREATE TABLE items (k int PRIMARY KEY, seq int NOT NULL, payload text)"

    def __init__(self, dsn: str, transactions: int, inserts: int = 10, updates: int = 5, pace: float = 0.005,
                 seed: int | None = None) -> None:
        self.dsn, self.transactions, self.inserts, self.updates, self.pace = dsn, transactions, inserts, updates, pace
        self.random = random.Random(seed)
        self.done = 0  # committed transactions
        self.rows = 0  # rows inserted by committed transactions
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="workload")

    def start(self) -> Workload:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _transaction(self, conn: psycopg.Connection[Any]) -> None:
        first = self.rows + 1
        with conn.transaction():
            conn.execute(
                "INSERT INTO items (k, seq, payload)"
                " SELECT g, 1, md5(g::text) FROM generate_series(%s::int, %s::int) g",
                (first, first + self.inserts - 1),
            )
            if self.rows:
                keys = sorted({self.random.randint(1, self.rows) for _ in range(self.updates)})
                for k in keys:  # in key order: concurrent writers (none here) could not deadlock
                    conn.execute("UPDATE items SET seq = seq + 1 WHERE k = %s", (k,))

    def _run(self) -> None:
        while self.done < self.transactions and not self._stop.is_set():
            try:
                with psycopg.connect(self.dsn, connect_timeout=5) as conn:
                    while self.done < self.transactions and not self._stop.is_set():
                        try:
                            self._transaction(conn)
                        except psycopg.OperationalError:
                            # the COMMIT may or may not have happened: ask the database
                            self._recount()
                            raise
                        self.rows += self.inserts
                        self.done += 1
                        if self.pace:
                            self._stop.wait(self.pace)
            except psycopg.OperationalError:
                self.errors += 1  # PostgreSQL is restarting: try again
                self._stop.wait(0.2)

    def _recount(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(self.dsn, connect_timeout=5) as conn:
                    row = conn.execute("SELECT coalesce(max(k), 0) FROM items").fetchone()
                    assert row is not None
                    if row[0] != self.rows:
                        self.rows = int(row[0])
                        self.done += 1
                    return
            except psycopg.OperationalError:
                time.sleep(0.2)

    def join(self, timeout: float = 120) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the workload did not finish"
