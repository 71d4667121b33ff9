"""listener.prom: the metric types and the text exposition /metrics serves, read back as Prometheus'
own client parses a scrape."""

from __future__ import annotations

import math
import random

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from listener import metrics
from listener.prom import (
    CONTENT_TYPE,
    Counter,
    Gauge,
    MetricError,
    Registry,
    Tally,
    exposition,
    format_value,
)

AWKWARD = 'back\\slash "quoted"\nnew line é'


def sample_registry() -> Registry:
    registry = Registry()
    plain = Counter("events", "Events seen.", registry=registry)
    plain.inc()
    plain.inc(2)
    per_table = Counter("published", 'Published, by table ("t") and \\ subject.\nSecond line.', ["table", "subject"],
                        registry=registry)
    per_table.labels("public.users", "cdc.users").inc(3)
    per_table.labels(AWKWARD, "s").inc(0.5)
    per_table.labels(table="kw", subject="x").inc()
    Counter("unused", "Never counted.", ["table"], registry=registry)
    lsn = Gauge("lsn", "An LSN.", registry=registry)
    lsn.set(123456789)
    up = Gauge("up", "Connection up.", ["target"], registry=registry)
    up.labels("postgres").set(1)
    up.labels("broker").set_function(lambda: 0.0)
    odd = Gauge("odd", "Odd values.", ["kind"], registry=registry)
    for kind, value in (("inf", math.inf), ("minus_inf", -math.inf), ("nan", math.nan), ("negative", -1),
                        ("fraction", 0.25), ("tiny", 1e-7), ("huge", 1.5e20)):
        odd.labels(kind).set(value)
    tally = Tally("fallbacks", "Fallbacks.", ["table", "reason"], registry=registry)
    tally.cell(("public.t", "null"))[0] += 4
    tally.cell(("public.t", "empty"))  # taken, never counted: no sample
    return registry


EXPECTED = (
    "# HELP events_total Events seen.\n"
    "# TYPE events_total counter\n"
    "events_total 3.0\n"
    '# HELP published_total Published, by table ("t") and \\\\ subject.\\nSecond line.\n'
    "# TYPE published_total counter\n"
    'published_total{subject="cdc.users",table="public.users"} 3.0\n'
    'published_total{subject="s",table="back\\\\slash \\"quoted\\"\\nnew line é"} 0.5\n'
    'published_total{subject="x",table="kw"} 1.0\n'
    "# HELP unused_total Never counted.\n"
    "# TYPE unused_total counter\n"
    "# HELP lsn An LSN.\n"
    "# TYPE lsn gauge\n"
    "lsn 1.23456789e+08\n"
    "# HELP up Connection up.\n"
    "# TYPE up gauge\n"
    'up{target="postgres"} 1.0\n'
    'up{target="broker"} 0.0\n'
    "# HELP odd Odd values.\n"
    "# TYPE odd gauge\n"
    'odd{kind="inf"} +Inf\n'
    'odd{kind="minus_inf"} -Inf\n'
    'odd{kind="nan"} NaN\n'
    'odd{kind="negative"} -1.0\n'
    'odd{kind="fraction"} 0.25\n'
    'odd{kind="tiny"} 1e-07\n'
    'odd{kind="huge"} 1.5e+20\n'
    "# HELP fallbacks_total Fallbacks.\n"
    "# TYPE fallbacks_total counter\n"
    'fallbacks_total{reason="null",table="public.t"} 4.0\n'
)


def test_the_exposition_is_the_text_format_line_for_line() -> None:
    assert exposition(sample_registry()).decode() == EXPECTED
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


def test_a_consumer_parses_back_every_family_label_and_value() -> None:
    families = {f.name: f for f in text_string_to_metric_families(exposition(sample_registry()).decode())}
    assert {name: f.type for name, f in families.items()} == {
        "events": "counter", "published": "counter", "unused": "counter", "lsn": "gauge", "up": "gauge",
        "odd": "gauge", "fallbacks": "counter",
    }
    assert families["published"].documentation == 'Published, by table ("t") and \\ subject.\nSecond line.'
    published = {(s.labels["table"], s.labels["subject"]): s.value for s in families["published"].samples}
    assert published == {("public.users", "cdc.users"): 3.0, (AWKWARD, "s"): 0.5, ("kw", "x"): 1.0}
    assert [(s.name, s.value) for s in families["events"].samples] == [("events_total", 3.0)]
    assert families["unused"].samples == []
    assert families["lsn"].samples[0].value == 123456789
    odd = {s.labels["kind"]: s.value for s in families["odd"].samples}
    assert math.isnan(odd.pop("nan"))
    assert odd == {"inf": math.inf, "minus_inf": -math.inf, "negative": -1, "fraction": 0.25, "tiny": 1e-7,
                   "huge": 1.5e20}
    fallbacks = families["fallbacks"].samples
    assert [(s.labels, s.value) for s in fallbacks] == [({"table": "public.t", "reason": "null"}, 4)]


