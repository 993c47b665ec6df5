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
    q_len: int,
    k_len: int,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    device,
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


def kernel_attention(
    q_features: torch.Tensor,
    k_features: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    eps: float = 1e-6,
    chunk: int = 64,
    earlier: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention through a non-negative feature map phi (linear attention, Performer's FAVOR+):

        out_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps),   S_i = sum_j phi(k_j) v_j^T,  z_i = sum_j phi(k_j)

    over the keys j that query i sees: all of them, or j <= i + (m - n) when ``causal``. No [n, m]
    matrix is formed. q_features [b, h, n, D], k_features [b, hk, m, D], v [b, hk, m, d] -> [b, h, n, d].
    Padded keys get zero features (they add nothing to S or z); a query that sees no key outputs 0.
    ``earlier`` [b, hk, D, d + 1]: [S ; z] of tokens before these keys, seen by every query (decoding).
    """
    if key_padding_mask is not None:
        k_features = k_features * rearrange(key_padding_mask, "b m -> b 1 m 1").to(k_features.dtype)
    grouped = rearrange(q_features, "b (hk g) n D -> b hk g n D", hk=k_features.shape[1])
    if causal:
        out = causal_kernel_attention(grouped, k_features, v, eps, chunk, earlier)
    else:
        state = einsum(k_features, v, "b hk m D, b hk m d -> b hk D d")  # S
        normaliser = k_features.sum(dim=-2)  # z [b, hk, D]
        if earlier is not None:
            state, normaliser = state + earlier[..., :-1], normaliser + earlier[..., -1]
        numerator = einsum(grouped, state, "b hk g n D, b hk D d -> b hk g n d")
        denominator = einsum(grouped, normaliser, "b hk g n D, b hk D -> b hk g n")
        out = safe_divide(numerator, denominator[..., None] + eps)
    return rearrange(out, "b hk g n d -> b (hk g) n d")


def causal_kernel_attention(q_features, k_features, v, eps: float, chunk: int, earlier=None) -> torch.Tensor:
    """The causal case of ``kernel_attention`` by prefix sums over chunks, in O(n) memory.

    q_features [b, hk, g, n, D], k_features [b, hk, m, D], v [b, hk, m, d] -> [b, hk, g, n, d].
    Within a chunk of ``chunk`` positions the masked [chunk, chunk] products; across chunks the
    sums S and z of every earlier chunk (an exclusive prefix sum over chunks). Memory
    O(n (chunk + D d / chunk)): neither [n, m] scores nor one D x d state per position.
    """
    n, m = q_features.shape[-2], k_features.shape[-2]
    if m < n:  # bottom-right alignment: the first n - m queries see no key
        unseen = q_features.new_zeros(*q_features.shape[:-2], n - m, v.shape[-1])
        seen = causal_kernel_attention(q_features[..., n - m :, :], k_features, v, eps, chunk, earlier)
        return torch.cat([unseen, seen], dim=-2)
    # Keys before the first query's position (a KV cache's older tokens) are seen by every query.
    seen_by_all_state = einsum(k_features[..., : m - n, :], v[..., : m - n, :], "b hk m D, b hk m d -> b hk D d")
    seen_by_all_normaliser = k_features[..., : m - n, :].sum(dim=-2)  # [b, hk, D]
    if earlier is not None:  # [S ; z] of the tokens before these keys
        seen_by_all_state = seen_by_all_state + earlier[..., :-1]
        seen_by_all_normaliser = seen_by_all_normaliser + earlier[..., -1]
    k_features, v = k_features[..., m - n :, :], v[..., m - n :, :]  # now query i sees keys j <= i

    chunk = min(chunk, n)
    pad = -n % chunk  # zero rows at the end: zero features add nothing, their outputs are dropped
    q = torch.nn.functional.pad(q_features, (0, 0, 0, pad))
    k = torch.nn.functional.pad(k_features, (0, 0, 0, pad))
    v = torch.nn.functional.pad(v, (0, 0, 0, pad))
    q = rearrange(q, "b hk g (c t) D -> b hk g c t D", t=chunk)
    k = rearrange(k, "b hk (c t) D -> b hk c t D", t=chunk)
    v = rearrange(v, "b hk (c t) d -> b hk c t d", t=chunk)

    chunk_state = einsum(k, v, "b hk c t D, b hk c t d -> b hk c D d")
    chunk_normaliser = k.sum(dim=-2)  # [b, hk, c, D]
    earlier_state = exclusive_cumsum(chunk_state, dim=2) + seen_by_all_state[:, :, None]
    earlier_normaliser = exclusive_cumsum(chunk_normaliser, dim=2) + seen_by_all_normaliser[:, :, None]

    within = einsum(q, k, "b hk g c t D, b hk c s D -> b hk g c t s")  # phi(q_t) . phi(k_s)
    within = within * torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()  # s <= t
    numerator = einsum(within, v, "b hk g c t s, b hk c s d -> b hk g c t d") + einsum(
        q, earlier_state, "b hk g c t D, b hk c D d -> b hk g c t d"
    )
    denominator = within.sum(dim=-1) + einsum(q, earlier_normaliser, "b hk g c t D, b hk c D -> b hk g c t")
    out = safe_divide(numerator, denominator[..., None] + eps)
    return rearrange(out, "b hk g c t d -> b hk g (c t) d")[..., :n, :]


def exclusive_cumsum(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of the entries before each index along ``dim`` (the first is zero)."""
    total = t.cumsum(dim)
    return torch.cat([torch.zeros_like(total.narrow(dim, 0, 1)), total.narrow(dim, 0, t.shape[dim] - 1)], dim=dim)


def safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, and 0 where the denominator is 0 (a query that sees no key: its
    numerator is 0 too)."""
    return numerator / torch.where(denominator == 0, 1.0, denominator)
