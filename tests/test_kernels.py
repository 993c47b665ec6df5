"""Backend-specific facts of the memory-efficient kernels (the registry-wide checks are in
test_backends.py). GPU tests skip cleanly without CUDA."""

import enum

import pytest
import torch
from conftest import requires_cuda, skip_unless_available

from efficient.attention import (
    Setting,
    Shape,
    Unsupported,
    backend_names,
    build_attention,
    get_backend,
    option_defaults,
)
from efficient.attention.chunked import Blocks, chunked_attention
from efficient.attention.functional import exact_attention, visible_keys
from efficient.attention.xformers import FORWARD_ONLY

torch.manual_seed(0)


def qkv(n=37, m=None, b=2, h=3, d=8, dtype=torch.float64):
    m = m or n
    return (
        torch.randn(b, h, n, d, dtype=dtype),
        torch.randn(b, h, m, d, dtype=dtype),
        torch.randn(b, h, m, d, dtype=dtype),
    )


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


GRAD_CELLS = [  # (n, m, causal, padded, query_chunk, key_chunk): chunks that divide nothing
    (11, 11, False, False, 4, 5),
    (11, 11, True, False, 4, 5),
    (11, 13, True, True, 4, 5),
    (13, 6, True, False, 5, 4),  # causal with n > m: the first 7 queries see no key
    (6, 13, False, True, 4, 3),
    (9, 9, True, True, 9, 2),
]


