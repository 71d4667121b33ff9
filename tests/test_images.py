"""The container images: both Dockerfiles are multi-stage with a labelled, prunable build stage and a
non-root runtime, and the wheel they install carries both programs (no Docker engine runs here, so the
build steps themselves are exercised by building that wheel)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

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
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), "."],
        check=True, cwd=REPO, capture_output=True,
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


def test_python_m_works_from_the_repository_root() -> None:
    """operator/ holds the package wal_operator and is no package itself: the stdlib module wins."""
    for module in ("listener", "wal_operator"):
        run = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
    assert not (REPO / "operator" / "__init__.py").exists() and not (REPO / "wal_operator").exists()


_BLOCK_BROKERS = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("nats", "aiokafka", "aio_pika", "aiormq", "pamqp", "grpc") or name == "google.cloud":
            raise ImportError(f"{name} is not in the operator image")
sys.meta_path.insert(0, Block())
import wal_operator.handlers, wal_operator.main, listener.config, listener.catalog
"""


def test_the_operator_needs_no_broker_client() -> None:
    run = subprocess.run([sys.executable, "-c", _BLOCK_BROKERS], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    install = next(line for line in _stages("Dockerfile.operator")[0] if "pip install -c constraints.txt" in line)
    assert install.split("whl)")[1].startswith("[operator,fast]")


def _requirements() -> list[Requirement]:
    """Everything the images install: the project's dependencies and its all/operator/fast extras."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    found = [Requirement(r) for r in project["dependencies"]]
    extras = project["optional-dependencies"]
    for extra in ("nats", "kafka", "rabbitmq", "pubsub", "operator", "fast"):
        found += [Requirement(r) for r in extras[extra]]
    return found


def test_constraints_pin_every_requirement_within_its_range() -> None:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    for req in _requirements():
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req.name} is not pinned in constraints.txt: run scripts/lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req}: constraints.txt pins {pins[name]}"
    for dockerfile in ("Dockerfile.listener", "Dockerfile.operator"):
        assert "-c constraints.txt" in (REPO / dockerfile).read_text(), dockerfile


def test_one_version() -> None:
    from listener import __version__

    chart = yaml.safe_load((REPO / "charts" / "wal-listener-operator" / "Chart.yaml").read_text())
    assert chart["appVersion"] == __version__
    assert metadata.version("wal-listener") == __version__  # pyproject takes it from listener.__version__
