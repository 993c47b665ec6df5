"""Every registered backend, found through the registry: interface, config, and numerics.

A new backend module + yaml is picked up here without editing this file.
"""

import copy
import dataclasses

import pytest
import torch
from conftest import ROOT, compose, skip_unless_available
from torch.utils.flop_counter import FlopCounterMode

from efficient.attention import (
    ProjectedAttention,
    Setting,
    Shape,
    Unsupported,
    build_attention,
    get_backend,
)
from efficient.attention.base import DTYPES

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}  # fp32 against the fp64 reference
WIDTH = 128  # 4 heads of 32: flex is refused at head widths 8 and 16 on AVX2 (docs/upstream.md)


def test_every_backend_has_a_yaml_and_composes(backend_name):
    assert (ROOT / "conf" / "attention" / f"{backend_name}.yaml").exists()
    cfg = compose(f"attention={backend_name}")
    assert cfg.attention.name == backend_name


def test_capabilities_are_consistent(backend_name):
    """What sweeps and tests read off the capabilities never contradicts itself: a backward only
    where the forward runs, a tolerance for every dtype, a sparse mask exact under it, a
    fixed-size decoding state only for a backend that decodes."""
    caps = get_backend(backend_name).capabilities
    assert caps.devices and set(caps.devices) <= {"cpu", "cuda"}
    assert set(caps.backward_devices) <= set(caps.devices)
    assert set(caps.dtypes) <= set(caps.tolerance)
    assert not caps.sparse_mask or caps.exact
    assert not caps.constant_state or caps.kv_cache


def test_impossible_cells_have_reasons(backend_name):
    """Every capability a backend lacks gives a reason that names it (none is left unchecked)."""
    backend = get_backend(backend_name)
    caps = backend.capabilities
    home = Setting(caps.devices[0], caps.dtypes[0])  # a cell it can run, changed one way at a time
    lacking = {
        "causal": (not caps.causal, dict(causal=True), "causal"),
        "key_padding_mask": (not caps.key_padding_mask, dict(key_padding_mask=True), "padding"),
        "cross_attention": (not caps.cross_attention, dict(cross_attention=True), "cross-attention"),
        "grouped_query": (not caps.grouped_query, dict(grouped_query=True), "n_kv_heads"),
        "kv_cache": (not caps.kv_cache, dict(kv_cache=True), "KV cache"),
    }
    lacking.update({f"device {d}": (d not in caps.devices, dict(device=d), d) for d in ("cpu", "cuda")})
    lacking.update({f"dtype {t}": (t not in caps.dtypes, dict(dtype=t), t) for t in DTYPES})
    checked = 0
    for what, (lacks, change, word) in lacking.items():
        reason = backend.unsupported_reason(dataclasses.replace(home, **change))
        if lacks:
            assert reason and word in reason, (what, reason)
            checked += 1
        elif what.startswith(("causal", "key_padding", "cross", "grouped", "kv_cache")):
            assert reason is None, (what, reason)
    assert backend.unsupported_reason(home) is None
    missing = sum(x[0] for x in lacking.values())
    assert checked == missing


