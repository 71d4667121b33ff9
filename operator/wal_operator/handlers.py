"""kopf handlers: one level-based reconcile, a watch on the listener Deployments, a status timer, a finalizer.

Errors are sorted by who can fix them:

* the spec is wrong (:class:`SpecError`) -> condition False with the message, a Warning event,
  ``PermanentError``: no retries until the resource changes;
* a person must act outside the spec (privileges, ``wal_level``, a missing Secret, a conflict) ->
  condition False with the message, retried slowly (``WAL_OPERATOR_SLOW_RETRY``);
* the database is unreachable -> condition False, retried with exponential backoff.

Readiness comes from the listener Deployment itself: a watch on the Deployments the operator owns
updates ``DeploymentReady`` as soon as the pod's readiness changes. The timer reads what has no watch:
the slot in PostgreSQL (lag, ``wal_status``) and the referenced Secrets (a change rolls the pod).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC
from typing import Any

import kopf
import psycopg

from listener.backfill import BackfillError, Request
from listener.catalog import SlotState
from listener.config import DatabaseConfig
from listener.ddl import remove_capture
from listener.errors import DatabaseError, DatabaseSetupError
from listener.pgoutput import format_lsn
from wal_operator import db, render
from wal_operator import status as st
from wal_operator.kube import KubeClient, KubeError, relogin_service_account
from wal_operator.render import child_name
from wal_operator.settings import SETTINGS
from wal_operator.spec import (
    API_GROUP,
    API_VERSION,
    KIND,
    PLURAL,
    TLS_DIR,
    TLS_FILES,
    ReclaimPolicy,
    SpecError,
    WalListenerSpec,
    parse_spec,
)

RESOURCE = (API_GROUP, API_VERSION, PLURAL)
FINALIZER = f"{API_GROUP}/cleanup"
LOG = logging.getLogger("wal_operator")
Logger = logging.Logger | logging.LoggerAdapter[Any]


class _State:
    credentials: kopf.ConnectionInfo | None = None
    client: KubeClient | None = None
    closed: bool = False  # after the operator's cleanup: no new connections
    tls_root: str = ""  # private folder for the TLS files of the operator's own database connections


STATE = _State()


def kube() -> KubeClient:
    if STATE.client is None:
        if STATE.credentials is None or STATE.closed:
            raise kopf.TemporaryError("not logged in to the Kubernetes API yet", delay=5)
        relogin = relogin_service_account(STATE.credentials) if STATE.credentials.token else None
        STATE.client = KubeClient(STATE.credentials, relogin)
    return STATE.client


# --------------------------------------------------------------------------------------------------
# operator lifecycle


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    # the CRD is installed with the chart: no need to watch namespaces and CRDs, which would take
    # cluster-wide RBAC (and a namespaced install has only Roles)
    settings.scanning.disabled = True


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo:
    info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    if info is None:
        raise kopf.LoginError("no service account and no kubeconfig: cannot reach the Kubernetes API")
    STATE.credentials = info
    STATE.client = None
    STATE.closed = False
    return info


@kopf.on.cleanup()
async def close_client(**_: Any) -> None:
    STATE.closed = True
    if STATE.client is not None:
        await STATE.client.close()
        STATE.client = None


# --------------------------------------------------------------------------------------------------
# who claims which slot and publication


ClaimKey = tuple[str, int, str, str, str]  # host, port, database, "slot"|"publication", name


@dataclass(frozen=True, order=True)
class Claim:
    created: str
    uid: str
    resource: str  # namespace/name


def _claim_keys(spec: WalListenerSpec) -> list[ClaimKey]:
    d = spec.database
    base = (d.host.lower(), d.port, d.name)
    return [(*base, "slot", spec.listener.slot_name), (*base, "publication", spec.listener.publication_name)]


@kopf.index(*RESOURCE)
def claims(
    spec: kopf.Spec, meta: kopf.Meta, uid: str, name: str, namespace: str | None, **_: Any
) -> dict[ClaimKey, Claim]:
    try:
        model = WalListenerSpec.model_validate(dict(spec))
    except ValueError:
        return {}
    claim = Claim(str(meta.get("creationTimestamp") or ""), uid or f"{namespace}/{name}", f"{namespace}/{name}")
    return dict.fromkeys(_claim_keys(model), claim)


def _conflict(spec: WalListenerSpec, me: Claim, index: kopf.Index[ClaimKey, Claim] | None) -> str | None:
    """Why this resource must stand back, or None when it owns its slot and publication."""
    if index is None:
        return None
    for key in _claim_keys(spec):
        others = [c for c in index.get(key, []) if c.uid != me.uid]
        earlier = sorted(c for c in others if (c.created, c.uid) < (me.created, me.uid))
        if earlier:
            host, port, database, what, name = key
            return (
                f"{what} {name} in {host}:{port}/{database} is already claimed by WalListener "
                f"{earlier[0].resource}; this resource stays idle until that one is gone or this one "
                f"uses another listener.{'slotName' if what == 'slot' else 'publicationName'}"
            )
    return None


def _me(meta: Mapping[str, Any], uid: str | None, name: str, namespace: str | None) -> Claim:
    return Claim(str(meta.get("creationTimestamp") or ""), uid or f"{namespace}/{name}", f"{namespace}/{name}")


# --------------------------------------------------------------------------------------------------
# status helpers


def _status_patch(
    current: Any, generation: int | None, conditions: list[st.Condition], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The status fields to write: ``conditions`` merged into ``current`` (a condition list), Ready, phase."""
    merged = st.merge(current, conditions, generation)
    merged = st.merge(merged, [st.ready_from_steps(merged)], generation)
    ready = st.get(merged, st.READY)
    phase = "Ready" if ready and ready.get("status") == "True" else str(ready.get("reason") if ready else "Pending")
    patch: dict[str, Any] = {"conditions": merged, "phase": phase}
    if generation is not None:
        patch["observedGeneration"] = generation
    patch.update(extra or {})
    return patch


