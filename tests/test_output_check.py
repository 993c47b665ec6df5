"""A wrong output is never an ok record: planted faults end as status ``wrong`` with the place
of the damage, report/pick/W&B show them as such, and flex is refused where torch miscompiles it."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import compose

from bench import tracking
from bench.analysis.pick import pick
from bench.analysis.report import markdown
from bench.harness import run_job
from bench.output_check import beyond_tolerance, check_exact, nonfinite
from bench.records import validate
from efficient.attention import Setting, flex, get_backend
from efficient.attention.full import FullAttention

ONE_LAYER = [
    "attention=full",
    "seq_len=24",
    "batch_size=2",
    "model.d_model=64",
    "model.n_heads=2",
    "bench.repeats=2",
    "bench.warmup=1",
    "device=cpu",
]


def plant(monkeypatch, fault):
    """Make ``full``'s attention core return ``fault(exact output)``."""
    exact = FullAttention.attend
    monkeypatch.setattr(FullAttention, "attend", lambda self, *args: fault(exact(self, *args)))


def test_an_exact_backend_beyond_its_tolerance_is_recorded_wrong_with_where(tmp_path, monkeypatch):
    def one_row_off(out):  # [b, h, n, d]: query 7 of the second sequence off by 1e-2
        out = out.clone()
        out[1, :, 7] += 1e-2
        return out

    plant(monkeypatch, one_row_off)
    record = run_job(compose(*ONE_LAYER), output_dir=tmp_path)
    assert record["status"] == "wrong" and record["final"] is False and not validate(record)
    assert "the forward output: |output - exact reference| reaches" in record["reason"]
    assert "at batch 1, position 7, feature" in record["reason"]
    assert record["fwd_ms"] > 0 and record["max_abs_err"] > 1e-3  # the figures are kept beside the status


def test_a_nan_output_is_recorded_wrong_whatever_the_backend(tmp_path, monkeypatch):
    def nan_at_position_3(out):
        out = out.clone()
        out[0, 0, 3, 0] = float("nan")
        return out

    plant(monkeypatch, nan_at_position_3)
    for check_error in ("true", "false"):  # with or without the reference, NaN is found
        record = run_job(compose(*ONE_LAYER, f"bench.check_error={check_error}"), output_dir=tmp_path)
        assert record["status"] == "wrong", record["reason"]
        assert "NaN value(s)" in record["reason"] and "position 3" in record["reason"]


def test_a_nan_gradient_is_recorded_wrong(tmp_path, monkeypatch):
    class NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("nan")

    plant(monkeypatch, lambda out: NanGrad.apply(out))
    record = run_job(compose(*ONE_LAYER, "bench.check_error=false"), output_dir=tmp_path)
    assert record["status"] == "wrong" and "the gradient of" in record["reason"], record["reason"]


def test_the_exact_output_stays_ok_and_approximate_backends_keep_their_error(tmp_path):
    record = run_job(compose(*ONE_LAYER), output_dir=tmp_path)
    assert record["status"] == "ok" and record["max_abs_err"] < 1e-5
    reference = torch.zeros(2, 3)
    error, problem = check_exact("linformer", "float32", reference + 0.5, reference, "out")
    assert error == 0.5 and problem is None  # approximate: a figure, not a verdict
    error, problem = check_exact("full", "float32", reference + 0.5, reference + 1.0, "out")
    assert problem and "0.0001 x output scale 1" in problem


def test_the_tolerance_is_relative_to_the_output_scale_and_lives_with_the_backend():
    assert get_backend("sdpa").capabilities.tolerance == {
        "float64": 1e-8,
        "float32": 1e-4,
        "float16": 4e-3,
        "bfloat16": 2e-2,
    }
    reference = torch.full((4,), 100.0)
    assert beyond_tolerance(reference + 5e-3, reference, 1e-4, "out")[1] is None  # 5e-3 < 1e-4 x 100
    assert beyond_tolerance(reference + 5e-2, reference, 1e-4, "out")[1] is not None
    assert (
        nonfinite(torch.tensor([[1.0, math.inf]]), "x", ("row", "column"))
        == "x: 1 Inf value(s) of 2, the first at row 0, column 1"
    )


