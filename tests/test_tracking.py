"""W&B: offline runs of a sweep carry group, name, tags and summary; the sweep's cell table;
the dashboard built offline. No account or network is needed."""

import subprocess
import sys

import pytest
from conftest import ROOT, compose

from bench import tracking
from bench.analysis.dashboard import build_workspace, main
from bench.harness import new_record, run_job


class FakeRun:
    """What the suite calls on a W&B run, recorded."""

    def __init__(self, **init):
        self.init, self.defined, self.logged, self.summary, self.exit_code = init, {}, [], {}, None

    def define_metric(self, name, summary):
        self.defined[name] = summary

    def log(self, metrics, step=None):
        self.logged.append(metrics)

    def finish(self, exit_code=0):
        self.exit_code = exit_code


@pytest.fixture
def fake_wandb(monkeypatch):
    import wandb

    runs = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: runs.append(FakeRun(**kwargs)) or runs[-1])
    return runs


TINY_LISTOPS = [
    "bench=accuracy",
    "task=listops",
    "task.n_train=32",
    "task.n_val=8",
    "task.n_test=8",
    "task.min_length=10",
    "task.max_length=30",
    "seq_len=64",
    "batch_size=8",
    "model.d_model=32",
    "model.n_heads=2",
    "model.n_layers=1",
    "model.d_ff=32",
    "bench.steps=4",
    "bench.eval_every=2",
    "bench.progress=false",
    "device=cpu",
    "wandb.mode=offline",
    "wandb.tags=[nightly]",
]


def test_the_run_gets_the_cells_name_group_tags_and_config(fake_wandb, tmp_path):
    cfg = compose(*TINY_LISTOPS)
    record = new_record(cfg)
    with tracking.wandb_run(cfg, record, tmp_path, group="sweep-7f3a") as tracker:
        record = run_job(cfg, record, tracker, tmp_path)
        tracker.summarize(record)
    (run,) = fake_wandb
    assert run.init["group"] == "sweep-7f3a" and run.init["name"] == tracking.run_name(record)
    assert set(run.init["tags"]) == {"full", "accuracy", "listops", "cpu", "float32", "nightly"}
    assert run.init["config"]["seq_len"] == 64 and run.init["job_type"] == "accuracy"
    assert run.exit_code == 0 and run.summary["status"] == "ok" and "config" not in run.summary
    logged = {key for metrics in run.logged for key in metrics}
    assert run.defined == tracking.SUMMARIES
    assert {"train_loss", "val_accuracy"} <= logged  # the summaries defined are of metrics really logged


def test_every_summary_is_of_a_metric_some_job_logs():
    from bench.tasks.data import ExampleData, StreamData

    history = {"train_loss"} | {"val_" + data.metric.removeprefix("test_") for data in (ExampleData, StreamData)}
    assert set(tracking.SUMMARIES) == history


@pytest.mark.slow
def test_offline_sweep_runs_carry_group_name_tags_and_summary(tmp_path):
    sweep = tmp_path / "grp-attention-7f3a"
    cmd = [
        sys.executable,
        str(ROOT / "run.py"),
        "-m",
        "attention=full",
        "seq_len=32,64",
        "model.d_model=64",
        "model.n_heads=4",
        "bench.repeats=2",
        "bench.warmup=1",
        "wandb.tags=[nightly]",
        f"hydra.sweep.dir={sweep}",
    ]
    out = subprocess.run(
        cmd,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    assert out.returncode == 0, out.stderr
    for job, name in (
        ("full_n32_*", b"full-n32-b1-4x16-float32-cpu-#"),
        ("full_n64_*", b"full-n64-b1-4x16-float32-cpu-#"),
    ):
        (run_file,) = sweep.glob(f"{job}/wandb/offline-run-*/run-*.wandb")
        data = run_file.read_bytes()  # protobuf records: the strings are stored as they are
        assert b"grp-attention-7f3a" in data and name in data  # group = the sweep, name = the cell
        for tag in (b"full", b"speed", b"synthetic", b"cpu", b"float32", b"nightly"):
            assert tag in data
        assert b"fwd_ms" in data and b"peak_mem_mib" in data  # the summary
    (table_run,) = (sweep / "wandb").glob("offline-run-*/run-*.wandb")
    data = table_run.read_bytes()
    assert b"sweep-table" in data and b"cells" in data and b"grp-attention-7f3a" in data


def test_dashboard_is_built_offline_and_says_what_it_would_save(monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(["--entity", "team", "--project", "efficient-attention"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Not saved (WANDB_MODE=offline") and "Latency against length" in out
    workspace = build_workspace("team", "efficient-attention")
    assert [s.name for s in workspace.sections] == [
        "Latency against length",
        "Memory against length",
        "Throughput",
        "Accuracy per task",
        "Status of every cell",
    ]
    panel = workspace.sections[0].panels[0]
    assert panel.log_x and panel.log_y
