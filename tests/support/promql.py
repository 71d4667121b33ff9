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


# -- evaluating an alert on scraped metrics ---------------------------------------------------------------

Sample = tuple[dict[str, str], float]

_COMPARE = {
    ">": lambda a, b: a > b,
    "<": lambda a, b: a < b,
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}
_AGGREGATE = {"max": max, "min": min, "sum": sum, "count": len}


def scraped_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a ``/metrics`` page: (name, labels, value)."""
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, dict(s.labels), float(s.value)) for f in text_string_to_metric_families(text) for s in f.samples]


def evaluate(expr: str, text: str) -> list[Sample]:
    """The instant value of an alert expression over one scrape of ``/metrics`` (Prometheus' own target labels
    such as namespace and pod absent): the alert fires when this is not empty. Covers what the chart's rules
    use: selectors, max/min/sum/count by/without, and comparisons with a number."""
    samples = scraped_samples(text)

    def vector(node: Any) -> list[Sample]:
        if isinstance(node, promql_parser.ParenExpr):
            return vector(node.expr)
        if isinstance(node, promql_parser.VectorSelector):
            return [(labels, value) for name, labels, value in samples
                    if name == node.name and all(_matches(m, labels) for m in node.matchers.matchers)]
        if isinstance(node, promql_parser.AggregateExpr):
            groups: dict[tuple[tuple[str, str], ...], list[float]] = {}
            keep = set(node.modifier.labels) if node.modifier is not None else set()
            by = node.modifier is None or node.modifier.type == promql_parser.AggModifierType.By
            for labels, value in vector(node.expr):
                key = tuple(sorted((k, v) for k, v in labels.items() if (k in keep) == by))
                groups.setdefault(key, []).append(value)
            return [(dict(key), float(_AGGREGATE[str(node.op)](values))) for key, values in groups.items()]
        if isinstance(node, promql_parser.BinaryExpr) and isinstance(node.rhs, promql_parser.NumberLiteral):
            compare = _COMPARE[str(node.op)]
            return [(labels, value) for labels, value in vector(node.lhs) if compare(value, node.rhs.val)]
        raise ValueError(f"cannot evaluate {node!r} of {expr!r}")

    return vector(promql_parser.parse(expr))


def _matches(matcher: Any, labels: dict[str, str]) -> bool:
    value = labels.get(matcher.name, "")
    op = matcher.op
    if op == promql_parser.MatchOp.Equal:
        return value == matcher.value
    if op == promql_parser.MatchOp.NotEqual:
        return value != matcher.value
    found = re.fullmatch(matcher.value, value) is not None
    return found if op == promql_parser.MatchOp.Re else not found
