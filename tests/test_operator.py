"""The whole operator (kopf, in-process) against kmock and a real PostgreSQL.

One kmock + kopf per module; each test uses its own database, slot and resource names.
"""

from __future__ import annotations

import asyncio
import hmac
import subprocess
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from listener.config import load_config
from tests.support.harness import read_stream, running
from tests.support.kube import CONFIGMAPS, DEPLOYMENTS, SECRETS, SERVICES, WL, Cluster, listener_spec
from tests.support.pod_security import restricted_violations
from tests.support.services import NatsServer, PostgresServer
from wal_operator.render import CONFIG_HASH_ANNOTATION, SECRETS_HASH_ANNOTATION, child_name

pytestmark = [
    pytest.mark.service,
    pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.usefixtures("clean_listeners"),
]


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _slot(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:6]}"


def _q(pg: PostgresServer, db: str, text: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(pg.dsn(db), autocommit=True) as conn:
        cur = conn.execute(text, params)
        return cur.fetchall() if cur.description else []


@pytest.fixture
def db_with_tables(pg: PostgresServer, fresh_db: str) -> str:
    _q(pg, fresh_db, "CREATE TABLE public.users (id int PRIMARY KEY, name text)")
    _q(pg, fresh_db, "CREATE TABLE public.orders (id int PRIMARY KEY, status text, total numeric)")
    _q(pg, fresh_db, "CREATE SCHEMA shop")
    _q(pg, fresh_db, "CREATE TABLE shop.users (id int PRIMARY KEY)")
    return fresh_db


@pytest.fixture(scope="module")
async def _secret(cluster: Cluster) -> None:
    await cluster.create_secret("pg-credentials", {"password": "not-needed-with-trust"})


async def test_apply_provisions_database_and_children(
    cluster: Cluster, _secret: None, pg: PostgresServer, db_with_tables: str, tmp_path: Path
) -> None:
    name, slot = _name("orders"), _slot("orders")
    spec = listener_spec(
        pg.port, db_with_tables, slot=slot, tables={"users": ["insert", "update"], "public.orders": ["insert"]}
    )
    spec["listener"]["topicsMap"] = {"public_users": "people"}
    spec["monitoring"] = {"promAddr": ":9187", "sentryDSNSecretRef": {"name": "sentry", "key": "dsn"}}
    spec["pod"] = {"image": "example/wal-listener:1.2", "nodeSelector": {"pool": "cdc"}}
    if cluster.get(SECRETS, "sentry") is None:
        await cluster.create_secret("sentry", {"dsn": "https://key@sentry.example/1"})
    await cluster.create_listener(name, spec)

    await cluster.wait_condition(name, "SlotReady", "True")
    await cluster.wait_condition(name, "DeploymentReady", "False", "PodNotReady")

    # PostgreSQL: a pgoutput slot, a publication FOR TABLE derived from the filter (every schema's users)
    slots = _q(pg, db_with_tables, "SELECT plugin, slot_type FROM pg_replication_slots WHERE slot_name = %s", (slot,))
    assert slots == [("pgoutput", "logical")]
    pub = spec["listener"]["publicationName"]
    tables = _q(
        pg,
        db_with_tables,
        "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s ORDER BY 1, 2",
        (pub,),
    )
    assert tables == [("public", "orders"), ("public", "users"), ("shop", "users")]
    flags = _q(
        pg,
        db_with_tables,
        "SELECT pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication WHERE pubname = %s",
        (pub,),
    )
    assert flags == [(True, True, False, False)]  # only the actions the filter asks for

    # ConfigMap: the listener's own config, no secrets, loadable by the listener
    cm = cluster.child(CONFIGMAPS, name)
    assert cm is not None
    text = cm["data"]["config.yml"]
    assert "password" not in text and "sentryDSN:" not in text
    rendered = yaml.safe_load(text)
    assert rendered["listener"]["slotName"] == slot
    assert rendered["listener"]["topicsMap"] == {"public_users": "people"}
    assert rendered["monitoring"]["promAddr"] == ":9187"

    # Deployment: one replica, Recreate, hash annotation, probes, metrics port, secrets as WAL_* env
    dep = cluster.child(DEPLOYMENTS, name)
    assert dep is not None
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    template = dep["spec"]["template"]
    assert template["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
    pod = template["spec"]
    assert pod["nodeSelector"] == {"pool": "cdc"}
    (container,) = pod["containers"]
    assert container["image"] == "example/wal-listener:1.2"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080, "metrics": 9187}
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert env == {
        "WAL_DATABASE_PASSWORD": {"name": "pg-credentials", "key": "password"},
        "WAL_MONITORING_SENTRYDSN": {"name": "sentry", "key": "dsn"},
    }
    assert container["command"][-1] == "/etc/wal-listener/config.yml"

    # the rendered file plus the pod's env is a config the listener accepts
    cfg_path = tmp_path / f"{name}.yml"
    cfg_path.write_text(text)
    config = load_config(cfg_path, {"WAL_DATABASE_PASSWORD": "x", "WAL_MONITORING_SENTRYDSN": "https://k@s/1"})
    assert config.listener.slot_name == slot
    assert config.database.password.get_secret_value() == "x"

    svc = cluster.child(SERVICES, name)
    assert svc is not None
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"http": 8080, "metrics": 9187}

    # every child is owned by the resource
    uid = cluster.listener(name)["metadata"]["uid"]
    for child in (cm, dep, svc):
        (ref,) = child["metadata"]["ownerReferences"]
        assert ref["uid"] == uid and ref["kind"] == "WalListener" and ref["controller"] is True

    # status: steps, slot state, observedGeneration; Ready once the pod is
    status = cluster.status(name)
    assert status["observedGeneration"] == 1
    assert status["publication"]["tables"] == ["public.orders", "public.users", "shop.users"]
    assert status["slot"]["name"] == slot and status["slot"]["exists"] is True
    for step in ("SpecValid", "DatabaseReachable", "PublicationReady", "SlotReady"):
        assert cluster.condition(name, step)["status"] == "True", step  # type: ignore[index]
    ready = await cluster.wait_condition(name, "Ready", "False")
    assert ready["reason"] == "PodNotReady"
    await cluster.set_deployment_available(name)
    await cluster.wait_condition(name, "Ready", "True", "ListenerRunning")
    assert cluster.status(name)["phase"] == "Ready"


