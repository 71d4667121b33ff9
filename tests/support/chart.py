"""The operator's Helm chart rendered offline (helm-python-sdk), as a list of manifests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "wal-listener-operator"
RELEASE = "wal"
NAMESPACE = "cdc-system"


def render_chart(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every manifest of the chart for ``values`` (schema-checked first), NOTES.txt left out."""
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values or {})
        rendered = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs
