"""``xl``: Transformer-XL attention (Dai et al. 2019): relative positions, segment recurrence.

For a segment x of n tokens and a memory of m earlier positions (klen = m + n keys):

    h~      = [SG(memory) ; x]                         keys and values see the memory
    q, k, v = x W_q,  h~ W_k,  h~ W_v                  (per head)
    AC_ij   = (q_i + u) . k_j                          content term, u learned
    BD_ij   = (q_i + v) . W_R R_{i+m-j}                position term, v learned,
                                                       R the sinusoid of the relative distance
    score   = (AC + BD) / sqrt(d_head),  masked,  softmax over j,  times v_j

Names follow the paper and kimiyoung/transformer-xl (AC, BD, u = r_w_bias, v = r_r_bias,
mem_len, clamp_len, same_length). The distance i + m - j is clamped to ``clamp_len`` before
the sinusoid; R has sin and cos halves concatenated; positions are computed in float32.

BD is computed for the distances klen-1 .. 0 and moved into place with the rel-shift trick:
exact on and below the diagonal, garbage above it, which only the causal mask hides. So the
causal path uses the shift, and a non-causal use (an encoder over the segment, mem_len = 0
or a labelled streaming encoder) gathers the relative logits of future keys explicitly.
``reference_mode`` gathers in every case: the direct computation the shift is checked against.

Memory (``state``): the layer's input for the last ``mem_len`` positions, detached, empty
(None) at the first segment; pass ``state=None`` to reset. ``same_length``: every query sees
exactly ``mem_len`` keys (a sliding window). ``eval_mem_len``: the memory a stream evaluator
gives the layer (``efficient.recurrence``); None keeps ``mem_len``.

Pre-LN (``norm``): the block hands its LayerNorm to the layer, the memory keeps the block's
input h (not LN(h)), and the layer normalises [memory ; segment] on every call, as the
reference does with ``pre_lnorm``: the memory is normalised with the current LayerNorm weights,
and their gradient flows through the memory's keys and values too.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from einops import einsum, rearrange
from torch import nn

from efficient.attention.base import Attention, Capabilities, Shape, Unsupported, register
from efficient.bounds import Bound


def relative_sinusoid(distances: torch.Tensor, dim: int, clamp_len: int) -> torch.Tensor:
    """[p] relative distances -> [p, dim]: [sin | cos] halves, distances clamped to clamp_len."""
    if clamp_len > 0:
        distances = distances.clamp(min=-clamp_len, max=clamp_len)
    inv_freq = 1.0 / (10000 ** (torch.arange(0.0, dim, 2.0, device=distances.device) / dim))
    angles = distances.float()[:, None] * inv_freq[None, :]  # float32 whatever the model dtype
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """[..., n, klen] logits over distances klen-1..0 -> logits over keys j (row i shifted by n-1-i).

    Exact where j <= i + klen - n; above that, values that belong to other rows: mask them.
    """
    *batch, n, klen = x.shape
    padded = torch.cat([x.new_zeros(*batch, n, 1), x], dim=-1)  # [..., n, klen + 1]
    padded = padded.view(*batch, klen + 1, n)
    return padded[..., 1:, :].reshape(*batch, n, klen)


def relative_index(n: int, klen: int, device) -> torch.Tensor:
    """[n, klen] index into distances (klen-1, ..., -(n-1)) of query i (at i + klen - n) and key j."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(klen, device=device)[None, :]
    return (n - 1 - i) + j  # distance (i + klen - n) - j sits at position klen - 1 - distance


