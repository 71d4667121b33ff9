"""The transforms' promise: a masked or excluded value never leaves the process in clear.

A marker is written into every masked column (hash, redact, null) and an excluded one, through a
backfill (READ), INSERT, UPDATE and DELETE of a REPLICA IDENTITY FULL table whose topic and key come
from a hashed column, and, on NATS and Kafka, an event too large for the broker (dead-lettered, which
logs an error and so sends a Sentry event). Then the marker is searched for in everything the test can
capture: every message on the broker (body, headers/attributes, key, topic), the dead-letter topic, the
listener's log at debug level with ``database.debug`` (every event logged), and what Sentry received.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from tests.support.brokers import BROKERS, Broker, Got, Kafka, on_shared_service
from tests.support.harness import ListenerProcess, config_dict, sql, unique, wait_until
from tests.support.sentry import SentryInbox
from tests.support.services import PostgresServer

pytestmark = pytest.mark.service

MARKER = "Mk7xLeakQz"
KEY = "leak-test-hash-key-0123456789"
EMAILS = {1: f"{MARKER}-ann@example.com", 2: f"{MARKER}-bob@example.com", 3: f"{MARKER}-bob2@example.com",
          4: f"{MARKER}-carl@example.com"}  # fmt: skip
#: brokers whose size limit an event can exceed here (1 MB): the dead-letter path with its error log
OVERSIZE = {"nats", "kafka"}


def mac(text: str) -> str:
    return hmac.new(KEY.encode(), text.encode(), "sha256").hexdigest()


@pytest.fixture(params=BROKERS)
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    made = on_shared_service(request, request.param, unique("leak"))
    yield made
    await made.close()


def _row(id_: int, email: str) -> str:
    return (f"INSERT INTO people VALUES ({id_}, '{email}', '{MARKER}-555-{id_}', '{MARKER}-born-{id_}',"
            f" '{MARKER}-secret-{id_}', 'note {id_}', '')")  # fmt: skip


async def test_a_masked_value_never_leaves_the_process(
    broker: Broker, fresh_db: str, pg: PostgresServer, sentry: SentryInbox, tmp_path: Path,
    procs: list[ListenerProcess],
) -> None:
    dsn = pg.dsn(fresh_db)
    await sql(dsn, "CREATE TABLE people (id int PRIMARY KEY, email text, phone text, born text, secret text,"
                   " note text, big text)",
              "ALTER TABLE people REPLICA IDENTITY FULL", _row(1, EMAILS[1]))  # fmt: skip
    transform = {"tables": ["people"], "columns": {"exclude": ["secret"]},
                 "mask": {"email": "hash", "phone": "redact", "born": "null"},
                 "topic": "people.{email}", "key": ["email", "id"]}  # fmt: skip
    cfg = config_dict(pg.port, fresh_db, broker.publisher(), snapshot={"mode": "initial"}, transforms=[transform],
                      transformsHashKey=KEY, onError="skip", deadLetterTopic="dead_letters")
    cfg["database"]["debug"] = True
    cfg["logger"]["level"] = "debug"
    cfg["monitoring"] = {"promAddr": "", "sentryDSN": sentry.dsn("sentrykey0123456789abcdef")}
    names = [f"people.{mac(EMAILS[i])}" for i in (1, 2, 3)] + ["dead_letters"]
    await broker.prepare(names)
    proc = ListenerProcess(cfg, tmp_path, env=broker.env).start()
    procs.append(proc)
    await broker.read(names[:1], 1, timeout=120, settle=False)  # streaming: the snapshot's READ is out
    statements = [_row(2, EMAILS[2]), f"UPDATE people SET email = '{EMAILS[3]}', phone = '{MARKER}-new' WHERE id = 2",
                  "DELETE FROM people WHERE id = 1"]  # fmt: skip
    oversized = broker.name in OVERSIZE
    if oversized:  # over 1 MB (pgoutput sends the value uncompressed): refused, dead-lettered, logged as an error
        statements.append(_row(4, EMAILS[4]).replace(", '')", ", repeat('x', 1100000))"))
    await sql(dsn, *statements)
    expected = 5 if oversized else 4
    got = await broker.read(names, expected, timeout=120)
    if oversized:
        await wait_until(lambda: any(b"dead-letter" in body for body in sentry.bodies), 60, "the Sentry event")
    assert await asyncio.to_thread(proc.terminate) == 0
    logs = proc.output()

    # the paths that could leak did run
    events = [g for g in got if not g.subject.endswith(".dead_letters")]
    assert sorted(str(g.event["action"]) for g in events) == ["DELETE", "INSERT", "READ", "UPDATE"], got
    assert {g.subject for g in events} == {f"{broker.topic}.{n}" for n in names[:3]}
    assert all(g.event["data"].get("email") in (None, mac(EMAILS[1]), mac(EMAILS[2]), mac(EMAILS[3])) for g in events)
    assert '"msg":"event"' in logs and mac(EMAILS[2]) in logs  # database.debug logged the events, masked
    if oversized:
        letters = [g for g in got if g.subject.endswith(".dead_letters")]
        assert len(letters) == 1 and letters[0].event["eventOmitted"], letters
        assert sentry.bodies
    if isinstance(broker, Kafka):
        assert {g.key for g in events} >= {orjson.dumps([mac(EMAILS[2]), "2"])}

    captured = [logs, *(b.decode(errors="replace") for b in sentry.bodies)]
    for message in got:
        captured += [message.subject, message.raw.decode(errors="replace"), orjson.dumps(message.headers).decode(),
                     _text(message)]
    leaks = [line for text in captured for line in text.splitlines() if MARKER in line]
    assert not leaks, [line[max(0, line.index(MARKER) - 200) : line.index(MARKER) + 50] for line in leaks[:5]]


def _text(message: Got) -> str:
    key = message.key
    return key.decode(errors="replace") if isinstance(key, bytes) else str(key or "")
