"""Logical decoding messages as events (the transactional outbox): PostgreSQL -> the listener -> NATS.

``pg_logical_emit_message(true, prefix, content)`` is published with its transaction (never when the
transaction rolls back), ``pg_logical_emit_message(false, ...)`` at once; prefixes not listed in
``listener.messages.prefixes`` are skipped and counted.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.support.harness import (
    ListenerProcess,
    Received,
    confirmed_lsn,
    current_lsn,
    metric,
    nats_config,
    read_stream,
    running,
    sql,
    unique,
    wait_until,
)
from tests.support.services import NatsServer

pytestmark = pytest.mark.service


def outbox_config(pg: Any, db: str, nats: NatsServer, **listener: Any) -> dict[str, Any]:
    listener.setdefault("messages", {"prefixes": ["outbox"]})
    return nats_config(pg.port, db, nats.url, **listener)


def emit(prefix: str, content: str, transactional: bool = True) -> str:
    return f"SELECT pg_logical_emit_message({str(transactional).lower()}, '{prefix}', '{content}')"


async def test_a_message_arrives_with_its_transaction_in_order_and_never_when_rolled_back(
    fresh_db: str, pg: Any, nats_server: NatsServer
) -> None:
    dsn = pg.dsn(fresh_db)
    await sql(dsn, "CREATE TABLE items (id int PRIMARY KEY, state text)")
    cfg = outbox_config(pg, fresh_db, nats_server)
    topic = cfg["publisher"]["topic"]
    async with running(cfg):
        placed = emit("outbox", '{"order": 1, "event": "placed"}')
        never = emit("outbox", '{"order": 2}')
        await sql(
            dsn,
            f"BEGIN; INSERT INTO items VALUES (1, 'new'); {placed}; UPDATE items SET state = 'placed' WHERE id = 1;"
            " COMMIT",
            f"BEGIN; INSERT INTO items VALUES (2, 'never'); {never}; ROLLBACK",
            "INSERT INTO items VALUES (3, 'after')",
        )
        got = await read_stream(nats_server.url, topic, 4)
    assert [(g.subject.rsplit(".", 1)[1], g.event["action"]) for g in got] == [
        ("public_items", "INSERT"), ("outbox", "MESSAGE"), ("public_items", "UPDATE"), ("public_items", "INSERT"),
    ]
    message = got[1].event
    assert message["content"] == {"order": 1, "event": "placed"} and message["prefix"] == "outbox"
    assert message["commitTime"] == got[0].event["commitTime"]
    assert got[0].id < message["id"] < got[2].id  # one transaction: consecutive ids
    assert got[3].event["data"]["id"] == 3  # the rolled-back transaction left nothing


async def test_a_non_transactional_message_is_published_at_once(
    fresh_db: str, pg: Any, nats_server: NatsServer
) -> None:
    dsn = pg.dsn(fresh_db)
    await sql(dsn, "CREATE TABLE items (id int PRIMARY KEY)")
    cfg = outbox_config(pg, fresh_db, nats_server)
    topic = cfg["publisher"]["topic"]
    async with running(cfg), await psycopg.AsyncConnection.connect(dsn) as open_txn:
        await open_txn.execute("INSERT INTO items VALUES (1)")
        await open_txn.execute(emit("outbox", "now", transactional=False))
        # the transaction that wrote it is still open, and is then rolled back: the message is out anyway
        got = await read_stream(nats_server.url, topic, 1, rest=False)
        assert got[0].event["content"] == "now" and got[0].subject == f"{topic}.outbox"
        await open_txn.rollback()
        await sql(dsn, "INSERT INTO items VALUES (2)")
        got = await read_stream(nats_server.url, topic, 2)
    assert [g.event["action"] for g in got] == ["MESSAGE", "INSERT"]
    assert got[1].event["data"] == {"id": 2}


async def test_content_forms_and_unlisted_prefixes(fresh_db: str, pg: Any, nats_server: NatsServer) -> None:
    dsn = pg.dsn(fresh_db)
    skipped = metric("messages_skipped_total", {"prefix": "audit"})
    cfg = outbox_config(pg, fresh_db, nats_server, messages={"prefixes": ["outbox", "billing"]},
                        topicsMap={"billing": "money.billing"})
    topic = cfg["publisher"]["topic"]
    async with running(cfg):
        await sql(
            dsn,
            emit("audit", "not listed"),
            emit("outbox", '"a JSON string"'),
            emit("outbox", "plain text, not JSON"),
            ("SELECT pg_logical_emit_message(true, 'outbox', %s::bytea)", (b"\xff\x00\xfe",)),
            emit("billing", "[1, 2]", transactional=False),
            emit("wal-listener-heartbeat", ""),  # the listener's own: neither published nor counted
        )
        got = await read_stream(nats_server.url, topic, 4)
        await wait_until(lambda: metric("messages_skipped_total", {"prefix": "audit"}) == skipped + 1, 10)
    contents = [(g.subject, g.event["content"], g.event.get("contentEncoding")) for g in got]
    assert contents == [
        (f"{topic}.outbox", "a JSON string", None),
        (f"{topic}.outbox", "plain text, not JSON", None),
        (f"{topic}.outbox", base64.b64encode(b"\xff\x00\xfe").decode(), "base64"),  # not UTF-8
        (f"{topic}.money.billing", [1, 2], None),
    ]
    assert metric("messages_skipped_total", {"prefix": "wal-listener-heartbeat"}) == 0


async def test_kill_9_before_the_commit_is_confirmed_sends_the_message_again_with_its_id(
    fresh_db: str, pg: Any, nats_server: NatsServer, tmp_path: Path, procs: list[ListenerProcess]
) -> None:
    """The message is published, then a change of its transaction can never be (larger than NATS takes), so
    the transaction is never confirmed; kill -9; the next listener (which leaves that table out) sends the
    message again with the same id, and confirms."""
    dsn = pg.dsn(fresh_db)
    await sql(dsn, "CREATE TABLE items (id int PRIMARY KEY)", "CREATE TABLE big (id int PRIMARY KEY, body text)")
    topic = unique("t")
    # a short duplicate window: JetStream stores the second copy instead of dropping it, so it can be seen
    cfg = outbox_config(pg, fresh_db, nats_server, slotName=unique("slot"))
    cfg["publisher"].update(topic=topic, duplicateWindow="100ms")
    first = ListenerProcess(cfg, tmp_path).start()
    procs.append(first)
    await wait_until(lambda: '"msg":"streaming"' in first.output(), 60, "streaming")
    message = emit("outbox", '{"order": 7}')
    await sql(
        dsn,
        f"BEGIN; {message}; INSERT INTO big SELECT 1, string_agg(md5(i::text), '') FROM generate_series(1, 40000) i;"
        " COMMIT",
    )
    end = await current_lsn(dsn)
    sent = await read_stream(nats_server.url, topic, 1, rest=False)
    await wait_until(lambda: "exceeds the server's max_payload" in first.output(), 30, "the big row refused")
    first.kill()
    assert await confirmed_lsn(dsn, cfg["listener"]["slotName"]) < end  # the transaction was not confirmed

    cfg["listener"]["filter"] = {"tables": {"items": ["insert"]}}
    second = ListenerProcess(cfg, tmp_path).start()
    procs.append(second)
    await wait_until(lambda: _ge(confirmed_lsn(dsn, cfg["listener"]["slotName"]), end), 60, "the commit confirmed")
    again: list[Received] = await read_stream(nats_server.url, topic, 2)
    assert len(again) == 2 and again[0].subject == again[1].subject == f"{topic}.outbox"
    assert again[0].id == again[1].id == sent[0].id and again[0].raw == again[1].raw
    assert await asyncio.to_thread(second.terminate) == 0


async def _ge(value: Any, target: int) -> bool:
    return bool(await value >= target)
