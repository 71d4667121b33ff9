"""The results: one table on stdout, results.json, a PNG chart."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CEILING = "pg_recvlogical"


@dataclass
class Row:
    broker: str
    workload: str  # the workload's key: reference, wide, txn-1M, steady, idle
    label: str  # how the table shows it
    events: int | None = None
    seconds: float | None = None
    events_per_s: float | None = None
    pct_of_ceiling: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    peak_rss_mb: float | None = None
    cpu_s: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.1f}k" if value >= 10_000 else f"{value:,.0f}"


def format_table(rows: list[Row]) -> str:
    header = ["broker", "workload", "events", "seconds", "events/s", "% of ceiling", "p50/p90/p99 ms",
              "peak RSS MB", "CPU s"]
    body = []
    for r in rows:
        latency = "-" if r.p50_ms is None else f"{r.p50_ms:.1f} / {r.p90_ms:.1f} / {r.p99_ms:.1f}"
        body.append([
            r.broker, r.label, _num(r.events, ","), _num(r.seconds, ".2f"), _rate(r.events_per_s),
            "-" if r.pct_of_ceiling is None else f"{r.pct_of_ceiling:.0f}%", latency,
            _num(r.peak_rss_mb, ".0f"), _num(r.cpu_s, ".2f"),
        ])  # fmt: skip
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    right = {2, 3, 4, 5, 6, 7, 8}

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                              strict=True)))

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(b) for b in body]
    notes = [f"  [{r.broker} / {r.label}] {r.note}" for r in rows if r.note]
    if notes:
        out += ["", "notes:", *notes]
    return "\n".join(out)


#: upper bounds (ms) of the latency histogram's buckets; the last one takes everything slower
HISTOGRAM_BOUNDS_MS = (0.5, 1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, float("inf"))


def histogram(sorted_ms: list[float], bounds: tuple[float, ...] = HISTOGRAM_BOUNDS_MS) -> list[tuple[float, int]]:
    """(upper bound ms, how many latencies are in (previous bound, bound]) for each bucket."""
    counts, i = [], 0
    for bound in bounds:
        start = i
        while i < len(sorted_ms) and sorted_ms[i] <= bound:
            i += 1
        counts.append((bound, i - start))
    return counts


def distribution(sorted_ms: list[float]) -> dict[str, Any]:
    """p50/p90/p99/p99.9/max and the histogram of one latency phase (``sorted_ms`` ascending)."""
    return {
        "count": len(sorted_ms),
        **{f"p{q:g}_ms".replace(".", ""): round(percentile(sorted_ms, q), 2) for q in (50, 90, 99, 99.9)},
        "max_ms": round(sorted_ms[-1], 2) if sorted_ms else None,
        "histogram": [{"le_ms": bound, "count": n} for bound, n in histogram(sorted_ms)],
    }


def format_histogram(broker: str, dist: dict[str, Any], width: int = 50) -> str:
    """The latency histogram as text bars, one line per bucket, with where p50/p90/p99/max fall."""
    buckets = dist["histogram"]
    while buckets and buckets[-1]["count"] == 0:
        buckets = buckets[:-1]
    top = max((b["count"] for b in buckets), default=0) or 1
    marks = {"p50": dist["p50_ms"], "p90": dist["p90_ms"], "p99": dist["p99_ms"], "max": dist["max_ms"]}
    stats = " / ".join(f"{name} {value:.1f}" for name, value in marks.items())
    out = [f"   {broker}: commit -> consumer latency, {dist['count']:,} events ({stats} ms)"]
    low = 0.0
    for b in buckets:
        bound, n = b["le_ms"], b["count"]
        here = [name for name, v in marks.items() if v is not None and low < v <= bound]
        label = f"> {low:g} ms" if bound == float("inf") else f"<= {bound:g} ms"
        bar = "#" * (round(width * n / top) if n else 0)
        out.append(f"   {label:>11} {n:>9,} {100 * n / max(dist['count'], 1):5.1f}% {bar:<{width}} {' '.join(here)}")
        low = bound
    return "\n".join(out)


def write_latency_chart(path: Path, distributions: dict[str, dict[str, Any]], title: str) -> None:
    """A histogram picture of each broker's commit -> consumer latency, p50/p90/p99/max marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(distributions)), figsize=(7 * max(1, len(distributions)), 4.8),
                             squeeze=False)
    fig.suptitle(title, fontsize=10)
    for ax, (broker, dist) in zip(axes[0], distributions.items(), strict=False):
        buckets = [b for b in dist["histogram"] if b["le_ms"] != float("inf")]
        labels = [f"≤{b['le_ms']:g}" for b in buckets] + [f">{buckets[-1]['le_ms']:g}"]
        counts = [b["count"] for b in buckets] + [dist["histogram"][-1]["count"]]
        total = max(dist["count"], 1)
        ax.bar(range(len(counts)), [100 * c / total for c in counts], color="#1f77b4")
        ax.set_xticks(range(len(counts)), labels, fontsize=8)
        ax.set_xlabel("commit -> consumer receive, ms (bucket upper bound)")
        ax.set_ylabel("% of events")
        stats = ", ".join(f"{k} {dist[f'{k}_ms']:.1f} ms" for k in ("p50", "p90", "p99", "max"))
        ax.set_title(f"{broker}: {dist['count']:,} events — {stats}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        bounds = [b["le_ms"] for b in buckets]
        for name, color in (("p50", "#2ca02c"), ("p90", "#ff7f0e"), ("p99", "#d62728"), ("max", "#555555")):
            value = dist[f"{name}_ms"]
            index = next((i for i, bound in enumerate(bounds) if value <= bound), len(bounds))
            ax.axvline(index, color=color, lw=1, ls="--", label=f"{name} {value:.1f} ms")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: Path, meta: dict[str, Any], rows: list[Row], skipped: dict[str, str],
               latency_series: dict[str, list[dict[str, float]]], profiles: dict[str, Any],
               latency_distributions: dict[str, dict[str, Any]] | None = None) -> None:
    data = {
        "meta": meta,
        "rows": [asdict(r) for r in rows],
        "skipped": skipped,
        "latency_series": latency_series,
        "latency_distributions": latency_distributions or {},
        "profiles": profiles,
    }
    path.write_text(json.dumps(data, indent=2, default=str))


