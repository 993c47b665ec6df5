"""Exact softmax attention and the masks every backend shares.

Shapes: q [b, h, n, d]; k, v [b, h, m, d]; key_padding_mask [b, m] (True = real token).
Causal alignment is bottom-right: query i sees key j iff j <= i + (m - n).
"""

from __future__ import annotations

import math

import torch
from einops import einsum, rearrange


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

    Scores and softmax are computed in at least float32. A query with no visible key outputs
    zeros. ``query_block`` computes query rows in blocks (same result, bounded memory): the
    harness uses it for the float64 reference at lengths where [n, m] scores would not fit.
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
    scores = einsum(q.to(compute_dtype), k.to(compute_dtype), "b h n d, b h m d -> b h n m")
    scores = scores * (1.0 / math.sqrt(q.shape[-1]))  # [b, h, n, m]
    mask = visible_keys(n, m, key_padding_mask, causal, q.device, window, q_offset)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(compute_dtype).min)
    probs = scores.softmax(dim=-1)
    if mask is not None:
        probs = probs * mask.any(dim=-1, keepdim=True)  # rows that see no key -> 0
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, dropout_p)
    return einsum(probs.to(v.dtype), v, "b h n m, b h m d -> b h n d")
