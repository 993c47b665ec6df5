"""``bench=xl_eval``: the Transformer-XL paper's evaluation-speed experiment (Dai et al. 2019).

A vanilla model (Al-Rfou et al. 2018) predicts one token per forward pass over a sliding window
of the attention length A, recomputing the whole window for every token. Transformer-XL reads
a segment of ``tgt_len`` tokens per forward pass, its keys the segment plus a memory of
A - tgt_len cached positions, and predicts every token of the segment. Both models have the
same size (``model.*``); ``seq_len`` is A. The record's ``value`` is the per-token speed-up
(the paper reports 363x at A = 800 and 1,874x at A = 3,800 on GPU); ``fwd_ms`` is XL's time
for one segment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench import measure
from bench.benches import Bench, register_bench
from bench.cell import Cell, language_model, make_attention
from efficient.attention import Unsupported, attention_factory
from efficient.bounds import Bound

PAPER_SPEEDUP = {800: 363, 3800: 1874}  # Dai et al. 2019 (as quoted in DESIGN.md section 6)


@dataclass
class XLEvalBenchConfig:
    name: str = "xl_eval"
    tgt_len: int = 128  # XL's evaluation segment; seq_len is the attention length
    warmup: int = 1
    repeats: int = 5  # at least this many timed runs of each model
    min_time_s: float = 1.0  # and timed runs until they add up to this


def run_xl_eval(cell: Cell, **context) -> dict:
    device = cell.device
    span, tgt_len = cell.seq_len, cell.bench.tgt_len
    if not 0 < tgt_len < span:
        raise ValueError(f"bench.tgt_len must be between 1 and seq_len - 1 (the attention length), got {tgt_len}")
    if cell.attention != "xl":
        raise Unsupported(
            f"bench=xl_eval times Transformer-XL against a vanilla model of the same size: it "
            f"takes attention=xl, not {cell.attention}"
        )
    dtype = cell.torch_dtype
    xl = language_model(cell, make_attention(cell, mem_len=span - tgt_len))
    vanilla = language_model(cell, attention_factory("full", cell.model.d_model, cell.model.n_heads))
    xl, vanilla = (m.to(device=device, dtype=dtype).eval() for m in (xl, vanilla))
    b = cell.batch_size
    window = torch.randint(cell.vocab_size(), (b, span), device=device)  # [b, A]
    segment = window[:, -tgt_len:]
    memories = [block.attention.example_state(b, device, dtype) for block in xl.encoder.blocks]

    def xl_step():
        with torch.no_grad():
            xl(segment, states=memories)  # tgt_len predictions

    def vanilla_step():
        with torch.no_grad():
            vanilla(window)  # one prediction: the last position

    budget = dict(warmup=cell.bench.warmup, repeats=cell.bench.repeats, min_time_s=cell.bench.min_time_s)
    t_xl = measure.time_ms(xl_step, device, **budget)
    t_vanilla = measure.time_ms(vanilla_step, device, **budget)
    xl_per_token = t_xl["median"] / tgt_len
    speedup = t_vanilla["median"] / xl_per_token
    paper = PAPER_SPEEDUP.get(span)
    return {
        "fwd_ms": t_xl["median"],
        "fwd_ms_p20": t_xl["p20"],
        "fwd_ms_p80": t_xl["p80"],
        "fwd_samples": t_xl["samples"],
        "fwd_tokens_per_s": b * tgt_len / (t_xl["median"] / 1e3),
        "metric": "eval_speedup_per_token",
        "value": speedup,
        "extra": {
            "attention_length": span,
            "tgt_len": tgt_len,
            "mem_len": span - tgt_len,
            "xl_ms_per_token": xl_per_token,
            "vanilla_ms_per_token": t_vanilla["median"],
            "vanilla_ms_p20": t_vanilla["p20"],
            "vanilla_ms_p80": t_vanilla["p80"],
            "paper_speedup": paper,
            "ratio_to_paper": speedup / paper if paper else None,
        },
    }


register_bench(
    Bench(
        "xl_eval",
        XLEvalBenchConfig,
        run_xl_eval,
        bounds={"tgt_len": Bound(1), "warmup": Bound(0), "repeats": Bound(1), "min_time_s": Bound(0)},
    )
)
