"""The operator and DDL capture (spec.listener.ddl.capture), kopf in-process against kmock and a real PostgreSQL:
the trigger is installed when the resource asks, a user that may not install it gets a condition and an event
(and the condition follows a DBA's install), reclaimPolicy Delete removes it unless another slot remains.
"""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest

from listener import catalog
from listener.ddl import script
from tests.support.kube import WL, Cluster, listener_spec
from tests.support.services import PostgresServer

pytestmark = [
    pytest.mark.service,
    pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.usefixtures("clean_listeners"),
]


def _q(pg: PostgresServer, db: str, text: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(pg.dsn(db), autocommit=True) as conn:
        cur = conn.execute(text, params)
        return cur.fetchall() if cur.description else []


def _installed(pg: PostgresServer, db: str) -> list[tuple[Any, ...]]:
    return _q(pg, db, "SELECT evtname, evtfoid::regproc::text FROM pg_event_trigger ORDER BY 1")


INSTALLED = [(name, "wal_listener.capture_ddl") for name in ("wal_listener_ddl_drop", "wal_listener_ddl_end")]


@pytest.fixture(scope="module")
async def _secret(cluster: Cluster) -> None:
    await cluster.create_secret("pg-credentials", {"password": "not-needed-with-trust"})


def _spec(pg: PostgresServer, db: str, **extra: Any) -> tuple[str, dict[str, Any]]:
    suffix = uuid.uuid4().hex[:6]
    spec = listener_spec(pg.port, db, slot=f"ddl_{suffix}", **extra)
    spec["listener"]["ddl"] = {"capture": True}
    return f"ddl-{suffix}", spec


@pytest.mark.parametrize("other_slot", [False, True], ids=["alone", "another-slot"])
async def test_installed_when_asked_and_removed_on_delete(
    cluster: Cluster, _secret: None, pg: PostgresServer, fresh_db: str, other_slot: bool
) -> None:
    name, spec = _spec(pg, fresh_db, reclaimPolicy="Delete")
    await cluster.create_listener(name, spec)
    cond = await cluster.wait_condition(name, "DDLCapture", "True", "Installed")
    assert "installed and enabled" in cond["message"]
    assert _installed(pg, fresh_db) == INSTALLED
    await cluster.wait_condition(name, "SlotReady", "True")
    if other_slot:  # another listener of the database may still need the trigger
        _q(pg, fresh_db, "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (f"other_{name[4:]}",))

    await cluster.delete_listener(name)
    await cluster.wait_gone(WL, name)
    slot = spec["listener"]["slotName"]
    assert _q(pg, fresh_db, "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)) == []
    if other_slot:
        assert _installed(pg, fresh_db) == INSTALLED
    else:
        assert _installed(pg, fresh_db) == []
        assert _q(pg, fresh_db, "SELECT 1 FROM pg_proc WHERE proname = 'capture_ddl'") == []
    reason = "DDLCaptureKept" if other_slot else "DDLCaptureRemoved"
    (event,) = await cluster.wait(lambda: cluster.events(name, reason), what=f"a {reason} event")
    assert event["type"] == "Normal" and "DDL event trigger" in event["message"]


async def test_a_user_that_may_not_install_it_gets_a_condition_until_a_dba_does(
    cluster: Cluster, _secret: None, pg: PostgresServer, fresh_db: str
) -> None:
    role = f"rep_{uuid.uuid4().hex[:6]}"
    _q(pg, fresh_db, f"CREATE ROLE {role} LOGIN REPLICATION")
    _q(pg, fresh_db, f"GRANT CREATE ON DATABASE {fresh_db} TO {role}")
    _q(pg, fresh_db, f"CREATE TABLE items (id int PRIMARY KEY); ALTER TABLE items OWNER TO {role}")
    name, spec = _spec(pg, fresh_db, tables={"items": ["insert"]})
    spec["database"]["user"] = role
    await cluster.create_listener(name, spec)

    cond = await cluster.wait_condition(name, "DDLCapture", "False", "SuperuserMissing")
    assert cond["message"].startswith("spec.listener.ddl.capture: the DDL event trigger is not installed")
    assert f"user '{role}' is not a superuser" in cond["message"] and "wal-listener ddl --print-sql" in cond["message"]
    assert cluster.events(name, "DDLCaptureUnavailable")
    await cluster.wait_condition(name, "SlotReady", "True")  # the rows are not held up
    assert _installed(pg, fresh_db) == []

    _q(pg, fresh_db, script(catalog.ddl_capture_install()))  # what `wal-listener ddl --print-sql` prints
    await cluster.wait_condition(name, "DDLCapture", "True", "Installed")
    assert cluster.condition(name, "Ready")["reason"] != "SuperuserMissing"  # type: ignore[index]
