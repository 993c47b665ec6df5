"""``sdpa``: torch's ``scaled_dot_product_attention`` with one kernel pinned per run.

``kernel=flash|efficient|cudnn|math`` allows exactly that kernel: a cell it cannot run is
``unsupported`` with torch's own reasons, never a silent fallback to another kernel.
``kernel=auto`` lets torch choose; the harness records which kernel ran (``attention_ops``).
Causal with q_len != k_len uses ``causal_lower_right``: the suite's bottom-right alignment.
"""

from __future__ import annotations

import enum
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from efficient.attention.base import (
    ProjectedAttention,
    Setting,
    Unsupported,
    as_value,
    materialised_memory_bytes,
    register,
)
from efficient.attention.functional import visible_keys


class Kernel(enum.Enum):
    auto = "auto"
    flash = "flash"
    efficient = "efficient"
    cudnn = "cudnn"
    math = "math"


BACKENDS = {
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "math": [SDPBackend.MATH],
    "auto": [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
}
CPU_KERNELS = ("auto", "flash", "math")  # torch has no efficient or cuDNN kernel on CPU
HALF = ("float16", "bfloat16")


@register
class SDPAttention(ProjectedAttention):
    name = "sdpa"

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float = 0.0,
        n_kv_heads: int | None = None,
        *,
        kernel: Kernel = Kernel.auto,
    ):
        super().__init__(d_model, n_heads, dropout, n_kv_heads)
        self.kernel = as_value(kernel)

    @classmethod
    def unsupported_reason(cls, setting: Setting, kernel: Kernel | str = Kernel.auto, **options) -> str | None:
        kernel = as_value(kernel)
        if setting.device == "cpu" and kernel not in CPU_KERNELS:
            return f"torch SDPA has no {kernel} kernel on CPU (CPU kernels: {', '.join(CPU_KERNELS[1:])})"
        if setting.device == "cuda" and kernel in ("flash", "cudnn") and setting.dtype not in HALF:
            return f"the {kernel} SDPA kernel needs float16 or bfloat16 on CUDA, not {setting.dtype}"
        return super().unsupported_reason(setting)

    def attend(self, q, k, v, key_padding_mask, causal):
        n, m = q.shape[-2], k.shape[-2]
        mask, is_causal = None, False
        if key_padding_mask is not None or (causal and n > m):
            # An explicit mask: padding, or queries that see no key (lower-right bias gives NaN there).
            mask = visible_keys(n, m, key_padding_mask, causal, q.device)  # [b or 1, 1, n or 1, m]
        elif causal and n == m:
            is_causal = True
        elif causal and n > 1:  # one query (a decode step) sees every key: no mask
            mask = causal_lower_right(n, m)
        with warnings.catch_warnings(record=True) as caught, sdpa_kernel(BACKENDS[self.kernel]):
            warnings.simplefilter("always")
            try:
                return F.scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    attn_mask=mask,
                    dropout_p=self.dropout_p,
                    is_causal=is_causal,
                    enable_gqa=k.shape[1] != q.shape[1],  # grouped-query attention, natively
                )
            except RuntimeError as e:
                if "No available kernel" not in str(e) and "No viable backend" not in str(e):
                    raise
                why = "; ".join(str(w.message).strip() for w in caught) or str(e).splitlines()[0]
                raise Unsupported(f"sdpa kernel={self.kernel} cannot run this cell: {why}") from None

    @classmethod
    def memory_bytes(cls, shape, training, kernel: Kernel | str = Kernel.auto, **options) -> float:
        if as_value(kernel) == "math":  # materialises the scores like `full`
            return materialised_memory_bytes(shape, training)
        if shape.device == "cpu":  # the CPU flash kernel's blocks, per thread: scores, probabilities
            # and their gradient, [256 queries, 512 keys] in float32 each (torch's FlashAttentionKernel.cpp)
            return super().memory_bytes(shape, training) + torch.get_num_threads() * 3 * 256 * 512 * 4
        return super().memory_bytes(shape, training)
