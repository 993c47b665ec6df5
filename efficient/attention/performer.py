"""``performer``: FAVOR+ (Choromanski et al. 2021, "Rethinking Attention with Performers").

exp(q . k / sqrt(d)) is estimated with positive orthogonal random features: with x' = x / d^(1/4)
and W [m, d] a random projection whose rows are orthogonal in blocks of d,

    phi(x) = (exp(W x' - |x'|^2 / 2 - c) + eps) / sqrt(m)

so that E[phi(q) . phi(k)] is proportional to exp(q . k / sqrt(d)), and attention is the linear
attention of those features (``functional.kernel_attention``), O(n m d) instead of O(n^2 d).

Stabilisers (c) and eps, as in both references: for a query c is the largest of its own m
projections W q' (a constant per row, cancelled by the normalisation); for the keys c is the
largest W k' over every key and feature of the head, a constant shared by all keys (both take the
max before |x'|^2 / 2 is subtracted, and lucidrains detaches it from the gradient, as here).
eps = 1e-6 (Google's ``numerical_stabilizer``; lucidrains' ``softmax_kernel`` uses 1e-4). The
normaliser has no eps; Google's adds 2e-6 to any normaliser below 1e-6, which with the key max
of a long input fires on ordinary rows (about 1% of them on random inputs): not copied. Padded
keys are left out of the key max and get zero features (neither reference masks keys).

Causal: the key max over all positions makes the output at position i depend on later keys
(through the eps terms): in both references' causal paths, changing keys after position 150
moves earlier outputs by about 2. Here each query's key stabiliser is the largest W k' over the
keys it sees, so the output at i equals the bidirectional Performer over keys 0..i: a running
maximum, the prefix sums rescaled when it grows (``causal_favor``).

Random features: ``features`` rows (default 256, Google's ``nb_features``; lucidrains defaults
to d ln d, 266 for d = 64), drawn once from ``seed`` (reproducible across runs and backends),
each block of d rows orthogonal (QR of a Gaussian matrix), each row scaled by the norm of an
independent Gaussian vector (Google's ``scaling=0``). One draw per layer, shared by its heads:
layer i draws from ``seed + i``. A fixed count (not d ln d) keeps the cost of a cell independent
of its head width, as in the authors' code.
``redraw_interval`` > 0 redraws every that many training forwards (lucidrains'
``feature_redraw_interval``); 0 keeps the first draw, which makes runs comparable.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from einops import einsum, rearrange

from efficient.attention.base import Capabilities, ProjectedAttention, Shape, Unsupported, register
from efficient.attention.functional import kernel_attention, safe_divide
from efficient.attention.linear import kernel_attention_flops, kernel_attention_memory_bytes
from efficient.bounds import Bound
from efficient.kv_cache import RunningSums

EPS = 1e-6  # Google's fast_attention (nonnegative_softmax_kernel_feature_creator)


def orthogonal_gaussian_features(features: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """W [features, dim]: blocks of ``dim`` orthonormal rows (Q of a Gaussian matrix's QR), the
    last block truncated, each row then scaled by the norm of its own Gaussian vector, so that
    rows have the lengths of Gaussian rows (the "orthogonal random features" of the paper)."""
    blocks = []
    for _ in range(math.ceil(features / dim)):
        gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        q, _ = torch.linalg.qr(gaussian)
        blocks.append(q.T)  # rows orthonormal
    rows = torch.cat(blocks)[:features]
    norms = torch.randn(features, dim, generator=generator, dtype=torch.float64).norm(dim=1)
    return rows * norms[:, None]


def favor_logits(x: torch.Tensor, projection: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W x' [..., n, m] and |x'|^2 / 2 [..., n, 1], x' = x / d^(1/4), for x [..., n, d]. Both
    references take their stabilisers from W x' alone (the max before |x'|^2 / 2 is subtracted)."""
    scaled = x * x.shape[-1] ** -0.25
    return einsum(scaled, projection.to(x.dtype), "... n d, m d -> ... n m"), scaled.square().sum(-1, keepdim=True) / 2


def query_features(q: torch.Tensor, projection: torch.Tensor, eps: float) -> torch.Tensor:
    """phi(q) [..., n, m] with the query's own stabiliser, the largest of its W q'."""
    projected, half_square = favor_logits(q, projection)
    stabiliser = projected.amax(dim=-1, keepdim=True).detach()
    return projection.shape[0] ** -0.5 * (torch.exp(projected - half_square - stabiliser) + eps)


@register
class PerformerAttention(ProjectedAttention):
    name = "performer"
    capabilities = Capabilities(exact=False, constant_state=True)
    option_bounds = {"features": Bound(1), "redraw_interval": Bound(0), "chunk": Bound(1)}

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float = 0.0,
        n_kv_heads: Optional[int] = None,
        *,
        features: int = 256,
        seed: int = 0,
        redraw_interval: int = 0,
        chunk: int = 64,
    ):
        super().__init__(d_model, n_heads, dropout, n_kv_heads)
        self.features, self.seed, self.redraw_interval, self.chunk = features, seed, redraw_interval, chunk
        self.eps, self.denominator_eps = EPS, 0.0  # in the features; none in the normaliser
        self.generator = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", self.draw())  # W [features, head_dim]
        self.training_calls = 0

    @classmethod
    def layer_factory(
        cls, d_model: int, n_heads: int, dropout: float = 0.0, n_kv_heads: Optional[int] = None, **options
    ):
        """Layers of one model, each with its own draw of random features (layer i: seed + i)."""
        seed = options.pop("seed", 0)
        return lambda layer: cls(d_model, n_heads, dropout, n_kv_heads, seed=seed + layer, **options)

    def draw(self) -> torch.Tensor:
        return orthogonal_gaussian_features(self.features, self.head_dim, self.generator).float()

    def feature_maps(self, q, k, key_padding_mask, causal):
        """phi(q) [b, h, n, m] and phi(k) [b, hk, keys, m], the key stabiliser over every real key
        (the bidirectional features; the causal path rescales its own)."""
        projected, half_square = favor_logits(k, self.projection)  # [b, hk, keys, m], [b, hk, keys, 1]
        real = (
            torch.ones_like(projected[..., :1], dtype=torch.bool)
            if key_padding_mask is None
            else rearrange(key_padding_mask.to(torch.bool), "b m -> b 1 m 1")
        )
        key_max = projected.detach().masked_fill(~real, -torch.inf).amax(dim=(-2, -1), keepdim=True)
        key_max = torch.nan_to_num(key_max, neginf=0.0)  # every key padded: any constant will do
        k_features = self.features**-0.5 * (torch.exp(projected - half_square - key_max) + self.eps)
        return query_features(q, self.projection, self.eps), k_features

    def attend(self, q, k, v, key_padding_mask, causal):
        # q [b, h, n, d], k and v [b, hk, keys, d] -> [b, h, n, d]
        if self.training and self.redraw_interval:
            if self.training_calls and self.training_calls % self.redraw_interval == 0:
                self.projection.copy_(self.draw())
            self.training_calls += 1
        if causal:
            return causal_favor(q, k, v, self.projection, key_padding_mask, self.eps, self.chunk)
        q_features, k_features = self.feature_maps(q, k, key_padding_mask, causal)
        return kernel_attention(q_features, k_features, v, key_padding_mask, eps=self.denominator_eps)

    def empty_decoding_state(self, batch: int, capacity: int, device=None, dtype=None) -> RunningSums:
        """A [b, hk, m, d + 1] relative to the running key max [b, hk], and B = sum_j [v_j ; 1]
        [b, hk, d + 1] for the eps terms: a fixed size, however long the context."""
        state = RunningSums.empty(batch, self.n_kv_heads, self.features, self.head_dim, device, dtype)
        state.extras["key_max"] = torch.full((batch, self.n_kv_heads), -torch.inf, device=device, dtype=dtype)
        state.extras["value_sums"] = torch.zeros(batch, self.n_kv_heads, self.head_dim + 1, device=device, dtype=dtype)
        return state

    @classmethod
    def decoding_state_elements(
        cls, n_kv_heads: int, head_dim: int, length: int, features: int = 256, **options
    ) -> int:
        return n_kv_heads * ((features + 1) * (head_dim + 1) + 1)  # A, B and the key max, whatever the length

    def attend_cached(self, q, k, v, state: RunningSums, key_padding_mask, causal):
        """Decoding: the t new tokens attend causally over the earlier tokens' sums and each other,
        with the running key max of every key seen so far; then they join the sums."""
        if not causal:
            raise Unsupported("performer decodes causally (its state keeps sums, not keys): set causal=true")
        new_mask = None if key_padding_mask is None else key_padding_mask[:, -k.shape[-2] :]  # [b, t]
        return causal_favor(q, k, v, self.projection, new_mask, self.eps, self.chunk, state)

    @classmethod
    def flops(cls, shape: Shape, features: int = 256, chunk: int = 64, **options) -> float:
        # The feature maps W x' for queries and keys (2 x d per feature), then linear attention.
        maps = (
            2.0 * shape.batch * features * shape.head_dim * (shape.n_heads * shape.q_len + shape.kv_heads * shape.k_len)
        )
        return maps + kernel_attention_flops(shape, features, chunk)

    @classmethod
    def memory_bytes(cls, shape: Shape, training: bool, features: int = 256, chunk: int = 64, **options) -> float:
        """Linear attention's, with D = ``features`` feature maps, plus the logits W x' and their
        exponentials, two more [n + m, D], beside the features while they are made (and the
        exponentials kept for the backward). The profiler measured 1.1-1.8x below this in every
        mode (causal or not, training or not); counting every tensor twice had been 1.3-2.5x."""
        logits = (
            2 * shape.batch * shape.n_heads * (shape.q_len + shape.k_len) * features * max(shape.bytes_per_element, 4)
        )
        return kernel_attention_memory_bytes(shape, training, features, chunk) + logits


