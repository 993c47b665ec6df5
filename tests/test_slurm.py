"""Sweeps through a real SLURM scheduler: a one-node cluster started for the session
(tests/slurm_cluster.py; skipped where SLURM or root is missing, installed by .ci/run)."""

from __future__ import annotations

import subprocess
import time

import pytest
from conftest import compose, results_under, run_cli

from bench.cell import job_memory_gb

pytestmark = [pytest.mark.slurm, pytest.mark.slow]  # a one-node cluster: each test takes 5-50 s

CELLS = [
    "attention=full,chunked",
    "seq_len=64,128",
    "device=cpu",
    "model.d_model=64",
    "model.n_heads=4",
    "bench.warmup=1",
    "bench.repeats=2",
    "hydra/launcher=slurm_cpu",
    "hydra.launcher.timeout_min=5",
]


def sweep(cluster, tmp_path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_cli("-m", *CELLS, *extra, cwd=tmp_path, env=cluster.env, timeout=timeout)


def test_a_sweep_runs_as_slurm_jobs_and_every_cell_is_recorded(slurm, tmp_path):
    before = len(slurm.finished_jobs())
    out = sweep(slurm, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    records = results_under(tmp_path / "sweep")
    assert sorted((r["attention"], r["seq_len"], r["status"]) for r in records) == [
        ("chunked", 64, "ok"),
        ("chunked", 128, "ok"),
        ("full", 64, "ok"),
        ("full", 128, "ok"),
    ]
    assert all(r["threads"] == 1 for r in records)  # the one core each job was given (cpus_per_task=1)
    jobs = slurm.finished_jobs(at_least=before + 4)[before:]
    assert len(jobs) == 4 and all("JobState=COMPLETED" in j for j in jobs)
    assert len({r["pid"] for r in records}) == 4  # each cell in a process of its own


def test_a_fully_recorded_sweep_resumed_submits_no_job(slurm, tmp_path):
    start = len(slurm.finished_jobs())
    first = sweep(slurm, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    before = len(slurm.finished_jobs(at_least=start + 4))
    again = sweep(slurm, tmp_path, "resume=true")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resume: skipped 4 cell(s) already recorded" in again.stdout and "launching 0 of 4" in again.stdout
    slurm.wait_idle()
    assert len(slurm.finished_jobs()) == before  # nothing was submitted
    partly = sweep(slurm, tmp_path, "resume=true", "seq_len=64,128,256")  # two new cells
    assert partly.returncode == 0, partly.stderr[-3000:]
    assert "launching 2 of 6" in partly.stdout and len(slurm.finished_jobs(at_least=before + 2)) == before + 2


def test_an_impossible_request_stops_the_sweep_at_once_with_slurms_reason(slurm, tmp_path):
    started = time.monotonic()
    out = sweep(slurm, tmp_path, "hydra.launcher.cpus_per_task=512")
    assert out.returncode != 0 and time.monotonic() - started < 60
    assert (
        "the cluster refused the jobs: sbatch: error: Batch job submission failed: More processors requested"
        in out.stderr
        and "Traceback" not in out.stderr
    )
    assert not results_under(tmp_path / "sweep")


def test_memory_is_asked_from_the_memory_model(slurm, tmp_path):
    """slurm_cpu asks for the largest cell's predicted memory (plus the process and a margin): a
    cell that cannot fit the node is refused at submission; a small one asks for little."""
    before = len(slurm.finished_jobs())
    huge = sweep(slurm, tmp_path, "attention=full", "seq_len=131072", "bench.memory_budget_gib=4000")
    assert huge.returncode != 0 and "the cluster refused the jobs" in huge.stderr
    small = sweep(slurm, tmp_path, "attention=full", "seq_len=64")
    assert small.returncode == 0, small.stderr[-3000:]
    expected = job_memory_gb(
        compose("attention=full", "seq_len=64", "device=cpu", "model.d_model=64", "model.n_heads=4")
    )
    assert f"Tres=cpu=1,mem={expected}G," in slurm.finished_jobs(at_least=before + 1)[-1]  # what the job was given


def start_training(slurm, tmp_path, timeout_min: int) -> tuple[subprocess.Popen, str]:
    """An accuracy job through SLURM, returned once it has written a checkpoint: (sweep, job id)."""
    import os
    import sys

    from conftest import ROOT

    training = [
        "-m",
        "bench=accuracy",
        "task=recall",
        "causal=true",
        "attention=full",
        "seq_len=32",
        "model.d_model=32",
        "model.n_heads=2",
        "model.n_layers=1",
        "model.d_ff=64",
        "task.vocab_size=32",
        "task.n_pairs=4",
        "task.n_queries=4",
        "task.n_train=256",
        "task.n_val=32",
        "task.n_test=32",
        "batch_size=8",
        "bench.steps=3000",
        "bench.eval_every=100",
        "bench.progress=false",
        "hydra/launcher=slurm_cpu",
        f"hydra.launcher.timeout_min={timeout_min}",
        f"hydra.sweep.dir={tmp_path}/sweep",
    ]
    env = {**os.environ, **slurm.env, "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
    sweep = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *training],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 180
    while not list((tmp_path / "sweep").rglob("last.pt")):
        assert time.monotonic() < deadline and sweep.poll() is None, "no checkpoint was written"
        time.sleep(0.2)
    (job,) = slurm.run("squeue", "-h", "-o", "%i").split()
    return sweep, job


def train_and_signal(slurm, tmp_path, timeout_min: int) -> dict:
    """An accuracy job sent USR2 once it has a checkpoint (how SLURM warns a job of preemption, or
    of its time limit, for submitit); returns its record."""
    sweep, job = start_training(slurm, tmp_path, timeout_min)
    slurm.run("scancel", "--signal=USR2", job)
    while sweep.poll() is None:  # a requeued job waits ~2 min to start again: start it now, as an admin may
        if slurm.run("squeue", "-h", "-j", job, "-o", "%T").strip() == "PENDING":
            slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")
            break
        time.sleep(0.5)
    out, err = sweep.communicate(timeout=300)
    assert sweep.returncode == 0, err[-3000:]
    (record,) = results_under(tmp_path / "sweep")
    return record


def test_a_preempted_accuracy_job_is_requeued_and_continues_from_its_checkpoint(slurm, tmp_path):
    """Well inside its time limit, the signal means preemption: submitit requeues the job, and the
    requeued job continues training from its last.pt instead of step 0."""
    record = train_and_signal(slurm, tmp_path, timeout_min=30)
    assert record["status"] == "ok" and record["steps"] == 3000
    assert record["resumed_from_step"] >= 100  # continued from the checkpoint, not from 0


def test_a_job_at_its_time_limit_leaves_a_clear_record_that_resume_runs_again(slurm, tmp_path):
    """Near its time limit (submitit counts any signal after 80% of it, or of limit - 10 min, as
    the limit), the job is not requeued (max_num_timeout: 0): its record says why, and
    resume=true runs the cell again."""
    record = train_and_signal(slurm, tmp_path, timeout_min=10)
    assert record["status"] == "error" and record["final"] is False
    assert record["reason"].startswith("the scheduler stopped the job") and "timed-out" in record["reason"]


def test_a_job_cancelled_mid_run_ends_the_sweep_clearly_and_resume_runs_it_again(slurm, tmp_path):
    """`scancel` sends SIGTERM, which submitit lets pass, then SIGKILL after KillWait (a job that
    ends within it writes its record). Killed mid-run, it leaves no record rather than half of one,
    the sweep says how to finish, and resume=true runs the cell to a full record."""
    sweep, job = start_training(slurm, tmp_path, 30)
    slurm.run("scancel", job)
    out, err = sweep.communicate(timeout=120)
    assert sweep.returncode != 0 and "Traceback" not in err
    assert "a job ended without a result" in err and "resume=true" in err
    assert not list((tmp_path / "sweep").rglob("result*.json"))
    slurm.wait_idle()
    again = run_cli("-m", "resume=true", *sweep.args[3:], cwd=tmp_path, env=slurm.env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    (record,) = results_under(tmp_path / "sweep")
    assert record["status"] == "ok" and record["steps"] == 3000


def test_one_context_parallel_job_spans_two_slurm_tasks_and_is_recorded_once(slurm, tmp_path):
    """bench=context_parallel with tasks_per_node=2: srun starts the job's two ranks (a core each),
    they meet at the step's node on the job id's port, and rank 0 records it."""
    out = run_cli(
        "-m",
        "bench=context_parallel",
        "attention=full",
        "causal=true",
        "seq_len=96",
        "device=cpu",
        "model.d_model=64",
        "model.n_heads=4",
        "bench.repeats=2",
        "hydra/launcher=slurm_cpu",
        "hydra.launcher.tasks_per_node=2",
        "hydra.launcher.timeout_min=5",
        cwd=tmp_path,
        env=slurm.env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (record,) = results_under(tmp_path / "sweep")
    assert record["status"] == "ok", record.get("reason")
    assert record["ranks"] == 2 and record["threads_per_rank"] == 1 and record["max_abs_err"] < 1e-5
    slurm.wait_idle()  # both tasks ended, and the job with them
