"""``full``: exact O(n^2) attention, every score materialised. The suite's numerics oracle."""

from __future__ import annotations

from efficient.attention.base import Capabilities, ProjectedAttention, Shape, materialised_memory_bytes, register
from efficient.attention.functional import exact_attention


@register
class FullAttention(ProjectedAttention):
    """softmax(q k^T / sqrt(d)) v with the [n, m] score matrix in memory (einops einsums)."""

    name = "full"
    capabilities = Capabilities()  # causal, padding, cross-attention, every dtype, CPU and GPU

    def attend(self, q, k, v, key_padding_mask, causal):
        return exact_attention(q, k, v, key_padding_mask, causal, self.dropout_p)

    @classmethod
    def memory_bytes(cls, shape: Shape, training: bool, **options) -> float:
        return materialised_memory_bytes(shape, training)
