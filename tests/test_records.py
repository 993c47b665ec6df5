"""The result contract, atomic writes, the report, and the measurement primitives."""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import compose

from bench import records
from bench.analysis import report
from bench.harness import run_job


def speed_record(*overrides):
    cfg = compose(
        "attention=full",
        "seq_len=32",
        "bench.repeats=2",
        "bench.warmup=1",
        "model.d_model=64",
        "model.n_heads=4",
        *overrides,
    )
    return run_job(cfg)


def test_ok_record_meets_the_contract():
    r = speed_record()
    assert r["status"] == "ok", r.get("reason")
    assert records.validate(r) == []
    assert r["fwd_ms_p20"] <= r["fwd_ms"] <= r["fwd_ms_p80"]
    assert r["max_abs_err"] < 1e-5 and r["threads"] >= 1
    assert r["config"]["attention"]["name"] == "full" and r["versions"]["torch"] == torch.__version__
    json.dumps(r)  # serialisable as is


def test_validate_catches_broken_records():
    r = speed_record()
    assert records.validate({**r, "status": "fine"})
    assert records.validate({**r, "status": "oom", "reason": None})
    assert records.validate({**r, "fwd_ms": float("nan")})
    missing = dict(r)
    del missing["peak_mem_mib"]
    assert "missing field 'peak_mem_mib'" in records.validate(missing)


def test_predicted_oom_is_recorded_without_running():
    r = speed_record("seq_len=4000000")
    assert r["status"] == "oom" and "exceeds the budget" in r["reason"]
    assert r["fwd_ms"] is None and records.validate(r) == []


def test_linformer_causal_is_an_unsupported_record():
    r = speed_record("attention=linformer", "causal=true")
    assert r["status"] == "unsupported" and r["reason"] == "linformer cannot be causal"


def test_unavailable_device_is_unsupported():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    r = speed_record("device=cuda")
    assert r["status"] == "unsupported" and "CUDA is not available" in r["reason"]


def test_a_failing_cell_is_an_error_record_with_traceback():
    r = speed_record("model.n_heads=7")  # 64 is not divisible by 7
    assert r["status"] == "error" and "not divisible" in r["reason"]
    assert "Traceback" in r["traceback"] and records.validate(r) == []


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    records.write_atomic(path, {"status": "ok"})

    def broken_dump(*args, **kwargs):
        args[1].write('{"status": "partial')
        raise KeyboardInterrupt

    monkeypatch.setattr(records.json, "dump", broken_dump)
    with pytest.raises(KeyboardInterrupt):
        records.write_atomic(path, {"status": "error"})
    assert json.loads(path.read_text()) == {"status": "ok"}  # the old file, whole
    assert os.listdir(tmp_path) == ["result.json"]  # no temporary left behind


def test_report_tables_and_csv(tmp_path):
    ok = speed_record()
    records.write_atomic(tmp_path / "a" / "result.json", ok)
    records.write_atomic(tmp_path / "b" / "result.json", speed_record("seq_len=4000000"))
    rows = records.load_records(tmp_path)
    text = report.markdown(rows)
    assert "| full | " in text and "n=32" in text and "n=4000000" in text
    assert "oom: predicted peak memory" in text
    report.write_csv(rows, tmp_path / "r.csv")
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("attention,")
    assert report.main([str(tmp_path), "--markdown", str(tmp_path / "r.md")]) == 0
    assert (tmp_path / "r.md").read_text() == text


SELF_DESCRIPTION = ("record_version", "label", "exact", "measures", "kinds", "report")


def test_a_record_describes_itself_and_an_upgraded_version_1_record_matches():
    """Label, exactness and the bench's fields are described when measuring; ``upgrade`` gives a
    version-1 record of the same cell the same description."""
    flash = speed_record("attention=sdpa", "attention.kernel=math")
    approximate = speed_record("attention=performer")
    assert (flash["record_version"], flash["label"], flash["exact"]) == (3, "sdpa[kernel=math]", True)
    assert (approximate["label"], approximate["exact"]) == ("performer", False)
    assert flash["measures"]["fwd_ms"].startswith("median forward latency") and flash["kinds"]["fwd_ms"] == "number"
    for measured in (flash, approximate):
        old = {k: v for k, v in measured.items() if k not in SELF_DESCRIPTION}
        upgraded = records.upgrade(old)
        assert {k: upgraded[k] for k in SELF_DESCRIPTION} == {k: measured[k] for k in SELF_DESCRIPTION}


