"""The children of a WalListener: ConfigMap (rendered config), Deployment (the listener pod), Service.

Pure functions from the resource to manifests, so they are easy to test and to diff. The config
file is the listener's own :class:`listener.config.Config` rendered with ``to_yaml_dict()`` — no
secrets in it; the secrets reach the pod as ``WAL_*`` variables from the referenced Secrets.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import yaml

from wal_operator.spec import (
    API_GROUP,
    API_VERSION,
    CONFIG_DIR,
    CONFIG_FILE,
    GOOGLE_CREDENTIALS_DIR,
    KIND,
    TLS_DIR,
    TLS_FILES,
    SecretKeyRef,
    WalListenerSpec,
)

CONFIG_HASH_ANNOTATION = f"{API_GROUP}/config-hash"
SECRETS_HASH_ANNOTATION = f"{API_GROUP}/secrets-hash"
MANAGED_BY = "wal-operator"
CONTAINER = "listener"
#: user and group of the listener image (Dockerfile.listener)
LISTENER_UID = 10001
_SUFFIX = "-wal-listener"
_MAX_NAME = 63  # a Service name is a DNS-1035 label
_NOT_LABEL = re.compile(r"[^a-z0-9-]")


def _digest(text: str, length: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def child_name(resource_name: str) -> str:
    """The name of the Deployment/ConfigMap/Service of a resource: ``NAME-wal-listener``.

    Unique per resource name and stable: when the resource name is too long or is not a DNS label
    (dots, a leading digit), it is cut/cleaned and a hash of the full name is added, so two long names
    that share a prefix never map to the same children.
    """
    full = f"{resource_name}{_SUFFIX}"
    if len(full) <= _MAX_NAME and not _NOT_LABEL.search(resource_name) and resource_name[:1].isalpha():
        return full
    cleaned = _NOT_LABEL.sub("-", resource_name.lower())
    if not cleaned[:1].isalpha():
        cleaned = f"wl-{cleaned}"
    room = _MAX_NAME - len(_SUFFIX) - 9  # "-" + 8 hex digits
    return f"{cleaned[:room].rstrip('-')}-{_digest(resource_name)}{_SUFFIX}"


def label_value(value: str) -> str:
    """``value`` as a label value (at most 63 characters): cut, with a hash of the whole, when longer."""
    if len(value) <= 63:
        return value
    return f"{value[:54].rstrip('-_.')}-{_digest(value)}"


@dataclass(frozen=True)
class Owner:
    """The resource the children belong to."""

    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def selector_labels(owner: Owner) -> dict[str, str]:
    return {"app.kubernetes.io/name": "wal-listener", "app.kubernetes.io/instance": label_value(owner.name)}


def labels(owner: Owner) -> dict[str, str]:
    return {
        **selector_labels(owner),
        "app.kubernetes.io/component": "cdc",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        f"{API_GROUP}/listener": label_value(owner.name),
    }


def _metadata(owner: Owner) -> dict[str, Any]:
    return {
        "name": child_name(owner.name),
        "namespace": owner.namespace,
        "labels": labels(owner),
        "ownerReferences": [owner.reference()],
    }


def config_text(spec: WalListenerSpec) -> str:
    """config.yml as the pod reads it."""
    header = "# Rendered by wal-operator from a WalListener; secrets come from WAL_* environment variables.\n"
    return header + yaml.safe_dump(spec.config_file(), sort_keys=False)


def config_hash(spec: WalListenerSpec) -> str:
    return hashlib.sha256(config_text(spec).encode()).hexdigest()[:16]


def configmap(spec: WalListenerSpec, owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner),
        "data": {CONFIG_FILE: config_text(spec)},
    }


def _ports(spec: WalListenerSpec) -> list[dict[str, Any]]:
    ports = [{"name": "http", "containerPort": spec.listener.server_port, "protocol": "TCP"}]
    metrics = spec.monitoring.metrics_port
    if metrics is not None and metrics != spec.listener.server_port:
        ports.append({"name": "metrics", "containerPort": metrics, "protocol": "TCP"})
    return ports


def _secret_volume(name: str, refs: dict[str, SecretKeyRef]) -> dict[str, Any]:
    """One read-only volume of Secret keys (role -> file name), group-readable for the pod's fsGroup."""
    return {
        "name": name,
        "projected": {
            "defaultMode": 0o440,  # libpq accepts a root-owned key that is not group-writable
            "sources": [
                {"secret": {"name": ref.name, "items": [{"key": ref.key, "path": TLS_FILES[role]}]}}
                for role, ref in sorted(refs.items())
            ],
        },
    }


