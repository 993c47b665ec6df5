"""Records you can trust: nothing overwritten, nothing lost, bad values refused before running.

Each test names the failure it guards against; each failed on the suite before the fix."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat

import pytest
import torch
from conftest import compose, results_under, run_cli

from bench import records, resume, tracking
from bench.analysis import pick
from bench.benches.accuracy import save_checkpoint
from bench.config import value_problems
from bench.harness import run_job

CHEAP = ["attention=full", "seq_len=32", "model.d_model=64", "model.n_heads=4", "bench.repeats=2", "bench.warmup=1"]
LISTOPS = [
    "bench=accuracy",
    "task=listops",
    "task.n_train=64",
    "task.n_val=16",
    "task.n_test=16",
    "task.min_length=10",
    "task.max_length=40",
    "seq_len=64",
    "batch_size=8",
    "model.d_model=32",
    "model.n_heads=2",
    "model.n_layers=1",
    "model.d_ff=64",
    "bench.steps=4",
    "bench.eval_every=2",
    "bench.progress=false",
    "device=cpu",
]


def a_record(**fields) -> dict:
    """A minimal valid record (only what placing and reading need)."""
    return {
        "attention": "full",
        "bench": "speed",
        "status": "ok",
        "seq_len": 64,
        "dtype": "float32",
        "device": "cpu",
        "config_hash": "cafe",
        "final": True,
        **fields,
    }


# -- lost or overwritten records ----------------------------------------------------------------
@pytest.mark.slow
def test_two_sweeps_differing_only_in_causal_keep_both_records(tmp_path):
    first = run_cli("-m", *CHEAP, cwd=tmp_path)
    second = run_cli("-m", *CHEAP, "causal=true", "resume=true", cwd=tmp_path)
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    found = results_under(tmp_path / "sweep")
    assert sorted(r["causal"] for r in found) == [False, True]
    assert "skipped 0 cell(s)" in second.stdout  # the causal cell is another cell, not a recorded one


def test_two_cells_sent_to_one_folder_are_both_kept(tmp_path):
    records.place(tmp_path, a_record(config_hash="aaaa"))
    path, note = records.place(tmp_path, a_record(config_hash="bbbb", causal=True))
    assert path == tmp_path / "cell-bbbb" / "result.json" and "another cell" in note
    assert sorted(r["config_hash"] for r in records.load_records(tmp_path)) == ["aaaa", "bbbb"]


@pytest.mark.slow
def test_two_runs_with_one_run_dir_keep_both_records(tmp_path):
    for extra in ("causal=false", "causal=true"):  # run_cli gives every run hydra.run.dir=<tmp>/run
        out = run_cli(*CHEAP, extra, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
    assert sorted(r["causal"] for r in results_under(tmp_path / "run")) == [False, True]
    assert "holds another cell's record" in out.stdout


def test_a_worse_record_never_replaces_a_better_one_of_the_same_cell(tmp_path):
    records.place(tmp_path, a_record(fwd_ms=1.0))
    path, note = records.place(tmp_path, a_record(status="error", reason="boom", final=False))
    assert path.name.startswith("result.rejected.") and "kept the earlier ok record" in note
    (kept,) = records.load_records(tmp_path)
    assert kept["status"] == "ok" and json.loads(path.read_text())["reason"] == "boom"


def test_a_new_measurement_of_the_same_cell_keeps_the_old_one_aside(tmp_path):
    records.place(tmp_path, a_record(fwd_ms=1.0))
    records.place(tmp_path, a_record(fwd_ms=2.0))
    (current,) = records.load_records(tmp_path)
    (old,) = tmp_path.glob("result.superseded.*.json")
    assert current["fwd_ms"] == 2.0 and json.loads(old.read_text())["fwd_ms"] == 1.0


def place_many(folder: str, first: int) -> None:
    for i in range(first, first + 10):
        records.place(folder, a_record(config_hash=f"h{i:03d}"))


@pytest.mark.slow
def test_concurrent_writers_into_one_folder_lose_no_record(tmp_path):
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=place_many, args=(str(tmp_path), 10 * w)) for w in range(4)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
    assert all(w.exitcode == 0 for w in writers)
    assert len({r["config_hash"] for r in records.load_records(tmp_path)}) == 40


def test_result_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        records.write_atomic(tmp_path / "result.json", a_record())
        save_checkpoint({"step": 1}, tmp_path / "last.pt")
    finally:
        os.umask(old)
    for name in ("result.json", "last.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_a_kill_during_a_checkpoint_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path)

    def killed_mid_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_mid_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_damaged_checkpoint_is_named_and_the_ok_record_is_kept(tmp_path):
    first = run_job(compose(*LISTOPS), output_dir=tmp_path)
    assert first["status"] == "ok", first.get("reason")
    records.place(tmp_path, first)
    (tmp_path / "last.pt").write_bytes((tmp_path / "last.pt").read_bytes()[:100])  # truncated by a kill

    again = run_job(compose(*LISTOPS, "bench.resume=true"), output_dir=tmp_path)
    assert again["status"] == "error"
    assert str(tmp_path / "last.pt") in again["reason"] and "Delete it" in again["reason"]
    records.place(tmp_path, again)
    (kept,) = records.load_records(tmp_path)
    assert kept["status"] == "ok" and kept["value"] == first["value"]


# -- one bad file must not stop everything ------------------------------------------------------
@pytest.mark.parametrize("content", ['{"status": "ok", "attent', "{}", "[1, 2]", "\xff\xfe"])
def test_a_bad_result_file_is_skipped_with_a_warning_that_names_it(tmp_path, content):
    good = tmp_path / "a" / "result.json"
    records.write_atomic(good, a_record())
    bad = tmp_path / "b" / "result.json"
    bad.parent.mkdir()
    bad.write_text(content, encoding="latin-1")
    with pytest.warns(records.RecordWarning, match=str(bad)):
        found = records.load_records(tmp_path)
    assert [r["_path"] for r in found] == [str(good)]


@pytest.mark.slow
def test_resume_report_and_pick_go_on_past_a_truncated_record(tmp_path):
    cells = ["-m", *CHEAP[:1], "seq_len=32,64", *CHEAP[2:]]
    assert run_cli(*cells, cwd=tmp_path).returncode == 0
    (victim, _) = sorted((tmp_path / "sweep").rglob("result.json"))
    victim.write_text(victim.read_text()[:50])  # a half-written file from another tool

    resumed = run_cli(*cells, "resume=true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipped {victim}" in resumed.stderr and "Traceback" not in resumed.stderr
    assert "skipped 1 cell(s)" in resumed.stdout  # the other cell; the damaged one ran again
    assert (tmp_path / "sweep" / "report.md").exists()
    assert len(results_under_safely(tmp_path / "sweep")) == 2
    for tool in (
        ["-m", "bench.report", str(tmp_path / "sweep")],
        ["-m", "bench.pick", str(tmp_path / "sweep"), "--seq-len", "64"],
    ):
        out = run_python(tool, tmp_path)
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr


def results_under_safely(path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return records.load_records(path)


def run_python(args, cwd):
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


# -- statuses that depend on the machine, not the cell ------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_a_missing_device_is_not_final_and_resume_runs_it_again(tmp_path):
    record = run_job(compose(*CHEAP, "device=cuda"))
    assert record["status"] == "unsupported" and record["final"] is False
    records.place(tmp_path, record)
    assert resume.skip_if_recorded(tmp_path, record, tmp_path) is None  # a GPU node runs it


def test_a_missing_package_is_not_final_but_a_backend_limit_is(tmp_path, monkeypatch):
    from efficient.attention import get_backend

    monkeypatch.setattr(
        get_backend("full"), "unavailable_reason", classmethod(lambda cls, cell, **o: "somepackage is not installed")
    )
    missing = run_job(compose(*CHEAP))
    assert (missing["status"], missing["final"], missing["reason"]) == (
        "unsupported",
        False,
        "somepackage is not installed",
    )
    limit = run_job(compose(*CHEAP, "attention=linformer", "causal=true"))
    assert (limit["status"], limit["final"]) == ("unsupported", True)
    records.place(tmp_path / "a", limit)
    assert resume.skip_if_recorded(tmp_path, limit, tmp_path / "a") is not None


def test_device_auto_is_the_device_it_resolves_to():
    here = "cuda" if torch.cuda.is_available() else "cpu"
    auto, explicit = run_job(compose(*CHEAP, "device=auto")), run_job(compose(*CHEAP, f"device={here}"))
    assert auto["config_hash"] == explicit["config_hash"]
    other = run_job(compose(*CHEAP, f"device={'cpu' if here == 'cuda' else 'cuda'}"))
    assert other["config_hash"] != auto["config_hash"]


# -- values validated before anything runs ------------------------------------------------------
REFUSED = [
    ("seq_len=0", "seq_len must be >= 1"),
    ("batch_size=-2", "batch_size must be >= 1"),
    ("bench.repeats=0", "bench.repeats must be >= 1"),
    ("bench.warmup=-1", "bench.warmup must be >= 0"),
    ("bench.memory_budget_gib=0", "bench.memory_budget_gib must be > 0"),
    ("bench.pad_fraction=1", "bench.pad_fraction must be in [0, 1)"),
    ("attention=xl attention.mem_len=-1", "attention.mem_len must be >= 0"),
    ("attention=chunked attention.query_chunk=0", "attention.query_chunk must be >= 1"),
    ("attention=chunked attention.key_chunk=-8", "attention.key_chunk must be >= 1"),
    ("attention=linformer attention.k=0", "attention.k must be >= 1"),
    ("model.n_heads=7", "model.d_model=512 is not a multiple of model.n_heads=7"),
]


@pytest.mark.parametrize("overrides,message", REFUSED)
def test_out_of_range_values_are_named_with_their_range(overrides, message):
    problems = value_problems(compose(*overrides.split()))
    assert len(problems) == 1 and message in problems[0]


def test_valid_configs_have_no_value_problems():
    from efficient.attention import backend_names

    for name in backend_names():
        assert value_problems(compose(f"attention={name}")) == [], name


@pytest.mark.parametrize(
    "args", [["seq_len=0"], ["-m", "seq_len=64,0"], ["-m", "attention=xl", "attention.mem_len=-1"]]
)
def test_the_cli_refuses_bad_values_before_running(tmp_path, args):
    out = run_cli(*args, cwd=tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr + out.stdout
    assert "out of range" in out.stderr and " must be >= " in out.stderr
    assert not list(tmp_path.rglob("result*.json"))  # no record, not even for seq_len=64


def test_linformer_with_k_beyond_the_length_is_unsupported_not_an_error():
    record = run_job(compose(*CHEAP, "attention=linformer", "attention.k=256"))
    assert (record["status"], record["final"]) == ("unsupported", True)
    assert "k=256 exceeds the 32 positions" in record["reason"]


def speed_records(lengths):
    return [
        a_record(
            attention=name,
            exact=True,
            seq_len=n,
            fwd_ms=t * n,
            fwd_bwd_ms=3 * t * n,
            fwd_bwd_peak_mem_mib=n / 8,
            fwd_peak_mem_mib=n / 16,
            causal=False,
            scope="attention",
            batch_size=1,
            d_model=64,
            n_heads=4,
        )
        for name, t in (("full", 1e-3), ("sdpa", 5e-4))
        for n in lengths
    ]


@pytest.mark.parametrize("bad", ["0", "-5", "x"])
def test_pick_refuses_a_length_that_is_not_positive(tmp_path, bad, capsys):
    with pytest.raises(SystemExit) as stop:
        pick.main([str(tmp_path), "--seq-len", bad])
    assert stop.value.code == 2 and "positive number of tokens" in capsys.readouterr().err


def test_pick_refuses_far_extrapolation_unless_asked():
    rows = speed_records([64, 128, 256, 512])
    refused = pick.pick(rows, 102400)  # 200x beyond n=512
    assert not refused.ranked
    assert all("200x outside the measured n=64-512" in e.reason for e in refused.excluded)
    asked = pick.pick(rows, 102400, max_extrapolation=1000)
    assert asked.ranked[0].backend == "sdpa" and "WARNING" in asked.justification
    near = pick.pick(rows, 2048)  # 4x: within the default limit, flagged as extrapolated
    assert near.ranked and all(c.extrapolated and "extrapolated 4.0x" in c.basis for c in near.ranked)


def test_wandb_run_names_tell_every_cell_apart():
    base = run_job(compose(*CHEAP))
    variants = [
        run_job(compose(*CHEAP, extra))
        for extra in (
            "causal=true",
            "batch_size=2",
            "model.n_heads=8",
            "bench.scope=model",
            "seed=1",
            "bench.pad_fraction=0.5",
        )
    ]
    names = [tracking.run_name(r) for r in (base, *variants)]
    assert len(set(names)) == len(names), names
    assert "-causal-" in names[1] and "-b2-" in names[2] and "-8x8-" in names[3]