def _write(
    patch: kopf.Patch,
    status: Mapping[str, Any],
    generation: int | None,
    conditions: list[st.Condition],
    extra: dict[str, Any] | None = None,
) -> None:
    for key, value in _status_patch(status.get("conditions"), generation, conditions, extra).items():
        patch.status[key] = value


def _slot_status(name: str, slot: SlotState | None) -> dict[str, Any]:
    if slot is None:
        return {"name": name, "exists": False, "active": False, "checkedAt": st.now()}
    return {
        "name": slot.name,
        "exists": True,
        "active": slot.active,
        "confirmedLSN": format_lsn(slot.confirmed_flush_lsn) if slot.confirmed_flush_lsn else "",
        "restartLSN": format_lsn(slot.restart_lsn) if slot.restart_lsn else "",
        "walStatus": slot.wal_status or "",
        "retainedWALBytes": slot.retained_wal_bytes,
        "lagBytes": slot.lag_bytes,
        "lag": st.human_bytes(slot.lag_bytes),
        "lagSeconds": slot.lag_seconds,  # None (unknown: no reader) removes the field
        "failover": slot.failover,  # PostgreSQL 17+ only (None removes the field)
        "checkedAt": st.now(),
    }


class _NeedsPerson(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class _ChildConflict(Exception):
    """A child object of this resource's name exists and belongs to someone else."""


# --------------------------------------------------------------------------------------------------
# Secrets: what the operator needs to log in, and the hash that rolls the pod


@dataclass(frozen=True)
class Secrets:
    """The referenced Secret keys' contents, by spec field, and their hash for the pod template."""

    by_field: dict[str, bytes]
    digest: str


async def _read_secrets(spec: WalListenerSpec, namespace: str) -> Secrets:
    refs = spec.referenced_secrets()
    values: dict[str, bytes] = {}
    for field, ref in refs.items():
        try:
            values[field] = await kube().read_secret_key(namespace, ref.name, ref.key)
        except KeyError as exc:
            raise _NeedsPerson("SecretMissing", f"{exc.args[0]} (spec.{field})") from None
    digest = render.secrets_hash({(ref.name, ref.key): values[field] for field, ref in refs.items()})
    return Secrets(values, digest)


def _private_tls_dir(files: dict[str, bytes]) -> str:
    """A folder only this process can read holding ``database/<file>`` for the operator's own connection."""
    if not STATE.tls_root:
        STATE.tls_root = tempfile.mkdtemp(prefix="wal-operator-tls-")
    digest = hashlib.sha256(b"".join(hashlib.sha256(v).digest() + k.encode() for k, v in sorted(files.items())))
    base = os.path.join(STATE.tls_root, digest.hexdigest()[:16])
    folder = os.path.join(base, "database")
    if not os.path.isdir(folder):
        os.makedirs(folder, mode=0o700)
        for name, content in files.items():
            with open(os.open(os.path.join(folder, name), os.O_WRONLY | os.O_CREAT, 0o600), "wb") as fh:
                fh.write(content)
    return base


def _database_config(spec: WalListenerSpec, secrets: Secrets) -> DatabaseConfig:
    """The database settings of the resource with its secrets, for the operator's own connection."""
    try:
        values: dict[tuple[str, ...], str] = {
            ("database", key): secrets.by_field[f"database.{key}SecretRef"].decode()
            for key in ("user", "password")
            if f"database.{key}SecretRef" in secrets.by_field
        }
    except UnicodeDecodeError:
        raise _NeedsPerson("SecretInvalid", "the database user or password in its Secret is not UTF-8") from None
    tls_dir = TLS_DIR
    if spec.database.tls is not None:
        roles = spec.database.tls.refs()
        tls_dir = _private_tls_dir({TLS_FILES[r]: secrets.by_field[f"database.tls.{r}SecretRef"] for r in roles})
    return spec.to_config(values, tls_dir=tls_dir).database


# --------------------------------------------------------------------------------------------------
# children


_CHILDREN = (
    ("api/v1", "configmaps", "ConfigMap"),
    ("apis/apps/v1", "deployments", "Deployment"),
    ("api/v1", "services", "Service"),
)


def _child_path(api: str, plural: str, namespace: str, name: str = "") -> str:
    path = f"{api}/namespaces/{namespace}/{plural}"
    return f"{path}/{name}" if name else path


def _controller_uid(obj: Mapping[str, Any]) -> str | None:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid"))
    return None


Children = dict[str, dict[str, Any] | None]  # by plural: the object as the API server has it, None if missing


def _not_ours(kind: str, owner: render.Owner, obj: Mapping[str, Any]) -> _ChildConflict | None:
    """The conflict when the child ``obj`` (named as this resource's) is not controlled by ``owner``."""
    if _controller_uid(obj) == owner.uid:
        return None
    holder = next((r for r in (obj.get("metadata") or {}).get("ownerReferences") or [] if r.get("controller")), None)
    whose = f"belongs to {holder.get('kind')} {holder.get('name')}" if holder else "is not managed by the operator"
    return _ChildConflict(
        f"{kind} {owner.namespace}/{child_name(owner.name)} already exists and {whose}; it is left untouched: "
        "delete or rename that object, or give this WalListener another name"
    )


async def _read_children(owner: render.Owner) -> Children:
    """One GET per child; raise :class:`_ChildConflict` if a child's name is taken by an object this resource
    does not own."""
    found: Children = {}
    for api, plural, kind in _CHILDREN:
        obj = await kube().get(_child_path(api, plural, owner.namespace, child_name(owner.name)))
        found[plural] = obj
        if obj is not None and (conflict := _not_ours(kind, owner, obj)) is not None:
            raise conflict
    return found


async def _write_child(
    kind: str, collection: str, body: dict[str, Any], existing: dict[str, Any] | None, owner: render.Owner
) -> dict[str, Any]:
    """Create a child that was missing when read (one POST), else server-side apply it (one PATCH). One
    created since it was read is applied only if it is this resource's (:class:`_ChildConflict` if not)."""
    if existing is None:
        try:
            return await kube().create(collection, body)
        except KubeError as exc:
            if exc.status != 409:
                raise
        existing = await kube().get(f"{collection}/{body['metadata']['name']}")
        if existing is not None and (conflict := _not_ours(kind, owner, existing)) is not None:
            raise conflict
    return await kube().apply(collection, body)


async def _apply_children(
    model: WalListenerSpec,
    owner: render.Owner,
    secrets_digest: str,
    logger: Logger,
    existing: Children | None = None,
) -> Any:
    """Write ConfigMap, Deployment and Service; returns the Deployment as the API server has it.
    ``existing``: the children as :func:`_read_children` found them just now (read here when not given)."""
    if existing is None:
        existing = await _read_children(owner)
    ns = owner.namespace
    children = (  # in this order: the pod reads the ConfigMap; the Service selects the pods
        ("ConfigMap", "api/v1", "configmaps", render.configmap(model, owner)),
        ("Deployment", "apis/apps/v1", "deployments",
         render.deployment(model, owner, SETTINGS.listener_image, secrets_digest)),
        ("Service", "api/v1", "services", render.service(model, owner)),
    )
    written: dict[str, Any] = {}
    try:
        for kind, api, plural, body in children:
            written[kind] = await _write_child(kind, _child_path(api, plural, ns), body, existing.get(plural), owner)
    except KubeError as exc:
        if exc.status in (400, 403, 422):
            logger.error("the API server refused a child of this resource: %s", exc)
        raise kopf.TemporaryError(
            f"could not write the listener's Deployment/ConfigMap/Service: {exc}", delay=30
        ) from None
    return written["Deployment"]


def _deployment_condition(suspend: bool, dep: Mapping[str, Any] | None) -> st.Condition:
    if suspend:
        return st.Condition(
            st.DEPLOYMENT_READY,
            "False",
            "Suspended",
            "spec.suspend is true: the listener is scaled to zero; the slot keeps its position and holds WAL",
        )
    if dep is None:
        return st.Condition(st.DEPLOYMENT_READY, "False", "DeploymentMissing", "the listener Deployment does not exist")
    dstatus = dep.get("status") or {}
    generation = (dep.get("metadata") or {}).get("generation")
    observed = dstatus.get("observedGeneration")
    if generation is not None and observed is not None and observed < generation:
        return st.Condition(st.DEPLOYMENT_READY, "False", "RollingOut", "the new listener pod is being rolled out")
    if int(dstatus.get("availableReplicas") or 0) >= 1 and int(dstatus.get("updatedReplicas") or 1) >= 1:
        return st.Condition(st.DEPLOYMENT_READY, "True", "PodReady", "the listener pod is ready (/ready answers)")
    return st.Condition(
        st.DEPLOYMENT_READY,
        "False",
        "PodNotReady",
        "waiting for the listener pod to become ready (PostgreSQL stream and broker both up)",
    )


def _retry_delay(retry: int) -> float:
    return min(5.0 * 2.0**retry, SETTINGS.slow_retry)


# --------------------------------------------------------------------------------------------------
# reconcile


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE)
async def reconcile(
    *,
    body: kopf.Body,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    name: str,
    namespace: str | None,
    uid: str,
    patch: kopf.Patch,
    retry: int,
    claims: kopf.Index[ClaimKey, Claim] | None = None,
    logger: Logger,
    **_: Any,
) -> None:
    namespace = namespace or "default"
    generation = meta.get("generation")

    def fail(conds: list[st.Condition], extra: dict[str, Any] | None = None) -> None:
        _write(patch, status, generation, conds, extra)

    # 1. the spec
    try:
        model = parse_spec(dict(spec))
    except SpecError as exc:
        fail([st.Condition(st.SPEC_VALID, "False", "InvalidSpec", str(exc))])
        kopf.warn(body, reason="InvalidSpec", message=str(exc))
        raise kopf.PermanentError(f"invalid spec: {exc}") from None
    spec_ok = st.Condition(st.SPEC_VALID, "True", "Valid", "the spec renders a valid listener config")

    # 2. nobody else owns this slot or publication, or the names of this resource's children
    me = _me(meta, uid, name, namespace)
    reason = _conflict(model, me, claims)
    if reason is not None:
        fail([spec_ok, st.Condition(st.CONFLICT, "True", "SlotClaimed", reason)])
        raise kopf.TemporaryError(reason, delay=SETTINGS.slow_retry)
    owner = render.Owner(name=name, namespace=namespace, uid=uid or "")
    try:
        children = await _read_children(owner)
    except _ChildConflict as exc:
        fail([spec_ok, st.Condition(st.CONFLICT, "True", "ChildOwnedByOther", str(exc))])
        kopf.warn(body, reason="Conflict", message=str(exc))
        raise kopf.TemporaryError(str(exc), delay=SETTINGS.slow_retry) from None
    no_conflict = st.Condition(st.CONFLICT, "False", "NoConflict", "")

    # 3. the database: publication and slot
    try:
        secrets = await _read_secrets(model, namespace)
        conn = await db.connect(_database_config(model, secrets))
    except _NeedsPerson as exc:
        fail([spec_ok, no_conflict, st.Condition(st.DATABASE_REACHABLE, "Unknown", exc.reason, exc.message)])
        raise kopf.TemporaryError(exc.message, delay=min(30.0, SETTINGS.slow_retry)) from None
    except DatabaseSetupError as exc:  # before DatabaseError: a person must act, no fast retries
        fail([spec_ok, no_conflict, st.Condition(st.DATABASE_REACHABLE, "False", "LoginRefused", str(exc))])
        raise kopf.TemporaryError(str(exc), delay=SETTINGS.slow_retry) from None
    except DatabaseError as exc:
        delay = _retry_delay(retry)
        message = f"{exc}; retrying in {delay:.0f}s"
        fail([spec_ok, no_conflict, st.Condition(st.DATABASE_REACHABLE, "False", "Unreachable", message)])
        raise kopf.TemporaryError(str(exc), delay=delay) from None

    reachable = st.Condition(st.DATABASE_REACHABLE, "True", "Connected", "")
    done = [spec_ok, no_conflict, reachable]
    try:
        async with conn:
            version = await db.check_server(conn)
            try:
                pub = await db.ensure_publication(conn, model, owner, version)
            except db.MissingTables as exc:
                fail([*done, st.Condition(st.PUBLICATION_READY, "False", "TablesMissing", str(exc))])
                raise kopf.TemporaryError(str(exc), delay=60) from None
            except db.TableWithoutReplicaIdentity as exc:
                fail([*done, st.Condition(st.PUBLICATION_READY, "False", "TableWithoutReplicaIdentity", str(exc))])
                kopf.warn(body, reason="TableWithoutReplicaIdentity", message=str(exc))
                raise kopf.TemporaryError(str(exc), delay=SETTINGS.slow_retry) from None
            done.append(
                st.Condition(
                    st.PUBLICATION_READY,
                    "True",
                    "Updated" if pub.changed else "UpToDate",
                    f"publication {pub.name}: " + ("all tables" if pub.all_tables else ", ".join(pub.tables)),
                )
            )
            slot, created = await db.ensure_slot(
                conn, model.listener.slot_name, model.database.name, db.failover_wanted(model, version)
            )
            done.append(
                st.Condition(
                    st.SLOT_READY,
                    "True",
                    "Created" if created else "Exists",
                    f"logical slot {slot.name} (pgoutput), wal_status {slot.wal_status or '-'}",
                )
            )
            # what the status timer reports too: the first tick then has nothing new to write
            keyless = await db.tables_without_identity(conn, pub.name)
            if model.listener.ddl.capture:
                ddl = _ddl_condition(*await db.ddl_capture(conn, model, install=True))
                done.append(ddl)
                if ddl.status == "False":
                    kopf.warn(body, reason="DDLCaptureUnavailable", message=ddl.message)
            elif st.get(status.get("conditions"), st.DDL_CAPTURE) is not None:
                done.append(st.Condition(st.DDL_CAPTURE, "False", "Off", "spec.listener.ddl.capture is false"))
            await _queue_backfills(body, conn, model, logger)
    except SpecError as exc:
        fail([st.Condition(st.SPEC_VALID, "False", "InvalidSpec", str(exc)), no_conflict, reachable])
        kopf.warn(body, reason="InvalidSpec", message=str(exc))
        raise kopf.PermanentError(str(exc)) from None
    except db.Conflict as exc:
        fail([*done, st.Condition(st.CONFLICT, "True", "ClaimedInDatabase", str(exc))])
        raise kopf.TemporaryError(str(exc), delay=SETTINGS.slow_retry) from None
    except DatabaseSetupError as exc:
        step = st.SLOT_READY if any(c.type == st.PUBLICATION_READY for c in done) else st.PUBLICATION_READY
        fail([*done, st.Condition(step, "False", "Refused", str(exc))])
        raise kopf.TemporaryError(str(exc), delay=SETTINGS.slow_retry) from None
    except DatabaseError as exc:
        fail([*done, st.Condition(st.DATABASE_REACHABLE, "False", "Unreachable", str(exc))])
        raise kopf.TemporaryError(str(exc), delay=_retry_delay(retry)) from None
    except psycopg.OperationalError as exc:
        msg = f"lost the connection to PostgreSQL: {db.first_line(exc)}"
        fail([*done, st.Condition(st.DATABASE_REACHABLE, "False", "Unreachable", msg)])
        raise kopf.TemporaryError(msg, delay=_retry_delay(retry)) from None

    # 4. the children
    try:
        dep = await _apply_children(model, owner, secrets.digest, logger, children)
    except _ChildConflict as exc:  # created meanwhile by someone else
        fail([*done, st.Condition(st.CONFLICT, "True", "ChildOwnedByOther", str(exc))])
        kopf.warn(body, reason="Conflict", message=str(exc))
        raise kopf.TemporaryError(str(exc), delay=SETTINGS.slow_retry) from None
    done.append(_deployment_condition(model.suspend, dep))
    _write(
        patch,
        status,
        generation,
        done,
        {
            "configHash": render.config_hash(model),
            "slot": _slot_status(slot.name, slot),
            "publication": {
                "name": pub.name,
                "allTables": pub.all_tables,
                "tables": pub.tables,
                "createdByOperator": pub.created_by_operator,
                "tablesWithoutIdentity": keyless,
            },
        },
    )


