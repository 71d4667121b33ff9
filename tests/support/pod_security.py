"""The Kubernetes Pod Security Standards "restricted" profile (baseline + restricted), as a pure check.

:func:`restricted_violations` reads a pod spec (``Deployment.spec.template.spec`` or ``Pod.spec``) and
returns one readable message per violated rule, naming the pod field or the container and its field;
an empty list means the pod is admitted under ``pod-security.kubernetes.io/enforce: restricted``.
The rules follow the published standard (kubernetes.io/docs/concepts/security/pod-security-standards)
for the fields of the spec; the legacy AppArmor annotations live in the pod's metadata and are not
seen here (the ``appArmorProfile`` fields are). Pods with ``spec.os.name: windows`` are exempt from
the Linux-only rules (privilege escalation, seccomp, capabilities), as the standard says.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

#: volume types the restricted profile allows (everything else, hostPath first, is refused)
ALLOWED_VOLUME_TYPES = frozenset(
    {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
)
#: the "safe" sysctls of the baseline profile
SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)
#: the only capability a restricted container may add (after dropping ALL)
ADDABLE_CAPABILITIES = frozenset({"NET_BIND_SERVICE"})
ALLOWED_SECCOMP = frozenset({"RuntimeDefault", "Localhost"})
ALLOWED_APPARMOR = frozenset({"RuntimeDefault", "Localhost"})
ALLOWED_SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")


def restricted_violations(pod_spec: dict[str, Any]) -> list[str]:
    """Every way ``pod_spec`` breaks the restricted Pod Security Standard (empty: it complies)."""
    out: list[str] = []
    pod_sc: dict[str, Any] = pod_spec.get("securityContext") or {}
    linux = (pod_spec.get("os") or {}).get("name") != "windows"
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(field):
            out.append(f"spec.{field}: host namespaces are not allowed (must be unset or false)")
    out.extend(_volume_violations(pod_spec.get("volumes") or []))
    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            out.append(f"spec.securityContext.sysctls: {sysctl.get('name')!r} is not a safe sysctl")
    out.extend(_common_context_violations("spec.securityContext", pod_sc))
    if pod_sc.get("runAsNonRoot") is False:
        out.append("spec.securityContext.runAsNonRoot: must not be false")
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    if linux and pod_seccomp is not None and pod_seccomp not in ALLOWED_SECCOMP:
        out.append(f"spec.securityContext.seccompProfile.type: {pod_seccomp!r} is not allowed "
                   "(RuntimeDefault or Localhost)")
    for where, container in _containers(pod_spec):
        out.extend(_container_violations(where, container, pod_sc, linux))
    return out


def _containers(pod_spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for kind in CONTAINER_LISTS:
        for index, container in enumerate(pod_spec.get(kind) or []):
            yield f"spec.{kind}[{container.get('name') or index}]", container


def _volume_violations(volumes: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for index, volume in enumerate(volumes):
        name = volume.get("name") or index
        for kind in sorted(set(volume) - {"name"}):
            if kind not in ALLOWED_VOLUME_TYPES:
                out.append(f"spec.volumes[{name}]: {kind} volumes are not allowed "
                           f"(allowed: {', '.join(sorted(ALLOWED_VOLUME_TYPES))})")
    return out


def _common_context_violations(where: str, sc: dict[str, Any]) -> list[str]:
    """The rules a pod-level and a container-level securityContext share."""
    out: list[str] = []
    if (sc.get("windowsOptions") or {}).get("hostProcess"):
        out.append(f"{where}.windowsOptions.hostProcess: Windows HostProcess is not allowed")
    selinux: dict[str, Any] = sc.get("seLinuxOptions") or {}
    if selinux.get("type", "") not in ALLOWED_SELINUX_TYPES:
        out.append(f"{where}.seLinuxOptions.type: {selinux['type']!r} is not allowed")
    for field in ("user", "role"):
        if selinux.get(field):
            out.append(f"{where}.seLinuxOptions.{field}: must be unset")
    apparmor = (sc.get("appArmorProfile") or {}).get("type")
    if apparmor is not None and apparmor not in ALLOWED_APPARMOR:
        out.append(f"{where}.appArmorProfile.type: {apparmor!r} is not allowed (RuntimeDefault or Localhost)")
    if sc.get("runAsUser") == 0:
        out.append(f"{where}.runAsUser: must not be 0 (root)")
    return out


def _container_violations(where: str, container: dict[str, Any], pod_sc: dict[str, Any], linux: bool) -> list[str]:
    sc: dict[str, Any] = container.get("securityContext") or {}
    ctx = f"{where}.securityContext"
    out = _common_context_violations(ctx, sc)
    if sc.get("privileged"):
        out.append(f"{ctx}.privileged: privileged containers are not allowed")
    if sc.get("procMount", "Default") != "Default":
        out.append(f"{ctx}.procMount: must be unset or Default, not {sc['procMount']!r}")
    for port in container.get("ports") or []:
        if port.get("hostPort"):
            out.append(f"{where}.ports[{port.get('name') or port.get('containerPort')}].hostPort: "
                       "host ports are not allowed")
    if sc.get("runAsNonRoot") is False:
        out.append(f"{ctx}.runAsNonRoot: must not be false")
    elif sc.get("runAsNonRoot") is None and pod_sc.get("runAsNonRoot") is not True:
        out.append(f"{ctx}.runAsNonRoot: must be true (neither the pod nor the container sets it)")
    if not linux:
        return out
    if sc.get("allowPrivilegeEscalation") is not False:
        out.append(f"{ctx}.allowPrivilegeEscalation: must be false")
    seccomp = (sc.get("seccompProfile") or {}).get("type")
    if seccomp is not None and seccomp not in ALLOWED_SECCOMP:
        out.append(f"{ctx}.seccompProfile.type: {seccomp!r} is not allowed (RuntimeDefault or Localhost)")
    elif seccomp is None and (pod_sc.get("seccompProfile") or {}).get("type") not in ALLOWED_SECCOMP:
        out.append(f"{ctx}.seccompProfile.type: must be RuntimeDefault or Localhost "
                   "(neither the pod nor the container sets it)")
    capabilities: dict[str, Any] = sc.get("capabilities") or {}
    if "ALL" not in (capabilities.get("drop") or []):
        out.append(f"{ctx}.capabilities.drop: must include ALL")
    added = sorted(set(capabilities.get("add") or []) - ADDABLE_CAPABILITIES)
    if added:
        out.append(f"{ctx}.capabilities.add: {', '.join(added)} not allowed (only NET_BIND_SERVICE)")
    return out
