"""``local``: block-local attention, the "Local Attention" row of Long Range Arena.

The sequence is cut into blocks of ``block`` positions; a query sees the keys of its own block:

    query i sees key j  iff  i // block == j // block          (causal: and j <= i)

O(n block) time and memory (``sparse.SparseAttention`` with one key block per query block).

Against LRA's code (``lra_benchmarks/models/local/local_attention.py``, ``block_size`` 50 in its
``get_modules``): LRA reshapes [L, heads, d] to [block_size, L / block_size, heads, d] and attends
along the first axis, which groups positions p, p + L / block_size, p + 2 L / block_size, ...: a
strided pattern, not contiguous blocks (read in its code, not run here: it needs the retired
``flax.nn``). It also always pads a whole extra block when block_size divides L, and reshapes
its padding mask into contiguous blocks, which then does not match its strided groups. This
backend is the contiguous block-local attention that LRA's paper describes.
"""

from __future__ import annotations

from typing import Optional

import torch

from efficient.attention.base import as_value, register
from efficient.attention.sparse import SparseAttention, SparseKernel
from efficient.bounds import Bound


@register
class LocalAttention(SparseAttention):
    name = "local"
    option_bounds = {"block": Bound(1)}

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float = 0.0,
        n_kv_heads: Optional[int] = None,
        *,
        block: int = 50,
        kernel: SparseKernel = SparseKernel.auto,
    ):
        super().__init__(d_model, n_heads, dropout, n_kv_heads)
        self.kernel = as_value(kernel)
        self.block = block

    def key_blocks(self, n_blocks: int, device) -> torch.Tensor:
        return torch.arange(n_blocks, device=device)[:, None]  # its own block

    def band_offsets(self, n_blocks: int) -> list[int]:
        return [0]

    def visible(self, query_positions, key_positions, length):
        return query_positions // self.block == key_positions // self.block

    @classmethod
    def pattern(cls, length: int, block: int = 50, **options):
        return block, 1, 0, 0
