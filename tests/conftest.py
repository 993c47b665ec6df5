"""Shared fixtures: composing the real configs, running the CLI, backend parametrisation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bench.config  # noqa: E402
from efficient.attention import backend_names  # noqa: E402

bench.config.register()

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def skip_unless_available(backend_name: str, cell, **options) -> None:
    """Skip, with the backend's reason, where this machine cannot run ``cell`` (with ``options``)
    though another could: a package missing, or a CPU whose compiled kernel torch gets wrong
    (docs/upstream.md)."""
    from efficient.attention import get_backend

    reason = get_backend(backend_name).unavailable_reason(cell, **options)
    if reason:
        pytest.skip(reason)


@pytest.fixture(autouse=True)
def _no_wandb_by_default(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", os.environ.get("TEST_WANDB_MODE", "disabled"))
    monkeypatch.setenv("WANDB_SILENT", "true")


TIMED_BENCHES = ("speed", "decode", "xl_eval", "model")  # benches with a time budget (bench.min_time_s)


def no_time_budget(overrides) -> list[str]:
    """``overrides`` plus ``bench.min_time_s=0`` where every bench they name has a time budget and
    none is set: a test times the runs it asks for (``bench.repeats``), not a second of them. A
    named study (``experiment=``) keeps its own."""
    overrides = list(overrides)
    if any(o.lstrip("+").startswith("experiment=") for o in overrides):
        return overrides
    benches = next((o.split("=", 1)[1] for o in overrides if o.startswith("bench=")), "speed").split(",")
    if all(b in TIMED_BENCHES for b in benches) and not any(o.startswith("bench.min_time_s=") for o in overrides):
        overrides.append("bench.min_time_s=0")
    return overrides


def compose(*overrides: str):
    """The real config, composed as run.py would, with test overrides (and no time budget)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=no_time_budget(overrides))


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python run.py ARGS`` with outputs under ``cwd`` (a temporary folder)."""
    full_env = {**os.environ, "WANDB_MODE": "disabled", "WANDB_SILENT": "true", **(env or {})}
    cmd = [
        sys.executable,
        str(ROOT / "run.py"),
        *no_time_budget(args),
        f"hydra.run.dir={cwd}/run",
        f"hydra.sweep.dir={cwd}/sweep",
    ]
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def results_under(path: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(path.rglob("result.json"))]


def pytest_generate_tests(metafunc):
    if "backend_name" in metafunc.fixturenames:
        metafunc.parametrize("backend_name", backend_names())


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A one-node SLURM cluster for the session (tests/slurm_cluster.py); skipped where it cannot run."""
    import slurm_cluster

    reason = slurm_cluster.missing()
    if reason:
        pytest.skip(reason)
    cluster, pids = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    yield cluster
    slurm_cluster.stop(pids)