def _ddl_condition(reason: str, problem: str) -> st.Condition:
    if not problem:
        return st.Condition(st.DDL_CAPTURE, "True", "Installed", "the DDL event trigger is installed and enabled")
    # the reasons listener.ddl.CaptureState.problem gives, named where the reference docs read reasons
    said = next((r for r in ("NotInstalled", "SuperuserMissing", "Outdated", "Disabled") if r == reason), "Unknown")
    return st.Condition(st.DDL_CAPTURE, "False", said, f"spec.listener.ddl.capture: {problem}")


async def _queue_backfills(body: kopf.Body, conn: db.Connection, model: WalListenerSpec, logger: Logger) -> None:
    """spec.backfills: a new entry is queued for the listener (once: a name never runs twice)."""
    if not model.backfills:
        return
    try:
        queued = await db.queue_backfills(conn, model)
    except BackfillError as exc:
        kopf.warn(body, reason="BackfillNotQueued", message=str(exc))
        return
    for name in queued:
        kopf.event(body, type="Normal", reason="BackfillQueued", message=f"backfill {name} queued for the listener")
        logger.info("backfill %s queued", name)


def _backfill_status(items: list[Request]) -> dict[str, Any]:
    """status.backfills (each with its progress) and status.backfill, one line for the printer column."""
    rows = [
        {
            "name": item.name,
            "state": item.state,
            "tables": list(item.tables),
            "rowsDone": item.rows_done,
            "rowsEstimated": item.rows_estimated,
            "startedAt": _stamp(item.started_at),
            "finishedAt": _stamp(item.finished_at),
            "error": item.error or None,
        }
        for item in items[-20:]
    ]
    summary = None
    if items:
        last = next((i for i in reversed(items) if i.state in ("running", "requested")), items[-1])
        share = ""
        if last.state == "running" and last.rows_estimated:
            share = f" {min(last.rows_done / last.rows_estimated, 1.0):.0%}"
        summary = f"{last.name}: {last.state}{share}"
    return {"backfills": rows, "backfill": summary}


