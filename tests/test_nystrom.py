"""Nystromformer: the pseudo-inverse, the landmarks, padding, gradients and refusals."""

import pytest
import torch

from efficient.attention import Setting, Unsupported, build_attention, get_backend
from efficient.attention.functional import exact_attention
from efficient.attention.nystrom import iterative_pinv, segment_means


def qkv(n, m=None, seed=0, heads=4, d=16):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, n, d, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(2, heads, m or n, d, generator=generator, dtype=torch.float64) for _ in range(2))
    return q, k, v


def nystrom(**options):
    return build_attention("nystrom", 64, 4, **options).double()


def test_the_iteration_converges_to_the_moore_penrose_inverse():
    a = torch.randn(3, 4, 16, 16, dtype=torch.float64).softmax(dim=-1)
    assert (iterative_pinv(a, 40) - torch.linalg.pinv(a)).abs().max() < 1e-8
    six = (iterative_pinv(a, 6) @ a - torch.eye(16, dtype=torch.float64)).abs().max()
    assert six < (iterative_pinv(a, 2) @ a - torch.eye(16, dtype=torch.float64)).abs().max()


def test_one_landmark_per_position_is_exact_attention():
    """Each segment one token: F = A = B = softmax(Q K^T), so F A^+ B V = A V once A^+ has converged."""
    q, k, v = qkv(24)
    out = nystrom(landmarks=24, pinv_iterations=40, conv_kernel=0).attend(q, k, v, None, False)
    assert (out - exact_attention(q, k, v)).abs().max() < 1e-10


def test_landmarks_are_the_means_of_real_tokens_in_each_segment():
    x = torch.arange(12, dtype=torch.float64).reshape(1, 1, 12, 1)
    real = torch.ones(1, 12, dtype=torch.bool)
    real[0, 5] = False
    means, filled = segment_means(x, real, 3)
    assert filled.all()
    means = means[0, 0, :, 0]  # segments [0-3], [4-7] without 5, [8-11]
    assert means.tolist() == [1.5, (4 + 6 + 7) / 3, 9.5]


@pytest.mark.parametrize("n", [37, 64])
def test_padding_never_changes_real_outputs(n):
    attention = nystrom(landmarks=8, conv_kernel=5)
    q, k, v = qkv(n)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[:, n - 9 :] = False
    noisy_k, noisy_v = k.clone(), v.clone()
    noisy_k[..., n - 9 :, :] = 50 * torch.randn(2, 4, 9, 16, dtype=torch.float64)
    noisy_v[..., n - 9 :, :] = 50 * torch.randn(2, 4, 9, 16, dtype=torch.float64)
    y = attention.attend(q, k, v, mask, False)
    assert torch.allclose(y, attention.attend(q, noisy_k, noisy_v, mask, False), atol=1e-12)


def test_a_length_the_landmarks_do_not_divide_is_padded_at_the_front():
    """37 tokens, 8 landmarks: the same as 3 padded tokens before them (any values)."""
    attention = nystrom(landmarks=8)
    q, k, v = qkv(37)

    def front(t):
        return torch.cat([torch.randn(2, 4, 3, 16, dtype=torch.float64), t], dim=-2)

    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[:, :3] = False
    expected = attention.attend(front(q), front(k), front(v), mask, False)[..., 3:, :]
    assert torch.allclose(attention.attend(q, k, v, None, False), expected, atol=1e-12)


def test_gradients_against_finite_differences():
    attention = build_attention("nystrom", 8, 2, landmarks=4, conv_kernel=3).double()
    q, k, v = (t[:1, :2, :12, :4].clone().requires_grad_() for t in qkv(12, d=4))
    assert torch.autograd.gradcheck(lambda *t: attention.attend(*t, None, False), (q, k, v))


def test_causal_is_refused_with_a_reason():
    assert "cannot be causal" in get_backend("nystrom").unsupported_reason(Setting("cpu", "float32", causal=True))
    assert "cross-attention" in get_backend("nystrom").unsupported_reason(
        Setting("cpu", "float32", cross_attention=True)
    )
    with pytest.raises(Unsupported, match="cannot be causal"):
        nystrom()(torch.randn(1, 16, 64, dtype=torch.float64), causal=True)