def _volumes(spec: WalListenerSpec, owner: Owner) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The pod's volumes and the container's mounts: config, /tmp, TLS files, Google credentials."""
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": child_name(owner.name)}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},  # the root filesystem is read-only
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    for target, tls in sorted(spec.tls().items()):
        volumes.append(_secret_volume(f"{target}-tls", tls.refs()))
        mounts.append({"name": f"{target}-tls", "mountPath": f"{TLS_DIR}/{target}", "readOnly": True})
    creds = getattr(spec.publisher.broker(), "credentials_secret_ref", None)
    if isinstance(creds, SecretKeyRef):
        volumes.append(
            {
                "name": "google-credentials",
                "secret": {
                    "secretName": creds.name,
                    "items": [{"key": creds.key, "path": creds.key}],
                    "defaultMode": 0o440,
                },
            }
        )
        mounts.append({"name": "google-credentials", "mountPath": GOOGLE_CREDENTIALS_DIR, "readOnly": True})
    return volumes, mounts


def secrets_hash(values: dict[tuple[str, str], bytes]) -> str:
    """A hash of the referenced Secret keys' contents ((secret, key) -> bytes): a change rolls the pod."""
    digest = hashlib.sha256()
    for (name, key), value in sorted(values.items()):
        digest.update(f"{len(name)}:{name}{len(key)}:{key}{len(value)}:".encode())
        digest.update(value)
    return digest.hexdigest()[:16]


def deployment(spec: WalListenerSpec, owner: Owner, default_image: str, secrets_digest: str = "") -> dict[str, Any]:
    """The listener Deployment. ``secrets_digest`` (:func:`secrets_hash`) goes into the pod template, so
    the pod is replaced when a referenced Secret changes, as it is when the config changes."""
    pod = spec.pod
    volumes, mounts = _volumes(spec, owner)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": pod.image or default_image,
        "command": ["wal-listener", "--config", f"{CONFIG_DIR}/{CONFIG_FILE}"],
        "env": spec.env(),
        "ports": _ports(spec),
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "http"},
            "initialDelaySeconds": 5,
            "periodSeconds": 10,
            "timeoutSeconds": 3,
            "failureThreshold": 6,
        },
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": "http"},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 3,
        },
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if pod.image_pull_policy:
        container["imagePullPolicy"] = pod.image_pull_policy
    container["resources"] = pod.container_resources()  # memory sized (wal_operator.sizing)

    annotations = {**pod.annotations, CONFIG_HASH_ANNOTATION: config_hash(spec)}
    if secrets_digest:
        annotations[SECRETS_HASH_ANNOTATION] = secrets_digest
    metrics = spec.monitoring.metrics_port
    if metrics is not None:
        annotations.setdefault("prometheus.io/scrape", "true")
        annotations.setdefault("prometheus.io/port", str(metrics))
        annotations.setdefault("prometheus.io/path", "/metrics")

    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": 60,  # the listener drains in-flight events on SIGTERM
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": LISTENER_UID,
            "runAsGroup": LISTENER_UID,
            "fsGroup": LISTENER_UID,  # mounted Secret files are group-readable, never world-readable
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        # the listener never talks to the Kubernetes API; a named service account may be for workload identity
        "automountServiceAccountToken": bool(pod.service_account_name),
        "enableServiceLinks": False,
    }
    if pod.service_account_name:
        pod_spec["serviceAccountName"] = pod.service_account_name
    if pod.node_selector:
        pod_spec["nodeSelector"] = pod.node_selector
    if pod.tolerations:
        pod_spec["tolerations"] = pod.tolerations
    if pod.affinity:
        pod_spec["affinity"] = pod.affinity

    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(owner),
        "spec": {
            "replicas": 0 if spec.suspend else 1,  # one slot takes one consumer
            "strategy": {"type": "Recreate"},  # never two pods on one slot, not even during a rollout
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector_labels(owner)},
            "template": {
                "metadata": {"labels": {**pod.labels, **labels(owner)}, "annotations": annotations},
                "spec": pod_spec,
            },
        },
    }


def service(spec: WalListenerSpec, owner: Owner) -> dict[str, Any]:
    ports = [
        {"name": port["name"], "port": port["containerPort"], "targetPort": port["name"], "protocol": "TCP"}
        for port in _ports(spec)
    ]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner),
        "spec": {"type": "ClusterIP", "selector": selector_labels(owner), "ports": ports},
    }
