"""bench.pick on hand-made records: ranking, exclusions with reasons, extrapolation."""

import json

import pytest

from bench.analysis.pick import main, pick
from efficient.attention import backend_names, get_backend

LENGTHS = (1024, 2048, 4096)


def exact(attention: str) -> bool:
    """What a record of ``attention`` says of its exactness (written when measured)."""
    if attention not in backend_names():
        return False
    caps = get_backend(attention).capabilities
    return caps.exact and not caps.sparse_mask


def speed(attention, n, fwd_bwd_ms=None, memory=None, status="ok", reason=None, device="cpu", causal=False, **extra):
    return {
        "bench": "speed",
        "attention": attention,
        "attention_options": {},
        "exact": exact(attention),
        "record_version": 2,
        "seq_len": n,
        "status": status,
        "reason": reason,
        "device": device,
        "dtype": "float32",
        "causal": causal,
        "scope": "attention",
        "batch_size": 1,
        "d_model": 512,
        "n_heads": 8,
        "fwd_ms": fwd_bwd_ms and fwd_bwd_ms / 3,
        "fwd_bwd_ms": fwd_bwd_ms,
        "fwd_peak_mem_mib": memory and memory / 2,
        "fwd_bwd_peak_mem_mib": memory,
        **extra,
    }


def accuracy(attention, task, value):
    return {
        "bench": "accuracy",
        "attention": attention,
        "attention_options": {},
        "exact": exact(attention),
        "record_version": 2,
        "task": task,
        "status": "ok",
        "metric": "test_accuracy",
        "value": value,
        "seq_len": 512,
        "device": "cpu",
        "dtype": "float32",
    }


def quadratic(name, scale=1.0):
    return [speed(name, n, scale * (n / 1024) ** 2, 100 * (n / 1024) ** 2) for n in LENGTHS]


def linear(name, scale=1.0):
    return [speed(name, n, scale * 3 * n / 1024, 10 * n / 1024) for n in LENGTHS]


def names(items):
    return [i.backend for i in items]


def test_ranks_measured_backends_by_time():
    records = linear("chunked", 2.0) + linear("sdpa") + quadratic("full")
    rec = pick(records, 4096)
    assert names(rec.ranked) == ["sdpa", "full", "chunked"]  # 12, 16 and 24 ms at 4096
    assert all(not c.extrapolated and c.basis == "measured at n=4096" for c in rec.ranked)
    assert "sdpa is recommended" in rec.justification


def test_extrapolates_power_laws_and_flags_it():
    rec = pick(quadratic("full") + linear("sdpa"), 16384)
    full = next(c for c in rec.ranked if c.backend == "full")
    assert full.extrapolated and full.time_ms == pytest.approx(256.0) and full.memory_mib == pytest.approx(25600)
    assert "time ~ n^2.00, memory ~ n^2.00, fit spread ±0%" in full.basis
    assert "extrapolated" in rec.justification


def test_memory_budget_excludes_with_the_prediction():
    rec = pick(quadratic("full") + linear("sdpa"), 16384, memory_budget_gib=2)
    assert names(rec.ranked) == ["sdpa"]
    (reason,) = [e.reason for e in rec.excluded if e.backend == "full"]
    assert reason.startswith("predicted peak 25.00 GiB exceeds the 2 GiB budget (extrapolated")


def test_measured_oom_and_unsupported_are_excluded_with_their_reasons():
    records = quadratic("full") + [speed("full", 8192, status="oom", reason="predicted 40 GiB > budget")]
    records += linear("sdpa") + [
        speed("linformer", 4096, status="unsupported", reason="linformer cannot be causal", causal=True)
    ]
    records += [speed("sdpa", n, 1.0 * n / 1024, 10, causal=True) for n in LENGTHS]
    rec = pick(records, 16384)
    assert "out of memory already at n=8192" in dict((e.backend, e.reason) for e in rec.excluded)["full"]
    causal = pick(records, 4096, causal=True)
    assert names(causal.ranked) == ["sdpa"]
    assert (
        dict((e.backend, e.reason) for e in causal.excluded)["linformer"] == "unsupported: linformer cannot be causal"
    )


def test_approximate_backends_need_accuracy_evidence():
    records = linear("sdpa", 5.0) + linear("linformer")
    rec = pick(records, 4096)
    assert names(rec.ranked) == ["sdpa"] and "accuracy evidence" in rec.excluded[0].reason
    assert names(pick(records, 4096, allow_approximate=True).ranked) == ["linformer", "sdpa"]
    records += [accuracy("linformer", "listops", 0.36), accuracy("sdpa", "listops", 0.37)]
    assert names(pick(records, 4096, min_accuracy={"listops": 0.35}).ranked) == ["linformer", "sdpa"]


def test_accuracy_floor_excludes_backends_below_it_or_unmeasured():
    records = linear("sdpa") + linear("linformer") + linear("chunked", 2.0)
    records += [accuracy("linformer", "listops", 0.30), accuracy("sdpa", "listops", 0.37)]
    rec = pick(records, 4096, min_accuracy={"listops": 0.35})
    assert names(rec.ranked) == ["sdpa"] and rec.ranked[0].accuracy == {"listops": 0.37}
    reasons = dict((e.backend, e.reason) for e in rec.excluded)
    assert reasons["linformer"] == "listops test_accuracy 0.3 is below the floor 0.35"
    assert reasons["chunked"] == "no accuracy measured on listops (floor 0.35)"


