"""``chunked``: exact attention with O(n) memory in plain PyTorch (Rabe & Staats 2021).

Forward. Queries are split into blocks of ``query_chunk`` rows, keys and values into blocks of
``key_chunk``. For each query block the key blocks are visited in order while a running row
max ``m``, row sum ``l`` and weighted value sum ``acc`` are kept in float32 (the online
softmax of the paper, FlashAttention-2's Algorithm 1). One [query_chunk, key_chunk] block of
scores per head exists at a time, never the [n, m] matrix. The forward returns the output and
keeps the per-query log-sum-exp ``lse = m + log(l)``: O(n) numbers.

Backward (``checkpoint=True``, the default): FlashAttention-2's Algorithm 2 (Dao 2023). With
``D = rowsum(dO * O)``, each key block j walks the query blocks i that see it, recomputes
``P = exp(S - lse)`` from the saved log-sum-exp (exact probabilities, no running max), and
accumulates ``dV_j += P^T dO_i``, ``dP = dO_i V_j^T``, ``dS = P * (dP - D_i)``,
``dQ_i += dS K_j / sqrt(d)``, ``dK_j += dS^T Q_i / sqrt(d)``. Each block is computed once in
the forward and once in the backward; nothing of size [n, m] is stored, so training memory is
O(n) plus two blocks (three with dropout). (``checkpoint`` keeps its name from the earlier implementation, which
reached the same memory bound through ``torch.utils.checkpoint``: "recompute each block in the
backward instead of storing it".)

``checkpoint=False``: plain autograd through the same blockwise loop. Autograd stores every
block's probabilities, so training memory is O(n * m), as for ``full``; it exists as an
independent check of the hand-written backward (the tests compare the two).

Masks: causal alignment is bottom-right (query i sees key j iff j <= i + (m - n)); key blocks
wholly in a query block's future are skipped, blocks crossing the diagonal and padded keys get
a -inf bias. A query that sees no key outputs zeros, and its gradients are zero.

Dropout (training only): each (query block, key block) pair draws its keep mask from its own
``torch.Generator``, seeded from one seed drawn in the forward (from torch's default
generator, so ``torch.manual_seed`` makes runs repeatable) plus the block's index. The
backward regenerates the same masks. Probabilities are normalised before dropout, as in
``torch.nn.functional.dropout(softmax(S)) @ V``.

Chunk lengths need not divide n or m. Arithmetic is float32 (float64 inputs stay float64);
outputs and gradients come back in the inputs' dtypes.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange

from efficient.attention.base import ProjectedAttention, Shape, register
from efficient.attention.functional import repeat_kv
from efficient.bounds import Bound


def chunked_attention(
    q,
    k,
    v,
    key_padding_mask=None,
    causal=False,
    dropout_p=0.0,
    query_chunk=1024,
    key_chunk=1024,
    use_checkpoint=True,
    dropout_seed=None,
):
    """q [b, h, n, d], k and v [b, h, m, d] -> [b, h, n, d], exactly softmax attention.

    ``key_padding_mask`` [b, m] (True = real key). ``use_checkpoint``: the blockwise backward
    from the saved log-sum-exp (O(n) memory); False: plain autograd (stores every block).
    ``dropout_seed``: the seed of the dropout masks (drawn from torch's generator when None).
    """
    if dropout_p > 0.0 and dropout_seed is None:
        dropout_seed = int(torch.randint(2**62, (), dtype=torch.int64))
    args = (key_padding_mask, causal, dropout_p, dropout_seed, query_chunk, key_chunk)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if needs_grad and not use_checkpoint:
        return autograd_attention(q, k, v, *args)
    return BlockwiseAttention.apply(q, k, v, *args)


class Blocks:
    """The block grid of one call: which blocks exist, their masks and their dropout masks."""

    def __init__(
        self, b, h, n, m, query_chunk, key_chunk, causal, key_padding_mask, dropout_p, dropout_seed, dtype, device
    ):
        self.b, self.h, self.n, self.m = b, h, n, m
        self.c, self.kc = query_chunk, key_chunk
        self.causal = causal
        self.offset = m - n  # query row i stands at key position i + offset (bottom-right)
        self.dropout_p, self.dropout_seed = dropout_p, dropout_seed
        self.dtype, self.device = dtype, device
        self.padding_bias = None  # [b, 1, 1, m]: 0 for real keys, -inf for padding
        if key_padding_mask is not None:
            real = key_padding_mask.to(device=device, dtype=torch.bool)
            self.padding_bias = torch.zeros(b, 1, 1, m, dtype=dtype, device=device).masked_fill_(
                ~real[:, None, None, :], -math.inf
            )
        self._causal_bias: dict[tuple[tuple[int, int], int, bool], torch.Tensor] = {}
        self._scratch: dict[str, torch.Tensor] = {}

    def query_blocks(self):
        for q0 in range(0, self.n, self.c):
            yield q0, min(q0 + self.c, self.n)

    def key_blocks(self):
        for k0 in range(0, self.m, self.kc):
            yield k0, min(k0 + self.kc, self.m)

    def sees(self, q1: int, k0: int) -> bool:
        """Does any query of the block ending at row q1 see a key of the block starting at k0?"""
        return not self.causal or k0 <= q1 - 1 + self.offset

    def scratch(self, name: str, rows: int, cols: int) -> torch.Tensor:
        """A [b * h, rows, cols] block in a buffer reused across blocks (no fresh allocation per
        block: on CPU a fresh [b * h, 1024, 1024] float32 block costs page faults that take as
        long as a matmul)."""
        if name not in self._scratch:  # sized for the largest block
            largest = self.b * self.h * min(self.c, self.n) * min(self.kc, self.m)
            self._scratch[name] = torch.empty(largest, dtype=self.dtype, device=self.device)
        return self._scratch[name][: self.b * self.h * rows * cols].view(self.b * self.h, rows, cols)

    def mask_(self, s: torch.Tensor, q0: int, q1: int, k0: int, k1: int, key_major: bool = False) -> torch.Tensor:
        """Add -inf to the scores of keys a query must not see: s is S [b * h, q1 - q0, k1 - k0],
        or with ``key_major`` its transpose S^T [b * h, k1 - k0, q1 - q0]."""
        diagonal = q0 + self.offset - k0  # row r of the block sees column j iff j <= r + diagonal
        if self.causal and k1 - k0 - 1 > diagonal:  # only blocks crossing the diagonal
            shape = (q1 - q0, k1 - k0)
            if (shape, diagonal, key_major) not in self._causal_bias:
                r = torch.arange(shape[0], device=self.device)[:, None]
                j = torch.arange(shape[1], device=self.device)[None, :]
                bias = torch.zeros(shape, dtype=self.dtype, device=self.device).masked_fill_(
                    j > r + diagonal, -math.inf
                )
                self._causal_bias[shape, diagonal, key_major] = bias.mT.contiguous() if key_major else bias
            s.add_(self._causal_bias[shape, diagonal, key_major])  # the same for every head
        if self.padding_bias is not None:
            bias = self.padding_bias[..., k0:k1]  # [b, 1, 1, kc]
            s.view(self.b, self.h, *s.shape[1:]).add_(bias.mT if key_major else bias)
        return s

    def keep(self, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor | None:
        """The dropout keep mask of block (q0, k0), scaled: Z / (1 - p), [b * h, q1 - q0, k1 - k0].

        The same block always gets the same mask (its generator is seeded by its index), so the
        backward regenerates what the forward used.
        """
        if self.dropout_p == 0.0:
            return None
        index = (q0 // self.c) * math.ceil(self.m / self.kc) + k0 // self.kc
        generator = torch.Generator(device=self.device).manual_seed(self.dropout_seed + index)
        z = self.scratch("keep", q1 - q0, k1 - k0).bernoulli_(1.0 - self.dropout_p, generator=generator)
        return z.mul_(1.0 / (1.0 - self.dropout_p))


def blocks_for(q, k, key_padding_mask, causal, dropout_p, dropout_seed, query_chunk, key_chunk) -> Blocks:
    b, h, n, _ = q.shape
    accumulate = torch.promote_types(q.dtype, torch.float32)  # float32; float64 stays float64
    return Blocks(
        b,
        h,
        n,
        k.shape[-2],
        query_chunk,
        key_chunk,
        causal,
        key_padding_mask,
        dropout_p,
        dropout_seed,
        accumulate,
        q.device,
    )


def flat(t: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """[b, h, n, d] -> [b * h, n, d] in ``dtype``, times ``scale``, each [n, d] matrix contiguous.
    Matrices already contiguous apart (a KV cache's filled part) are not copied."""
    t = t.reshape(-1, t.shape[-2], t.shape[-1]).to(dtype)
    t = t * scale if scale != 1.0 else t
    return t if t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] else t.contiguous()


def blockwise_forward(q, k, v, blocks: Blocks):
    """q [bh, n, d] (already scaled by 1/sqrt(d)), k and v [bh, m, d] ->
    O [bh, n, d] and lse [bh, n] (+inf for a row that sees no key)."""
    bh, n, _ = q.shape
    o = q.new_empty(bh, n, v.shape[-1])
    lse = torch.empty(bh, n, dtype=q.dtype, device=q.device)
    for q0, q1 in blocks.query_blocks():
        q_i = q[:, q0:q1]  # [bh, c, d]
        acc = q_i.new_zeros(bh, q1 - q0, v.shape[-1])  # sum_j exp(S_ij - m) V_j, the unnormalised O_i
        m = torch.full((bh, q1 - q0, 1), -math.inf, dtype=q.dtype, device=q.device)  # running row max
        l = torch.zeros(bh, q1 - q0, 1, dtype=q.dtype, device=q.device)  # running sum_j exp(S_ij - m)
        for k0, k1 in blocks.key_blocks():
            if not blocks.sees(q1, k0):
                break  # this key block and every later one are in the whole query block's future
            s = torch.bmm(q_i, k[:, k0:k1].mT, out=blocks.scratch("s", q1 - q0, k1 - k0))  # S [bh, c, kc]
            blocks.mask_(s, q0, q1, k0, k1)
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            m_safe = torch.where(torch.isinf(m_new), 0.0, m_new)  # a row with no key yet: keep exp() finite
            p = s.sub_(m_safe).exp_()  # P~ = exp(S - m) [bh, c, kc], in place; masked keys -> 0
            rescale = torch.exp(m - m_safe)  # what was accumulated so far was relative to the old max
            l = l * rescale + p.sum(dim=-1, keepdim=True)  # normalised before dropout
            keep = blocks.keep(q0, q1, k0, k1)
            if keep is not None:
                p.mul_(keep)
            torch.baddbmm(acc.mul_(rescale), p, v[:, k0:k1], out=acc)  # (out=, not baddbmm_: FLOP counters see it)
            m = m_new
        o[:, q0:q1] = acc / l.clamp_min(torch.finfo(q.dtype).tiny)  # a row that saw no key: acc = 0 -> 0
        lse[:, q0:q1] = torch.where(l > 0, m + torch.log(l), math.inf).squeeze(-1)  # +inf: P = exp(S - lse) = 0
    return o, lse


def blockwise_backward(q, k, v, o, lse, do, blocks: Blocks, scale: float):
    """FlashAttention-2's Algorithm 2: q [bh, n, d] (already scaled by 1/sqrt(d)), k and v
    [bh, m, d], o and do [bh, n, d], lse [bh, n] -> dq (for the unscaled q), dk, dv.

    Each block is handled key-major, as S^T [bh, kc, c]: of the three products that read P or
    dS, the two that need it transposed (dV_j, dK_j) then read it as stored, and only dQ_i reads
    it transposed (a transposed operand makes a CPU matmul about 25% slower).
    """
    d_rows = (do * o).sum(dim=-1)[:, None, :]  # D^T = rowsum(dO * O), [bh, 1, n]
    lse = lse[:, None, :]  # [bh, 1, n]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for k0, k1 in blocks.key_blocks():
        k_j, v_j, dk_j, dv_j = k[:, k0:k1], v[:, k0:k1], dk[:, k0:k1], dv[:, k0:k1]  # [bh, kc, d]
        for q0, q1 in blocks.query_blocks():
            if not blocks.sees(q1, k0):
                continue  # the whole query block lies before this key block
            q_i, do_i, dq_i = q[:, q0:q1], do[:, q0:q1], dq[:, q0:q1]  # [bh, c, d]
            s_t = torch.bmm(k_j, q_i.mT, out=blocks.scratch("s", k1 - k0, q1 - q0))  # S^T [bh, kc, c]
            blocks.mask_(s_t, q0, q1, k0, k1, key_major=True)
            p_t = s_t.sub_(lse[..., q0:q1]).exp_()  # P^T = exp(S^T - lse^T): exact probabilities
            dp_t = blocks.scratch("dp", k1 - k0, q1 - q0)
            keep = blocks.keep(q0, q1, k0, k1)  # Z / (1 - p_drop) [bh, c, kc], or None
            if keep is None:
                torch.baddbmm(dv_j, p_t, do_i, out=dv_j)  # dV_j += P^T dO_i
                torch.bmm(v_j, do_i.mT, out=dp_t)  # dP^T = V_j dO_i^T
            else:
                torch.baddbmm(dv_j, torch.mul(p_t, keep.mT, out=dp_t), do_i, out=dv_j)  # the dropped P
                torch.bmm(v_j, do_i.mT, out=dp_t).mul_(keep.mT)  # dP^T with respect to the undropped P
            ds_t = dp_t.sub_(d_rows[..., q0:q1]).mul_(p_t)  # dS^T = P^T * (dP^T - D^T) [bh, kc, c]
            torch.baddbmm(dk_j, ds_t, q_i, out=dk_j)  # dK_j += dS^T Q_i / sqrt(d) (q is already scaled)
            torch.baddbmm(dq_i, ds_t.mT, k_j, alpha=scale, out=dq_i)  # dQ_i += dS K_j / sqrt(d)
    return dq, dk, dv


class BlockwiseAttention(torch.autograd.Function):
    """Saves O and the log-sum-exp; the backward recomputes each block once (O(n) memory)."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, causal, dropout_p, dropout_seed, query_chunk, key_chunk):
        blocks = blocks_for(q, k, key_padding_mask, causal, dropout_p, dropout_seed, query_chunk, key_chunk)
        scale = 1.0 / math.sqrt(q.shape[-1])
        o, lse = blockwise_forward(flat(q, blocks.dtype, scale), flat(k, blocks.dtype), flat(v, blocks.dtype), blocks)
        out = o.view(q.shape[:-1] + v.shape[-1:]).to(v.dtype)  # [b, h, n, d], in the inputs' dtype
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
        ctx.options = (causal, dropout_p, dropout_seed, query_chunk, key_chunk)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        blocks = blocks_for(q, k, key_padding_mask, *ctx.options)
        scale = 1.0 / math.sqrt(q.shape[-1])
        dq, dk, dv = blockwise_backward(
            flat(q, blocks.dtype, scale),
            flat(k, blocks.dtype),
            flat(v, blocks.dtype),
            flat(out, blocks.dtype),
            lse,
            flat(grad_out, blocks.dtype),
            blocks,
            scale,
        )
        return (
            dq.view(q.shape).to(q.dtype),
            dk.view(k.shape).to(k.dtype),
            dv.view(v.shape).to(v.dtype),
            None,
            None,
            None,
            None,
            None,
            None,
        )


def autograd_attention(q, k, v, key_padding_mask, causal, dropout_p, dropout_seed, query_chunk, key_chunk):
    """The same blockwise forward in out-of-place ops, differentiated by autograd, which stores
    every block (O(n * m) training memory). Same blocks and dropout masks as the hand-written
    backward: the tests use it to check that backward."""
    blocks = blocks_for(q, k, key_padding_mask, causal, dropout_p, dropout_seed, query_chunk, key_chunk)
    dtype = v.dtype
    q, k, v = flat(q, blocks.dtype, 1.0 / math.sqrt(q.shape[-1])), flat(k, blocks.dtype), flat(v, blocks.dtype)
    bh = q.shape[0]
    outputs = []
    for q0, q1 in blocks.query_blocks():
        acc = q.new_zeros(bh, q1 - q0, v.shape[-1])  # [bh, c, d]
        m = q.new_full((bh, q1 - q0, 1), -math.inf)
        l = q.new_zeros(bh, q1 - q0, 1)
        for k0, k1 in blocks.key_blocks():
            if not blocks.sees(q1, k0):
                break
            s = blocks.mask_(torch.bmm(q[:, q0:q1], k[:, k0:k1].mT), q0, q1, k0, k1)  # S [bh, c, kc]
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True).detach())  # the max needs no gradient
            m_safe = torch.where(torch.isinf(m_new), 0.0, m_new)
            p = torch.exp(s - m_safe)
            rescale = torch.exp(m - m_safe)
            l = l * rescale + p.sum(dim=-1, keepdim=True)
            keep = blocks.keep(q0, q1, k0, k1)
            acc = acc * rescale + torch.bmm(p if keep is None else p * keep.clone(), v[:, k0:k1])
            m = m_new
        outputs.append(acc / l.clamp_min(torch.finfo(blocks.dtype).tiny))
    o = torch.cat(outputs, dim=1)  # [bh, n, d]
    return o.view(blocks.b, blocks.h, blocks.n, -1).to(dtype)


@register
class ChunkedAttention(ProjectedAttention):
    name = "chunked"
    option_bounds = {"query_chunk": Bound(1), "key_chunk": Bound(1)}

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float = 0.0,
        n_kv_heads: int | None = None,
        *,
        query_chunk: int = 1024,
        key_chunk: int = 1024,
        checkpoint: bool = True,
    ):
        super().__init__(d_model, n_heads, dropout, n_kv_heads)
        if query_chunk < 1 or key_chunk < 1:
            raise ValueError(f"chunk lengths must be positive, got query_chunk={query_chunk}, key_chunk={key_chunk}")
        self.query_chunk, self.key_chunk, self.checkpoint = query_chunk, key_chunk, checkpoint

    def attend(self, q, k, v, key_padding_mask, causal):
        b, h, n, d = q.shape
        if n == 1 and k.shape[1] < h:
            # One query per head (a decode step): the query heads of a group become the rows of one
            # block against their shared keys (with one query, causal hides no key); no copy of the cache.
            grouped = rearrange(q, "b (hk g) 1 d -> b hk g d", hk=k.shape[1])
            o = chunked_attention(
                grouped,
                k,
                v,
                key_padding_mask,
                False,
                self.dropout_p,
                self.query_chunk,
                self.key_chunk,
                self.checkpoint,
            )
            return rearrange(o, "b hk g d -> b (hk g) 1 d")
        k, v = repeat_kv(k, h), repeat_kv(v, h)  # [b, h, m, d]: grouped keys copied out
        return chunked_attention(
            q, k, v, key_padding_mask, causal, self.dropout_p, self.query_chunk, self.key_chunk, self.checkpoint
        )

    @classmethod
    def memory_bytes(
        cls,
        shape: Shape,
        training: bool,
        query_chunk: int = 1024,
        key_chunk: int = 1024,
        checkpoint: bool = True,
        **options,
    ) -> float:
        # Arithmetic is float32 (float64 for float64 inputs).
        unit = max(shape.bytes_per_element, 4)
        heads = shape.batch * shape.n_heads
        block = heads * min(query_chunk, shape.q_len) * min(key_chunk, shape.k_len) * unit  # one [c, kc] block
        rows = heads * max(shape.q_len, shape.k_len) * shape.head_dim * unit  # one [n, d] tensor per head
        if not training:  # scores S; float32 copies of q, k, v, the output and its accumulator
            return block + 5 * rows + super().memory_bytes(shape, training)
        if not checkpoint:  # autograd stores every block's probabilities (and its dropout mask)
            return 3 * heads * shape.q_len * shape.k_len * unit + 10 * rows + super().memory_bytes(shape, training)
        # Backward: S/P, dP and a dropout mask; copies of q, k, v, O, dO; dq, dk, dv; D and lse.
        return 3 * block + 9 * rows + super().memory_bytes(shape, training)
