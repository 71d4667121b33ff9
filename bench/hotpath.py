"""Micro-benchmark of the read path alone: pgoutput change message -> event (decode, convert, encode).

No services: the reference workload's row (int, text, numeric, bool, timestamptz, text[], jsonb) as
pgoutput sends it, through ``EventBuilder.change`` with the compiled fast path and without it::

    python -m bench.hotpath                 # 200k messages of each kind, best of 3
    python -m bench.hotpath --messages 50000 --runs 5
    python -m bench.hotpath --formats wal-listener,cloudevents,cloudevents-structured,debezium,debezium-schemas

Prints µs per event and events/s for Insert, Update and Delete on one core, per event format
(``publisher.format``; the Debezium format has no compiled path).
"""

from __future__ import annotations

import argparse
import struct
import time

from listener import types
from listener.config import Config
from listener.event import EventBuilder
from listener.pgoutput import Column, Relation

OID = 16384
COLUMNS = [("id", types.INT4, True), ("name", types.TEXT, False), ("amount", types.NUMERIC, False),
           ("active", types.BOOL, False), ("created_at", types.TIMESTAMPTZ, False), ("tags", 1009, False),
           ("payload", types.JSONB, False)]


def _tuple(values: list[str | None]) -> bytes:
    out = struct.pack(">h", len(values))
    for value in values:
        if value is None:
            out += b"n"
        else:
            raw = value.encode()
            out += b"t" + struct.pack(">i", len(raw)) + raw
    return out


def messages(i: int) -> dict[str, bytes]:
    """The reference workload's Insert, Update and Delete of row ``i``, as pgoutput sends them."""
    row = [str(i), f"name-{i}", f"{i * 1.01:.2f}", "t" if i % 2 == 0 else "f", f"2026-01-01 00:{i % 60:02d}:00+00",
           f"{{tag-{i % 10},group-{i % 7}}}",
           f'{{"i": {i}, "label": "item {i}", "nested": {{"even": {str(i % 2 == 0).lower()}, "score": {i % 100}}}}}']
    head = struct.pack(">I", OID)
    key = [str(i)] + [None] * (len(COLUMNS) - 1)
    return {"insert": b"I" + head + b"N" + _tuple(row),  # type: ignore[arg-type]
            "update": b"U" + head + b"N" + _tuple(row),  # type: ignore[arg-type]
            "delete": b"D" + head + b"K" + _tuple(key)}


FORMATS = ("wal-listener", "cloudevents", "cloudevents-structured", "debezium", "debezium-schemas")


def builder(compiled: bool, fmt: str = "wal-listener") -> EventBuilder:
    publisher: dict[str, object] = {"type": "nats", "address": "localhost:4222", "topic": "bench",
                                    "format": fmt.removesuffix("-structured").removesuffix("-schemas")}
    if fmt == "cloudevents-structured":
        publisher["cloudEvents"] = {"mode": "structured"}
    if fmt == "debezium-schemas":
        publisher["debezium"] = {"schemas": True}
    cfg = Config.model_validate({"listener": {"slotName": "bench"}, "database": {"name": "db", "user": "u"},
                                 "publisher": publisher})
    built = EventBuilder(cfg, types.TypeRegistry(), needs_key=False, compiled=compiled)
    if compiled and built.hot is None and not fmt.startswith("debezium"):
        raise SystemExit("bench.hotpath: listener._hotpath is not built (pip install -e . with a C compiler)")
    built.add_relation(Relation(OID, "public", "bench_ref", "d",
                                tuple(Column(n, oid, -1, key) for n, oid, key in COLUMNS)))
    return built


def measure(compiled: bool, kind: str, count: int, runs: int, fmt: str = "wal-listener") -> float:
    """Best µs per event over ``runs`` runs of ``count`` messages."""
    built = builder(compiled, fmt)
    msgs = [messages(i)[kind] for i in range(count)]
    best = float("inf")
    for _ in range(runs):
        txn = built.begin(0x16B3748, 820_000_000_000_000)
        change = built.change
        start = time.perf_counter()
        for msg in msgs:
            change(msg, txn)
        best = min(best, (time.perf_counter() - start) / count * 1e6)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__.split("\n")[0])
    p.add_argument("--messages", type=int, default=200_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--formats", default="wal-listener", help=f"comma-separated, of {', '.join(FORMATS)}")
    args = p.parse_args(argv)
    chosen = [f.strip() for f in args.formats.split(",") if f.strip()]
    if any(f not in FORMATS for f in chosen):
        p.error(f"--formats: choose from {', '.join(FORMATS)}")
    print(f"{'format':23} {'kind':8} {'path':9} {'µs/event':>9} {'events/s':>10}")
    for fmt in chosen:
        for kind in ("insert", "update", "delete"):
            for compiled in (False, True) if not fmt.startswith("debezium") else (False,):
                us = measure(compiled, kind, args.messages, args.runs, fmt)
                print(f"{fmt:23} {kind:8} {'compiled' if compiled else 'python':9} {us:9.2f} {1e6 / us:10,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
