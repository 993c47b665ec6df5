"""The command line as users call it: sweeps, records, W&B runs, bad input."""

import time

import pytest
from conftest import ROOT, results_under, run_cli

from bench import records
from efficient.attention import Setting, get_backend

SMALL = ["model.d_model=64", "model.n_heads=2", "bench.repeats=2", "bench.warmup=1"]


@pytest.mark.slow
def test_sweep_writes_ok_records_and_offline_wandb_runs(tmp_path):
    out = run_cli("-m", "attention=full", "seq_len=64,128", *SMALL, cwd=tmp_path, env={"WANDB_MODE": "offline"})
    assert out.returncode == 0, out.stderr
    results = results_under(tmp_path / "sweep")
    assert sorted(r["seq_len"] for r in results) == [64, 128]
    assert all(r["status"] == "ok" and records.validate(r) == [] for r in results)
    runs = list((tmp_path / "sweep").glob("*/wandb/offline-run-*"))
    assert len(runs) == 2
    assert "| full |" in out.stdout and (tmp_path / "sweep" / "report.md").exists()


def test_sweep_goes_on_past_a_failing_cell(tmp_path):
    # the accuracy cell fails at run time (its data file is missing); the speed cell still runs
    out = run_cli(
        "-m",
        "bench=accuracy,speed",
        "task=charlm",
        f"task.data_path={tmp_path}/missing.txt",
        "causal=true",
        "seq_len=32",
        "model.d_model=64",
        "model.n_heads=4",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    by_bench = {r["bench"]: r for r in results_under(tmp_path / "sweep")}
    assert by_bench["accuracy"]["status"] == "error" and "missing.txt" in by_bench["accuracy"]["reason"]
    assert by_bench["speed"]["status"] == "ok"


def test_unknown_backend_lists_valid_ones_without_traceback(tmp_path):
    out = run_cli("attention=nonexistent", cwd=tmp_path)
    assert out.returncode != 0
    assert "Available options in 'attention'" in out.stderr and "full" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert not results_under(tmp_path)  # nothing ran


@pytest.mark.parametrize(
    "override,message",
    [
        ("seq_len=abc", "could not be converted to Integer"),
        ("dtype=fp8", "expected one of [float64, float32, float16, bfloat16]"),
        ("attention.no_such_option=1", "no_such_option"),
    ],
)
def test_bad_values_fail_before_running(tmp_path, override, message):
    out = run_cli(override, cwd=tmp_path)
    assert out.returncode != 0 and message in out.stderr
    assert "Traceback" not in out.stderr and not results_under(tmp_path)


def test_huge_cell_is_oom_quickly(tmp_path):
    start = time.perf_counter()
    out = run_cli("attention=full", "seq_len=4000000", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (r,) = results_under(tmp_path / "run")
    assert r["status"] == "oom" and "budget" in r["reason"]
    assert time.perf_counter() - start < 60


def test_the_main_job_is_a_study_config_hydra_can_show(tmp_path):
    out = run_cli("--cfg", "hydra", "experiment=main_cpu", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "attention: ${backends:cpu,float32}" in out.stdout and "seq_len: 256,512,1024,2048,4096" in out.stdout
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=["experiment=main_cpu"], return_hydra_config=True)
    cpu_backends = [
        "bigbird",
        "chunked",
        "flex",
        "full",
        "linear",
        "linformer",
        "local",
        "longformer",
        "nystrom",
        "performer",
        "reformer",
        "sdpa",
        "sliding_window",
        "xl",
    ]  # all that run on a CPU
    runnable_here = [n for n in cpu_backends if get_backend(n).unavailable_reason(Setting("cpu", "float32")) is None]
    assert cfg.hydra.sweeper.params.attention == ",".join(runnable_here)


@pytest.mark.parametrize("spelling", ["experiment=scaling_cpu", "+experiment=scaling_cpu"])
def test_experiment_with_or_without_plus(tmp_path, spelling):
    out = run_cli("--cfg", "job", spelling, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "device: cpu" in out.stdout and "repeats: 3" in out.stdout


def test_help_shows_the_real_groups_and_examples(tmp_path):
    from efficient.attention import backend_names

    out = run_cli("--help", cwd=tmp_path)
    (attention_line,) = [line for line in out.stdout.splitlines() if line.strip().startswith("attention:")]
    assert set(backend_names()) <= {choice.strip() for choice in attention_line.split(":", 1)[1].split(",")}
    assert "schema" not in out.stdout and "python run.py -m experiment=scaling_cpu" in out.stdout
