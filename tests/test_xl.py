"""Transformer-XL: the facts that hold exactly (float64), checked against direct computation."""

import pytest
import torch

from efficient.attention import Unsupported, attention_factory, build_attention
from efficient.attention.xl import XLAttention, relative_index, relative_sinusoid
from efficient.models import CausalLM, ModelSize

torch.manual_seed(0)
D, H = 24, 3


def xl(**options) -> XLAttention:
    return build_attention("xl", D, H, **options).double()


def direct_position_logits(attn: XLAttention, q, n, klen):
    """BD_ij = (q_i + v) . W_R R(clamp(i + klen - n - j)), each (i, j) computed on its own."""
    b = q.shape[0]
    out = torch.zeros(b, H, n, klen, dtype=q.dtype)
    for i in range(n):
        for j in range(klen):
            distance = torch.tensor([i + klen - n - j])
            r = attn.r_net(relative_sinusoid(distance, D, attn.clamp_len).to(q.dtype)).view(H, D // H)
            out[:, :, i, j] = ((q[:, :, i] + attn.v) * r).sum(-1)
    return out


@pytest.mark.parametrize("n,klen,clamp_len", [(5, 5, -1), (4, 9, -1), (4, 9, 3)])
def test_rel_shift_equals_direct_relative_logits_on_and_below_the_diagonal(n, klen, clamp_len):
    attn = xl(clamp_len=clamp_len)
    q = torch.randn(2, H, n, D // H, dtype=torch.float64)
    shifted = attn.position_logits(q, n, klen, gather=False)
    direct = direct_position_logits(attn, q, n, klen)
    visible = torch.arange(klen)[None, :] <= torch.arange(n)[:, None] + (klen - n)
    assert torch.allclose(shifted[..., visible], direct[..., visible], atol=1e-12)
    assert not torch.allclose(shifted[..., ~visible], direct[..., ~visible])  # only the mask hides these


@pytest.mark.parametrize("n,klen,clamp_len", [(6, 6, -1), (4, 9, 2)])
def test_gathered_logits_are_right_for_future_keys_too(n, klen, clamp_len):
    """The non-causal path: every (i, j), future keys included (negative distances)."""
    attn = xl(clamp_len=clamp_len)
    q = torch.randn(2, H, n, D // H, dtype=torch.float64)
    assert torch.allclose(
        attn.position_logits(q, n, klen, gather=True), direct_position_logits(attn, q, n, klen), atol=1e-12
    )


def test_relative_index_matches_distances():
    index = relative_index(3, 5, "cpu")
    distances = torch.arange(4, -3, -1)  # klen-1 .. -(n-1)
    # query 0 stands at position 2: its distance to key 4 is -2
    assert distances[index[0, 4]] == -2 and distances[index[2, 0]] == 4


def test_causal_layer_forward_equals_its_reference():
    attn = xl(mem_len=6)
    x, memory = torch.randn(2, 5, D, dtype=torch.float64), torch.randn(2, 6, D, dtype=torch.float64)
    y, _ = attn(x, causal=True, state=memory)
    attn.reference_mode = True
    assert torch.allclose(y, attn(x, causal=True, state=memory)[0], atol=1e-12)


def stream_vs_one_pass(norm: str, same_length: bool, L=4, M=6, segments=4):
    """Stream segments of L tokens with memory M, and run one pass over the concatenation where
    the query at position p of the segment starting at s sees keys [s - M, p] (same_length:
    (p - M, p]). Returns the per-layer outputs of both, layer by layer."""
    torch.manual_seed(0)
    size = ModelSize(d_model=D, n_heads=H, n_layers=3, d_ff=32, dropout=0.0, norm=norm)
    make = attention_factory("xl", D, H, 0.0, mem_len=M, same_length=same_length)
    model = CausalLM(50, L * segments, size, make).double().eval()
    tokens = torch.randint(50, (2, L * segments))

    outputs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda mod, inp, out: outputs.append(out[0])) for b in model.encoder.blocks]
    states = None
    with torch.no_grad():
        for s in range(0, L * segments, L):
            _, states = model(tokens[:, s : s + L], states=states)
    n_layers = len(model.encoder.blocks)
    streamed = [torch.cat(outputs[layer::n_layers], dim=1) for layer in range(n_layers)]

    T = L * segments
    p = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    start = (p // L) * L
    window = (j >= start - M) & (j <= p)
    if same_length:
        window = (j > p - M) & (j <= p)
    for block in model.encoder.blocks:
        block.attention.visible = lambda n, klen, m, kpm, causal, device: window[None, None]
    outputs.clear()
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    return streamed, outputs


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_streaming_with_memory_equals_one_windowed_pass_at_every_layer(norm):
    streamed, one_pass = stream_vs_one_pass(norm, same_length=False)
    for layer, (a, b) in enumerate(zip(streamed, one_pass)):
        assert torch.allclose(a, b, atol=1e-10), f"layer {layer}"


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_same_length_equals_a_sliding_window_of_mem_len_keys(norm):
    streamed, one_pass = stream_vs_one_pass(norm, same_length=True)
    for layer, (a, b) in enumerate(zip(streamed, one_pass)):
        assert torch.allclose(a, b, atol=1e-10), f"layer {layer}"


def test_same_length_without_memory_is_an_error_not_nan():
    with pytest.raises(ValueError, match="same_length needs mem_len > 0"):
        xl(same_length=True, mem_len=0)


def test_memory_is_detached_no_gradient_reaches_the_past():
    attn = xl(mem_len=8)
    x1 = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    _, memory = attn(x1, causal=True)
    assert memory.shape == (2, 5, D) and not memory.requires_grad
    y2, memory = attn(x2, causal=True, state=memory)
    assert memory.shape == (2, 8, D)  # the last mem_len positions of [memory ; segment]
    y2.sum().backward()
    assert x1.grad is None and x2.grad is not None


def test_memory_starts_empty_and_resets_with_none():
    attn = xl(mem_len=4)
    x = torch.randn(1, 3, D, dtype=torch.float64)
    y_fresh, memory = attn(x, causal=True)
    y_with_memory, _ = attn(x, causal=True, state=memory)
    y_reset, _ = attn(x, causal=True, state=None)
    assert torch.equal(y_fresh, y_reset) and not torch.allclose(y_fresh, y_with_memory)


def test_permuting_batch_columns_permutes_outputs():
    attn = xl(mem_len=6)
    x, memory = torch.randn(4, 5, D, dtype=torch.float64), torch.randn(4, 6, D, dtype=torch.float64)
    perm = torch.tensor([2, 0, 3, 1])
    y, new_memory = attn(x, causal=True, state=memory)
    y_perm, new_memory_perm = attn(x[perm], causal=True, state=memory[perm])
    assert torch.allclose(y_perm, y[perm], atol=1e-12) and torch.equal(new_memory_perm, new_memory[perm])


def test_causality_future_tokens_never_change_past_outputs():
    attn = xl(mem_len=4)
    x, memory = torch.randn(2, 8, D, dtype=torch.float64), torch.randn(2, 4, D, dtype=torch.float64)
    changed = x.clone()
    changed[:, 5:] += 1
    y, _ = attn(x, causal=True, state=memory)
    y2, _ = attn(changed, causal=True, state=memory)
    assert torch.equal(y[:, :5], y2[:, :5]) and not torch.allclose(y[:, 5:], y2[:, 5:])


def test_non_causal_encoder_sees_future_keys_and_refuses_a_memory():
    attn = xl()
    x = torch.randn(2, 6, D, dtype=torch.float64)
    y, state = attn(x)
    attn.reference_mode = True
    assert torch.allclose(y, attn(x)[0], atol=1e-12) and state is None
    changed = x.clone()
    changed[:, 5] += 1
    assert not torch.allclose(attn(changed)[0][:, 0], y[:, 0])  # token 0 sees token 5
    with pytest.raises(Unsupported, match="needs causal"):
        attn(x, state=torch.randn(2, 3, D, dtype=torch.float64))


def test_u_and_v_shared_across_layers_unless_untied():
    for untie_r, expected in ((False, 1), (True, 3)):
        make = attention_factory("xl", D, H, untie_r=untie_r)
        layers = [make(i) for i in range(3)]
        assert len({id(layer.u) for layer in layers}) == expected
        assert len({id(layer.v) for layer in layers}) == expected


def test_positions_are_float32_and_exact_beyond_2048():
    """In float16 or bfloat16, positions past 2048 (256) would collapse onto their neighbours."""
    distances = torch.arange(0, 8192)
    table = relative_sinusoid(distances, 64, clamp_len=-1)
    assert table.dtype == torch.float32
    inv_freq = 1.0 / (10000 ** (torch.arange(0.0, 64, 2.0, dtype=torch.float64) / 64))
    angles = distances.double()[:, None] * inv_freq[None, :]
    exact = torch.cat([angles.sin(), angles.cos()], dim=-1)
    assert (table.double() - exact).abs().max() < 2e-3
    assert not torch.equal(table[3001], table[3002])
    clamped = relative_sinusoid(torch.tensor([5000, 9000, -7000]), 8, clamp_len=1000)
    assert torch.equal(clamped[0], clamped[1]) and torch.equal(
        clamped[2], relative_sinusoid(torch.tensor([-1000]), 8, 1000)[0]
    )


def test_xl_model_has_no_absolute_positions():
    size = ModelSize(d_model=D, n_heads=H, n_layers=1, d_ff=32, positional="sinusoidal")
    model = CausalLM(10, 16, size, attention_factory("xl", D, H))
    assert model.encoder.positions.kind == "none"


# -- the segment-recurrent runner ------------------------------------------------------------
from efficient.recurrence import evaluate_stream, ordered_columns, segments, set_mem_len  # noqa: E402


def test_columns_are_contiguous_and_segments_in_order():
    stream = torch.arange(23)
    columns = ordered_columns(stream, 3)  # 7 tokens per column, the tail dropped
    assert columns.tolist()[1] == list(range(7, 14))
    pieces = list(segments(columns, 4))
    assert [tuple(i.shape) for i, _ in pieces] == [(3, 4), (3, 2)]  # 6 inputs per column
    inputs = torch.cat([i for i, _ in pieces], dim=1)
    targets = torch.cat([t for _, t in pieces], dim=1)
    assert torch.equal(inputs, columns[:, :-1]) and torch.equal(targets, columns[:, 1:])


def test_streamed_evaluation_equals_the_windowed_one_pass_loss():
    """evaluate_stream carries each column's memory: its loss is the one-pass windowed loss."""
    torch.manual_seed(0)
    L, M = 4, 6
    size = ModelSize(d_model=D, n_heads=H, n_layers=2, d_ff=32, dropout=0.0)
    model = CausalLM(30, 64, size, attention_factory("xl", D, H, mem_len=M)).double()
    columns = ordered_columns(torch.randint(30, (2 * 17,)), 2)  # 2 columns of 17 tokens
    streamed = evaluate_stream(model, columns, tgt_len=L)
    T = columns.shape[1] - 1
    p, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    window = (j >= (p // L) * L - M) & (j <= p)
    for block in model.encoder.blocks:
        block.attention.visible = lambda n, klen, m, kpm, causal, device: window[None, None]
    with torch.no_grad():
        logits, _ = model(columns[:, :-1])
    one_pass = torch.nn.functional.cross_entropy(logits.flatten(0, 1), columns[:, 1:].flatten()).item()
    assert abs(streamed - one_pass) < 1e-10


def tiny_lm(seed=0, **options) -> CausalLM:
    torch.manual_seed(seed)
    size = ModelSize(d_model=D, n_heads=H, n_layers=2, d_ff=32, dropout=0.0)
    return CausalLM(30, 64, size, attention_factory("xl", D, H, **options)).double()


def test_evaluation_can_use_a_longer_memory_than_training_and_keeps_the_training_one():
    model = tiny_lm(mem_len=2)
    columns = ordered_columns(torch.randint(30, (64,)), 2)
    short = evaluate_stream(model, columns, tgt_len=4)
    longer = evaluate_stream(model, columns, tgt_len=4, mem_len=12)
    assert all(b.attention.mem_len == 2 for b in model.encoder.blocks)  # restored
    assert model.training  # and the mode too
    assert longer == evaluate_stream(tiny_lm(mem_len=12), columns, tgt_len=4)  # same weights, memory 12
    assert short != longer and evaluate_stream(model, columns, tgt_len=4) == short
    set_mem_len(model, 0)
    assert evaluate_stream(model, columns, tgt_len=4) != short


def test_stream_evaluation_restores_the_memory_length_when_it_fails(monkeypatch):
    from efficient import recurrence

    model = tiny_lm(mem_len=2)

    def fails(*args, **kwargs):
        raise RuntimeError("a segment failed")

    monkeypatch.setattr(recurrence, "segment_loss", fails)
    with pytest.raises(RuntimeError, match="a segment failed"):
        evaluate_stream(model, ordered_columns(torch.randint(30, (64,)), 2), tgt_len=4, mem_len=12)
    assert all(b.attention.mem_len == 2 for b in model.encoder.blocks) and model.training


def test_eval_mem_len_is_an_option_the_evaluator_reads():
    from efficient.recurrence import eval_mem_len

    assert eval_mem_len(tiny_lm(mem_len=2)) is None  # evaluate with the training memory
    model = tiny_lm(mem_len=2, eval_mem_len=12)
    assert eval_mem_len(model) == 12 and all(b.attention.mem_len == 2 for b in model.encoder.blocks)
    with pytest.raises(ValueError, match="eval_mem_len must be >= 0"):
        xl(mem_len=2, eval_mem_len=-1)


def test_same_length_with_an_empty_memory_is_refused_not_zeros():
    """A same_length window of mem_len = 0 keys would output all-zero attention: refused at
    construction, by the evaluator (which changes nothing), and by the layer itself."""
    with pytest.raises(ValueError, match="same_length needs eval_mem_len > 0"):
        xl(mem_len=4, same_length=True, eval_mem_len=0)
    model = tiny_lm(mem_len=4, same_length=True)
    columns = ordered_columns(torch.randint(30, (64,)), 2)
    with pytest.raises(ValueError, match="same_length"):
        evaluate_stream(model, columns, tgt_len=4, mem_len=0)
    assert all(b.attention.mem_len == 4 for b in model.encoder.blocks)
    assert evaluate_stream(model, columns, tgt_len=4, mem_len=8) > 0  # a memory > 0 is fine
    attn = xl(mem_len=4, same_length=True)
    attn.mem_len = 0
    with pytest.raises(ValueError, match="same_length needs mem_len > 0"):
        attn(torch.randn(1, 3, D, dtype=torch.float64), causal=True)


# -- pre-LN: the memory keeps the block input --------------------------------------------------
def test_pre_ln_memory_keeps_the_block_input_and_layernorm_gets_gradient_through_it():
    """A pre-LN block streaming x1 then x2 (memory 6 = all of x1) equals one causal pass over
    [x1 ; x2] on x2's outputs *and* on every parameter's gradient: the memory holds x1 itself
    (the reference's layer input), normalised inside the layer with the current LayerNorm, so
    LayerNorm's gradient flows through the memory's keys and values. A memory of LN(x1),
    detached, would give LayerNorm only the segment's share."""
    from efficient.blocks import TransformerBlock

    torch.manual_seed(0)
    block = TransformerBlock(xl(mem_len=6), d_ff=32, norm="pre").double()
    with torch.no_grad():  # LayerNorm away from its identity start, so that its weights matter
        for p in block.ln_attention.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x1, x2 = torch.randn(2, 6, D, dtype=torch.float64), torch.randn(2, 4, D, dtype=torch.float64)
    weights = torch.randn(2, 4, D, dtype=torch.float64)
    _, memory = block(x1, causal=True)
    assert torch.equal(memory, x1)  # the block's input, not LN(x1)
    y_streamed, _ = block(x2, causal=True, state=memory)
    (y_streamed * weights).sum().backward()
    streamed = {name: p.grad.clone() for name, p in block.named_parameters()}
    block.zero_grad()
    y_all, _ = block(torch.cat([x1, x2], dim=1), causal=True)
    assert torch.allclose(y_all[:, 6:], y_streamed, atol=1e-12)
    (y_all[:, 6:] * weights).sum().backward()
    for name, p in block.named_parameters():
        assert torch.allclose(p.grad, streamed[name], atol=1e-10), name


# -- FLOPs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("causal,n,m", [(False, 12, 0), (True, 12, 0), (True, 8, 5)])
def test_flop_model_matches_a_flop_counter(causal, n, m):
    """The speed bench's forward FLOPs of one xl layer (bench.cell.layer_flops, what its TFLOP/s
    divide) against torch's FLOP counter over the layer's forward. Not causal: equal. Causal: the
    model counts the AC, BD and value products on their visible share only (FlashAttention's
    convention), the counter counts them whole: the gap is exactly the masked share."""
    from conftest import compose
    from torch.utils.flop_counter import FlopCounterMode

    from bench.cell import Cell, layer_flops

    b, klen = 2, n + m
    cfg = compose(
        "attention=xl",
        f"attention.mem_len={m}",
        f"seq_len={n}",
        f"batch_size={b}",
        f"model.d_model={D}",
        f"model.n_heads={H}",
        f"causal={str(causal).lower()}",
        "device=cpu",
    )
    cell = Cell.of(cfg)
    modelled = layer_flops(cell, cell.shape())[0]
    attn = xl(mem_len=m)
    x = torch.randn(b, n, D, dtype=torch.float64)
    memory = torch.randn(b, m, D, dtype=torch.float64) if m else None
    with FlopCounterMode(display=False) as counter:
        attn(x, causal=causal, state=memory)
    counted = counter.get_total_flops()
    masked = 0.0
    if causal:
        visible_pairs = n * m + n * (n + 1) / 2
        masked = 3 * 2 * b * H * (D // H) * (n * klen - visible_pairs)
    assert counted - modelled == pytest.approx(masked, rel=1e-12, abs=1e-6)


def test_charlm_scores_use_eval_mem_len_and_training_keeps_its_memory():
    """The accuracy bench's val/test bits per byte use attention.eval_mem_len; the training
    memory (mem_len, and the memory carried between training steps) is left as it was."""
    import math

    from bench.tasks.data import StreamData

    stream = torch.randint(30, (4 * 40,))
    data = StreamData(
        {"train": stream, "val": stream, "test": stream}, batch_size=4, seq_len=4, device="cpu", source={}
    )
    trained_with_2 = tiny_lm(mem_len=2)
    evaluated_with_12 = tiny_lm(mem_len=2, eval_mem_len=12)  # the same weights
    data.train_loss(evaluated_with_12)
    carried = [s.clone() for s in data.states]
    score = data.score(evaluated_with_12, "val")
    assert score == evaluate_stream(trained_with_2, data.columns["val"], 4, mem_len=12) / math.log(2)
    assert score != data.score(trained_with_2, "val")
    assert all(b.attention.mem_len == 2 for b in evaluated_with_12.encoder.blocks)
    assert all(torch.equal(a, b) and a.shape[1] == 2 for a, b in zip(carried, data.states))


@pytest.fixture
def one_thread():
    """One CPU thread for the test (a tiny model on a shared machine), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_stream_eval_rescores_a_finished_charlm_job_at_other_memories(tmp_path, one_thread):
    """bench.stream_eval: the job's best weights re-read at several evaluation memories, no
    training; at the job's own memory it gives the job's own test figure."""
    from conftest import compose
    from presets import CHARLM

    from bench.harness import run_job
    from bench.records import validate
    from bench.stream_eval import evaluate
    from efficient.datasets import charlm

    text = tmp_path / "text"
    text.write_bytes(charlm.default_corpus()[:12_000])  # val and test: 600 bytes each
    job = tmp_path / "job"
    job.mkdir()
    record = run_job(
        compose(*CHARLM, f"task.data_path={text}", "bench.steps=6", "bench.eval_every=3", "bench.threads=1"),
        output_dir=job,
    )
    assert record["status"] == "ok", record["reason"]
    (job / "result.json").write_text(__import__("json").dumps(record, default=str))
    derived = evaluate(job, [0, 16, 48], out=tmp_path / "by_memory")
    assert [(tmp_path / "by_memory" / f"eval_mem_len_{m}" / "result.json").exists() for m in (0, 16, 48)] == [True] * 3
    by_memory = {r["attention_options"]["eval_mem_len"]: r for r in derived}
    assert by_memory[16]["value"] == pytest.approx(record["value"], rel=1e-9)
    assert len({r["value"] for r in derived}) == 3 and len({r["config_hash"] for r in derived}) == 3
    assert all(validate(r) == [] and r["best_val"] > 0 and r["steps"] == 6 for r in derived)
    (job / "best.pt").unlink()
    with pytest.raises(FileNotFoundError, match="best.pt does not exist"):
        evaluate(job, [16])


def test_recall_probe_splits_every_queried_keys_attention_into_regions(tmp_path, one_thread):
    import json

    from conftest import compose

    from bench.harness import run_job
    from bench.recall_probe import attention_mass, probe
    from bench.stream_eval import load_job
    from bench.tasks.recall import recall_splits

    record = run_job(
        compose(
            "bench=accuracy",
            "experiment=recall_cpu_xl",
            "bench.steps=4",
            "bench.eval_every=2",
            "bench.progress=false",
            "wandb.mode=disabled",
            "bench.threads=1",
            "task.n_train=64",
            "task.n_val=32",
            "task.n_test=32",
            "model.d_model=32",
            "model.n_heads=2",
        ),
        output_dir=tmp_path,
    )
    assert record["status"] == "ok", record["reason"]
    (tmp_path / "result.json").write_text(json.dumps(record, default=str))
    _, model = load_job(tmp_path, task="recall")
    cfg = record["config"]["task"]
    split = recall_splits(__import__("omegaconf").OmegaConf.create(cfg), 128, 0)["test"]
    mass = attention_mass(model, split, cfg["n_pairs"], 16)  # [layers, heads, regions + prev]
    assert mass.shape == (2, 2, 7) and torch.allclose(mass[..., :6].sum(-1), torch.ones(2, 2), atol=1e-5)
    assert all(b.attention.last_probs is None for b in model.encoder.blocks)
    assert "| 1.1 |" in probe(tmp_path, examples=16)


def test_bench_xl_eval_times_xl_against_a_vanilla_window(tmp_path):
    """bench=xl_eval: XL with a memory of A - tgt_len against a vanilla model recomputing the
    window of A per token; the record says both per-token times and their ratio, and refuses
    another backend with its reason."""
    from conftest import compose

    from bench.harness import run_job

    cell = ("bench=xl_eval", "causal=true", "seq_len=48", "bench.tgt_len=16", "model.d_model=32", "model.n_heads=2")
    record = run_job(compose("attention=xl", *cell))
    assert record["status"] == "ok", record["reason"]
    assert (record["tgt_len"], record["mem_len"], record["paper_speedup"]) == (16, 32, None)
    assert record["xl_ms_per_token"] == pytest.approx(record["xl_segment_ms"] / 16)
    assert record["speedup_per_token"] == pytest.approx(record["vanilla_ms_per_token"] / record["xl_ms_per_token"])
    refused = run_job(compose("attention=full", *cell))
    assert refused["status"] == "unsupported" and "takes attention=xl" in refused["reason"]
