"""The mask-sparse backends (local, sliding_window, longformer, bigbird) against softmax
attention under masks written out here from each pattern's definition, with small blocks so
that every pattern is sparse; causality, padding, decoding and BigBird's random blocks."""

import math

import pytest
import torch
from conftest import requires_cuda, skip_unless_available

from efficient.attention import attention_factory, build_attention, get_backend, sparse
from efficient.attention.base import Setting, Unsupported
from efficient.attention.functional import exact_attention

N = 150  # not a multiple of any block below


def dense_attention(q, k, v, mask, key_padding_mask=None, causal=False):
    """softmax(q k^T / sqrt(d)) v under the bool mask [n, m] (a row that sees nothing gives 0)."""
    n, m = q.shape[-2], k.shape[-2]
    i = torch.arange(m - n, m)[:, None]
    j = torch.arange(m)[None, :]
    visible = mask & ((j <= i) if causal else True)
    visible = visible[None, None].expand(q.shape[0], 1, n, m)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~visible, -torch.inf)
    return torch.nan_to_num(scores.softmax(-1), nan=0.0) @ v


def local_mask(n, block):
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return i // block == j // block


def longformer_mask(n, window, global_tokens):
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return ((i - j).abs() <= window // 2) | (i < global_tokens) | (j < global_tokens)


def bigbird_mask(attention, n):
    """From the listed blocks: window, global and random key blocks per query block; the first and
    last query blocks see everything."""
    n_blocks, size = math.ceil(n / attention.block), attention.block
    blocks = torch.zeros(n_blocks, n_blocks, dtype=torch.bool)
    for r, row in enumerate(attention.layout(n_blocks).tolist()):
        for c in row:
            if c >= 0:
                blocks[r, c] = True
    blocks[0] = blocks[-1] = True
    return blocks.repeat_interleave(size, 0).repeat_interleave(size, 1)[:n, :n]


CASES = {
    "local": (dict(block=16), lambda a, n: local_mask(n, 16)),
    "sliding_window": (dict(window=20, block=8), None),  # against functional.exact_attention(window=20)
    "longformer": (dict(window=20, global_tokens=3, block=8), lambda a, n: longformer_mask(n, 20, 3)),
    "bigbird": (dict(block=8, random_blocks=2, seed=3), bigbird_mask),
}


def qkv(n, kv_heads=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, n, 16, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(2, kv_heads, n, 16, generator=generator, dtype=torch.float64) for _ in range(2))
    return q, k, v


def expected(name, attention, q, k, v, key_padding_mask, causal):
    options, make_mask = CASES[name]
    if make_mask is None:
        return exact_attention(q, k, v, key_padding_mask, causal, window=options["window"])
    mask = make_mask(attention, q.shape[-2])
    assert not mask.all(), "the test's pattern must be sparse"
    return dense_attention(q, k, v, mask, key_padding_mask, causal)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_blockwise_attention_and_its_backward_equal_the_written_out_mask(name, causal, padded, kv_heads):
    """The hand-written backward (the probabilities recomputed) against autograd
    through the dense reference, grouped heads included."""
    attention = build_attention(name, 64, 4, n_kv_heads=kv_heads, **CASES[name][0]).double()
    q, k, v = (t.requires_grad_() for t in qkv(N, kv_heads=kv_heads))
    mask = None
    if padded:
        mask = torch.ones(2, N, dtype=torch.bool)
        mask[1, 100:] = False
    out = attention.attend(q, k, v, mask, causal)
    ref_inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    spread = [t.repeat_interleave(4 // kv_heads, dim=1) for t in ref_inputs[1:]]
    reference = expected(name, attention, ref_inputs[0], *spread, mask, causal)
    assert (out - reference).abs().max() < 1e-10
    for g, g_ref in zip(
        torch.autograd.grad(out.square().sum(), (q, k, v)), torch.autograd.grad(reference.square().sum(), ref_inputs)
    ):
        assert (g - g_ref).abs().max() < 1e-9


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("causal", [False, True])
def test_the_flex_kernel_computes_the_same_mask(name, causal):
    """kernel=flex (FlexAttention's block mask, compiled; forward only on CPU) in float32 with
    padding and grouped heads, against the written-out mask."""
    skip_unless_available(name, Setting("cpu", "float32", head_dim=32), kernel="flex")
    attention = build_attention(name, 128, 4, n_kv_heads=2, kernel="flex", **CASES[name][0])
    q, k, v = (t.float() for t in qkv(N, kv_heads=2))
    q, k, v = (torch.cat([t, t.flip(-1)], dim=-1) for t in (q, k, v))  # head_dim 32 (docs/upstream.md: not 8 or 16)
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[1, 100:] = False
    with torch.no_grad():
        out = attention.attend(q, k, v, mask, causal)
    spread = [t.repeat_interleave(2, dim=1).double() for t in (k, v)]
    assert (out - expected(name, attention, q.double(), *spread, mask, causal)).abs().max() < 1e-5


def test_with_attention_dropout_autograd_runs_and_dropout_acts_in_training_only():
    torch.manual_seed(0)
    attention = build_attention("bigbird", 64, 4, dropout=0.5, block=8, random_blocks=2).double()
    q, k, v = (t.requires_grad_() for t in qkv(N))
    dropped = attention.train().attend(q, k, v, None, False)
    torch.autograd.grad(dropped.sum(), (q, k, v))
    with torch.no_grad():
        plain = attention.eval().attend(q, k, v, None, False)
    assert (plain - expected("bigbird", attention, q, k, v, None, False)).abs().max() < 1e-10
    assert (dropped - plain).abs().max() > 0.1


def test_the_flex_kernel_has_no_backward_on_cpu():
    """Head width 32: where this CPU's inductor code for FlexAttention is refused (AVX2 at widths
    8 and 16, no vector ISA at all), the refusal says so instead, and this test skips."""
    skip_unless_available("local", Setting("cpu", "float32", head_dim=32), kernel="flex")
    attention = build_attention("local", 128, 4, block=16, kernel="flex")
    with pytest.raises(Unsupported, match="no backward on cpu"):
        attention(torch.randn(2, N, 128))
    assert get_backend("local").trains_on("cpu") and not get_backend("local").trains_on("cpu", kernel="flex")


def test_the_flex_kernel_is_refused_with_dropout_and_auto_takes_blockwise_on_cpu(monkeypatch):
    q, k, v = (t.float() for t in qkv(N))
    attention = build_attention("local", 64, 4, dropout=0.1, block=16, kernel="flex").train()
    with pytest.raises(Unsupported, match="without attention dropout"), torch.no_grad():
        attention.attend(q, k, v, None, False)

    def no_flex(*args):
        raise AssertionError("kernel=auto took FlexAttention on CPU")

    monkeypatch.setattr(sparse, "flex_sparse_attention", no_flex)
    attention = build_attention("local", 64, 4, block=16)  # kernel=auto
    assert attention.attend(q, k, v, None, False).shape == q.shape


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("name", list(CASES))
def test_on_cuda_auto_takes_flex_and_equals_blockwise_with_gradients(name):
    torch.manual_seed(0)
    flex_layer = build_attention(name, 256, 4, n_kv_heads=2, **CASES[name][0]).cuda()  # kernel=auto
    blockwise = build_attention(name, 256, 4, n_kv_heads=2, kernel="blockwise", **CASES[name][0]).cuda()
    blockwise.load_state_dict(flex_layer.state_dict())
    x = torch.randn(2, 1000, 256, device="cuda")
    mask = torch.ones(2, 1000, dtype=torch.bool, device="cuda")
    mask[1, 700:] = False
    for causal in (False, True):
        outputs, grads = [], []
        for layer in (flex_layer, blockwise):
            inputs = x.clone().requires_grad_()
            y, _ = layer(inputs, key_padding_mask=mask, causal=causal)
            outputs.append(y)
            grads.append(torch.autograd.grad(y.square().sum(), inputs)[0])
        assert flex_layer.__dict__.get("_flex_block_masks"), "kernel=auto did not take FlexAttention on CUDA"
        assert (outputs[0] - outputs[1]).abs().max() < 1e-4 * outputs[1].abs().max()
        assert (grads[0] - grads[1]).abs().max() < 1e-3 * grads[1].abs().max()


@pytest.mark.parametrize("name", list(CASES))
def test_grouped_query_heads_read_their_group_s_keys(name):
    attention = build_attention(name, 64, 4, n_kv_heads=2, **CASES[name][0]).double()
    q, k, v = qkv(N, kv_heads=2)
    spread = [t.repeat_interleave(2, dim=1) for t in (k, v)]
    assert (
        attention.attend(q, k, v, None, False) - expected(name, attention, q, *spread, None, False)
    ).abs().max() < 1e-10


@pytest.mark.parametrize("name", list(CASES))
def test_changing_future_tokens_never_changes_past_outputs(name):
    torch.manual_seed(0)
    attention = build_attention(name, 64, 4, **CASES[name][0]).double()
    x = torch.randn(2, 90, 64, dtype=torch.float64)
    changed = x.clone()
    changed[:, 61:] = 10 * torch.randn(2, 29, 64, dtype=torch.float64)
    y, _ = attention(x, causal=True)
    assert torch.allclose(y[:, :61], attention(changed, causal=True)[0][:, :61], atol=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_padding_never_changes_real_outputs(name):
    torch.manual_seed(0)
    attention = build_attention(name, 64, 4, **CASES[name][0]).double()
    x = torch.randn(2, 90, 64, dtype=torch.float64)
    mask = torch.ones(2, 90, dtype=torch.bool)
    mask[:, 70:] = False
    noisy = x.clone()
    noisy[:, 70:] = 50 * torch.randn(2, 20, 64, dtype=torch.float64)
    y, _ = attention(x, key_padding_mask=mask)
    assert torch.allclose(y[:, :70], attention(noisy, key_padding_mask=mask)[0][:, :70], atol=1e-12)


def test_a_decode_step_computes_only_the_newest_block():
    """One query against a 150-token cache: the blocks before its own are not computed, and the
    output is the causal window's."""
    attention = build_attention("sliding_window", 64, 4, window=20, block=8).double()
    q, k, v = qkv(N)
    out = attention.attend(q[..., -1:, :], k, v, None, True)
    assert (out - exact_attention(q[..., -1:, :], k, v, None, True, window=20)).abs().max() < 1e-12


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("new_tokens", [1, 3])
def test_decode_steps_read_only_the_keys_they_see_and_equal_the_masked_reference(name, new_tokens):
    """The newest tokens of a long cache (a partial last block, padding, 2 KV heads for 4 query
    heads) take the gathered path, never a copy of the cache: equal to softmax under the mask."""
    options, _ = CASES[name]
    attention = build_attention(name, 64, 4, n_kv_heads=2, **options).double()
    q, k, v = qkv(N, kv_heads=2)
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[1, 40:55] = False
    q = q[..., -new_tokens:, :]
    out = attention.attend(q, k, v, mask, True)
    assert (out - attention.reference_attend(q, k, v, mask, True)).abs().max() < 1e-12


def test_a_decode_step_reads_the_keys_it_sees_not_the_whole_cache():
    """What the decode bench counts as read (its bandwidth figure): the newest query's key blocks;
    BigBird's newest query stands in its global last block and reads every key."""

    def keys_read(name, length):
        options, _ = CASES[name]
        return get_backend(name).decoding_read_elements(2, 16, length, **options) // (2 * 2 * 16)

    assert keys_read("local", 1000) == 16
    assert keys_read("sliding_window", 1000) == 7 * 8  # 19 earlier keys reach back 3 blocks of 8
    assert keys_read("longformer", 1000) == 5 * 8 + 8  # 10 keys each side: 2 blocks; the global block
    assert keys_read("bigbird", 1000) == 1000
    assert keys_read("sliding_window", 30) == 30  # never more than the cache
    assert get_backend("bigbird").decoding_state_elements(2, 16, 1000) == 2 * 2 * 1000 * 16  # the cache is kept


def test_bigbird_blocks_are_window_global_and_distinct_random_ones_fixed_by_the_seed():
    attention = build_attention("bigbird", 64, 4, block=8, random_blocks=3, seed=5)
    layout = attention.layout(20)
    for r in range(1, 19):
        row = [c for c in layout[r].tolist() if c >= 0]
        assert len(row) == len(set(row))  # no block twice
        fixed = {max(r - 1, 0), r, min(r + 1, 19), 0, 19}
        assert fixed <= set(row) and len(set(row) - fixed) == 3
    again = build_attention("bigbird", 64, 4, block=8, random_blocks=3, seed=5).layout(20)
    assert torch.equal(layout, again)
    make = attention_factory("bigbird", 64, 4, block=8, random_blocks=3, seed=5)
    assert not torch.equal(make(0).layout(20), make(1).layout(20))  # each layer its own draw
    attention.eval()
    assert torch.equal(attention.layout(20), layout)  # the same mask in evaluation


def test_longformer_refuses_an_odd_window():
    with pytest.raises(ValueError, match="must be even"):
        build_attention("longformer", 64, 4, window=21)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("n_blocks", [1, 2, 3, 19])
def test_band_columns_are_the_blocks_their_offsets_name(name, n_blocks):
    """The computation reads the band columns as slices (block r + offset): the layout must hold
    exactly those blocks there, -1 past either end, and no block twice in a row."""
    attention = build_attention(name, 64, 4, **CASES[name][0])
    layout, offsets = attention.key_blocks(n_blocks, "cpu"), attention.band_offsets(n_blocks)
    rows = torch.arange(n_blocks)[:, None]
    band = rows + torch.tensor(offsets, dtype=torch.long)
    expected_band = band.masked_fill((band < 0) | (band >= n_blocks), -1)
    assert torch.equal(layout[:, : len(offsets)], expected_band)
    for row in layout.tolist():
        listed = [c for c in row if c >= 0]
        assert len(listed) == len(set(listed)) and all(c < n_blocks for c in listed)


def test_a_sparse_record_keeps_its_error_under_its_mask_and_against_full_attention(tmp_path):
    from conftest import compose

    from bench.harness import run_job

    cfg = compose(
        "attention=sliding_window",
        "attention.window=16",
        "attention.block=8",
        "seq_len=96",
        "model.d_model=64",
        "model.n_heads=2",
        "device=cpu",
        "bench.warmup=0",
        "bench.repeats=1",
    )
    record = run_job(cfg, output_dir=tmp_path)
    assert record["status"] == "ok", record.get("reason")
    assert record["max_abs_err"] < 1e-5 < record["max_abs_err_vs_full"]  # exact under its mask, not to full


def test_lra_table_puts_measured_ratios_beside_lra_s():
    from bench.analysis.lra_table import table

    def record(attention, n, ms, mib):
        return {"attention": attention, "seq_len": n, "status": "ok", "fwd_bwd_ms": ms, "peak_mem_mib": mib}

    text = table(
        [record("full", 4096, 800.0, 1000.0), record("sdpa", 4096, 400.0, 100.0), record("linear", 4096, 100.0, 200.0)]
    )
    assert "| linear | 4096 | 8.0x / 0.20 | 4.0x / 2.00 | 5.6x / 0.11 | 100 / 200 |" in text
    assert "| sdpa | 4096 | 2.0x / 0.10 |  | no row |" in text


def test_lra_table_keeps_two_settings_of_one_backend_apart():
    """Records that set options away from the defaults get their own row (with LRA's figure for
    the backend), never a median with the default setting's."""
    from bench.analysis.lra_table import table

    def record(ms, label, **options):  # the label is written when measuring: the options away from the defaults
        return {
            "attention": "reformer",
            "attention_options": options,
            "label": label,
            "seq_len": 4096,
            "status": "ok",
            "fwd_bwd_ms": ms,
            "peak_mem_mib": 100.0,
        }

    text = table(
        [
            {"attention": "full", "seq_len": 4096, "status": "ok", "fwd_bwd_ms": 800.0, "peak_mem_mib": 1000.0},
            record(400.0, "reformer", chunk=64, rounds=2),
            record(200.0, "reformer[chunk=410,rounds=1,buckets=10]", chunk=410, rounds=1, buckets=10),
        ]
    )
    assert "| reformer | 4096 | 2.0x / 0.10 | - | 0.8x / 0.24 | 400 / 100 |" in text
    assert "| reformer (chunk=410, rounds=1, buckets=10) | 4096 | 4.0x / 0.10 | - | 0.8x / 0.24 | 200 / 100 |" in text


def test_lra_table_puts_listops_accuracy_beside_lra_s_table_1():
    from bench.analysis.lra_table import listops_table

    def record(attention, accuracy, label=None, **options):
        return {
            "attention": attention,
            "attention_options": options,
            "label": label or attention,
            "bench": "accuracy",
            "task": "listops",
            "status": "ok",
            "metric": "test_accuracy",
            "value": accuracy,
            "peak_mem_mib": 200.0,
            "best_val": accuracy + 0.01,
            "best_step": 600,
            "train_seconds": 600.0,
        }

    rows = listops_table(
        [
            record("full", 0.31),
            record("local", 0.29, "local[block=8]", block=8, kernel="auto"),
            record("nystrom", 0.33, landmarks=64),
            {"attention": "linear", "status": "failed"},
        ]
    )
    lines = rows.splitlines()[2:]
    assert lines == [
        "| nystrom | 33.0% | 34.0% (600) | 10.0 | 200 | no row |",
        "| full | 31.0% | 32.0% (600) | 10.0 | 200 | 36.37% |",
        "| local (block=8) | 29.0% | 30.0% (600) | 10.0 | 200 | 15.82% |",
    ]


def test_bigbird_keeps_a_few_visibility_masks_while_decoding_not_one_per_length():
    """Decoding adds a key block every ``block`` tokens; the [blocks, blocks] masks of older
    lengths are dropped (at most VISIBILITY_KEPT), and a dropped length is rebuilt the same."""
    from efficient.attention.bigbird import VISIBILITY_KEPT

    attention = build_attention("bigbird", 64, 4, block=8, random_blocks=2)
    first = attention.block_visibility(5, "cpu").clone()
    for n_blocks in range(6, 40):
        attention.block_visibility(n_blocks, "cpu")
    assert len(attention._visibility) == VISIBILITY_KEPT
    assert torch.equal(attention.block_visibility(5, "cpu"), first)
