"""``sliding_window``: each query sees the keys within ``window`` positions of its own.

    query i sees key j  iff  |i - j| < window          (causal: i - window < j <= i)

so a causal query sees ``window`` keys, its own included: the convention of Mistral's
``sliding_window`` and of Hugging Face's sliding-window attention. attention-gym's
``sliding_window`` mask counts differently (|i - j| <= W, W + 1 keys causally); its W is this
``window`` minus one. The same mask as ``flex`` with its ``window`` option, computed here block
by block (``sparse.SparseAttention``) in O(n window) memory: scores [n, K block] with
K = 2 ceil((window - 1) / block) + 1 key blocks.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from efficient.attention.base import as_value, register
from efficient.attention.sparse import SparseAttention, SparseKernel
from efficient.bounds import Bound


def window_offsets(n_blocks: int, reach: int) -> list[int]:
    """-r .. r, r = min(reach, n_blocks - 1): the columns of ``window_blocks``."""
    reach = min(reach, n_blocks - 1)
    return list(range(-reach, reach + 1))


def window_blocks(n_blocks: int, reach: int, device) -> torch.Tensor:
    """[n_blocks, 2 r + 1], r = min(reach, n_blocks - 1): the blocks within ``reach`` of each
    block (-1 past either end)."""
    reach = min(reach, n_blocks - 1)
    rows = torch.arange(n_blocks, device=device)[:, None] + torch.arange(-reach, reach + 1, device=device)
    return rows.masked_fill((rows < 0) | (rows >= n_blocks), -1)


@register
class SlidingWindowAttention(SparseAttention):
    name = "sliding_window"
    option_bounds = {"window": Bound(1), "block": Bound(1)}

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float = 0.0,
        n_kv_heads: Optional[int] = None,
        *,
        window: int = 512,
        block: int = 64,
        kernel: SparseKernel = SparseKernel.auto,
    ):
        super().__init__(d_model, n_heads, dropout, n_kv_heads)
        self.kernel = as_value(kernel)
        self.window, self.block = window, block

    def key_blocks(self, n_blocks: int, device) -> torch.Tensor:
        return window_blocks(n_blocks, math.ceil((self.window - 1) / self.block), device)

    def band_offsets(self, n_blocks: int) -> list[int]:
        return window_offsets(n_blocks, math.ceil((self.window - 1) / self.block))

    def visible(self, query_positions, key_positions, length):
        return (query_positions - key_positions).abs() < self.window

    @classmethod
    def pattern(cls, length: int, window: int = 512, block: int = 64, **options):
        reach = min(math.ceil((window - 1) / block), math.ceil(length / block) - 1)
        return block, 2 * reach + 1, 0, 0
