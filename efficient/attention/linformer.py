"""``linformer``: keys and values projected along the sequence axis (Wang et al. 2020).

    head_i = softmax(Q_i (E_i K_i)^T / sqrt(d)) (F_i V_i),   E_i, F_i in R^{k x n}

so attention costs O(n k) instead of O(n^2). Sharing of the projections (paper, section 4):

    none       E_i, F_i per head and per layer          (12 layers x 12 heads: 288 matrices)
    headwise   one E and one F per layer, for all heads (24)
    kv         one E = F per layer                      (12)
    layerwise  one E = F for the whole model            (1)

The projection length is fixed at construction (``max_len``, from the run's ``seq_len`` by
default). Shorter inputs use the first columns of E and F (as if the missing positions were
padding); longer inputs are refused. Padded keys and values are zeroed before projecting, so
padding never changes the outputs of real tokens. Linformer cannot be causal: E mixes all
positions, the future included. Cross-attention projects the context.

Choices against the references (the paper writes E_i K W_i^K, with no bias; public code differs):

- Where E applies. Here E and F act on the keys and values, after the key and value maps,
  which have a bias: K' = E (X W_K + 1 b_K^T), so the bias arrives scaled by the row sums of E.
  lucidrains' ``linformer`` and LRA's Linformer also project after the maps, but their maps have
  no bias, so for them the order does not matter. fairseq's ``MultiheadLinearAttention``
  compresses the layer input first and maps afterwards, K' = (E X) W_K + 1 b_K^T: with a bias
  the two differ by ((E 1) - 1) b_K^T, and fairseq's order is cheaper (the maps run on k rows).
- What ``kv`` ties. Here, as in the paper, ``kv`` makes F = E and keeps separate key and value
  maps W_K, W_V; fairseq's ``shared_kv_compressed`` and LRA (one kernel per layer for keys and
  values) do the same. lucidrains' ``share_kv=True`` ties more: it also drops the value map and
  reuses the keys as values (W_V = W_K), a smaller model than the paper's key-value sharing.
- Heads. ``headwise`` (the default) gives all heads of a layer one E and one F; lucidrains,
  fairseq (by default, separate E and F) and LRA (one E = F) share across heads the same way.
  ``none`` (a pair per head, the paper's general form) is in none of the three.
- Padding. Padded keys and values are zeroed before E mixes them; LRA, fairseq's self-attention
  path and lucidrains do not mask before projecting (lucidrains accepts only inputs of exactly
  its seq_len). Shorter inputs use the first columns of E, as fairseq and LRA slice theirs.
- Initialisation: Xavier-uniform with gain 1/sqrt(2) per [k, max_len] matrix (fairseq's);
  LRA uses Xavier-uniform with gain 1, lucidrains uniform in +-1/sqrt(k).
"""

from __future__ import annotations

import enum
import math
from typing import Optional

import torch
from einops import einsum
from torch import nn

from efficient.attention.base import Capabilities, ProjectedAttention, Setting, Shape, Unsupported, as_value, register
from efficient.attention.functional import exact_attention
from efficient.bounds import Bound


class Share(enum.Enum):
    none = "none"
    headwise = "headwise"
    kv = "kv"
    layerwise = "layerwise"


def new_projection(heads: int, k: int, max_len: int) -> nn.Parameter:
    """[heads, k, max_len], Xavier-uniform with gain 1/sqrt(2) (fairseq's Linformer init)."""
    weight = torch.empty(heads, k, max_len)
    for h in range(heads):
        nn.init.xavier_uniform_(weight[h], gain=1 / math.sqrt(2))
    return nn.Parameter(weight)


