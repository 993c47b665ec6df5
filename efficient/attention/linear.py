"""``linear``: linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

softmax(q_i . k_j) is replaced by the kernel phi(q_i) . phi(k_j), phi(x) = elu(x) + 1, so that

    out_i = phi(q_i)^T sum_j phi(k_j) v_j^T / (phi(q_i)^T sum_j phi(k_j) + eps),   eps = 1e-6

costs O(n d^2) instead of O(n^2 d) (``functional.kernel_attention``). Causal: the sums run over
j <= i (prefix sums, computed chunk by chunk in O(n) memory); decoding is then an RNN whose state
is the two sums (``RunningSums``: d (d + 1) numbers per head, however long the context).

Against the reference (idiap fast-transformers' ``LinearAttention`` and ``CausalLinearAttention``):

- Same feature map, same eps added to the denominator phi(q_i) . z_i, no 1/sqrt(d) scaling
  (phi is not a softmax of scaled scores), padded keys given zero features.
- fast-transformers applies no dropout here (there is no matrix of probabilities to drop): the
  ``dropout`` argument is not used either.
- Its causal product is a CUDA/C++ kernel that walks the positions one by one; here chunks of
  ``chunk`` positions: within a chunk the masked [chunk, chunk] products, across chunks the sums
  of the earlier ones. The same sums, added in another order.
- It supports q_len != k_len only without the causal mask; here causal cross-attention follows the
  suite's bottom-right alignment, so a KV cache's older keys are seen by every new query.
"""

from __future__ import annotations

from typing import Optional

import torch

from efficient.attention.base import Capabilities, ProjectedAttention, Shape, register
from efficient.attention.functional import kernel_attention
from efficient.bounds import Bound
from efficient.kv_cache import RunningSums

EPS = 1e-6  # fast-transformers' default for LinearAttention and CausalLinearAttention


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 > 0, the paper's feature map (its section 3.2)."""
    return torch.nn.functional.elu(x) + 1


@register
class LinearAttention(ProjectedAttention):
    name = "linear"
    capabilities = Capabilities(exact=False, constant_state=True)
    option_bounds = {"chunk": Bound(1)}

    def __init__(
        self, d_model: int, n_heads: int, dropout: float = 0.0, n_kv_heads: Optional[int] = None, *, chunk: int = 64
    ):
        super().__init__(d_model, n_heads, dropout, n_kv_heads)
        self.chunk = chunk  # positions per block of the causal prefix sums
        self.denominator_eps = EPS

    def feature_maps(self, q, k, key_padding_mask, causal):
        """phi(q) [b, h, n, d] and phi(k) [b, hk, m, d]."""
        return elu_feature_map(q), elu_feature_map(k)

    def attend(self, q, k, v, key_padding_mask, causal):
        # q [b, h, n, d], k and v [b, hk, m, d] -> [b, h, n, d]
        q_features, k_features = self.feature_maps(q, k, key_padding_mask, causal)
        return kernel_attention(q_features, k_features, v, key_padding_mask, causal, self.denominator_eps, self.chunk)

    def empty_decoding_state(self, batch: int, capacity: int, device=None, dtype=None) -> RunningSums:
        """S and z, [b, hk, d, d + 1] whatever the number of tokens (``capacity`` is not needed)."""
        return RunningSums.empty(batch, self.n_kv_heads, self.head_dim, self.head_dim, device, dtype)

    def attend_cached(self, q, k, v, state: RunningSums, key_padding_mask, causal):
        """Decoding as an RNN (the paper's section 3.4): the t new tokens attend over the sums of every
        earlier token and, causally, each other; then their phi(k) [v ; 1]^T join the sums."""
        new_mask = None if key_padding_mask is None else key_padding_mask[:, -k.shape[-2] :]  # [b, t]
        q_features, k_features = self.feature_maps(q, k, new_mask, causal)
        out = kernel_attention(
            q_features, k_features, v, new_mask, causal, self.denominator_eps, self.chunk, earlier=state.sums
        )
        state.add(k_features, v, new_mask)
        return out

    @classmethod
    def decoding_state_elements(cls, n_kv_heads: int, head_dim: int, length: int, **options) -> int:
        return n_kv_heads * head_dim * (head_dim + 1)  # [S ; z], whatever the length

    @classmethod
    def flops(cls, shape: Shape, chunk: int = 64, **options) -> float:
        return kernel_attention_flops(shape, shape.head_dim, chunk)

    @classmethod
    def memory_bytes(cls, shape: Shape, training: bool, chunk: int = 64, **options) -> float:
        return kernel_attention_memory_bytes(shape, training, shape.head_dim, chunk)


def kernel_attention_flops(shape: Shape, features: int, chunk: int) -> float:
    """FLOPs of ``kernel_attention`` with D = ``features``: the matrix products it runs.

    Non-causal: S = phi(K)^T V (2 m D d), phi(Q) S (2 n D d) and phi(Q) z (2 n D). Causal, also
    the products within each chunk: [chunk, chunk] scores (2 n chunk D) times V (2 n chunk d).
    """
    b, h, n, m, d, D = shape.batch, shape.n_heads, shape.q_len, shape.k_len, shape.head_dim, features
    f = 2.0 * b * shape.kv_heads * m * D * d + 2.0 * b * h * n * (D * d + D)
    if shape.causal:
        f += 2.0 * b * h * n * min(chunk, n) * (D + d)
    return f


def kernel_attention_memory_bytes(shape: Shape, training: bool, features: int, chunk: int) -> float:
    """Feature maps of q and k [n or m, D] (several kept for backward when training), the output;
    causal: q, k and v copied out to whole chunks, each chunk's [chunk, chunk] products, and the
    D x d sums of the chunks three times over (the sums, their running total, its shifted copy)."""
    b, h, n, m, d = shape.batch, shape.n_heads, shape.q_len, shape.k_len, shape.head_dim
    element = max(shape.bytes_per_element, 4)
    features_bytes = b * h * (n + m) * features * element
    total = features_bytes * (4 if training else 2) + b * h * n * d * element * (6 if training else 2)
    if shape.causal:
        chunked_copies = n * (2 * features + d)
        within = n * min(chunk, n) * (3 if training else 1)
        sums = 3 * (n // max(chunk, 1) + 1) * features * d
        total += b * h * (chunked_copies + within + sums) * element
    return total
