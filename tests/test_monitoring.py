"""The chart's alerts and Grafana dashboard read only metrics that a running listener really exposes.

The PromQL is taken from the rendered chart (every alert ``expr``, every dashboard target and variable
query), parsed with a real PromQL parser, and its metric names are compared with the ``# TYPE`` lines
of ``/metrics`` served by a ``wal-listener`` process streaming from PostgreSQL to NATS.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.support.chart import render_chart
from tests.support.harness import ListenerProcess, http_get, nats_config, sql, unique, wait_until
from tests.support.promql import chart_expressions, exposed_metrics, metric_names
from tests.support.services import NatsServer, PostgresServer, free_port

ALL_MONITORING: dict[str, Any] = {
    "monitoring": {kind: {"enabled": True} for kind in ("podMonitor", "serviceMonitor", "grafanaDashboard")}
}
#: (watchNamespaces, prometheusRule values): the alerts as rendered by default, with extra label matchers
#: in every selector, and limited to the watched namespaces
RULE_VARIANTS: list[tuple[list[str], dict[str, Any]]] = [
    ([], {"enabled": True}),
    ([], {"enabled": True, "selector": 'job=~".*wal.*"'}),
    (["shop", "billing"], {"enabled": True, "selector": 'job=~".*wal.*"'}),
]
#: what the rules and the dashboard must read at least: guards against an extractor that finds nothing
MUST_BE_READ = {
    "replication_lag_bytes",
    "replication_lag_seconds",
    "slot_wal_status",
    "slot_problem",
    "listener_ready",
    "publish_errors_total",
    "backfill_running",
    "snapshot_rows_total",
    "published_events_total",
    "in_flight_events",
    "reconnects_total",
    "slot_retained_wal_bytes",
    "up",
    "publication_tables_without_identity",
}


def chart_promql() -> dict[str, str]:
    """Every PromQL expression of the chart with all monitoring on, in each rule variant."""
    out: dict[str, str] = {}
    for index, (namespaces, rule) in enumerate(RULE_VARIANTS):
        values = {"watchNamespaces": namespaces, "monitoring": {**ALL_MONITORING["monitoring"], "prometheusRule": rule}}
        out.update({f"{where} (variant {index})": e for where, e in chart_expressions(render_chart(values)).items()})
    return out


# -- the extraction itself (no service) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        ('sum by (table, reason) (rate(publish_errors_total{reason=~"a|b", table="x(y)"}[5m])) > 0',
         {"publish_errors_total"}),
        ("max_over_time(replication_lag_bytes[1h:5m]) > 1e9 unless on (pod, table) backfill_running == 1",
         {"replication_lag_bytes", "backfill_running"}),
        ('{__name__="listener_ready", namespace=~"$namespace"} == bool 0', {"listener_ready"}),
        ("histogram_quantile(0.9, sum without (pod) (rate(x_bucket[$__rate_interval]))) * on () group_left sum(y)",
         {"x_bucket", "y"}),
        ('count(label_replace(in_flight_events offset 5m, "rate", "$1", "sum", "(.*)"))', {"in_flight_events"}),
        ("vector(1) + scalar(sum(slot_problem))", {"slot_problem"}),
    ],
    ids=["bare", "grouping-and-strings", "subquery-and-set-ops", "name-matcher", "functions-and-modifiers",
         "strings-like-names", "no-selector-args"],
)
def test_metric_names_are_exactly_the_selected_ones(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


@pytest.mark.parametrize("expr", ["sum(rate(x[5m])", "rate(x)", "1 > 0", '{__name__=~"slot_.*"}'])
def test_expressions_it_cannot_read_are_refused(expr: str) -> None:
    with pytest.raises(ValueError):
        metric_names(expr)


def test_exposed_metrics_reads_type_lines_and_counter_samples() -> None:
    text = (
        "# HELP reconnects Reconnections.\n# TYPE reconnects counter\nreconnects_total{target=\"x\"} 1.0\n"
        "# TYPE published_events_total counter\n# TYPE listener_ready gauge\nlistener_ready 1.0\n"
        "# TYPE lag histogram\nlag_bucket{le=\"1\"} 0\n"
    )
    assert exposed_metrics(text) == {
        "reconnects", "reconnects_total", "published_events_total", "listener_ready", "lag",
    }


def test_every_chart_expression_parses_and_reads_the_key_metrics() -> None:
    promql = chart_promql()
    assert sum(where.startswith("rule ") for where in promql) == len(RULE_VARIANTS) * 10
    assert sum(where.startswith("panel ") for where in promql) >= len(RULE_VARIANTS) * 10
    used = {where: metric_names(expr) for where, expr in promql.items()}
    assert all(used.values()), [where for where, names in used.items() if not names]
    assert MUST_BE_READ <= set().union(*used.values())
    lag_rule = next(e for where, e in promql.items() if where.startswith("rule WalListenerReplicationLagBytes"))
    assert metric_names(lag_rule) == {"replication_lag_bytes"}


# -- against a running listener -----------------------------------------------------------------------


@pytest.mark.service
async def test_chart_promql_reads_only_metrics_a_running_listener_exposes(
    pg: PostgresServer, fresh_db: str, nats_server: NatsServer, tmp_path: Path, procs: list[ListenerProcess]
) -> None:
    await sql(pg.dsn(fresh_db), "CREATE TABLE items (id int PRIMARY KEY, payload text)")
    port = free_port()
    cfg = nats_config(pg.port, fresh_db, nats_server.url, unique("mon"))
    cfg["monitoring"]["promAddr"] = f"127.0.0.1:{port}"
    proc = ListenerProcess(cfg, tmp_path).start()
    procs.append(proc)
    await wait_until(lambda: '"msg":"streaming"' in proc.output(), 30, "the listener to stream")
    status, body = await http_get(port, "/metrics")
    assert status == 200, body[:500]
    exposed = exposed_metrics(body)
    assert {"listener_ready", "published_events_total", "replication_lag_bytes"} <= exposed

    promql = chart_promql()
    used = {where: metric_names(expr) for where, expr in promql.items()}
    missing = {where: sorted(names - exposed) for where, names in used.items() if names - exposed}
    assert not missing, f"PromQL reads metrics the listener does not expose: {missing}"
    assert MUST_BE_READ <= set().union(*used.values())

    # the comparison is not vacuous: a renamed metric in any rule or panel would be reported
    for where, expr in promql.items():
        for name in used[where]:
            renamed = re.sub(rf"\b{name}\b", f"{name}_renamed", expr)
            assert f"{name}_renamed" in metric_names(renamed) - exposed, (where, name)
    assert proc.terminate() == 0
