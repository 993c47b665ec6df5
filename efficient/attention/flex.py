"""``flex``: FlexAttention (torch.nn.attention.flex_attention), always compiled.

Masks are ``mask_mod`` functions (causal with bottom-right alignment, key padding, a sliding
``window``) turned into block masks that are built once per (mask, shape) and cached. The
recompile limit is raised so that a sweep over many lengths keeps compiling instead of
falling back to eager. The first call compiles: the speed bench records it as ``first_call_s``,
apart from the measured steps. On CPU, torch's FlexAttention has no backward and supports
float32, float16 and bfloat16.

On CPU the kernel is C++ that inductor generates for one vector ISA (``pick_vec_isa``: the
widest the CPU has, or the one ``ATEN_CPU_CAPABILITY`` names). Two upstream problems shape what
the suite does there (docs/upstream.md has their reproductions and mechanisms):

- with AVX2 (8 float lanes) and a head width of 8 or 16, the micro-GEMM of q k^T stores 8
  floats past its buffer, onto the running row maxima of query rows 0-7: those rows come out
  wrong or NaN, depending on what memory lies there. Such a cell is ``unsupported`` here, with
  that reason. With no vector ISA at all (``ATEN_CPU_CAPABILITY=default``) nothing compiles;
- inductor's cache of compiled graphs is not keyed by the ISA, so a kernel generated for AVX2
  would be reused in an AVX-512 process (wrong rows again): the ISA is pinned in inductor's
  config (``cpp.simdlen``), which the cache key includes.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Optional

import torch
from torch.nn.attention.flex_attention import _DEFAULT_SPARSE_BLOCK_SIZE, create_block_mask, flex_attention

from efficient.attention.base import Capabilities, ProjectedAttention, Setting, Shape, Unsupported, register
from efficient.attention.functional import exact_attention, repeat_kv
from efficient.bounds import Bound

RECOMPILE_LIMIT = 256
# (vector bits, head widths) whose compiled CPU kernel writes out of bounds (docs/upstream.md):
# head_dim % lanes == 0 and head_dim < 24 with 8 float lanes.
MISCOMPILED_HEAD_DIMS = {256: (8, 16)}
_compiled: dict[bool, Callable] = {}  # dynamic shapes or not -> the compiled kernel
_block_masks: dict[tuple, object] = {}


def inductor_cpu_isa():
    """The vector ISA inductor generates CPU kernels for (``ATEN_CPU_CAPABILITY`` respected)."""
    from torch._inductor import cpu_vec_isa

    return cpu_vec_isa.pick_vec_isa()


def cpu_isa_problem(head_dim: int) -> str | None:
    """Why compiled FlexAttention cannot be trusted on this CPU for heads of ``head_dim``, or None."""
    isa = inductor_cpu_isa()
    if not isa:
        return (
            "FlexAttention's compiled CPU kernel needs a vector ISA, and inductor has none here "
            "(ATEN_CPU_CAPABILITY=default, or a CPU without AVX2): it does not compile"
        )
    if head_dim in MISCOMPILED_HEAD_DIMS.get(isa.bit_width(), ()):
        return (
            f"FlexAttention's compiled CPU kernel writes out of bounds with inductor's {isa} code and "
            f"head_dim={head_dim} (torch {torch.__version__}; docs/upstream.md): query rows 0-7 of a "
            f"block come out wrong or NaN. Other head widths, or an AVX-512 CPU, are not affected"
        )
    return None


def pin_cpu_isa() -> None:
    """Put the ISA into inductor's config (and so into its cache key) without changing it."""
    from torch._inductor import config

    if config.cpp.simdlen is None and (isa := inductor_cpu_isa()):
        config.cpp.simdlen = isa.bit_width()
        if str(inductor_cpu_isa()) != str(isa):  # another ISA of that width would be picked
            config.cpp.simdlen = None


def compiled_flex_attention(dynamic: bool = False):
    """flex_attention compiled for fixed shapes, or (``dynamic``) for a key length that changes
    from call to call without a recompilation each time (a decode step against a growing cache)."""
    if dynamic not in _compiled:
        import torch._dynamo

        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), RECOMPILE_LIMIT))
        pin_cpu_isa()
        _compiled[dynamic] = torch.compile(flex_attention, dynamic=dynamic)
    return _compiled[dynamic]


def padding_key(key_padding_mask) -> tuple | None:
    """A key padding mask as a cache key, by content: a new batch with the same padding reuses
    the block mask built for it (b * m bytes read, a sync on GPU)."""
    if key_padding_mask is None:
        return None
    content = key_padding_mask.to(torch.bool).cpu().numpy().tobytes()
    return hashlib.sha1(content).hexdigest(), tuple(key_padding_mask.shape)


