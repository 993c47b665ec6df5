"""Backend-specific facts of the memory-efficient kernels (the registry-wide checks are in
test_backends.py). GPU tests skip cleanly without CUDA."""

import enum

import pytest
import torch

from conftest import requires_cuda
from efficient.attention import Cell, Unsupported, backend_names, build_attention, get_backend, option_defaults
from efficient.attention.chunked import chunked_attention
from efficient.attention.functional import exact_attention

torch.manual_seed(0)


def qkv(n=37, m=None, b=2, h=3, d=8, dtype=torch.float64):
    m = m or n
    return (torch.randn(b, h, n, d, dtype=dtype), torch.randn(b, h, m, d, dtype=dtype),
            torch.randn(b, h, m, d, dtype=dtype))


# -- chunked ---------------------------------------------------------------------------------
@pytest.mark.parametrize("query_chunk,key_chunk", [(5, 7), (1, 3), (16, 64), (37, 37)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,m", [(37, 37), (10, 37), (37, 10)])
def test_chunked_is_exact_when_chunks_do_not_divide_the_length(query_chunk, key_chunk, causal, n, m):
    q, k, v = qkv(n, m)
    mask = torch.rand(2, m) > 0.3
    mask[:, 0] = True
    expected = exact_attention(q, k, v, mask, causal)
    out = chunked_attention(q, k, v, mask, causal, query_chunk=query_chunk, key_chunk=key_chunk)
    assert torch.allclose(out, expected, atol=1e-12)


def test_chunked_gradients_through_checkpointing():
    q, k, v = (t.requires_grad_() for t in qkv(n=11, m=13, b=1, h=2, d=4))
    assert torch.autograd.gradcheck(
        lambda q, k, v: chunked_attention(q, k, v, causal=True, query_chunk=4, key_chunk=5), (q, k, v)
    )


def test_chunked_checkpointing_changes_nothing_but_memory():
    q, k, v = qkv()
    grads = []
    for use_checkpoint in (True, False):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = chunked_attention(*inputs, causal=True, query_chunk=8, key_chunk=8, use_checkpoint=use_checkpoint)
        grads.append(torch.autograd.grad(out.square().sum(), inputs))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-12)


def test_chunked_keeps_the_running_max_stable_for_huge_scores():
    q, k, v = qkv(n=16)
    out = chunked_attention(q * 300, k * 300, v, query_chunk=4, key_chunk=4)  # exp() would overflow
    assert torch.isfinite(out).all()
    assert torch.allclose(out, exact_attention(q * 300, k * 300, v), atol=1e-10)


def test_chunked_rejects_empty_chunks():
    with pytest.raises(ValueError, match="positive"):
        build_attention("chunked", 32, 4, key_chunk=0)


# -- sdpa ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["efficient", "cudnn"])
def test_sdpa_kernels_torch_lacks_on_cpu_are_unsupported_not_math(kernel):
    reason = get_backend("sdpa").unsupported_reason(Cell("cpu", "float32"), kernel=kernel)
    assert reason == f"torch SDPA has no {kernel} kernel on CPU (CPU kernels: flash, math)"
    attn = build_attention("sdpa", 32, 4, kernel=kernel)
    with pytest.raises(Unsupported, match="no .* kernel on CPU"):
        attn(torch.randn(1, 8, 32))


@pytest.mark.parametrize("kernel", ["flash", "math", "auto"])
def test_sdpa_cpu_kernels_are_exact(kernel):
    attn = build_attention("sdpa", 32, 4, kernel=kernel).double()
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    y, _ = attn(x, causal=True)
    attn.reference_mode = True
    assert torch.allclose(y, attn(x, causal=True)[0], atol=1e-10)


def test_sdpa_unknown_kernel_is_a_config_error():
    from conftest import compose

    with pytest.raises(Exception, match="flsh"):
        compose("attention=sdpa", "attention.kernel=flsh")


# -- flex ------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_flex_sliding_window_matches_the_windowed_reference(causal):
    attn = build_attention("flex", 32, 2, window=5).eval()
    x = torch.randn(2, 40, 32)
    with torch.no_grad():
        y, _ = attn(x, causal=causal)
        changed = x.clone()
        changed[:, 26:] += 1.0  # tokens 26.. are at least 6 away from token 20: outside its window
        y_changed, _ = attn(changed, causal=causal)
        attn.reference_mode = True
        expected, _ = attn.double()(x.double(), causal=causal)
    assert (y.double() - expected).abs().max() < 1e-5
    assert torch.allclose(y[:, 20], y_changed[:, 20], atol=1e-6)
    assert not torch.allclose(y[:, 30], y_changed[:, 30])


# -- xformers --------------------------------------------------------------------------------
def test_xformers_on_cpu_is_unsupported_and_a_missing_build_is_unavailable():
    xformers = get_backend("xformers")
    assert xformers.unsupported_reason(Cell("cpu", "float16")) == "xformers does not run on cpu (runs on: cuda)"
    here = xformers.unavailable_reason(Cell("cpu", "float16"))  # what this machine's xformers says, in its words
    try:
        import xformers.ops  # noqa: F401
    except Exception:
        assert "xformers is not available" in here
    else:
        assert "device=cpu (supported: {'cuda'})" in here


# -- GPU: every exact kernel against the fp32 reference, per-dtype tolerances ----------------
GPU_TOLERANCE = {torch.float16: 4e-3, torch.bfloat16: 2e-2}  # forward, as in xformers' tests

def gpu_cases() -> list[tuple[str, dict]]:
    """Every exact backend that runs on CUDA, once per value of each of its choice options
    (sdpa: each kernel; xformers: each op), from the registry: a new backend joins by itself."""
    cases = []
    for name in backend_names():
        backend = get_backend(name)
        if not backend.capabilities.exact or "cuda" not in backend.capabilities.devices:
            continue
        choices = {k: type(v) for k, v in option_defaults(backend).items() if isinstance(v, enum.Enum)}
        cases += [(name, {option: member.value}) for option, kind in choices.items() for member in kind]
        cases += [(name, {})] * (not choices)
    return cases


GPU_CASES = gpu_cases()


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name,options", GPU_CASES, ids=[f"{n}-{o}" for n, o in GPU_CASES])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_kernels_match_the_fp32_reference(name, options, dtype, causal):
    reason = get_backend(name).cannot_run(Cell("cuda", str(dtype)[6:], causal=causal, head_dim=64), **options)
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    attn = build_attention(name, 512, 8, **options).cuda().to(dtype)
    x = torch.randn(2, 1000, 512, device="cuda", dtype=dtype, requires_grad=True)
    y, _ = attn(x, causal=causal)
    (gx,) = torch.autograd.grad(y.float().square().sum(), x)
    reference = build_attention("full", 512, 8).cuda()
    reference.load_state_dict({k: v.float() for k, v in attn.state_dict().items()})
    reference.reference_mode = True
    x32 = x.detach().float().requires_grad_()
    y_ref, _ = reference(x32, causal=causal)
    (gx_ref,) = torch.autograd.grad(y_ref.square().sum(), x32)
    assert (y.float() - y_ref).abs().max() < GPU_TOLERANCE[dtype]
    assert (gx.float() - gx_ref).abs().max() / gx_ref.abs().max() < 5 * GPU_TOLERANCE[dtype]


def test_flex_block_masks_follow_the_padding_not_the_tensor():
    """Two different padding masks (even at a reused address) never share a cached block mask."""
    attn = build_attention("flex", 32, 2).eval()
    x = torch.randn(2, 40, 32)
    with torch.no_grad():
        for real in (30, 12, 30):
            mask = torch.arange(40)[None, :].expand(2, 40) < real  # a fresh tensor each time
            y, _ = attn(x, key_padding_mask=mask)
            short, _ = attn(x[:, :real])
            assert (y[:, :real] - short).abs().max() < 1e-5