def test_values_are_written_as_prometheus_clients_write_them() -> None:
    cases = {0: "0.0", 3: "3.0", -1: "-1.0", 0.25: "0.25", 999999: "999999.0", 1e6: "1e+06", 1234567: "1.234567e+06",
             1234567.5: "1.2345675e+06", 10000000.5: "1.00000005e+07", 2**53: "9.007199254740992e+15",
             1e16: "1e+16", 1e-7: "1e-07", -1234567: "-1234567.0", math.inf: "+Inf", -math.inf: "-Inf",
             math.nan: "NaN"}
    assert {value: format_value(value) for value in cases} == cases
    rng = random.Random(24)
    values = [rng.choice([1, -1]) * 10 ** rng.uniform(-10, 20) for _ in range(2000)]
    values += [float(rng.randrange(0, 2**64)) for _ in range(500)]  # LSNs
    assert [format_value(v) for v in values] == [floatToGoString(v) for v in values]


def test_get_sample_value_reads_one_series_or_none() -> None:
    registry = sample_registry()
    assert registry.get_sample_value("events_total") == 3.0
    assert registry.get_sample_value("published_total", {"table": AWKWARD, "subject": "s"}) == 0.5
    assert registry.get_sample_value("published_total", {"table": AWKWARD}) is None
    assert registry.get_sample_value("published", {"table": "kw", "subject": "x"}) is None  # counters: _total
    assert registry.get_sample_value("up", {"target": "broker"}) == 0.0
    assert registry.get_sample_value("fallbacks_total", {"table": "public.t", "reason": "null"}) == 4
    assert registry.get_sample_value("missing") is None


def test_gauges_go_up_and_down_and_read_a_function_until_set() -> None:
    registry = Registry()
    gauge = Gauge("g", "A gauge.", registry=registry)
    gauge.inc(5)
    gauge.dec()
    gauge.dec(0.5)
    assert gauge.get() == registry.get_sample_value("g") == 3.5
    level = [7.0]
    gauge.set_function(lambda: level[0])
    level[0] = 8.0
    assert registry.get_sample_value("g") == 8.0
    gauge.set(2)
    level[0] = 9.0
    assert registry.get_sample_value("g") == 2.0


def test_labels_by_position_or_name_are_one_series_and_values_become_text() -> None:
    counter = Counter("c", "A counter.", ["table", "column"])
    assert counter.labels("t", "c") is counter.labels(table="t", column="c") is counter.labels(column="c", table="t")
    assert counter.labels(1, None) is counter.labels("1", "None")


@pytest.mark.parametrize("misuse", [
    lambda: Counter("c", "", ["table"]).labels(),
    lambda: Counter("c", "", ["table"]).labels("a", "b"),
    lambda: Counter("c", "", ["table"]).labels(tabel="a"),
    lambda: Counter("c", "", ["table"]).labels("a", table="a"),
    lambda: Counter("c", "", ["table"]).inc(),
    lambda: Counter("c", "").labels("a"),
    lambda: Counter("c", "").inc(-1),
    lambda: Counter("c", "", ["table"]).labels("a").inc(-0.5),
    lambda: Gauge("g", "", ["target"]).set(1),
    lambda: Counter("c_total", ""),
    lambda: Counter("bad-name", ""),
    lambda: Gauge("g", "", ["__reserved"]),
    lambda: Gauge("g", "", ["a", "a"]),
    lambda: Tally("t", "", ["bad label"]),
])
def test_misuse_is_a_metric_error(misuse: object) -> None:
    with pytest.raises(MetricError):
        misuse()  # type: ignore[operator]


def test_a_name_is_registered_once() -> None:
    registry = Registry()
    Counter("twice", "", registry=registry)
    with pytest.raises(MetricError, match="twice"):
        Gauge("twice", "", registry=registry)


def test_the_listeners_metrics_parse_back_with_their_names_types_and_labels() -> None:
    import listener.app  # noqa: F401 - every stage, and so every metric it registers

    ours = {f.name: (f.type, f.labelnames) for f in metrics.REGISTRY.collect()}
    parsed = {f.name: f.type for f in text_string_to_metric_families(exposition(metrics.REGISTRY).decode())}
    assert parsed == {name: kind for name, (kind, _) in ours.items()}
    assert ours["published_events"] == ("counter", ("subject", "table"))
    assert ours["transform_fallbacks"] == ("counter", ("table", "reason"))
    assert ours["listener_ready"] == ("gauge", ())
    assert not any(name.endswith("_created") for name in parsed)
