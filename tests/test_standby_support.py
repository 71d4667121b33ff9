"""tests/support/standby.py end to end with plain psycopg: a failover slot created on a PostgreSQL 18
primary is synchronized to the physical standby, the primary crashes (SIGKILL), the standby is promoted,
the multi-host DSN with ``target_session_attrs=read-write`` reaches it, and the slot there still gives
every change committed after its synced position — those the standby had replayed before the crash
included — and the ones written on the new primary after it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg
import pytest

from listener.pgoutput import Insert, decode
from tests.support.standby import PrimaryStandby

pytestmark = pytest.mark.service

SLOT = "ha_slot"
PGOUTPUT_OPTIONS = "'proto_version', '1', 'publication_names', 'p'"
# a slot waiting for a standby (gotcha 3 of the failover notes) must fail the test, not hang it
NO_HANG = {"options": "-c statement_timeout=15000"}


def changes(conn: psycopg.Connection, *, consume: bool) -> list[int]:
    """The ids of the rows inserted into ``t`` that the slot gives from its position, in order."""
    function = "pg_logical_slot_get_binary_changes" if consume else "pg_logical_slot_peek_binary_changes"
    rows = conn.execute(f"SELECT data FROM {function}('{SLOT}', NULL, NULL, {PGOUTPUT_OPTIONS})".encode()).fetchall()
    ids = []
    for (data,) in rows:
        message = decode(bytes(data))
        if isinstance(message, Insert):
            assert isinstance(message.new[0], str)
            ids.append(int(message.new[0]))
    return ids


def insert(conn: psycopg.Connection, ids: range, per_transaction: int = 10) -> None:
    for start in range(ids.start, ids.stop, per_transaction):
        with conn.transaction():
            for i in range(start, min(start + per_transaction, ids.stop)):
                conn.execute("INSERT INTO t (id, note) VALUES (%s, %s)", (i, f"row {i}"))


@pytest.mark.timeout(120)
def test_failover_slot_survives_promotion(make_primary_standby: Callable[..., PrimaryStandby]) -> None:
    t0 = time.monotonic()
    ps = make_primary_standby(databases=["before_clone"])
    started = time.monotonic() - t0
    assert ps.primary.version == 18
    assert ps.hosts() == f"127.0.0.1:{ps.primary.port},127.0.0.1:{ps.standby.port}"
    # a database made before the clone and one made after it are both on the standby
    ps.create_database("app")
    names = {name for (name,) in ps.standby.execute("SELECT datname FROM pg_database")}
    assert {"before_clone", "app"} <= names
    assert ps.standby.execute("SELECT pg_is_in_recovery()") == [(True,)]
    assert ps.standby.execute("SHOW synchronized_standby_slots") == [("",)]
    assert ps.primary.execute("SHOW synchronized_standby_slots") == [(ps.slot,)]

    with psycopg.connect(ps.dsn("app", **NO_HANG), autocommit=True) as conn:
        assert conn.info.port == ps.primary.port  # read-write: the primary
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, note text NOT NULL)")
        conn.execute("CREATE PUBLICATION p FOR TABLE t")
        conn.execute(f"SELECT pg_create_logical_replication_slot('{SLOT}', 'pgoutput', false, false, true)".encode())
        insert(conn, range(1, 51))
        assert changes(conn, consume=True) == list(range(1, 51))  # confirmed_flush moves past them

        # the slot is persisted on the standby only once its consumer confirmed past a newer
        # running-transactions record: consume (nothing but those records) while waiting
        t_sync = time.monotonic()
        synced_lsn = ps.wait_slot_synced(SLOT, timeout=40, advance=lambda: changes(conn, consume=True))
        sync_took = time.monotonic() - t_sync

        # committed after the synced position, replayed by the standby, never consumed on the primary
        insert(conn, range(51, 101))
    replay_took = ps.wait_replayed()

    standby_slot = ps.standby.execute(
        "SELECT slot_type, database, failover, synced, temporary FROM pg_replication_slots WHERE slot_name = %s",
        (SLOT,),
    )
    assert standby_slot == [("logical", "app", True, True, False)]

    ps.kill_primary()
    assert not ps.primary.running
    promote_took = ps.promote()
    assert ps.promoted
    if promote_took > 2:  # (with -s) what the standby did meanwhile
        print(f"\nslow promotion ({promote_took:.2f}s):\n{ps.standby.log_tail(40)}")

    with psycopg.connect(ps.dsn("app", **NO_HANG), autocommit=True) as conn:
        assert conn.info.port == ps.standby.port  # the only read-write server now
        (in_recovery,) = conn.execute("SELECT pg_is_in_recovery()").fetchone() or (None,)
        assert in_recovery is False
        row = conn.execute(
            "SELECT failover, temporary, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            (SLOT,),
        ).fetchone()
        assert row is not None, "the synced slot is gone after promotion"
        assert row[:2] == (True, False)
        assert row[2] == synced_lsn

        # from its synced position: exactly the rows committed on the old primary after it
        assert changes(conn, consume=False) == list(range(51, 101))
        assert changes(conn, consume=True) == list(range(51, 101))
        # writes continue on the new primary, and the slot follows them
        insert(conn, range(101, 111))
        assert changes(conn, consume=True) == list(range(101, 111))
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (110,)

    print(
        f"\nprimary+standby up in {started:.2f}s (pg_basebackup {ps.standby.cloned_in:.2f}s), "
        f"slot synced in {sync_took:.2f}s at {synced_lsn}, standby replayed in {replay_took:.2f}s, "
        f"promotion took {promote_took:.2f}s, total {time.monotonic() - t0:.2f}s"
    )
