"""Micro-benchmark of the read path alone: pgoutput change message -> event (decode, convert, encode).

No services: the reference workload's row (int, text, numeric, bool, timestamptz, text[], jsonb) as
pgoutput sends it, through ``EventBuilder.change`` with the compiled fast path and without it::

    python -m bench.hotpath                 # 200k messages of each kind, best of 3
    python -m bench.hotpath --messages 50000 --runs 5
    python -m bench.hotpath --formats wal-listener,cloudevents,cloudevents-structured,debezium,debezium-schemas
    python -m bench.hotpath --transforms none,exclude,hash,redact,null,route,users

Prints µs per event (CPU time of this process, so a busy machine disturbs it less) and events/s for
Insert, Update and Delete on one core, per event format
(``publisher.format``). ``--transforms``: the users row
(the reference row plus tenant_id, email, phone, password_hash, as ``bench_users``) without a transform
and with each kind of ``listener.transforms`` alone (exclude password_hash, hash email, redact phone,
null phone, route by tenant_id) and with the bench's transform (all but null).
"""

from __future__ import annotations

import argparse
import struct
import time
from typing import Any

from bench.workload import USERS_HASH_KEY, USERS_TENANTS, USERS_TRANSFORM
from listener import types
from listener.config import Config
from listener.event import EventBuilder
from listener.formats import Binding
from listener.pgoutput import Column, Relation

OID = 16384
COLUMNS = [("id", types.INT4, True), ("name", types.TEXT, False), ("amount", types.NUMERIC, False),
           ("active", types.BOOL, False), ("created_at", types.TIMESTAMPTZ, False), ("tags", 1009, False),
           ("payload", types.JSONB, False)]
USERS_COLUMNS = [*COLUMNS, ("tenant_id", types.INT4, False), ("email", types.TEXT, False),
                 ("phone", types.TEXT, False), ("password_hash", types.TEXT, False)]
#: --transforms: each kind of transform alone on the users row, and the bench's (bench.run --transform)
TRANSFORMS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "exclude": {"columns": {"exclude": ["password_hash"]}},
    "hash": {"mask": {"email": "hash"}},
    "redact": {"mask": {"phone": "redact"}},
    "null": {"mask": {"phone": "null"}},
    "route": {"topic": "users.{tenant_id}"},
    "users": USERS_TRANSFORM,
}


def _tuple(values: list[str | None]) -> bytes:
    out = struct.pack(">h", len(values))
    for value in values:
        if value is None:
            out += b"n"
        else:
            raw = value.encode()
            out += b"t" + struct.pack(">i", len(raw)) + raw
    return out


def messages(i: int, users: bool = False) -> dict[str, bytes]:
    """The reference workload's Insert, Update and Delete of row ``i``, as pgoutput sends them (``users``: the
    users workload's)."""
    row = [str(i), f"name-{i}", f"{i * 1.01:.2f}", "t" if i % 2 == 0 else "f", f"2026-01-01 00:{i % 60:02d}:00+00",
           f"{{tag-{i % 10},group-{i % 7}}}",
           f'{{"i": {i}, "label": "item {i}", "nested": {{"even": {str(i % 2 == 0).lower()}, "score": {i % 100}}}}}']
    if users:
        row += [str(i % USERS_TENANTS), f"user-{i}@example.com", f"+1-555-{i:07d}", f"{i:032x}"]
    head = struct.pack(">I", OID)
    key = [str(i)] + [None] * (len(row) - 1)
    return {"insert": b"I" + head + b"N" + _tuple(row),  # type: ignore[arg-type]
            "update": b"U" + head + b"N" + _tuple(row),  # type: ignore[arg-type]
            "delete": b"D" + head + b"K" + _tuple(key)}


FORMATS = ("wal-listener", "cloudevents", "cloudevents-structured", "debezium", "debezium-schemas")


def builder(
    compiled: bool, fmt: str = "wal-listener", transform: str | None = None, binding: Binding | None = None
) -> EventBuilder:
    """``transform``: a key of :data:`TRANSFORMS` (the users row), or None (the reference row); ``binding``: the
    publisher's CloudEvents binding (a publisher class's ``cloudevents``), else the default one."""
    publisher: dict[str, object] = {"type": "nats", "address": "localhost:4222", "topic": "bench",
                                    "format": fmt.removesuffix("-structured").removesuffix("-schemas")}
    if fmt == "cloudevents-structured":
        publisher["cloudEvents"] = {"mode": "structured"}
    if fmt == "debezium-schemas":
        publisher["debezium"] = {"schemas": True}
    listener: dict[str, object] = {"slotName": "bench"}
    entry = TRANSFORMS.get(transform or "none")
    if entry is not None:
        listener.update(transforms=[{**entry, "tables": ["bench_users"]}], transformsHashKey=USERS_HASH_KEY)
    cfg = Config.model_validate({"listener": listener, "database": {"name": "db", "user": "u"},
                                 "publisher": publisher})
    more: dict[str, Any] = {} if binding is None else {"binding": binding}
    built = EventBuilder(cfg, types.TypeRegistry(), needs_key=False, compiled=compiled, **more)
    if compiled and built.hot is None:
        raise SystemExit("bench.hotpath: listener._hotpath is not built (pip install -e . with a C compiler)")
    table, columns = ("bench_ref", COLUMNS) if transform is None else ("bench_users", USERS_COLUMNS)
    built.add_relation(Relation(OID, "public", table, "d", tuple(Column(n, oid, -1, key) for n, oid, key in columns)))
    return built


def measure(compiled: bool, kind: str, count: int, runs: int, fmt: str = "wal-listener",
            transform: str | None = None) -> float:
    """Best µs per event over ``runs`` runs of ``count`` messages."""
    built = builder(compiled, fmt, transform)
    msgs = [messages(i, transform is not None)[kind] for i in range(count)]
    best = float("inf")
    for _ in range(runs):
        txn = built.begin(0x16B3748, 820_000_000_000_000)
        change = built.change
        start = time.process_time()
        for msg in msgs:
            change(msg, txn)
        best = min(best, (time.process_time() - start) / count * 1e6)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__.split("\n")[0])
    p.add_argument("--messages", type=int, default=200_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--formats", default="wal-listener", help=f"comma-separated, of {', '.join(FORMATS)}")
    p.add_argument("--transforms", default="",
                   help=f"comma-separated, of {', '.join(TRANSFORMS)}: the users row with each (instead of --formats)")
    args = p.parse_args(argv)
    chosen = [f.strip() for f in args.formats.split(",") if f.strip()]
    if any(f not in FORMATS for f in chosen):
        p.error(f"--formats: choose from {', '.join(FORMATS)}")
    shapes = [t.strip() for t in args.transforms.split(",") if t.strip()]
    if any(t not in TRANSFORMS for t in shapes):
        p.error(f"--transforms: choose from {', '.join(TRANSFORMS)}")
    runs: list[tuple[str, str, str | None]] = [(f, f, None) for f in chosen] if not shapes else [
        (f"users, {t}", "wal-listener", t) for t in shapes]
    print(f"{'format':23} {'kind':8} {'path':9} {'µs/event':>9} {'events/s':>10}")
    for label, fmt, transform in runs:
        for kind in ("insert", "update", "delete"):
            for compiled in (False, True):
                us = measure(compiled, kind, args.messages, args.runs, fmt, transform)
                print(f"{label:23} {kind:8} {'compiled' if compiled else 'python':9} {us:9.2f} {1e6 / us:10,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
