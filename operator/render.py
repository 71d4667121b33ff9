"""The children of a WalListener: ConfigMap (rendered config), Deployment (the listener pod), Service.

Pure functions from the resource to manifests, so they are easy to test and to diff. The config
file is the listener's own :class:`listener.config.Config` rendered with ``to_yaml_dict()`` — no
secrets in it; the secrets reach the pod as ``WAL_*`` variables from the referenced Secrets.
"""

from __future__ import annotations

import hashlib
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
    SecretKeyRef,
    WalListenerSpec,
    child_name,
)

CONFIG_HASH_ANNOTATION = f"{API_GROUP}/config-hash"
MANAGED_BY = "wal-operator"
CONTAINER = "listener"


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
    return {"app.kubernetes.io/name": "wal-listener", "app.kubernetes.io/instance": owner.name}


def labels(owner: Owner) -> dict[str, str]:
    return {
        **selector_labels(owner),
        "app.kubernetes.io/component": "cdc",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        f"{API_GROUP}/listener": owner.name,
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


def deployment(spec: WalListenerSpec, owner: Owner, default_image: str) -> dict[str, Any]:
    pod = spec.pod
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": child_name(owner.name)}},
    ]
    mounts: list[dict[str, Any]] = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}]
    creds = getattr(spec.publisher.broker(), "credentials_secret_ref", None)
    if isinstance(creds, SecretKeyRef):
        volumes.append(
            {
                "name": "google-credentials",
                "secret": {"secretName": creds.name, "items": [{"key": creds.key, "path": creds.key}]},
            }
        )
        mounts.append({"name": "google-credentials", "mountPath": GOOGLE_CREDENTIALS_DIR, "readOnly": True})

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
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if pod.image_pull_policy:
        container["imagePullPolicy"] = pod.image_pull_policy
    if pod.resources:
        container["resources"] = pod.resources

    annotations = {**pod.annotations, CONFIG_HASH_ANNOTATION: config_hash(spec)}
    metrics = spec.monitoring.metrics_port
    if metrics is not None:
        annotations.setdefault("prometheus.io/scrape", "true")
        annotations.setdefault("prometheus.io/port", str(metrics))
        annotations.setdefault("prometheus.io/path", "/metrics")

    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": 60,  # the listener drains in-flight events on SIGTERM
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "automountServiceAccountToken": bool(pod.service_account_name),
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