def test_bits_per_character_is_a_ceiling_not_a_floor():
    records = linear("sdpa") + linear("linformer")
    records += [
        dict(accuracy(name, "charlm", bpc), metric="test_bpc")
        for name, bpc in [("sdpa", 2.1), ("sdpa", 1.9), ("linformer", 2.4)]
    ]
    rec = pick(records, 4096, min_accuracy={"charlm": 2.0})
    assert names(rec.ranked) == ["sdpa"] and rec.ranked[0].accuracy == {"charlm": 1.9}  # the best is the lowest
    assert (
        dict((e.backend, e.reason) for e in rec.excluded)["linformer"] == "charlm test_bpc 2.4 is above the ceiling 2"
    )


def test_other_devices_and_too_few_points():
    records = linear("sdpa") + [speed("xformers", 4096, 1.0, 5.0, device="cuda"), speed("flex", 1024, 1.0, 5.0)]
    rec = pick(records, 8192, device="cpu")
    reasons = dict((e.backend, e.reason) for e in rec.excluded)
    assert reasons["xformers"].startswith("not measured on cpu")
    assert reasons["flex"].startswith("too few measurements to extrapolate to n=8192")


def test_cli_json_and_table(tmp_path, capsys):
    for i, r in enumerate(linear("sdpa") + quadratic("full")):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "result.json").write_text(json.dumps(r))
    assert main([str(tmp_path), "--seq-len", "16384", "--memory-budget", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ranked"][0]["backend"] == "sdpa" and out["excluded"][0]["backend"] == "full"
    assert main([str(tmp_path), "--seq-len", "4096"]) == 0
    assert "| 1 | sdpa | yes |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--seq-len", "4096", "--min-accuracy", "listops"])


def test_a_sparse_mask_is_not_exact_and_approximations_show_their_error_against_full_attention():
    """`sliding_window` is exact only under its mask: like `linear`, it is ranked only on request,
    with its measured error beside it; at a length measured without an error figure, the error of
    the longest length that has one, and that length."""
    records = [
        speed("sliding_window", n, 3 * n / 1024, 10 * n / 1024, max_abs_err=3e-8, max_abs_err_vs_full=0.06)
        for n in LENGTHS
    ]
    records += [
        speed("linear", n, 2 * n / 1024, 10 * n / 1024, max_abs_err=0.02 if n < 4096 else None) for n in LENGTHS
    ]
    records += quadratic("full")
    rec = pick(records, 4096)
    assert names(rec.ranked) == ["full"]
    assert {e.backend for e in rec.excluded if "not exact attention" in e.reason} == {"sliding_window", "linear"}
    rec = pick(records, 4096, allow_approximate=True)
    errors = {c.backend: c.error for c in rec.ranked}
    assert errors == {"linear": (0.02, 2048), "sliding_window": (0.06, 4096), "full": None}
    from bench.analysis.pick import format_table

    assert "| 2.0e-02 (n=2048) |" in format_table(rec) and "| 6.0e-02 |" in format_table(rec)


def test_records_of_two_machines_are_never_mixed():
    """Times from two CPUs do not compare: pick ranks one machine's records (the most measured,
    or the one named) and says which; a backend measured only elsewhere is left out, with why."""
    xeon = [dict(r, device_name="Xeon") for r in quadratic("full") + linear("linear") + linear("local", 2)]
    epyc = [dict(r, device_name="EPYC") for r in linear("reformer", scale=0.1) + quadratic("full", scale=0.5)]
    rec = pick(xeon + epyc, 4096, allow_approximate=True)
    assert rec.settings["device_name"] == "Xeon" and names(rec.ranked) == ["linear", "full", "local"]
    assert any(e.backend == "reformer" and "not measured on Xeon" in e.reason for e in rec.excluded)
    rec = pick(xeon + epyc, 4096, allow_approximate=True, device_name="EPYC")
    assert names(rec.ranked) == ["reformer", "full"]
    assert rec.ranked[1].time_ms == pytest.approx(0.5 * 16)  # EPYC's full only, not a median with Xeon's


def test_scope_and_width_choose_which_cells_are_ranked():
    """Without --scope the most measured cell is ranked; --scope and --d-model name another."""
    layer = linear("chunked") + quadratic("full")  # 6 records of one attention layer
    whole = [{**r, "scope": "model", "d_model": 256} for r in quadratic("chunked", 0.5) + linear("full", 4.0)]
    assert names(pick(layer + whole, 4096).ranked) == ["chunked", "full"]  # the layer: chunked 12 ms, full 16
    for chosen in (pick(layer + whole, 4096, scope="model"), pick(layer + whole, 4096, d_model=256)):
        assert names(chosen.ranked) == ["chunked", "full"] and chosen.settings["scope"] == "model"
        assert chosen.ranked[0].time_ms == 8.0  # the whole model's chunked: 0.5 * 4^2
    assert not pick(layer + whole, 4096, scope="model", d_model=512).ranked
