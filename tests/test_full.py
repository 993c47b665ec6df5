"""``full`` against an explicit formula, and the facts every mask must meet."""

import math

import pytest
import torch

from efficient.attention import build_attention
from efficient.attention.functional import exact_attention

torch.manual_seed(0)


def explicit_attention(q, k, v, allowed):
    """Loop-level softmax attention: o_i = sum_j softmax_j(q_i.k_j / sqrt(d)) v_j over allowed j."""
    b, h, n, d = q.shape
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                js = [j for j in range(k.shape[2]) if allowed(bi, i, j)]
                if not js:
                    continue
                s = torch.stack([q[bi, hi, i] @ k[bi, hi, j] / math.sqrt(d) for j in js])
                w = torch.exp(s - s.max()) / torch.exp(s - s.max()).sum()
                out[bi, hi, i] = sum(wj * v[bi, hi, j] for wj, j in zip(w, js))
    return out


def qkv(b=2, h=3, n=7, m=None, d=5):
    m = m or n
    return (
        torch.randn(b, h, n, d, dtype=torch.float64),
        torch.randn(b, h, m, d, dtype=torch.float64),
        torch.randn(b, h, m, d, dtype=torch.float64),
    )


def test_matches_explicit_formula_float64():
    q, k, v = qkv()
    assert torch.allclose(exact_attention(q, k, v), explicit_attention(q, k, v, lambda b, i, j: True), atol=1e-12)


def test_causal_with_fewer_queries_than_keys_is_bottom_right_aligned():
    q, k, v = qkv(n=4, m=9)
    expected = explicit_attention(q, k, v, lambda b, i, j: j <= i + (9 - 4))
    assert torch.allclose(exact_attention(q, k, v, causal=True), expected, atol=1e-12)


def test_causal_with_more_queries_than_keys_zeroes_queries_that_see_nothing():
    q, k, v = qkv(n=6, m=3)
    expected = explicit_attention(q, k, v, lambda b, i, j: j <= i + (3 - 6))
    out = exact_attention(q, k, v, causal=True)
    assert torch.allclose(out, expected, atol=1e-12)
    assert out[:, :, :3].abs().max() == 0  # queries 0..2 see no key


def test_padding_mask_matches_explicit_formula():
    q, k, v = qkv(n=6)
    real = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    expected = explicit_attention(q, k, v, lambda b, i, j: bool(real[b, j]))
    assert torch.allclose(exact_attention(q, k, v, real), expected, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,m", [(37, 37), (11, 37), (37, 11)])
def test_query_blocks_give_the_same_result(causal, n, m):
    q, k, v = qkv(n=n, m=m)
    real = torch.rand(2, m) > 0.2
    whole = exact_attention(q, k, v, real, causal)
    assert torch.allclose(exact_attention(q, k, v, real, causal, query_block=8), whole, atol=1e-12)


def layer(**kw):
    return build_attention("full", 24, 3, **kw).double()


def test_layer_causality_future_tokens_never_change_past_outputs():
    attn = layer()
    x = torch.randn(2, 12, 24, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 7:] = torch.randn(2, 5, 24, dtype=torch.float64)
    y, _ = attn(x, causal=True)
    y2, _ = attn(x2, causal=True)
    assert torch.equal(y[:, :7], y2[:, :7])
    assert not torch.allclose(y[:, 7:], y2[:, 7:])


def test_layer_padding_invariance_padded_tokens_never_change_real_outputs():
    attn = layer()
    x = torch.randn(2, 10, 24, dtype=torch.float64)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, 6:] = False
    x2 = x.clone()
    x2[:, 6:] = 100 * torch.randn(2, 4, 24, dtype=torch.float64)
    y, _ = attn(x, key_padding_mask=mask)
    y2, _ = attn(x2, key_padding_mask=mask)
    assert torch.allclose(y[:, :6], y2[:, :6], atol=1e-12)
    short, _ = attn(x[:, :6])  # the same as never having had the padding
    assert torch.allclose(y[:, :6], short, atol=1e-12)


def test_cross_attention_shapes_and_context_dependence():
    attn = layer()
    x, context = torch.randn(2, 5, 24, dtype=torch.float64), torch.randn(2, 9, 24, dtype=torch.float64)
    y, state = attn(x, context=context)
    assert y.shape == (2, 5, 24) and state is None
    y2, _ = attn(x, context=context + 1)
    assert not torch.allclose(y, y2)


def test_gradients_reach_inputs_and_parameters():
    attn = layer()
    x = torch.randn(2, 6, 24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: attn(t, causal=True)[0], (x,))
    attn(x)[0].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in attn.parameters())


@pytest.mark.parametrize("causal", [False, True])
def test_reference_mode_runs_in_query_blocks_and_equals_full(causal):
    """The reference (every backend's oracle) computes 256 query rows at a time so that long
    inputs fit: over 600 tokens (two whole blocks and a ragged one), padded, it equals full's
    unblocked scores."""
    attn = layer()
    x = torch.randn(2, 600, 24, dtype=torch.float64)
    padding = torch.arange(600) < torch.tensor([[600], [431]])  # [2, 600]; the second padded after 431
    y, _ = attn(x, key_padding_mask=padding, causal=causal)
    attn.reference_mode = True
    torch.testing.assert_close(attn(x, key_padding_mask=padding, causal=causal)[0], y, rtol=0, atol=1e-12)