def test_flop_model_matches_a_flop_counter(backend_name):
    """The attention core's FLOP model against torch's FlopCounterMode on a small cell."""
    backend = get_backend(backend_name)
    if "cpu" not in backend.capabilities.devices:
        pytest.skip(f"{backend_name} does not run on CPU")
    if not issubclass(backend, ProjectedAttention):
        pytest.skip(f"{backend_name} is counted by its own tests (its core includes its projections)")
    if backend_name == "flex":
        pytest.skip("FlopCounterMode cannot count inside FlexAttention's compiled kernel")
    b, h, n, d = 2, 4, 96, 16
    options = {"kernel": "math"} if backend_name == "sdpa" else {}  # the CPU fused kernel is not counted
    if backend.capabilities.needs_max_len:
        options.update(max_len=n, k=n // 3)
    attention = build_attention(backend_name, h * d, h, **options).eval()
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        attention.attend(q, k, v, None, False)
    model = backend.flops(Shape(b, h, d, n, n, causal=False, device="cpu"), **options)
    assert counter.get_total_flops() == pytest.approx(model, rel=0.01)
    if backend.capabilities.exact and backend.capabilities.causal:  # FlashAttention's convention
        assert backend.flops(Shape(b, h, d, n, n, causal=True, device="cpu"), **options) == model / 2


def test_no_backward_where_the_backend_has_none(backend_name):
    backend = get_backend(backend_name)
    if "cpu" not in backend.capabilities.devices or "cpu" in backend.capabilities.backward_devices:
        pytest.skip("runs backward on CPU, or does not run on CPU")
    skip_unless_available(backend_name, Setting("cpu", "float32", head_dim=32))
    attn = build_attention(backend_name, 128, 4)  # head_dim 32: flex is refused at 8 and 16 on AVX2
    with pytest.raises(Unsupported, match="no backward on cpu"):
        attn(torch.randn(1, 8, 128))


def test_unknown_backend_lists_the_valid_ones(backend_name):
    with pytest.raises(KeyError, match=backend_name):
        get_backend("no-such-backend")


def test_unknown_option_lists_the_valid_ones(backend_name):
    with pytest.raises(TypeError, match="valid options"):
        build_attention(backend_name, 32, 4, no_such_option=1)


def cpu_dtype(backend_name, **cell) -> torch.dtype:
    """float64 where the backend runs it on this CPU, else float32; skip if neither runs."""
    backend = get_backend(backend_name)
    for dtype in (torch.float64, torch.float32):
        if backend.cannot_run(Setting("cpu", str(dtype)[6:], **cell)) is None:
            return dtype
    pytest.skip(backend.cannot_run(Setting("cpu", "float32", **cell)))


def compare_with_reference(backend_name, x, context=None, mask=None, causal=False, **options):
    """The backend against reference_mode (exact attention, same parameters): outputs, grads."""
    dtype = cpu_dtype(
        backend_name,
        causal=causal,
        key_padding_mask=mask is not None,
        cross_attention=context is not None,
        head_dim=x.shape[-1] // 4,
    )
    torch.manual_seed(0)
    attn = build_attention(backend_name, x.shape[-1], 4, **options).to(dtype)
    backward = "cpu" in get_backend(backend_name).capabilities.backward_devices
    inputs = [t.to(dtype).requires_grad_(backward) for t in (x, context) if t is not None]
    with torch.set_grad_enabled(backward):
        y, _ = attn(inputs[0], context=inputs[1] if context is not None else None, key_padding_mask=mask, causal=causal)
    reference = copy.deepcopy(attn).double()
    reference.reference_mode = True
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    y_ref, _ = reference(
        ref_inputs[0], context=ref_inputs[1] if context is not None else None, key_padding_mask=mask, causal=causal
    )
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
    x = torch.randn(2, 37, WIDTH)
    mask = None
    if padded:
        mask = torch.ones(2, 37, dtype=torch.bool)
        mask[0, 30:] = False
    compare_with_reference(backend_name, x, mask=mask, causal=causal)


@pytest.mark.parametrize("n_kv_heads", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_grouped_query_attention_matches_the_reference(backend_name, n_kv_heads, causal, padded):
    """n_kv_heads < n_heads (4): forward and gradients against exact attention whose keys and
    values are copied out per query head."""
    exact_only(backend_name)
    if not get_backend(backend_name).capabilities.grouped_query:
        pytest.skip(f"{backend_name} has no grouped-query attention (its reason is tested above)")
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1, 25:] = False
    compare_with_reference(
        backend_name, torch.randn(2, 37, WIDTH), mask=mask if padded else None, causal=causal, n_kv_heads=n_kv_heads
    )


@pytest.mark.parametrize("q_len,k_len", [(13, 41), (41, 13)])
def test_causal_alignment_is_bottom_right_for_every_backend(backend_name, q_len, k_len):
    """Cross-attention with q_len != k_len: query i sees key j iff j <= i + (k_len - q_len)."""
    exact_only(backend_name)
    compare_with_reference(
        backend_name, torch.randn(2, q_len, WIDTH), context=torch.randn(2, k_len, WIDTH), causal=True
    )


def outputs_of(backend_name, inputs, **call):
    """One instance of the backend (default options, 4 heads of 32) on each of ``inputs`` [b, n,
    WIDTH], in float64 where it runs that here: its outputs, in order."""
    causal, mask = call.get("causal", False), call.get("key_padding_mask")
    dtype = cpu_dtype(backend_name, causal=causal, key_padding_mask=mask is not None, head_dim=WIDTH // 4)
    n = inputs[0].shape[1]
    options = {"max_len": n, "k": n // 3} if get_backend(backend_name).capabilities.needs_max_len else {}
    torch.manual_seed(0)
    attention = build_attention(backend_name, WIDTH, 4, **options).to(dtype).eval()
    with torch.no_grad():
        return [attention(x.to(dtype), **call)[0].double() for x in inputs]


@pytest.mark.parametrize("causal", [False, True])
def test_padding_never_changes_the_real_positions_outputs(backend_name, causal):
    """Whatever the padded positions hold (here: large noise), the real ones' outputs stay; 200
    tokens, more than one chunk, block or segment of every backend's defaults."""
    if causal and not get_backend(backend_name).capabilities.causal:
        pytest.skip(f"{backend_name} is not causal (its reason is tested above)")
    torch.manual_seed(1)
    x = torch.randn(2, 200, WIDTH, dtype=torch.float64)
    mask = torch.ones(2, 200, dtype=torch.bool)
    mask[1, 150:] = False
    noisy = x.clone()
    noisy[1, 150:] = 50 * torch.randn(50, WIDTH, dtype=torch.float64)
    clean, moved = outputs_of(backend_name, [x, noisy], key_padding_mask=mask, causal=causal)
    assert (clean - moved)[mask].abs().max() < 1e-5 * max(1.0, clean.abs().max().item())


def test_changing_future_tokens_never_changes_past_outputs(backend_name):
    """Every backend that claims causal attention: outputs before position 120 of 200 ignore
    what comes after (the approximations and sparse masks included)."""
    if not get_backend(backend_name).capabilities.causal:
        pytest.skip(f"{backend_name} is not causal (its reason is tested above)")
    torch.manual_seed(1)
    x = torch.randn(2, 200, WIDTH, dtype=torch.float64)
    changed = x.clone()
    changed[:, 120:] = 50 * torch.randn(2, 80, WIDTH, dtype=torch.float64)
    before, after = outputs_of(backend_name, [x, changed], causal=True)
    assert (before - after)[:, :120].abs().max() < 1e-5 * max(1.0, before.abs().max().item())
    assert (before - after)[:, 120:].abs().max() > 1e-3  # the change reached the later outputs


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_the_memory_model_bounds_the_attention_core_s_measured_peak(backend_name, causal, training):
    """``memory_bytes`` against the profiler's peak of ``attend`` alone (1,000 tokens, 8 heads of
    64, float32): the guard refuses a cell on it, so it must never predict less than the core
    takes. (test_sweeps checks the whole measured layer the same way.)"""
    from bench.measure import peak_memory_bytes

    backend = get_backend(backend_name)
    if not issubclass(backend, ProjectedAttention):
        pytest.skip(f"{backend_name}'s model covers its whole layer (test_sweeps)")
    if causal and not backend.capabilities.causal:
        pytest.skip(f"{backend_name} is not causal (its reason is tested above)")
    if training and "cpu" not in backend.capabilities.backward_devices:
        pytest.skip(f"{backend_name} has no backward on CPU")
    skip_unless_available(backend_name, Setting("cpu", "float32", head_dim=64, causal=causal))
    b, h, n, d = 1, 8, 1000, 64
    options = {"max_len": n} if backend.capabilities.needs_max_len else {}
    attention = build_attention(backend_name, h * d, h, **options)
    q, k, v = (torch.randn(b, h, n, d, requires_grad=training) for _ in range(3))
    grad = torch.randn(b, h, n, d)  # the output's gradient, an input of the step as in the harness

    def step():
        with torch.set_grad_enabled(training):
            out = attention.attend(q, k, v, None, causal)
            if training:
                out.backward(grad)

    step()  # compiled kernels and cached masks are built outside the measured call
    measured = peak_memory_bytes(step, "cpu")
    model = backend.memory_bytes(
        Shape(b, h, d, n, n, causal=causal, bytes_per_element=4, device="cpu"), training, **options
    )
    assert model >= measured > 0
