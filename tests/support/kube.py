"""The pytest plugin running the operator in-process (kopf) against kmock, the Kubernetes API emulator;
registered by ``pytest_plugins`` in tests/conftest.py.

Fixtures: ``cluster`` (kmock + the operator, one per test module: a :class:`Cluster`) and
``clean_listeners`` (deletes the WalListeners a test created once it is done; operator test modules
apply it to every test with ``pytestmark = pytest.mark.usefixtures("clean_listeners")``). Helpers:
:class:`Cluster`, :func:`listener_spec`, the resource names ``WL``, ``CONFIGMAPS``, ``SECRETS``, ...

kmock keeps objects, serves watch streams and honours finalizers, but sets no resourceVersion, uid or
generation and runs no controllers (no garbage collection, no Deployment status): the helpers here
set what kopf needs, bump ``generation`` on spec changes, and tests play the Deployment controller
when they need a ready pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import kmock
import pytest
import pytest_asyncio
import yaml

# the operator's timings, short for tests (read when wal_operator.settings is first imported; this plugin
# is imported when the test session starts, before any test module)
os.environ.setdefault("WAL_OPERATOR_STATUS_INTERVAL", "1")
os.environ.setdefault("WAL_OPERATOR_DELETE_POLL", "0.3")
os.environ.setdefault("WAL_OPERATOR_SLOW_RETRY", "2")

from wal_operator.render import child_name
from wal_operator.spec import API_GROUP, API_VERSION, KIND, PLURAL, SINGULAR

WL = f"{API_GROUP}/{API_VERSION}/{PLURAL}"
CONFIGMAPS = "v1/configmaps"
SECRETS = "v1/secrets"
SERVICES = "v1/services"
EVENTS = "v1/events"
DEPLOYMENTS = "apps/v1/deployments"
NS = "cdc"


class Emulator(kmock.KubernetesEmulator):  # type: ignore[misc]
    """kmock plus ``metadata.generateName`` (kopf names its Events that way)."""

    async def _handle(self, request: Any) -> Any:
        data = request.data
        if request.action == kmock.action.CREATE and isinstance(data, dict):
            meta = data.get("metadata") or {}
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:8]}"
        return await super()._handle(request)


class Cluster:
    """The emulated API plus helpers to act like kubectl and like the controllers kmock lacks."""

    def __init__(self, emulator: kmock.KubernetesEmulator, server: kmock.Server) -> None:
        self.k = emulator
        self.server = server
        self.url = str(server.url).rstrip("/")
        self.created: list[tuple[str, str]] = []  # (namespace, name) of every WalListener made here

    # -- kubectl-like ----------------------------------------------------------------------------

    async def _call(self, method: str, path: str, body: Any = None, ctype: str = "application/json") -> Any:
        async with self.server.client.request(method, path, json=body, headers={"Content-Type": ctype}) as rsp:
            text = await rsp.text()
            if rsp.status >= 400:
                raise AssertionError(f"{method} {path}: {rsp.status} {text[:300]}")
            return yaml.safe_load(text) if text else None

    async def create_listener(self, name: str, spec: dict[str, Any], namespace: str = NS) -> dict[str, Any]:
        body = {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": KIND,
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": str(uuid.uuid4()),
                "resourceVersion": "1",
                "generation": 1,
                "creationTimestamp": _now(),
            },
            "spec": spec,
        }
        result: dict[str, Any] = await self._call(
            "POST", f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/{PLURAL}", body
        )
        self.created.append((namespace, name))
        return result

    async def delete_created(self) -> None:
        """Delete every WalListener created so far (what a test leaves behind keeps the operator busy)."""
        left = [(ns, name) for ns, name in self.created if self.get(WL, name, ns) is not None]
        self.created.clear()
        for ns, name in left:
            with contextlib.suppress(AssertionError):  # gone meanwhile
                await self.delete_listener(name, ns)
        for ns, name in left:
            await self.wait_gone(WL, name, ns, timeout=60)

    async def update_spec(self, name: str, spec_patch: dict[str, Any], namespace: str = NS) -> None:
        current = self.listener(name, namespace)
        generation = int(current["metadata"].get("generation", 1)) + 1
        await self._call(
            "PATCH",
            f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/{PLURAL}/{name}",
            {"metadata": {"generation": generation}, "spec": spec_patch},
            "application/merge-patch+json",
        )

    async def patch_status(self, name: str, status: dict[str, Any], namespace: str = NS) -> None:
        """Write a WalListener's status as another writer would (a merge patch of the status subresource)."""
        await self._call(
            "PATCH",
            f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status",
            {"status": status},
            "application/merge-patch+json",
        )

    async def delete_listener(self, name: str, namespace: str = NS) -> None:
        await self._call("DELETE", f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/{PLURAL}/{name}")

    async def create_secret(self, name: str, data: dict[str, str], namespace: str = NS) -> None:
        import base64

        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()), "resourceVersion": "1"},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        }
        await self._call("POST", f"/api/v1/namespaces/{namespace}/secrets", body)

    async def update_secret(self, name: str, data: dict[str, str], namespace: str = NS) -> None:
        import base64

        await self._call(
            "PATCH",
            f"/api/v1/namespaces/{namespace}/secrets/{name}",
            {"data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}},
            "application/merge-patch+json",
        )

    async def create_deployment(self, name: str, labels: dict[str, str], namespace: str = NS) -> None:
        """A Deployment made by someone else (kubectl), owned by no WalListener."""
        body = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()), "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": {"containers": [{"name": "x", "image": "x"}]}},
            },
        }
        await self._call("POST", f"/apis/apps/v1/namespaces/{namespace}/deployments", body)

    async def delete_child(self, resource: str, name: str, namespace: str = NS) -> None:
        group_version, plural = resource.rsplit("/", 1)
        prefix = "/api" if group_version == "v1" else "/apis"
        await self._call("DELETE", f"{prefix}/{group_version}/namespaces/{namespace}/{plural}/{child_name(name)}")

    async def set_deployment_available(self, name: str, namespace: str = NS) -> None:
        """Play the Deployment controller: the listener pod is up and ready."""
        await self._call(
            "PATCH",
            f"/apis/apps/v1/namespaces/{namespace}/deployments/{child_name(name)}/status",
            {"status": {"replicas": 1, "readyReplicas": 1, "availableReplicas": 1, "updatedReplicas": 1}},
            "application/merge-patch+json",
        )

    # -- reading -----------------------------------------------------------------------------------

    def get(self, resource: str, name: str, namespace: str = NS) -> dict[str, Any] | None:
        try:
            obj = self.k.objects[resource, namespace, name]
        except KeyError:
            return None
        if obj.deleted:
            return None
        raw: dict[str, Any] = obj.raw
        return raw

    def listener(self, name: str, namespace: str = NS) -> dict[str, Any]:
        obj = self.get(WL, name, namespace)
        assert obj is not None, f"WalListener {namespace}/{name} does not exist"
        return obj

    def child(self, resource: str, name: str, namespace: str = NS) -> dict[str, Any] | None:
        return self.get(resource, child_name(name), namespace)

    def condition(self, name: str, type_: str, namespace: str = NS) -> dict[str, Any] | None:
        obj = self.get(WL, name, namespace)
        for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
            if cond.get("type") == type_:
                return dict(cond)
        return None

    def events(self, name: str, reason: str | None = None) -> list[dict[str, Any]]:
        found = []
        for (resource, _, _), obj in list(self.k.objects.items()):
            if resource.plural != "events" or obj.deleted:
                continue
            raw = obj.raw
            if (raw.get("involvedObject") or {}).get("name") == name and (
                reason is None or raw.get("reason") == reason
            ):
                found.append(raw)
        return found

    async def wait(self, predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
        deadline = asyncio.get_running_loop().time() + timeout
        last: Any = None
        while True:
            with contextlib.suppress(KeyError, TypeError, AssertionError):
                last = predicate()
                if last:
                    return last
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
            await asyncio.sleep(0.1)

    async def wait_condition(
        self, name: str, type_: str, status: str, reason: str | None = None, timeout: float = 20.0
    ) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            cond = self.condition(name, type_)
            if cond and cond["status"] == status and (reason is None or cond["reason"] == reason):
                return cond
            return None

        try:
            result: dict[str, Any] = await self.wait(check, timeout, f"{name}: {type_}={status} {reason or ''}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; status now {self.status(name)}") from None
        return result

    def versions(self, resource: str, name: str, namespace: str = NS) -> int:
        """How many times the object was written (kmock keeps every version)."""
        return len(self.k.objects[resource, namespace, name].history)

    def status(self, name: str, namespace: str = NS) -> dict[str, Any]:
        obj = self.get(WL, name, namespace) or {}
        return dict(obj.get("status") or {})

    async def wait_gone(self, resource: str, name: str, namespace: str = NS, timeout: float = 20.0) -> None:
        await self.wait(lambda: self.get(resource, name, namespace) is None, timeout, f"{resource} {name} gone")


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _declare(emulator: kmock.KubernetesEmulator) -> None:
    info = kmock.ResourceInfo
    emulator.resources[WL] = info(
        kind=KIND,
        singular=SINGULAR,
        namespaced=True,
        subresources={"status"},
        verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
        shortnames={"wl"},
    )
    for res, kind in ((CONFIGMAPS, "ConfigMap"), (SECRETS, "Secret"), (SERVICES, "Service"), (EVENTS, "Event")):
        emulator.resources[res] = info(
            kind=kind,
            singular=kind.lower(),
            namespaced=True,
            verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
        )
    # kopf waits for these to exist in discovery (namespaces, CRDs) before it starts watching
    emulator.resources["v1/namespaces"] = info(
        kind="Namespace", singular="namespace", namespaced=False, verbs={"get", "list", "watch"}
    )
    emulator.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = info(
        kind="CustomResourceDefinition",
        singular="customresourcedefinition",
        namespaced=False,
        verbs={"get", "list", "watch"},
    )
    emulator.resources[DEPLOYMENTS] = info(
        kind="Deployment",
        singular="deployment",
        namespaced=True,
        subresources={"status"},
        verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
    )


def write_kubeconfig(path: Path, url: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "kmock", "cluster": {"server": url}}],
                "users": [{"name": "tester", "user": {"token": "test-token"}}],
                "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "tester", "namespace": NS}}],
                "current-context": "kmock",
            }
        )
    )
    return path


