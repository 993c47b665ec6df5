"""``nystrom``: Nystromformer (Xiong et al. 2021), softmax attention by the Nystrom method.

With landmarks Q~, K~ [l, d] (means of l contiguous segments of the queries and of the keys):

    softmax(Q K^T / sqrt(d)) V  ~  F A^+ (B V),   F = softmax(Q K~^T / sqrt(d))    [n, l]
                                                  A = softmax(Q~ K~^T / sqrt(d))   [l, l]
                                                  B = softmax(Q~ K^T / sqrt(d))    [l, m]

O(n l) time and memory. A^+ is the Moore-Penrose inverse by the paper's iteration (its eq. 13):

    Z_0 = A^T / (max_j sum_i |A_ij| * max_i sum_j |A_ij|),
    Z_{k+1} = Z_k (13 I - A Z_k (15 I - A Z_k (7 I - A Z_k))) / 4,   6 iterations

``conv_kernel`` > 0 (35 by default, as in every Nystromformer config of the authors' LRA code)
adds the paper's skip connection: a depthwise convolution of V along the sequence (one filter
per head, shared by its features, zero padding, no bias). Self-attention only, as in the paper
and both references; not causal: the landmarks mix the whole sequence.

Against the references (mlpen's ``Nystromformer`` for LRA, lucidrains' ``nystrom-attention``):

- Z_0. Both references take the two norms as one number over the whole batch and every head,
  so one sample's output depends on the others in its batch. The default here is the paper's,
  per matrix (``pinv_init=matrix``); ``pinv_init=batch`` is the references'.
- Lengths the landmark count does not divide are padded at the front, as lucidrains does (mlpen
  needs n divisible by the landmarks), but always as masked positions: without a mask lucidrains
  counts its zero padding as tokens.
- Padding follows lucidrains: landmarks are the means of the real tokens of their segment (exact
  means; lucidrains divides by count + 1e-8), landmarks of padding only and padded keys are
  masked out of the three softmaxes, padded values are zeroed (before the convolution too).
  mlpen zeroes padded queries and keys, averages them into the landmarks and masks keys in B
  only, so the amount of padding changes its outputs.
- With as many landmarks as positions, mlpen switches to exact softmax attention; here (as in
  lucidrains) the Nystrom formula still runs, and equals exact attention once A^+ has converged.
- Scale: q / sqrt(d) once (lucidrains); mlpen divides q and k by d^(1/4) each.
"""

from __future__ import annotations

import enum
import math
from typing import Optional

import torch
from einops import einsum, rearrange
from torch import nn

from efficient.attention.base import Capabilities, ProjectedAttention, Shape, Unsupported, as_value, register
from efficient.attention.functional import repeat_kv
from efficient.bounds import Bound