def _stamp(value: Any) -> str | None:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else None


# --------------------------------------------------------------------------------------------------
# readiness: a watch on the listener Deployments


def _listener_path(namespace: str, name: str) -> str:
    return f"apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/{PLURAL}/{name}"


DeploymentKey = tuple[str, str]  # namespace, WalListener name
#: a WalListener as last seen: uid, spec.suspend, conditions as (type, status, reason, message)
ListenerState = tuple[str, bool, tuple[tuple[str, str, str, str], ...]]


@dataclass(frozen=True)
class DeploymentView:
    """What the operator needs of a listener Deployment, kept in memory from the Deployment watch."""

    owner_uid: str
    generation: int | None
    status: tuple[tuple[str, Any], ...]  # status.observedGeneration, availableReplicas, updatedReplicas
    secrets_hash: str

    def as_object(self) -> dict[str, Any]:
        """In the shape :func:`_deployment_condition` reads."""
        return {"metadata": {"generation": self.generation}, "status": dict(self.status)}


_DEPLOYMENT_STATUS = ("observedGeneration", "availableReplicas", "updatedReplicas")


def _deployment_view(body: Mapping[str, Any]) -> tuple[DeploymentKey, DeploymentView] | None:
    meta = body.get("metadata") or {}
    ref = next((r for r in meta.get("ownerReferences") or [] if r.get("controller") and r.get("kind") == KIND), None)
    if ref is None or not meta.get("namespace"):
        return None
    status = body.get("status") or {}
    template = ((body.get("spec") or {}).get("template") or {}).get("metadata") or {}
    view = DeploymentView(
        owner_uid=str(ref.get("uid") or ""),
        generation=meta.get("generation"),
        status=tuple((key, status[key]) for key in _DEPLOYMENT_STATUS if key in status),
        secrets_hash=str((template.get("annotations") or {}).get(render.SECRETS_HASH_ANNOTATION, "")),
    )
    return (str(meta["namespace"]), str(ref.get("name"))), view


