"""Inference: grouped-query attention, the KV cache, and bench=decode.

Decoding is checked against the model's own full causal forward: a prefill in pieces then one
token at a time must give the same logits as one forward over the whole sequence, for every
backend that can be causal, with n_kv_heads in {1, 2, n_heads}.
"""

import math

import pytest
import torch
from conftest import compose, run_cli, skip_unless_available
from einops import einsum

from efficient.attention import Setting, Unsupported, attention_factory, build_attention, get_backend
from efficient.attention.functional import exact_attention
from efficient.kv_cache import KVCache, empty_caches
from efficient.models import CausalLM, ModelSize

VOCAB, HEADS, WIDTH = 50, 4, 128  # head_dim 32: flex is refused at 8 and 16 on AVX2 (docs/upstream.md)
SMALL_CHUNKS = {"chunked": {"query_chunk": 16, "key_chunk": 16}}  # many blocks at these lengths


def grouped_reference(q, k, v, causal):
    """Softmax attention written out head by head: query head i reads key/value head i // g."""
    h, hk, n, m = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    out = torch.empty_like(q)
    for i in range(h):
        scores = einsum(q[:, i], k[:, i // (h // hk)], "b n d, b m d -> b n m") / math.sqrt(q.shape[-1])
        if causal:
            hidden = torch.ones(n, m, dtype=torch.bool).triu(m - n + 1)  # bottom-right
            scores = scores.masked_fill(hidden, -math.inf)
        out[:, i] = scores.softmax(-1) @ v[:, i // (h // hk)]
    return out


@pytest.mark.parametrize("n_kv_heads", [1, 2, 8])
@pytest.mark.parametrize("causal", [False, True])
def test_exact_attention_groups_query_heads_over_shared_keys(n_kv_heads, causal):
    q = torch.randn(2, 8, 11, 16, dtype=torch.float64)
    k, v = torch.randn(2, 2, n_kv_heads, 17, 16, dtype=torch.float64)
    got = exact_attention(q, k, v, causal=causal)
    assert torch.allclose(got, grouped_reference(q, k, v, causal), atol=1e-12)


def test_n_kv_heads_must_divide_n_heads_and_backends_without_grouping_say_so():
    with pytest.raises(ValueError, match="n_kv_heads=3 must divide n_heads=4"):
        build_attention("full", WIDTH, HEADS, n_kv_heads=3)
    for name in ("xl", "linformer"):
        caps = get_backend(name).capabilities
        reason = get_backend(name).unsupported_reason(Setting("cpu", "float32", grouped_query=True))
        assert not caps.grouped_query and "n_kv_heads" in reason
        with pytest.raises(Unsupported, match="n_kv_heads"):
            build_attention(name, WIDTH, HEADS, n_kv_heads=2, **({"max_len": 64} if name == "linformer" else {}))


def test_a_config_refuses_n_kv_heads_that_do_not_divide_n_heads(tmp_path):
    out = run_cli("model.n_kv_heads=3", "model.n_heads=8", "seq_len=64", cwd=tmp_path)
    assert out.returncode != 0 and "model.n_kv_heads=3 does not divide model.n_heads=8" in out.stderr
    assert "Traceback" not in out.stderr


def test_n_kv_heads_left_at_its_default_keeps_the_cell_hash():
    """Records made before model.n_kv_heads existed keep their identity (resume finds them)."""
    from omegaconf import OmegaConf

    from bench.harness import cell_hash

    cfg = compose("seq_len=64")
    without = OmegaConf.create(OmegaConf.to_container(cfg))
    del without.model["n_kv_heads"]
    assert cell_hash(cfg) == cell_hash(without)
    assert cell_hash(compose("seq_len=64", "model.n_kv_heads=2")) != cell_hash(cfg)


def test_the_cache_refuses_more_tokens_than_it_holds():
    cache = KVCache.empty(1, 2, 8, capacity=4)
    cache.append(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))
    with pytest.raises(ValueError, match="holds 4 tokens: 3 cached \\+ 2 new"):
        cache.append(torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8))


def decodable(name: str, n_kv_heads: int) -> None:
    caps = get_backend(name).capabilities
    if "cpu" not in caps.devices:
        pytest.skip(f"{name} does not run on CPU")
    if not caps.causal:
        reason = get_backend(name).unsupported_reason(Setting("cpu", "float32", causal=True, kv_cache=True))
        assert reason and "causal" in reason
        pytest.skip(reason)
    if n_kv_heads != HEADS and not caps.grouped_query:
        pytest.skip(f"{name} has no grouped-query attention")
    skip_unless_available(name, Setting("cpu", "float32", causal=True, kv_cache=True, head_dim=WIDTH // HEADS))


@pytest.mark.parametrize("n_kv_heads", [1, 2, HEADS])
def test_decoding_token_by_token_equals_the_full_causal_forward(backend_name, n_kv_heads):
    """Prefill 120 tokens in two pieces, decode 20 one at a time (crossing FlexAttention's 128-key
    block): the logits equal one causal forward over all 140 tokens."""
    decodable(backend_name, n_kv_heads)
    caps = get_backend(backend_name).capabilities
    dtype = torch.float64 if "float64" in caps.dtypes else torch.float32
    options = {"mem_len": 200} if caps.stateful else SMALL_CHUNKS.get(backend_name, {})
    torch.manual_seed(0)
    size = ModelSize(WIDTH, HEADS, 2, 64, 0.0, n_kv_heads=n_kv_heads)
    make = attention_factory(backend_name, WIDTH, HEADS, 0.0, n_kv_heads, **options)
    model = CausalLM(VOCAB, 160, size, make).to(dtype).eval()
    tokens = torch.randint(VOCAB, (2, 140))
    with torch.no_grad():
        whole, _ = model(tokens)  # [2, 140, vocab]
        states = None if caps.stateful else empty_caches(model, 2, 140)
        pieces = []
        for start, stop in [(0, 60), (60, 120)] + [(i, i + 1) for i in range(120, 140)]:
            logits, states = model(tokens[:, start:stop], states=states)
            pieces.append(logits)
    atol = 1e-10 if dtype == torch.float64 else 2e-5
    assert (torch.cat(pieces, dim=1) - whole).abs().max() < atol


@pytest.mark.parametrize("kernel", ["math", "flash"])
def test_every_cpu_sdpa_kernel_decodes_exactly(kernel):
    torch.manual_seed(0)
    make = attention_factory("sdpa", WIDTH, HEADS, 0.0, 2, kernel=kernel)
    model = CausalLM(VOCAB, 64, ModelSize(WIDTH, HEADS, 1, 64, 0.0, n_kv_heads=2), make).eval()
    tokens = torch.randint(VOCAB, (1, 40))
    with torch.no_grad():
        whole, _ = model(tokens)
        _, states = model(tokens[:, :30], states=empty_caches(model, 1, 40))
        steps = [model(tokens[:, i : i + 1], states=states)[0] for i in range(30, 40)]
    assert (torch.cat(steps, dim=1) - whole[:, 30:]).abs().max() < 2e-5


def decode_cli(tmp_path, *args):
    return run_cli(
        "-m", "bench=decode", "model.d_model=64", "model.n_heads=4", "bench.decode_tokens=4", *args, cwd=tmp_path
    )


@pytest.mark.slow
def test_bench_decode_records_latency_cache_and_bandwidth(tmp_path):
    from conftest import results_under

    out = decode_cli(tmp_path, "attention=full,sdpa,linformer", "seq_len=128", "model.n_kv_heads=1,4")
    assert out.returncode == 0, out.stderr[-3000:]
    records = {(r["attention"], r["n_kv_heads"]): r for r in results_under(tmp_path / "sweep")}
    assert len(records) == 6
    for (name, n_kv_heads), r in records.items():
        if name == "linformer":
            assert r["status"] == "unsupported" and "causal" in r["reason"]
            continue
        assert r["status"] == "ok", r["reason"]
        head_dim = 16
        assert r["cache_mib"] * 2**20 == 2 * 2 * n_kv_heads * 128 * head_dim * 4  # K and V, 2 layers, fp32
        assert 0 < r["bandwidth_fraction"] == pytest.approx(r["achieved_gbs"] / r["peak_gbs"])
        assert r["decode_samples"] == 4 and r["decode_ms"] > 0 and r["prefill_ms"] > 0
    assert records["full", 1]["cache_mib"] * 4 == records["full", 4]["cache_mib"]

    # pick --decode ranks by the per-token latency of one n_kv_heads setting, the cache in the budget
    from bench.analysis.pick import pick
    from bench.analysis.report import markdown

    rows = list(records.values())
    rec = pick(rows, 128, decode=True, n_kv_heads=1)
    assert [c.backend for c in rec.ranked] == sorted(["full", "sdpa"], key=lambda b: records[b, 1]["decode_ms"])
    assert rec.ranked[0].time_ms == records[rec.ranked[0].backend, 1]["decode_ms"] and rec.settings["n_kv_heads"] == 1
    assert any(e.backend == "linformer" and "causal" in e.reason for e in rec.excluded)
    tight = pick(rows, 128, memory_budget_gib=1e-6, decode=True, n_kv_heads=4)
    assert not tight.ranked and all("budget" in e.reason for e in tight.excluded if e.backend != "linformer")
    table = markdown(rows)
    assert "Decoding: one token against a KV cache" in table and "| full (n_kv_heads=1) | 128 |" in table
    from bench.analysis.html_report import write_html

    pngs = write_html(rows, tmp_path / "page.html")
    assert (
        tmp_path / "page_decode.png" in pngs and "Decoding against a KV cache" in (tmp_path / "page.html").read_text()
    )


@pytest.mark.slow
def test_bench_decode_is_causal_without_being_told_and_refuses_causal_false(tmp_path):
    from conftest import results_under

    out = run_cli(
        "bench=decode",
        "attention=sdpa",
        "seq_len=64",
        "model.d_model=64",
        "model.n_heads=2",
        "bench.decode_tokens=2",
        cwd=tmp_path,
    )
    (record,) = results_under(tmp_path / "run")
    assert out.returncode == 0 and record["status"] == "ok" and record["causal"] is True, out.stderr[-2000:]
    refused = run_cli("bench=decode", "seq_len=64", "causal=false", cwd=tmp_path)
    assert refused.returncode != 0 and "bench=decode runs only with causal=true: drop causal=false" in refused.stderr
    assert "Traceback" not in refused.stderr and len(results_under(tmp_path / "run")) == 1


def test_a_decode_record_made_with_causal_true_keeps_its_cell_hash():
    from bench.harness import cell_hash

    assert cell_hash(compose("bench=decode")) == cell_hash(compose("bench=decode", "causal=true"))


def test_a_prompt_that_is_not_a_multiple_of_the_prefill_piece_decodes(tmp_path):
    """33 tokens in pieces of 32: the last piece ends at the prompt (it read past it, into the
    decoded tokens, and overflowed the cache)."""
    from bench.harness import run_job

    cfg = compose(
        "bench=decode",
        "attention=full",
        "seq_len=33",
        "bench.prefill_chunk=32",
        "bench.decode_tokens=1",
        "bench.warmup=1",
        "model.d_model=64",
        "model.n_heads=2",
        "device=cpu",
    )
    record = run_job(cfg, output_dir=tmp_path)
    assert record["status"] == "ok", record["reason"]
    assert record["max_abs_err"] < 1e-4 and "copy of the cache" in record["reference"]


def test_a_wrong_decode_step_is_recorded_wrong_with_its_figures(tmp_path, monkeypatch):
    from bench.harness import run_job
    from efficient.attention.full import FullAttention

    exact = FullAttention.attend_cached

    def off_by_a_little(self, q, k, v, cache, key_padding_mask, causal):  # a planted fault in decode steps only
        out = exact(self, q, k, v, cache, key_padding_mask, causal)
        return out + 0.05 if q.shape[-2] == 1 else out

    monkeypatch.setattr(FullAttention, "attend_cached", off_by_a_little)
    cfg = compose(
        "bench=decode",
        "attention=full",
        "seq_len=16",
        "bench.decode_tokens=2",
        "model.d_model=64",
        "model.n_heads=2",
        "device=cpu",
    )
    record = run_job(cfg, output_dir=tmp_path)
    assert record["status"] == "wrong" and record["final"] is False
    assert "the first decode step's logits: |output - exact reference| reaches" in record["reason"]
    assert "at batch 0, position 0, token" in record["reason"] and record["decode_ms"] > 0


def test_the_flop_model_counts_the_smaller_key_value_projection():
    """One layer of full attention with 2 of 4 key/value heads: the FLOP model against torch's counter."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench.cell import Cell, build_subject, layer_flops

    cfg = compose(
        "attention=full", "seq_len=32", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "device=cpu"
    )
    cell = Cell.of(cfg)
    subject = build_subject(cell)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        subject.forward(subject.module)
    assert counter.get_total_flops() == pytest.approx(layer_flops(cell, cell.shape())[0], rel=1e-6)


def test_decode_times_its_steps_within_the_budget_and_the_cache_it_allocated():
    """bench=decode with a time budget: at least decode_tokens steps, at most max_decode_tokens,
    each one decoded into the cache allocated for them."""
    from bench.harness import run_job

    record = run_job(
        compose(
            "bench=decode",
            "attention=full",
            "seq_len=16",
            "model.d_model=32",
            "model.n_heads=2",
            "bench.decode_tokens=2",
            "bench.min_time_s=5",
            "bench.max_decode_tokens=7",
        )
    )
    assert record["status"] == "ok", record["reason"]
    assert record["decode_samples"] == 7