def segment_means(x: torch.Tensor, real: torch.Tensor, landmarks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [b, h, n, d], real [b, n] bool, n divisible by ``landmarks`` -> the mean of each segment's
    real rows [b, h, landmarks, d], and whether a segment has any [b, landmarks]."""
    x = x * real[:, None, :, None].to(x.dtype)
    sums = rearrange(x, "b h (l s) d -> b h l s d", l=landmarks).sum(dim=-2)
    counts = rearrange(real.to(x.dtype), "b (l s) -> b l s", l=landmarks).sum(dim=-1)  # [b, l]
    return sums / counts.clamp(min=1)[:, None, :, None], counts > 0


def masked_softmax(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """softmax over the last axis with hidden entries filled with the lowest finite value (a row
    with nothing visible comes out uniform, as in lucidrains')."""
    return scores.masked_fill(~visible, torch.finfo(scores.dtype).min).softmax(dim=-1)


def iterative_pinv(a: torch.Tensor, iterations: int, init: str = "matrix") -> torch.Tensor:
    """The Moore-Penrose inverse of a [..., l, l] by the paper's third-order iteration, from
    Z_0 = A^T / (||A||_1 ||A||_inf): each matrix's norms ("matrix"), or their largest over the
    batch and heads ("batch", the references')."""
    column_sums = a.abs().sum(dim=-2).amax(dim=-1)  # ||A||_1 [...]
    row_sums = a.abs().sum(dim=-1).amax(dim=-1)  # ||A||_inf
    if init == "batch":
        column_sums, row_sums = column_sums.amax(), row_sums.amax()
    z = a.transpose(-1, -2) / (column_sums * row_sums)[..., None, None]
    identity = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * identity - az @ (15 * identity - az @ (7 * identity - az)))
    return z


class PinvInit(enum.Enum):
    matrix = "matrix"  # the paper's Z_0: each matrix's own norms
    batch = "batch"  # both references': one scale over the batch and heads (samples then interact)


@register
class NystromAttention(ProjectedAttention):
    name = "nystrom"
    capabilities = Capabilities(causal=False, cross_attention=False, exact=False, kv_cache=False)
    option_bounds = {"landmarks": Bound(1), "pinv_iterations": Bound(1), "conv_kernel": Bound(0)}

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float = 0.0,
        n_kv_heads: Optional[int] = None,
        *,
        landmarks: int = 64,
        pinv_iterations: int = 6,
        pinv_init: PinvInit = PinvInit.matrix,
        conv_kernel: int = 35,
    ):
        super().__init__(d_model, n_heads, dropout, n_kv_heads)
        if conv_kernel and conv_kernel % 2 == 0:
            raise ValueError(
                f"nystrom's conv_kernel must be odd (a centred filter keeps the length), got {conv_kernel}"
            )
        self.landmarks, self.pinv_iterations, self.conv_kernel = landmarks, pinv_iterations, conv_kernel
        self.pinv_init = as_value(pinv_init)
        if conv_kernel:
            self.conv = nn.Conv2d(
                n_heads, n_heads, (conv_kernel, 1), padding=(conv_kernel // 2, 0), groups=n_heads, bias=False
            )

    def attend(self, q, k, v, key_padding_mask, causal):
        # q [b, h, n, d], k and v [b, hk, n, d] -> [b, h, n, d]
        if causal:
            raise Unsupported("nystrom cannot be causal: its landmarks average future positions")
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        b, h, n, d = q.shape
        real = (
            torch.ones(b, n, dtype=torch.bool, device=q.device)
            if key_padding_mask is None
            else key_padding_mask.to(torch.bool)
        )
        pad = -n % self.landmarks  # masked positions at the front: [b, h, n', d], n' = l * ceil(n / l)
        q, k, v = (torch.nn.functional.pad(t, (0, 0, pad, 0)) for t in (q, k, v))
        real = torch.nn.functional.pad(real, (pad, 0), value=False)  # padded tokens: neither keys nor landmarks
        v = v * real[:, None, :, None].to(v.dtype)
        q = q * d**-0.5
        q_landmarks, q_filled = segment_means(q, real, self.landmarks)  # [b, h, l, d], [b, l]
        k_landmarks, k_filled = segment_means(k, real, self.landmarks)
        # Landmarks of padding only, and padded keys, are masked out (lucidrains' masks).
        f = masked_softmax(einsum(q, k_landmarks, "b h n d, b h l d -> b h n l"), k_filled[:, None, None, :])
        a = masked_softmax(
            einsum(q_landmarks, k_landmarks, "b h i d, b h j d -> b h i j"),
            q_filled[:, None, :, None] & k_filled[:, None, None, :],
        )
        scores = einsum(q_landmarks, k, "b h l d, b h m d -> b h l m")
        bv = einsum(
            masked_softmax(scores, q_filled[:, None, :, None] & real[:, None, None, :]),
            v,
            "b h l m, b h m d -> b h l d",
        )
        out = f @ (iterative_pinv(a, self.pinv_iterations, self.pinv_init) @ bv)  # [b, h, n', d]
        if self.conv_kernel:
            out = out + self.conv(v)  # the depthwise convolution of the (masked) values
        return out[..., pad:, :]

    @classmethod
    def flops(
        cls, shape: Shape, landmarks: int = 64, pinv_iterations: int = 6, conv_kernel: int = 35, **options
    ) -> float:
        """F (n l d), A (l^2 d), B (l m d) and B V (l m d), F (A^+ (B V)) (l^2 d + n l d), the
        inverse (4 [l, l] products per iteration) and the convolution (n d conv_kernel)."""
        b, h, d = shape.batch, shape.n_heads, shape.head_dim
        n = math.ceil(shape.q_len / landmarks) * landmarks
        m = math.ceil(shape.k_len / landmarks) * landmarks
        l = landmarks
        products = 2 * n * l * d + 2 * l * l * d + 4 * l * m * d + 2 * l * l * d + 2 * n * l * d
        inverse = 4 * 2 * l**3 * pinv_iterations
        return float(b * h * (products + inverse + 2 * m * d * conv_kernel))

    @classmethod
    def memory_bytes(cls, shape: Shape, training: bool, landmarks: int = 64, **options) -> float:
        """F [n, l] and B [l, m] with their softmax temporaries, in float32; q, k and v padded to a
        multiple of the landmarks, and the convolution of v, [n, d] each."""
        scores = shape.batch * shape.n_heads * landmarks * (shape.q_len + shape.k_len) * 4
        copies = (
            4
            * shape.batch
            * shape.n_heads
            * max(shape.q_len, shape.k_len)
            * shape.head_dim
            * max(shape.bytes_per_element, 4)
        )
        return scores * (5 if training else 3) + copies + super().memory_bytes(shape, training)