@kopf.index("apps", "v1", "deployments", labels={"app.kubernetes.io/managed-by": render.MANAGED_BY})
def listener_deployments(body: kopf.Body, **_: Any) -> dict[DeploymentKey, DeploymentView]:
    """The listener Deployments by owner, from the watch: readiness and the Secret hash without a GET."""
    found = _deployment_view(body)
    return dict([found]) if found is not None else {}


def _find_deployment(
    index: kopf.Index[DeploymentKey, DeploymentView] | None, namespace: str, name: str, uid: str
) -> DeploymentView | None:
    if index is None:
        return None
    for view in index.get((namespace, name), []):
        if view.owner_uid == uid:
            return view
    return None


def deployment_condition_due(conditions: Any, dep: Mapping[str, Any] | None, suspend: bool) -> st.Condition | None:
    """The DeploymentReady condition to write for the Deployment ``dep`` as last seen, or None when the
    status ``conditions`` already say it, or it is not yet this writer's to say: before the reconcile wrote
    DeploymentReady once (it writes the first one itself) and while the spec is invalid
    (``dep`` None: DeploymentMissing)."""
    spec_valid = st.get(conditions, st.SPEC_VALID)
    current = st.get(conditions, st.DEPLOYMENT_READY)
    if current is None or spec_valid is None or spec_valid.get("status") != "True":
        return None
    condition = _deployment_condition(suspend, dep)
    if (current.get("status"), current.get("reason"), current.get("message")) == (
        condition.status,
        condition.reason,
        condition.message,
    ):
        return None
    return condition


async def _write_deployment_condition(
    namespace: str, name: str, uid: str, dep: Mapping[str, Any] | None, logger: Logger
) -> None:
    """Read the resource now and write DeploymentReady for ``dep`` if its status does not say it yet (the status
    as read now: a write from what a watch delivered a moment ago could undo a newer one). The write carries the
    resourceVersion read, so an API server refuses it (409) when another writer came in between: read again."""
    for _attempt in range(3):
        resource = await kube().get(_listener_path(namespace, name))
        meta = (resource or {}).get("metadata") or {}
        if resource is None or meta.get("uid") != uid or meta.get("deletionTimestamp"):
            return
        status = resource.get("status") or {}
        condition = deployment_condition_due(
            status.get("conditions"), dep, bool((resource.get("spec") or {}).get("suspend"))
        )
        if condition is None:
            return
        body: dict[str, Any] = {
            "status": _status_patch(status.get("conditions"), status.get("observedGeneration"), [condition])
        }
        if meta.get("resourceVersion"):
            body["metadata"] = {"resourceVersion": meta["resourceVersion"]}
        try:
            await kube().request(
                "PATCH", f"{_listener_path(namespace, name)}/status", body, content_type="application/merge-patch+json"
            )
            return
        except KubeError as exc:
            if exc.status != 409:
                logger.warning("could not write the listener's readiness into %s: %s", name, exc)
                return
    logger.warning("could not write the listener's readiness into %s: it kept changing meanwhile", name)