def write_chart(path: Path, rows: list[Row], latency_series: dict[str, list[dict[str, float]]],
                title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    throughput = [r for r in rows if r.workload not in ("steady", "idle") and r.events_per_s]
    workloads = list(dict.fromkeys(r.workload for r in throughput))
    labels = {r.workload: r.label for r in throughput}
    series = list(dict.fromkeys(r.broker for r in throughput))
    if CEILING in series:
        series.remove(CEILING)
        series.insert(0, CEILING)
    fig, axes = plt.subplots(1, 3, figsize=(19, 5.8), gridspec_kw={"width_ratios": [1.4, 1.4, 1]})
    fig.suptitle(title, fontsize=11)

    ax = axes[0]
    width = 0.8 / max(1, len(series))
    colors = {CEILING: "#888888"}
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"]
    for i, s in enumerate(series):
        colors.setdefault(s, palette[i % len(palette)])
        xs, ys = [], []
        for j, w in enumerate(workloads):
            match = [r for r in throughput if r.broker == s and r.workload == w]
            if match:
                xs.append(j + (i - (len(series) - 1) / 2) * width)
                ys.append(match[0].events_per_s or 0)
        bars = ax.bar(xs, ys, width, label=s + (" (ceiling)" if s == CEILING else ""), color=colors[s])
        for bar, y in zip(bars, ys, strict=True):
            ax.annotate(f"{y / 1000:.0f}k", (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom",
                        fontsize=7)
    ax.set_xticks(range(len(workloads)), [labels[w] for w in workloads], fontsize=8, rotation=10)
    ax.set_ylabel("events / s (commit -> broker ack -> LSN confirmed)")
    ax.set_title("Throughput beside the pg_recvlogical ceiling", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)

    ax = axes[1]
    for broker, points in latency_series.items():
        if not points:
            continue
        t = [p["t"] for p in points]
        ax.plot(t, [p["p50_ms"] for p in points], label=f"{broker} p50", color=colors.get(broker))
        ax.plot(t, [p["p99_ms"] for p in points], "--", label=f"{broker} p99", color=colors.get(broker))
    ax.axhline(5, color="#2ca02c", lw=0.8, alpha=0.6, label="p50 target 5 ms")
    ax.axhline(50, color="#d62728", lw=0.8, alpha=0.6, label="p99 target 50 ms")
    ax.set_yscale("log")
    ax.set_xlabel("seconds into the steady-rate phase")
    ax.set_ylabel("commit -> consumer receive, ms (per 1 s window)")
    steady = [r for r in rows if r.workload == "steady"]
    ax.set_title("Latency over time" + (f" at {steady[0].label}" if steady else ""), fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if latency_series:
        ax.legend(fontsize=8)

    ax = axes[2]
    mem = [r for r in rows if r.broker != CEILING and r.peak_rss_mb and r.workload != "idle"]
    mem_workloads = list(dict.fromkeys(r.workload for r in mem))
    mem_labels = {r.workload: r.label for r in mem}
    brokers = list(dict.fromkeys(r.broker for r in mem))
    width = 0.8 / max(1, len(brokers))
    for i, b in enumerate(brokers):
        xs, ys = [], []
        for j, w in enumerate(mem_workloads):
            match = [r for r in mem if r.broker == b and r.workload == w]
            if match:
                xs.append(j + (i - (len(brokers) - 1) / 2) * width)
                ys.append(match[0].peak_rss_mb or 0)
        ax.bar(xs, ys, width, label=b, color=colors.get(b))
    ax.axhline(150, color="#d62728", lw=0.8, alpha=0.6, label="150 MB target")
    ax.set_xticks(range(len(mem_workloads)), [mem_labels[w] for w in mem_workloads], fontsize=7, rotation=20)
    ax.set_ylabel("listener peak RSS, MB (VmHWM)")
    ax.set_title("Memory", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_profile(broker: str, summary: dict[str, Any], top: int = 12) -> str:
    out = [f"py-spy profile of the {broker} listener on the {summary.get('workload', 'reference')} workload "
           f"({summary['samples']} samples, "
           "CPU only: idle waits are not sampled)"]
    out.append("  by area (self time):  " + ", ".join(f"{a['function']} {a['pct']}%" for a in summary["areas"][:10]))
    out.append("  top functions by self time:")
    out += [f"    {f['pct']:5.1f}%  {f['function']}" for f in summary["self"][:top]]
    out.append("  top functions by inclusive time (entry frames: runpy, main, asyncio.run, the loop left out):")
    out += [f"    {f['pct']:5.1f}%  {f['function']}" for f in summary["inclusive"][:top]]
    return "\n".join(out)
