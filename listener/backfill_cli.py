"""``wal-listener backfill``: queue a backfill through PostgreSQL and follow its progress until it is done.

The request is a row of ``wal_listener.backfills`` (the same the operator and plain SQL insert); the
listener reading ``listener.slotName`` picks it up and runs it while it streams. This command only needs
the config's database credentials, so it works from anywhere the database can be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

import psycopg

from listener import catalog
from listener.backfill import BackfillError, Request, backfills, request_backfill, validate_request
from listener.config import Config
from listener.errors import ConfigError, DatabaseError
from listener.replication import describe_pg_error

#: how often the state is read while following a backfill (seconds)
FOLLOW_INTERVAL = 0.5
#: after this long without the listener starting the backfill, say that it waits for the listener
PICKUP_HINT_AFTER = 10.0


async def run_backfill_command(cfg: Config, args: argparse.Namespace) -> int:
    if args.print_ddl is not None:
        statements = catalog.state_table_ddl() + (catalog.state_table_grants(args.print_ddl) if args.print_ddl else [])
        print("\n".join(f"{s.as_string(None)};" for s in statements))
        return 0
    try:
        conn = await psycopg.AsyncConnection.connect(
            cfg.database.conninfo(application_name="wal-listener-backfill-cli"), autocommit=True
        )
    except psycopg.OperationalError as exc:
        db = cfg.database
        where = f"{db.where}/{db.name}"
        raise DatabaseError(f"postgres: cannot connect to {where}: {describe_pg_error(exc)}") from None
    async with conn:
        slot = cfg.listener.slot_name
        if args.status:
            show_status(await backfills(conn, slot), sys.stdout)
            return 0
        try:
            tables = await validate_request(conn, cfg, args.tables, args.where)
        except BackfillError as exc:
            raise ConfigError(str(exc)) from None
        name = args.name or datetime.now(UTC).strftime("cli-%Y%m%dT%H%M%S")
        if await request_backfill(conn, slot, name, tables, args.where) is None:
            raise ConfigError(f"backfill: {name!r} was asked for before on slot {slot}; see --status or pick --name")
        print(f"backfill {name} queued for slot {slot}: {', '.join(tables)}", flush=True)
        if args.no_wait:
            return 0
        return await follow(conn, slot, name, sys.stderr, sys.stdout)


async def follow(
    conn: psycopg.AsyncConnection[Any], slot: str, name: str, progress: TextIO, result: TextIO
) -> int:
    """Show the progress of backfill ``name`` on ``progress`` until it ends, then its result on ``result``:
    0 when done, 1 when it failed."""
    bar = _Bar(progress)
    asked = time.monotonic()
    hinted = False
    while True:
        row = await catalog.fetch_one(conn, catalog.BACKFILL_QUERY, (slot, name))
        if row is None:
            raise BackfillError(f"backfill {name} disappeared from {catalog.STATE_TABLE_NAME}")
        request = Request.from_row(row)
        if request.state in ("done", "failed"):
            bar.close()
            ok = request.state == "done"
            outcome = f"done: {request.rows_done:,} rows" if ok else f"failed: {request.error}"
            print(f"backfill {name} {outcome}", file=result, flush=True)
            return 0 if ok else 1
        if request.state == "requested" and not hinted and time.monotonic() - asked > PICKUP_HINT_AFTER:
            hinted = True
            bar.say(f"waiting for the listener of slot {slot} to start it (is it running?)")
        if request.state == "running":
            bar.update(request)
        await asyncio.sleep(FOLLOW_INTERVAL)


class _Bar:
    """The progress line: redrawn in place on a terminal, else a line every few seconds; both only when the
    rows done changed (nothing is printed for a backfill that finishes in one chunk)."""

    WIDTH = 30
    EVERY = 2.0

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.first: tuple[float, int] | None = None
        self.shown = 0  # rows done in the line last shown
        self.printed = 0.0
        self.drawn = False  # a line is drawn in place, not yet ended

    def update(self, request: Request) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = (now, request.rows_done)
        since, rows_then = self.first
        if request.rows_done == self.shown or (not self.tty and now - self.printed < self.EVERY):
            return
        self.shown, self.printed = request.rows_done, now
        line = progress_line(request, (request.rows_done - rows_then) / (now - since) if now > since else 0.0)
        if self.tty:
            self.out.write("\r" + line.ljust(100))
            self.out.flush()
            self.drawn = True
        else:
            print(line, file=self.out, flush=True)

    def say(self, text: str) -> None:
        self.close()
        print(text, file=self.out, flush=True)

    def close(self) -> None:
        if self.drawn:
            self.out.write("\n")
            self.out.flush()
            self.drawn = False


def progress_line(request: Request, rate: float) -> str:
    """``[######......] 12,000/50,000 rows (24%) 8,000 rows/s ETA 5s`` (estimate, rate and ETA when known)."""
    done, total = request.rows_done, request.rows_estimated
    speed = f" {rate:,.0f} rows/s" if rate > 0 else ""
    table = f" {request.current_table}" if request.current_table else ""
    if total > 0:
        share = min(done / total, 1.0)
        filled = int(share * _Bar.WIDTH)
        bar = "[" + "#" * filled + "." * (_Bar.WIDTH - filled) + "]"
        eta = f" ETA {max(total - done, 0) / rate:.0f}s" if rate > 0 else ""
        return f"{bar} {done:,}/{total:,} rows ({share:.0%}){speed}{eta}{table}"
    return f"{done:,} rows{speed}{table}"


def show_status(items: list[Request], out: TextIO) -> None:
    if not items:
        print("no backfills", file=out)
        return
    head = f"{'NAME':<28} {'STATE':<10} {'ROWS':>12} {'ESTIMATED':>12} {'STARTED':<20} {'FINISHED':<20} TABLES"
    print(head, file=out)
    for item in items:
        started = item.started_at.strftime("%Y-%m-%d %H:%M:%S") if item.started_at else "-"
        finished = item.finished_at.strftime("%Y-%m-%d %H:%M:%S") if item.finished_at else "-"
        print(f"{item.name:<28} {item.state:<10} {item.rows_done:>12,} {item.rows_estimated:>12,} {started:<20} "
              f"{finished:<20} {', '.join(item.tables)}" + (f"  error: {item.error}" if item.error else ""), file=out)