@kopf.on.event(*RESOURCE)
async def listener_changed(
    *,
    type: str | None,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    name: str,
    namespace: str | None,
    uid: str,
    listener_deployments: kopf.Index[DeploymentKey, DeploymentView] | None = None,
    logger: Logger,
    **_: Any,
) -> None:
    """A status write (the reconcile's, the timer's) that says other than the Deployment as last seen about its
    readiness is put right: whichever of the two changes last, the status ends up saying the Deployment's state."""
    namespace = namespace or "default"
    if type == "DELETED" or meta.get("deletionTimestamp"):
        return
    view = _find_deployment(listener_deployments, namespace, name, uid)
    if view is None:  # not created yet, or deleted: the reconcile, the timer and the Deployment watch see to it
        return
    dep = view.as_object()
    if deployment_condition_due(status.get("conditions"), dep, bool(spec.get("suspend"))) is None:
        return
    await _write_deployment_condition(namespace, name, uid, dep, logger)


@kopf.index(*RESOURCE)
def listener_states(
    status: kopf.Status, spec: kopf.Spec, meta: kopf.Meta, uid: str, name: str, namespace: str | None, **_: Any
) -> dict[DeploymentKey, ListenerState]:
    """Each resource's uid, spec.suspend and conditions (type, status, reason, message), as last seen."""
    if meta.get("deletionTimestamp"):
        return {}
    conditions = tuple(
        (str(c.get("type")), str(c.get("status")), str(c.get("reason")), str(c.get("message")))
        for c in status.get("conditions") or []
    )
    return {(namespace or "default", name): (uid or "", bool(spec.get("suspend")), conditions)}


def _conditions_of(known: tuple[tuple[str, str, str, str], ...]) -> list[dict[str, str]]:
    return [{"type": t, "status": s, "reason": r, "message": m} for t, s, r, m in known]


@kopf.on.event("apps", "v1", "deployments", labels={"app.kubernetes.io/managed-by": render.MANAGED_BY})
async def deployment_changed(
    *,
    type: str | None,
    body: kopf.Body,
    namespace: str | None,
    listener_states: kopf.Index[DeploymentKey, tuple[str, bool, tuple[tuple[str, str, str, str], ...]]] | None = None,
    logger: Logger,
    **_: Any,
) -> None:
    """The pod's readiness (or the Deployment's disappearance) reaches the owner's status at once. The owner's
    status as last seen (an index from the WalListener watch) tells whether there is anything to write: the
    resource is read from the API only then."""
    refs = body.get("metadata", {}).get("ownerReferences") or []
    ref = next((r for r in refs if r.get("controller") and r.get("kind") == KIND), None)
    if ref is None or namespace is None:
        return
    owner_uid = str(ref.get("uid") or "")
    if type == "DELETED":  # deleted by someone: put it back at once
        await _restore_deployment(namespace, ref["name"], owner_uid, logger)
        return
    states: Iterable[ListenerState] = listener_states.get((namespace, ref["name"]), []) if listener_states else []
    known = next((k for k in states if k[0] == owner_uid), None)
    if known is None:
        return  # its owner is gone or being deleted
    if deployment_condition_due(_conditions_of(known[2]), body, known[1]) is None:
        return
    await _write_deployment_condition(namespace, ref["name"], owner_uid, body, logger)


async def _restore_deployment(namespace: str, name: str, uid: str, logger: Logger) -> None:
    resource = await kube().get(_listener_path(namespace, name))
    if resource is None or resource["metadata"].get("uid") != uid or resource["metadata"].get("deletionTimestamp"):
        return
    try:
        model = parse_spec(resource.get("spec") or {})
    except SpecError:
        return
    if model.suspend:
        await _write_deployment_condition(namespace, name, uid, None, logger)
        return
    try:
        secrets = await _read_secrets(model, namespace)
    except _NeedsPerson as exc:
        logger.warning("cannot re-create the listener Deployment of %s: %s", name, exc.message)
        await _write_deployment_condition(namespace, name, uid, None, logger)
        return
    owner = render.Owner(name, namespace, uid)
    await _keep_children(kopf.Body(resource), model, owner, secrets, None, logger)  # type: ignore[arg-type]
    # the new Deployment's own events bring its readiness


# --------------------------------------------------------------------------------------------------
# status timer: slot lag and wal_status; Secret changes roll the pod; a deleted Deployment comes back


