"""kopf handlers: one level-based reconcile, a status timer, and a finalizer for clean deletes.

Errors are sorted by who can fix them:

* the spec is wrong (:class:`SpecError`) -> condition False with the message, ``PermanentError``:
  no retries until the resource changes;
* a person must act outside the spec (privileges, ``wal_level``, a missing Secret, a conflict) ->
  condition False with the message, retried slowly (``WAL_OPERATOR_SLOW_RETRY``);
* the database is unreachable -> condition False, retried with exponential backoff.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kopf
import psycopg

from wal_operator import db, render
from wal_operator import status as st
from wal_operator.kube import KubeClient, KubeError, relogin_service_account
from wal_operator.settings import SETTINGS
from wal_operator.spec import (
    API_GROUP,
    API_VERSION,
    PLURAL,
    ReclaimPolicy,
    SpecError,
    WalListenerSpec,
    child_name,
    parse_spec,
)

RESOURCE = (API_GROUP, API_VERSION, PLURAL)
FINALIZER = f"{API_GROUP}/cleanup"
LOG = logging.getLogger("wal_operator")


class _State:
    credentials: kopf.ConnectionInfo | None = None
    client: KubeClient | None = None
    closed: bool = False  # after the operator's cleanup: no new connections


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


def _write(
    patch: kopf.Patch,
    status: Mapping[str, Any],
    generation: int | None,
    conditions: list[st.Condition],
    extra: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    merged = st.merge(status.get("conditions"), conditions, generation)
    merged = st.merge(merged, [st.ready_from_steps(merged)], generation)
    patch.status["conditions"] = merged
    ready = st.get(merged, st.READY)
    phase = "Ready" if ready and ready.get("status") == "True" else str(ready.get("reason") if ready else "Pending")
    patch.status["phase"] = phase
    if generation is not None:
        patch.status["observedGeneration"] = generation
    for key, value in (extra or {}).items():
        patch.status[key] = value
    return merged


def _slot_status(slot: db.SlotState) -> dict[str, Any]:
    return {
        "name": slot.name,
        "exists": slot.exists,
        "active": slot.active,
        "confirmedLSN": slot.confirmed_lsn,
        "restartLSN": slot.restart_lsn,
        "walStatus": slot.wal_status,
        "retainedWALBytes": slot.retained_wal_bytes,
        "lagBytes": slot.lag_bytes,
        "lag": st.human_bytes(slot.lag_bytes),
        "checkedAt": st.now(),
    }


async def _secrets(spec: WalListenerSpec, namespace: str) -> dict[tuple[str, ...], str]:
    """The secret values the operator itself needs to log in to the database."""
    values: dict[tuple[str, ...], str] = {}
    for path, ref in spec.secret_refs().items():
        if path[0] != "database":
            continue
        try:
            values[path] = await kube().read_secret_key(namespace, ref.name, ref.key)
        except KeyError as exc:
            raise _NeedsPerson("SecretMissing", f"{exc.args[0]} (spec.{'.'.join(path)}SecretRef)") from None
    return values


class _NeedsPerson(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _deployment_condition(spec: WalListenerSpec, dep: Mapping[str, Any] | None) -> st.Condition:
    if spec.suspend:
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


# --------------------------------------------------------------------------------------------------
# reconcile


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE)
async def reconcile(
    *,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    name: str,
    namespace: str | None,
    uid: str,
    patch: kopf.Patch,
    retry: int,
    claims: kopf.Index[ClaimKey, Claim] | None = None,
    logger: logging.Logger | logging.LoggerAdapter[Any],
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
        raise kopf.PermanentError(f"invalid spec: {exc}") from None
    spec_ok = st.Condition(st.SPEC_VALID, "True", "Valid", "the spec renders a valid listener config")

    # 2. nobody else owns this slot or publication
    me = _me(meta, uid, name, namespace)
    reason = _conflict(model, me, claims)
    if reason is not None:
        fail([spec_ok, st.Condition(st.CONFLICT, "True", "SlotClaimed", reason)])
        raise kopf.TemporaryError(reason, delay=SETTINGS.slow_retry)
    no_conflict = st.Condition(st.CONFLICT, "False", "NoConflict", "")

    owner = render.Owner(name=name, namespace=namespace, uid=uid or "")
    # 3. the database: publication and slot
    try:
        secrets = await _secrets(model, namespace)
        config = model.to_config(secrets)
        conn = await db.connect(config.database)
    except _NeedsPerson as exc:
        fail([spec_ok, no_conflict, st.Condition(st.DATABASE_REACHABLE, "Unknown", exc.reason, exc.message)])
        raise kopf.TemporaryError(exc.message, delay=min(30.0, SETTINGS.slow_retry)) from None
    except db.DatabaseUnreachable as exc:
        delay = min(5.0 * 2**retry, SETTINGS.slow_retry)
        fail(
            [
                spec_ok,
                no_conflict,
                st.Condition(st.DATABASE_REACHABLE, "False", "Unreachable", f"{exc}; retrying in {delay:.0f}s"),
            ]
        )
        raise kopf.TemporaryError(str(exc), delay=delay) from None
    except db.DatabaseRefused as exc:
        fail([spec_ok, no_conflict, st.Condition(st.DATABASE_REACHABLE, "False", "LoginRefused", str(exc))])
        raise kopf.TemporaryError(str(exc), delay=SETTINGS.slow_retry) from None

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
            done.append(
                st.Condition(
                    st.PUBLICATION_READY,
                    "True",
                    "Updated" if pub.changed else "UpToDate",
                    f"publication {pub.name}: " + ("all tables" if pub.all_tables else ", ".join(pub.tables)),
                )
            )
            slot = await db.ensure_slot(conn, model.listener.slot_name, model.database.name)
            done.append(
                st.Condition(
                    st.SLOT_READY,
                    "True",
                    "Created" if slot.created else "Exists",
                    f"logical slot {slot.name} (pgoutput), wal_status {slot.wal_status or '-'}",
                )
            )
    except SpecError as exc:
        fail([st.Condition(st.SPEC_VALID, "False", "InvalidSpec", str(exc)), no_conflict, reachable])
        raise kopf.PermanentError(str(exc)) from None
    except db.Conflict as exc:
        fail([*done, st.Condition(st.CONFLICT, "True", "ClaimedInDatabase", str(exc))])
        raise kopf.TemporaryError(str(exc), delay=SETTINGS.slow_retry) from None
    except db.DatabaseRefused as exc:
        step = st.SLOT_READY if any(c.type == st.PUBLICATION_READY for c in done) else st.PUBLICATION_READY
        fail([*done, st.Condition(step, "False", "Refused", str(exc))])
        raise kopf.TemporaryError(str(exc), delay=SETTINGS.slow_retry) from None
    except db.DatabaseUnreachable as exc:
        fail([*done, st.Condition(st.DATABASE_REACHABLE, "False", "Unreachable", str(exc))])
        raise kopf.TemporaryError(str(exc), delay=min(5.0 * 2**retry, SETTINGS.slow_retry)) from None
    except psycopg.OperationalError as exc:
        msg = f"lost the connection to PostgreSQL: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc}"
        fail([*done, st.Condition(st.DATABASE_REACHABLE, "False", "Unreachable", msg)])
        raise kopf.TemporaryError(msg, delay=min(5.0 * 2**retry, SETTINGS.slow_retry)) from None

    # 4. the children
    dep = await _apply_children(model, owner, logger)
    done.append(_deployment_condition(model, dep))
    _write(
        patch,
        status,
        generation,
        done,
        {
            "configHash": render.config_hash(model),
            "slot": _slot_status(slot),
            "publication": {
                "name": pub.name,
                "allTables": pub.all_tables,
                "tables": pub.tables,
                "createdByOperator": pub.created_by_operator,
            },
        },
    )


async def _apply_children(
    model: WalListenerSpec, owner: render.Owner, logger: logging.Logger | logging.LoggerAdapter[Any]
) -> dict[str, Any] | None:
    ns = owner.namespace
    try:
        await kube().apply(f"api/v1/namespaces/{ns}/configmaps", render.configmap(model, owner))
        dep = await kube().apply(
            f"apis/apps/v1/namespaces/{ns}/deployments", render.deployment(model, owner, SETTINGS.listener_image)
        )
        await kube().apply(f"api/v1/namespaces/{ns}/services", render.service(model, owner))
    except KubeError as exc:
        if exc.status in (400, 403, 422):
            logger.error("the API server refused a child of this resource: %s", exc)
        raise kopf.TemporaryError(
            f"could not write the listener's Deployment/ConfigMap/Service: {exc}", delay=30
        ) from None
    return dep


# --------------------------------------------------------------------------------------------------
# status timer: slot lag, wal_status, pod readiness


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
    generation = meta.get("generation")
    updates: list[st.Condition] = []
    extra: dict[str, Any] = {}
    slot: db.SlotState | None = None
    try:
        secrets = await _secrets(model, namespace)
        conn = await db.connect(model.to_config(secrets).database)
        async with conn:
            slot = await db.slot_status(conn, model.listener.slot_name)
    except (_NeedsPerson, db.DatabaseUnreachable, db.DatabaseRefused, psycopg.OperationalError) as exc:
        updates.append(st.Condition(st.DATABASE_REACHABLE, "False", "Unreachable", str(exc).splitlines()[0]))
    if slot is not None:
        extra["slot"] = _slot_status(slot)
        updates.append(st.Condition(st.DATABASE_REACHABLE, "True", "Connected", ""))
        updates.append(_slot_condition(body, slot))
        _warn_retained(body, slot, model.alerts.retained_wal_bytes, memo)

    try:
        dep = await kube().get(f"apis/apps/v1/namespaces/{namespace}/deployments/{child_name(name)}")
    except KubeError:
        dep = None
    owner = render.Owner(name=name, namespace=namespace, uid=uid or "")
    if dep is None and not model.suspend:
        dep = await _apply_children(model, owner, logging.getLogger("wal_operator"))  # someone deleted it
    updates.append(_deployment_condition(model, dep))
    _write(patch, status, generation, updates, extra)


def _slot_condition(body: kopf.Body, slot: db.SlotState) -> st.Condition:
    if not slot.exists:
        kopf.warn(body, reason="SlotMissing", message=f"replication slot {slot.name} disappeared")
        return st.Condition(
            st.SLOT_READY,
            "False",
            "SlotMissing",
            f"replication slot {slot.name} does not exist (dropped outside the operator); a new one starts at the "
            "current WAL position, so changes made meanwhile are not delivered",
        )
    if slot.wal_status == "lost":
        msg = f"replication slot {slot.name} was invalidated (wal_status lost): changes were lost"
        kopf.warn(body, reason="SlotLost", message=msg)
        return st.Condition(st.SLOT_READY, "False", "SlotLost", msg)
    return st.Condition(
        st.SLOT_READY, "True", "Exists", f"logical slot {slot.name} (pgoutput), wal_status {slot.wal_status or '-'}"
    )


def _warn_retained(body: kopf.Body, slot: db.SlotState, threshold: int, memo: kopf.Memo) -> None:
    """A Warning event while the slot pins more WAL than the threshold (at most every 5 minutes)."""
    if not (slot.exists and threshold and slot.retained_wal_bytes > threshold):
        memo["wal_warned_at"] = 0.0
        return
    last = float(memo.get("wal_warned_at", 0.0))
    if last and time.monotonic() - last < max(300.0, SETTINGS.status_interval):
        return
    memo["wal_warned_at"] = time.monotonic()
    kopf.warn(
        body,
        reason="WALRetained",
        message=(
            f"slot {slot.name} holds back {st.human_bytes(slot.retained_wal_bytes)} of WAL "
            f"(threshold {st.human_bytes(threshold)}, wal_status {slot.wal_status}, active {slot.active}); "
            "the listener is behind or stopped"
        ),
    )


# --------------------------------------------------------------------------------------------------
# delete


@kopf.on.delete(*RESOURCE)
async def delete(
    *,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    name: str,
    namespace: str | None,
    uid: str,
    patch: kopf.Patch,
    retry: int,
    claims: kopf.Index[ClaimKey, Claim] | None = None,
    logger: logging.Logger | logging.LoggerAdapter[Any],
    **_: Any,
) -> None:
    namespace = namespace or "default"
    # The children go first in any case (owner references would remove them too, but later), so
    # the listener lets go of the slot.
    for path in (
        f"apis/apps/v1/namespaces/{namespace}/deployments/{child_name(name)}",
        f"api/v1/namespaces/{namespace}/services/{child_name(name)}",
        f"api/v1/namespaces/{namespace}/configmaps/{child_name(name)}",
    ):
        try:
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
        secrets = await _secrets(model, namespace)
        conn = await db.connect(model.to_config(secrets).database)
        async with conn:
            slot = await db.drop_slot(conn, model.listener.slot_name)
            if slot.active:
                msg = f"waiting for replication slot {slot.name} to become inactive (pid {slot.active_pid})"
                _write(patch, status, meta.get("generation"), [st.Condition(st.SLOT_READY, "False", "Deleting", msg)])
                raise kopf.TemporaryError(msg, delay=SETTINGS.delete_poll)
            dropped = await db.drop_publication(conn, model.listener.publication_name, owner)
    except (_NeedsPerson, db.DatabaseUnreachable, db.DatabaseRefused, psycopg.OperationalError) as exc:
        msg = f"cannot drop slot/publication yet: {str(exc).splitlines()[0]}; set reclaimPolicy: Retain to skip"
        raise kopf.TemporaryError(msg, delay=min(5.0 * 2**retry, 60.0)) from None
    logger.info(
        "dropped replication slot %s%s",
        model.listener.slot_name,
        f" and publication {model.listener.publication_name}" if dropped else "",
    )
