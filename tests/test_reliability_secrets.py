"""Credentials never leave the process: not in logs (debug level included), /metrics, /ready or Sentry
events — also while PostgreSQL and the broker are failing and every error path talks about them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.harness import ListenerProcess, http_get, nats_config, read_stream, run_cli, sql, unique, wait_until
from tests.support.proxy import TcpProxy
from tests.support.sentry import SentryInbox
from tests.support.services import NatsServer, PostgresServer, free_port

pytestmark = pytest.mark.service

DB_PASSWORD = "db-Pa55word-Xq1"
NATS_PASSWORD = "nats-Pa55word-Xq2"
URL_PASSWORD = "url-Pa55word-Xq3"
SENTRY_KEY = "sentrykey0123456789abcdef"
HASH_KEY = "transforms-Hash-Key-Xq4"
SECRETS = (DB_PASSWORD, NATS_PASSWORD, URL_PASSWORD, SENTRY_KEY, HASH_KEY)


async def test_credentials_never_appear_in_logs_metrics_ready_or_sentry(
    fresh_db: str, pg: PostgresServer, make_nats: Callable[..., NatsServer], make_proxy: Callable[..., TcpProxy],
    sentry: SentryInbox, tmp_path: Path, procs: list[ListenerProcess],
) -> None:
    sentry_bodies = sentry.bodies
    broker = make_nats()
    broker.stop()  # down at start: the "cannot connect to <address>" path
    db_path = make_proxy(pg.host, pg.port)
    dsn = pg.dsn(fresh_db)
    await sql(dsn, "CREATE TABLE t (id int PRIMARY KEY, secret_looking text)")
    topic = unique("secret")
    port = free_port()
    cfg = nats_config(db_path.port, fresh_db, f"nats://bob:{URL_PASSWORD}@127.0.0.1:{broker.port}", topic,
                      serverPort=port, refreshConnection="1s", ackTimeout="1s")
    cfg["database"]["password"] = DB_PASSWORD
    cfg["listener"]["transformsHashKey"] = HASH_KEY
    cfg["listener"]["transforms"] = [{"tables": ["t"], "mask": {"secret_looking": "hash"}}]
    cfg["publisher"].update(username="alice", password=NATS_PASSWORD)
    cfg["logger"]["level"] = "debug"
    cfg["monitoring"] = {"promAddr": f":{port}", "sentryDSN": sentry.dsn(SENTRY_KEY)}
    outputs: list[str] = []
    proc = ListenerProcess(cfg, tmp_path).start()
    procs.append(proc)
    await wait_until(lambda: "broker unreachable" in proc.output(), 30, "the broker error")
    outputs.append((await http_get(port, "/ready"))[1])
    await asyncio.to_thread(broker.start)
    await wait_until(lambda: '"msg":"streaming"' in proc.output(), 30, "streaming")
    await sql(dsn, "INSERT INTO t VALUES (1, 'not a secret')")
    await read_stream(broker.url, topic, 1)

    db_path.stop()  # PostgreSQL unreachable: connection errors, reconnects
    await wait_until(lambda: "cannot connect to 127.0.0.1" in proc.output(), 30, "the database error")
    outputs.append((await http_get(port, "/ready"))[1])
    db_path.start()
    await wait_until(lambda: proc.output().count('"msg":"streaming"') >= 2, 30, "streaming again")
    await asyncio.to_thread(broker.restart)  # broker errors while connected
    await sql(dsn, "INSERT INTO t VALUES (2, 'x')")
    await read_stream(broker.url, topic, 2)
    outputs.append((await http_get(port, "/ready"))[1])
    outputs.append((await http_get(port, "/metrics"))[1])
    await wait_until(lambda: len(sentry_bodies) >= 2, 30, "Sentry events")
    assert await asyncio.to_thread(proc.terminate) == 0
    outputs.append(proc.output())
    outputs.extend(b.decode(errors="replace") for b in sentry_bodies)
    check = run_cli(["--config", str(proc.path), "check-config"], timeout=30)
    outputs.append(check.stdout + check.stderr)

    everything = "\n".join(outputs)
    leaks = [s for s in SECRETS if s in everything]
    assert not leaks, [line for line in everything.splitlines() if any(s in line for s in leaks)][:5]
    # the paths that would have printed them did run
    assert "nats://bob:***@127.0.0.1" in proc.output()
    assert any(b"broker unreachable" in b or b"cannot connect" in b for b in sentry_bodies)
    assert "address: nats://bob:***@" in check.stdout
