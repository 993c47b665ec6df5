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

``kernel``: ``blockwise`` is the computation above, on any device; ``flex`` runs the same mask
through FlexAttention (compiled; ``mask_function`` as its ``mask_mod``), whose block mask skips the
tiles no query of a tile sees. Its tiles are 64 x 64 unless the backend's block is a multiple of
128: 128-tiles would cover a 64-block pattern (BigBird's) two blocks at a time and compute up to
4x the tiles it needs. ``auto`` (the default) takes ``flex`` on CUDA, ``blockwise`` elsewhere
(FlexAttention has no backward on CPU), and ``blockwise`` when attention dropout is on
(FlexAttention has none) or for a decode step.
"""

from __future__ import annotations

import enum
import math

import torch
from einops import einsum, rearrange

from efficient.attention import flex
from efficient.attention.base import Capabilities, ProjectedAttention, Setting, Shape, Unsupported, as_value
from efficient.attention.functional import repeat_kv


class SparseKernel(enum.Enum):
    auto = "auto"  # flex on CUDA (without attention dropout), blockwise elsewhere
    blockwise = "blockwise"  # sparse.blockwise_attention, any device
    flex = "flex"  # FlexAttention with the backend's block mask


def resolved_kernel(kernel, device: str) -> str:
    kernel = as_value(kernel)
    return ("flex" if device == "cuda" else "blockwise") if kernel == "auto" else kernel


class SparseAttention(ProjectedAttention):
    """Base of the mask-sparse backends: subclasses set ``block`` and ``kernel`` (their option
    ``kernel: SparseKernel = SparseKernel.auto``) and define the mask."""

    capabilities = Capabilities(cross_attention=False, sparse_mask=True)
    block: int
    kernel: str = "auto"
    unmasked_reference = False  # True: reference_attend is full attention (the error a user accepts)
    global_decoding = False  # True: the newest token is a global query (it sees every key)

    @classmethod
    def unavailable_reason(cls, setting: Setting, kernel: SparseKernel | str = SparseKernel.auto, **options):
        if resolved_kernel(kernel, setting.device) == "flex" and setting.device == "cpu":
            return flex.cpu_isa_problem(setting.head_dim)
        return None

    @classmethod
    def trains_on(cls, device: str, kernel: SparseKernel | str = SparseKernel.auto, **options) -> bool:
        return resolved_kernel(kernel, device) == "blockwise" or device == "cuda"  # flex: no backward on CPU

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

    def mask_function(self, length: int, device):
        """``visible`` as a function of (query positions, key positions) alone, every tensor it
        reads made beforehand: FlexAttention's ``mask_mod`` (compiled) calls it."""
        return lambda query_positions, key_positions: self.visible(query_positions, key_positions, length)

    def band_offsets(self, n_blocks: int) -> list[int]:
        """The first columns of ``key_blocks``: column j is block r + offsets[j] of row r (or -1),
        which the blockwise computation reads as slices instead of gathered copies."""
        return []

    # -- attention -----------------------------------------------------------------------------
    def attend(self, q, k, v, key_padding_mask, causal):
        # q [b, h, n, d], k and v [b, hk, m, d] with m >= n: query i stands at position i + m - n.
        n, m = q.shape[-2], k.shape[-2]
        if self.uses_flex(q, n, m):
            return flex_sparse_attention(self, q, k, v, key_padding_mask, causal)
        out = blockwise_attention(self, q, k, v, key_padding_mask, causal, self.dropout_p)
        globals_here = [p for p in self.global_queries(m) if p >= m - n]
        if globals_here:  # their rows see every key: computed densely, few of them
            rows = torch.tensor(globals_here, device=q.device)
            dense = masked_attention(
                self, q[..., rows - (m - n), :], k, v, rows, key_padding_mask, causal, self.dropout_p
            )
            out = out.index_copy(-2, rows - (m - n), dense.to(out.dtype))
        return out

    def uses_flex(self, q, n: int, m: int) -> bool:
        if as_value(self.kernel) == "blockwise" or (as_value(self.kernel) == "auto" and q.device.type != "cuda"):
            return False
        explicit = as_value(self.kernel) == "flex"
        if self.dropout_p > 0 or n != m:
            if explicit:
                raise Unsupported(
                    f"{self.name} kernel=flex runs self-attention without attention dropout only "
                    f"(FlexAttention has no dropout; a decode step runs blockwise): use kernel=auto "
                    f"or blockwise, or model.dropout=0"
                )
            return False
        return True

    def reference_attend(self, q, k, v, key_padding_mask, causal):
        """Softmax attention under the whole [n, m] mask, 256 query rows at a time (with
        ``unmasked_reference``: without the sparse mask, full attention)."""
        if self.unmasked_reference:
            return super().reference_attend(q, k, v, key_padding_mask, causal)
        n, m = q.shape[-2], k.shape[-2]
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        positions = torch.arange(m - n, m, device=q.device)
        rows = [
            masked_attention(
                self,
                q[..., start : start + 256, :],
                k,
                v,
                positions[start : start + 256],
                key_padding_mask,
                causal,
                0.0,
            )
            for start in range(0, n, 256)
        ]
        return torch.cat(rows, dim=-2)

    # -- cost models ---------------------------------------------------------------------------
    @classmethod
    def pattern(cls, length: int, **options) -> tuple[int, int, int, int]:  # pragma: no cover - abstract
        """(block, band columns, other columns, global query rows) of a ``length``-token input:
        key blocks per query block read as slices, and gathered."""
        raise NotImplementedError

    @classmethod
    def decoding_read_elements(cls, n_kv_heads: int, head_dim: int, length: int, **options) -> int:
        """A decode step's query reads the keys and values of its K key blocks, not the whole cache
        (which is kept for the queries to come); a global query (``global_decoding``) reads them all."""
        block, band, other, _ = cls.pattern(length, **options)
        seen = length if cls.global_decoding else min(length, (band + other) * block)
        return 2 * n_kv_heads * seen * head_dim

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
        """blockwise: scores [n, K block] in float32, the probabilities written over them; a
        training step's backward recomputes them beside their gradient (three such tensors at
        most; with attention dropout autograd keeps about two more); the gathered (non-band) keys
        and values [n / block, other block, d]; the global rows; q, k and v padded to whole blocks
        (and q scaled), [n, d] each; the output. flex: a fused kernel (linear in length) and
        its block mask, int32 tile indices [n / 64, m / 64] (its dense boolean mask, built once
        per shape, is not part of a step)."""
        if resolved_kernel(options.get("kernel", "auto"), shape.device) == "flex":
            tiles = math.ceil(shape.q_len / 64) * math.ceil(shape.k_len / 64)
            return super().memory_bytes(shape, training) + shape.batch * tiles * 4 * 4
        block, band, other, global_rows = cls.pattern(shape.k_len, **options)
        rows = math.ceil(shape.q_len / block) * block
        element = max(shape.bytes_per_element, 4)
        scores = shape.batch * shape.n_heads * (rows * (band + other) * block + global_rows * shape.k_len) * 4
        gathered = 2 * shape.batch * shape.kv_heads * rows * other * shape.head_dim * element
        copies = (
            shape.batch * (2 * shape.n_heads + 2 * shape.kv_heads) * rows * shape.head_dim * element
        )  # q padded and scaled, k and v padded
        return (
            scores * (3 if training else 2)
            + gathered * (2 if training else 1)
            + copies * (2 if training else 1)
            + super().memory_bytes(shape, training)
        )


def flex_sparse_attention(attention: SparseAttention, q, k, v, key_padding_mask, causal):
    """The backend's mask through FlexAttention: q [b, h, n, d], k, v [b, hk, n, d] -> [b, h, n, d].
    Its block mask is built once per (length, causal, padding) and kept on the layer."""
    n = q.shape[-2]
    key = (n, causal, flex.padding_key(key_padding_mask), str(q.device))
    masks = attention.__dict__.setdefault("_flex_block_masks", {})
    if key not in masks:
        seen = attention.mask_function(n, q.device)
        real = key_padding_mask.to(torch.bool) if key_padding_mask is not None else None

        def mask_mod(batch, head, q_idx, kv_idx):
            # create_block_mask pads the grid to whole tiles: indices past n are clamped for the
            # lookups, and masked out
            query, key_index = q_idx.clamp(max=n - 1), kv_idx.clamp(max=n - 1)
            visible = seen(query, key_index) & (kv_idx < n) & (q_idx < n)
            if causal:
                visible = visible & (kv_idx <= q_idx)
            if real is not None:
                visible = visible & real[batch, key_index]
            return visible

        tile = 128 if attention.block % 128 == 0 else 64
        if len(masks) > 16:
            masks.clear()
        masks[key] = flex.create_block_mask(
            mask_mod, q.shape[0] if key_padding_mask is not None else None, None, n, n, device=q.device, BLOCK_SIZE=tile
        )
    return flex.compiled_flex_attention()(q, k, v, block_mask=masks[key], enable_gqa=k.shape[1] != q.shape[1])


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
    that cost no memory; only the other columns (global, random) are gathered copies. Without
    dropout the backward recomputes the probabilities (``SparseSoftmaxAttention``), so a training
    step holds about two score-sized tensors, not the five or six that autograd keeps; with
    dropout, autograd runs (and keeps its mask).

    Fewer queries than a block (a decode step against a KV cache) gather each query's keys
    instead, [b, hk, n, K block, d]: the step reads and scores O(K block) keys per query, never a
    copy of the whole cache nor the other rows of a padded query block."""
    n, m, size = q.shape[-2], k.shape[-2], attention.block
    n_blocks = math.ceil(m / size)
    first = (m - n) // size  # the first block that holds a query
    pad_end = n_blocks * size - m
    layout = attention.key_blocks(n_blocks, q.device)[first:]  # [c, K]
    c, offsets = layout.shape[0], attention.band_offsets(n_blocks)
    grid = KeyColumns(first, c, offsets, layout[:, len(offsets) :].clamp(min=0))

    offsets_in_block = torch.arange(size, device=q.device)
    query_positions = (first + torch.arange(c, device=q.device))[:, None] * size + offsets_in_block  # [c, t]
    key_positions = rearrange(layout.clamp(min=0)[..., None] * size + offsets_in_block, "c K t -> c (K t)")
    key_present = rearrange((layout >= 0)[..., None].expand(-1, -1, size), "c K t -> c (K t)") & (key_positions < m)
    visible = attention.visible(query_positions[..., None], key_positions[:, None, :], m) & key_present[:, None, :]
    if causal:
        visible = visible & (key_positions[:, None, :] <= query_positions[..., None])  # [c, t, K t]
    visible = visible[None, None, None]  # [1, 1, 1, c, t, K t]
    if key_padding_mask is not None:
        real = key_padding_mask.to(torch.bool)[:, key_positions.clamp(max=m - 1)]  # [b, c, K t]
        visible = visible & real[:, None, None, :, None, :]

    if n < size:  # fewer queries than a block (a decode step): each gathers and scores only its own keys
        rows = torch.arange(m - n, m, device=q.device)  # the queries' positions
        block, offset = rows // size - first, rows % size
        at = key_positions[block].clamp(max=m - 1)  # [n, K t]
        keys, values = (t[:, :, at] for t in (k, v))  # [b, hk, n, K t, d]
        seen = visible[..., block, offset, :][..., None, :]  # [1 or b, 1, 1, n, 1, K t]
        return softmax_attend(q[..., None, :], keys, values, seen, dropout_p)[..., 0, :]

    q = torch.nn.functional.pad(q, (0, 0, m - n - first * size, pad_end))  # positions first * size ..
    k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad_end)) for t in (k, v))
    dtype, compute = q.dtype, torch.promote_types(q.dtype, torch.float32)
    q = rearrange(q, "b (hk g) (c t) d -> b hk g c t d", hk=k.shape[1], t=size).to(compute) * q.shape[-1] ** -0.5
    k, v = (rearrange(t, "b hk (c t) d -> b hk c t d", t=size).to(compute) for t in (k, v))  # [b, hk, blocks, t, d]
    if dropout_p > 0:
        out = autograd_sparse_attention(q, k, v, visible, grid, dropout_p)
    else:
        out = SparseSoftmaxAttention.apply(q, k, v, visible, grid)
    out = rearrange(out.to(dtype), "b hk g c t d -> b (hk g) (c t) d")
    start = m - n - first * size
    return out[..., start : start + n, :]


class KeyColumns:
    """The key blocks of each query block, as columns: the band ones (block r + offset, slices of
    the keys) and the gathered ones (``gathered`` [c, E] block indices), for the ``c`` query
    blocks from block ``first``."""

    def __init__(self, first: int, c: int, offsets: list[int], gathered: torch.Tensor):
        self.first, self.c, self.offsets, self.gathered = first, c, offsets, gathered
        self.reach = max((abs(o) for o in offsets), default=0)

    def of(self, blocks: torch.Tensor) -> list[torch.Tensor]:
        """blocks [b, hk, n_blocks, t, d] -> the columns, each [b, hk, c, width, d]."""
        banded = torch.nn.functional.pad(blocks, (0, 0, 0, 0, self.reach, self.reach))
        start = self.first + self.reach
        columns = [banded[:, :, start + o : start + o + self.c] for o in self.offsets]  # views
        if self.gathered.shape[1]:
            columns.append(rearrange(blocks[:, :, self.gathered], "b hk c e t d -> b hk c (e t) d"))
        return columns

    def add_into(self, grad_blocks: torch.Tensor, column_grads: list[torch.Tensor]) -> torch.Tensor:
        """Sum the columns' gradients [b, hk, c, width, d] back onto the blocks they were read
        from: grad_blocks [b, hk, n_blocks, t, d], returned."""
        t = grad_blocks.shape[-2]
        for o, grad in zip(self.offsets, column_grads):
            lo = self.first + o  # query block r read key block r + o; out-of-range ones were padding
            r0, r1 = max(0, -lo), min(self.c, grad_blocks.shape[2] - lo)
            if r1 > r0:
                grad_blocks[:, :, lo + r0 : lo + r1] += grad[:, :, r0:r1]
        if self.gathered.shape[1]:
            grad = rearrange(column_grads[-1], "b hk c (e t) d -> b hk (c e) t d", t=t)
            grad_blocks.index_add_(2, self.gathered.flatten(), grad)
        return grad_blocks


def column_scores(q, columns: list[torch.Tensor], visible) -> torch.Tensor:
    """q [b, hk, g, c, t, d] (scaled) against each column [b, hk, c, s, d] -> scores
    [b, hk, g, c, t, K t], masked keys at the dtype's minimum. Outside autograd one column's
    piece at a time, written in place."""
    pieces = (einsum(q, column, "b hk g c t d, b hk c s d -> b hk g c t s") for column in columns)
    lowest = torch.finfo(q.dtype).min
    if torch.is_grad_enabled() and (q.requires_grad or any(column.requires_grad for column in columns)):
        return torch.cat(list(pieces), dim=-1).masked_fill(~visible, lowest)
    widths = [column.shape[-2] for column in columns]
    scores = q.new_empty(*q.shape[:-1], sum(widths))
    for piece, slot in zip(pieces, scores.split(widths, dim=-1)):
        slot.copy_(piece)
    return scores.masked_fill_(~visible, lowest)


def column_outputs(probs, columns: list[torch.Tensor]) -> torch.Tensor:
    """probs [b, hk, g, c, t, K t] times each value column [b, hk, c, s, d] -> [b, hk, g, c, t, d]."""
    widths = [column.shape[-2] for column in columns]
    return sum(
        einsum(p, value, "b hk g c t s, b hk c s d -> b hk g c t d")
        for p, value in zip(probs.split(widths, dim=-1), columns)
    )


def autograd_sparse_attention(q, k, v, visible, grid: KeyColumns, dropout_p: float):
    """The same attention through autograd (which keeps the probabilities and the dropout mask)."""
    probs = torch.nn.functional.dropout(column_scores(q, grid.of(k), visible).softmax(dim=-1), dropout_p)
    return column_outputs(probs, grid.of(v)) * visible.any(dim=-1, keepdim=True)  # a query that sees no key: 0


class SparseSoftmaxAttention(torch.autograd.Function):
    """softmax(q k^T) v over the key columns; its backward recomputes the probabilities P (the
    scores are not kept) and then follows FlashAttention-2's (Dao 2023) on the whole sparse grid
    at once: dV = P^T dO, dS = P * (dO V^T - D) with D = rowsum(dO * O), dQ = dS K, dK = dS^T Q.
    q [b, hk, g, c, t, d] (scaled), k, v [b, hk, blocks, t, d] -> [b, hk, g, c, t, d]; rows that
    see no key give 0."""

    @staticmethod
    def forward(ctx, q, k, v, visible, grid: KeyColumns):
        seen = visible.any(dim=-1, keepdim=True)  # [.., t, 1]: the rows that see a key
        out = column_outputs(column_scores(q, grid.of(k), visible).softmax(dim=-1), grid.of(v)) * seen
        ctx.save_for_backward(q, k, v, visible, out)
        ctx.grid = grid
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, visible, out = ctx.saved_tensors
        grid = ctx.grid
        keys, values = grid.of(k), grid.of(v)
        widths = [column.shape[-2] for column in keys]
        grad_out = grad_out * visible.any(dim=-1, keepdim=True)  # rows that see no key pass no gradient
        probs = column_scores(q, keys, visible).softmax(dim=-1)
        grad_v = grid.add_into(
            torch.zeros_like(v),
            [einsum(p, grad_out, "b hk g c t s, b hk g c t d -> b hk c s d") for p in probs.split(widths, dim=-1)],
        )
        grad_scores = torch.empty_like(probs)  # dP = dO V^T, then dS = P * (dP - D) in place
        for value, piece in zip(values, grad_scores.split(widths, dim=-1)):
            piece.copy_(einsum(grad_out, value, "b hk g c t d, b hk c s d -> b hk g c t s"))
        grad_scores.sub_((grad_out * out).sum(dim=-1, keepdim=True)).mul_(probs)
        del probs
        pieces = grad_scores.split(widths, dim=-1)
        grad_q = sum(einsum(ds, key, "b hk g c t s, b hk c s d -> b hk g c t d") for ds, key in zip(pieces, keys))
        grad_k = grid.add_into(
            torch.zeros_like(k), [einsum(ds, q, "b hk g c t s, b hk g c t d -> b hk c s d") for ds in pieces]
        )
        return grad_q, grad_k, grad_v, None, None
