"""The operator's Helm chart, rendered for real (helm-python-sdk, offline) and checked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "wal-listener-operator"
K8S_VERSION = "1.30.0"


def _render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values or {})
        rendered = chart.render(values or {}, name="wal", namespace="cdc-system", is_install=True)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


def test_lint_is_clean() -> None:
    report = helm.lint(CHART, strict=True, namespace="cdc-system", kube_version="v1.30.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"watchNamespaces": ["shop", "billing"], "verbose": True},
        {"serviceAccount": {"create": False, "name": "existing"}, "rbac": {"create": False}},
        {"image": {"repository": "registry.local/wal-operator", "tag": "dev"}, "nodeSelector": {"pool": "ops"}},
    ],
    ids=["defaults", "namespaced", "no-rbac", "custom-image"],
)
def test_every_rendered_manifest_is_valid(values: dict[str, Any]) -> None:
    docs = _render(values)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_chart_ships_the_crd_and_it_is_valid() -> None:
    with helm.Chart.load(CHART) as chart:
        crds = chart.crds
    (crd,) = crds
    assert crd["data"] == (REPO / "crds" / "walListener.yaml").read_text()
    kubernetes_validate.validate(yaml.safe_load(crd["data"]), K8S_VERSION, strict=True)


def test_deployment_runs_one_non_root_operator() -> None:
    docs = _render()
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


def test_rbac_is_minimal() -> None:
    docs = _render()
    role = _one(docs, "ClusterRole")
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
    by_resource = {r: set(rule["verbs"]) for rule in role["rules"] for r in rule["resources"]}
    assert by_resource["secrets"] == {"get"}  # read the referenced Secrets, never list or write them
    assert by_resource["events"] == {"create"}
    assert "list" not in by_resource["deployments"]
    binding = _one(docs, "ClusterRoleBinding")
    assert binding["subjects"][0]["namespace"] == "cdc-system"


def test_watch_namespaces_binds_per_namespace() -> None:
    docs = _render({"watchNamespaces": ["shop", "billing"]})
    assert not [d for d in docs if d["kind"] == "ClusterRoleBinding"]
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["billing", "shop"]
    args = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=shop" in args and "--namespace=billing" in args


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
    ],
    ids=[
        "interval-zero",
        "interval-string",
        "bad-namespace",
        "empty-repo",
        "bad-pull-policy",
        "unknown-key",
        "rbac-not-bool",
    ],
)
def test_values_schema_rejects_bad_values(values: dict[str, Any]) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)
