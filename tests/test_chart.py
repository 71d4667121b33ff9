"""The operator's Helm chart, rendered for real (helm-python-sdk, offline) and checked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from lupa import lua51

from tests.support.chart import CHART, render_chart
from tests.support.pod_security import restricted_violations
from wal_operator import render
from wal_operator.spec import parse_spec

REPO = Path(__file__).resolve().parent.parent
K8S_VERSION = "1.30.0"
MONITORING_API = "monitoring.coreos.com/v1"
MONITORING_KINDS = ("podMonitor", "serviceMonitor", "prometheusRule", "grafanaDashboard")
ALL_MONITORING: dict[str, Any] = {"monitoring": {kind: {"enabled": True} for kind in MONITORING_KINDS}}
NAMESPACED: dict[str, Any] = {"watchNamespaces": ["shop", "billing"]}
#: the labels every listener pod and Service the operator creates carries
LISTENER_LABELS = {"app.kubernetes.io/name": "wal-listener", "app.kubernetes.io/managed-by": "wal-operator"}
#: everything the operator may do, per (API group, resource): nothing else, no wildcard
OPERATOR_PERMISSIONS: dict[tuple[str, str], set[str]] = {
    ("wal-listener.io", "wallisteners"): {"get", "list", "watch", "patch"},
    ("wal-listener.io", "wallisteners/status"): {"get", "patch"},
    ("apps", "deployments"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "configmaps"): {"get", "create", "patch", "delete"},
    ("", "services"): {"get", "create", "patch", "delete"},
    ("", "secrets"): {"get"},
    ("", "events"): {"create"},
}
#: the docs' operations page, where each alert's runbook is (monitoring.prometheusRule.runbookBaseURL)
RUNBOOKS = "https://wal-listener.github.io/wal-listener/operations/"
ALERTS = {
    "WalListenerReplicationLagBytes",
    "WalListenerReplicationLagSeconds",
    "WalListenerWalAtRisk",
    "WalListenerSafeWalSizeLow",
    "WalListenerSlotLost",
    "WalListenerNotReady",
    "WalListenerConnectionDown",
    "WalListenerPublishErrors",
    "WalListenerBackfillStuck",
    "WalListenerTableWithoutIdentity",
}


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


def _kinds(docs: list[dict[str, Any]], *kinds: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in kinds]


def _permissions(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    """(group, resource) -> verbs of a Role or ClusterRole, refusing wildcards and special rule kinds."""
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def _operator_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod: dict[str, Any] = _one(docs, "Deployment")["spec"]["template"]["spec"]
    return pod


def _with(values: dict[str, Any], **monitoring: dict[str, Any]) -> dict[str, Any]:
    """``values`` plus monitoring settings (each enabled)."""
    return {**values, "monitoring": {kind: {"enabled": True, **v} for kind, v in monitoring.items()}}


@pytest.mark.parametrize(
    "values", [{}, ALL_MONITORING, {**NAMESPACED, **ALL_MONITORING}], ids=["defaults", "monitoring", "namespaced"]
)
def test_lint_is_clean(values: dict[str, Any]) -> None:
    report = helm.lint(CHART, values, strict=True, namespace="cdc-system", kube_version="v1.30.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


@pytest.mark.parametrize(
    "values",
    [
        {},
        {**NAMESPACED, "verbose": True},
        {"serviceAccount": {"create": False, "name": "existing"}, "rbac": {"create": False}},
        {"image": {"repository": "registry.local/wal-operator", "tag": "dev"}, "nodeSelector": {"pool": "ops"}},
        ALL_MONITORING,
        {**NAMESPACED, **ALL_MONITORING},
    ],
    ids=["defaults", "namespaced", "no-rbac", "custom-image", "monitoring", "namespaced-monitoring"],
)
def test_every_rendered_manifest_is_valid(values: dict[str, Any]) -> None:
    docs = render_chart(values)
    assert docs
    core = [d for d in docs if d["apiVersion"] != MONITORING_API]
    for doc in core:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"].get("namespace"), f"{doc['kind']} without a namespace"
    # kubernetes-validate has no schema for the Prometheus Operator's kinds: their structure is checked below
    monitoring = sorted(d["kind"] for d in docs if d["apiVersion"] == MONITORING_API)
    assert monitoring == (["PodMonitor", "PrometheusRule", "ServiceMonitor"] if "monitoring" in values else [])


def test_chart_ships_the_crd_and_it_is_valid() -> None:
    with helm.Chart.load(CHART) as chart:
        crds = chart.crds
    (crd,) = crds
    assert crd["data"] == (REPO / "crds" / "walListener.yaml").read_text()
    kubernetes_validate.validate(yaml.safe_load(crd["data"]), K8S_VERSION, strict=True)


def test_deployment_runs_one_non_root_operator() -> None:
    docs = render_chart()
    dep = _one(docs, "Deployment")
    assert dep["metadata"]["namespace"] == "cdc-system"
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/wal-listener/wal-operator:0.1.0"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["args"][:2] == ["run", "--standalone"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["WAL_OPERATOR_LISTENER_IMAGE"] == "ghcr.io/wal-listener/wal-listener:0.1.0"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["serviceAccountName"] == _one(docs, "ServiceAccount")["metadata"]["name"]


@pytest.mark.parametrize("values", [{}, NAMESPACED, ALL_MONITORING], ids=["defaults", "namespaced", "monitoring"])
def test_operator_pod_meets_the_restricted_pod_security_standard(values: dict[str, Any]) -> None:
    pod = _operator_pod(render_chart(values))
    assert restricted_violations(pod) == []
    (container,) = pod["containers"]
    sc = {**pod["securityContext"], **container["securityContext"]}
    assert sc["runAsUser"] == 10001 and sc["runAsGroup"] == 10001 and sc["runAsNonRoot"] is True
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    (tmp,) = [v for v in pod["volumes"] if v["name"] == "tmp"]
    assert "emptyDir" in tmp
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


def test_security_context_values_reach_the_pod() -> None:
    """The check above sees what the values set: loosening them shows up as violations."""
    pod = _operator_pod(render_chart({"securityContext": {"allowPrivilegeEscalation": True, "runAsUser": 0}}))
    assert restricted_violations(pod) == [
        "spec.containers[operator].securityContext.runAsUser: must not be 0 (root)",
        "spec.containers[operator].securityContext.allowPrivilegeEscalation: must be false",
    ]


def test_rbac_is_minimal() -> None:
    docs = render_chart()
    role = _one(docs, "ClusterRole")
    assert _permissions(role) == OPERATOR_PERMISSIONS
    binding = _one(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": _one(docs, "ServiceAccount")["metadata"]["name"], "namespace": "cdc-system"}
    ]
    assert not _kinds(docs, "Role", "RoleBinding")


def test_watch_namespaces_grants_per_namespace_and_nothing_cluster_wide() -> None:
    docs = render_chart(NAMESPACED)
    assert not _kinds(docs, "ClusterRole", "ClusterRoleBinding")
    assert all(d["metadata"].get("namespace") for d in docs), "a cluster-scoped object in namespaced mode"
    roles = _kinds(docs, "Role")
    bindings = _kinds(docs, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["billing", "shop"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["billing", "shop"]
    for role in roles:
        assert _permissions(role) == OPERATOR_PERMISSIONS
    account = _one(docs, "ServiceAccount")["metadata"]
    for binding in bindings:
        (role,) = [r for r in roles if r["metadata"]["namespace"] == binding["metadata"]["namespace"]]
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"],
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
        ]
    args = _operator_pod(docs)["containers"][0]["args"]
    assert "--namespace=shop" in args and "--namespace=billing" in args


@pytest.mark.parametrize("values", [{}, NAMESPACED], ids=["cluster-wide", "namespaced"])
def test_rbac_can_be_left_out(values: dict[str, Any]) -> None:
    docs = render_chart({**values, "rbac": {"create": False}})
    assert not _kinds(docs, "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")


# -- monitoring ---------------------------------------------------------------------------------------


def test_monitoring_is_off_by_default() -> None:
    docs = render_chart()
    assert not [d for d in docs if d["apiVersion"] == MONITORING_API]
    assert not _kinds(docs, "ConfigMap")


@pytest.mark.parametrize(
    ("kind", "key", "endpoints"),
    [("PodMonitor", "podMonitor", "podMetricsEndpoints"), ("ServiceMonitor", "serviceMonitor", "endpoints")],
)
def test_monitors_scrape_the_listeners_in_the_watched_namespaces(kind: str, key: str, endpoints: str) -> None:
    cluster_wide = _one(render_chart(_with({}, **{key: {}})), kind)
    assert cluster_wide["metadata"]["namespace"] == "cdc-system"
    assert cluster_wide["spec"]["selector"] == {"matchLabels": LISTENER_LABELS}
    assert cluster_wide["spec"]["namespaceSelector"] == {"any": True}
    (endpoint,) = cluster_wide["spec"][endpoints]
    assert (endpoint["port"], endpoint["path"], endpoint["interval"]) == ("metrics", "/metrics", "30s")
    assert "scrapeTimeout" not in endpoint

    custom = {"interval": "15s", "scrapeTimeout": "10s", "labels": {"release": "prometheus"}}
    namespaced = _one(render_chart(_with(NAMESPACED, **{key: custom})), kind)
    assert namespaced["spec"]["namespaceSelector"] == {"matchNames": ["shop", "billing"]}
    assert namespaced["metadata"]["labels"]["release"] == "prometheus"
    (endpoint,) = namespaced["spec"][endpoints]
    assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("15s", "10s")


def test_monitors_select_what_the_operator_renders() -> None:
    """The contract with wal_operator.render: the selected labels and the "metrics" port exist."""
    spec = parse_spec(
        {
            "listener": {"slotName": "orders", "publicationName": "orders"},
            "database": {"host": "db", "name": "app", "user": "cdc",
                         "passwordSecretRef": {"name": "pg", "key": "password"}},
            "publisher": {"type": "nats", "topic": "orders", "nats": {"address": "nats://nats:4222"}},
        }
    )
    owner = render.Owner("orders", "shop", "uid-1")
    pod = render.deployment(spec, owner, "wal-listener:dev")["spec"]["template"]
    service = render.service(spec, owner)
    docs = render_chart(ALL_MONITORING)

    selector = _one(docs, "PodMonitor")["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    assert {e["port"] for e in _one(docs, "PodMonitor")["spec"]["podMetricsEndpoints"]} <= ports

    selector = _one(docs, "ServiceMonitor")["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in _one(docs, "ServiceMonitor")["spec"]["endpoints"]} <= ports


def _alerts(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rule = _one(render_chart(values), "PrometheusRule")
    return {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}


def test_prometheus_rule_alerts_name_the_pod_and_carry_a_severity() -> None:
    rule = _one(render_chart(_with({}, prometheusRule={"labels": {"release": "prometheus"}})), "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    alerts = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    assert set(alerts) == ALERTS
    for name, alert in alerts.items():
        assert alert["labels"]["severity"] in ("warning", "critical"), name
        assert alert["expr"] and alert["for"], name
        for text in (alert["annotations"]["summary"], alert["annotations"]["description"]):
            assert "{{ $labels.namespace }}/{{ $labels.pod }}" in text, (name, text)
    for name, alert in alerts.items():  # the anchors exist in the built docs: tests/test_docs.py
        assert alert["annotations"]["runbook_url"] == f"{RUNBOOKS}#{name.lower()}", name
    assert alerts["WalListenerSlotLost"]["labels"]["severity"] == "critical"
    assert alerts["WalListenerWalAtRisk"]["labels"]["severity"] == "critical"
    assert 'slot_wal_status{status=~"unreserved|lost"}' in alerts["WalListenerWalAtRisk"]["expr"]
    assert 'slot_problem{reason=~"slot_dropped|slot_invalidated"}' in alerts["WalListenerSlotLost"]["expr"]
    assert "rate(publish_errors_total[5m])" in alerts["WalListenerPublishErrors"]["expr"]


def test_runbook_urls_follow_the_base_url_value() -> None:
    own = _alerts(_with({}, prometheusRule={"runbookBaseURL": "https://wiki.example.com/cdc/runbooks"}))
    assert own["WalListenerNotReady"]["annotations"]["runbook_url"] == (
        "https://wiki.example.com/cdc/runbooks#wallistenernotready"
    )
    assert all("runbook_url" not in a["annotations"] for a in _alerts(_with({}, prometheusRule={
        "runbookBaseURL": ""})).values())


def test_prometheus_rule_thresholds_and_switches_come_from_values() -> None:
    alerts = _alerts(
        _with(
            {},
            prometheusRule={
                "ruleLabels": {"team": "platform"},
                "alerts": {
                    "replicationLagBytes": {"threshold": 5368709120, "for": "30m", "severity": "critical"},
                    "replicationLagSeconds": {"threshold": 60.5},
                    "notReady": {"for": "3m"},
                    "backfillStuck": {"enabled": False},
                },
            },
        )
    )
    assert set(alerts) == ALERTS - {"WalListenerBackfillStuck"}
    lag = alerts["WalListenerReplicationLagBytes"]
    assert lag["expr"].endswith("> 5368709120") and lag["for"] == "30m" and lag["labels"]["severity"] == "critical"
    assert "5368709120 bytes" in lag["annotations"]["description"]
    assert alerts["WalListenerReplicationLagSeconds"]["expr"].endswith("> 60.5")
    assert alerts["WalListenerNotReady"]["for"] == "3m"
    assert all(a["labels"]["team"] == "platform" for a in alerts.values())


def test_prometheus_rule_selector_narrows_every_selector() -> None:
    alerts = _alerts(_with({}, prometheusRule={"selector": 'job=~".*wal.*"'}))
    for name, alert in alerts.items():
        assert 'job=~".*wal.*"' in alert["expr"], name
    assert 'slot_wal_status{status=~"unreserved|lost", job=~".*wal.*"}' in alerts["WalListenerWalAtRisk"]["expr"]
    assert 'listener_ready{job=~".*wal.*"}' in alerts["WalListenerNotReady"]["expr"]


def test_prometheus_rule_only_covers_the_watched_namespaces() -> None:
    """Two operators serving different namespaces must not both alert on the same listener."""
    for name, alert in _alerts(_with(NAMESPACED, prometheusRule={})).items():
        assert 'namespace=~"shop|billing"' in alert["expr"], name
    for name, alert in _alerts(_with({}, prometheusRule={})).items():
        assert "namespace=~" not in alert["expr"], name


def test_grafana_dashboard_configmap_carries_the_dashboard_for_the_sidecar() -> None:
    docs = render_chart(_with({}, grafanaDashboard={}))
    cm = _one(docs, "ConfigMap")
    assert cm["metadata"]["namespace"] == "cdc-system"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = cm["data"].values()
    dashboard = json.loads(text)
    assert dashboard == json.loads((CHART / "dashboards" / "wal-listener.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "pod"} <= set(variables)
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for metric in ("published_events_total", "replication_lag_bytes", "replication_lag_seconds", "in_flight_events",
                   "publish_errors_total", "reconnects_total", "listener_ready", "slot_retained_wal_bytes",
                   "snapshot_rows_total"):
        assert metric in exprs, metric
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert 'namespace=~"$namespace", pod=~"$pod"' in target["expr"], (panel["title"], target["expr"])

    custom = {"namespace": "grafana", "label": "grafana_dashboard_wal", "labelValue": "yes",
              "annotations": {"grafana_folder": "CDC"}}
    cm = _one(render_chart(_with({}, grafanaDashboard=custom)), "ConfigMap")
    assert cm["metadata"]["namespace"] == "grafana"
    assert cm["metadata"]["labels"]["grafana_dashboard_wal"] == "yes"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "CDC"}


# -- values.schema.json -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        {"statusInterval": 0},
        {"statusInterval": "30s"},
        {"watchNamespaces": ["Not_A_Namespace"]},
        {"image": {"repository": ""}},
        {"image": {"repository": "x", "pullPolicy": "Sometimes"}},
        {"replicas": 2},
        {"rbac": {"create": "yes"}},
        {"monitoring": {"podMonitor": {"enabled": "true"}}},
        {"monitoring": {"serviceMonitor": {"enabled": 1}}},
        {"monitoring": {"podMonitor": {"interval": "30 seconds"}}},
        {"monitoring": {"serviceMonitor": {"labels": {"release": 1}}}},
        {"monitoring": {"prometheusRule": {"enabled": "yes"}}},
        {"monitoring": {"prometheusRule": {"alerts": {"replicationLagBytes": {"threshold": -1}}}}},
        {"monitoring": {"prometheusRule": {"alerts": {"publishErrors": {"threshold": "0"}}}}},
        {"monitoring": {"prometheusRule": {"alerts": {"notReady": {"for": "ten minutes"}}}}},
        {"monitoring": {"prometheusRule": {"alerts": {"slotLost": {"severity": ""}}}}},
        {"monitoring": {"prometheusRule": {"alerts": {"diskFull": {"enabled": True}}}}},
        {"monitoring": {"grafanaDashboard": {"enabled": "on"}}},
        {"monitoring": {"grafanaDashboard": {"namespace": "Grafana!"}}},
        {"monitoring": {"alertmanager": {"enabled": True}}},
        {"monitoring": {"prometheusRule": {"runbookBaseURL": "not a url"}}},
    ],
    ids=[
        "interval-zero",
        "interval-string",
        "bad-namespace",
        "empty-repo",
        "bad-pull-policy",
        "unknown-key",
        "rbac-not-bool",
        "podmonitor-enabled-string",
        "servicemonitor-enabled-number",
        "bad-scrape-interval",
        "label-not-string",
        "rule-enabled-string",
        "negative-threshold",
        "threshold-string",
        "bad-for",
        "empty-severity",
        "unknown-alert",
        "dashboard-enabled-string",
        "bad-dashboard-namespace",
        "unknown-monitoring-key",
        "runbook-not-a-url",
    ],
)
def test_values_schema_rejects_bad_values(values: dict[str, Any]) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)


def test_values_schema_accepts_a_full_monitoring_setup() -> None:
    values = {
        "monitoring": {
            "podMonitor": {"enabled": True, "interval": "1m30s", "scrapeTimeout": "20s", "labels": {"a": "b"}},
            "prometheusRule": {
                "enabled": True,
                "ruleLabels": {"team": "platform"},
                "alerts": {"publishErrors": {"threshold": 0.5, "for": "0", "severity": "page"}},
            },
            "grafanaDashboard": {"enabled": True, "namespace": "monitoring"},
        }
    }
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values)


# -- Argo CD health check -----------------------------------------------------------------------------

HEALTH_LUA = CHART / "argocd" / "health.lua"


def _argocd_health(obj: dict[str, Any]) -> tuple[str, str]:
    """Run the health check as Argo CD does: the resource as the global ``obj``, ``hs`` returned."""
    lua = lua51.LuaRuntime()
    lua.globals().obj = lua.table_from(obj, recursive=True)
    hs = lua.execute(HEALTH_LUA.read_text())
    return str(hs["status"]), str(hs["message"])


def _wal_listener(
    ready: tuple[str, str] | None = None,
    generation: int = 3,
    observed: int | None = 3,
    suspend: bool | None = None,
) -> dict[str, Any]:
    """A WalListener whose Ready condition has (status, reason); no status at all when ``ready`` is None."""
    obj: dict[str, Any] = {
        "apiVersion": "wal-listener.io/v1alpha1",
        "kind": "WalListener",
        "metadata": {"name": "orders", "namespace": "shop", "generation": generation},
        "spec": {"listener": {"slotName": "orders"}},
    }
    if suspend is not None:
        obj["spec"]["suspend"] = suspend
    if ready is not None:
        status, reason = ready
        obj["status"] = {
            "conditions": [
                {"type": "Ready", "status": status, "reason": reason, "message": f"because {reason}"},
                {"type": "SpecValid", "status": "True", "reason": "Valid", "message": ""},
            ]
        }
        if observed is not None:
            obj["status"]["observedGeneration"] = observed
    return obj


DEGRADED_REASONS = ["InvalidSpec", "Conflict", "SlotLost", "SlotMissing", "Refused", "LoginRefused", "SecretMissing",
                    "TablesMissing"]


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (_wal_listener(("True", "ListenerRunning")), "Healthy"),
        (_wal_listener(("True", "ListenerRunning"), suspend=False), "Healthy"),
        *[(_wal_listener(("False", reason)), "Degraded") for reason in DEGRADED_REASONS],
        (_wal_listener(), "Progressing"),
        (_wal_listener(("True", "ListenerRunning"), generation=4, observed=3), "Progressing"),
        (_wal_listener(("True", "ListenerRunning"), observed=None), "Progressing"),
        (_wal_listener(("False", "InvalidSpec"), generation=4, observed=3), "Progressing"),
        *[(_wal_listener(("False", reason)), "Progressing")
          for reason in ("PodNotReady", "RollingOut", "Unreachable", "Pending")],
        (_wal_listener(("Unknown", "Reconciling")), "Progressing"),
        (_wal_listener(suspend=True), "Suspended"),
        (_wal_listener(("False", "SlotLost"), suspend=True), "Suspended"),
    ],
    ids=[
        "ready",
        "ready-not-suspended",
        *[f"degraded-{r}" for r in DEGRADED_REASONS],
        "no-status",
        "generation-not-observed",
        "no-observed-generation",
        "degraded-but-spec-changed",
        "pod-not-ready",
        "rolling-out",
        "unreachable",
        "pending",
        "unknown",
        "suspended",
        "suspended-wins",
    ],
)
def test_argocd_health_check(obj: dict[str, Any], expected: str) -> None:
    status, message = _argocd_health(obj)
    assert status == expected, message
    assert message


def test_argocd_health_message_says_why() -> None:
    assert _argocd_health(_wal_listener(("False", "SecretMissing"))) == (
        "Degraded", "SecretMissing: because SecretMissing"
    )
    assert _argocd_health(_wal_listener(("True", "ListenerRunning"), generation=5, observed=4)) == (
        "Progressing", "Waiting for the operator to observe generation 5"
    )
    without_conditions = _wal_listener()
    without_conditions["status"] = {"observedGeneration": 3, "conditions": []}
    assert _argocd_health(without_conditions) == ("Progressing", "Waiting for the Ready condition")


def test_readme_embeds_the_health_check_as_shipped() -> None:
    readme = (CHART / "README.md").read_text()
    assert "resource.customizations.health.wal-listener.io_WalListener: |" in readme
    for line in HEALTH_LUA.read_text().splitlines():
        assert f"    {line}".rstrip() in readme, line
