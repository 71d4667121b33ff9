"""The container images: both Dockerfiles are multi-stage with a labelled, prunable build stage and a
non-root runtime, and the wheel they install carries both programs (no Docker engine runs here, so the
build steps themselves are exercised by building that wheel)."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _stages(name: str) -> list[list[str]]:
    stages: list[list[str]] = []
    for raw in (REPO / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_listener_image_is_multi_stage_non_root_with_config_at_app() -> None:
    stages = _stages("Dockerfile.listener")
    assert len(stages) >= 2
    assert any(re.fullmatch(r"LABEL\s+stage=builder", line) for line in stages[0])
    final = stages[-1]
    assert not any("stage=builder" in line for line in final)
    users = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(line.startswith("ENTRYPOINT") and "wal-listener" in line for line in final)
    assert any("/app/config.yml" in line for line in final if line.startswith("CMD"))


def test_operator_image_is_multi_stage_non_root_running_the_operator() -> None:
    stages = _stages("Dockerfile.operator")
    assert len(stages) >= 2
    assert any(re.fullmatch(r"LABEL\s+stage=builder", line) for line in stages[0])
    final = stages[-1]
    assert not any("stage=builder" in line for line in final)
    assert any(line.startswith("COPY --from=") for line in final)
    users = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] == "10001"  # the chart runs the pod as this uid, runAsNonRoot
    assert any(line.startswith("ENTRYPOINT") and "wal-operator" in line for line in final)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-P", "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
         str(REPO)],
        check=True, cwd="/", capture_output=True,
    )
    return next(out.glob("wal_listener-*.whl"))


def test_wheel_carries_both_programs_and_their_entry_points(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("listener/app.py", "listener/publishers/nats.py", "listener/publishers/kafka.py",
                   "wal_operator/handlers.py", "wal_operator/main.py"):
        assert module in names, module
    assert not any(n.startswith("operator/") for n in names)  # never shadows the stdlib module
    assert any(re.fullmatch(r"listener/_hotpath\.cpython-.*\.so", n) for n in names), "compiled hot path not built"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "wal-listener = listener.cli:main" in text and "wal-operator = wal_operator.main:main" in text
