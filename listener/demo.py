"""``wal-listener demo``: the first thing a new user runs.

Starts a throwaway PostgreSQL (wal_level=logical) and a throwaway nats-server with JetStream, runs
the listener against them with the embedded default config, makes a few changes, prints every event
as it arrives on the stream, then stops everything and removes the temporary files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from typing import Any

import psycopg
import yaml

from listener.config import Config


def demo_config(pg_port: int, nats_url: str) -> Config:
    """The embedded default: every table of database ``demo`` to stream ``wal_listener`` on NATS."""
    return Config.model_validate({
        "listener": {"slotName": "demo_slot", "serverPort": 0, "heartbeatInterval": "1s",
                     "topicsMap": {}},
        "database": {"host": "127.0.0.1", "port": pg_port, "name": "demo", "user": "postgres"},
        "publisher": {"type": "nats", "address": nats_url, "topic": "wal_listener"},
        "logger": {"level": "warning", "fmt": "text"},
        "monitoring": {"promAddr": ""},
    })


def _say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"==> {text}", flush=True)


async def _demo(pg_port: int, nats_url: str, changes: int) -> int:
    import nats

    from listener.app import Listener

    cfg = demo_config(pg_port, nats_url)
    _say("config (the embedded default; the same keys go in config.yml):")
    print(yaml.safe_dump(cfg.to_yaml_dict(only_set=True), sort_keys=False), flush=True)
    dsn = cfg.database.conninfo()
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            "CREATE TABLE users (id serial PRIMARY KEY, name text NOT NULL, balance numeric(12,2),"
            " tags text[], profile jsonb, created timestamptz DEFAULT now())"
        )
        await conn.execute("ALTER TABLE users REPLICA IDENTITY FULL")

    listener = Listener(cfg)
    runner = asyncio.create_task(listener.run())
    while not (listener.health.postgres and listener.publisher.ready):
        if runner.done():
            return runner.result() or 1
        await asyncio.sleep(0.05)
    _say("listener is streaming from slot demo_slot; making changes")

    nc = await nats.connect(nats_url)
    sub = await nc.jetstream().subscribe("wal_listener.>", ordered_consumer=True)
    expected = changes * 3 + 1
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for i in range(1, changes + 1):
            await conn.execute(
                "INSERT INTO users (name, balance, tags, profile) VALUES (%s, %s, %s, %s)",
                (f"user{i}", f"{i * 10}.50", ["new", f"n{i}"], json.dumps({"level": i})),
            )
        await conn.execute("UPDATE users SET balance = balance + 1, tags = array_append(tags, 'rich')")
        await conn.execute("DELETE FROM users")
        await conn.execute("TRUNCATE users")

    _say(f"events on NATS JetStream (waiting for {expected}):")
    received = 0
    try:
        while received < expected:
            msg = await sub.next_msg(timeout=15)
            received += 1
            event: dict[str, Any] = json.loads(msg.data)
            print(f"--- {msg.subject}  Nats-Msg-Id={msg.headers.get('Nats-Msg-Id') if msg.headers else ''}")
            print(json.dumps(event, indent=2), flush=True)
    except TimeoutError:
        print(f"only {received} of {expected} events arrived", file=sys.stderr)
    finally:
        await nc.close()
        listener.stop()
        await runner
    _say(f"done: {received} events; every one was acknowledged by JetStream before its LSN was confirmed")
    return 0 if received == expected else 1


def run_demo(changes: int = 5) -> int:
    from listener.throwaway import NatsServer, PostgresServer

    logging.basicConfig(level=logging.WARNING)
    _say("starting a throwaway PostgreSQL (wal_level=logical) and nats-server (JetStream)")
    with contextlib.ExitStack() as stack:
        pg = stack.enter_context(PostgresServer())
        pg.create_database("demo")
        broker = stack.enter_context(NatsServer())
        _say(f"PostgreSQL {pg.version} on 127.0.0.1:{pg.port}, NATS on {broker.url}")
        code = asyncio.run(_demo(pg.port, broker.url, changes))
    _say("stopped the throwaway servers and removed their files")
    return code