@kopf.timer(*RESOURCE, interval=SETTINGS.status_interval, initial_delay=SETTINGS.status_interval)
async def watch_slot(
    *,
    body: kopf.Body,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    name: str,
    namespace: str | None,
    uid: str,
    patch: kopf.Patch,
    memo: kopf.Memo,
    claims: kopf.Index[ClaimKey, Claim] | None = None,
    listener_deployments: kopf.Index[DeploymentKey, DeploymentView] | None = None,
    logger: Logger,
    **_: Any,
) -> None:
    namespace = namespace or "default"
    conditions = status.get("conditions") or []
    spec_valid = st.get(conditions, st.SPEC_VALID)
    if spec_valid is None or spec_valid.get("status") != "True":
        return  # the reconcile has not succeeded once, or the spec is invalid: nothing to watch
    try:
        model = parse_spec(dict(spec))
    except SpecError:
        return
    if _conflict(model, _me(meta, uid, name, namespace), claims) is not None:
        return
    updates: list[st.Condition] = []
    extra: dict[str, Any] = {}
    slot: SlotState | None = None
    read = False
    keyless: list[str] = []
    secrets: Secrets | None = None
    try:
        secrets = await _read_secrets(model, namespace)
        conn = await db.connect(_database_config(model, secrets))
        async with conn:
            slot = await db.slot_status(conn, model.listener.slot_name)
            keyless = await db.tables_without_identity(conn, model.listener.publication_name)
            if model.listener.ddl.capture:  # a trigger dropped meanwhile comes back; one a DBA installs is seen
                updates.append(_ddl_condition(*await db.ddl_capture(conn, model, install=False)))
            read = True
            extra.update(_backfill_status(await db.backfill_states(conn, model.listener.slot_name)))
    except _NeedsPerson as exc:
        updates.append(st.Condition(st.DATABASE_REACHABLE, "Unknown", exc.reason, exc.message))
    except (DatabaseError, psycopg.OperationalError) as exc:
        updates.append(st.Condition(st.DATABASE_REACHABLE, "False", "Unreachable", db.first_line(exc)))
    if read:
        extra["slot"] = _slot_status(model.listener.slot_name, slot)
        updates.append(st.Condition(st.DATABASE_REACHABLE, "True", "Connected", ""))
        slot_ready, warning = _slot_condition(model.listener.slot_name, slot, st.get(conditions, st.SLOT_READY))
        if slot_ready is not None:
            updates.append(slot_ready)
        if warning:
            kopf.warn(body, reason="SlotMissing" if slot is None else "SlotLost", message=warning)
        _warn_retained(body, slot, model.alerts.retained_wal_bytes, memo)
        if status.get("publication"):
            extra["publication"] = {**status["publication"], "tablesWithoutIdentity": keyless}
        _warn_without_identity(body, model.listener.publication_name, keyless, memo)

    view = _find_deployment(listener_deployments, namespace, name, uid or "")
    if secrets is not None:
        await _keep_children(body, model, render.Owner(name, namespace, uid or ""), secrets, view, logger)
    if view is not None:  # readiness as the Deployment watch last saw it (a write lost in a race is put right)
        due = deployment_condition_due(conditions, view.as_object(), model.suspend)
        if due is not None:
            updates.append(due)

    # The status as this body has it decides whether there is anything to write; if there is, it is merged into
    # the status as it is now (the Deployment watch may have written since this body was read).
    if not _worth_writing(status, _status_patch(conditions, meta.get("generation"), updates, extra)):
        return
    fresh = await kube().get(_listener_path(namespace, name))
    current = (fresh or {}).get("status") or status
    update = _status_patch(current.get("conditions"), meta.get("generation"), updates, extra)
    if _worth_writing(current, update):
        for key, value in update.items():
            patch.status[key] = value


#: status.slot.checkedAt is refreshed at least this often when nothing else changed (seconds)
_CHECKED_AT_REFRESH = 60.0


def _worth_writing(current: Mapping[str, Any], update: Mapping[str, Any]) -> bool:
    """False when ``update`` only repeats what status already says (a write every interval for nothing
    would wake every watcher of the resource)."""
    old_slot = dict(current.get("slot") or {})
    new_slot = dict(update.get("slot") or old_slot)
    checked = old_slot.pop("checkedAt", None)
    new_slot.pop("checkedAt", None)
    if {k: v for k, v in new_slot.items() if v is not None} != old_slot:
        return True
    if any(current.get(key) != value for key, value in update.items() if key != "slot"):
        return True
    return checked is None or st.age(str(checked)) > max(_CHECKED_AT_REFRESH, SETTINGS.status_interval)


async def _keep_children(
    body: kopf.Body,
    model: WalListenerSpec,
    owner: render.Owner,
    secrets: Secrets,
    view: DeploymentView | None,
    logger: Logger,
) -> None:
    """Re-create a deleted Deployment; roll the pod when a referenced Secret changed. ``view``: the Deployment as
    the watch last saw it (None: not seen, read it from the API)."""
    if view is not None:
        secrets_hash: str | None = view.secrets_hash
    else:
        dep = await kube().get(_child_path("apis/apps/v1", "deployments", owner.namespace, child_name(owner.name)))
        secrets_hash = (
            None
            if dep is None
            else str((dep["spec"]["template"].get("metadata", {}).get("annotations") or {}).get(
                render.SECRETS_HASH_ANNOTATION, ""
            ))
        )  # fmt: skip
    if secrets_hash is not None:
        if secrets_hash == secrets.digest:
            return
        message = "a referenced Secret changed: rolling the listener pod"
        kopf.event(body, type="Normal", reason="SecretChanged", message=message)
    elif model.suspend:
        return
    try:
        await _apply_children(model, owner, secrets.digest, logger)
    except _ChildConflict as exc:
        logger.warning("%s", exc)


def _slot_condition(
    name: str, slot: SlotState | None, reported: Mapping[str, Any] | None
) -> tuple[st.Condition | None, str]:
    """SlotReady from the slot as read, and the message of the Warning event to post ('': none). None
    (leave SlotReady as the reconcile wrote it) while a slot that was never there is still to be created:
    the reconcile's own condition says why it is not yet; "disappeared" is said of a slot that existed."""
    if slot is None:
        existed = reported is not None and (
            reported.get("status") == "True" or reported.get("reason") in ("SlotMissing", "SlotLost")
        )
        if not existed:
            return None, ""
        missing = (
            f"replication slot {name} does not exist (dropped outside the operator); a new one starts at the "
            "current WAL position, so changes made meanwhile are not delivered"
        )
        return st.Condition(st.SLOT_READY, "False", "SlotMissing", missing), f"replication slot {name} disappeared"
    if slot.wal_status == "lost":
        msg = f"replication slot {slot.name} was invalidated (wal_status lost): changes were lost"
        return st.Condition(st.SLOT_READY, "False", "SlotLost", msg), msg
    exists = f"logical slot {slot.name} (pgoutput), wal_status {slot.wal_status or '-'}"
    return st.Condition(st.SLOT_READY, "True", "Exists", exists), ""


