"""``bench=decode``: long-context inference, a prefill of N tokens then one token at a time.

The subject is the whole causal LM (``model.*``, ``model.n_kv_heads`` for grouped-query
attention) in eval mode, with a KV cache of N = ``seq_len`` tokens (``efficient/kv_cache.py``);
Transformer-XL keeps its memory of N hidden states instead (``mem_len = N``, the paper's
evaluation mode). Measured:

- prefill: the time and peak memory of reading the N-token prompt into the cache, in pieces of
  ``bench.prefill_chunk`` tokens (None: all at once), each attending over the cache so far with
  the bottom-right causal alignment (what serving systems call chunked prefill);
- decode: ``bench.warmup`` untimed steps, then the median latency of single-token steps while
  the cache grows (at least ``bench.decode_tokens``, more until they add up to
  ``bench.min_time_s``, at most ``bench.max_decode_tokens``), tokens/s, and the bytes a step must read: every
  weight once and the cache (keys and values of every layer; XL: its memory). Decoding is
  memory-bound, so bytes / time against the device's bandwidth (``bandwidth_fraction``) is
  how close a backend comes to its physical limit: the record's ``value``.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
from dataclasses import dataclass
from typing import Optional

import torch

from bench import measure
from bench.benches import Bench, register_bench
from bench.cell import Cell, PredictedOOM, language_model, make_attention
from bench.measure import MIB
from bench.output_check import WrongOutput, check_exact, nonfinite
from bench.results import Result, measured
from efficient.attention import Attention, Setting, Unsupported
from efficient.bounds import Bound
from efficient.kv_cache import KVCache, empty_caches

MAX_DECODE_STEPS = 100_000  # decode_tokens and warmup: a median needs far fewer; the cache grows by each


@dataclass
class DecodeBenchConfig:
    name: str = "decode"
    causal: bool = True  # decoding is autoregressive: the top-level ``causal`` follows it, and false is refused
    decode_tokens: int = 32  # at least this many timed single-token steps; the record keeps their median
    min_time_s: float = 1.0  # and timed steps until they add up to this
    max_decode_tokens: int = 512  # but no more than this many (the cache is allocated for them)
    warmup: int = 2  # untimed steps before them
    prefill_chunk: Optional[int] = None  # prompt tokens per prefill forward; None: the whole prompt
    memory_budget_gib: Optional[float] = None  # None: half the free RAM (CPU), 90% of free GPU memory
    threads: Optional[int] = None  # CPU threads; None: the cores allotted


def check_decodable(cell: Cell) -> None:
    backend = cell.backend
    if not cell.causal:  # refused with the config's values already; here for callers that skip that check
        raise Unsupported("bench=decode measures causal (autoregressive) decoding: it cannot run with causal=false")
    if not backend.capabilities.stateful:  # a stateful backend (XL) decodes with its memory
        setting = Setting(cell.device, cell.dtype, causal=True, kv_cache=True)
        if reason := backend.unsupported_reason(setting):
            raise Unsupported(reason)


def cache_bytes(cell: Cell, length: int, element: int, read: bool = False) -> int:
    """The layers' states after ``length`` tokens: a KV cache's keys and values, the running sums
    of attention through a feature map (a fixed size), or XL's memory of ``length`` hidden states
    per layer (from which it recomputes keys and values). ``read``: what one decode step reads of
    them (a sparse mask's newest query reads only the keys it sees)."""
    b, layers = cell.batch_size, cell.model.n_layers
    backend = cell.backend
    if backend.capabilities.stateful:
        return b * layers * length * cell.model.d_model * element
    head_dim = cell.head_dim
    elements = backend.decoding_read_elements if read else backend.decoding_state_elements
    return b * layers * elements(cell.n_kv_heads, head_dim, length, **cell.options) * element


def predicted_prefill_bytes(cell: Cell, chunk: int) -> float:
    """The cache, plus one layer's attention and activations for the largest prefill piece."""
    shape = cell.shape()
    piece = dataclasses.replace(shape, q_len=chunk, k_len=cell.seq_len)
    core = cell.backend.memory_bytes(piece, False, **cell.options)
    activations = cell.batch_size * chunk * (cell.model.d_model * 8 + cell.model.d_ff * 2) * shape.bytes_per_element
    capacity = cell.seq_len + decode_steps(cell) + 1
    return cache_bytes(cell, capacity, shape.bytes_per_element) + core + activations


LOGIT_DIMS = ("batch", "position", "token")


@dataclass(frozen=True, kw_only=True)
class DecodeResult(Result):
    """A prefill of the prompt, then single-token steps against the cache it filled."""

    TABLE = "Decoding: one token against a KV cache of n tokens (bench=decode)"

    decode_ms: float = measured(
        "median latency of one decode step (a token per sequence) with the cache at seq_len, ms",
        column="ms/token",
        fmt=".3g",
        headline="decode {:.3g} ms/token",
    )
    decode_ms_p20: float = measured("20th percentile decode step, ms")
    decode_ms_p80: float = measured("80th percentile decode step, ms")
    decode_samples: int = measured("timed decode steps (at least bench.decode_tokens, more until bench.min_time_s)")
    decode_tokens_per_s: float = measured("batch / decode step time", column="tokens/s", fmt=",.0f")
    bandwidth_fraction: float = measured(
        "achieved_gbs / peak_gbs: how close a step comes to the memory bandwidth, its limit",
        column="of peak",
        fmt=".0%",
        headline="{:.0%} of the bandwidth",
    )
    achieved_gbs: float = measured("bytes a step reads / its time, median, GB/s", column="GB/s", fmt=".3g")
    peak_gbs: float = measured("the bandwidth it is compared with, GB/s", column="peak GB/s", fmt=".3g")
    peak_source: str = measured("where peak_gbs comes from (a vendor figure, or a copy measured here)")
    bytes_per_token: float = measured("what a step reads: every weight once and what its query sees of the cache")
    cache_mib: float = measured(
        "the decoding state at seq_len tokens (KV cache, running sums, memory), MiB", column="cache MiB", fmt=",.4g"
    )
    weights_mib: float = measured("the model's weights, MiB")
    decode_ops: list = measured(
        "the attention kernels seen running one decode step", column="decode kernel", fmt="list"
    )
    prefill_ms: float = measured(
        "the prefill of seq_len tokens, ms", column="prefill ms", fmt=",.0f", headline="prefill {:,.0f} ms"
    )
    prefill_tokens_per_s: float = measured("batch * seq_len / prefill time")
    prefill_peak_mem_mib: float = measured(
        "peak memory of the prefill, cache included, MiB", column="prefill peak MiB", fmt=",.4g"
    )
    predicted_mem_mib: float = measured("the memory model's prediction for the prefill (the guard's input), MiB")
    prefill_chunk: int = measured("prompt tokens per prefill forward")
    prefill_ops: list = measured("the attention kernels seen running the prefill")
    max_abs_err: float = measured(
        "the first decode step's max |logits - exact reference|", fmt=".1e", headline="err {:.1e}"
    )
    reference: str = measured("what max_abs_err compares against")


def decode_steps(cell: Cell) -> int:
    """The most single-token steps a job takes after the prefill (the checked first step, the
    warm-up and the timed steps); the cache and the positions are allocated for them."""
    timed = max(cell.bench.decode_tokens, cell.bench.max_decode_tokens if cell.bench.min_time_s > 0 else 0)
    return 1 + cell.bench.warmup + timed


def reference_dtype(device: str) -> torch.dtype:
    return torch.float32 if device == "cuda" else torch.float64


def copy_cache(state, dtype: torch.dtype) -> KVCache:
    """A KV cache's filled part, copied in ``dtype``, with room for one more token."""
    keys, values = state.filled()
    room = keys.new_zeros(*keys.shape[:2], 1, keys.shape[-1])
    cache = KVCache(torch.cat([keys, room], dim=-2).to(dtype), torch.cat([values, room], dim=-2).to(dtype))
    cache.length = state.length
    return cache


def check_decode_step(cell: Cell, model, token, logits, reference_states):
    """(max abs error and its reference, or None; why the step is wrong, or None) of one decode
    step's ``logits`` [b, 1, vocab]: NaN/Inf always; with ``reference_states`` (copies of the
    caches before the step), the exact reference's logits of the same step, within the backend's
    tolerance."""
    if reference_states is None:
        return None, nonfinite(logits, "the first decode step's logits", LOGIT_DIMS)
    device = cell.device
    ref_dtype = reference_dtype(device)
    with torch.no_grad():
        reference = copy.deepcopy(model).to(ref_dtype)
        for layer in reference.modules():
            if isinstance(layer, Attention):
                layer.reference_mode = True
        expected, _ = reference(token, states=reference_states)
    error, problem = check_exact(
        cell.attention, cell.dtype, logits, expected, "the first decode step's logits", LOGIT_DIMS
    )
    where = f"exact attention over a copy of the cache, {str(ref_dtype).removeprefix('torch.')} on {device}"
    return (error, where), problem


def run_decode(cell: Cell, **context) -> DecodeResult:
    device = cell.device
    check_decodable(cell)
    dtype = cell.torch_dtype
    n, b, steps = cell.seq_len, cell.batch_size, decode_steps(cell)
    chunk = min(cell.bench.prefill_chunk or n, n)
    predicted = predicted_prefill_bytes(cell, chunk)
    budget = measure.memory_budget_bytes(device, cell.bench.memory_budget_gib)
    if predicted > budget:
        raise PredictedOOM(
            f"predicted prefill peak {predicted / measure.GIB:,.1f} GiB exceeds the budget of "
            f"{budget / measure.GIB:,.1f} GiB (bench.memory_budget_gib; a smaller "
            f"bench.prefill_chunk needs less); not run"
        )
    capabilities = cell.backend.capabilities
    stateful = capabilities.stateful
    # The first decode step is checked against the exact reference on a copy of the cache (float64
    # on CPU, float32 on GPU), when that copy fits beside the prefill; XL keeps its memory instead,
    # and running sums keep no keys to attend over.
    head_dim = cell.head_dim
    copy_bytes = (
        b
        * cell.model.n_layers
        * Attention.decoding_state_elements(cell.n_kv_heads, head_dim, n + steps)
        * (8 if device == "cpu" else 4)
    )
    exact = not stateful and not capabilities.constant_state and predicted + copy_bytes <= budget
    make = make_attention(cell, mem_len=n) if stateful else None  # XL: a memory of the whole context
    model = language_model(cell, make, max_len=n + steps).to(device=device, dtype=dtype).eval()
    tokens = torch.randint(model.encoder.embed.num_embeddings, (b, n + steps), device=device)  # [b, n+steps]

    def prefill():
        states = None if stateful else empty_caches(model, b, n + steps)
        for start in range(0, n, chunk):  # the last piece may be shorter: it ends at the prompt's end
            _, states = model(tokens[:, start : min(start + chunk, n)], states=states)
        return states

    def step(i: int) -> torch.Tensor:  # decode token n + i: one query per sequence against the states
        nonlocal states
        logits, states = model(tokens[:, n + i : n + i + 1], states=states)
        return logits  # [b, 1, vocab]

    with torch.no_grad():
        # Untimed, under the profiler: the prefill's peak memory and kernels (and any compilation),
        # then one decode step's kernels (which kernel decodes a single query).
        prefill_peak, prefill_ops = measure.profile_step(prefill, device)
        prefilled = []
        prefill_ms = measure.time_ms(lambda: prefilled.append(prefill()), device, warmup=0, repeats=1)["median"]
        states = prefilled.pop()  # the timed prefill's cache is the one decoded against
        before_first_step = [copy_cache(state, reference_dtype(device)) for state in states] if exact else None
        first: list[torch.Tensor] = []
        _, decode_ops = measure.profile_step(lambda: first.append(step(0)), device)  # which kernels decode one query
        exact_error, problem = check_decode_step(cell, model, tokens[:, n : n + 1], first[0], before_first_step)
        before_first_step = None  # freed before the timed steps
        lengths = []  # keys each step attended over
        last = first

        def next_step():
            last[0] = step(len(lengths) + 1)
            lengths.append(n + len(lengths) + 2)

        t = measure.time_ms(
            next_step,
            device,
            warmup=cell.bench.warmup,
            repeats=cell.bench.decode_tokens,
            min_time_s=cell.bench.min_time_s,
            max_repeats=steps - 1 - cell.bench.warmup,
        )
        times_ms, lengths = t["times_ms"], lengths[cell.bench.warmup :]
        problem = problem or nonfinite(last[0], "the last decode step's logits", LOGIT_DIMS)
    element = torch.tensor([], dtype=dtype).element_size()
    weights = sum(p.numel() for name, p in model.named_parameters() if "positions" not in name) * element
    read = [weights + cache_bytes(cell, length, element, read=True) for length in lengths]  # bytes each step reads
    achieved_gbs = measure.summarize([r / (t / 1e3) / 1e9 for r, t in zip(read, times_ms)])["median"]
    peak_gbs, peak_source = measure.peak_bandwidth(device)
    result = DecodeResult(
        decode_ms=t["median"],
        decode_ms_p20=t["p20"],
        decode_ms_p80=t["p80"],
        decode_samples=t["samples"],
        decode_tokens_per_s=b / (t["median"] / 1e3),
        bandwidth_fraction=achieved_gbs / peak_gbs,
        achieved_gbs=achieved_gbs,
        peak_gbs=peak_gbs,
        peak_source=peak_source,
        bytes_per_token=statistics.median(read),
        cache_mib=cache_bytes(cell, n, element) / MIB,
        weights_mib=weights / MIB,
        decode_ops=decode_ops,
        prefill_ms=prefill_ms,
        prefill_tokens_per_s=b * n / (prefill_ms / 1e3),
        prefill_peak_mem_mib=prefill_peak / MIB,
        predicted_mem_mib=predicted / MIB,
        prefill_chunk=chunk,
        prefill_ops=prefill_ops,
        max_abs_err=exact_error[0] if exact_error else None,
        reference=exact_error[1] if exact_error else None,
    )
    if problem:
        raise WrongOutput(problem, measured=result)
    return result


register_bench(
    Bench(
        "decode",
        DecodeBenchConfig,
        run_decode,
        DecodeResult,
        bounds={
            "decode_tokens": Bound(1, high=MAX_DECODE_STEPS),
            "warmup": Bound(0, high=MAX_DECODE_STEPS),
            "max_decode_tokens": Bound(1, high=MAX_DECODE_STEPS),
            "min_time_s": Bound(0),
            "prefill_chunk": Bound(1),
            "memory_budget_gib": Bound(0, open=True),
            "threads": Bound(1),
        },
    )
)
