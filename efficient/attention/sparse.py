"""Softmax attention under a sparse mask, block by block: the shared machinery of ``local``,
``sliding_window``, ``longformer`` and ``bigbird``.

A backend says which keys each query sees in two ways that must agree:

- ``key_blocks(n_blocks)``: for each block of ``block`` query positions, the key blocks that
  hold every key any of its queries may see, [n_blocks, K] (-1 pads a short row; no block twice);
- ``visible(query_positions, key_positions, length)``: the exact mask inside those blocks.

Global queries (``global_queries(length)``: positions that see every key) are computed as dense
rows, few of them. Every other query attends over its K key blocks: the band ones
(``band_offsets``: block r + offset) read as slices of the keys, the others (global, random)
gathered, so memory is O(n K block) (scores [n, K block]), never [n, n]. ``exact`` here means "softmax attention under
the backend's mask": ``reference_attend`` computes that with the whole [n, n] mask (query rows in
blocks), the harness's float64 reference.

Self-attention only (queries and keys share positions); with a KV cache (decoding) the new
queries stand at the last positions of the cache, and only their blocks are computed.
"""

from __future__ import annotations

import math

import torch
from einops import einsum, rearrange

from efficient.attention.base import Capabilities, ProjectedAttention, Shape
from efficient.attention.functional import repeat_kv


class SparseAttention(ProjectedAttention):
    """Base of the mask-sparse backends: subclasses set ``block`` and define the mask."""

    capabilities = Capabilities(cross_attention=False, sparse_mask=True)
    block: int
    unmasked_reference = False  # True: reference_attend is full attention (the error a user accepts)

    # -- the mask ------------------------------------------------------------------------------
    def key_blocks(self, n_blocks: int, device) -> torch.Tensor:  # pragma: no cover - abstract
        """[n_blocks, K] long: the key blocks each query block needs (-1: none)."""
        raise NotImplementedError

    def visible(self, query_positions: torch.Tensor, key_positions: torch.Tensor, length: int) -> torch.Tensor:
        """Bool, broadcast of the two position tensors: True where the query may see the key, in a
        sequence of ``length`` positions."""
        raise NotImplementedError  # pragma: no cover - abstract

    def global_queries(self, length: int) -> list[int]:
        """Positions whose queries see every key (computed as dense rows)."""
        return []

    def band_offsets(self, n_blocks: int) -> list[int]:
        """The first columns of ``key_blocks``: column j is block r + offsets[j] of row r (or -1),
        which the blockwise computation reads as slices instead of gathered copies."""
        return []

    # -- attention -----------------------------------------------------------------------------
    def attend(self, q, k, v, key_padding_mask, causal):
        # q [b, h, n, d], k and v [b, hk, m, d] with m >= n: query i stands at position i + m - n.
        n, m = q.shape[-2], k.shape[-2]
        out = blockwise_attention(self, q, k, v, key_padding_mask, causal, self.dropout_p)
        globals_here = [p for p in self.global_queries(m) if p >= m - n]
        if globals_here:  # their rows see every key: computed densely, few of them
            rows = torch.tensor(globals_here, device=q.device)
            dense = masked_attention(self, q[..., rows - (m - n), :], k, v, rows, key_padding_mask, causal, self.dropout_p)
            out = out.index_copy(-2, rows - (m - n), dense.to(out.dtype))
        return out

    def reference_attend(self, q, k, v, key_padding_mask, causal):
        """Softmax attention under the whole [n, m] mask, 256 query rows at a time (with
        ``unmasked_reference``: without the sparse mask, full attention)."""
        if self.unmasked_reference:
            return super().reference_attend(q, k, v, key_padding_mask, causal)
        n, m = q.shape[-2], k.shape[-2]
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        positions = torch.arange(m - n, m, device=q.device)
        rows = [masked_attention(self, q[..., start : start + 256, :], k, v, positions[start : start + 256],
                                 key_padding_mask, causal, 0.0) for start in range(0, n, 256)]
        return torch.cat(rows, dim=-2)

    # -- cost models ---------------------------------------------------------------------------
    @classmethod
    def pattern(cls, length: int, **options) -> tuple[int, int, int, int]:  # pragma: no cover - abstract
        """(block, band columns, other columns, global query rows) of a ``length``-token input:
        key blocks per query block read as slices, and gathered."""
        raise NotImplementedError

    @classmethod
    def flops(cls, shape: Shape, **options) -> float:
        """4 B H d per (query, scored key): every query row of the padded blocks over its K
        blocks (masked entries are scored too), and the global rows over every key. Causal
        halves it (FlashAttention's convention)."""
        block, band, other, global_rows = cls.pattern(shape.k_len, **options)
        key_blocks = band + other
        rows = math.ceil(shape.q_len / block) * block
        per_key = 4.0 * shape.batch * shape.n_heads * shape.head_dim
        f = per_key * (rows * key_blocks * block + global_rows * shape.k_len)
        return f / 2 if shape.causal else f

    @classmethod
    def memory_bytes(cls, shape: Shape, training: bool, **options) -> float:
        """Scores and probabilities [n, K block] in float32 (as ``materialised_memory_bytes``),
        the gathered (non-band) keys and values [n / block, other block, d], the global rows, the
        output."""
        block, band, other, global_rows = cls.pattern(shape.k_len, **options)
        rows = math.ceil(shape.q_len / block) * block
        scores = shape.batch * shape.n_heads * (rows * (band + other) * block + global_rows * shape.k_len) * 4
        gathered = 2 * shape.batch * shape.kv_heads * rows * other * shape.head_dim * max(shape.bytes_per_element, 4)
        return scores * (5 if training else 3) + gathered * (2 if training else 1) + super().memory_bytes(shape, training)


