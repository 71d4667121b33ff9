"""Operator settings from the environment (the Helm chart sets them)."""

from __future__ import annotations

import os
from dataclasses import dataclass


def _float(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    try:
        return float(value) if value else default
    except ValueError:
        raise SystemExit(f"wal-operator: {name}={value!r} is not a number of seconds") from None


@dataclass(frozen=True)
class OperatorSettings:
    #: image of listener pods when a WalListener does not name one
    listener_image: str
    #: how often slot lag, wal_status and the pod's readiness are read into status (seconds)
    status_interval: float
    #: how long to wait between checks while a deleted resource's slot is still active (seconds)
    delete_poll: float
    #: how long between retries when a person must act (privileges, wal_level, a conflict) (seconds)
    slow_retry: float

    @classmethod
    def from_env(cls) -> OperatorSettings:
        return cls(
            listener_image=os.environ.get("WAL_OPERATOR_LISTENER_IMAGE", "ghcr.io/wal-listener/wal-listener:0.1.0"),
            status_interval=_float("WAL_OPERATOR_STATUS_INTERVAL", 30.0),
            delete_poll=_float("WAL_OPERATOR_DELETE_POLL", 5.0),
            slow_retry=_float("WAL_OPERATOR_SLOW_RETRY", 300.0),
        )


SETTINGS = OperatorSettings.from_env()
