"""``bigbird``: BigBird's block-sparse attention (Zaheer et al. 2020), ITC: blocks of ``block``
positions; block r of queries sees

    key blocks r - 1, r, r + 1 (the window), the first and the last block (global), and
    ``random_blocks`` blocks drawn at random from the others,

while the queries of the first and the last block see every key. Exact under that mask, block by
block (``sparse.SparseAttention``) in O(n block (5 + random_blocks)) memory; the global rows are
computed densely. The random blocks are drawn once per layer and length from ``seed + layer``,
the same in training and evaluation.

Against Hugging Face's ``BigBirdBlockSparseAttention`` (transformers 5.25, compared in float64:
equal to 3e-16 given the same random blocks; docs/fidelity.md): the same window, global and
random structure, block 64 and 3 random blocks by default. Its differences:

- Random blocks per head (one draw per head); here one layout serves every head of a layer.
- It reseeds numpy's global generator with the layer index at every training forward, and for
  n > (5 + 2 r) blocks draws only from blocks 1 .. 2 r + 3 (its "plan"); here the draw is
  uniform over every block outside the window and the globals, from ``seed + layer``.
- In evaluation it points every random slot at block 0, which every row already sees: block 0's
  keys then enter the softmax r + 1 times, so its eval output is not softmax under a mask and
  differs from its training mask. Here the mask is the same in training and evaluation.
- It switches to full attention when n <= (5 + 2 r) blocks and needs n divisible by the block;
  here any length runs, the last block partial. Its padded query rows output 0.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from efficient.attention.base import as_value, register
from efficient.attention.sliding_window import window_blocks, window_offsets
from efficient.attention.sparse import SparseAttention, SparseKernel
from efficient.bounds import Bound

VISIBILITY_KEPT = 4  # block visibility masks kept per layer (the latest lengths)


@register
class BigBirdAttention(SparseAttention):
    name = "bigbird"
    option_bounds = {"block": Bound(1), "random_blocks": Bound(0)}
    global_decoding = True  # the last block is global, and a decode step's query stands in it

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float = 0.0,
        n_kv_heads: Optional[int] = None,
        *,
        block: int = 64,
        random_blocks: int = 3,
        seed: int = 0,
        kernel: SparseKernel = SparseKernel.auto,
    ):
        super().__init__(d_model, n_heads, dropout, n_kv_heads)
        self.kernel = as_value(kernel)
        self.block, self.random_blocks, self.seed = block, random_blocks, seed
        self.layouts: dict[int, torch.Tensor] = {}  # n_blocks -> [n_blocks, 5 + random_blocks]

    @classmethod
    def layer_factory(
        cls, d_model: int, n_heads: int, dropout: float = 0.0, n_kv_heads: Optional[int] = None, **options
    ):
        """Layers of one model, each with its own random blocks (layer i: seed + i)."""
        seed = options.pop("seed", 0)
        return lambda layer: cls(d_model, n_heads, dropout, n_kv_heads, seed=seed + layer, **options)

    def layout(self, n_blocks: int) -> torch.Tensor:
        """[n_blocks, 5 + random_blocks] key blocks per query block: the window r - 1, r, r + 1,
        then the global blocks 0 and n_blocks - 1 where the window does not hold them, then the
        random ones (-1: none; no block twice). The global rows (first, last) are listed too but
        computed densely."""
        if n_blocks not in self.layouts:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + n_blocks)
            window = window_blocks(n_blocks, 1, "cpu")  # [c, 3 or fewer]
            width = window.shape[1] + 2 + self.random_blocks
            rows = []
            for r in range(n_blocks):
                row = window[r].tolist()
                row += [g if g not in row else -1 for g in sorted({0, n_blocks - 1})]
                others = torch.tensor([b for b in range(n_blocks) if b not in row], dtype=torch.long)
                row += (
                    others[torch.randperm(len(others), generator=generator)[: self.random_blocks]]
                    .sort()
                    .values.tolist()
                )
                rows.append(row + [-1] * (width - len(row)))
            self.layouts[n_blocks] = torch.tensor(rows, dtype=torch.long)
        return self.layouts[n_blocks]

    def band_offsets(self, n_blocks: int) -> list[int]:
        return window_offsets(n_blocks, 1)

    def key_blocks(self, n_blocks: int, device) -> torch.Tensor:
        return self.layout(n_blocks).to(device)

    def block_visibility(self, n_blocks: int, device) -> torch.Tensor:
        """[n_blocks, n_blocks] bool: which key blocks each query block sees, kept for the latest
        few lengths only (decoding adds a block every ``block`` tokens: one mask per length would
        grow with the square of the blocks)."""
        key = (n_blocks, str(device))
        cache = self.__dict__.setdefault("_visibility", {})
        if key not in cache:
            if len(cache) >= VISIBILITY_KEPT:
                cache.pop(next(iter(cache)))  # the oldest length
            layout = self.layout(n_blocks).to(device)
            seen = torch.zeros(n_blocks, n_blocks + 1, dtype=torch.bool, device=device)
            seen.scatter_(1, layout.where(layout >= 0, n_blocks), True)  # column n_blocks takes the -1s
            seen = seen[:, :n_blocks].clone()
            seen[[0, -1]] = True  # the global query blocks see every key
            cache[key] = seen
        return cache[key]

    def mask_function(self, length: int, device):
        seen, block = self.block_visibility(math.ceil(length / self.block), device), self.block
        return lambda query_positions, key_positions: seen[query_positions // block, key_positions // block]

    def visible(self, query_positions, key_positions, length):
        return self.mask_function(length, query_positions.device)(query_positions, key_positions)

    def global_queries(self, length: int) -> list[int]:
        n_blocks = math.ceil(length / self.block)
        first = set(range(min(self.block, length)))
        return sorted(first | set(range((n_blocks - 1) * self.block, length)))

    @classmethod
    def pattern(cls, length: int, block: int = 64, random_blocks: int = 3, **options):
        n_blocks = math.ceil(length / block)
        global_rows = min(length, block) + max(0, min(block, length - block))
        return block, 2 * min(1, n_blocks - 1) + 1, 2 + random_blocks, global_rows
