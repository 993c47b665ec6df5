"""``reformer``: LSH attention with shared queries and keys (Kitaev et al. 2020, Reformer).

Queries and keys are one projection x W_qk; a key is its query length-normalised,
k = q / (rms(q) sqrt(d)), and the scores are q . k (no further 1 / sqrt(d)). Per hash round, each
position is hashed by a random rotation R [d, buckets / 2]: its bucket is the argmax of
[q R ; -q R] (or, for many buckets, a product of such hashes: see ``bucket_factors``). The
positions of every round are sorted by (round, bucket, position) into one sequence of
``rounds x n`` tickets, cut into chunks of ``chunk``; each ticket attends to the
tickets of its own chunk and of the chunk before (the first chunk's "before" is the last, as in
the reference code). A query sees its own position only when nothing else is visible (score
-1e5) and padded keys are masked (-1e9). Each round gives an output and a
log-sum-exp per position; the rounds are combined with weights softmax(lse over rounds).
O(n rounds chunk) time and memory.

Against Hugging Face's ``LSHSelfAttention`` (transformers 4.46, the trax algorithm; compared in
float64 given the same rotations, docs/fidelity.md): the same hashing, sort, chunks,
look-one-back, masks and combination of rounds. Differences:

- Rotations are drawn once per layer and bucket count from ``seed + layer``; Hugging Face (and
  trax) draw new ones at every forward unless a hash seed is set.
- Lengths the chunk does not divide are padded at the end with masked keys (in their own
  bucket, as Hugging Face buckets padding); Hugging Face needs n divisible by the chunk.
- ``buckets=null`` takes Hugging Face's rule, the largest power of two <= 2 n / chunk, split
  into two factors above 2 max(sqrt(n / chunk), chunk) buckets, as Hugging Face splits it above
  2 max(sqrt(max_position_embeddings / chunk), chunk): the limit is taken from the length here,
  since the suite has no maximum length. Unsplit, the hash would cost O(n^2 / chunk) time and
  memory (2,048 buckets at 64K tokens).
- The queries and values have biases (the suite's projections); Reformer's have none. The
  reversible layers and chunked feed-forward of the Reformer model are model choices, not part
  of the attention, and are not here.

With n <= chunk the whole sequence is one chunk, and the attention is the exact shared-QK
attention (as in Hugging Face): the reference that ``max_abs_err`` measures the approximation
against, with the same parameters.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from einops import einsum, rearrange

from efficient.attention.base import Capabilities, ProjectedAttention, Shape, register
from efficient.bounds import Bound

MASKED = -1e9  # Hugging Face's float32 mask value; its own position: SELF
SELF = -1e5


def shared_keys(q: torch.Tensor) -> torch.Tensor:
    """k = q / (rms(q) sqrt(d)): the length-normalised queries (eps 1e-6 inside the rms)."""
    return q * torch.rsqrt(q.square().mean(dim=-1, keepdim=True) + 1e-6) / math.sqrt(q.shape[-1])


def default_buckets(length: int, chunk: int) -> int:
    """Hugging Face's rule: the largest power of two <= 2 length / chunk (at least 2)."""
    return max(2, 2 ** ((2 * (length // chunk)).bit_length() - 1))


def bucket_factors(length: int, chunk: int, buckets: Optional[int] = None) -> tuple[int, ...]:
    """The hash's factors: bucket = h_1 + f_1 h_2 with h_i the argmax over [x R_i ; -x R_i] and
    R_i [d, f_i / 2], so that f_1 f_2 buckets need a rotation of (f_1 + f_2) / 2 columns, not
    f_1 f_2 / 2. An explicit ``buckets`` is one hash; by default Hugging Face's rule splits a
    power of two 2^p above 2 max(sqrt(length / chunk), chunk) into 2^(p // 2) x 2^(p - p // 2)."""
    if buckets is not None:
        return (buckets,)
    total = default_buckets(length, chunk)
    if total <= 2 * max(math.isqrt(length // chunk), chunk):
        return (total,)
    p = total.bit_length() - 1
    return 2 ** (p // 2), 2 ** (p - p // 2)


@register
class ReformerAttention(ProjectedAttention):
    name = "reformer"
    capabilities = Capabilities(causal=False, cross_attention=False, exact=False, grouped_query=False, kv_cache=False)
    option_bounds = {"chunk": Bound(1), "rounds": Bound(1), "buckets": Bound(2)}

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float = 0.0,
        n_kv_heads: Optional[int] = None,
        *,
        chunk: int = 64,
        rounds: int = 2,
        buckets: Optional[int] = None,
        seed: int = 0,
    ):
        super().__init__(d_model, n_heads, dropout, n_kv_heads)
        if buckets is not None and buckets % 2:
            raise ValueError(f"reformer's buckets are the argmax over [x R ; -x R]: an even number, got {buckets}")
        self.chunk, self.rounds, self.buckets, self.seed = chunk, rounds, buckets, seed
        self.v_proj = torch.nn.Linear(d_model, d_model)  # the keys are the queries: no key projection
        del self.kv_proj
        self.rotations: dict[tuple[int, ...], torch.Tensor] = {}  # factors -> [h, d, rounds, sum(factors) / 2]

    @classmethod
    def unsupported_reason(cls, setting, **options):
        if setting.causal:
            return (
                "reformer is not causal here: its causal mask hides later keys, but which earlier keys share a "
                "query's chunk depends on the later tokens' buckets (they take ticket slots in the sorted "
                "order), so changing a future token changes past outputs"
            )
        return super().unsupported_reason(setting, **options)

    @classmethod
    def layer_factory(
        cls, d_model: int, n_heads: int, dropout: float = 0.0, n_kv_heads: Optional[int] = None, **options
    ):
        """Layers of one model, each with its own rotations (layer i: seed + i)."""
        seed = options.pop("seed", 0)
        return lambda layer: cls(d_model, n_heads, dropout, n_kv_heads, seed=seed + layer, **options)

    def forward(self, x, context=None, key_padding_mask=None, causal=False, state=None):
        if not self.reference_mode:
            self.check_call(x, context, key_padding_mask, causal, kv_cache=state is not None)
        q = rearrange(self.q_proj(x), "b n (h d) -> b h n d", h=self.n_heads)
        v = rearrange(self.v_proj(x), "b n (h d) -> b h n d", h=self.n_heads)
        if self.reference_mode or x.shape[1] <= self.chunk:
            o = shared_qk_attention(q, v, key_padding_mask, causal, 0.0 if self.reference_mode else self.dropout_p)
        else:
            o = self.attend(q, q, v, key_padding_mask, causal)
        return self.out_proj(rearrange(o, "b h n d -> b n (h d)")), state

    def rotation(self, factors: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """[h, d, rounds, sum(factors) / 2], drawn once per layer and factors, as Hugging Face draws
        one for all factors (from ``seed``, in float64 on the CPU)."""
        if factors not in self.rotations:
            generator = torch.Generator().manual_seed(self.seed)
            shape = (self.n_heads, self.head_dim, self.rounds, sum(factors) // 2)
            self.rotations[factors] = torch.randn(shape, generator=generator, dtype=torch.float64)
        return self.rotations[factors].to(device=like.device, dtype=like.dtype)

    def hash(self, q: torch.Tensor, factors: tuple[int, ...]) -> torch.Tensor:
        """q [b, h, N, d] -> buckets [b, h, rounds, N] in [0, prod(factors))."""
        rotated = einsum(q.detach(), self.rotation(factors, q), "b h n d, h d r k -> b h r n k")
        bucket, product = 0, 1
        for part in rotated.split([f // 2 for f in factors], dim=-1):
            bucket = bucket + product * torch.cat([part, -part], dim=-1).argmax(dim=-1)
            product *= part.shape[-1] * 2
        return bucket

    def attend(self, q, k, v, key_padding_mask, causal):
        """q, k, v [b, h, n, d] -> [b, h, n, d]; ``forward`` passes k = q (shared QK): the keys are
        ``shared_keys(k)``, and the hash is q's."""
        b, h, n, d = q.shape
        size, rounds = self.chunk, self.rounds
        padded = math.ceil(n / size) * size
        real = (
            torch.ones(b, n, dtype=torch.bool, device=q.device)
            if key_padding_mask is None
            else key_padding_mask.to(torch.bool)
        )
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, padded - n)) for t in (q, k, v))
        real = torch.nn.functional.pad(real, (0, padded - n), value=False)  # [b, N]
        factors = bucket_factors(padded, size, self.buckets)
        buckets = math.prod(factors)

        # hash: [b, h, rounds, N] buckets, padding in bucket `buckets`, each round offset by buckets + 1
        bucket = self.hash(q, factors).masked_fill(~real[:, None, None, :], buckets)
        bucket = bucket + (buckets + 1) * torch.arange(rounds, device=q.device)[:, None]
        order = rearrange(bucket, "b h r n -> b h (r n)").argsort(dim=-1, stable=True)  # [b, h, rounds N]
        position = order % padded  # each ticket's position

        def gather(t):  # [b, h, N, d] -> the tickets' rows in sorted order, [b, h, chunks, size, d]
            rows = t.gather(2, position[..., None].expand(-1, -1, -1, d))
            return rearrange(rows, "b h (c s) d -> b h c s d", s=size)

        def with_chunk_before(t):  # [b, h, c, s, ...] -> [b, h, c, 2 s, ...]: the chunk before, then its own
            return torch.cat([t.roll(1, dims=2), t], dim=3)

        queries, keys, values = gather(q), with_chunk_before(gather(shared_keys(k))), with_chunk_before(gather(v))
        query_position = rearrange(position, "b h (c s) -> b h c s", s=size)
        key_position = with_chunk_before(query_position)  # [b, h, c, 2 s]
        scores = einsum(queries, keys, "b h c s d, b h c k d -> b h c s k")
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        visible = real.gather(1, rearrange(key_position, "b h c k -> b (h c k)")).view(key_position.shape)[..., None, :]
        if causal:
            visible = visible & (key_position[..., None, :] <= query_position[..., None])
        scores = scores.masked_fill(~visible, MASKED)
        scores = scores.masked_fill(key_position[..., None, :] == query_position[..., None], SELF)
        lse = scores.logsumexp(dim=-1, keepdim=True)  # [b, h, c, s, 1]
        probs = torch.nn.functional.dropout((scores - lse).exp(), self.dropout_p)
        out = einsum(probs.to(values.dtype), values, "b h c s k, b h c k d -> b h c s d")

        # back to positions: [b, h, rounds, N, d], combined with weights softmax(lse) over the rounds
        undo = order.argsort(dim=-1)
        out = rearrange(out, "b h c s d -> b h (c s) d").gather(2, undo[..., None].expand(-1, -1, -1, d))
        lse = rearrange(lse, "b h c s 1 -> b h (c s)").gather(2, undo)
        out, lse = (
            rearrange(out, "b h (r n) d -> b h r n d", r=rounds),
            rearrange(lse, "b h (r n) -> b h r n", r=rounds),
        )
        weights = lse.softmax(dim=2)[..., None].to(out.dtype)
        return (out * weights).sum(dim=2)[:, :, :n]

    # -- cost models ---------------------------------------------------------------------------
    @classmethod
    def flops(cls, shape: Shape, chunk: int = 64, rounds: int = 2, buckets: Optional[int] = None, **options) -> float:
        """Per round, each of the N = n padded to whole chunks tickets scores 2 chunk keys and sums
        their values (4 d per pair; the masked ones too, causal or not), and each position is
        rotated (2 d x the rotation's sum(factors) / 2 columns). With n <= chunk: exact attention,
        4 n^2 d."""
        n, d = shape.q_len, shape.head_dim
        if n <= chunk:
            return 4.0 * shape.batch * shape.n_heads * n * n * d
        tickets = math.ceil(n / chunk) * chunk
        rotation = sum(bucket_factors(tickets, chunk, buckets))
        return shape.batch * shape.n_heads * rounds * (4.0 * tickets * 2 * chunk * d + tickets * d * rotation)

    @classmethod
    def memory_bytes(
        cls, shape: Shape, training: bool, chunk: int = 64, rounds: int = 2, buckets: Optional[int] = None, **options
    ) -> float:
        """Scores and probabilities [rounds N, 2 chunk] in float32 (as ``materialised_memory_bytes``),
        the sorted queries, keys and values with their chunk before and the outputs per round,
        [rounds N, 7 d]; training keeps them for the backward. The hash's rotated queries and
        their [x R ; -x R] (one factor at a time), [rounds N, sum(factors) / 2 + max(factors)].
        With n <= chunk: [n, n] scores."""
        n = shape.q_len
        element = max(shape.bytes_per_element, 4)
        if n <= chunk:
            return shape.batch * shape.n_heads * n * n * 4 * (5 if training else 3) + super().memory_bytes(
                shape, training
            )
        factors = bucket_factors(math.ceil(n / chunk) * chunk, chunk, buckets)
        tickets = shape.batch * shape.n_heads * rounds * math.ceil(n / chunk) * chunk
        scores, rows = tickets * 2 * chunk * 4, tickets * shape.head_dim * element * 7
        hashing = tickets * (sum(factors) // 2 + max(factors)) * element
        return (
            scores * (5 if training else 3)
            + rows * (2 if training else 1)
            + hashing
            + super().memory_bytes(shape, training)
        )


def shared_qk_attention(q, v, key_padding_mask, causal, dropout_p, query_block: int = 256):
    """Reformer's attention over every key, exactly: scores q . shared_keys(q), padded and (causal)
    later keys at -1e9, its own position at -1e5; ``query_block`` query rows at a time, so that
    the float64 reference of a long input holds [query_block, n] scores, not [n, n].
    q, v [b, h, n, d] -> [b, h, n, d]."""
    n = q.shape[-2]
    keys, key_position = shared_keys(q), torch.arange(n, device=q.device)
    outputs = []
    for start in range(0, n, query_block):
        query_position = key_position[start : start + query_block, None]  # [r, 1]
        scores = einsum(q[..., start : start + query_block, :], keys, "b h i d, b h j d -> b h i j")
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        if key_padding_mask is not None:
            scores = scores.masked_fill(~key_padding_mask.to(torch.bool)[:, None, None, :], MASKED)
        if causal:
            scores = scores.masked_fill(key_position > query_position, MASKED)
        scores = scores.masked_fill(key_position == query_position, SELF)
        probs = torch.nn.functional.dropout(scores.softmax(dim=-1), dropout_p)
        outputs.append(einsum(probs.to(v.dtype), v, "b h i j, b h j d -> b h i d"))
    return torch.cat(outputs, dim=-2)
