"""Exact softmax attention and the masks every backend shares.

Shapes: q [b, h, n, d]; k, v [b, hk, m, d] with hk dividing h (grouped-query attention: query
head i reads key/value head i // (h / hk)); key_padding_mask [b, m] (True = real token).
Causal alignment is bottom-right: query i sees key j iff j <= i + (m - n).
"""

from __future__ import annotations

import math

import torch
from einops import einsum, rearrange, repeat


def repeat_kv(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[b, hk, m, d] -> [b, n_heads, m, d]: each key/value head copied for its group of query heads."""
    return t if t.shape[1] == n_heads else repeat(t, "b hk m d -> b (hk g) m d", g=n_heads // t.shape[1])


def visible_keys(
    q_len: int, k_len: int, key_padding_mask: torch.Tensor | None, causal: bool, device,
    window: int | None = None,
    q_offset: int | None = None,
) -> torch.Tensor | None:
    """Bool [b or 1, 1, n, m]: True where query i may attend key j; None when all may.

    Query i stands at key position i + q_offset (default m - n: bottom-right alignment).

    ``window``: a sliding window; key j is visible iff |i + (m - n) - j| < window (with
    ``causal`` that is the ``window`` most recent keys, the query's own included).
    """
    mask = None
    if causal or window:
        offset = k_len - q_len if q_offset is None else q_offset
        i = torch.arange(q_len, device=device)[:, None] + offset  # the query's key position
        j = torch.arange(k_len, device=device)[None, :]
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
        if causal:
            mask &= j <= i
        if window:
            mask &= (i - j).abs() < window
        mask = mask[None, None]  # [1, 1, n, m]
    if key_padding_mask is not None:
        padding = rearrange(key_padding_mask.to(torch.bool), "b m -> b 1 1 m")
        mask = padding if mask is None else mask & padding
    return mask


def exact_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    query_block: int | None = None,
    window: int | None = None,
    q_offset: int | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with every score materialised -> [b, h, n, d].

    With hk < h key/value heads, the query heads of a group share their keys by broadcasting
    (no copy of k or v). Scores and softmax are computed in at least float32. A query with no
    visible key outputs zeros. ``query_block`` computes query rows in blocks (same result,
    bounded memory): the harness uses it for the float64 reference at lengths where [n, m]
    scores would not fit.
    """
    n, m = q.shape[-2], k.shape[-2]
    if query_block and n > query_block:
        blocks = []
        for start in range(0, n, query_block):
            block = q[..., start : start + query_block, :]
            offset = (m - n if q_offset is None else q_offset) + start  # keeps the alignment
            blocks.append(
                exact_attention(block, k, v, key_padding_mask, causal, dropout_p, window=window, q_offset=offset)
            )
        return torch.cat(blocks, dim=-2)

    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    grouped = rearrange(q, "b (hk g) n d -> b hk g n d", hk=k.shape[1])
    scores = einsum(grouped.to(compute_dtype), k.to(compute_dtype), "b hk g n d, b hk m d -> b hk g n m")
    scores = scores * (1.0 / math.sqrt(q.shape[-1]))  # [b, hk, g, n, m]
    mask = visible_keys(n, m, key_padding_mask, causal, q.device, window, q_offset)
    if mask is not None:
        mask = mask[:, :, None]  # [b or 1, 1, 1, n, m]
        scores = scores.masked_fill(~mask, torch.finfo(compute_dtype).min)
    probs = scores.softmax(dim=-1)
    if mask is not None:
        probs = probs * mask.any(dim=-1, keepdim=True)  # rows that see no key -> 0
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, dropout_p)
    out = einsum(probs.to(v.dtype), v, "b hk g n m, b hk m d -> b hk g n d")
    return rearrange(out, "b hk g n d -> b (hk g) n d")
