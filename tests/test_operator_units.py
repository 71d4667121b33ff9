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
