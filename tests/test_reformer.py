"""Reformer's LSH attention against a dense formulation written out here from the paper's
definition (tickets, chunks, the chunk before, masks, rounds combined), in float64; padding,
the short-input path, and why it is refused as causal (padding invariance: tests/test_backends.py)."""

import math

import pytest
import torch

from efficient.attention import build_attention, get_backend
from efficient.attention.base import Setting
from efficient.attention.reformer import bucket_factors, default_buckets, shared_keys


def dense_lsh(attention, q, v, key_padding_mask, causal, factors):
    """Every ticket (round, position) against every ticket, through [rounds N, rounds N] masks."""
    b, h, n, d = q.shape
    size, rounds = attention.chunk, attention.rounds
    padded = -(-n // size) * size
    q, v = (torch.nn.functional.pad(t, (0, 0, 0, padded - n)) for t in (q, v))
    real = torch.ones(b, padded, dtype=torch.bool)
    real[:, n:] = False
    if key_padding_mask is not None:
        real[:, :n] = key_padding_mask
    rotations = attention.rotation(factors, q)  # [h, d, rounds, sum(factors) / 2]
    buckets = math.prod(factors)
    out = torch.zeros(b, h, n, d, dtype=q.dtype)
    for bi in range(b):
        for hi in range(h):
            x = q[bi, hi]  # [N, d]
            keys = shared_keys(x)
            sort_keys, positions = [], []
            for r in range(rounds):
                projected = x @ rotations[hi, :, r]  # [N, sum(factors) / 2]
                bucket, first_column, below = torch.zeros(padded, dtype=torch.long), 0, 1
                for factor in factors:  # bucket = h_1 + f_1 h_2 + ...
                    part = projected[:, first_column : first_column + factor // 2]
                    bucket += below * torch.cat([part, -part], dim=-1).argmax(dim=-1)
                    first_column, below = first_column + factor // 2, below * factor
                bucket = torch.where(real[bi], bucket, buckets)
                sort_keys += [(r, int(bucket[i]), i) for i in range(padded)]
                positions += list(range(padded))
            rank = {t: k for k, t in enumerate(sorted(range(len(sort_keys)), key=lambda t: sort_keys[t]))}
            chunk = torch.tensor([rank[t] // size for t in range(len(sort_keys))])
            n_chunks = int(chunk.max()) + 1
            position = torch.tensor(positions)
            sees = (chunk[:, None] == chunk[None, :]) | (chunk[:, None] == (chunk[None, :] + 1) % n_chunks)
            scores = x[position] @ keys[position].T
            masked = ~real[bi][position][None, :]
            if causal:
                masked = masked | (position[None, :] > position[:, None])
            scores = scores.masked_fill(masked, -1e9)
            scores = scores.masked_fill(position[None, :] == position[:, None], -1e5)
            scores = scores.masked_fill(~sees, -torch.inf)
            lse = scores.logsumexp(dim=-1)  # [rounds N]
            ticket_out = scores.softmax(dim=-1) @ v[bi, hi][position]
            lse, ticket_out = lse.view(rounds, padded), ticket_out.view(rounds, padded, d)
            out[bi, hi] = (ticket_out * lse.softmax(dim=0)[..., None]).sum(dim=0)[:n]
    return out


@pytest.mark.parametrize("n,chunk,rounds", [(40, 8, 1), (45, 8, 2), (64, 16, 3), (120, 4, 2)])  # 120 / 4: 2 factors
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_lsh_attention_equals_the_dense_ticket_formulation(n, chunk, rounds, causal, padded):
    torch.manual_seed(0)
    attention = build_attention("reformer", 32, 2, chunk=chunk, rounds=rounds, seed=1).double()
    q = torch.randn(2, 2, n, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, n, 16, dtype=torch.float64, requires_grad=True)
    mask = None
    if padded:
        mask = torch.ones(2, n, dtype=torch.bool)
        mask[1, n - 11 :] = False
    out = attention.attend(q, q, v, mask, causal)
    q_ref, v_ref = (t.detach().clone().requires_grad_() for t in (q, v))
    factors = bucket_factors(-(-n // chunk) * chunk, chunk)
    reference = dense_lsh(attention, q_ref, v_ref, mask, causal, factors)
    assert (out - reference).abs().max() < 1e-10
    for g, g_ref in zip(
        torch.autograd.grad(out.square().sum(), (q, v)), torch.autograd.grad(reference.square().sum(), (q_ref, v_ref))
    ):
        assert (g - g_ref).abs().max() < 1e-9


def test_buckets_follow_hugging_face_s_rule_and_the_option():
    assert [default_buckets(n, 64) for n in (128, 4096, 4160, 16384)] == [4, 128, 128, 512]
    # split in two above 2 max(sqrt(n / chunk), chunk) buckets, so the hash stays O(n d sqrt(n))
    assert [bucket_factors(n, 64) for n in (4096, 8192, 65536)] == [(128,), (16, 16), (32, 64)]
    assert bucket_factors(65536, 64, buckets=2048) == (2048,)  # an explicit count is one hash
    with pytest.raises(ValueError, match="even number"):
        build_attention("reformer", 32, 2, buckets=5)


def test_an_input_of_one_chunk_is_exact_shared_qk_attention():
    torch.manual_seed(0)
    attention = build_attention("reformer", 64, 4, chunk=64).double()
    x = torch.randn(2, 50, 64, dtype=torch.float64)
    y, _ = attention(x)
    attention.reference_mode = True
    assert (y - attention(x)[0]).abs().max() < 1e-12


def test_causal_is_refused_because_future_tokens_move_the_chunk_boundaries():
    """With the causal mask, a query still sees only earlier keys, but the later tokens' buckets
    decide which earlier keys fall into its chunk: past outputs change with the future."""
    assert "changing a future token changes past outputs" in get_backend("reformer").cannot_run(
        Setting("cpu", "float32", causal=True)
    )
    torch.manual_seed(0)
    attention = build_attention("reformer", 32, 2, chunk=8, rounds=1).double()
    q, v = torch.randn(1, 2, 64, 16, dtype=torch.float64), torch.randn(1, 2, 64, 16, dtype=torch.float64)
    changed = q.clone()
    changed[:, :, 40:] = torch.randn(1, 2, 24, 16, dtype=torch.float64)
    past = attention.attend(q, q, v, None, True)[:, :, :40]
    assert (past - attention.attend(changed, changed, v, None, True)[:, :, :40]).abs().max() > 1e-3


@pytest.mark.parametrize("causal", [False, True])
def test_the_exact_reference_in_query_blocks_equals_one_block(causal):
    """The float64 reference runs 256 query rows at a time (a 16K reference would otherwise hold
    [n, n] float64 scores per head); blocks that do not divide n change nothing."""
    from efficient.attention.reformer import shared_qk_attention

    torch.manual_seed(0)
    q, v = torch.randn(2, 3, 45, 8, dtype=torch.float64), torch.randn(2, 3, 45, 8, dtype=torch.float64)
    mask = torch.ones(2, 45, dtype=torch.bool)
    mask[1, 30:] = False
    whole = shared_qk_attention(q, v, mask, causal, 0.0, query_block=45)
    assert (shared_qk_attention(q, v, mask, causal, 0.0, query_block=7) - whole).abs().max() < 1e-14
