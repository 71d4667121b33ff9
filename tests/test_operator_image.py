"""Dockerfile.operator: multi-stage, the build stage labelled, a non-root runtime running wal-operator."""

from __future__ import annotations

import re
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parent.parent / "Dockerfile.operator"


def _stages() -> list[list[str]]:
    stages: list[list[str]] = []
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_multi_stage_with_labelled_builder() -> None:
    stages = _stages()
    assert len(stages) >= 2
    assert any(re.fullmatch(r"LABEL\s+stage=builder", line) for line in stages[0])
    assert not any("stage=builder" in line for line in stages[-1])
    assert any(line.startswith("COPY --from=") for line in stages[-1])


def test_runtime_is_non_root_and_runs_the_operator() -> None:
    final = _stages()[-1]
    users = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(line.startswith("ENTRYPOINT") and "wal-operator" in line for line in final)
    # the chart runs the pod as this uid with runAsNonRoot
    assert users[-1].split(":")[0] == "10001"
