"""The restricted Pod Security Standard checker (tests/support/pod_security.py) on pods that comply and
pods that each break one rule, so that it cannot pass everything."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.support.pod_security import restricted_violations

Pod = dict[str, Any]


def _strict() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def compliant() -> Pod:
    """A pod with an init, a regular and an ephemeral container that the restricted profile admits."""
    return {
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "initContainers": [{"name": "init", "image": "x", "securityContext": _strict()}],
        "containers": [
            {
                "name": "app",
                "image": "x",
                "ports": [{"name": "http", "containerPort": 8080}],
                "securityContext": {**_strict(), "readOnlyRootFilesystem": True},
            }
        ],
        "ephemeralContainers": [{"name": "debug", "image": "x", "securityContext": _strict()}],
        "volumes": [
            {"name": "tmp", "emptyDir": {}},
            {"name": "config", "configMap": {"name": "c"}},
            {"name": "creds", "secret": {"secretName": "s"}},
        ],
    }


def _set(path: str, value: Any) -> Callable[[Pod], None]:
    """A mutation setting a dotted path below the pod spec ("containers.0.securityContext.privileged")."""

    def mutate(pod: Pod) -> None:
        *parents, last = path.split(".")
        node: Any = pod
        for key in parents:
            node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
        if last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


def _drop(path: str) -> Callable[[Pod], None]:
    def mutate(pod: Pod) -> None:
        *parents, last = path.split(".")
        node: Any = pod
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        del node[last]

    return mutate


BAD: dict[str, tuple[Callable[[Pod], None], str]] = {
    "host-network": (_set("hostNetwork", True), "spec.hostNetwork"),
    "host-pid": (_set("hostPID", True), "spec.hostPID"),
    "host-ipc": (_set("hostIPC", True), "spec.hostIPC"),
    "privileged": (_set("containers.0.securityContext.privileged", True), "containers[app].securityContext.privileged"),
    "add-sys-admin": (_set("containers.0.securityContext.capabilities.add", ["SYS_ADMIN"]), "SYS_ADMIN"),
    "add-chown": (_set("initContainers.0.securityContext.capabilities.add", ["CHOWN"]), "initContainers[init]"),
    "no-drop-all": (_set("containers.0.securityContext.capabilities.drop", ["NET_RAW"]), "capabilities.drop"),
    "no-capabilities": (_drop("ephemeralContainers.0.securityContext.capabilities"), "ephemeralContainers[debug]"),
    "host-path": (_set("volumes.0", {"name": "host", "hostPath": {"path": "/"}}), "volumes[host]: hostPath"),
    "nfs-volume": (_set("volumes.1", {"name": "share", "nfs": {"server": "s", "path": "/"}}), "nfs volumes"),
    "host-port": (_set("containers.0.ports.0.hostPort", 80), "containers[app].ports[http].hostPort"),
    "proc-mount": (_set("containers.0.securityContext.procMount", "Unmasked"), "procMount"),
    "unsafe-sysctl": (_set("securityContext.sysctls", [{"name": "kernel.msgmax", "value": "1"}]), "kernel.msgmax"),
    "seccomp-unconfined": (
        _set("containers.0.securityContext.seccompProfile", {"type": "Unconfined"}),
        "containers[app].securityContext.seccompProfile.type",
    ),
    "pod-seccomp-unconfined": (_set("securityContext.seccompProfile", {"type": "Unconfined"}), "seccompProfile"),
    "no-seccomp": (_drop("securityContext.seccompProfile"), "seccompProfile.type"),
    "run-as-root-allowed": (_set("securityContext.runAsNonRoot", False), "runAsNonRoot"),
    "no-run-as-non-root": (_drop("securityContext.runAsNonRoot"), "runAsNonRoot: must be true"),
    "container-run-as-root-allowed": (
        _set("containers.0.securityContext.runAsNonRoot", False),
        "containers[app].securityContext.runAsNonRoot",
    ),
    "pod-uid-0": (_set("securityContext.runAsUser", 0), "spec.securityContext.runAsUser"),
    "container-uid-0": (_set("containers.0.securityContext.runAsUser", 0), "containers[app].securityContext.runAsUser"),
    "escalation-unset-init": (
        _drop("initContainers.0.securityContext.allowPrivilegeEscalation"),
        "initContainers[init].securityContext.allowPrivilegeEscalation",
    ),
    "escalation-true-ephemeral": (
        _set("ephemeralContainers.0.securityContext.allowPrivilegeEscalation", True),
        "ephemeralContainers[debug].securityContext.allowPrivilegeEscalation",
    ),
    "apparmor-unconfined": (
        _set("containers.0.securityContext.appArmorProfile", {"type": "Unconfined"}),
        "appArmorProfile",
    ),
    "pod-apparmor-unconfined": (_set("securityContext.appArmorProfile", {"type": "Unconfined"}), "appArmorProfile"),
    "selinux-type": (_set("securityContext.seLinuxOptions", {"type": "spc_t"}), "seLinuxOptions.type"),
    "selinux-user": (_set("containers.0.securityContext.seLinuxOptions", {"user": "root"}), "seLinuxOptions.user"),
    "selinux-role": (_set("containers.0.securityContext.seLinuxOptions", {"role": "sysadm_r"}), "seLinuxOptions.role"),
    "host-process": (
        _set("containers.0.securityContext.windowsOptions", {"hostProcess": True}),
        "windowsOptions.hostProcess",
    ),
}


def test_the_compliant_pod_has_no_violation() -> None:
    assert restricted_violations(compliant()) == []


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_broken_rule_is_reported_by_field(case: str) -> None:
    mutate, expected = BAD[case]
    pod = compliant()
    mutate(pod)
    violations = restricted_violations(pod)
    assert violations, f"{case} was not caught"
    assert all(expected in v for v in violations), violations  # only the broken rule is reported


def test_a_bare_pod_breaks_every_restricted_rule() -> None:
    violations = restricted_violations({"containers": [{"name": "app", "image": "x"}]})
    for field in ("allowPrivilegeEscalation", "runAsNonRoot", "seccompProfile", "capabilities.drop"):
        assert any(f"spec.containers[app].securityContext.{field}" in v for v in violations), (field, violations)
    assert len(violations) == 4


@pytest.mark.parametrize(
    "mutate",
    [
        _set("containers.0.securityContext.capabilities.add", ["NET_BIND_SERVICE"]),
        _set("securityContext.sysctls", [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]),
        _set("securityContext.seccompProfile", {"type": "Localhost", "localhostProfile": "p.json"}),
        _set("securityContext.seLinuxOptions", {"type": "container_t", "level": "s0:c1,c2"}),
        _set("securityContext.appArmorProfile", {"type": "RuntimeDefault"}),
        _set("containers.0.securityContext.procMount", "Default"),
        _set("containers.0.ports.0.hostPort", 0),
        _set("volumes.0", {"name": "data", "persistentVolumeClaim": {"claimName": "d"}}),
        _set("volumes.1", {"name": "token", "projected": {"sources": []}}),
        _set("volumes.2", {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}}),
    ],
    ids=["net-bind-service", "safe-sysctl", "localhost-seccomp", "selinux-container-t", "apparmor-default",
         "proc-mount-default", "host-port-zero", "pvc", "projected", "ephemeral"],
)
def test_what_the_profile_allows_is_not_reported(mutate: Callable[[Pod], None]) -> None:
    pod = compliant()
    mutate(pod)
    assert restricted_violations(pod) == []


def test_non_root_and_seccomp_may_be_set_per_container_instead_of_per_pod() -> None:
    pod = compliant()
    del pod["securityContext"]
    for kind in ("initContainers", "containers", "ephemeralContainers"):
        pod[kind][0]["securityContext"].update(runAsNonRoot=True, seccompProfile={"type": "RuntimeDefault"})
    assert restricted_violations(pod) == []
    del pod["ephemeralContainers"][0]["securityContext"]["seccompProfile"]  # every container must then set it
    assert restricted_violations(pod) == [
        "spec.ephemeralContainers[debug].securityContext.seccompProfile.type: must be RuntimeDefault or Localhost "
        "(neither the pod nor the container sets it)"
    ]


def test_windows_pods_are_exempt_from_the_linux_only_rules() -> None:
    pod = compliant()
    pod["os"] = {"name": "windows"}
    del pod["securityContext"]["seccompProfile"]
    for kind in ("initContainers", "containers", "ephemeralContainers"):
        pod[kind][0]["securityContext"] = {}
    assert restricted_violations(pod) == []
    pod["hostNetwork"] = True  # the other rules still apply
    assert restricted_violations(pod) == ["spec.hostNetwork: host namespaces are not allowed (must be unset or false)"]