def causal_favor(
    q, k, v, projection, key_padding_mask, eps: float, chunk: int, state: RunningSums | None = None
) -> torch.Tensor:
    """Causal FAVOR+ where query i's key stabiliser is the running max c_i over the keys it sees.

    q [b, h, n, d], k and v [b, hk, m, d] -> [b, h, n, d]. Key s seen from query i >= s has the
    features (exp(x_s - c_i) + eps) / sqrt(m) = (e_s exp(c_s - c_i) + eps) / sqrt(m), with
    e_s = exp(x_s - c_s) <= 1 and c_s <= c_i: nothing overflows. Within a chunk the [chunk, chunk]
    weights directly; across chunks the sums of earlier keys, rescaled to each chunk's running max
    (a loop over chunks on [D, d + 1] states). The normaliser rides along as a column of ones in v.

    ``state`` (decoding, n = m): the tokens before these, as A, B and their running max; updated.
    """
    n, m = q.shape[-2], k.shape[-2]
    if m < n:  # bottom-right alignment: the first n - m queries see no key
        unseen = q.new_zeros(*q.shape[:-2], n - m, v.shape[-1])
        return torch.cat([unseen, causal_favor(q[..., n - m :, :], k, v, projection, key_padding_mask, eps, chunk)], -2)
    if m > n:  # keys before the first query: give them queries whose outputs are dropped
        q = torch.cat([q.new_zeros(*q.shape[:-2], m - n, q.shape[-1]), q], dim=-2)
    ratio = projection.shape[0] ** -0.5
    q_features = query_features(q, projection, eps)  # [b, h, m, D]
    projected, half_square = favor_logits(k, projection)  # [b, hk, m, D], [b, hk, m, 1]
    ones = torch.ones_like(v[..., :1])
    v = torch.cat([v, ones], dim=-1)  # [b, hk, m, d + 1]: the last column sums the weights
    real = torch.ones_like(projected[..., 0], dtype=torch.bool)
    if key_padding_mask is not None:
        real = real & rearrange(key_padding_mask.to(torch.bool), "b m -> b 1 m")
        v = v * real[..., None].to(v.dtype)  # padded keys add nothing, not even their eps
    row_max = projected.detach().masked_fill(~real[..., None], -torch.inf).amax(dim=-1)  # [b, hk, m]
    running_max = row_max.cummax(dim=-1).values
    earlier_max = None if state is None else state.extras["key_max"]  # [b, hk], -inf before any real key
    if earlier_max is not None:
        running_max = torch.maximum(running_max, earlier_max[..., None])
    running_max = torch.nan_to_num(running_max, neginf=0.0)  # c_s; 0 before any real key
    e = torch.exp(projected - half_square - running_max[..., None]) * real[..., None]  # e_s <= 1 [b, hk, m, D]

    chunk = min(chunk, m)
    pad = -m % chunk
    grouped = rearrange(
        torch.nn.functional.pad(q_features, (0, 0, 0, pad)), "b (hk g) (c t) D -> b hk g c t D", hk=k.shape[1], t=chunk
    )
    e, v = (
        rearrange(torch.nn.functional.pad(t, (0, 0, 0, pad)), "b hk (c t) D -> b hk c t D", t=chunk) for t in (e, v)
    )
    c = (
        torch.nn.functional.pad(running_max, (0, pad), value=-torch.inf).cummax(dim=-1).values
    )  # the tail keeps the last
    c = rearrange(c, "b hk (c t) -> b hk c t", t=chunk)

    # Within a chunk: weight(t, s) = phi(q_t) . (e_s exp(c_s - c_t) + eps) / sqrt(m) for s <= t.
    decay = torch.exp((c[..., None, :] - c[..., :, None]).clamp(max=0.0))  # [b, hk, c, t, s]
    below = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    q_sum = grouped.sum(dim=-1, keepdim=True)  # phi(q_t) . 1 [b, hk, g, c, t, 1]
    weights = (
        ratio
        * (einsum(grouped, e, "b hk g c t D, b hk c s D -> b hk g c t s") * decay[:, :, None] + eps * q_sum)
        * below
    )
    out = einsum(weights, v, "b hk g c t s, b hk c s e -> b hk g c t e")

    # Earlier chunks: A = sum_s e_s exp(c_s - C) v_s with C the running max at the chunk's start,
    # and B = sum_s v_s for the eps terms. Query t adds (phi(q_t) . A exp(C - c_t) + eps phi(q_t).1 B) / sqrt(m).
    # (Where a running max was 0 before any real key, the clamps keep 0 * exp(large) from overflowing.)
    first_start = c[:, :, :1, :1]
    if earlier_max is not None:  # the earlier tokens' sums are relative to their max
        first_start = torch.where(earlier_max.isfinite()[..., None, None], earlier_max[..., None, None], first_start)
    chunk_start_max = torch.cat([first_start, c[:, :, :-1, -1:]], dim=2)  # C [b, hk, c, 1]
    to_chunk_end = torch.exp((c - c[..., -1:]).clamp(max=0.0))  # [b, hk, c, t]
    local = einsum(e * to_chunk_end[..., None], v, "b hk c t D, b hk c t e -> b hk c D e")
    carried = torch.zeros_like(local[:, :, 0]) if state is None else state.sums
    states = []
    for i in range(local.shape[2]):
        states.append(carried)  # relative to the running max before chunk i
        rescale = torch.exp((chunk_start_max[:, :, i, 0] - c[:, :, i, -1]).clamp(max=0.0))
        carried = carried * rescale[..., None, None] + local[:, :, i]
    earlier = torch.stack(states, dim=2)  # [b, hk, c, D, d + 1]
    earlier_values = exclusive_chunk_sums(v)  # B [b, hk, c, d + 1]
    if state is not None:
        earlier_values = earlier_values + state.extras["value_sums"][:, :, None]
        state.sums = carried  # relative to c at the last position: the new running max
        state.extras["key_max"] = torch.maximum(earlier_max, row_max.amax(dim=-1))
        state.extras["value_sums"] = state.extras["value_sums"] + v.sum(dim=(2, 3))
        state.length += m
    from_start = torch.exp(chunk_start_max - c).clamp(max=1.0)  # exp(C - c_t) [b, hk, c, t]
    out = out + ratio * (
        einsum(grouped, earlier, "b hk g c t D, b hk c D e -> b hk g c t e") * from_start[:, :, None, ..., None]
        + eps * q_sum * earlier_values[:, :, None, :, None]
    )
    out = rearrange(out, "b hk g c t e -> b (hk g) (c t) e")[..., :m, :][..., m - n :, :]
    return safe_divide(out[..., :-1], out[..., -1:])


def exclusive_chunk_sums(v: torch.Tensor) -> torch.Tensor:
    """[b, hk, c, t, e] -> the sum over every earlier chunk's positions, [b, hk, c, e]."""
    per_chunk = v.sum(dim=-2)
    total = per_chunk.cumsum(dim=2)
    return torch.cat([torch.zeros_like(total[:, :, :1]), total[:, :, :-1]], dim=2)