async def test_spec_change_rolls_pod_and_alters_publication(
    cluster: Cluster, _secret: None, pg: PostgresServer, db_with_tables: str
) -> None:
    name, slot = _name("roll"), _slot("roll")
    await cluster.create_listener(name, listener_spec(pg.port, db_with_tables, slot=slot, tables={"users": ["insert"]}))
    await cluster.wait_condition(name, "SlotReady", "True")
    dep = cluster.child(DEPLOYMENTS, name)
    assert dep is not None
    first_hash = dep["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]

    new_tables = {"users": None, "public.orders": ["insert", "delete"]}  # a merge patch, as kubectl sends
    await cluster.update_spec(name, {"listener": {"filter": {"tables": new_tables}}, "logger": {"level": "debug"}})

    def new_hash() -> str | None:
        d = cluster.child(DEPLOYMENTS, name)
        h = d["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION] if d else None
        return h if h != first_hash else None

    await cluster.wait(new_hash, what="a new config hash in the pod template")
    await cluster.wait(lambda: cluster.status(name).get("observedGeneration") == 2, what="observedGeneration 2")
    cm = cluster.child(CONFIGMAPS, name)
    assert cm is not None and "level: debug" in cm["data"]["config.yml"]
    pub = f"pub_{slot}"
    tables = _q(
        pg, db_with_tables, "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s", (pub,)
    )
    assert tables == [("public", "orders")]
    flags = _q(
        pg, db_with_tables, "SELECT pubinsert, pubupdate, pubdelete FROM pg_publication WHERE pubname = %s", (pub,)
    )
    assert flags == [(True, False, True)]

    # suspend scales to zero, keeps the slot
    await cluster.update_spec(name, {"suspend": True})
    await cluster.wait(lambda: cluster.child(DEPLOYMENTS, name)["spec"]["replicas"] == 0, what="replicas 0")
    await cluster.wait_condition(name, "Ready", "False", "Suspended")
    assert _q(pg, db_with_tables, "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)) == [(1,)]


def _hold_slot(pg: PostgresServer, db: str, slot: str, pub: str) -> subprocess.Popen[bytes]:
    """A logical-replication consumer on the slot (what the listener pod would be)."""
    recv = pg.bin_dir / "pg_recvlogical"
    return subprocess.Popen(
        [
            str(recv),
            "-d",
            pg.dsn(db),
            "-S",
            slot,
            "--start",
            "-f",
            "/dev/null",
            "-o",
            "proto_version=1",
            "-o",
            f"publication_names={pub}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("policy", ["Delete", "Retain"])
async def test_delete_with_reclaim_policy(
    cluster: Cluster, _secret: None, pg: PostgresServer, db_with_tables: str, policy: str
) -> None:
    name, slot = _name(f"del-{policy.lower()}"), _slot("del")
    pub = f"pub_{slot}"
    await cluster.create_listener(name, listener_spec(pg.port, db_with_tables, slot=slot, reclaimPolicy=policy))
    await cluster.wait_condition(name, "SlotReady", "True")
    assert cluster.status(name)["publication"] == {
        "name": pub,
        "allTables": True,
        "tables": [],
        "createdByOperator": True,
        "tablesWithoutIdentity": [],
    }

    active = "SELECT active FROM pg_replication_slots WHERE slot_name = %s"
    holder = _hold_slot(pg, db_with_tables, slot, pub)
    try:
        await cluster.wait(lambda: _q(pg, db_with_tables, active, (slot,)) == [(True,)], what="slot active")
        # with a reader, status says how far behind it is in seconds (pg_stat_replication)
        seconds = await cluster.wait(
            lambda: (cluster.status(name).get("slot") or {}).get("lagSeconds") is not None
            and cluster.status(name)["slot"]["active"],
            what="slot.lagSeconds",
        )
        assert seconds and cluster.status(name)["slot"]["lagSeconds"] >= 0
        await cluster.delete_listener(name)
        await cluster.wait_gone(DEPLOYMENTS, f"{name}-wal-listener")
        if policy == "Delete":
            # the slot is still read by someone: the operator waits and says so
            cond = await cluster.wait_condition(name, "SlotReady", "False", "Deleting")
            assert "inactive" in cond["message"]
            assert cluster.get(WL, name) is not None
    finally:
        holder.terminate()
        holder.wait(10)
    await cluster.wait_gone(WL, name)

    slots = _q(pg, db_with_tables, "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,))
    pubs = _q(pg, db_with_tables, "SELECT 1 FROM pg_publication WHERE pubname = %s", (pub,))
    if policy == "Delete":
        assert slots == [] and pubs == []
    else:
        assert slots == [(1,)] and pubs == [(1,)]
    assert cluster.child(CONFIGMAPS, name) is None and cluster.child(SERVICES, name) is None


async def test_conflicting_claim_leaves_first_untouched(
    cluster: Cluster, _secret: None, pg: PostgresServer, db_with_tables: str
) -> None:
    first, second, slot = _name("first"), _name("second"), _slot("shared")
    await cluster.create_listener(
        first, listener_spec(pg.port, db_with_tables, slot=slot, tables={"users": ["insert"]})
    )
    await cluster.wait_condition(first, "SlotReady", "True")
    pub_before = _q(
        pg,
        db_with_tables,
        "SELECT tablename FROM pg_publication_tables WHERE pubname = %s ORDER BY 1",
        (f"pub_{slot}",),
    )

    spec2 = listener_spec(pg.port, db_with_tables, slot=slot, tables={"orders": ["delete"]}, reclaimPolicy="Delete")
    await cluster.create_listener(second, spec2)
    cond = await cluster.wait_condition(second, "Conflict", "True")
    assert first in cond["message"] and slot in cond["message"]
    ready = cluster.condition(second, "Ready")
    assert ready is not None and ready["status"] == "False" and ready["reason"] == "Conflict"
    assert cluster.child(DEPLOYMENTS, second) is None

    # deleting the loser (even with reclaimPolicy Delete) does not touch the winner's slot/publication
    await cluster.delete_listener(second)
    await cluster.wait_gone(WL, second)
    assert _q(pg, db_with_tables, "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)) == [(1,)]
    pub_after = _q(
        pg,
        db_with_tables,
        "SELECT tablename FROM pg_publication_tables WHERE pubname = %s ORDER BY 1",
        (f"pub_{slot}",),
    )
    assert pub_after == pub_before
    assert cluster.child(DEPLOYMENTS, first) is not None
    assert cluster.condition(first, "Conflict")["status"] == "False"  # type: ignore[index]


async def test_invalid_spec_is_permanent(cluster: Cluster, _secret: None, pg: PostgresServer, fresh_db: str) -> None:
    name = _name("bad")
    spec = listener_spec(pg.port, fresh_db, slot=_slot("bad"))
    spec["publisher"] = {"type": "kafka", "topic": "t", "nats": {"address": "nats:4222"}}
    await cluster.create_listener(name, spec)
    cond = await cluster.wait_condition(name, "SpecValid", "False", "InvalidSpec")
    assert "publisher.kafka" in cond["message"]
    ready = cluster.condition(name, "Ready")
    assert ready is not None and ready["status"] == "False" and ready["reason"] == "InvalidSpec"
    assert cluster.child(DEPLOYMENTS, name) is None
    # permanent: no retries (the slow retry is 2s in tests, the status timer skips invalid specs)
    written = cluster.versions(WL, name)
    await asyncio.sleep(3)
    assert cluster.versions(WL, name) == written
    assert cluster.condition(name, "SpecValid") == cond

    # fixing the spec recovers
    await cluster.update_spec(name, {"publisher": {"type": "nats", "nats": {"address": "nats:4222"}}})
    await cluster.wait_condition(name, "SpecValid", "True")
    await cluster.wait_condition(name, "SlotReady", "True")


async def test_database_down_is_temporary_and_recovers(cluster: Cluster, _secret: None, make_pg: Any) -> None:
    server: PostgresServer = make_pg()
    server.create_database("app")
    name, slot = _name("down"), _slot("down")
    port = server.port
    server.stop()
    await cluster.create_listener(name, listener_spec(port, "app", slot=slot))
    cond = await cluster.wait_condition(name, "DatabaseReachable", "False", "Unreachable")
    assert f"127.0.0.1:{port}" in cond["message"] and "retrying" in cond["message"]
    assert cluster.condition(name, "Ready")["reason"] == "Unreachable"  # type: ignore[index]

    server.start()
    await cluster.wait_condition(name, "SlotReady", "True", timeout=40)
    assert cluster.condition(name, "DatabaseReachable")["status"] == "True"  # type: ignore[index]


async def test_slot_lag_reaches_status_and_warns(
    cluster: Cluster, _secret: None, pg: PostgresServer, db_with_tables: str
) -> None:
    name, slot = _name("lag"), _slot("lag")
    spec = listener_spec(pg.port, db_with_tables, slot=slot, alerts={"retainedWalBytes": 1024})
    await cluster.create_listener(name, spec)
    await cluster.wait_condition(name, "SlotReady", "True")
    _q(pg, db_with_tables, "INSERT INTO users SELECT g, repeat('x', 200) FROM generate_series(1, 2000) g")

    def lagging() -> bool:
        s = cluster.status(name).get("slot") or {}
        return int(s.get("retainedWALBytes", 0)) > 1024 and int(s.get("lagBytes", 0)) > 0

    await cluster.wait(lagging, what="slot lag in status")
    slot_status = cluster.status(name)["slot"]
    assert slot_status["walStatus"] in ("reserved", "extended")
    assert slot_status["active"] is False
    assert "lagSeconds" not in slot_status  # nobody reads the slot: unknown, not 0
    assert slot_status["lag"].endswith(("KiB", "MiB"))
    events = await cluster.wait(lambda: cluster.events(name, "WALRetained"), what="a WALRetained event")
    assert events[0]["type"] == "Warning"
    assert slot in events[0]["message"]


async def test_no_slot_missing_warning_for_a_slot_still_to_be_created(
    cluster: Cluster, _secret: None, pg: PostgresServer, db_with_tables: str
) -> None:
    # the publication cannot be made yet (a table is missing): the slot was never created, which is no
    # "SlotMissing ... disappeared" warning; the reconcile's own condition says what is wrong
    waiting, slot = _name("later"), _slot("later")
    await cluster.create_listener(waiting, listener_spec(pg.port, db_with_tables, slot=slot,
                                                         tables={"public.not_yet": ["insert"]}))
    await cluster.wait_condition(waiting, "PublicationReady", "False", "TablesMissing")
    # the timer's status write: the slot as read, and (before the fix) SlotMissing in the same patch
    await cluster.wait(lambda: (cluster.status(waiting).get("slot") or {}).get("checkedAt"),
                       what="the status timer reading the slot")
    assert cluster.status(waiting)["slot"]["exists"] is False
    assert cluster.events(waiting, "SlotMissing") == []
    assert cluster.condition(waiting, "SlotReady") is None
    ready = cluster.condition(waiting, "Ready")
    assert ready is not None and ready["reason"] == "TablesMissing"


# -- many teams on one cluster ----------------------------------------------------------------------


def _db_untouched(pg: PostgresServer, db: str, slot: str) -> None:
    assert _q(pg, db, "SELECT 1 FROM pg_class WHERE relname = 'pwned'") == []
    assert _q(pg, db, "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)) == []
    assert _q(pg, db, "SELECT 1 FROM pg_publication WHERE pubname = %s", (f"pub_{slot}",)) == []
    assert _q(pg, db, "SELECT count(*) FROM orders") == [(0,)]


@pytest.mark.parametrize(
    ("table", "field"),
    [
        ({"name": "orders", "where": "status = 'paid'); CREATE TABLE pwned(x int); --"}, "where"),
        ({"name": "orders", "where": "true) , TABLE users WHERE (true"}, "where"),
        ({"name": "orders", "where": "status = 'x' /* ) */); CREATE TABLE pwned(x int"}, "where"),
        ({"name": 'orders"; CREATE TABLE pwned(x int); --'}, "name"),
        ({"name": "orders", "columns": ["id", 'status"); CREATE TABLE pwned(x int); --']}, "columns"),
    ],
    ids=["statement", "extra-table", "comment", "table-name", "column-name"],
)
async def test_sql_injection_is_refused_and_touches_nothing(
    cluster: Cluster, _secret: None, pg: PostgresServer, db_with_tables: str, table: dict[str, Any], field: str
) -> None:
    name, slot = _name("inject"), _slot("inject")
    spec = listener_spec(pg.port, db_with_tables, slot=slot)
    spec["publication"] = {"tables": [table]}
    await cluster.create_listener(name, spec)
    cond = await cluster.wait_condition(name, "SpecValid", "False", "InvalidSpec")
    assert f"spec.publication.tables.0.{field}" in cond["message"]
    events = await cluster.wait(lambda: cluster.events(name, "InvalidSpec"), what="an InvalidSpec event")
    assert events[0]["type"] == "Warning" and f"tables.0.{field}" in events[0]["message"]
    assert cluster.child(DEPLOYMENTS, name) is None
    _db_untouched(pg, db_with_tables, slot)


async def test_a_row_filter_postgresql_refuses_is_reported(
    cluster: Cluster, _secret: None, pg: PostgresServer, db_with_tables: str
) -> None:
    """What passes the operator's check still runs as one statement, and PostgreSQL has the last word
    (a row filter may only use the table's columns and immutable built-in functions)."""
    name, slot = _name("filter"), _slot("filter")
    table = {"name": "orders", "where": "pg_terminate_backend(pg_backend_pid()) AND status = 'paid'"}
    spec = listener_spec(pg.port, db_with_tables, slot=slot)
    spec["publication"] = {"tables": [table]}
    await cluster.create_listener(name, spec)
    cond = await cluster.wait_condition(name, "SpecValid", "False", "InvalidSpec")
    assert "spec.publication" in cond["message"] and "PostgreSQL refuses" in cond["message"]
    assert cluster.child(DEPLOYMENTS, name) is None
    _db_untouched(pg, db_with_tables, slot)


async def test_long_names_sharing_a_prefix_get_their_own_children(
    cluster: Cluster, _secret: None, pg: PostgresServer, db_with_tables: str
) -> None:
    base = "orders-eu-west-1-production-cluster-replication-stream-listener"
    names = [f"{base}-alpha-{uuid.uuid4().hex[:4]}", f"{base}-beta-{uuid.uuid4().hex[:4]}"]
    for name in names:
        await cluster.create_listener(name, listener_spec(pg.port, db_with_tables, slot=_slot("long")))
    for name in names:
        await cluster.wait_condition(name, "SlotReady", "True")
    deps = [cluster.child(DEPLOYMENTS, name) for name in names]
    assert deps[0] is not None and deps[1] is not None
    assert deps[0]["metadata"]["name"] != deps[1]["metadata"]["name"]
    for name, dep in zip(names, deps, strict=True):
        assert len(dep["metadata"]["name"]) <= 63
        (ref,) = dep["metadata"]["ownerReferences"]
        assert ref["name"] == name and ref["uid"] == cluster.listener(name)["metadata"]["uid"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert all(len(v) <= 63 for v in labels.values())
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert cluster.condition(name, "Conflict")["status"] == "False"  # type: ignore[index]
    assert deps[0]["spec"]["selector"] != deps[1]["spec"]["selector"]

    # deleting one leaves the other's pipeline alone
    await cluster.delete_listener(names[0])
    await cluster.wait_gone(WL, names[0])
    assert cluster.child(DEPLOYMENTS, names[0]) is None
    assert cluster.child(DEPLOYMENTS, names[1]) is not None
    assert cluster.child(CONFIGMAPS, names[1]) is not None


async def test_a_child_name_taken_by_someone_else_is_a_conflict(
    cluster: Cluster, _secret: None, pg: PostgresServer, db_with_tables: str
) -> None:
    name, slot = _name("taken"), _slot("taken")
    await cluster.create_deployment(child_name(name), {"app": "somebody-elses"})
    written = cluster.versions(DEPLOYMENTS, child_name(name))
    await cluster.create_listener(name, listener_spec(pg.port, db_with_tables, slot=slot))
    cond = await cluster.wait_condition(name, "Conflict", "True", "ChildOwnedByOther")
    assert f"Deployment cdc/{child_name(name)}" in cond["message"] and "left untouched" in cond["message"]
    assert cluster.condition(name, "Ready")["reason"] == "Conflict"  # type: ignore[index]
    await cluster.wait(lambda: cluster.events(name, "Conflict"), what="a Conflict event")
    assert cluster.versions(DEPLOYMENTS, child_name(name)) == written  # never taken over
    _db_untouched(pg, db_with_tables, slot)  # and nothing provisioned for a resource that cannot run

    await cluster.delete_listener(name)
    await cluster.wait_gone(WL, name)
    other = cluster.child(DEPLOYMENTS, name)
    assert other is not None and other["metadata"]["labels"] == {"app": "somebody-elses"}


# -- Secrets, TLS, readiness ------------------------------------------------------------------------


def _template_annotation(cluster: Cluster, name: str, key: str) -> str | None:
    dep = cluster.child(DEPLOYMENTS, name)
    if dep is None:
        return None
    value: str | None = (dep["spec"]["template"]["metadata"].get("annotations") or {}).get(key)
    return value


async def test_a_changed_secret_rolls_the_pod(cluster: Cluster, pg: PostgresServer, db_with_tables: str) -> None:
    name, slot = _name("secret"), _slot("secret")
    secret = f"creds-{uuid.uuid4().hex[:6]}"
    await cluster.create_secret(secret, {"password": "first", "nats": "n-first"})
    spec = listener_spec(pg.port, db_with_tables, slot=slot)
    spec["database"]["passwordSecretRef"] = {"name": secret, "key": "password"}
    spec["publisher"]["nats"]["passwordSecretRef"] = {"name": secret, "key": "nats"}
    spec["publisher"]["nats"]["username"] = "wal"
    await cluster.create_listener(name, spec)
    await cluster.wait_condition(name, "SlotReady", "True")
    first = _template_annotation(cluster, name, SECRETS_HASH_ANNOTATION)
    config_hash = _template_annotation(cluster, name, CONFIG_HASH_ANNOTATION)
    assert first

    for key in ("password", "nats"):  # either Secret key the pod uses rolls it
        before = _template_annotation(cluster, name, SECRETS_HASH_ANNOTATION)
        await cluster.update_secret(secret, {key: f"rotated-{key}"})
        await cluster.wait(
            lambda before=before: _template_annotation(cluster, name, SECRETS_HASH_ANNOTATION) not in (None, before),
            what=f"a new secrets hash after rotating {key}",
        )
    assert _template_annotation(cluster, name, CONFIG_HASH_ANNOTATION) == config_hash  # the config did not change
    events = await cluster.wait(lambda: cluster.events(name, "SecretChanged"), what="a SecretChanged event")
    assert "rolling" in events[0]["message"]
    assert "rotated" not in str(cluster.child(DEPLOYMENTS, name))  # values never land in the Deployment


async def test_tls_secrets_are_mounted_and_the_pod_is_restricted(
    cluster: Cluster, _secret: None, pg: PostgresServer, db_with_tables: str
) -> None:
    name, slot = _name("tls"), _slot("tls")
    await cluster.create_secret("pg-tls", {"ca.crt": "-----BEGIN CERTIFICATE-----\n"})
    await cluster.create_secret("broker-tls", {"ca": "x", "crt": "y", "key": "z"})
    spec = listener_spec(pg.port, db_with_tables, slot=slot)
    spec["database"]["tls"] = {"caSecretRef": {"name": "pg-tls", "key": "ca.crt"}}  # sslMode prefer: no TLS here
    spec["publisher"]["nats"]["tls"] = {
        "caSecretRef": {"name": "broker-tls", "key": "ca"},
        "certSecretRef": {"name": "broker-tls", "key": "crt"},
        "keySecretRef": {"name": "broker-tls", "key": "key"},
    }
    await cluster.create_listener(name, spec)
    await cluster.wait_condition(name, "SlotReady", "True")
    dep = cluster.child(DEPLOYMENTS, name)
    assert dep is not None
    pod = dep["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    for target in ("database", "publisher"):
        assert mounts[f"/var/run/secrets/wal-listener/tls/{target}"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    secrets = {s["secret"]["name"] for s in volumes["publisher-tls"]["projected"]["sources"]}
    assert secrets == {"broker-tls"}
    config = yaml.safe_load(cluster.child(CONFIGMAPS, name)["data"]["config.yml"])  # type: ignore[index]
    assert config["publisher"]["clientKey"] == "/var/run/secrets/wal-listener/tls/publisher/tls.key"
    assert config["database"]["sslRootCert"] == "/var/run/secrets/wal-listener/tls/database/ca.crt"
    assert restricted_violations(pod) == []
    assert pod["securityContext"]["runAsUser"] != 0


async def test_a_missing_tls_secret_is_named(
    cluster: Cluster, _secret: None, pg: PostgresServer, fresh_db: str
) -> None:
    name = _name("notls")
    spec = listener_spec(pg.port, fresh_db, slot=_slot("notls"))
    spec["database"]["tls"] = {"caSecretRef": {"name": "no-such-secret", "key": "ca.crt"}}
    await cluster.create_listener(name, spec)
    cond = await cluster.wait_condition(name, "DatabaseReachable", "Unknown", "SecretMissing")
    assert "no-such-secret" in cond["message"] and "spec.database.tls.caSecretRef" in cond["message"]
    assert cluster.child(DEPLOYMENTS, name) is None


async def test_readiness_follows_the_deployment(
    cluster: Cluster, _secret: None, pg: PostgresServer, db_with_tables: str
) -> None:
    """DeploymentReady comes from the watch on the Deployment, and stays what the Deployment says."""
    name, slot = _name("ready"), _slot("ready")
    await cluster.create_listener(name, listener_spec(pg.port, db_with_tables, slot=slot))
    await cluster.wait_condition(name, "DeploymentReady", "False", "PodNotReady")
    await cluster.set_deployment_available(name)
    await cluster.wait_condition(name, "Ready", "True", "ListenerRunning")

    # deleted by someone: the operator puts it back at once, and readiness follows the new one
    await cluster.delete_child(DEPLOYMENTS, name)

    def recreated() -> bool:
        dep = cluster.child(DEPLOYMENTS, name)
        return dep is not None and not dep.get("status")  # the old one's status is gone with it

    await cluster.wait(recreated, what="a new Deployment")
    await cluster.wait_condition(name, "Ready", "False", "PodNotReady")
    await cluster.set_deployment_available(name)
    await cluster.wait_condition(name, "Ready", "True")

    # a status write that says otherwise (a reconcile's patch racing the Deployment watch wrote the readiness it
    # had read before the pod became ready) is put right without any change to the Deployment
    status = cluster.status(name)
    stale = [
        {**c, "status": "False", "reason": "PodNotReady"} if c["type"] in ("DeploymentReady", "Ready") else c
        for c in status["conditions"]
    ]
    await cluster.patch_status(name, {"conditions": stale, "phase": "PodNotReady"})
    await cluster.wait_condition(name, "DeploymentReady", "True", "PodReady", timeout=10)
    await cluster.wait_condition(name, "Ready", "True")


# -- backfills ----------------------------------------------------------------------------------------


async def test_a_backfill_entry_runs_once_and_reports_progress(
    cluster: Cluster, _secret: None, pg: PostgresServer, db_with_tables: str, nats_server: NatsServer, tmp_path: Path
) -> None:
    _q(pg, db_with_tables, "INSERT INTO users SELECT g, 'u' || g FROM generate_series(1, 300) g")
    _q(pg, db_with_tables, "INSERT INTO shop.users VALUES (1)")
    name, slot, topic = _name("bf"), _slot("bf"), f"t_{uuid.uuid4().hex[:6]}"
    spec = listener_spec(pg.port, db_with_tables, slot=slot)
    spec["publisher"] = {"type": "nats", "topic": topic, "nats": {"address": nats_server.url}}
    spec["listener"]["snapshot"] = {"chunkSize": 50}
    spec["backfills"] = [{"name": "users-reload", "tables": ["public.users"]}]
    await cluster.create_listener(name, spec)
    await cluster.wait_condition(name, "SlotReady", "True")
    await cluster.wait(lambda: cluster.events(name, "BackfillQueued"), what="a BackfillQueued event")
    queued = _q(pg, db_with_tables, "SELECT name, state, tables FROM wal_listener.backfills WHERE slot = %s", (slot,))
    assert queued == [("users-reload", "requested", ["public.users"])]

    # the pod: the config the operator rendered, run by a listener
    cfg_path = tmp_path / "config.yml"
    cfg_path.write_text(cluster.child(CONFIGMAPS, name)["data"]["config.yml"])  # type: ignore[index]
    async with running(load_config(cfg_path, {"WAL_DATABASE_PASSWORD": "unused-with-trust"})):

        def done() -> bool:
            items = cluster.status(name).get("backfills") or []
            return bool(items) and items[0]["state"] == "done"

        await cluster.wait(done, timeout=60, what="status.backfills: users-reload done")
        status = cluster.status(name)
        (item,) = status["backfills"]
        assert item["name"] == "users-reload" and item["rowsDone"] == 300 and item["startedAt"] and item["finishedAt"]
        assert status["backfill"] == "users-reload: done"

        # a name runs once: a later reconcile does not queue it again
        await cluster.update_spec(name, {"logger": {"level": "debug"}})
        await cluster.wait(lambda: cluster.status(name).get("observedGeneration") == 2, what="observedGeneration 2")
        assert _q(pg, db_with_tables, "SELECT count(*), max(chunks) FROM wal_listener.backfills WHERE slot = %s",
                  (slot,)) == [(1, 7)]
        # a new entry starts a new one
        await cluster.update_spec(name, {"backfills": [*spec["backfills"], {"name": "one", "tables": ["users"],
                                                                            "where": "id = 1"}]})

        def second() -> bool:
            items = cluster.status(name).get("backfills") or []
            return len(items) == 2 and items[1]["state"] == "done" and items[1]["rowsDone"] == 2  # both schemas

        await cluster.wait(second, timeout=60, what="the second backfill done")
    events = await read_stream(nats_server.url, topic, 302, timeout=30)
    assert len([r for r in events if r.event["action"] == "READ"]) == 302


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"name": "x", "tables": ["users"], "where": "true) , TABLE secrets WHERE (true"}, "backfills.0.where"),
        ({"name": "x", "tables": ['users"; DROP TABLE users; --']}, "backfills.0.tables"),
        ({"name": "Not_A_Name", "tables": ["users"]}, "backfills.0.name"),
    ],
    ids=["where", "table", "name"],
)
async def test_a_bad_backfill_entry_is_refused_with_the_field(
    cluster: Cluster, _secret: None, pg: PostgresServer, db_with_tables: str, entry: dict[str, Any], field: str
) -> None:
    name, slot = _name("bfbad"), _slot("bfbad")
    spec = listener_spec(pg.port, db_with_tables, slot=slot)
    spec["backfills"] = [entry]
    await cluster.create_listener(name, spec)
    cond = await cluster.wait_condition(name, "SpecValid", "False", "InvalidSpec")
    assert f"spec.{field}" in cond["message"]
    _db_untouched(pg, db_with_tables, slot)
    assert _q(pg, db_with_tables, "SELECT to_regclass('wal_listener.backfills') IS NULL") == [(True,)]


async def test_a_slot_on_postgresql_18_is_created_with_failover_and_status_says_so(
    cluster: Cluster, _secret: None, pg18: PostgresServer
) -> None:
    db = pg18.create_database(f"op_{uuid.uuid4().hex[:8]}")
    name, slot = _name("ha"), _slot("ha")
    spec = listener_spec(pg18.port, db, slot=slot)
    spec["database"]["host"] = f"127.0.0.1:{pg18.port},127.0.0.1:{pg18.port}"  # a host list, as for a cluster
    await cluster.create_listener(name, spec)
    await cluster.wait_condition(name, "SlotReady", "True")
    assert _q(pg18, db, "SELECT failover FROM pg_replication_slots WHERE slot_name = %s", (slot,)) == [(True,)]
    await cluster.wait(lambda: (cluster.status(name).get("slot") or {}).get("failover") is True,
                       what="status.slot.failover")
    config = yaml.safe_load(cluster.child(CONFIGMAPS, name)["data"]["config.yml"])  # type: ignore[index]
    assert config["database"]["host"] == spec["database"]["host"] and config["listener"]["failover"] == "auto"
    await cluster.delete_listener(name)
    await cluster.wait_gone(WL, name)
    _q(pg18, db, "SELECT pg_drop_replication_slot(%s)", (slot,))  # the shared server keeps no WAL for it


# -- never breaking the application's database (tables without a replica identity) ------------------------


async def test_a_keyless_table_asked_for_updates_gets_a_condition_and_nothing_is_made(
    cluster: Cluster, _secret: None, pg: PostgresServer, db_with_tables: str
) -> None:
    _q(pg, db_with_tables, "CREATE TABLE public.nopk (a int)")
    name, slot = _name("keyless"), _slot("keyless")
    spec = listener_spec(pg.port, db_with_tables, slot=slot, tables={"users": ["insert"], "nopk": ["insert", "update"]})
    await cluster.create_listener(name, spec)
    ready = await cluster.wait_condition(name, "Ready", "False", "TableWithoutReplicaIdentity")
    assert "public.nopk" in ready["message"] and "REPLICA IDENTITY FULL" in ready["message"]
    events = await cluster.wait(lambda: cluster.events(name, "TableWithoutReplicaIdentity"), what="a Warning event")
    assert events[0]["type"] == "Warning"
    assert _q(pg, db_with_tables, "SELECT pubname FROM pg_publication") == []
    assert _q(pg, db_with_tables, "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)) == []
    assert cluster.child(DEPLOYMENTS, name) is None
    _q(pg, db_with_tables, "UPDATE public.nopk SET a = 1")  # the application's writes still work

    # asked only for inserts, the table goes into the companion publication that publishes nothing else
    await cluster.update_spec(name, {"listener": {"filter": {"tables": {"users": ["insert"], "nopk": ["insert"]}}}})
    await cluster.wait_condition(name, "SlotReady", "True", timeout=60)
    pub = spec["listener"]["publicationName"]
    rows = _q(pg, db_with_tables, "SELECT p.pubname, p.pubupdate, p.pubviaroot, t.tablename FROM pg_publication p"
              " JOIN pg_publication_tables t USING (pubname) ORDER BY 1, 4")
    assert rows == [(pub, False, True, "users"), (pub, False, True, "users"), (f"{pub}_inserts", False, True, "nopk")]
    # the status's publication comes with the reconcile's last patch, which may land after SlotReady
    tables = await cluster.wait(lambda: cluster.status(name)["publication"]["tables"], what="the status's publication")
    assert tables == ["public.nopk", "public.users", "shop.users"]
    _q(pg, db_with_tables, "UPDATE public.nopk SET a = 2")


async def test_without_a_table_list_all_tables_is_refused_while_a_table_has_no_identity(
    cluster: Cluster, _secret: None, pg: PostgresServer, db_with_tables: str
) -> None:
    _q(pg, db_with_tables, "CREATE TABLE public.nopk (a int)")
    name, slot = _name("alltables"), _slot("alltables")
    await cluster.create_listener(name, listener_spec(pg.port, db_with_tables, slot=slot))
    ready = await cluster.wait_condition(name, "Ready", "False", "TableWithoutReplicaIdentity")
    assert "public.nopk" in ready["message"] and "superuser" in ready["message"]
    assert _q(pg, db_with_tables, "SELECT pubname FROM pg_publication") == []
    assert cluster.child(DEPLOYMENTS, name) is None

    # the table gets a key: FOR ALL TABLES is made; a keyless table created later is reported
    _q(pg, db_with_tables, "ALTER TABLE public.nopk ADD PRIMARY KEY (a)")
    # the status timer may say SlotReady as soon as the reconcile made the slot, before that reconcile writes
    # status.publication: wait for the publication itself
    await cluster.wait(lambda: (cluster.status(name).get("publication") or {}).get("allTables") is True,
                       timeout=60, what="status.publication.allTables")
    await cluster.wait_condition(name, "SlotReady", "True", timeout=60)
    _q(pg, db_with_tables, "CREATE TABLE public.later (a int)")
    await cluster.wait(
        lambda: cluster.status(name)["publication"].get("tablesWithoutIdentity") == ["public.later"],
        timeout=60, what="status.publication.tablesWithoutIdentity",
    )
    # the Warning about public.nopk from the start is there already: wait for the one about public.later
    later = await cluster.wait(
        lambda: [e for e in cluster.events(name, "TableWithoutReplicaIdentity") if "public.later" in e["message"]],
        what="a Warning event about public.later",
    )
    assert later[-1]["type"] == "Warning"


async def test_transforms_and_the_secret_held_hash_key(
    cluster: Cluster, _secret: None, pg: PostgresServer, db_with_tables: str, nats_server: NatsServer, tmp_path: Path
) -> None:
    """spec.listener.transforms reach the rendered config as the listener reads them; the hash key only as a
    Secret reference (an inline one is refused), given to the pod as WAL_LISTENER_TRANSFORMSHASHKEY, and
    rotating it rolls the pod. The rendered config with that env var publishes the masked events."""
    name, slot = _name("masks"), _slot("masks")
    secret = f"hash-{uuid.uuid4().hex[:6]}"
    key = "operator-hash-key-0123456789"
    await cluster.create_secret(secret, {"key": key})
    transforms = [{"tables": ["public.users"], "mask": {"name": "hash"}, "topic": "users.{id}"}]
    spec = listener_spec(pg.port, db_with_tables, slot=slot, tables={"users": ["insert"]})
    spec["listener"]["transforms"] = transforms
    spec["listener"]["transformsHashKey"] = key
    await cluster.create_listener(name, spec)
    cond = await cluster.wait_condition(name, "SpecValid", "False", "InvalidSpec")
    assert "an inline transformsHashKey is not allowed; use listener.transformsHashKeySecretRef" in cond["message"]
    assert key not in str(cluster.listener(name).get("status"))

    await cluster.update_spec(name, {"listener": {**spec["listener"], "transformsHashKey": None,
                                                  "transformsHashKeySecretRef": {"name": secret, "key": "key"}}})
    await cluster.wait_condition(name, "SlotReady", "True")
    text = cluster.child(CONFIGMAPS, name)["data"]["config.yml"]  # type: ignore[index]
    rendered = yaml.safe_load(text)
    assert rendered["listener"]["transforms"][0]["mask"] == {"name": "hash"}
    assert key not in text and "transformsHashKey" not in text
    (container,) = cluster.child(DEPLOYMENTS, name)["spec"]["template"]["spec"]["containers"]  # type: ignore[index]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert env["WAL_LISTENER_TRANSFORMSHASHKEY"] == {"name": secret, "key": "key"}
    assert key not in str(cluster.child(DEPLOYMENTS, name))

    before = _template_annotation(cluster, name, SECRETS_HASH_ANNOTATION)
    await cluster.update_secret(secret, {"key": "rotated-hash-key-0123456789"})
    await cluster.wait(
        lambda: _template_annotation(cluster, name, SECRETS_HASH_ANNOTATION) not in (None, before),
        what="a new secrets hash after rotating the hash key",
    )

    # what the pod would run: the rendered file, the key from its env var, against the real database
    cfg_path = tmp_path / "config.yml"
    cfg_path.write_text(text)
    config = load_config(cfg_path, {"WAL_DATABASE_PASSWORD": "x", "WAL_LISTENER_TRANSFORMSHASHKEY": key})
    data = config.model_dump(mode="json", by_alias=True)
    data["listener"].update(serverPort=0, transformsHashKey=key)
    data["database"]["password"] = "x"
    data["publisher"]["address"] = nats_server.url
    data["publisher"]["topic"] = topic = f"op_{uuid.uuid4().hex[:6]}"
    data["monitoring"] = {"promAddr": ""}
    async with running(data):
        _q(pg, db_with_tables, "INSERT INTO public.users VALUES (7, 'ann')")
        (got,) = await read_stream(nats_server.url, topic, 1)
    assert got.subject == f"{topic}.users.7"
    assert got.event["data"] == {"id": 7, "name": hmac.new(key.encode(), b"ann", "sha256").hexdigest()}


async def test_the_listener_pod_is_sized_and_the_bound_follows_its_memory_limit(
    cluster: Cluster, _secret: None, pg: PostgresServer, db_with_tables: str
) -> None:
    """Without spec.pod.resources the listener gets requests and a memory limit, and its config a
    maxInFlightBytes derived from that limit; a limit the user sets moves the bound; a bound the user sets
    stays as written."""
    name, slot = _name("sized"), _slot("sized")
    await cluster.create_listener(name, listener_spec(pg.port, db_with_tables, slot=slot))
    await cluster.wait_condition(name, "SlotReady", "True")

    def container() -> dict[str, Any]:
        dep = cluster.child(DEPLOYMENTS, name)
        assert dep is not None
        return dep["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]

    def bound() -> int:
        cm = cluster.child(CONFIGMAPS, name)
        assert cm is not None
        return int(yaml.safe_load(cm["data"]["config.yml"])["listener"]["maxInFlightBytes"])

    assert container()["resources"] == {"requests": {"cpu": "100m", "memory": "256Mi"},
                                        "limits": {"memory": "512Mi"}}
    assert bound() == 104 * 2**20  # (512Mi - 96Mi) / 4

    await cluster.update_spec(name, {"pod": {"resources": {"limits": {"memory": "1Gi"}}}})
    await cluster.wait(lambda: container()["resources"]["limits"] == {"memory": "1Gi"}, 60, what="the 1Gi limit")
    await cluster.wait(lambda: bound() == 232 * 2**20, 60, what="the bound derived from the 1Gi limit")
    assert container()["resources"]["requests"] == {"cpu": "100m", "memory": "256Mi"}

    await cluster.update_spec(name, {"listener": {"maxInFlightBytes": "48Mi"}})
    await cluster.wait(lambda: bound() == 48 * 2**20, 60, what="the user's maxInFlightBytes in the config")
    assert container()["resources"]["limits"] == {"memory": "1Gi"}
