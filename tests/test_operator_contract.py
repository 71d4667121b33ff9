"""The operator and the listener agree on the contract.

The operator provisions a WalListener (kmock + real PostgreSQL); then the ConfigMap it rendered and the
env of the Deployment it rendered (Secrets resolved as the kubelet would) start a real
``wal-listener --config FILE`` process, whose probes answer on the ports the pod declares and whose
events reach NATS JetStream, with the publication the operator made doing the table filtering.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import IO, Any

import aiohttp
import psycopg
import pytest

from tests.support.harness import read_stream
from tests.support.kube import CONFIGMAPS, DEPLOYMENTS, SECRETS, Cluster, listener_spec
from tests.support.services import NatsServer, PostgresServer, free_port

pytestmark = [
    pytest.mark.service,
    pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.usefixtures("clean_listeners"),
]

REPO = Path(__file__).resolve().parent.parent


def _pod_env(cluster: Cluster, container: dict[str, Any]) -> dict[str, str]:
    """The container's env as the kubelet would set it: secretKeyRef resolved from the Secret."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        ref = item["valueFrom"]["secretKeyRef"]
        secret = cluster.get(SECRETS, ref["name"])
        assert secret is not None, f"the pod references a missing Secret {ref['name']}"
        env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
    return env


def _start_listener(config_file: Path, env: dict[str, str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    """What the pod's command does: ``wal-listener --config FILE``."""
    return subprocess.Popen(
        [sys.executable, "-m", "listener.cli", "--config", str(config_file)],
        env=env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


async def _get(port: int, path: str) -> tuple[int, str]:
    try:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}{path}") as rsp:
            return rsp.status, await rsp.text()
    except aiohttp.ClientError:
        return 0, ""


async def test_rendered_config_runs_a_listener_that_delivers(
    cluster: Cluster, pg: PostgresServer, fresh_db: str, nats_server: NatsServer, tmp_path: Path
) -> None:
    with psycopg.connect(pg.dsn(fresh_db), autocommit=True) as conn:
        conn.execute("CREATE TABLE users (id int PRIMARY KEY, name text)")
        conn.execute("CREATE TABLE audit (id int PRIMARY KEY)")
    await cluster.create_secret("pg-credentials", {"password": "unused-with-trust"})
    name, slot = f"contract-{uuid.uuid4().hex[:6]}", f"contract_{uuid.uuid4().hex[:6]}"
    http_port, metrics_port = free_port(), free_port()
    topic = f"t_{uuid.uuid4().hex[:6]}"
    spec = listener_spec(pg.port, fresh_db, slot=slot, tables={"users": ["insert", "update"]})
    spec["listener"].update(serverPort=http_port, heartbeatInterval="1s", refreshConnection="2s")
    spec["listener"]["topicsMap"] = {"public_users": "people"}
    spec["publisher"] = {"type": "nats", "topic": topic, "nats": {"address": nats_server.url}}
    spec["monitoring"] = {"promAddr": f"127.0.0.1:{metrics_port}"}
    await cluster.create_listener(name, spec)
    await cluster.wait_condition(name, "SlotReady", "True")

    cm = cluster.child(CONFIGMAPS, name)
    dep = cluster.child(DEPLOYMENTS, name)
    assert cm is not None and dep is not None
    container = dep["spec"]["template"]["spec"]["containers"][0]
    config_file = tmp_path / "config.yml"
    config_file.write_text(cm["data"]["config.yml"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAL_")}
    env.update(_pod_env(cluster, container))
    assert container["command"][:2] == ["wal-listener", "--config"]
    log = (tmp_path / "listener.log").open("wb")
    proc = _start_listener(config_file, env, log)
    try:
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        probe = container["readinessProbe"]["httpGet"]
        port = ports[probe["port"]]

        async def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "listener.log").read_text()[-3000:]
            return (await _get(port, probe["path"]))[0] == 200

        for _ in range(300):
            if await ready():
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the listener never became ready: " + (tmp_path / "listener.log").read_text()[-3000:])
        assert (await _get(port, container["livenessProbe"]["httpGet"]["path"]))[0] == 200
        status, metrics = await _get(ports["metrics"], "/metrics")
        assert status == 200 and "published_events_total" in metrics

        with psycopg.connect(pg.dsn(fresh_db), autocommit=True) as conn:
            conn.execute("INSERT INTO audit VALUES (1)")  # not in the publication: never leaves PostgreSQL
            conn.execute("INSERT INTO users VALUES (1, 'ann'), (2, 'bob')")
            conn.execute("UPDATE users SET name = 'anne' WHERE id = 1")
            conn.execute("DELETE FROM users WHERE id = 2")  # filtered out by the publication's publish=

        received = await read_stream(nats_server.url, topic, 3, timeout=30)
        assert {r.subject for r in received} == {f"{topic}.people"}
        actions = sorted(r.event["action"] for r in received)
        assert actions == ["INSERT", "INSERT", "UPDATE"], received
        assert all(r.event["table"] == "users" for r in received)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    assert proc.returncode == 0, (tmp_path / "listener.log").read_text()[-3000:]
