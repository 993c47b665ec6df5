"""Blocks, models and positional encodings over the backends."""

import math

import pytest
import torch

from efficient.attention import build_attention
from efficient.blocks import TransformerBlock
from efficient.models import CausalLM, EncoderClassifier, ModelSize
from efficient.positional import PositionalEncoding, sinusoid_table


def make(size):
    return lambda layer: build_attention("full", size.d_model, size.n_heads)


def test_sinusoid_matches_the_paper_formula():
    table = sinusoid_table(torch.arange(50), 16)
    pos, i = 37, 3
    assert math.isclose(table[pos, 2 * i].item(), math.sin(pos / 10000 ** (2 * i / 16)), abs_tol=1e-5)
    assert math.isclose(table[pos, 2 * i + 1].item(), math.cos(pos / 10000 ** (2 * i / 16)), abs_tol=1e-5)


def test_unknown_positional_encoding_lists_valid_ones():
    with pytest.raises(ValueError, match="sinusoidal, learned, none"):
        PositionalEncoding("rotary?", 8, 16)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_block_shapes_and_norm_placement(norm):
    block = TransformerBlock(build_attention("full", 16, 2), d_ff=32, norm=norm).eval()
    x = torch.randn(3, 5, 16)
    y, state = block(x)
    assert y.shape == x.shape and state is None
    if norm == "post":  # post-LN output is layer-normalised
        assert torch.allclose(y.mean(-1), torch.zeros(3, 5), atol=1e-5)


@pytest.mark.parametrize("positional", ["sinusoidal", "learned", "none"])
@pytest.mark.parametrize("norm", ["pre", "post"])
def test_causal_lm_is_causal(positional, norm):
    size = ModelSize(d_model=16, n_heads=2, n_layers=2, d_ff=32, dropout=0.0, norm=norm, positional=positional)
    model = CausalLM(50, 20, size, make(size)).double().eval()
    tokens = torch.randint(50, (2, 20))
    changed = tokens.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 50
    logits, _ = model(tokens)
    logits2, _ = model(changed)
    assert torch.equal(logits[:, :12], logits2[:, :12])
    assert not torch.allclose(logits[:, 12:], logits2[:, 12:])


def test_classifier_ignores_padding():
    size = ModelSize(d_model=16, n_heads=2, n_layers=2, d_ff=32, dropout=0.0)
    model = EncoderClassifier(50, 4, 20, size, make(size)).double().eval()
    tokens = torch.randint(50, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[:, 15:] = False
    noisy = tokens.clone()
    noisy[:, 15:] = torch.randint(50, (2, 5))
    assert torch.allclose(model(tokens, mask), model(noisy, mask), atol=1e-12)
    assert torch.allclose(model(tokens, mask), model(tokens[:, :15]), atol=1e-12)


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    size = ModelSize(d_model=32, n_heads=4, n_layers=1, d_ff=64, dropout=0.0)
    model = CausalLM(10, 16, size, make(size))
    tokens = torch.arange(16).remainder(10).repeat(4, 1)  # a periodic sequence to memorise
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model.loss(tokens[:, :-1], tokens[:, 1:]).item()
    for _ in range(30):
        opt.zero_grad()
        model.loss(tokens[:, :-1], tokens[:, 1:]).backward()
        opt.step()
    assert model.loss(tokens[:, :-1], tokens[:, 1:]).item() < 0.5 * first
