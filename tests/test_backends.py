"""Every registered backend, found through the registry: interface, config, and numerics.

A new backend module + yaml is picked up here without editing this file.
"""

import pytest
import torch

from conftest import ROOT, compose
from efficient.attention import Capabilities, Cell, build_attention, get_backend

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


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


def test_unknown_backend_lists_the_valid_ones(backend_name):
    with pytest.raises(KeyError, match=backend_name):
        get_backend("no-such-backend")


def test_unknown_option_lists_the_valid_ones(backend_name):
    with pytest.raises(TypeError, match="valid options"):
        build_attention(backend_name, 32, 4, no_such_option=1)


def cpu_runnable(backend_name, dtype="float64", **cell):
    reason = get_backend(backend_name).unsupported_reason(Cell("cpu", dtype, **cell))
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_exact_backends_match_the_reference_in_float64(backend_name, causal, padded):
    """Forward and gradients against reference_mode (exact attention, same parameters)."""
    if not get_backend(backend_name).capabilities.exact:
        pytest.skip("approximate backend: checked by its own tests")
    cpu_runnable(backend_name, causal=causal, key_padding_mask=padded)
    torch.manual_seed(0)
    attn = build_attention(backend_name, 32, 4).double()
    x = torch.randn(2, 37, 32, dtype=torch.float64, requires_grad=True)  # 37: divides no chunk size
    mask = None
    if padded:
        mask = torch.ones(2, 37, dtype=torch.bool)
        mask[0, 30:] = False
    y, _ = attn(x, key_padding_mask=mask, causal=causal)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    attn.reference_mode = True
    y_ref, _ = attn(x, key_padding_mask=mask, causal=causal)
    (gx_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    assert torch.allclose(y, y_ref, atol=TOLERANCE[torch.float64])
    assert torch.allclose(gx, gx_ref, atol=TOLERANCE[torch.float64])