def masked_attention(attention: SparseAttention, q, k, v, positions, key_padding_mask, causal, dropout_p):
    """q [b, h, r, d] of the queries at ``positions`` [r] over every key, k and v [b, hk, m, d],
    under the backend's mask, with [r, m] scores -> [b, h, r, d]."""
    m = k.shape[-2]
    keys = torch.arange(m, device=q.device)
    visible = attention.visible(positions[:, None], keys[None, :], m)  # [r, m]
    if causal:
        visible = visible & (keys[None, :] <= positions[:, None])
    visible = visible[None, None]  # [1, 1, r, m]
    if key_padding_mask is not None:
        visible = visible & key_padding_mask.to(torch.bool)[:, None, None, :]
    return softmax_attend(q, k, v, visible[:, :, None], dropout_p)  # [b or 1, 1, 1, r, m]


def softmax_attend(q, k, v, visible, dropout_p: float):
    """softmax(q k^T / sqrt(d)) v where ``visible``, rows that see nothing give 0; grouped heads
    share their keys. q [b, h, ..., r, d], k, v [b, hk, ..., m, d], visible broadcastable to the
    scores [b, hk, g, ..., r, m]."""
    compute = torch.promote_types(q.dtype, torch.float32)
    grouped = rearrange(q, "b (hk g) ... d -> b hk g ... d", hk=k.shape[1])
    scores = einsum(grouped.to(compute), k.to(compute), "b hk g ... r d, b hk ... m d -> b hk g ... r m")
    scores = scores * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~visible, torch.finfo(compute).min)
    probs = scores.softmax(dim=-1) * visible.any(dim=-1, keepdim=True)
    if dropout_p > 0:
        probs = torch.nn.functional.dropout(probs, dropout_p)
    out = einsum(probs.to(v.dtype), v, "b hk g ... r m, b hk ... m d -> b hk g ... r d")
    return rearrange(out, "b hk g ... d -> b (hk g) ... d")


