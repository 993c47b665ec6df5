"""W&B: offline runs of a sweep carry group, name, tags and summary; the sweep's cell table;
the dashboard built offline. No account or network is needed."""

import subprocess
import sys

from bench.dashboard import build_workspace, main
from conftest import ROOT


def test_offline_sweep_runs_carry_group_name_tags_and_summary(tmp_path):
    sweep = tmp_path / "grp-attention-7f3a"
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", "attention=full", "seq_len=32,64", "model.d_model=64",
           "model.n_heads=4", "bench.repeats=2", "bench.warmup=1", "wandb.tags=[nightly]",
           f"hydra.sweep.dir={sweep}"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "WANDB_MODE": "offline",
                              "WANDB_SILENT": "true"})
    assert out.returncode == 0, out.stderr
    for job, name in (("full_n32_*", b"full-n32-b1-4x16-float32-cpu-#"), ("full_n64_*", b"full-n64-b1-4x16-float32-cpu-#")):
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
        "Latency against length", "Memory against length", "Throughput", "Accuracy per task", "Status of every cell"]
    panel = workspace.sections[0].panels[0]
    assert panel.log_x and panel.log_y
