"""Sweeps at scale: resumable sweeps, a SIGKILL mid-sweep, launchers, the device lock."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, compose, results_under, run_cli

from bench import device_lock
from bench.harness import new_record
from bench.records import config_hash

CHEAP = ["device=cpu", "bench.warmup=0", "bench.repeats=2", "bench.check_error=false"]


def test_config_hash_is_stable_and_ignores_how_a_cell_is_run():
    a = new_record(compose("seq_len=512"))["config_hash"]
    assert a == new_record(compose("seq_len=512"))["config_hash"]
    assert a == new_record(compose("seq_len=512", "resume=true", "wandb.mode=offline"))["config_hash"]
    assert a != new_record(compose("seq_len=1024"))["config_hash"]
    assert a != new_record(compose("seq_len=512", "attention=chunked"))["config_hash"]
    assert config_hash({"x": 1, "bench": {"progress": True}}) == config_hash({"bench": {"progress": False}, "x": 1})


@pytest.mark.slow
def test_resume_skips_recorded_cells_and_reruns_errors(tmp_path):
    cells = ["-m", "attention=full,chunked", "seq_len=32,64", *CHEAP]
    first = run_cli(*cells, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert len(results_under(tmp_path / "sweep")) == 4
    error_dir = sorted(p.parent for p in (tmp_path / "sweep").rglob("result.json"))[0]
    record = (error_dir / "result.json").read_text().replace('"status": "ok"', '"status": "error"', 1)
    (error_dir / "result.json").write_text(record)  # as if this cell had failed

    again = run_cli(*cells, "resume=true", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "resume: skipped 3 cell(s) already recorded" in again.stdout
    records = results_under(tmp_path / "sweep")
    assert sorted(r["status"] for r in records) == ["ok"] * 4
    assert len({r["config_hash"] for r in records}) == 4


@pytest.mark.slow
def test_a_sweep_killed_with_sigkill_resumes_with_every_cell_recorded_once(tmp_path):
    lengths = "seq_len=" + ",".join(str(64 * i) for i in range(1, 9))  # 8 cells
    cells = ["-m", "attention=full", lengths, "device=cpu", "bench.warmup=1", "bench.repeats=20", "bench.min_time_s=0"]
    env = {**os.environ, "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
    command = [sys.executable, str(ROOT / "run.py"), *cells, f"hydra.sweep.dir={tmp_path}/sweep"]
    sweep = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 240
    while len(list((tmp_path / "sweep").rglob("result.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(sweep.pid, signal.SIGKILL)
    sweep.wait()
    done = results_under(tmp_path / "sweep")  # every record there parses: none is half-written
    assert 2 <= len(done) < 8, f"the kill landed after {len(done)} of 8 cells"

    resumed = run_cli(*cells, "resume=true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resume: skipped {len(done)} cell(s)" in resumed.stdout
    records = results_under(tmp_path / "sweep")
    assert sorted(r["seq_len"] for r in records) == [64 * i for i in range(1, 9)]  # each exactly once
    assert all(r["status"] == "ok" for r in records)


@pytest.mark.slow
def test_submitit_local_runs_each_job_in_its_own_process(tmp_path):
    out = run_cli(
        "-m", "hydra/launcher=submitit_local", "attention=full,chunked", "seq_len=256,512", *CHEAP, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    records = results_under(tmp_path / "sweep")
    assert sorted((r["attention"], r["seq_len"], r["status"]) for r in records) == [
        ("chunked", 256, "ok"),
        ("chunked", 512, "ok"),
        ("full", 256, "ok"),
        ("full", 512, "ok"),
    ]
    assert len({r["pid"] for r in records}) == 4 and os.getpid() not in {r["pid"] for r in records}


@pytest.mark.slow
def test_ray_launcher_runs_a_sweep_on_a_local_cluster(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    out = run_cli(
        "-m",
        "hydra/launcher=ray",
        "attention=full",
        "seq_len=32,64",
        *CHEAP,
        cwd=tmp_path,
        env={"RAY_USAGE_STATS_ENABLED": "0"},
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    records = results_under(tmp_path / "sweep")
    assert sorted((r["seq_len"], r["status"]) for r in records) == [(32, "ok"), (64, "ok")]
    assert os.getpid() not in {r["pid"] for r in records}


def test_timing_jobs_on_one_device_wait_for_each_other(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFICIENT_LOCK_DIR", str(tmp_path))
    spans = []

    def timing_job():
        with device_lock.held("cpu"):
            started = time.monotonic()
            time.sleep(0.2)
            spans.append((started, time.monotonic()))

    workers = [threading.Thread(target=timing_job) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    spans.sort()
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:]))  # never overlapping


# -- bench=maxlen -----------------------------------------------------------------------------
from bench.harness import run_job  # noqa: E402
from bench.records import validate  # noqa: E402


def longest(*overrides):
    record = run_job(compose("bench=maxlen", "device=cpu", *overrides))
    assert record["status"] == "ok" and validate(record) == [], record.get("reason")
    return record


def test_maxlen_doubles_then_bisects_to_the_resolution():
    full = longest("attention=full", "bench.memory_budget_gib=1", "seq_len=256")
    chunked = longest("attention=chunked", "bench.memory_budget_gib=1", "seq_len=256")
    # linear against quadratic memory: at 1 GiB the guard admits 15,104 tokens for chunked
    # (its model counts its [n, d] tensors) against 2,304 for full
    assert chunked["max_seq_len"] > 4 * full["max_seq_len"]
    for record in (full, chunked):
        tried = [t["seq_len"] for t in record["tried"]]
        last_doubling = max(i for i in range(1, len(tried)) if tried[i] == 2 * tried[i - 1])
        assert tried[: last_doubling + 1] == [256 * 2**i for i in range(last_doubling + 1)]
        too_long = tried[last_doubling]  # then bisect between half of it and it
        assert all(too_long // 2 < n < too_long for n in tried[last_doubling + 1 :])
        assert 0 < record["first_failing"] - record["max_seq_len"] <= 256
        fits = {t["seq_len"]: t["fits"] for t in record["tried"]}
        assert fits[record["max_seq_len"]] and not fits[record["first_failing"]]
        assert all(t["peak_mib"] <= 1024 for t in record["tried"] if t["fits"])


def test_maxlen_by_measuring_runs_the_step():
    record = longest(
        "attention=full", "bench.method=measure", "bench.memory_budget_gib=0.05", "seq_len=128", "bench.resolution=64"
    )
    assert record["method"] == "measure" and 128 <= record["max_seq_len"] < 4096
    assert all(t["peak_mib"] > 0 for t in record["tried"])  # measured peaks, not predictions


def test_maxlen_start_that_does_not_fit_is_oom():
    record = run_job(compose("bench=maxlen", "device=cpu", "bench.memory_budget_gib=0.001", "seq_len=4096"))
    assert record["status"] == "oom" and "starting length 4096 does not fit" in record["reason"]


@pytest.mark.gpu
def test_maxlen_on_gpu_recovers_from_real_out_of_memory():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    record = run_job(
        compose(
            "bench=maxlen",
            "attention=full",
            "device=cuda",
            "dtype=bfloat16",
            "bench.memory_budget_gib=1000",
            "seq_len=4096",
            "bench.resolution=1024",
        )
    )
    assert record["status"] == "ok" and record["method"] == "measure"
    assert any(t["peak_mib"] is None for t in record["tried"])  # a real OOM, caught
    assert torch.cuda.memory_allocated() < 2**30  # and freed


def launcher(name):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(
            config_name="config", overrides=[f"hydra/launcher={name}"], return_hydra_config=True
        ).hydra.launcher


def test_cluster_launchers_give_each_job_a_gpu():
    slurm = launcher("slurm")
    assert slurm._target_.endswith("SlurmLauncher") and slurm.gpus_per_node == 1 and slurm.array_parallelism == 16
    ray = launcher("ray_gpu")
    assert ray._target_.endswith("RayLauncher") and ray.ray.remote.num_gpus == 1 and ray.ray.init.address is None


@pytest.mark.slow
def test_joblib_runs_accuracy_jobs_side_by_side(tmp_path):
    tiny = [
        "bench=accuracy",
        "task=recall",
        "causal=true",
        "task.vocab_size=16",
        "task.n_pairs=2",
        "task.n_queries=2",
        "task.n_train=64",
        "task.n_val=16",
        "task.n_test=16",
        "seq_len=16",
        "batch_size=8",
        "model.d_model=16",
        "model.n_heads=2",
        "model.n_layers=1",
        "model.d_ff=32",
        "bench.steps=4",
        "bench.eval_every=4",
        "bench.progress=false",
        "bench.threads=1",
        "device=cpu",
    ]
    out = run_cli("-m", "hydra/launcher=joblib_cpu", "attention=full,sdpa", *tiny, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    records = results_under(tmp_path / "sweep")
    assert sorted((r["attention"], r["status"], r["threads"]) for r in records) == [
        ("full", "ok", 1),
        ("sdpa", "ok", 1),
    ]
    assert len({r["pid"] for r in records}) == 2


# -- named studies ----------------------------------------------------------------------------
@pytest.mark.parametrize("study", sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")))
def test_every_study_composes_against_the_schema(study):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=[f"experiment={study}"], return_hydra_config=True)
    OmegaConf.to_container(cfg, resolve=False)  # every value is valid for its schema
    swept = cfg.hydra.sweeper.params or {}
    for name in str(swept.get("attention", cfg.attention.name)).split(","):
        assert (ROOT / "conf" / "attention" / f"{name}.yaml").exists(), name
    if study.startswith("scaling"):
        assert cfg.hydra.sweep.dir == f"outputs/studies/{study}"  # a fixed folder: resume=true finds it


def test_the_memory_guard_never_predicts_less_than_the_measured_peak(backend_name):
    """The guard (and maxlen's CPU search) is only safe if its model bounds the real peak."""
    record = run_job(
        compose(
            f"attention={backend_name}",
            "device=cpu",
            "seq_len=2048",
            "bench.warmup=0",
            "bench.repeats=1",
            "bench.check_error=false",
        )
    )
    if record["status"] == "unsupported":
        pytest.skip(record["reason"])
    assert record["status"] == "ok", record.get("reason")
    assert record["predicted_mem_mib"] >= record["peak_mem_mib"] > 0
