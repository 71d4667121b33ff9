"""The listener as users run it: a process, killed, restarted, signalled, misconfigured, with outages."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from listener import hotpath
from tests.support.harness import (
    ListenerProcess,
    Writer,
    assert_complete,
    confirmed_lsn,
    current_lsn,
    http_get,
    nats_config,
    read_stream,
    run_cli,
    sql,
    unique,
    wait_until,
)
from tests.support.sentry import SentryInbox
from tests.support.services import NatsServer, PostgresServer, free_port

pytestmark = pytest.mark.service


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


async def test_kill_9_mid_stream_then_restart_loses_nothing_and_keeps_ids(
    fresh_db: str, pg: PostgresServer, nats_server: NatsServer, workdir: Path, procs: list[ListenerProcess]
) -> None:
    dsn = pg.dsn(fresh_db)
    await sql(dsn, "CREATE TABLE items (id int PRIMARY KEY, payload text)")
    topic = unique("kill")
    cfg = nats_config(pg.port, fresh_db, nats_server.url, topic)
    first = ListenerProcess(cfg, workdir).start()
    procs.append(first)
    await wait_until(lambda: '"msg":"streaming"' in first.output(), 30, "streaming")
    writer = Writer(dsn, transactions=300, rows_per_txn=20).start()
    await wait_until(lambda: writer.committed >= 1000, 60, "some commits")
    await read_stream(nats_server.url, topic, 500, timeout=30, rest=False)
    first.kill()  # kill -9 while transactions keep committing
    killed_at = writer.committed
    second = ListenerProcess(cfg, workdir).start()
    procs.append(second)
    writer.join()
    assert writer.committed == 6000 and killed_at < 6000
    events = await read_stream(nats_server.url, topic, 6000, timeout=90)
    assert_complete(events, 6000)
    end = await current_lsn(dsn)
    await wait_until(lambda: _ge(confirmed_lsn(dsn, cfg["listener"]["slotName"]), end), 30)
    assert second.terminate() == 0


async def test_postgres_and_nats_restart_mid_stream_recover_by_themselves(
    make_pg: Callable[..., PostgresServer], make_nats: Callable[..., NatsServer], workdir: Path,
    procs: list[ListenerProcess],
) -> None:
    pg = make_pg()
    pg.create_database("app")
    broker = make_nats()
    dsn = pg.dsn("app")
    await sql(dsn, "CREATE TABLE items (id int PRIMARY KEY, payload text)")
    topic = unique("outage")
    cfg = nats_config(pg.port, "app", broker.url, topic, ackTimeout="2s")
    proc = ListenerProcess(cfg, workdir).start()
    procs.append(proc)
    await wait_until(lambda: '"msg":"streaming"' in proc.output(), 30, "streaming")
    starting = next(line for line in proc.logs() if line.get("msg") == "starting")
    assert starting["compiled_hot_path"] is (hotpath.load() is not None)  # the process runs the path built here
    writer = Writer(dsn, transactions=200, rows_per_txn=10, pace=0.02).start()
    await wait_until(lambda: writer.committed >= 300, 60, "some commits")
    await asyncio.to_thread(pg.restart)
    await wait_until(lambda: writer.committed >= 1000, 60, "commits after the PostgreSQL restart")
    await asyncio.to_thread(broker.restart)
    writer.join()
    events = await read_stream(broker.url, topic, 2000, timeout=90)
    try:
        assert_complete(events, 2000)
    except AssertionError:
        print(proc.output()[-6000:])  # what the listener said, for the failure report
        raise
    logs = proc.logs()
    assert any("replication" in e.get("msg", "") or "postgres" in e.get("msg", "") for e in logs
               if e.get("level") in ("error", "warning")), "the PostgreSQL outage was not reported"
    assert proc.terminate() == 0


async def test_sigterm_drains_confirms_and_exits_0(
    fresh_db: str, pg: PostgresServer, nats_server: NatsServer, workdir: Path, procs: list[ListenerProcess]
) -> None:
    dsn = pg.dsn(fresh_db)
    await sql(dsn, "CREATE TABLE items (id int PRIMARY KEY, payload text)")
    topic = unique("term")
    cfg = nats_config(pg.port, fresh_db, nats_server.url, topic, heartbeatInterval="30s")
    proc = ListenerProcess(cfg, workdir).start()
    procs.append(proc)
    await wait_until(lambda: '"msg":"streaming"' in proc.output(), 30, "streaming")
    await sql(dsn, "INSERT INTO items SELECT g, 'x' FROM generate_series(1, 5000) g")
    end = await current_lsn(dsn)
    await read_stream(nats_server.url, topic, 1, timeout=30)
    assert await asyncio.to_thread(proc.terminate) == 0
    assert await confirmed_lsn(dsn, cfg["listener"]["slotName"]) >= end
    events = await read_stream(nats_server.url, topic, 5000)
    assert len({r.event["data"]["id"] for r in events}) == 5000
    assert any(e.get("msg") == "stopped" for e in proc.logs())


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"listener": {"slotName": None}}, "config: listener.slotName is required but missing"),
        ({"database": {"port": "abc"}}, "config: database.port = 'abc' is invalid"),
        ({"publisher": {"type": "zeromq"}}, "config: publisher.type = 'zeromq' is not allowed; use one of"),
        ({"listener": {"slotName": "Bad-Slot"}}, "config: listener.slotName = 'Bad-Slot' is invalid"),
        ({"listener": {"filter": {"tables": {"users": ["upsert"]}}}}, "listener.filter.tables.users.0 = 'upsert'"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(tmp_path: Path, change: dict[str, Any], expected: str) -> None:
    cfg = nats_config(5432, "db", "127.0.0.1:4222", "t")
    for section, values in change.items():
        for key, value in values.items():
            if value is None:
                cfg[section].pop(key)
            else:
                cfg[section][key] = value
    path = tmp_path / "config.yml"
    path.write_text(json.dumps(cfg))
    result = run_cli(["--config", str(path)])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_and_env_only_config(tmp_path: Path) -> None:
    result = run_cli(["--config", str(tmp_path / "nope.yml")])
    assert result.returncode == 2
    assert "not found" in result.stderr and result.stderr.count("\n") == 1
    env = {"WAL_LISTENER_SLOTNAME": "s1", "WAL_DATABASE_NAME": "db", "WAL_DATABASE_USER": "u",
           "WAL_PUBLISHER_TYPE": "nats", "WAL_PUBLISHER_ADDRESS": "h:1", "WAL_PUBLISHER_TOPIC": "t",
           "WAL_DATABASE_PORT": "6543"}
    (tmp_path / "empty.yml").write_text("{}\n")
    result = run_cli(["--config", str(tmp_path / "empty.yml"), "check-config"], env=env)
    assert result.returncode == 0, result.stderr
    assert "port: 6543" in result.stdout and "slotName: s1" in result.stdout


async def test_unreachable_database_retries_with_clear_errors_sent_to_sentry(
    tmp_path: Path, nats_server: NatsServer, procs: list[ListenerProcess], sentry: SentryInbox
) -> None:
    dead_port = free_port()
    status_port = free_port()
    cfg = nats_config(dead_port, "db", nats_server.url, unique("dead"), serverPort=status_port,
                      refreshConnection="1s")
    cfg["database"]["password"] = "s3cr3t-pw"
    cfg["monitoring"]["sentryDSN"] = sentry.dsn("publickey")
    proc = ListenerProcess(cfg, tmp_path).start()
    procs.append(proc)
    try:
        await wait_until(lambda: sum("cannot connect" in e.get("msg", "") for e in proc.logs()) >= 2, 30,
                         "repeated connection errors")
        status, body = await http_get(status_port, "/ready")
        assert status == 503 and '"postgres":false' in body and "s3cr3t-pw" not in body
        await wait_until(lambda: any(b"cannot connect" in b for b in sentry.bodies), 30, "a Sentry event")
    finally:
        assert await asyncio.to_thread(proc.terminate) == 0
    errors = [e for e in proc.logs() if e.get("level") == "error"]
    assert f"127.0.0.1:{dead_port}/db" in errors[0]["msg"]
    assert "s3cr3t-pw" not in proc.output()
    assert not any(b"s3cr3t-pw" in b for b in sentry.bodies)


async def test_slot_in_use_is_reported_and_taken_over(
    fresh_db: str, pg: PostgresServer, nats_server: NatsServer, workdir: Path, procs: list[ListenerProcess]
) -> None:
    dsn = pg.dsn(fresh_db)
    await sql(dsn, "CREATE TABLE items (id int PRIMARY KEY, payload text)")
    cfg = nats_config(pg.port, fresh_db, nats_server.url, unique("busy"), refreshConnection="1s")
    first = ListenerProcess(cfg, workdir).start()
    procs.append(first)
    await wait_until(lambda: '"msg":"streaming"' in first.output(), 30, "the first listener to stream")
    second = ListenerProcess(cfg, workdir).start()
    procs.append(second)
    await wait_until(lambda: "is in use by another process" in second.output(), 30, "the in-use report")
    first.kill()
    await wait_until(lambda: '"msg":"streaming"' in second.output(), 60, "the second listener to take over")
    await sql(dsn, "INSERT INTO items VALUES (1, 'x')")
    events = await read_stream(nats_server.url, cfg["publisher"]["topic"], 1)
    assert events[0].event["data"]["id"] == 1
    assert second.terminate() == 0


async def test_wal_level_not_logical_says_what_to_change(
    make_pg: Callable[..., PostgresServer], nats_server: NatsServer, workdir: Path, procs: list[ListenerProcess]
) -> None:
    pg = make_pg(settings={"wal_level": "replica"})
    proc = ListenerProcess(nats_config(pg.port, "postgres", nats_server.url, unique("wl")), workdir).start()
    procs.append(proc)
    await wait_until(lambda: "set wal_level = logical in postgresql.conf" in proc.output(), 30)
    assert proc.proc is not None and proc.proc.poll() is None  # stays up, reports, no crash loop
    assert proc.terminate() == 0


async def _ge(value: Any, target: int) -> bool:
    return bool(await value >= target)


def test_demo_shows_events_arriving_and_cleans_up() -> None:
    result = run_cli(["demo", "--changes", "2"], timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert out.count("--- wal_listener.public_users") == 7  # 2 inserts, 2 updates, 2 deletes, 1 truncate
    for action in ("INSERT", "UPDATE", "DELETE", "TRUNCATE"):
        assert f'"action": "{action}"' in out
    assert "done: 7 events" in out and "removed their files" in out
