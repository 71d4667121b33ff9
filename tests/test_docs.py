"""The documentation site: `mkdocs build --strict` succeeds without a warning, every config key, CRD field,
metric, operator condition and Event reason of the code is in the built site (found by walking the model,
the CRD, the Prometheus registry and the operator's source here, not from a list), every alert of the chart
has its runbook section, and the README stays a short entry into it."""

from __future__ import annotations

import ast
import html
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from listener.config import Config, _leaf_paths
from tests.support.chart import render_chart
from wal_operator import status
from wal_operator.crd import build_crd

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, timeout=240,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "WARNING" not in run.stderr, run.stderr
    return out


def _page(site: Path, page: str) -> str:
    return (site / page / "index.html").read_text()


def _missing(text: str, names: Iterator[str] | list[str] | set[str]) -> list[str]:
    return sorted(n for n in set(names) if f"<code>{html.escape(n, quote=False)}</code>" not in text)


def test_every_config_key_is_in_the_reference(site: Path) -> None:
    keys = [".".join(path) for path in _leaf_paths((Config,))]
    assert len(keys) > 60
    assert _missing(_page(site, "reference/configuration"), keys) == []


def _fields(node: dict[str, Any], path: str) -> Iterator[str]:
    yield path
    for name, sub in node.get("properties", {}).items():
        yield from _fields(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        for name, sub in node["items"].get("properties", {}).items():
            yield from _fields(sub, f"{path}[].{name}")


def test_every_crd_field_is_in_the_reference(site: Path) -> None:
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    fields = [f for top in ("spec", "status") for f in _fields(schema["properties"][top], top)]
    assert len(fields) > 150
    page = _page(site, "reference/wallistener")
    assert _missing(page, fields) == []
    for rules in (n.get("x-kubernetes-validations", []) for n in _nodes(schema)):  # CEL rules in words
        for rule in rules:
            assert html.escape(rule["message"], quote=False) in page, rule


def _nodes(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _nodes(value)


def test_every_metric_family_is_in_the_reference(site: Path) -> None:
    import listener.app  # noqa: F401 - every stage, and so every metric it registers
    from listener.metrics import REGISTRY

    families = list(REGISTRY.collect())
    assert len(families) > 20
    names = {f"{f.name}_total" if f.type == "counter" else f.name for f in families}
    assert _missing(_page(site, "reference/metrics"), names) == []


def _operator_reasons() -> tuple[set[str], set[str]]:
    """(condition types, reasons): every CamelCase literal given to a Condition, to the exception that
    carries a reason into one, or as an Event's reason — read from the source."""
    kinds = {status.READY, status.CONFLICT, *status.STEPS}
    reasons: set[str] = set()
    for name in ("handlers.py", "status.py"):
        tree = ast.parse((REPO / "operator" / "wal_operator" / name).read_text())
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            callee = ast.unparse(call.func).split(".")[-1]
            args: list[ast.AST] = []
            if callee in ("Condition", "_NeedsPerson"):
                args = list(call.args)
            elif callee in ("warn", "event", "info", "exception"):
                args = [k.value for k in call.keywords if k.arg == "reason"]
            reasons |= {n.value for a in args for n in ast.walk(a) if isinstance(n, ast.Constant)
                        and isinstance(n.value, str) and re.fullmatch(r"[A-Z][A-Za-z]+", n.value)}
    return kinds, reasons - kinds - {"True", "False", "Unknown", "Warning", "Normal"}


def test_every_condition_and_event_reason_is_in_the_reference(site: Path) -> None:
    kinds, reasons = _operator_reasons()
    assert {"SlotMissing", "WALRetained", "SecretMissing", "PodNotReady"} <= reasons
    page = _page(site, "reference/operator-status")
    assert _missing(page, kinds | reasons) == []


def test_every_alert_has_its_runbook_section(site: Path) -> None:
    rule = next(d for d in render_chart({"monitoring": {"prometheusRule": {"enabled": True}}})
                if d["kind"] == "PrometheusRule")
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    site_url = yaml.safe_load((REPO / "mkdocs.yml").read_text().split("\ntheme:")[0])["site_url"]
    operations = _page(site, "operations")
    for alert in alerts:
        base, _, anchor = alert["annotations"]["runbook_url"].partition("#")
        assert base == f"{site_url}operations/", alert["alert"]
        assert f'id="{anchor}"' in operations, f"no runbook section for {alert['alert']} in docs/operations.md"


def test_the_readme_is_short_starts_with_the_two_commands_and_its_links_work(site: Path) -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 200
    assert lines[2:6] == [
        "```bash",
        "bash scripts/demo     # set up, start a throwaway PostgreSQL + NATS, make changes, watch the events arrive",
        "bash scripts/test     # set up and run the whole test suite against real services (what CI runs)",
        "```",
    ]
    for target in re.findall(r"\]\(([^)#:]+)(?:#([^)]+))?\)", README.read_text()):
        path, anchor = target
        assert (REPO / path).exists(), path
        if anchor and path.startswith("docs/"):
            page = path.removeprefix("docs/").removesuffix(".md").removesuffix("index")
            assert f'id="{anchor}"' in (site / page / "index.html").read_text(), f"{path}#{anchor}"


def test_reliability_md_points_at_the_page_that_holds_its_content() -> None:
    text = (REPO / "RELIABILITY.md").read_text()
    assert "docs/reliability.md" in text and len(text.splitlines()) < 10
