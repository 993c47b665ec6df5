"""Performer's random features: the draw, per-layer seeds, redraws, and the estimator's error.
Its attention is checked with linear attention's in test_kernel_attention.py."""

import torch

from efficient.attention import attention_factory, build_attention
from efficient.attention.functional import exact_attention


def test_performer_draws_orthogonal_features_once_per_layer_from_its_seed():
    make = attention_factory("performer", 64, 4, features=40, seed=7)
    first, second, again = make(0), make(1), attention_factory("performer", 64, 4, features=40, seed=7)(0)
    assert torch.equal(first.projection, again.projection)  # the same seed, the same draw
    assert not torch.equal(first.projection, second.projection)  # each layer its own
    block = first.projection[:16].double()  # rows of one block are orthogonal
    gram = block @ block.T
    assert (gram - torch.diag(gram.diag())).abs().max() < 1e-4


def test_performer_redraws_in_training_every_interval_and_never_in_eval():
    attention = build_attention("performer", 64, 4, features=32, redraw_interval=2)
    x = torch.randn(1, 10, 64)
    draws = []
    for _ in range(5):
        attention(x)
        draws.append(attention.projection.clone())
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    assert torch.equal(draws[2], draws[3]) and not torch.equal(draws[3], draws[4])
    attention.eval()
    attention(x)
    assert torch.equal(attention.projection, draws[4])


def test_performer_approaches_softmax_attention_as_features_grow():
    """FAVOR+ is an unbiased estimator of the softmax kernel: more features, less error."""
    torch.manual_seed(0)
    q, k, v = (0.5 * torch.randn(2, 4, 64, 16, dtype=torch.float64) for _ in range(3))
    exact = exact_attention(q, k, v)
    errors = []
    for features in (16, 256, 4096):
        attention = build_attention("performer", 64, 4, features=features).double()
        errors.append((attention.attend(q, k, v, None, False) - exact).abs().mean().item())
    assert errors[0] > errors[1] > errors[2], errors
