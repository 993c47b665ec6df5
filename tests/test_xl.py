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
    assert torch.allclose(attn.position_logits(q, n, klen, gather=True), direct_position_logits(attn, q, n, klen),
                          atol=1e-12)


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
    assert torch.equal(clamped[0], clamped[1]) and torch.equal(clamped[2], relative_sinusoid(torch.tensor([-1000]), 8, 1000)[0])


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


def test_evaluation_can_use_a_longer_memory_than_training():
    size = ModelSize(d_model=D, n_heads=H, n_layers=2, d_ff=32, dropout=0.0)
    model = CausalLM(30, 64, size, attention_factory("xl", D, H, mem_len=2)).double()
    columns = ordered_columns(torch.randint(30, (64,)), 2)
    short = evaluate_stream(model, columns, tgt_len=4)
    longer = evaluate_stream(model, columns, tgt_len=4, mem_len=12)
    assert all(b.attention.mem_len == 12 for b in model.encoder.blocks)
    assert short != longer
    set_mem_len(model, 0)
    assert evaluate_stream(model, columns, tgt_len=4) != short