@contextlib.asynccontextmanager
async def running_operator(tmp: Path) -> AsyncIterator[Cluster]:
    """kmock on a free port and the whole operator (kopf) in this event loop, watching it."""
    import kopf

    from wal_operator import handlers

    async with Emulator() as emulator, kmock.Server(emulator) as server:
        _declare(emulator)
        cluster = Cluster(emulator, server)
        old = os.environ.get("KUBECONFIG")
        os.environ["KUBECONFIG"] = str(write_kubeconfig(tmp / "kubeconfig", cluster.url))
        stop = asyncio.Event()
        ready = asyncio.Event()
        task = asyncio.create_task(kopf.operator(clusterwide=True, standalone=True, stop_flag=stop, ready_flag=ready))
        try:
            await asyncio.wait_for(ready.wait(), 20)
            yield cluster
        finally:
            stop.set()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(task, 15)
            await handlers.close_client()
            if old is None:
                os.environ.pop("KUBECONFIG", None)
            else:
                os.environ["KUBECONFIG"] = old


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    async with running_operator(tmp_path_factory.mktemp("kube")) as c:
        yield c


@pytest_asyncio.fixture(loop_scope="session", autouse=False)
async def clean_listeners(cluster: Cluster) -> AsyncIterator[None]:
    """Deletes the WalListeners a test created once it is done."""
    yield
    await cluster.delete_created()


def listener_spec(
    pg_port: int,
    dbname: str,
    *,
    slot: str,
    publication: str | None = None,
    tables: dict[str, list[str]] | None = None,
    host: str = "127.0.0.1",
    **extra: Any,
) -> dict[str, Any]:
    """A WalListener spec pointing at a test database (trust auth: any password works)."""
    listener: dict[str, Any] = {"slotName": slot, "publicationName": publication or f"pub_{slot}"}
    if tables is not None:
        listener["filter"] = {"tables": tables}
    spec: dict[str, Any] = {
        "listener": listener,
        "database": {
            "host": host,
            "port": pg_port,
            "name": dbname,
            "user": "postgres",
            "passwordSecretRef": {"name": "pg-credentials", "key": "password"},
        },
        "publisher": {"type": "nats", "topic": "wal_listener", "nats": {"address": "nats://nats:4222"}},
    }
    spec.update(extra)
    return spec
