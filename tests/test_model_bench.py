"""bench=model: a transformers model end to end with a suite backend as its attention (small
random Llama, Mistral, GPT-2 and a user's config.json, on CPU). Exact backends give HF sdpa's
hidden states; transformers' own implementations are the baselines; what cannot run is refused
with the reason; a wrong output is recorded wrong with its figures."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose, run_cli, skip_unless_available

pytest.importorskip("transformers", minversion="5.25", reason="needs transformers: pip install -e '.[hf]'")

from bench.config import value_problems  # noqa: E402
from bench.harness import cell_hash, run_job  # noqa: E402
from efficient.attention import Setting  # noqa: E402

# A Llama 128 wide, 4 heads of 32 (2 key/value heads), 2 layers, 97 tokens: a second a cell.
TINY = (
    "bench=model",
    "model=llama_small",
    "model.d_model=128",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.d_ff=192",
    "model.hf_config.vocab_size=97",
    "seq_len=40",
    "bench.warmup=0",
    "bench.repeats=1",
    "bench.decode_tokens=3",
    "bench.max_decode_tokens=3",
    "device=cpu",
)


def measured(*overrides: str, tmp_path) -> dict:
    return run_job(compose(*TINY, *overrides), output_dir=tmp_path)


@pytest.mark.parametrize("backend", ["full", "sdpa", "chunked", "flex"])
def test_an_exact_backend_inside_llama_gives_hf_sdpa_s_hidden_states(backend, tmp_path):
    skip_unless_available(backend, Setting("cpu", "float32", causal=True, head_dim=32))
    record = measured(f"attention={backend}", tmp_path=tmp_path)
    assert record["status"] == "ok", record.get("reason")
    assert record["max_abs_err"] < 1e-5 and "HF's sdpa" in record["reference"] and record["reference_scale"] > 0
    assert record["architecture"] == "llama" and record["label"] == backend and record["exact"]
    assert record["prefill_ms"] > 0 and record["decode_samples"] == 3 and record["decode_ms"] > 0
    assert record["prefill_peak_mem_mib"] > 0 and record["d_model"] == 128 and record["n_kv_heads"] == 2
    if backend == "flex":  # no backward on CPU: said, not failed
        assert record["fwd_bwd_ms"] is None and "no backward on cpu" in record["note"]
    else:
        assert record["fwd_bwd_ms"] > 0 and record["fwd_bwd_peak_mem_mib"] > 0


def test_the_parameter_count_is_the_built_model_s(tmp_path):
    import transformers

    record = measured("attention=sdpa", "bench.backward=false", tmp_path=tmp_path)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    expected = sum(p.numel() for p in transformers.LlamaForCausalLM(config).parameters())
    assert record["parameters"] == expected and record["weights_mib"] == pytest.approx(expected * 4 / 2**20)


def test_an_approximation_keeps_its_error_and_is_not_held_to_a_tolerance(tmp_path):
    record = measured("attention=performer", "bench.backward=false", tmp_path=tmp_path)
    assert record["status"] == "ok" and not record["exact"]
    assert record["max_abs_err"] > 1e-3 and "approximation: not checked" in record["reference"]


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_transformers_own_attention_is_the_baseline_labelled_hf(implementation, tmp_path):
    record = measured(f"bench.hf_attention={implementation}", "bench.backward=false", tmp_path=tmp_path)
    assert record["status"] == "ok" and record["label"] == f"hf:{implementation}"
    if implementation == "sdpa":
        assert record["max_abs_err"] is None and "the reference itself" in record["reference"]
    else:
        assert record["max_abs_err"] < 1e-5


def test_a_baseline_with_another_backend_named_is_refused_before_running():
    (problem,) = value_problems(compose(*TINY, "attention=chunked", "bench.hf_attention=sdpa"))
    assert "runs transformers' own attention, not attention=chunked: run it with attention=full" in problem


def test_mistral_s_window_runs_only_through_a_backend_with_that_window(tmp_path):
    mistral = ("bench=model", "model=mistral_7b", *TINY[2:], "model.n_layers=2", "model.hf_config.sliding_window=16")
    refused = run_job(compose(*mistral, "attention=full"), output_dir=tmp_path)
    assert refused["status"] == "unsupported" and "sliding window of 16 keys" in refused["reason"]
    windowed = run_job(compose(*mistral, "attention=sliding_window", "attention.window=16"), output_dir=tmp_path)
    assert windowed["status"] == "ok", windowed.get("reason")
    assert windowed["architecture"] == "mistral" and windowed["max_abs_err"] < 1e-5  # held to the tolerance
    other = run_job(compose(*mistral, "attention=longformer", "attention.window=16"), output_dir=tmp_path)
    assert other["status"] == "unsupported"  # its window is symmetric, with global tokens: not Mistral's


def test_a_wrong_output_is_recorded_wrong_with_its_figures(tmp_path, monkeypatch):
    from efficient.attention.chunked import ChunkedAttention

    exact = ChunkedAttention.attend

    def off_by_a_little(self, q, k, v, key_padding_mask, causal):  # a planted fault
        return exact(self, q, k, v, key_padding_mask, causal) + 0.05

    monkeypatch.setattr(ChunkedAttention, "attend", off_by_a_little)
    record = measured("attention=chunked", "bench.backward=false", tmp_path=tmp_path)
    assert record["status"] == "wrong" and record["final"] is False
    assert "the final hidden states: |output - exact reference| reaches" in record["reason"]
    assert record["prefill_ms"] > 0 and record["max_abs_err"] > 1e-3


def test_a_nan_anywhere_is_wrong_whatever_the_backend(tmp_path, monkeypatch):
    from efficient.attention.performer import PerformerAttention

    def nan(self, q, k, v, key_padding_mask, causal):
        return torch.full_like(q, float("nan"))

    monkeypatch.setattr(PerformerAttention, "attend", nan)
    record = measured("attention=performer", "bench.backward=false", tmp_path=tmp_path)
    assert record["status"] == "wrong" and "NaN" in record["reason"]


def test_gpt2_has_no_grouped_query_attention_and_says_so(tmp_path):
    gpt2 = ("model=gpt2", "model.d_model=128", "model.n_heads=4", "model.n_layers=1", "model.d_ff=256")
    cell = (*gpt2, "model.hf_config.vocab_size=97", *TINY[7:], "bench=model", "attention=sdpa")
    record = run_job(compose(*cell), output_dir=tmp_path)
    assert record["status"] == "ok" and record["architecture"] == "gpt2", record.get("reason")
    assert record["max_abs_err"] == 0.0  # the very kernel HF's sdpa calls, on the same inputs
    refused = run_job(compose(*cell, "model.n_kv_heads=2"), output_dir=tmp_path)
    assert refused["status"] == "unsupported" and "gpt2 has no grouped-query attention" in refused["reason"]


def test_a_config_json_of_your_own_gives_the_model_and_its_sizes(tmp_path):
    config = {
        "model_type": "qwen2", "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 1,
        "num_hidden_layers": 3, "intermediate_size": 160, "vocab_size": 101,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg = compose(*TINY[:1], "model=hf_json", f"model.config_json={tmp_path}", "model.n_layers=1", *TINY[7:])
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.model.n_kv_heads, cfg.model.d_ff) == (128, 4, 1, 160)
    record = run_job(cfg, output_dir=tmp_path)
    assert record["status"] == "ok" and record["architecture"] == "qwen2" and record["n_layers"] == 1
    assert record["max_abs_err"] < 1e-5 and record["config"]["model"]["d_model"] == 128


def test_a_config_json_that_is_missing_is_one_sentence(tmp_path):
    (problem,) = value_problems(compose("bench=model", "model=hf_json", f"model.config_json={tmp_path}/none"))
    assert problem.startswith(f"model.config_json={tmp_path}/none: cannot read a transformers config.json")
    out = run_cli("bench=model", "model=hf_json", cwd=tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "model=hf_json reads the model's sizes from model.config_json=PATH: none given" in out.stderr


def test_a_model_over_the_memory_budget_is_oom_without_running(tmp_path):
    record = measured("attention=sdpa", "bench.memory_budget_gib=0.001", tmp_path=tmp_path)
    assert record["status"] == "oom" and "exceeds the budget" in record["reason"] and record["prefill_ms"] is None


def test_the_architecture_settings_left_unset_keep_every_other_cell_s_hash():
    """Records made before model.architecture existed resume: the new keys at None hash as absent."""
    from omegaconf import OmegaConf

    from bench import records

    config = OmegaConf.to_container(compose("bench=speed"), resolve=True, enum_to_str=True)
    new = ("architecture", "hf_config", "config_json")
    before = {**config, "model": {k: v for k, v in config["model"].items() if k not in new}}
    assert records.config_hash(before, "cpu") == records.config_hash(config, "cpu")
    assert cell_hash(compose("bench=speed", "model=llama_small")) != cell_hash(compose("bench=speed"))


def test_the_report_has_the_model_tables(tmp_path):
    from bench.analysis.report import markdown

    rows = [
        measured(f"attention={name}", "bench.backward=false", tmp_path=tmp_path / name) for name in ("full", "sdpa")
    ]
    table = markdown(rows)
    assert "A Hugging Face model end to end (bench=model)" in table and "Prefill latency, ms (median)" in table
    assert "| sdpa |" in table and "| full |" in table


def test_pick_ranks_the_model_s_backends_by_prefill_decode_or_training_step(tmp_path):
    from bench.analysis.pick import main, pick

    rows = [measured(f"attention={name}", tmp_path=tmp_path) for name in ("full", "sdpa", "performer")]
    rows.append(measured("bench.hf_attention=eager", tmp_path=tmp_path))
    by_label = {r["label"]: r for r in rows}
    for inference, decode, field in (
        (False, False, "fwd_bwd_ms"),
        (True, False, "prefill_ms"),
        (False, True, "decode_ms"),
    ):
        rec = pick(rows, 40, inference=inference, decode=decode, hf_model=True)
        assert [c.backend for c in rec.ranked] == sorted(["full", "sdpa", "hf:eager"], key=lambda b: by_label[b][field])
        assert any(e.backend == "performer" and "not exact" in e.reason for e in rec.excluded)
    for i, record in enumerate(rows):
        (tmp_path / f"{i}").mkdir()
        (tmp_path / f"{i}" / "result.json").write_text(json.dumps(record))
    assert main([str(tmp_path), "--seq-len", "40", "--hf-model", "--inference"]) == 0


def test_a_training_step_over_the_budget_is_left_out_and_the_rest_measured(tmp_path):
    from bench.benches.model import hf_config, predicted_bytes
    from bench.cell import Cell

    cell = Cell.of(compose(*TINY, "attention=sdpa"), "cpu")
    positions = 40 + 3  # seq_len and the decode steps
    weights, prefill, training = predicted_bytes(cell, *hf_config(cell, positions), positions)
    assert prefill < training
    between = (weights + (prefill + training) / 2) / 2**30
    record = measured("attention=sdpa", f"bench.memory_budget_gib={between}", tmp_path=tmp_path)
    assert record["status"] == "ok" and record["prefill_ms"] > 0 and record["fwd_bwd_ms"] is None
    assert "no training step: its predicted peak" in record["note"]
