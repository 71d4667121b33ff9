"""The listener's per-event work in one process, without sockets: instruction counts that do not move.

A pgoutput message -> ``EventBuilder.change`` (the compiled call) -> the ``Message`` -> batches of 2000
events or of delivery's byte limit (``delivery.BATCH_BYTES``), whichever comes first -> the NATS frames of
each batch (``nats_frames``) -> the scan of their JetStream acks (``nats_acks``), with up to 10 batches held
as in flight (and their frames, in builds whose publisher held them until the acks), and the listener's
allocator and garbage-collector settings once streaming. CPU seconds
on a shared machine move by ±30% from run to run; valgrind's instruction counts of this loop do not::

    python -m bench.pipeline --shape wide --events 20000           # µs per event (process CPU time)
    valgrind --tool=callgrind --collect-atstart=no --toggle-collect=builtin_any \\
        python -m bench.pipeline --shape reference --events 20000  # Ir / events = instructions per event

Against another checkout's build (its compiled module built in place), from this one:
``PYTHONPATH=OTHER python bench/pipeline.py ...``.

Shapes: ``reference`` (the reference row: insert, update, delete in turn) and ``wide`` (the same plus a
4 KB text column: an insert carries it, an update leaves it as unchanged TOAST, a delete has the key).
``--transform NAME`` (the reference shape): the users row of ``bench.hotpath --transforms`` with that transform
(``none``, ``users``...), its topics routed by tenant as the users transform routes them.
The loop runs inside ``any()``, so callgrind's ``--toggle-collect=builtin_any`` counts it alone.
``--format`` (``publisher.format``, as ``bench.hotpath --formats`` names them: ``cloudevents``,
``cloudevents-structured``, ``debezium``, ``debezium-schemas``, ...): the events in that format, CloudEvents
attributes as the NATS publisher's binding carries them; for Debezium the change's own LSN and the last
commit's (its source block) are set per change as the reader sets them.
"""

from __future__ import annotations

import argparse
import resource
import struct
import time
from collections import deque
from typing import Any

from bench import hotpath as bh
from bench.workload import USERS_TENANTS
from listener import cli, delivery, malloc, types
from listener.message import message_size
from listener.pgoutput import Column, Relation
from listener.publishers.nats import _HEADER_BYTES, NatsPublisher, _Written

BATCH = 2000
INBOX = "_INBOX.abcdefghijklmnopqrstuv"
WIDE_OID = bh.OID + 1


def message(shape: str, i: int, users: bool = False) -> bytes:
    """Change ``i`` of the shape, as pgoutput sends it (``users``: the users row of ``bench.hotpath``)."""
    m = bh.messages(i, users)
    if shape != "wide":
        return [m["insert"], m["update"], m["delete"]][i % 3]
    head = struct.pack(">I", WIDE_OID)
    if i % 3 == 2:
        key = m["delete"][6:]
        return b"D" + head + b"K" + struct.pack(">h", struct.unpack(">h", key[:2])[0] + 1) + key[2:] + b"n"
    row = m["insert"][6:]
    count = struct.pack(">h", struct.unpack(">h", row[:2])[0] + 1)
    if i % 3 == 1:
        return b"U" + head + b"N" + count + row[2:] + b"u"  # the 4 KB column unchanged (TOAST)
    body = (f"{i:032x}" * 128).encode()  # as the workload: repeat(md5(i::text), 128)
    return b"I" + head + b"N" + count + row[2:] + b"t" + struct.pack(">i", len(body)) + body