@pytest.mark.parametrize("n,m,causal,padded,query_chunk,key_chunk", GRAD_CELLS)
def test_chunked_blockwise_backward_passes_gradcheck(n, m, causal, padded, query_chunk, key_chunk):
    q, k, v = (t.requires_grad_() for t in qkv(n, m, b=2, h=2, d=4))
    mask = None
    if padded:
        mask = torch.ones(2, m, dtype=torch.bool)
        mask[0, m // 2 :] = False
        mask[1, :3] = False
    assert torch.autograd.gradcheck(
        lambda q, k, v: chunked_attention(q, k, v, mask, causal, query_chunk=query_chunk, key_chunk=key_chunk),
        (q, k, v),
    )


@pytest.mark.parametrize("query_chunk,key_chunk", [(5, 7), (16, 4), (64, 64)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("n,m", [(37, 37), (10, 37), (37, 10)])
def test_chunked_gradients_equal_the_exact_references(query_chunk, key_chunk, causal, padded, n, m):
    """dq, dk, dv of the blockwise backward against autograd through the materialised softmax."""
    q, k, v = qkv(n, m)
    mask = None
    if padded:
        mask = torch.rand(2, m) > 0.3
        mask[1] = False  # every key of the second sequence is padding: its rows see nothing
    grad_out = torch.randn_like(q)
    grads = []
    for attend in (
        lambda q, k, v: chunked_attention(q, k, v, mask, causal, query_chunk=query_chunk, key_chunk=key_chunk),
        lambda q, k, v: exact_attention(q, k, v, mask, causal),
    ):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        grads.append(torch.autograd.grad((attend(*inputs) * grad_out).sum(), inputs))
    for name, got, expected in zip("qkv", *grads):
        assert torch.allclose(got, expected, atol=1e-12), name


@pytest.mark.parametrize("use_checkpoint", [True, False])
def test_chunked_rows_that_see_no_key_give_zeros_and_zero_gradients(use_checkpoint):
    q, k, v = (t.requires_grad_() for t in qkv(n=12, m=5, b=2, h=2, d=4, dtype=torch.float32))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False  # the second sequence has no real key
    out = chunked_attention(
        q,
        k,
        v,
        mask,
        causal=True,
        query_chunk=4,
        key_chunk=2,  # rows 0..6 see no key
        use_checkpoint=use_checkpoint,
    )
    out.square().sum().backward()
    assert (out[:, :, :7] == 0).all() and (out[1] == 0).all()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert (q.grad[:, :, :7] == 0).all() and (q.grad[1] == 0).all()
    assert (k.grad[1] == 0).all() and (v.grad[1] == 0).all()


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_chunked_returns_gradients_in_the_inputs_dtype(dtype, atol):
    """Arithmetic is float32 whatever the inputs; gradients come back in the inputs' dtype."""
    q, k, v = qkv(n=40, m=33, b=1, h=2, d=16)
    grad_out = torch.randn_like(q)
    low = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = chunked_attention(*low, causal=True, query_chunk=16, key_chunk=8)
    (out * grad_out.to(dtype)).sum().backward()
    exact = [t.clone().requires_grad_() for t in (q, k, v)]
    (exact_attention(*exact, causal=True) * grad_out).sum().backward()
    assert out.dtype == dtype
    for got, expected in zip(low, exact):
        assert got.grad.dtype == dtype
        assert (got.grad.double() - expected.grad).abs().max() < atol * max(1.0, expected.grad.abs().max())


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("causal", [False, True])
def test_chunked_projection_gradients_equal_full(dtype, atol, causal):
    """The whole layer: gradients of every projection's weights and bias against ``full``."""
    torch.manual_seed(1)
    chunked = build_attention("chunked", 32, 4, query_chunk=7, key_chunk=5).to(dtype)
    full = build_attention("full", 32, 4).to(dtype)
    full.load_state_dict(chunked.state_dict())
    x, context = torch.randn(2, 19, 32, dtype=dtype), torch.randn(2, 23, 32, dtype=dtype)
    mask = torch.rand(2, 23) > 0.2
    for layer in (chunked, full):
        y, _ = layer(x, context=context, key_padding_mask=mask, causal=causal)
        y.square().sum().backward()
    for (name, p), q in zip(chunked.named_parameters(), full.parameters()):
        assert (p.grad - q.grad).abs().max() < atol * max(1.0, q.grad.abs().max()), name


def test_chunked_blockwise_backward_equals_autograd_through_the_blocks():
    """``checkpoint=True`` (hand-written backward) and ``checkpoint=False`` (autograd) agree."""
    q, k, v = qkv()
    mask = torch.rand(2, 37) > 0.3
    grads = []
    for use_checkpoint in (True, False):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = chunked_attention(*inputs, mask, causal=True, query_chunk=8, key_chunk=8, use_checkpoint=use_checkpoint)
        grads.append(torch.autograd.grad(out.square().sum(), inputs))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-12)


def dropout_reference(q, k, v, mask, causal, p, seed, query_chunk, key_chunk):
    """Exact attention with the [n, m] keep mask assembled from the chunked kernel's blocks."""
    b, h, n, d = q.shape
    m = k.shape[-2]
    blocks = Blocks(b, h, n, m, query_chunk, key_chunk, causal, None, p, seed, torch.float64, q.device)
    keep = torch.zeros(b * h, n, m, dtype=torch.float64)
    for q0, q1 in blocks.query_blocks():
        for k0, k1 in blocks.key_blocks():
            if blocks.sees(q1, k0):
                keep[:, q0:q1, k0:k1] = blocks.keep(q0, q1, k0, k1)
    scores = (q @ k.mT) / d**0.5
    visible = visible_keys(n, m, mask, causal, q.device)
    scores = scores.masked_fill(~visible, -torch.inf)
    return (scores.softmax(-1) * keep.view(b, h, n, m)) @ v


@pytest.mark.parametrize("use_checkpoint", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_chunked_dropout_backward_regenerates_the_forward_mask(use_checkpoint, causal):
    q, k, v = qkv(n=21, m=23, b=2, h=2, d=4)
    mask = torch.ones(2, 23, dtype=torch.bool)
    mask[0, 17:] = False
    grad_out = torch.randn_like(q)
    p, seed, chunks = 0.3, 1234, dict(query_chunk=8, key_chunk=6)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = chunked_attention(*inputs, mask, causal, p, **chunks, use_checkpoint=use_checkpoint, dropout_seed=seed)
    grads = torch.autograd.grad((out * grad_out).sum(), inputs)
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = dropout_reference(*ref_inputs, mask, causal, p, seed, **chunks)
    expected_grads = torch.autograd.grad((expected * grad_out).sum(), ref_inputs)
    assert torch.allclose(out, expected, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got, want, atol=1e-12)
    dropped = (out - chunked_attention(q, k, v, mask, causal, **chunks)).abs().amax(-1) > 0
    assert dropped.float().mean() > 0.5  # the masks really drop something


def test_chunked_dropout_draws_a_new_mask_each_call_and_follows_the_seed():
    layer = build_attention("chunked", 16, 2, dropout=0.5, query_chunk=4, key_chunk=4).double().train()
    x = torch.randn(1, 10, 16, dtype=torch.float64)
    torch.manual_seed(3)
    a, _ = layer(x)
    b, _ = layer(x)
    torch.manual_seed(3)
    c, _ = layer(x)
    assert not torch.equal(a, b) and torch.equal(a, c)
    layer.eval()
    assert torch.equal(layer(x)[0], layer(x)[0])  # eval: no dropout


def test_chunked_keeps_the_running_max_stable_for_huge_scores():
    q, k, v = (t.requires_grad_() for t in qkv(n=16))
    out = chunked_attention(q * 300, k * 300, v, query_chunk=4, key_chunk=4)  # exp() would overflow
    assert torch.isfinite(out).all()
    assert torch.allclose(out, exact_attention(q * 300, k * 300, v), atol=1e-10)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def chunked_training_peak(n, causal=False, padded=False, dropout=0.0, use_checkpoint=True, b=1, h=4, d=16, c=64):
    """(measured peak bytes of a forward+backward, the memory model's prediction)."""
    from bench.measure import peak_memory_bytes

    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
    mask = (torch.arange(n) < n - 50)[None].expand(b, n) if padded else None

    def step():
        out = chunked_attention(
            q, k, v, mask, causal, dropout, query_chunk=c, key_chunk=c, use_checkpoint=use_checkpoint
        )
        out.sum().backward()

    model = get_backend("chunked").memory_bytes(
        Shape(b, h, d, n, n, causal, 4, "cpu"), True, query_chunk=c, key_chunk=c, checkpoint=use_checkpoint
    )
    return peak_memory_bytes(step, "cpu"), model


@pytest.mark.parametrize("causal,padded,dropout", [(False, False, 0.0), (True, True, 0.0), (False, False, 0.2)])
@pytest.mark.parametrize("use_checkpoint", [True, False])
def test_chunked_memory_model_bounds_the_measured_training_peak(causal, padded, dropout, use_checkpoint):
    peak, model = chunked_training_peak(300, causal, padded, dropout, use_checkpoint)
    assert 0 < peak <= model


def test_chunked_training_memory_is_linear_in_the_length():
    """4x the tokens, about 4x the training peak (a stored [n, m] block would give 16x)."""
    short, _ = chunked_training_peak(256)
    long, _ = chunked_training_peak(1024)
    assert long < 5 * short


def test_chunked_rejects_empty_chunks():
    with pytest.raises(ValueError, match="positive"):
        build_attention("chunked", 32, 4, key_chunk=0)


# -- sdpa ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["efficient", "cudnn"])
def test_sdpa_kernels_torch_lacks_on_cpu_are_unsupported_not_math(kernel):
    reason = get_backend("sdpa").unsupported_reason(Setting("cpu", "float32"), kernel=kernel)
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
    skip_unless_available("flex", Setting("cpu", "float32", causal=causal, head_dim=32))
    attn = build_attention("flex", 64, 2, window=5).eval()  # head_dim 32: see docs/upstream.md
    x = torch.randn(2, 40, 64)
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
    assert xformers.unsupported_reason(Setting("cpu", "float16")) == "xformers does not run on cpu (runs on: cuda)"
    here = xformers.unavailable_reason(Setting("cpu", "float16"))  # what this machine's xformers says, in its words
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
    (sdpa: each kernel; xformers: each op), from the registry: a new backend joins by itself.
    Sparse masks are exact under their mask, not against full attention: tests/test_sparse.py."""
    cases = []
    for name in backend_names():
        backend = get_backend(name)
        capabilities = backend.capabilities
        if not capabilities.exact or capabilities.sparse_mask or "cuda" not in capabilities.devices:
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
    reason = get_backend(name).cannot_run(Setting("cuda", str(dtype)[6:], causal=causal, head_dim=64), **options)
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    attn = build_attention(name, 512, 8, **options).cuda().to(dtype)
    backward = options.get("op") not in FORWARD_ONLY  # xformers' decoding operators have no backward
    x = torch.randn(2, 1000, 512, device="cuda", dtype=dtype, requires_grad=backward)
    y, _ = attn(x, causal=causal)
    reference = build_attention("full", 512, 8).cuda()
    reference.load_state_dict({k: v.float() for k, v in attn.state_dict().items()})
    reference.reference_mode = True
    x32 = x.detach().float().requires_grad_(backward)
    y_ref, _ = reference(x32, causal=causal)
    assert (y.float() - y_ref).abs().max() < GPU_TOLERANCE[dtype]
    if backward:
        (gx,) = torch.autograd.grad(y.float().square().sum(), x)
        (gx_ref,) = torch.autograd.grad(y_ref.square().sum(), x32)
        assert (gx.float() - gx_ref).abs().max() / gx_ref.abs().max() < 5 * GPU_TOLERANCE[dtype]


def test_flex_block_masks_follow_the_padding_not_the_tensor():
    """Two different padding masks (even at a reused address) never share a cached block mask."""
    skip_unless_available("flex", Setting("cpu", "float32", key_padding_mask=True, head_dim=32))
    attn = build_attention("flex", 64, 2).eval()
    x = torch.randn(2, 40, 64)
    with torch.no_grad():
        for real in (30, 12, 30):
            mask = torch.arange(40)[None, :].expand(2, 40) < real  # a fresh tensor each time
            y, _ = attn(x, key_padding_mask=mask)
            short, _ = attn(x[:, :real])
            assert (y[:, :real] - short).abs().max() < 1e-5
