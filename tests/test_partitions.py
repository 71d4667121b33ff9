"""Partitioned tables are one table (listener.partitionRoot, the default): real PostgreSQL 15 and 18, a real
nats-server. What a consumer sees: the root's schema, name and topic for every change of every partition,
the filter and topicsMap keyed by the root's name, a backfill of the root reading every partition, and
nothing different when a partition is attached or detached while streaming."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from tests.support.harness import nats_config, query, read_stream, run_cli, running, sql, unique
from tests.support.services import Database, NatsServer

pytestmark = pytest.mark.service

EV = [
    "CREATE TABLE ev (id int NOT NULL, at date NOT NULL, payload text, PRIMARY KEY (id, at)) PARTITION BY RANGE (at)",
    "CREATE TABLE ev_2026a PARTITION OF ev FOR VALUES FROM ('2026-01-01') TO ('2026-07-01')",
    "CREATE TABLE ev_2026b PARTITION OF ev FOR VALUES FROM ('2026-07-01') TO ('2027-01-01')",
]


@pytest.mark.parametrize("filtered", [True, False], ids=["filter-by-root", "all-tables"])
async def test_changes_of_partitions_are_events_of_the_root_on_its_topic(
    fresh_any_db: Database, nats_server: NatsServer, filtered: bool
) -> None:
    dsn = fresh_any_db.dsn()
    await sql(dsn, *EV, "CREATE TABLE other (id int PRIMARY KEY)")
    topic = unique("part")
    extra = {"filter": {"tables": {"ev": ["insert", "update", "delete"]}}} if filtered else {}
    cfg = nats_config(fresh_any_db.server.port, fresh_any_db.name, nats_server.url, topic, schemaEvents=True,
                      topicsMap={"public_ev": "events"}, **extra)
    async with running(cfg):
        await sql(
            dsn,
            "INSERT INTO ev VALUES (1, '2026-02-01', 'a'), (2, '2026-08-01', 'b')",  # routed to each partition
            "INSERT INTO ev_2026b VALUES (3, '2026-09-01', 'c')",  # written to a partition directly
            "UPDATE ev SET payload = 'a2' WHERE id = 1",
            "UPDATE ev_2026b SET payload = 'c2' WHERE id = 3",
            "DELETE FROM ev_2026a WHERE id = 1",
            "INSERT INTO other VALUES (1)",
        )
        got = await read_stream(nats_server.url, topic, 6 if filtered else 8)
    # one SCHEMA event per table published: none for a partition (PostgreSQL sends the Relation message of the
    # partition too, after its root's, but no change uses it)
    assert [(r.event["table"], r.subject) for r in got if r.event["action"] == "SCHEMA"] == [
        ("ev", f"{topic}.events"), *([] if filtered else [("other", f"{topic}.public_other")])]
    got = [r for r in got if r.event["action"] != "SCHEMA"]
    ev = [r for r in got if r.event["table"] != "other"]
    assert [(r.event["action"], r.event["schema"], r.event["table"], r.subject) for r in ev] == [
        ("INSERT", "public", "ev", f"{topic}.events"),
        ("INSERT", "public", "ev", f"{topic}.events"),
        ("INSERT", "public", "ev", f"{topic}.events"),
        ("UPDATE", "public", "ev", f"{topic}.events"),
        ("UPDATE", "public", "ev", f"{topic}.events"),
        ("DELETE", "public", "ev", f"{topic}.events"),
    ]
    assert ev[2].event["data"] == {"id": 3, "at": "2026-09-01", "payload": "c"}
    assert ev[4].event["data"] == {"id": 3, "at": "2026-09-01", "payload": "c2"}
    assert ev[5].event["dataOld"] == {"id": 1, "at": "2026-02-01"}  # the root's key
    assert not any("ev_2026" in r.subject or "ev_2026" in r.event["table"] for r in got)
    assert [r.event["table"] for r in got if r.event["table"] == "other"] == ([] if filtered else ["other"])


async def test_attaching_and_detaching_partitions_while_streaming_changes_nothing_for_consumers(
    fresh_any_db: Database, nats_server: NatsServer
) -> None:
    """A partition attached mid-stream (its columns in another order than the root's) publishes as the root;
    a detached one leaves the root's stream; no other event, no SCHEMA event (the root's shape did not
    change), and the listener keeps streaming."""
    dsn = fresh_any_db.dsn()
    await sql(dsn, *EV)
    topic = unique("attach")
    cfg = nats_config(fresh_any_db.server.port, fresh_any_db.name, nats_server.url, topic, schemaEvents=True,
                      filter={"tables": {"ev": ["insert", "update", "delete"]}})
    async with running(cfg) as listener:
        await sql(dsn, "INSERT INTO ev VALUES (1, '2026-02-01', 'a')")
        await read_stream(nats_server.url, topic, 2)  # the first SCHEMA and the insert
        await sql(
            dsn,
            "CREATE TABLE ev_2027 (payload text, at date NOT NULL, id int NOT NULL)",
            "INSERT INTO ev_2027 VALUES ('before attach', '2027-03-01', 99)",  # not a partition yet: not published
            "ALTER TABLE ev ATTACH PARTITION ev_2027 FOR VALUES FROM ('2027-01-01') TO ('2028-01-01')",
            "INSERT INTO ev VALUES (2, '2027-02-01', 'b')",
            "UPDATE ev_2027 SET payload = 'b2' WHERE id = 2",
            "ALTER TABLE ev DETACH PARTITION ev_2026a",
            "INSERT INTO ev_2026a VALUES (3, '2026-03-01', 'detached')",  # its own table now: not in the filter
            "INSERT INTO ev VALUES (4, '2026-08-01', 'c')",
        )
        got = await read_stream(nats_server.url, topic, 5)
        assert listener.health.postgres
    assert [r.event["action"] for r in got] == ["SCHEMA", "INSERT", "INSERT", "UPDATE", "INSERT"]
    assert {(r.event["table"], r.subject) for r in got} == {("ev", f"{topic}.public_ev")}
    assert [r.event["data"] for r in got[2:]] == [
        {"id": 2, "at": "2027-02-01", "payload": "b"},
        {"id": 2, "at": "2027-02-01", "payload": "b2"},
        {"id": 4, "at": "2026-08-01", "payload": "c"},
    ]


async def test_backfill_of_the_root_reads_every_partition(
    fresh_any_db: Database, nats_server: NatsServer, tmp_path: Path
) -> None:
    """`wal-listener backfill ev` names the root: every row of every partition as a READ event of ev, read in
    keyset pages over the root's key."""
    dsn = fresh_any_db.dsn()
    await sql(dsn, *EV,
              "INSERT INTO ev SELECT g, date '2026-01-01' + (g % 360), 'p' || g FROM generate_series(1, 700) g",
              "ANALYZE ev_2026a", "ANALYZE ev_2026b")
    topic = unique("bfpart")
    cfg = nats_config(fresh_any_db.server.port, fresh_any_db.name, nats_server.url, topic,
                      snapshot={"chunkSize": 64}, filter={"tables": {"ev": ["insert"]}})
    config_file = tmp_path / "config.yml"
    config_file.write_text(yaml.safe_dump(cfg))
    async with running(cfg):
        run = await asyncio.to_thread(run_cli, ["--config", str(config_file), "backfill", "ev", "--name", "root"])
        assert run.returncode == 0, run.stderr
        events = await read_stream(nats_server.url, topic, 700, timeout=60)
    assert "public.ev" in run.stdout + run.stderr and "done: 700 rows" in run.stdout + run.stderr
    assert {(r.event["action"], r.event["table"], r.subject) for r in events} == {("READ", "ev", f"{topic}.public_ev")}
    assert sorted(r.event["data"]["id"] for r in events) == list(range(1, 701))
    rows = await query(dsn, "SELECT rows_done, chunks FROM wal_listener.backfills WHERE name = 'root'")
    assert rows == [(700, 11)]  # 700 rows in pages of 64
