"""Status conditions: one per reconcile step plus ``Ready``, Kubernetes-style.

``lastTransitionTime`` changes only when a condition's status does, so it answers "since when".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

# condition types, in the order the reconcile goes through them
SPEC_VALID = "SpecValid"
DATABASE_REACHABLE = "DatabaseReachable"
PUBLICATION_READY = "PublicationReady"
SLOT_READY = "SlotReady"
DEPLOYMENT_READY = "DeploymentReady"
CONFLICT = "Conflict"
#: spec.listener.ddl.capture: whether the DDL event trigger is in place (not a step: Ready is about the rows)
DDL_CAPTURE = "DDLCapture"
READY = "Ready"
STEPS = (SPEC_VALID, DATABASE_REACHABLE, PUBLICATION_READY, SLOT_READY, DEPLOYMENT_READY)

Status = Literal["True", "False", "Unknown"]


@dataclass(frozen=True)
class Condition:
    type: str
    status: Status
    reason: str
    message: str = ""


_STAMP = "%Y-%m-%dT%H:%M:%SZ"


def now() -> str:
    return datetime.now(UTC).strftime(_STAMP)


def age(stamp: str) -> float:
    """Seconds since ``stamp`` (as :func:`now` writes it); infinite for a stamp it cannot read."""
    try:
        then = datetime.strptime(stamp, _STAMP).replace(tzinfo=UTC)
    except ValueError:
        return float("inf")
    return (datetime.now(UTC) - then).total_seconds()


def merge(
    current: Iterable[Mapping[str, Any]] | None,
    updates: Iterable[Condition],
    generation: int | None,
    at: str | None = None,
) -> list[dict[str, Any]]:
    """The condition list with ``updates`` applied; the rest is kept as it was."""
    stamp = at or now()
    by_type: dict[str, dict[str, Any]] = {str(c["type"]): dict(c) for c in current or () if "type" in c}
    for cond in updates:
        old = by_type.get(cond.type)
        entry: dict[str, Any] = {
            "type": cond.type,
            "status": cond.status,
            "reason": cond.reason,
            "message": cond.message,
            "lastTransitionTime": old["lastTransitionTime"]
            if old is not None and old.get("status") == cond.status and old.get("lastTransitionTime")
            else stamp,
        }
        if generation is not None:
            entry["observedGeneration"] = generation
        by_type[cond.type] = entry
    order = {t: i for i, t in enumerate((READY, CONFLICT, *STEPS))}
    return sorted(by_type.values(), key=lambda c: (order.get(c["type"], 99), c["type"]))


def get(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    for cond in conditions or ():
        if cond.get("type") == type_:
            return cond
    return None


def ready_from_steps(conditions: list[dict[str, Any]]) -> Condition:
    """Ready is True when every step is; otherwise it repeats the first step that is not."""
    conflict = get(conditions, CONFLICT)
    if conflict is not None and conflict.get("status") == "True":
        return Condition(READY, "False", "Conflict", str(conflict.get("message", "")))
    for step in STEPS:
        cond = get(conditions, step)
        if cond is None or cond.get("status") != "True":
            reason = str(cond.get("reason", "Pending")) if cond else "Pending"
            message = str(cond.get("message", "")) if cond else f"{step} not checked yet"
            return Condition(READY, "False", reason, message)
    return Condition(READY, "True", "ListenerRunning", "publication, slot and listener pod are ready")


def human_bytes(value: int) -> str:
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{value}B"  # pragma: no cover