@register
class XLAttention(Attention):
    name = "xl"
    # Its memory is its cache (the paper's evaluation mode): it decodes with state=memory, not a KVCache.
    capabilities = Capabilities(
        cross_attention=False, stateful=True, exact=False, relative_positions=True, grouped_query=False, kv_cache=False
    )
    option_bounds = {"mem_len": Bound(0), "clamp_len": Bound(-1), "eval_mem_len": Bound(0)}

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float = 0.0,
        n_kv_heads: Optional[int] = None,
        *,
        mem_len: int = 0,
        clamp_len: int = -1,
        same_length: bool = False,
        untie_r: bool = False,
        eval_mem_len: Optional[int] = None,
    ):
        super().__init__(d_model, n_heads, dropout, n_kv_heads)
        for name, length in (("mem_len", mem_len), ("eval_mem_len", eval_mem_len)):
            if length is not None and length < 0:
                raise ValueError(f"xl: {name} must be >= 0, got {length}")
            if same_length and length == 0:
                raise ValueError(f"xl: same_length needs {name} > 0 (a window of {name} keys), got 0")
        self.mem_len, self.clamp_len, self.same_length, self.untie_r = mem_len, clamp_len, same_length, untie_r
        self.eval_mem_len = eval_mem_len
        self.keep_probs, self.last_probs = False, None  # keep_probs: last_probs [b, h, n, klen]
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.kv_proj = nn.Linear(d_model, 2 * d_model, bias=False)
        self.r_net = nn.Linear(d_model, d_model, bias=False)  # W_R
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.u = nn.Parameter(torch.zeros(n_heads, self.head_dim))  # r_w_bias
        self.v = nn.Parameter(torch.zeros(n_heads, self.head_dim))  # r_r_bias
        nn.init.normal_(self.u, std=0.02)
        nn.init.normal_(self.v, std=0.02)

    @classmethod
    def layer_factory(
        cls, d_model: int, n_heads: int, dropout: float = 0.0, n_kv_heads: Optional[int] = None, **options
    ):
        """Layers of one model share u and v (the paper's default) unless untie_r."""
        if options.get("untie_r", False):
            return super().layer_factory(d_model, n_heads, dropout, n_kv_heads, **options)
        shared: list[nn.Module] = []

        def make(layer: int) -> XLAttention:
            attention = cls(d_model, n_heads, dropout, n_kv_heads, **options)
            if shared:
                attention.u, attention.v = shared[0].u, shared[0].v
            else:
                shared.append(attention)
            return attention

        return make

    def example_state(self, batch: int, device, dtype):
        """A full memory of mem_len positions (what a segment step in steady state sees)."""
        if self.mem_len == 0:
            return None
        return torch.randn(batch, self.mem_len, self.d_model, device=device, dtype=dtype)

    def forward(self, x, context=None, key_padding_mask=None, causal=False, state=None, norm=None):
        """x [b, n, d]; state: memory [b, m, d] or None -> (y [b, n, d], new memory or None).

        norm: the pre-LN block's LayerNorm, applied here to [memory ; x] (x and the memory
        are then un-normalised block inputs); None: x is used as it comes (post-LN).
        """
        if context is not None:
            raise Unsupported("xl attends over its own segment and memory; it has no cross-attention")
        if not self.reference_mode:
            self.check_call(x, None, key_padding_mask, causal)
        if not causal and state is not None:
            raise Unsupported("xl without causal runs over one segment (mem_len=0): a memory needs causal=true")
        if causal and self.same_length and self.mem_len <= 0:  # a window of no keys: zeros, silently
            raise ValueError(f"xl: same_length needs mem_len > 0 (a window of mem_len keys), got {self.mem_len}")
        b, n, _ = x.shape
        memory = state if state is not None else x.new_zeros(b, 0, self.d_model)
        m = memory.shape[1]
        h = torch.cat([memory.to(x.dtype), x], dim=1)  # [b, klen, d]: what the next memory keeps
        klen = m + n
        h_in = h if norm is None else norm(h)  # pre-LN: LN([memory ; x]) with today's weights
        q = rearrange(self.q_proj(h_in[:, m:]), "b n (h d) -> b h n d", h=self.n_heads)
        k, v = rearrange(self.kv_proj(h_in), "b m (two h d) -> two b h m d", two=2, h=self.n_heads)
        compute = torch.promote_types(x.dtype, torch.float32)

        ac = einsum((q + self.u[:, None]).to(compute), k.to(compute), "b h i d, b h j d -> b h i j")
        gather = self.reference_mode or not causal
        bd = self.position_logits(q, n, klen, gather).to(compute)  # [b, h, n, klen]
        scores = (ac + bd) * (1.0 / math.sqrt(self.head_dim))

        visible = self.visible(n, klen, m, key_padding_mask, causal, x.device)
        if visible is not None:
            scores = scores.masked_fill(~visible, torch.finfo(compute).min)
        probs = scores.softmax(dim=-1)
        if visible is not None:
            probs = probs * visible.any(dim=-1, keepdim=True)  # rows that see no key -> 0
        if self.keep_probs:  # for inspection (bench.recall_probe): where each head looks
            self.last_probs = probs.detach()
        if self.training and self.dropout > 0:
            probs = nn.functional.dropout(probs, self.dropout)
        out = einsum(probs.to(v.dtype), v, "b h i j, b h j d -> b h i d")
        y = self.out_proj(rearrange(out, "b h n d -> b n (h d)"))
        return y, self.next_memory(h)

    def position_logits(self, q, n: int, klen: int, gather: bool) -> torch.Tensor:
        """BD [b, h, n, klen] = (q_i + v) . W_R R_{i + klen - n - j}."""
        if gather:  # every distance a query meets, future ones included, placed by index
            distances = torch.arange(klen - 1, -n, -1, device=q.device)  # klen-1 .. -(n-1)
        else:  # the shift trick: distances klen-1 .. 0 only
            distances = torch.arange(klen - 1, -1, -1, device=q.device)
        r = self.r_net(relative_sinusoid(distances, self.d_model, self.clamp_len).to(q.dtype))
        r = rearrange(r, "p (h d) -> h p d", h=self.n_heads)
        logits = einsum(q + self.v[:, None], r, "b h i d, h p d -> b h i p")
        if not gather:
            return rel_shift(logits)
        index = relative_index(n, klen, q.device).expand(*logits.shape[:2], n, klen)
        return logits.gather(-1, index)

    def visible(self, n, klen, m, key_padding_mask, causal, device):
        """Bool [b or 1, 1, n, klen]: query i (at position m + i) may attend key j."""
        mask = None
        if causal:
            i = torch.arange(n, device=device)[:, None] + m
            j = torch.arange(klen, device=device)[None, :]
            mask = j <= i
            if self.same_length:  # exactly mem_len keys: (i - mem_len, i]
                mask = mask & (j > i - self.mem_len)
            mask = mask[None, None]
        if key_padding_mask is not None:  # [b, n] for the segment; memory positions are real
            real = torch.cat([key_padding_mask.new_ones(key_padding_mask.shape[0], klen - n), key_padding_mask], 1)
            real = real[:, None, None, :].bool()
            mask = real if mask is None else mask & real
        return mask

    def next_memory(self, h: torch.Tensor):
        """The last mem_len positions of [memory ; segment], detached: no gradient into the past."""
        if self.mem_len == 0:
            return None
        return h[:, -self.mem_len :].detach()

    @classmethod
    def flops(cls, shape: Shape, **options) -> float:
        """Forward FLOPs of the core: the matmuls ``forward`` runs beyond the four projections.

        ``shape.k_len`` is the key length klen: the memory plus the segment. Per head and batch,
        with P the relative distances the position term is computed for:
            AC (q+u) k^T      2 n klen D
            BD (q+v) (W_R R)^T 2 n P D     causal: P = klen (distances klen-1..0, then shifted);
                                          not causal: P = klen + n - 1 (future keys too, gathered)
            probs . v         2 n klen D
        plus W_R R, 2 P d_model^2 (once, shared by the batch). Causal: the n x klen products are
        counted on their visible share only (FlashAttention's convention, as for every backend),
        although xl computes them whole; a FLOP counter sees the masked share too.
        """
        n, klen = shape.q_len, shape.k_len
        per_key = 2.0 * shape.batch * shape.n_heads * n * shape.head_dim
        if shape.causal:
            visible = (klen - n + (n + 1) / 2) / klen
            core, positions = 3 * per_key * klen * visible, klen
        else:
            positions = klen + n - 1
            core = per_key * (2 * klen + positions)
        return core + 2.0 * positions * shape.d_model * shape.d_model  # + W_R R

    @classmethod
    def memory_bytes(cls, shape: Shape, training: bool, **options) -> float:
        # AC, BD, their sum and the probabilities, [b, h, n, klen] in float32.
        scores = shape.batch * shape.n_heads * shape.q_len * shape.k_len * 4
        return scores * (7 if training else 5) + super().memory_bytes(shape, training)
