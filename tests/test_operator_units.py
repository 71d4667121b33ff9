"""The operator's decisions that need no cluster: what the status timer says of a slot it cannot find."""

from __future__ import annotations

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