def old_decode_record() -> dict:
    """A decode record as version 2 wrote it: fwd_ms was the decode step, value the bandwidth fraction."""
    return {
        "record_version": 2, "attention": "sdpa", "label": "sdpa", "exact": True, "bench": "decode", "status": "ok",
        "seq_len": 1024, "dtype": "float32", "device": "cpu", "config_hash": "cafe", "fwd_ms": 4.0,
        "fwd_tokens_per_s": 250.0, "peak_mem_mib": 60.0, "metric": "bandwidth_fraction", "value": 0.25,
        "attention_ops": ["aten::_scaled_dot_product_flash_attention_for_cpu"], "note": "fwd_ms: one decode step",
        "extra": {"prefill_ms": 300.0, "prefill_peak_mem_mib": 60.0, "decode_ms": 4.0, "decode_tokens": 32,
                  "cache_mib": 8.0, "achieved_gbs": 6.0, "peak_gbs": 24.0, "peak_source": "copy"},
    }  # fmt: skip


def test_an_older_record_reads_with_today_s_names_and_upgrade_rewrites_it(tmp_path):
    """A version-2 decode record is read with version 3's names (no torch needed); ``upgrade``
    rewrites it once, with its bench's description; a current record is left alone."""
    records.write_atomic(tmp_path / "old" / "result.json", old_decode_record())
    records.write_atomic(tmp_path / "new" / "result.json", speed_record())
    (read,) = records.load_records(tmp_path / "old")
    assert (read["decode_ms"], read["bandwidth_fraction"], read["prefill_ms"], read["decode_samples"]) == (
        4,
        0.25,
        300,
        32,
    )
    assert read["decode_ops"] == ["aten::_scaled_dot_product_flash_attention_for_cpu"] and read["cache_mib"] == 8
    assert not {"fwd_ms", "value", "metric", "extra", "peak_mem_mib", "note"} & set(read)
    assert records.upgrade_folder(tmp_path) == 1
    upgraded = json.loads((tmp_path / "old" / "result.json").read_text())
    assert upgraded["record_version"] == 3 and upgraded["decode_ms"] == 4.0
    assert set(upgraded["measures"]) >= {"decode_ms", "bandwidth_fraction", "prefill_ms"}
    assert "| sdpa | 1,024 | 4 |" in report.markdown(records.load_records(tmp_path / "old"))
    assert records.upgrade_folder(tmp_path) == 0


ANALYSIS_COMMANDS = [
    ("bench.report", ["--csv", "{out}/r.csv"]),
    ("bench.pick", ["--seq-len", "2048"]),
    ("bench.analysis.lra_table", []),
]


@pytest.mark.parametrize("module,arguments", ANALYSIS_COMMANDS, ids=[m for m, _ in ANALYSIS_COMMANDS])
def test_the_analysis_side_runs_without_torch(tmp_path, module, arguments):
    """report, pick and the LRA table read records alone: with torch unimportable they still run."""
    import subprocess
    import sys

    study = Path(__file__).resolve().parent.parent / "results" / "main_job_cpu"
    argv = [module, str(study), *(a.format(out=tmp_path) for a in arguments)]
    code = (
        "import runpy, sys; sys.modules['torch'] = None; "
        f"sys.argv = {argv!r}; runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sdpa" in done.stdout and "torch" not in done.stderr


def test_report_compares_two_folders_cell_by_cell(tmp_path, capsys):
    """--compare: the cells both folders hold, side by side with B / A; a cell that did not run
    in one shows its status; cells in one folder only are counted."""

    from bench.benches.speed import SpeedResult

    def record(n, ms, machine, status="ok"):
        return {
            **SpeedResult.describe(),
            "attention": "sdpa",
            "label": "sdpa",
            "bench": "speed",
            "status": status,
            "seq_len": n,
            "dtype": "float32",
            "device": "cpu",
            "device_name": machine,
            "causal": False,
            "fwd_ms": ms,
            "reason": None if status == "ok" else "predicted peak memory exceeds the budget",
        }

    for folder, machine, cells in (
        ("a", "cpu A", [(1024, 10.0), (2048, 40.0), (4096, 160.0)]),
        ("b", "cpu B", [(1024, 5.0), (2048, 30.0), (8192, 90.0)]),
    ):
        for n, ms in cells:
            records.write_atomic(tmp_path / folder / str(n) / "result.json", record(n, ms, machine))
    records.write_atomic(tmp_path / "b" / "4096" / "result.json", record(4096, None, "cpu B", status="oom"))
    assert report.main([str(tmp_path / "a"), "--compare", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "A = " in out and "(cpu A, commit not recorded)" in out and "(cpu B, commit not recorded)" in out
    assert "3 cells in both; 0 only in A, 1 only in B." in out
    assert "| sdpa | 1024 | 10 | 5 | 0.5x |" in out and "| sdpa | 2048 | 40 | 30 | 0.75x |" in out
    assert "| sdpa | 4096 | 160 | oom | - |" in out
