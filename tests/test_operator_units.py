"""The operator's decisions that need no cluster: what the status timer says of a slot it cannot find, how big
the listener pod is and the in-flight bound derived from it."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from listener.catalog import SlotState
from wal_operator.handlers import _slot_condition


def test_slot_missing_is_a_warning_about_a_slot_that_existed() -> None:
    """The status timer's decision for a slot it cannot find (the cluster test above covers a slot never
    created; a slot dropped under a running operator is told apart by the SlotReady it had)."""
    assert _slot_condition("s1", None, None) == (None, "")  # never checked: the reconcile's step says why
    for earlier in ({"status": "False", "reason": "Refused"}, {"status": "Unknown", "reason": "Pending"}):
        assert _slot_condition("s1", None, earlier) == (None, "")
    for earlier in ({"status": "True", "reason": "Created"}, {"status": "False", "reason": "SlotMissing"}):
        condition, warning = _slot_condition("s1", None, earlier)
        assert condition is not None and (condition.status, condition.reason) == ("False", "SlotMissing")
        assert "dropped outside the operator" in condition.message and warning == "replication slot s1 disappeared"
    lost = SlotState(name="s1", plugin="pgoutput", slot_type="logical", database="d", active=False, active_pid=None,
                     confirmed_flush_lsn=0, restart_lsn=0, wal_status="lost", safe_wal_size=None, current_lsn=0)
    condition, warning = _slot_condition("s1", lost, {"status": "True"})
    assert condition is not None and condition.reason == "SlotLost" and "invalidated" in warning


def test_every_ddl_capture_problem_is_its_own_condition_reason() -> None:
    """Each reason listener.ddl gives for DDL capture not working reaches DDLCapture as it is (the reference docs
    list the reasons the handler names)."""
    from itertools import product

    from listener.ddl import CaptureState
    from wal_operator.handlers import _ddl_condition

    seen = set()
    for superuser, function, current, triggers, enabled in product((True, False), (True, False), (True, False),
                                                                   (0, 1, 2), (0, 1, 2)):
        reason, problem = CaptureState(superuser, function, current, triggers, min(enabled, triggers)).problem("u", "d")
        condition = _ddl_condition(reason, problem)
        assert condition.reason == (reason or "Installed"), (reason, problem)
        seen.add(condition.reason)
    assert seen == {"Installed", "NotInstalled", "SuperuserMissing", "Outdated", "Disabled"}


# -- the pod's size: resources by default, listener.maxInFlightBytes derived from the memory limit ----------

MINIMAL_SPEC = {
    "listener": {"slotName": "s"},
    "database": {"name": "d", "user": "u"},
    "publisher": {"type": "nats", "topic": "t", "nats": {"address": "nats://n:4222"}},
}


def _rendered(pod: dict[str, Any] | None = None, **listener: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the listener container, the rendered config.yml) of a minimal resource."""
    import yaml

    from wal_operator.render import Owner, configmap, deployment
    from wal_operator.spec import parse_spec

    spec = parse_spec({**MINIMAL_SPEC, "listener": {"slotName": "s", **listener}, "pod": pod or {}})
    owner = Owner("shop", "ns", "uid-1")
    container = deployment(spec, owner, "img")["spec"]["template"]["spec"]["containers"][0]
    return container, yaml.safe_load(configmap(spec, owner)["data"]["config.yml"])


def test_the_bound_is_a_quarter_of_the_memory_above_the_base() -> None:
    from wal_operator.sizing import BASE_MEMORY, MiB, max_in_flight_bytes

    assert max_in_flight_bytes(512 * MiB) == 104 * MiB  # the default limit
    assert max_in_flight_bytes(256 * MiB) == 40 * MiB
    assert max_in_flight_bytes(1024 * MiB) == 232 * MiB
    assert max_in_flight_bytes(4 * 1024 * MiB) == 1000 * MiB
    assert max_in_flight_bytes(128 * MiB) == 8 * MiB
    assert max_in_flight_bytes(BASE_MEMORY) == 1 * MiB  # never under the listener's own minimum
    assert max_in_flight_bytes(1000 * 1000 * 1000) % MiB == 0  # whole MiB, also for a decimal limit
    for limit in range(256 * MiB, 8192 * MiB, 64 * MiB):  # the base and 3 times the bound fit with room
        assert BASE_MEMORY + 3 * max_in_flight_bytes(limit) <= 0.85 * limit


@pytest.mark.parametrize(
    ("value", "expected"),
    [("512Mi", 512 * 2**20), ("1Gi", 2**30), ("1G", 10**9), ("1.5Gi", 1.5 * 2**30), ("129e6", 129 * 10**6),
     ("128974848", 128974848), (536870912, 536870912), ("100m", 0.1), ("500k", 500_000), ("2Ti", 2 * 2**40)],
)
def test_kubernetes_quantities(value: str | int, expected: float) -> None:
    from wal_operator.sizing import quantity

    assert quantity(value) == Decimal(str(expected))


@pytest.mark.parametrize("value", ["512MB", "lots", "", "1.2.3Gi", "Gi", "0x10"])
def test_a_memory_value_that_is_not_a_quantity_is_refused_naming_the_key(value: str) -> None:
    from wal_operator.spec import SpecError

    with pytest.raises(SpecError, match=r"spec\.pod\.resources: limits\.memory: .* is not a quantity"):
        _rendered({"resources": {"limits": {"memory": value}}})


def test_a_memory_limit_under_128mi_is_refused() -> None:
    from wal_operator.spec import SpecError

    with pytest.raises(SpecError, match=r"spec\.pod\.resources: limits\.memory: '100Mi' is less than the 128Mi"):
        _rendered({"resources": {"limits": {"memory": "100Mi"}}})
    _rendered({"resources": {"limits": {"memory": "128Mi"}}})


