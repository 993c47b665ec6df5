"""A Transformer block over any attention backend: attention + position-wise FFN, residuals."""

from __future__ import annotations

from torch import nn

from efficient.attention import Attention

NORMS = ("pre", "post")


class FeedForward(nn.Module):
    """Position-wise FFN: Linear(d, d_ff) -> GELU -> dropout -> Linear(d_ff, d)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model))

    def forward(self, x):
        return self.net(x)


class TransformerBlock(nn.Module):
    """pre-LN:  h = x + drop(attn(LN(x)));   y = h + drop(ffn(LN(h)))
    post-LN: h = LN(x + drop(attn(x)));   y = LN(h + drop(ffn(h)))   (Vaswani et al. 2017)

    A stateful attention (Transformer-XL) keeps x itself in its memory: in pre-LN it is handed
    x and the block's LayerNorm and normalises [memory ; x] inside, as the reference does, so
    that the memory is normalised with the current weights and their gradient flows through it.
    """

    def __init__(self, attention: Attention, d_ff: int, dropout: float = 0.0, norm: str = "pre"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown norm placement {norm!r}; valid: {', '.join(NORMS)}")
        d_model = attention.d_model
        self.attention, self.norm = attention, norm
        self.ffn = FeedForward(d_model, d_ff, dropout)
        self.ln_attention, self.ln_ffn = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, key_padding_mask=None, causal=False, state=None):
        """x [b, n, d] -> (y [b, n, d], the attention's new state)."""
        if self.norm == "pre":
            if self.attention.capabilities.stateful:
                a, state = self.attention(x, None, key_padding_mask, causal, state, norm=self.ln_attention)
            else:
                a, state = self.attention(self.ln_attention(x), None, key_padding_mask, causal, state)
            h = x + self.drop(a)
            return h + self.drop(self.ffn(self.ln_ffn(h))), state
        a, state = self.attention(x, None, key_padding_mask, causal, state)
        h = self.ln_attention(x + self.drop(a))
        return self.ln_ffn(h + self.drop(self.ffn(h))), state