def block_mask_for(b, n, m, key_padding_mask, causal, window, device):
    """The cached BlockMask of this mask and shape, or None when every key is visible."""
    if not (causal or window or key_padding_mask is not None):
        return None
    key = (b, n, m, causal, window, padding_key(key_padding_mask), str(device))
    if key not in _block_masks:
        offset = m - n  # bottom-right alignment: query i stands at key position i + m - n

        def mask_mod(batch, head, q_idx, kv_idx):
            visible = kv_idx < m  # the grid is padded to whole tiles: no lookup past the end
            if causal:
                visible = visible & (kv_idx <= q_idx + offset)
            if window:
                visible = visible & ((q_idx + offset - kv_idx).abs() < window)
            if key_padding_mask is not None:
                visible = visible & key_padding_mask[batch, kv_idx.clamp(max=m - 1)]
            return visible

        batch = b if key_padding_mask is not None else None
        if len(_block_masks) > 64:
            _block_masks.clear()
        _block_masks[key] = create_block_mask(mask_mod, batch, None, n, m, device=device)
    return _block_masks[key]


def decode_block_mask(cache, device):
    """The BlockMask of one query over ``cache``'s buffer, keys below its length visible. The
    length is a tensor the mask reads when the kernel runs; the mask's block layout (which blocks
    are full, partial or empty) changes only when the length enters a new block."""
    state = cache.extras.setdefault("flex", {"length": torch.zeros((), dtype=torch.int64, device=device)})
    length = state["length"].fill_(cache.length)
    block = (cache.length - 1) // _DEFAULT_SPARSE_BLOCK_SIZE
    if state.get("block") != block:
        state["block"] = block
        state["mask"] = create_block_mask(
            lambda b, h, q_idx, kv_idx: kv_idx < length, None, None, 1, cache.capacity, device=device
        )
    return state["mask"]


@register
class FlexAttention(ProjectedAttention):
    name = "flex"
    capabilities = Capabilities(dtypes=("float32", "float16", "bfloat16"), backward_devices=("cuda",))
    option_bounds = {"window": Bound(1)}

    @classmethod
    def unavailable_reason(cls, setting: Setting, **options) -> Optional[str]:
        return cpu_isa_problem(setting.head_dim) if setting.device == "cpu" else None

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float = 0.0,
        n_kv_heads: Optional[int] = None,
        *,
        window: Optional[int] = None,
    ):
        super().__init__(d_model, n_heads, dropout, n_kv_heads)
        self.window = window

    def attend(self, q, k, v, key_padding_mask, causal):
        if self.dropout_p > 0:
            raise Unsupported("FlexAttention has no attention dropout; set model.dropout=0 to train with flex")
        b, _, n, _ = q.shape
        m = k.shape[-2]
        causal = causal and n > 1  # a single query at the keys' end sees every key
        mask = block_mask_for(b, n, m, key_padding_mask, causal, self.window, q.device)
        # One query, every key visible: a decode step against a cache that grows (transformers'),
        # run by a kernel compiled for any key length rather than one compilation per step.
        kernel = compiled_flex_attention(dynamic=n == 1 and mask is None)
        return kernel(q, k, v, block_mask=mask, enable_gqa=k.shape[1] != q.shape[1])

    def attend_cached(self, q, k, v, cache, key_padding_mask, causal):
        """A decode step (one query, no padding, no window) attends over the cache's whole buffer
        with the keys past its length masked: the shapes stay the same from step to step, so the
        kernel is compiled once, and the block mask is rebuilt only when the cache enters a new
        block. A prefill attends over the filled part, like any backend."""
        if q.shape[-2] != 1 or key_padding_mask is not None or self.window or self.dropout_p > 0:
            return super().attend_cached(q, k, v, cache, key_padding_mask, causal)
        cache.append(k, v)
        mask = decode_block_mask(cache, q.device)
        return compiled_flex_attention()(
            q, cache.keys, cache.values, block_mask=mask, enable_gqa=cache.keys.shape[1] != q.shape[1]
        )

    def reference_attend(self, q, k, v, key_padding_mask, causal):
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        return exact_attention(q, k, v, key_padding_mask, causal, query_block=256, window=self.window)

    @classmethod
    def memory_bytes(cls, shape: Shape, training: bool, **options) -> float:
        """GPU: a fused kernel (linear). CPU: torch's CPU path holds about half of one float32
        score matrix (measured 4.3 GiB forward at 16K, 8 heads); the model counts a whole one."""
        fused = super().memory_bytes(shape, training, **options)
        if shape.device == "cpu":
            return fused + shape.batch * shape.n_heads * shape.q_len * shape.k_len * 4
        return fused
