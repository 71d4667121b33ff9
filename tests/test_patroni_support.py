"""The Patroni test machinery (tests/support/patroni.py) end to end, with plain psycopg and pg_recvlogical:
a permanent logical slot is on both nodes, follows what a consumer confirmed on the leader, survives a
crash of the leader, and can be read on the new leader, reached through the multi-host DSN."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

from tests.support.patroni import PatroniCluster, logical_slot

SLOT = "ha_slot"
DB = "app"
PUBLICATION = "ha_pub"


def lsn_ge(cluster: PatroniCluster, a: str, b: str) -> bool:
    return bool(cluster.execute("SELECT %s::pg_lsn >= %s::pg_lsn", (a, b))[0][0])


def read_slot(cluster: PatroniCluster, out: Path) -> bytes:
    """Consume the slot through the multi-host DSN with pg_recvlogical up to the leader's current WAL
    position (confirming it), like a listener would; returns the raw pgoutput stream."""
    endpos = cluster.execute("SELECT pg_current_wal_lsn()::text")[0][0]
    # pg_recvlogical stops at the first message at or past --endpos: make sure one comes.
    cluster.execute("INSERT INTO items (note) VALUES ('past-endpos')", dbname=DB)
    cmd = [
        str(cluster.pg_bin / "pg_recvlogical"),
        "--dbname", cluster.dsn(DB),
        "--slot", SLOT,
        "--start",
        "--endpos", endpos,
        "--option", "proto_version=1",
        "--option", f"publication_names={PUBLICATION}",
        "--status-interval", "1",
        "--fsync-interval", "0",
        "--no-loop",
        "--file", str(out),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, f"pg_recvlogical failed: {res.stderr}\n{cluster.logs()}"
    return out.read_bytes()


def test_permanent_slot_survives_leader_crash(make_patroni: Callable[..., PatroniCluster], tmp_path: Path) -> None:
    t_start = time.monotonic()
    cluster = make_patroni(slots={SLOT: logical_slot(DB)})
    assert cluster.started_in is not None
    print(f"\ncluster (etcd + 2 nodes, slot copied to the replica) up in {cluster.started_in:.1f}s")

    leader, replica = cluster.wait_ready()
    assert cluster.hosts_config() == ",".join(f"127.0.0.1:{n.port}" for n in cluster.nodes)
    on_leader = leader.slot(SLOT)
    assert on_leader is not None
    assert (on_leader["slot_type"], on_leader["plugin"], on_leader["database"]) == ("logical", "pgoutput", DB)
    assert replica.slot(SLOT) is not None  # start() waited for Patroni to copy it

    # Writes, then a consumer reads and confirms them on the leader.
    cluster.execute("CREATE TABLE items (id serial PRIMARY KEY, note text NOT NULL)", dbname=DB)
    cluster.execute(f"CREATE PUBLICATION {PUBLICATION} FOR TABLE items", dbname=DB)
    cluster.execute("INSERT INTO items (note) SELECT 'before-' || g FROM generate_series(1, 200) g", dbname=DB)
    stream = read_slot(cluster, tmp_path / "before.bin")
    assert b"before-1" in stream and b"before-200" in stream
    consumed = leader.slot(SLOT)
    assert consumed is not None and consumed["confirmed_flush_lsn"] is not None
    confirmed = consumed["confirmed_flush_lsn"]

    # Patroni publishes the leader's confirmed_flush_lsn in etcd and advances the replica's copy.
    t0 = time.monotonic()
    on_replica = cluster.wait_slot(SLOT, replica, min_lsn=confirmed, timeout=30)
    print(f"replica's slot advanced to {on_replica['confirmed_flush_lsn']} (leader {confirmed}) "
          f"in {time.monotonic() - t0:.1f}s")  # fmt: skip
    cluster.wait_replayed(replica)
    cluster.wait_slots()  # the replica's copy is safe to use after a promotion (Patroni agrees)

    # Crash the leader: the replica takes over once the leader key expires (ttl).
    t_kill = time.monotonic()
    old = cluster.kill_leader()
    assert old is leader and not old.running
    new = cluster.wait_leader(other_than=old, timeout=30)
    failover_s = time.monotonic() - t_kill
    assert new is replica

    # The multi-host DSN with target_session_attrs=read-write reaches the new leader.
    with psycopg.connect(cluster.dsn(DB, connect_timeout=5), autocommit=True) as conn:
        row = conn.execute("SELECT inet_server_port(), pg_is_in_recovery()").fetchone()
        connected_s = time.monotonic() - t_kill
        assert row == (new.port, False)
        # Writes continue.
        conn.execute("INSERT INTO items (note) SELECT 'after-' || g FROM generate_series(1, 50) g")
    print(f"failover: new leader {new.node_name} {failover_s:.1f}s after the kill, "
          f"multi-host DSN connected after {connected_s:.1f}s")  # fmt: skip

    # The slot is on the new leader, at the position the consumer confirmed on the old one ...
    moved = new.slot(SLOT)
    assert moved is not None and moved["plugin"] == "pgoutput" and moved["database"] == DB
    assert lsn_ge(cluster, moved["confirmed_flush_lsn"], confirmed)
    # ... and usable: the rows written after the failover come out of it, the confirmed ones do not.
    stream = read_slot(cluster, tmp_path / "after.bin")
    assert b"after-1" in stream and b"after-50" in stream
    assert b"before-" not in stream
    assert cluster.execute("SELECT count(*) FROM items", dbname=DB)[0][0] >= 250
    # wait_slots() before the crash: Patroni promoted a replica whose copy it had checked.
    assert "might be unsafe to use after promote" not in new.log_path.read_text(errors="replace")
    print(f"whole test body {time.monotonic() - t_start:.1f}s")