def wrong_and_ok(n, wrong_ms):
    from bench.benches.speed import SpeedResult

    base = {
        **SpeedResult.describe(),
        "bench": "speed",
        "attention_options": {},
        "exact": True,
        "seq_len": n,
        "device": "cpu",
        "dtype": "float32",
        "causal": False,
        "scope": "attention",
        "batch_size": 1,
        "d_model": 64,
        "n_heads": 2,
    }
    return [
        {
            **base,
            "attention": "chunked",
            "status": "wrong",
            "reason": "the forward output: NaN",
            "fwd_bwd_ms": wrong_ms,
            "fwd_bwd_peak_mem_mib": 1.0,
            "fwd_ms": wrong_ms,
            "fwd_peak_mem_mib": 1.0,
        },
        {
            **base,
            "attention": "full",
            "status": "ok",
            "fwd_bwd_ms": 10.0,
            "fwd_bwd_peak_mem_mib": 5.0,
            "fwd_ms": 3.0,
            "fwd_peak_mem_mib": 2.0,
        },
    ]


def test_pick_never_recommends_a_wrong_cell_and_the_report_shows_it():
    chunked_later, full_later = wrong_and_ok(2048, 0.1)
    records = wrong_and_ok(1024, 0.1) + [{**chunked_later, "status": "ok"}, full_later]
    rec = pick(records, 2048)  # chunked is ok and fastest at 2048, but was wrong at 1024
    assert [c.backend for c in rec.ranked] == ["full"]
    assert any(e.backend == "chunked" and e.reason.startswith("wrong output at n=1024") for e in rec.excluded)
    table = markdown(records)
    assert "| chunked | wrong |" in table and "chunked, n=1024: wrong: the forward output: NaN" in table


def test_pick_never_ranks_by_a_nan_or_infinite_figure():
    records = wrong_and_ok(4096, 0.1)
    records[0].update(status="ok", fwd_bwd_ms=float("nan"))
    rec = pick(records, 4096)
    assert [c.backend for c in rec.ranked] == ["full"]
    assert any(e.backend == "chunked" and "no finite fwd_bwd_ms" in e.reason for e in rec.excluded)


def test_wandb_files_a_wrong_records_figures_under_unverified():
    class Run:
        tags = ("full",)
        summary: dict = {}

    run = Run()
    run.summary = {}
    tracking.Tracker(run).summarize({"status": "wrong", "reason": "NaN", "fwd_ms": 1.5, "attention": "full"})
    assert run.summary["status"] == "wrong" and "fwd_ms" not in run.summary
    assert run.summary["unverified"] == {"fwd_ms": 1.5} and "wrong" in run.tags


class FakeISA:
    def __init__(self, name, bits):
        self.name, self.bits = name, bits

    def bit_width(self):
        return self.bits

    def __bool__(self):
        return self.bits > 0

    def __str__(self):
        return self.name


@pytest.mark.parametrize(
    "isa,head_dim,refused",
    [
        (FakeISA("avx2", 256), 16, "writes out of bounds with inductor's avx2 code and head_dim=16"),
        (FakeISA("avx2", 256), 8, "head_dim=8"),
        (FakeISA("avx2", 256), 32, None),
        (FakeISA("avx512", 512), 16, None),
        (FakeISA("INVALID_VEC_ISA", 0), 64, "needs a vector ISA"),
    ],
)
def test_flex_is_refused_on_cpu_where_torch_miscompiles_it(monkeypatch, isa, head_dim, refused):
    monkeypatch.setattr(flex, "inductor_cpu_isa", lambda: isa)
    reason = get_backend("flex").cannot_run(Setting("cpu", "float32", head_dim=head_dim))
    assert (reason is None) if refused is None else (refused in reason)
    assert get_backend("flex").unavailable_reason(Setting("cuda", "float32", head_dim=head_dim)) is None


def test_a_refused_flex_cell_is_unsupported_on_this_machine_not_measured(monkeypatch, tmp_path):
    monkeypatch.setattr(flex, "inductor_cpu_isa", lambda: FakeISA("avx2", 256))
    cfg = compose("attention=flex", "seq_len=24", "model.d_model=32", "model.n_heads=2", "device=cpu")
    record = run_job(cfg, output_dir=tmp_path)
    assert record["status"] == "unsupported" and record["final"] is False and "docs/upstream.md" in record["reason"]
    assert record["fwd_ms"] is None