@register
class LinformerAttention(ProjectedAttention):
    name = "linformer"
    capabilities = Capabilities(causal=False, needs_max_len=True, exact=False, grouped_query=False, kv_cache=False)
    option_bounds = {"k": Bound(1), "max_len": Bound(1)}

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float = 0.0,
        n_kv_heads: Optional[int] = None,
        *,
        k: int = 256,
        share: Share = Share.headwise,
        max_len: Optional[int] = None,
    ):
        super().__init__(d_model, n_heads, dropout, n_kv_heads)
        if max_len is None:
            raise ValueError("linformer needs max_len (the longest sequence) at construction")
        if k < 1 or k > max_len:
            raise ValueError(f"linformer needs 1 <= k <= max_len, got k={k}, max_len={max_len}")
        self.k, self.share, self.max_len = k, as_value(share), max_len
        heads = n_heads if self.share == "none" else 1
        self.E = new_projection(heads, k, max_len)  # [heads, k, max_len]
        self.F = self.E if self.share in ("kv", "layerwise") else new_projection(heads, k, max_len)

    @classmethod
    def unsupported_reason(cls, setting: Setting, k: int = 256, max_len: Optional[int] = None, **options) -> str | None:
        """The capability check, then the lengths: k <= max_len (default: the cell's length)."""
        if reason := super().unsupported_reason(setting):
            return reason
        longest = max_len if max_len is not None else setting.seq_len
        if longest is not None and k > longest:
            return (
                f"linformer's k={k} exceeds the {longest} positions it projects from (k <= max_len, "
                f"which defaults to seq_len): set attention.k <= {longest} or a longer attention.max_len"
            )
        if max_len is not None and setting.seq_len is not None and setting.seq_len > max_len:
            return f"linformer was built for at most max_len={max_len} tokens, not seq_len={setting.seq_len}"
        return None

    @classmethod
    def layer_factory(
        cls, d_model: int, n_heads: int, dropout: float = 0.0, n_kv_heads: Optional[int] = None, **options
    ):
        """Layers of one model; with share=layerwise every layer holds the same E = F."""
        if as_value(options.get("share", Share.headwise)) != "layerwise":
            return super().layer_factory(d_model, n_heads, dropout, n_kv_heads, **options)
        shared: list[nn.Parameter] = []

        def make(layer: int) -> LinformerAttention:
            attention = cls(d_model, n_heads, dropout, n_kv_heads, **options)
            if shared:
                attention.E = attention.F = shared[0]
            else:
                shared.append(attention.E)
            return attention

        return make

    def project(self, t: torch.Tensor, projection: nn.Parameter, key_padding_mask) -> torch.Tensor:
        """t [b, h, m, d] -> [b, h, k, d] along the sequence axis (padded rows zeroed first)."""
        m = t.shape[-2]
        if m > self.max_len:
            raise Unsupported(f"linformer was built for at most {self.max_len} tokens, got {m} (set attention.max_len)")
        if key_padding_mask is not None:
            t = t * key_padding_mask[:, None, :, None].to(t.dtype)
        return einsum(projection[:, :, :m].to(t.dtype), t, "h k m, b h m d -> b h k d")

    def attend(self, q, k, v, key_padding_mask, causal):
        if causal:
            raise Unsupported("linformer cannot be causal: its projection mixes future positions into every key")
        k_low = self.project(k, self.E, key_padding_mask)  # [b, h, k, d]
        v_low = self.project(v, self.F, key_padding_mask)
        return exact_attention(q, k_low, v_low, dropout_p=self.dropout_p)  # [b, h, n, d]

    def reference_attend(self, q, k, v, key_padding_mask, causal):
        """Exact attention on the unprojected keys: max_abs_err is Linformer's approximation error."""
        return exact_attention(q, k, v, key_padding_mask, causal, query_block=256)

    @classmethod
    def flops(cls, shape: Shape, k: int = 256, **options) -> float:
        # E K and F V: 2 * 2*B*H*k*m*D; softmax(Q K'^T) V': 4*B*H*n*k*D.
        projections = 4.0 * shape.batch * shape.n_heads * k * shape.k_len * shape.head_dim
        return projections + 4.0 * shape.batch * shape.n_heads * shape.q_len * k * shape.head_dim

    @classmethod
    def memory_bytes(cls, shape: Shape, training: bool, k: int = 256, **options) -> float:
        # Scores and probabilities [b, h, n, k] in float32, projected keys and values, output.
        scores = shape.batch * shape.n_heads * shape.q_len * k * 4
        return scores * (5 if training else 3) + super().memory_bytes(shape, training)
