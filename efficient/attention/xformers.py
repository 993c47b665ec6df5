"""``xformers``: ``xformers.ops.memory_efficient_attention`` with an explicit operator.

``op=auto|cutlass|flash|flash3`` picks the forward/backward operator pair (auto: xformers'
dispatcher chooses); ``op=decoder|splitk`` picks one of xformers' forward-only decoding
operators (split-K over the keys, FlashDecoding's idea), for inference (``bench=decode``).
Grouped-query attention uses xformers' grouped layout [b, n, G, H, d] with keys shared by
stride 0. The [b, n, h, d] layout xformers wants is the projections' own layout,
so no copy is made. Causal masks and right padding go through xformers' attention-bias
classes (``LowerTriangularFromBottomRightMask``, ``BlockDiagonalMask`` over packed keys).
On a CPU the cell is ``unsupported`` (xformers has no CPU operators). When xformers is missing,
its C++/CUDA operators did not load or refuse the cell, it is unavailable on this machine
(``Unavailable``), in xformers' own words: another machine or build may run it.
"""

from __future__ import annotations

import enum
import functools

import torch
from einops import rearrange

from efficient.attention.base import Capabilities, ProjectedAttention, Setting, Unsupported, as_value, register
from efficient.attention.functional import repeat_kv


class Op(enum.Enum):
    auto = "auto"
    cutlass = "cutlass"
    flash = "flash"
    flash3 = "flash3"
    decoder = "decoder"
    splitk = "splitk"


FORWARD_ONLY = ("decoder", "splitk")  # decoding operators: no backward


def operator(op: str):
    """xformers' (forward, backward) operator pair for ``op`` (a forward operator alone for the
    decoding ones), None for its dispatcher."""
    from xformers.ops import fmha

    return {
        "auto": None,
        "cutlass": fmha.MemoryEfficientAttentionCutlassOp,
        "flash": fmha.MemoryEfficientAttentionFlashAttentionOp,
        "flash3": (fmha.flash3.FwOp, fmha.flash3.BwOp),
        "decoder": fmha.decoder.FwOp,
        "splitk": fmha.triton_splitk.FwOp,
    }[op]


def attention_function(op: str):
    import xformers.ops as xops

    return xops.memory_efficient_attention_forward if op in FORWARD_ONLY else xops.memory_efficient_attention


def xformers_reason(error: Exception) -> str:
    """xformers' 'No operator found ... is not supported because: ...' in one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first = next((i for i, line in enumerate(lines) if "not supported because" in line), 0)
    return "xformers: " + " ".join(lines[first:])  # skip the echo of the inputs


@functools.lru_cache(maxsize=None)
def xformers_problem(device: str, dtype: str, op: str) -> str | None:
    """Why xformers cannot run attention here (in its own words), or None if it can."""
    try:
        import xformers.ops  # noqa: F401
    except Exception as e:  # not installed, or broken against this torch
        return f"xformers is not available: {type(e).__name__}: {e}"
    tiny = torch.zeros(1, 8, 1, 64, device=device, dtype=getattr(torch, dtype))  # [b, n, h, d]
    try:
        attention_function(op)(tiny, tiny, tiny, op=operator(op))
    except (NotImplementedError, RuntimeError) as e:
        return xformers_reason(e)
    return None


@register
class XFormersAttention(ProjectedAttention):
    name = "xformers"
    capabilities = Capabilities(
        devices=("cuda",), backward_devices=("cuda",), dtypes=("float32", "float16", "bfloat16")
    )

    def __init__(
        self, d_model: int, n_heads: int, dropout: float = 0.0, n_kv_heads: int | None = None, *, op: Op = Op.auto
    ):
        super().__init__(d_model, n_heads, dropout, n_kv_heads)
        self.op = as_value(op)

    @classmethod
    def unavailable_reason(cls, setting: Setting, op: Op | str = Op.auto, **options) -> str | None:
        """xformers' own words, when the installed build cannot run the cell on this machine."""
        return xformers_problem(setting.device, setting.dtype, as_value(op))

    def attend(self, q, k, v, key_padding_mask, causal):
        from xformers.ops.fmha import attn_bias

        if self.op in FORWARD_ONLY and torch.is_grad_enabled() and q.requires_grad:
            raise Unsupported(
                f"xformers op={self.op} is a forward-only decoding operator: run it under torch.no_grad()"
            )

        b, h, n, _ = q.shape
        m = k.shape[-2]
        # [b, h, n, d] views of the projections are [b, n, h, d] in memory: no copy.
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        groups = h // k.shape[2]
        if groups > 1 and key_padding_mask is None:
            # xformers' grouped layout [b, n, G, H, d]: a group's keys are shared with stride 0.
            q = rearrange(q, "b n (hk g) d -> b n hk g d", g=groups)
            k, v = (t[:, :, :, None].expand(-1, -1, -1, groups, -1) for t in (k, v))
        elif groups > 1:  # packed keys of different lengths: copied out per query head
            k, v = (rearrange(repeat_kv(t.transpose(1, 2), h), "b h m d -> b m h d") for t in (k, v))
        bias = None
        if key_padding_mask is not None:
            lengths = right_padding_lengths(key_padding_mask)
            if causal and n != m:
                raise Unsupported("xformers backend: causal cross-attention with padding is not supported")
            mask_cls = attn_bias.BlockDiagonalCausalMask if causal else attn_bias.BlockDiagonalMask
            bias = mask_cls.from_seqlens([n] * b, lengths, device=q.device)
            real = key_padding_mask.bool()
            q = rearrange(q, "b n h d -> 1 (b n) h d")
            k, v = k[real].unsqueeze(0), v[real].unsqueeze(0)  # [1, sum(lengths), h, d]
        elif causal and n > 1:  # (one query, a decode step, sees every key: no bias)
            bias = attn_bias.LowerTriangularMask() if n == m else attn_bias.LowerTriangularFromBottomRightMask()
        try:
            out = attention_function(self.op)(q, k, v, attn_bias=bias, p=self.dropout_p, op=operator(self.op))
        except NotImplementedError as e:
            raise Unsupported(xformers_reason(e)) from None
        if key_padding_mask is not None:  # queries were packed into one sequence
            return rearrange(out, "1 (b n) h d -> b h n d", b=b)
        if out.dim() == 5:  # the grouped layout
            return rearrange(out, "b n hk g d -> b (hk g) n d")
        return out.transpose(1, 2)  # [b, h, n, d]


def right_padding_lengths(key_padding_mask: torch.Tensor) -> list[int]:
    """Real-token counts of a [b, m] mask whose real tokens come first (right padding)."""
    lengths = key_padding_mask.sum(dim=1)
    positions = torch.arange(key_padding_mask.shape[1], device=key_padding_mask.device)
    if not torch.equal(key_padding_mask.bool(), positions[None, :] < lengths[:, None]):
        raise Unsupported("xformers backend needs right padding (real tokens first, then padding)")
    return lengths.tolist()
