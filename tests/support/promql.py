"""PromQL of the chart (alert rules, Grafana dashboard) and the metric names it reads, by a real parser.

Expressions are parsed with ``promql-parser`` (the Rust PromQL parser), so a syntax or type error fails
too; Grafana's ``$__rate_interval``-style range variables are replaced by durations first, and
``label_values(QUERY, label)`` variable queries contribute their inner selector.
"""

from __future__ import annotations

import json
import re
from typing import Any

import promql_parser

#: Grafana's built-in variables that stand for a duration inside [...]
GRAFANA_DURATIONS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<query>.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*$", re.S)
_TYPE_LINE = re.compile(r"^# TYPE (?P<name>[A-Za-z_:][A-Za-z0-9_:]*) (?P<kind>\w+)\s*$", re.M)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (by name or by an exact ``__name__`` matcher)."""
    for variable, duration in GRAFANA_DURATIONS.items():
        expr = expr.replace(variable, duration)
    names: set[str] = set()

    def visit(node: Any) -> None:
        if not isinstance(node, promql_parser.VectorSelector):
            return
        if node.name:
            names.add(node.name)
        for matcher in node.matchers.matchers:
            if matcher.name == "__name__":
                if matcher.op != promql_parser.MatchOp.Equal:
                    raise ValueError(f"cannot tell which metrics {expr!r} reads: __name__ {matcher.op}")
                names.add(matcher.value)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def exposed_metrics(text: str) -> set[str]:
    """Metric names in Prometheus' text format: every ``# TYPE`` line's, and ``NAME_total`` of counters."""
    names: set[str] = set()
    for match in _TYPE_LINE.finditer(text):
        name = match["name"]
        names.add(name)
        if match["kind"] == "counter" and not name.endswith("_total"):
            names.add(f"{name}_total")
    return names


def chart_expressions(docs: list[dict[str, Any]]) -> dict[str, str]:
    """Every PromQL expression in rendered manifests: alert/record rules, dashboard targets and variables."""
    out: dict[str, str] = {}
    for doc in docs:
        if doc["kind"] == "PrometheusRule":
            for group in doc["spec"]["groups"]:
                for rule in group["rules"]:
                    out[f"rule {rule.get('alert') or rule.get('record')}"] = rule["expr"]
        elif doc["kind"] == "ConfigMap":
            for key, text in (doc.get("data") or {}).items():
                if key.endswith(".json"):
                    out.update(dashboard_expressions(json.loads(text)))
    return out


def dashboard_expressions(dashboard: dict[str, Any]) -> dict[str, str]:
    """The PromQL of a Grafana dashboard: each panel target's ``expr`` and each query variable's selector."""
    out: dict[str, str] = {}
    panels = list(dashboard.get("panels") or [])
    while panels:
        panel = panels.pop()
        panels.extend(panel.get("panels") or [])  # panels inside collapsed rows
        for target in panel.get("targets") or []:
            if target.get("expr"):
                out[f"panel {panel.get('title')!r} {target.get('refId')}"] = target["expr"]
    for variable in (dashboard.get("templating") or {}).get("list") or []:
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        match = _LABEL_VALUES.match(text)
        if match is None:
            raise ValueError(f"variable {variable.get('name')}: not a label_values(...) query: {text!r}")
        out[f"variable {variable['name']}"] = match["query"]
    return out
