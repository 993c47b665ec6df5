"""Backends that attend through a feature map (``linear``, ``performer``): each against the
quadratic form of its own kernel in float64, causality, padding, alignment, grouped queries.

Their reference is the definition written out with every [n, m] weight materialised:

    out_i = sum_j A_ij v_j / (sum_j A_ij + eps),   A_ij = phi(q_i) . phi(k_j) where i sees j, else 0
"""

import pytest
import torch
from einops import einsum

from efficient.attention import backend_names, build_attention, get_backend
from efficient.attention.functional import repeat_kv

FEATURE_MAP_BACKENDS = [name for name in backend_names() if hasattr(get_backend(name), "feature_maps")]
pytestmark = pytest.mark.parametrize("name", FEATURE_MAP_BACKENDS)
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def quadratic_kernel_attention(attention, q, k, v, key_padding_mask, causal):
    """The same kernel attention with the [b, h, n, m] weights written out: no chunks, no sums.

    Causal: query i attends, without a mask, to the keys it sees (0 .. i + m - n), so that a
    feature map that depends on the keys (Performer's key stabiliser) sees only those.
    """
    n, m = q.shape[-2], k.shape[-2]
    if causal:
        rows = []
        for i in range(n):
            seen = i + m - n + 1
            if seen <= 0:
                rows.append(torch.zeros_like(q[..., i : i + 1, :]))
                continue
            mask = None if key_padding_mask is None else key_padding_mask[:, :seen]
            rows.append(
                quadratic_kernel_attention(
                    attention, q[..., i : i + 1, :], k[..., :seen, :], v[..., :seen, :], mask, causal=False
                )
            )
        return torch.cat(rows, dim=-2)
    q_features, k_features = attention.feature_maps(q, k, key_padding_mask, causal)
    k_features, v = repeat_kv(k_features, q.shape[1]), repeat_kv(v, q.shape[1])
    weights = einsum(q_features, k_features, "b h n D, b h m D -> b h n m")
    if key_padding_mask is not None:
        weights = weights * key_padding_mask[:, None, None, :]
    denominator = weights.sum(-1, keepdim=True) + attention.denominator_eps
    return einsum(weights, v, "b h n m, b h m d -> b h n d") / torch.where(denominator == 0, 1, denominator)


def random_qkv(n, m, dtype, heads=4, kv_heads=4, d=16, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, d, generator=generator, dtype=dtype)
    k, v = (torch.randn(batch, kv_heads, m, d, generator=generator, dtype=dtype) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("n,m,kv_heads", [(37, 37, 4), (13, 41, 2), (41, 13, 1), (150, 150, 4)])
def test_equals_its_quadratic_form_forward_and_gradients(name, dtype, causal, padded, n, m, kv_heads):
    """Chunked prefix sums (causal, chunk 16 so that 150 spans ten chunks with a remainder) and the
    non-causal sums against the written-out weights; q_len != k_len with bottom-right alignment."""
    attention = build_attention(name, 64, 4, chunk=16).to(dtype)
    q, k, v = (t.requires_grad_() for t in random_qkv(n, m, dtype, kv_heads=kv_heads))
    mask = None
    if padded:
        mask = torch.ones(2, m, dtype=torch.bool)
        mask[1, m * 2 // 3 :] = False
    out = attention.attend(q, k, v, mask, causal)
    reference = attention.double()
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = quadratic_kernel_attention(reference, *ref_inputs, mask, causal)
    assert (out.double() - expected).abs().max() < TOLERANCE[dtype]
    for g, g_ref in zip(
        torch.autograd.grad(out.square().sum(), (q, k, v)), torch.autograd.grad(expected.square().sum(), ref_inputs)
    ):
        assert (g.double() - g_ref).abs().max() < 10 * TOLERANCE[dtype] * max(1.0, g_ref.abs().max())


def test_changing_future_tokens_never_changes_past_outputs(name):
    torch.manual_seed(0)
    attention = build_attention(name, 64, 4, chunk=8).double()
    x = torch.randn(2, 40, 64, dtype=torch.float64)
    changed = x.clone()
    changed[:, 23:] = 10 * torch.randn(2, 17, 64, dtype=torch.float64)
    y, _ = attention(x, causal=True)
    y_changed, _ = attention(changed, causal=True)
    assert torch.allclose(y[:, :23], y_changed[:, :23], atol=1e-12)
    assert not torch.allclose(y[:, 23:], y_changed[:, 23:])


@pytest.mark.parametrize("causal", [False, True])
def test_padding_never_changes_real_outputs(name, causal):
    torch.manual_seed(0)
    attention = build_attention(name, 64, 4).double()
    x = torch.randn(2, 30, 64, dtype=torch.float64)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[:, 21:] = False
    noisy = x.clone()
    noisy[:, 21:] = 50 * torch.randn(2, 9, 64, dtype=torch.float64)
    y, _ = attention(x, key_padding_mask=mask, causal=causal)
    y_noisy, _ = attention(noisy, key_padding_mask=mask, causal=causal)
    assert torch.allclose(y[:, :21], y_noisy[:, :21], atol=1e-12)
    short, _ = attention(x[:, :21], causal=causal)  # padding is the same as a shorter input
    assert torch.allclose(y[:, :21], short, atol=1e-12)


def test_a_query_that_sees_no_key_outputs_zeros(name):
    attention = build_attention(name, 64, 4).double()
    q, k, v = random_qkv(9, 5, torch.float64)
    out = attention.attend(q, k, v, None, True)  # bottom-right: queries 0-3 see no key
    assert out[:, :, :4].abs().max() == 0 and out[:, :, 4:].abs().min() > 0


def test_decoding_keeps_a_state_of_fixed_size_and_equals_the_causal_forward(name):
    """A prefill of 50 tokens, then 30 one at a time, against one causal pass over all 80: the
    state (``RunningSums``) has the same size after 1 token as after 80, the size its backend
    states, and the capacity asked for (a million tokens) allocates nothing."""
    torch.manual_seed(0)
    attention = build_attention(name, 64, 4, n_kv_heads=2, chunk=16).double().eval()
    x = torch.randn(2, 80, 64, dtype=torch.float64)
    with torch.no_grad():
        whole, _ = attention(x, causal=True)
        state = attention.empty_decoding_state(2, 10**6, dtype=torch.float64)
        sizes, pieces = [], []
        for start, stop in [(0, 50)] + [(i, i + 1) for i in range(50, 80)]:
            out, state = attention(x[:, start:stop], causal=True, state=state)
            pieces.append(out)
            sizes.append(state.nbytes())
    assert (torch.cat(pieces, dim=1) - whole).abs().max() < 1e-10
    assert state.length == 80 and len(set(sizes)) == 1
    options = {k: getattr(attention, k) for k in ("features",) if hasattr(attention, k)}
    assert sizes[0] == 2 * 8 * get_backend(name).decoding_state_elements(2, 16, 80, **options)