def acks(first: int, count: int) -> bytes:
    """JetStream's answers to publishes first + 1 .. first + count, as the ack subscription reads them."""
    return b"".join(b'MSG %s.%d 1 45\r\n{"stream":"bench","seq":%-21d}\r\n' % (INBOX.encode(), s, s)
                    for s in range(first + 1, first + count + 1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=("reference", "wide"), default="reference")
    p.add_argument("--events", type=int, default=20000)
    p.add_argument("--format", choices=bh.FORMATS, default="wal-listener")
    p.add_argument("--transform", choices=tuple(bh.TRANSFORMS), default=None,
                   help="the users row (reference shape) with this transform of bench.hotpath --transforms")
    args = p.parse_args(argv)
    if args.transform is not None and args.shape == "wide":
        p.error("--transform takes the reference shape")
    built = bh.builder(True, args.format, args.transform, binding=NatsPublisher.cloudevents)  # CE as NATS carries them
    built.add_relation(Relation(WIDE_OID, "public", "bench_wide", "d", tuple(
        Column(n, oid, -1, key) for n, oid, key in [*bh.COLUMNS, ("body", types.TEXT, False)])))
    hot = built.hot
    assert hot is not None
    data = [message(args.shape, i, args.transform is not None) for i in range(args.events)]
    # a batch is sealed at BATCH events or at delivery's byte limit, as the listener seals them (the frames of a
    # batch over glibc's mmap threshold would be mapped afresh each time); the acks of a batch of n events
    answers: dict[int, bytes] = {}
    sealed_at = getattr(delivery, "BATCH_BYTES", 1 << 62)  # absent in builds before it (A/B runs)
    subjects = [f"bench.public_{t}" for t in ("bench_ref", "bench_wide", "bench_users")]
    subjects += [f"bench.users.{tenant}" for tenant in range(USERS_TENANTS)]  # the users transform's topics
    # written out, not listener.publishers.nats.hpub_prefix: older builds run this too (A/B) and lack it
    prefixes = {subject: f"HPUB {subject} {INBOX}." for subject in subjects}
    malloc.fix_mmap_threshold()  # the listener's allocator settings (listener/malloc.py)
    streaming = getattr(cli, "_collector_for_streaming", None)  # absent in builds before it (A/B runs)
    if streaming is not None:
        streaming()
    change = built.change
    txn = built.begin(0x16B3748, 820_000_000_000_000)
    if built.wants_lsn:  # Debezium: the reader sets each change's LSN; a commit was seen before
        txn.xid = 7781
        built.commit(0x16B3740)
    lsns = iter(range(0x16B3750, 0x16B3750 + 64 * args.events, 64)) if built.wants_lsn else None
    in_flight: deque[tuple[list[Any], bytes]] = deque()
    # the publisher holds each batch until its acks, and its frames too in builds before it wrote them again from
    # the batch when needed (A/B runs)
    keeps_frames = "batch" not in _Written.__slots__
    state: dict[str, Any] = {"batch": [], "seq": 0, "sent": 0, "bytes": 0}

    def step(buf: bytes) -> None:
        if lsns is not None:
            txn.lsn = next(lsns)
        batch = state["batch"]
        event: Any = change(buf, txn)  # never filtered out here
        batch.append(event)
        state["bytes"] += message_size(event)  # as delivery counts it (a HeadedMessage's head and rest, not joined)
        if len(batch) == BATCH or state["bytes"] >= sealed_at:
            written = hot.nats_frames(batch, prefixes, state["seq"], 1 << 20, _HEADER_BYTES)
            if written is None:
                raise SystemExit("bench.pipeline: a batch left the compiled NATS frames (a subject without a prefix?)")
            frames = written[0]
            answer = answers.get(len(batch))
            if answer is None:
                answer = answers[len(batch)] = acks(0, len(batch))
            hot.nats_acks(answer, b"1")
            state["sent"] += 1
            state["seq"] += len(batch)
            in_flight.append((batch, frames if keeps_frames else b""))
            state["batch"] = []
            state["bytes"] = 0
            if len(in_flight) > 10:
                in_flight.popleft()

    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.process_time()
    any(map(step, data))
    spent = time.process_time() - start
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    shown = args.shape if args.transform is None else f"users ({args.transform})"
    print(f"{shown} {args.format}: {spent / args.events * 1e6:.2f} µs per event ({args.events:,} events), "
          f"{faults / args.events:.2f} page faults per event")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
