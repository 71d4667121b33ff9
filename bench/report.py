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
    header = ["broker", "workload", "events", "seconds", "events/s", "% of ceiling", "p50/p99 ms",
              "peak RSS MB", "CPU s"]
    body = []
    for r in rows:
        latency = "-" if r.p50_ms is None else f"{r.p50_ms:.1f} / {r.p99_ms:.1f}"
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


def write_json(path: Path, meta: dict[str, Any], rows: list[Row], skipped: dict[str, str],
               latency_series: dict[str, list[dict[str, float]]], profiles: dict[str, Any]) -> None:
    data = {
        "meta": meta,
        "rows": [asdict(r) for r in rows],
        "skipped": skipped,
        "latency_series": latency_series,
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
    ax.axhline(20, color="#2ca02c", lw=0.8, alpha=0.6, label="p50 target 20 ms")
    ax.axhline(100, color="#d62728", lw=0.8, alpha=0.6, label="p99 target 100 ms")
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
    out = [f"py-spy profile of the {broker} listener on the reference workload ({summary['samples']} samples, "
           "CPU only: idle waits are not sampled)"]
    out.append("  by area (self time):  " + ", ".join(f"{a['function']} {a['pct']}%" for a in summary["areas"][:10]))
    out.append("  top functions by self time:")
    out += [f"    {f['pct']:5.1f}%  {f['function']}" for f in summary["self"][:top]]
    out.append("  top functions by inclusive time (entry frames: runpy, main, asyncio.run, the loop left out):")
    out += [f"    {f['pct']:5.1f}%  {f['function']}" for f in summary["inclusive"][:top]]
    return "\n".join(out)