def _warning_due(memo: kopf.Memo, key: str, lasting: bool) -> bool:
    """Whether to post the Warning event ``key`` again for a problem that lasts (``lasting``): at once, then at
    most every 5 minutes while it lasts (the status timer runs every few seconds); reset when it is over."""
    if not lasting:
        memo[key] = 0.0
        return False
    last = float(memo.get(key, 0.0))
    if last and time.monotonic() - last < max(300.0, SETTINGS.status_interval):
        return False
    memo[key] = time.monotonic()
    return True


def _warn_retained(body: kopf.Body, slot: SlotState | None, threshold: int, memo: kopf.Memo) -> None:
    """A Warning event while the slot pins more WAL than the threshold."""
    lasting = slot is not None and bool(threshold) and slot.retained_wal_bytes > threshold
    if slot is not None and _warning_due(memo, "wal_warned_at", lasting):
        kopf.warn(
            body,
            reason="WALRetained",
            message=(
                f"slot {slot.name} holds back {st.human_bytes(slot.retained_wal_bytes)} of WAL "
                f"(threshold {st.human_bytes(threshold)}, wal_status {slot.wal_status}, active {slot.active}); "
                "the listener is behind or stopped"
            ),
        )


def _warn_without_identity(body: kopf.Body, publication: str, tables: list[str], memo: kopf.Memo) -> None:
    """A Warning event while the publication publishes updates of tables without a replica identity: the
    application's UPDATE and DELETE on them fail."""
    if _warning_due(memo, "identity_warned_at", bool(tables)):
        kopf.warn(
            body,
            reason="TableWithoutReplicaIdentity",
            message=(
                f"publication {publication} publishes updates/deletes of {', '.join(tables)}, which have no "
                "replica identity: the application's UPDATE and DELETE on them fail; give each a primary key or "
                "REPLICA IDENTITY FULL, or take them out of the publication"
            ),
        )


# --------------------------------------------------------------------------------------------------
# delete


@kopf.on.delete(*RESOURCE)
async def delete(
    *,
    body: kopf.Body,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    name: str,
    namespace: str | None,
    uid: str,
    patch: kopf.Patch,
    retry: int,
    claims: kopf.Index[ClaimKey, Claim] | None = None,
    logger: Logger,
    **_: Any,
) -> None:
    namespace = namespace or "default"
    # The children go first in any case (owner references would remove them too, but later), so
    # the listener lets go of the slot. Only children this resource owns: a name taken by another
    # resource's object (a Conflict) is never deleted.
    for api, plural, _kind in _CHILDREN:
        path = _child_path(api, plural, namespace, child_name(name))
        try:
            obj = await kube().get(path)
            if obj is not None and _controller_uid(obj) == uid:
                await kube().delete(path, propagation="Foreground")
        except KubeError as exc:
            raise kopf.TemporaryError(f"cannot delete {path}: {exc}", delay=10) from None

    try:
        model = parse_spec(dict(spec))
    except SpecError:
        logger.info("invalid spec: nothing was provisioned, nothing to clean up")
        return
    if model.reclaim_policy is ReclaimPolicy.RETAIN:
        logger.info(
            "reclaimPolicy Retain: slot %s and publication %s are kept",
            model.listener.slot_name,
            model.listener.publication_name,
        )
        return
    reason = _conflict(model, _me(meta, uid, name, namespace), claims)
    cond = st.get(status.get("conditions"), st.CONFLICT)
    if reason is not None or (cond is not None and cond.get("status") == "True"):
        logger.info("this resource never owned its slot/publication (conflict): nothing to drop")
        return

    owner = render.Owner(name=name, namespace=namespace, uid=uid or "")
    try:
        secrets = await _read_secrets(model, namespace)
        conn = await db.connect(_database_config(model, secrets))
        async with conn:
            slot = await db.drop_slot(conn, model.listener.slot_name)
            if slot is not None and slot.active:
                msg = f"waiting for replication slot {slot.name} to become inactive (pid {slot.active_pid})"
                _write(patch, status, meta.get("generation"), [st.Condition(st.SLOT_READY, "False", "Deleting", msg)])
                raise kopf.TemporaryError(msg, delay=SETTINGS.delete_poll)
            dropped = await db.drop_publication(conn, model.listener.publication_name, owner)
            outcome, note = await remove_capture(conn) if model.listener.ddl.capture else ("", "")
    except (_NeedsPerson, DatabaseError, psycopg.OperationalError) as exc:
        msg = f"cannot drop slot/publication yet: {db.first_line(exc)}; set reclaimPolicy: Retain to skip"
        raise kopf.TemporaryError(msg, delay=min(5.0 * 2**retry, 60.0)) from None
    logger.info(
        "dropped replication slot %s%s",
        model.listener.slot_name,
        f" and publication {model.listener.publication_name}" if dropped else "",
    )
    if note:  # the trigger is the database's: kept while another slot may need it; never blocks the delete
        logger.info("%s", note)
        reason = {"removed": "DDLCaptureRemoved", "kept": "DDLCaptureKept", "failed": "DDLCaptureFailed"}[outcome]
        kopf.event(body, type="Warning" if outcome == "failed" else "Normal", reason=reason, message=note)
