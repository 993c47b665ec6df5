"""``bench=xl_eval``: the Transformer-XL paper's evaluation-speed experiment (Dai et al. 2019).

A vanilla model (Al-Rfou et al. 2018) predicts one token per forward pass over a sliding window
of the attention length A, recomputing the whole window for every token. Transformer-XL reads
a segment of ``tgt_len`` tokens per forward pass, its keys the segment plus a memory of
A - tgt_len cached positions, and predicts every token of the segment. Both models have the
same size (``model.*``); ``seq_len`` is A. The record's ``speedup_per_token`` is the
per-token speed-up (the paper reports 363x at A = 800 and 1,874x at A = 3,800 on GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench import measure
from bench.benches import Bench, register_bench
from bench.cell import Cell, language_model, make_attention
from bench.results import Result, measured
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


@dataclass(frozen=True, kw_only=True)
class XLEvalResult(Result):
    """Per-token evaluation time of XL with memory against a vanilla model's sliding window."""

    TABLE = "Transformer-XL's evaluation speed against a vanilla model (bench=xl_eval; n: the attention length)"

    xl_segment_ms: float = measured("median time of XL's forward over one segment of tgt_len tokens, ms")
    xl_segment_ms_p20: float = measured("20th percentile of xl_segment_ms, ms")
    xl_segment_ms_p80: float = measured("80th percentile of xl_segment_ms, ms")
    xl_samples: int = measured("timed XL segments")
    xl_tokens_per_s: float = measured("batch * tgt_len / xl_segment_ms")
    xl_ms_per_token: float = measured(
        "xl_segment_ms / tgt_len: XL's time per predicted token, ms", column="XL ms/token", fmt=".3g"
    )
    vanilla_ms_per_token: float = measured(
        "median time of the vanilla model's forward over the window: one predicted token, ms",
        column="vanilla ms/token",
        fmt=".4g",
    )
    vanilla_ms_p20: float = measured("20th percentile of vanilla_ms_per_token, ms")
    vanilla_ms_p80: float = measured("80th percentile of vanilla_ms_per_token, ms")
    vanilla_samples: int = measured("timed vanilla windows")
    speedup_per_token: float = measured(
        "vanilla_ms_per_token / xl_ms_per_token",
        column="speed-up",
        fmt=",.0f",
        headline="{:,.0f}x faster per token than a vanilla model",
    )
    paper_speedup: float = measured(
        "the paper's speed-up at this attention length (Dai et al. 2019), if it has one", column="paper", fmt=","
    )
    ratio_to_paper: float = measured("speedup_per_token / paper_speedup", column="of the paper's", fmt=".2f")
    tgt_len: int = measured("XL's segment: tokens predicted per forward", column="tgt_len", fmt="d")
    mem_len: int = measured("XL's memory: attention length - tgt_len")


def run_xl_eval(cell: Cell, **context) -> XLEvalResult:
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
    return XLEvalResult(
        xl_segment_ms=t_xl["median"],
        xl_segment_ms_p20=t_xl["p20"],
        xl_segment_ms_p80=t_xl["p80"],
        xl_samples=t_xl["samples"],
        xl_tokens_per_s=b * tgt_len / (t_xl["median"] / 1e3),
        xl_ms_per_token=xl_per_token,
        vanilla_ms_per_token=t_vanilla["median"],
        vanilla_ms_p20=t_vanilla["p20"],
        vanilla_ms_p80=t_vanilla["p80"],
        vanilla_samples=t_vanilla["samples"],
        speedup_per_token=speedup,
        paper_speedup=paper,
        ratio_to_paper=speedup / paper if paper else None,
        tgt_len=tgt_len,
        mem_len=span - tgt_len,
    )


register_bench(
    Bench(
        "xl_eval",
        XLEvalBenchConfig,
        run_xl_eval,
        XLEvalResult,
        bounds={"tgt_len": Bound(1), "warmup": Bound(0), "repeats": Bound(1), "min_time_s": Bound(0)},
    )
)
