"""Every registered backend, found through the registry: interface, config, and numerics.

A new backend module + yaml is picked up here without editing this file.
"""

import copy

import pytest
import torch

from conftest import ROOT, compose
from efficient.attention import Capabilities, Cell, Unsupported, build_attention, get_backend

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}  # fp32 against the fp64 reference


def test_every_backend_has_a_yaml_and_composes(backend_name):
    assert (ROOT / "conf" / "attention" / f"{backend_name}.yaml").exists()
    cfg = compose(f"attention={backend_name}")
    assert cfg.attention.name == backend_name


def test_capabilities_are_data(backend_name):
    caps = get_backend(backend_name).capabilities
    assert isinstance(caps, Capabilities)
    assert set(caps.devices) <= {"cpu", "cuda"} and caps.devices


def test_impossible_cells_have_reasons(backend_name):
    backend = get_backend(backend_name)
    caps = backend.capabilities
    if not caps.causal:
        reason = backend.unsupported_reason(Cell("cpu", "float32", causal=True))
        assert reason and "causal" in reason
    if "cpu" not in caps.devices:
        assert "cpu" in backend.unsupported_reason(Cell("cpu", "float32"))


def test_no_backward_where_the_backend_has_none(backend_name):
    backend = get_backend(backend_name)
    if "cpu" not in backend.capabilities.devices or "cpu" in backend.capabilities.backward_devices:
        pytest.skip("runs backward on CPU, or does not run on CPU")
    attn = build_attention(backend_name, 32, 4)
    with pytest.raises(Unsupported, match="no backward on cpu"):
        attn(torch.randn(1, 8, 32))


def test_unknown_backend_lists_the_valid_ones(backend_name):
    with pytest.raises(KeyError, match=backend_name):
        get_backend("no-such-backend")


def test_unknown_option_lists_the_valid_ones(backend_name):
    with pytest.raises(TypeError, match="valid options"):
        build_attention(backend_name, 32, 4, no_such_option=1)


def cpu_dtype(backend_name, **cell) -> torch.dtype:
    """float64 where the backend runs it on CPU, else float32; skip if neither runs."""
    backend = get_backend(backend_name)
    for dtype in (torch.float64, torch.float32):
        if backend.unsupported_reason(Cell("cpu", str(dtype)[6:], **cell)) is None:
            return dtype
    pytest.skip(backend.unsupported_reason(Cell("cpu", "float32", **cell)))


def compare_with_reference(backend_name, x, context=None, mask=None, causal=False, **options):
    """The backend against reference_mode (exact attention, same parameters): outputs, grads."""
    dtype = cpu_dtype(backend_name, causal=causal, key_padding_mask=mask is not None,
                      cross_attention=context is not None)
    torch.manual_seed(0)
    attn = build_attention(backend_name, x.shape[-1], 4, **options).to(dtype)
    backward = "cpu" in get_backend(backend_name).capabilities.backward_devices
    inputs = [t.to(dtype).requires_grad_(backward) for t in (x, context) if t is not None]
    with torch.set_grad_enabled(backward):
        y, _ = attn(inputs[0], context=inputs[1] if context is not None else None, key_padding_mask=mask, causal=causal)
    reference = copy.deepcopy(attn).double()
    reference.reference_mode = True
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    y_ref, _ = reference(ref_inputs[0], context=ref_inputs[1] if context is not None else None,
                         key_padding_mask=mask, causal=causal)
    atol = TOLERANCE[dtype]
    assert (y.double() - y_ref).abs().max() < atol
    if backward:
        grads = torch.autograd.grad(y.square().sum(), inputs)
        grads_ref = torch.autograd.grad(y_ref.square().sum(), ref_inputs)
        for g, g_ref in zip(grads, grads_ref):
            assert (g.double() - g_ref).abs().max() < 10 * atol


def exact_only(backend_name):
    if not get_backend(backend_name).capabilities.exact:
        pytest.skip("approximate backend: checked by its own tests")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_exact_backends_match_the_reference(backend_name, causal, padded):
    """Forward and gradients; 37 tokens, a length no default chunk or block divides."""
    exact_only(backend_name)
    x = torch.randn(2, 37, 32)
    mask = None
    if padded:
        mask = torch.ones(2, 37, dtype=torch.bool)
        mask[0, 30:] = False
    compare_with_reference(backend_name, x, mask=mask, causal=causal)


@pytest.mark.parametrize("q_len,k_len", [(13, 41), (41, 13)])
def test_causal_alignment_is_bottom_right_for_every_backend(backend_name, q_len, k_len):
    """Cross-attention with q_len != k_len: query i sees key j iff j <= i + (k_len - q_len)."""
    exact_only(backend_name)
    compare_with_reference(backend_name, torch.randn(2, q_len, 32), context=torch.randn(2, k_len, 32), causal=True)
