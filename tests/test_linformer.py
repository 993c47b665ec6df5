"""Linformer: the paper's construction, sharing modes, masks and refusals."""

import pytest
import torch

from efficient.attention import Setting, Unsupported, attention_factory, build_attention, get_backend
from efficient.models import EncoderClassifier, ModelSize

torch.manual_seed(0)


def linformer(n=16, k=16, **options):
    return build_attention("linformer", 24, 3, k=k, max_len=n, **options).double()


@pytest.mark.parametrize("share", ["none", "headwise", "kv", "layerwise"])
def test_identity_projections_with_k_equal_n_give_exact_attention(share):
    attn = linformer(share=share)
    with torch.no_grad():
        attn.E.copy_(torch.eye(16).expand_as(attn.E))
        attn.F.copy_(torch.eye(16).expand_as(attn.F))
    x = torch.randn(2, 16, 24, dtype=torch.float64)
    y, _ = attn(x)
    attn.reference_mode = True  # exact attention on the unprojected keys and values
    assert torch.allclose(y, attn(x)[0], atol=1e-12)


@pytest.mark.parametrize("share,expected", [("none", 288), ("headwise", 24), ("kv", 12), ("layerwise", 1)])
def test_projection_count_per_sharing_mode_12_layers_12_heads(share, expected):
    """Paper, section 4: headwise 24, key-value 12, layerwise 1 for 12 layers x 12 heads."""
    size = ModelSize(d_model=48, n_heads=12, n_layers=12, d_ff=48)
    make = attention_factory("linformer", 48, 12, k=4, share=share, max_len=32)
    model = EncoderClassifier(10, 2, 32, size, make)
    distinct = {id(p) for p in model.parameters() if p.dim() == 3}  # E and F are [heads, k, n]
    matrices = sum(p.shape[0] for p in model.parameters() if p.dim() == 3)
    assert matrices == expected
    assert len(distinct) == {"none": 24, "headwise": 24, "kv": 12, "layerwise": 1}[share]


def test_padding_never_changes_real_outputs():
    attn = linformer(n=20, k=8)
    x = torch.randn(2, 20, 24, dtype=torch.float64)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[:, 14:] = False
    noisy = x.clone()
    noisy[:, 14:] = 50 * torch.randn(2, 6, 24, dtype=torch.float64)
    y, _ = attn(x, key_padding_mask=mask)
    y2, _ = attn(noisy, key_padding_mask=mask)
    assert torch.allclose(y[:, :14], y2[:, :14], atol=1e-12)


def test_shorter_inputs_use_the_first_columns_like_padding():
    attn = linformer(n=20, k=8)
    x = torch.randn(2, 14, 24, dtype=torch.float64)
    padded = torch.cat([x, torch.randn(2, 6, 24, dtype=torch.float64)], dim=1)
    mask = torch.arange(20) < 14
    short, _ = attn(x)
    long, _ = attn(padded, key_padding_mask=mask.expand(2, 20))
    assert torch.allclose(short, long[:, :14], atol=1e-12)


def test_causal_is_refused_with_a_reason():
    assert "cannot be causal" in get_backend("linformer").unsupported_reason(Setting("cpu", "float32", causal=True))
    with pytest.raises(Unsupported, match="cannot be causal"):
        linformer()(torch.randn(1, 16, 24, dtype=torch.float64), causal=True)


def test_too_long_input_is_refused():
    with pytest.raises(Unsupported, match="at most 16 tokens, got 17"):
        linformer()(torch.randn(1, 17, 24, dtype=torch.float64))


def test_construction_needs_max_len_and_a_valid_k():
    with pytest.raises(ValueError, match="needs max_len"):
        build_attention("linformer", 24, 3)
    with pytest.raises(ValueError, match="k <= max_len"):
        build_attention("linformer", 24, 3, k=32, max_len=16)


def test_cross_attention_projects_the_context():
    attn = linformer(n=30, k=8)
    x, context = torch.randn(2, 5, 24, dtype=torch.float64), torch.randn(2, 30, 24, dtype=torch.float64)
    y, _ = attn(x, context=context)
    assert y.shape == (2, 5, 24)


def test_gradients_reach_the_projections():
    attn = linformer(n=12, k=4, share="none")
    x = torch.randn(2, 12, 24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: attn(t)[0], (x,))
    attn(x)[0].square().sum().backward()
    assert attn.E.grad.abs().sum() > 0 and attn.F.grad.abs().sum() > 0


def test_approximation_error_shrinks_as_k_grows():
    """Same query/key/value maps, random projections: the error against exact attention falls from
    k=4 to k=16, and vanishes at k = n with identity projections."""
    torch.manual_seed(1)
    x = torch.randn(4, 64, 24, dtype=torch.float64)
    maps = {name: t for name, t in linformer(n=64, k=64).state_dict().items() if name not in ("E", "F")}
    errors = []
    for k in (4, 16, 64):
        attn = linformer(n=64, k=k)
        attn.load_state_dict(maps, strict=False)  # only E and F differ between the three
        with torch.no_grad():
            if k == 64:
                attn.E.copy_(torch.eye(64)[None])
                attn.F.copy_(torch.eye(64)[None])
            y, _ = attn(x)
            attn.reference_mode = True
            errors.append((y - attn(x)[0]).abs().mean().item())
    assert errors[1] < errors[0], errors
    assert errors[2] < 1e-12, errors


def test_built_for_the_cells_length_while_the_record_keeps_the_configs_options():
    """max_len unset: the layer is built for seq_len (bench/cell.py), and the record's options stay
    the config's, so that one Linformer setting is one label across every length of a sweep."""
    from conftest import compose

    from bench.cell import Cell, build_subject
    from bench.harness import new_record
    from bench.records import cell_label

    for n in (32, 64):
        cfg = compose("attention=linformer", "attention.k=8", f"seq_len={n}", "device=cpu")
        assert build_subject(Cell.of(cfg)).module.E.shape[-1] == n
        record = new_record(cfg)
        assert record["attention_options"]["max_len"] is None and cell_label(record) == "linformer[k=8]"
