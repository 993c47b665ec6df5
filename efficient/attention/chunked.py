"""``chunked``: exact attention with O(n) memory in plain PyTorch (Rabe & Staats 2021).

Queries are split into chunks of ``query_chunk``; for each, keys and values are visited in
chunks of ``key_chunk`` while a running row max, row sum and weighted value sum are kept in
float32 (the numerically stable softmax of the paper). Nothing of size [n, m] ever exists.
Gradients go through ``torch.utils.checkpoint``: each query chunk, and inside it each key
chunk step, is recomputed in backward instead of being stored, so training memory is O(n)
too. Chunk lengths need not divide n. With ``causal``, key chunks wholly in a query chunk's
future are skipped.
"""

from __future__ import annotations

import math

import torch
from einops import einsum
from torch.utils.checkpoint import checkpoint

from efficient.attention.base import Bound, ProjectedAttention, Shape, register


def chunked_attention(q, k, v, key_padding_mask=None, causal=False, dropout_p=0.0,
                      query_chunk=1024, key_chunk=1024, use_checkpoint=True):
    """q [b, h, n, d], k and v [b, h, m, d] -> [b, h, n, d], exactly softmax attention."""
    n = q.shape[-2]
    use_checkpoint = use_checkpoint and torch.is_grad_enabled()
    outputs = []
    for start in range(0, n, query_chunk):
        args = (q[..., start : start + query_chunk, :], k, v, key_padding_mask, start, n, causal, dropout_p,
                key_chunk, use_checkpoint)
        if use_checkpoint:
            outputs.append(checkpoint(query_chunk_attention, *args, use_reentrant=False))
        else:
            outputs.append(query_chunk_attention(*args))
    return torch.cat(outputs, dim=-2)


def query_chunk_attention(q, k, v, key_padding_mask, q_start, n, causal, dropout_p, key_chunk, use_checkpoint):
    """One chunk of queries q [b, h, c, d] (rows q_start.. of n) against every key chunk."""
    b, h, c, d = q.shape
    m = k.shape[-2]
    accumulate = torch.promote_types(q.dtype, torch.float32)
    q = q.to(accumulate) * (1.0 / math.sqrt(d))  # scaled once, not per key chunk
    acc = torch.zeros(b, h, c, d, dtype=accumulate, device=q.device)  # sum_j exp(s_j - max) v_j
    row_max = torch.full((b, h, c, 1), -math.inf, dtype=accumulate, device=q.device)
    row_sum = torch.zeros(b, h, c, 1, dtype=accumulate, device=q.device)  # sum_j exp(s_j - max)
    # Bottom-right causal alignment: query i sees key j iff j <= i + (m - n).
    last_key = min(m, q_start + c + (m - n)) if causal else m
    for k_start in range(0, max(last_key, 0), key_chunk):
        k_stop = min(k_start + key_chunk, m)
        padding = None if key_padding_mask is None else key_padding_mask[:, k_start:k_stop]
        args = (acc, row_max, row_sum, q, k[..., k_start:k_stop, :], v[..., k_start:k_stop, :], padding,
                q_start + (m - n), k_start, causal, dropout_p)
        if use_checkpoint:
            acc, row_max, row_sum = checkpoint(key_chunk_step, *args, use_reentrant=False)
        else:
            acc, row_max, row_sum = key_chunk_step(*args)
    # A row that saw no key has acc = 0 and row_sum = 0: its output is 0.
    return (acc / row_sum.clamp_min(torch.finfo(accumulate).tiny)).to(v.dtype)


def key_chunk_step(acc, row_max, row_sum, q, k, v, padding, q_position, k_start, causal, dropout_p):
    """Fold one chunk of keys into the running (acc, max, sum) of a chunk of queries.

    q [b, h, c, d] (already scaled by 1/sqrt(d)); k, v [b, h, kc, d]; padding [b, kc] or None;
    query row i stands at key position q_position + i.
    """
    accumulate = acc.dtype
    scores = einsum(q, k.to(accumulate), "b h c d, b h k d -> b h c k")
    visible = None
    if causal and k_start + k.shape[-2] - 1 > q_position:  # only chunks crossing the diagonal need a mask
        i = torch.arange(q.shape[-2], device=q.device)[:, None] + q_position
        j = torch.arange(k.shape[-2], device=q.device)[None, :] + k_start
        visible = j <= i  # [c, kc]
    if padding is not None:
        real = padding[:, None, None, :].to(torch.bool)  # [b, 1, 1, kc]
        visible = real if visible is None else visible & real
    if visible is not None:
        scores = scores.masked_fill(~visible, -math.inf)
    # The max only keeps exp() in range; the result does not depend on it, so no gradient.
    new_max = torch.maximum(row_max, scores.amax(dim=-1, keepdim=True)).detach()
    safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)  # rows with no key yet
    weights = scores.sub_(safe_max).exp_()  # [b, h, c, kc], in place; masked keys -> 0
    correction = torch.exp(row_max - safe_max)  # rescales what was accumulated so far
    row_sum = row_sum * correction + weights.sum(dim=-1, keepdim=True)
    if dropout_p > 0.0:  # dropping normalised probabilities == dropping weights before the sum
        weights = torch.nn.functional.dropout(weights, dropout_p)
    acc = acc * correction + einsum(weights, v.to(accumulate), "b h c k, b h k d -> b h c d")
    return acc, new_max, row_sum


@register
class ChunkedAttention(ProjectedAttention):
    name = "chunked"
    option_bounds = {"query_chunk": Bound(1), "key_chunk": Bound(1)}

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, *,
                 query_chunk: int = 1024, key_chunk: int = 1024, checkpoint: bool = True):
        super().__init__(d_model, n_heads, dropout)
        if query_chunk < 1 or key_chunk < 1:
            raise ValueError(f"chunk lengths must be positive, got query_chunk={query_chunk}, key_chunk={key_chunk}")
        self.query_chunk, self.key_chunk, self.checkpoint = query_chunk, key_chunk, checkpoint

    def attend(self, q, k, v, key_padding_mask, causal):
        return chunked_attention(q, k, v, key_padding_mask, causal, self.dropout_p,
                                 self.query_chunk, self.key_chunk, self.checkpoint)

    @classmethod
    def memory_bytes(cls, shape: Shape, training: bool, query_chunk: int = 1024, key_chunk: int = 1024,
                     **options) -> float:
        # One [c, kc] block of scores and weights (float32) at a time, plus per-query-chunk state
        # and, in backward, the saved per-key-chunk states of the query chunk being recomputed.
        c, kc = min(query_chunk, shape.q_len), min(key_chunk, shape.k_len)
        block = shape.batch * shape.n_heads * c * kc * 4 * (4 if training else 3)
        state = shape.batch * shape.n_heads * c * shape.head_dim * 4 * (2 + math.ceil(shape.k_len / kc))
        return block + state + super().memory_bytes(shape, training)