def blockwise_attention(attention: SparseAttention, q, k, v, key_padding_mask, causal, dropout_p):
    """Every query over the key blocks of its block (``key_blocks``) under ``visible``:
    scores [b, h, blocks, block, K block]. q [b, h, n, d], k, v [b, hk, m, d] -> [b, h, n, d].

    The band columns (``band_offsets``: block r + offset) are slices of the key blocks, views
    that cost no memory; only the other columns (global, random) are gathered copies."""
    n, m, size = q.shape[-2], k.shape[-2], attention.block
    n_blocks = math.ceil(m / size)
    first = (m - n) // size  # the first block that holds a query
    pad_end = n_blocks * size - m
    q = torch.nn.functional.pad(q, (0, 0, m - n - first * size, pad_end))  # positions first * size ..
    k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad_end)) for t in (k, v))
    layout = attention.key_blocks(n_blocks, q.device)[first:]  # [c, K]
    c, offsets = layout.shape[0], attention.band_offsets(n_blocks)
    present = layout >= 0

    compute = torch.promote_types(q.dtype, torch.float32)
    q = rearrange(q, "b (hk g) (c t) d -> b hk g c t d", hk=k.shape[1], t=size).to(compute) * q.shape[-1] ** -0.5
    k, v = (rearrange(t, "b hk (c t) d -> b hk c t d", t=size) for t in (k, v))  # [b, hk, blocks, t, d]
    reach = max((abs(o) for o in offsets), default=0)
    banded_k, banded_v = (torch.nn.functional.pad(t, (0, 0, 0, 0, reach, reach)) for t in (k, v))
    columns_k = [banded_k[:, :, first + o + reach : first + o + reach + c] for o in offsets]  # views [b, hk, c, t, d]
    columns_v = [banded_v[:, :, first + o + reach : first + o + reach + c] for o in offsets]
    gathered = layout[:, len(offsets):].clamp(min=0)  # [c, E]
    if gathered.shape[1]:
        columns_k.append(rearrange(k[:, :, gathered], "b hk c e t d -> b hk c (e t) d"))
        columns_v.append(rearrange(v[:, :, gathered], "b hk c e t d -> b hk c (e t) d"))
    scores = torch.cat([einsum(q, key.to(compute), "b hk g c t d, b hk c s d -> b hk g c t s") for key in columns_k],
                       dim=-1)  # [b, hk, g, c, t, K t]

    offsets_in_block = torch.arange(size, device=q.device)
    query_positions = (first + torch.arange(c, device=q.device))[:, None] * size + offsets_in_block  # [c, t]
    key_positions = rearrange(layout.clamp(min=0)[..., None] * size + offsets_in_block, "c K t -> c (K t)")
    key_present = rearrange(present[..., None].expand(-1, -1, size), "c K t -> c (K t)") & (key_positions < m)
    visible = attention.visible(query_positions[..., None], key_positions[:, None, :], m) & key_present[:, None, :]
    if causal:
        visible = visible & (key_positions[:, None, :] <= query_positions[..., None])  # [c, t, K t]
    visible = visible[None, None, None]  # [1, 1, 1, c, t, K t]
    if key_padding_mask is not None:
        real = torch.nn.functional.pad(key_padding_mask.to(torch.bool), (0, pad_end))[:, key_positions]  # [b, c, K t]
        visible = visible & real[:, None, None, :, None, :]
    probs = scores.masked_fill(~visible, torch.finfo(compute).min).softmax(dim=-1)
    if dropout_p > 0:
        probs = torch.nn.functional.dropout(probs, dropout_p)
    probs = probs.to(v.dtype)
    widths = [value.shape[-2] for value in columns_v]
    out = sum(einsum(p, value, "b hk g c t s, b hk c s d -> b hk g c t d")
              for p, value in zip(probs.split(widths, dim=-1), columns_v))
    out = out * visible.any(dim=-1, keepdim=True)  # a query that sees no key outputs 0
    out = rearrange(out, "b hk g c t d -> b (hk g) (c t) d")
    start = m - n - first * size
    return out[..., start : start + n, :]