def test_the_listener_pod_gets_resources_and_a_bound_derived_from_its_limit() -> None:
    from wal_operator.sizing import MiB

    container, config = _rendered()
    assert container["resources"] == {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}}
    assert config["listener"]["maxInFlightBytes"] == 104 * MiB
    # a user's limit: the bound follows it; the other defaults stay
    container, config = _rendered({"resources": {"limits": {"memory": "1Gi", "cpu": "2"}}})
    assert container["resources"] == {"requests": {"cpu": "100m", "memory": "256Mi"},
                                      "limits": {"memory": "1Gi", "cpu": "2"}}
    assert config["listener"]["maxInFlightBytes"] == 232 * MiB
    # a request over the default limit raises the limit; a limit under the default request lowers the request
    container, config = _rendered({"resources": {"requests": {"memory": "2Gi"}}})
    assert container["resources"]["limits"]["memory"] == "2Gi"
    assert config["listener"]["maxInFlightBytes"] == (2048 - 96) // 4 * MiB
    container, config = _rendered({"resources": {"limits": {"memory": "200Mi"}}})
    assert container["resources"]["requests"] == {"cpu": "100m", "memory": "200Mi"}
    assert config["listener"]["maxInFlightBytes"] == 26 * MiB


def test_a_bound_the_user_set_is_kept() -> None:
    from wal_operator.sizing import MiB

    for given, expected in (("32Mi", 32 * MiB), (300 * MiB, 300 * MiB), ("64Mi", 64 * MiB)):
        container, config = _rendered({"resources": {"limits": {"memory": "256Mi"}}}, maxInFlightBytes=given)
        assert config["listener"]["maxInFlightBytes"] == expected  # also the listener's default, written out
        assert container["resources"]["limits"] == {"memory": "256Mi"}

def _conditions(deployment: tuple[str, str] | None, spec_valid: str = "True") -> list[dict[str, str]]:
    found = [{"type": "SpecValid", "status": spec_valid, "reason": "Valid", "message": ""}]
    if deployment is not None:
        from wal_operator.handlers import _deployment_condition

        status, reason = deployment
        message = next(
            c.message
            for c in (
                _deployment_condition(False, {"status": {"availableReplicas": 1}}),
                _deployment_condition(False, {"status": {}}),
                _deployment_condition(False, None),
                _deployment_condition(True, None),
            )
            if c.reason == reason
        )
        found.append({"type": "DeploymentReady", "status": status, "reason": reason, "message": message})
    return found


def test_deployment_readiness_is_written_only_when_the_status_says_otherwise() -> None:
    """Whether a Deployment event (or a WalListener event, or the status timer) has a DeploymentReady to write:
    only when the status says something else than the Deployment as last seen, and only once the reconcile wrote
    one (it writes the first itself) and while the spec is valid."""
    from wal_operator.handlers import deployment_condition_due

    ready = {"metadata": {"generation": 1}, "status": {"observedGeneration": 1, "availableReplicas": 1}}
    not_ready = {"metadata": {"generation": 1}, "status": {"observedGeneration": 1}}
    rolling = {"metadata": {"generation": 2}, "status": {"observedGeneration": 1, "availableReplicas": 1}}

    due = deployment_condition_due(_conditions(("False", "PodNotReady")), ready, False)
    assert due is not None and (due.status, due.reason) == ("True", "PodReady")
    assert deployment_condition_due(_conditions(("True", "PodReady")), ready, False) is None  # says it already
    due = deployment_condition_due(_conditions(("True", "PodReady")), not_ready, False)
    assert due is not None and due.reason == "PodNotReady"
    due = deployment_condition_due(_conditions(("True", "PodReady")), rolling, False)
    assert due is not None and due.reason == "RollingOut"
    due = deployment_condition_due(_conditions(("True", "PodReady")), None, False)  # deleted
    assert due is not None and due.reason == "DeploymentMissing"
    due = deployment_condition_due(_conditions(("True", "PodReady")), None, True)
    assert due is not None and due.reason == "Suspended"
    # not this writer's to say: the reconcile has not written DeploymentReady yet, or the spec is invalid
    assert deployment_condition_due(_conditions(None), ready, False) is None
    assert deployment_condition_due(_conditions(("False", "PodNotReady"), spec_valid="False"), ready, False) is None
    assert deployment_condition_due(None, ready, False) is None


def test_the_deployment_index_keeps_what_readiness_and_the_secret_hash_need() -> None:
    """A listener Deployment as the index keeps it: by its owner, with the fields the readiness reads."""
    from wal_operator.handlers import _deployment_condition, _deployment_view
    from wal_operator.render import SECRETS_HASH_ANNOTATION

    body = {
        "metadata": {
            "name": "a-wal-listener",
            "namespace": "cdc",
            "generation": 3,
            "ownerReferences": [
                {"kind": "ConfigMap", "name": "x", "uid": "u0"},
                {"kind": "WalListener", "name": "a", "uid": "u1", "controller": True},
            ],
        },
        "spec": {"template": {"metadata": {"annotations": {SECRETS_HASH_ANNOTATION: "abc"}}}},
        "status": {"observedGeneration": 3, "availableReplicas": 1, "updatedReplicas": 1, "replicas": 1},
    }
    found = _deployment_view(body)
    assert found is not None
    key, view = found
    assert key == ("cdc", "a") and view.owner_uid == "u1" and view.secrets_hash == "abc"
    assert _deployment_condition(False, view.as_object()) == _deployment_condition(False, body)
    assert _deployment_view({"metadata": {"name": "b", "namespace": "cdc"}}) is None  # not a listener's
