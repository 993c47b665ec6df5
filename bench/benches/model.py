"""``bench=model``: a Hugging Face transformers model end to end, its attention a suite backend.

The model is transformers' own (``model.architecture``: llama, mistral, gpt2, ...; or a user's
``model.config_json``) at the cell's size, with random weights: nothing is downloaded, and
``model.n_layers`` cuts a real-size model to layers that fit. Its attention is the backend that
``attention=`` names, registered with transformers (``efficient/integrations/hf.py``), or
transformers' own for the baselines (``bench.hf_attention=eager|sdpa|flex_attention``, with
``attention=full``). Eval mode throughout (dropout off: every backend computes the same function),
the cell's dtype. Measured, on random tokens:

- prefill: ``seq_len`` tokens into HF's ``DynamicCache``, the logits of the last position only
  (as ``generate`` does): latency and peak memory;
- decode: single-token steps against that cache while it grows: the median latency (at least
  ``bench.decode_tokens`` steps, more until ``bench.min_time_s``, at most ``bench.max_decode_tokens``);
- training step: forward and backward of the next-token loss over every position (no optimiser
  step): latency and peak memory;
- error: the model's final hidden states [b, n, d] against the same model, weights and tokens
  with HF's ``sdpa``. A backend that computes the model's attention (an exact one; a sliding
  window only where it is the model's own) must stay within its tolerance, else the record is
  ``wrong``; an approximation keeps its error as a figure.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional

import torch

from bench import measure
from bench.benches import Bench, register_bench
from bench.benches.speed import gradient_problem
from bench.cell import Cell, PredictedOOM
from bench.measure import MIB
from bench.output_check import WrongOutput, beyond_tolerance, nonfinite
from bench.results import Result, measured
from efficient.attention import Unavailable, Unsupported, as_value, get_backend
from efficient.bounds import Bound
from efficient.integrations import hf

HIDDEN_DIMS = ("batch", "position", "feature")  # the model's final hidden states [b, n, d]


class HFAttention(Enum):
    suite = "suite"  # the suite backend ``attention=`` names
    eager = "eager"  # transformers' own implementations: the baselines
    sdpa = "sdpa"
    flex_attention = "flex_attention"


@dataclass
class ModelBenchConfig:
    name: str = "model"
    causal: bool = True  # the models are causal LMs: the top-level ``causal`` follows it
    hf_attention: HFAttention = HFAttention.suite  # suite: attention=<backend>; else transformers' own
    warmup: int = 1  # untimed runs before each timing (also compiles)
    repeats: int = 3  # at least this many timed prefills and training steps
    min_time_s: float = 1.0  # and timed runs until they add up to this
    decode_tokens: int = 16  # at least this many timed single-token steps
    max_decode_tokens: int = 256  # but no more (the positions are allocated for them)
    backward: bool = True  # also time and measure the training step
    check_error: bool = True  # the final hidden states against HF's sdpa; NaN/Inf always
    memory_budget_gib: Optional[float] = None  # None: half the free RAM (CPU), 90% of free GPU memory
    threads: Optional[int] = None  # CPU threads; None: the cores allotted


@dataclass(frozen=True, kw_only=True)
class ModelResult(Result):
    """A transformers model's prefill, decode and training step with the cell's attention."""

    TABLE = "A Hugging Face model end to end (bench=model)"

    architecture: str = measured("transformers' model_type of the model measured", column="model")
    parameters: int = measured("the model's parameters", column="params", fmt=",.0f")
    prefill_ms: float = measured(
        "median latency of the prefill of seq_len tokens into the cache (last position's logits), ms",
        pivot="Prefill latency, ms (median)",
        column="prefill ms",
        fmt=",.4g",
        scaling="prefill time",
        ratio="prefill time",
        headline="prefill {:,.4g} ms",
    )
    prefill_ms_p20: float = measured("20th percentile prefill, ms")
    prefill_ms_p80: float = measured("80th percentile prefill, ms")
    prefill_samples: int = measured("timed prefills")
    prefill_tokens_per_s: float = measured("batch * seq_len / prefill time")
    prefill_peak_mem_mib: float = measured(
        "peak memory of the prefill above the weights, cache included, MiB",
        pivot="Prefill peak memory above the weights, MiB",
        column="prefill MiB",
        fmt=",.4g",
        scaling="prefill memory",
    )
    prefill_ops: list = measured("the attention kernels seen running the prefill", column="kernels", fmt="list")
    decode_ms: float = measured(
        "median latency of one decode step (a token per sequence) against HF's cache of seq_len, ms",
        pivot="Decode latency, ms/token (median)",
        column="ms/token",
        fmt=".3g",
        ratio="decode time",
        headline="decode {:.3g} ms/token",
    )
    decode_ms_p20: float = measured("20th percentile decode step, ms")
    decode_ms_p80: float = measured("80th percentile decode step, ms")
    decode_samples: int = measured("timed decode steps")
    fwd_bwd_ms: float = measured(
        "median latency of a training step: forward and backward of the next-token loss, ms",
        pivot="Training step (forward+backward) latency, ms (median)",
        column="train ms",
        fmt=",.4g",
        scaling="training time",
        ratio="training time",
        headline="train {:,.4g} ms",
    )
    fwd_bwd_ms_p20: float = measured("20th percentile training step, ms")
    fwd_bwd_ms_p80: float = measured("80th percentile training step, ms")
    fwd_bwd_samples: int = measured("timed training steps")
    fwd_bwd_peak_mem_mib: float = measured(
        "peak memory of the training step above the weights, gradients included, MiB",
        pivot="Training step peak memory above the weights, MiB",
        column="train MiB",
        fmt=",.4g",
        scaling="training memory",
    )
    weights_mib: float = measured("the model's weights, MiB")
    predicted_mem_mib: float = measured("the memory model's larger peak above the weights (prefill or training), MiB")
    max_abs_err: float = measured(
        "max |final hidden states - the same model's with HF's sdpa|",
        pivot="Max abs error of the final hidden states against HF's sdpa",
        column="err vs sdpa",
        fmt=".1e",
        headline="err {:.1e}",
    )
    reference_scale: float = measured("max |the reference's final hidden states|: the scale of max_abs_err")
    reference: str = measured("what max_abs_err compares against")
    note: str = measured("what was not measured, and why")


def implementation(cell: Cell) -> str:
    """The name transformers knows the cell's attention by (registering the suite's backend)."""
    chosen = cell.bench.hf_attention.value
    if chosen != HFAttention.suite.value:
        return chosen
    changed = cell.option_words().removeprefix(" with ")  # e.g. efficient_flex[window=4096]
    return hf.register(
        cell.attention, hf.PREFIX + cell.attention + (f"[{changed}]" if changed else ""), **cell.options
    )[0]


def describes(cell: Cell) -> dict:
    """The record's label (``hf:sdpa`` for transformers' own attention) and whether it is exact:
    computes the model's own attention (a sliding window only where it is the model's)."""
    chosen = cell.bench.hf_attention.value
    if chosen != HFAttention.suite.value:
        return {"label": f"hf:{chosen}", "exact": True}
    exact = hf.computes_the_model_s_attention(cell.attention, dict(cell.options), model_window(cell), cell.seq_len)
    return {"exact": exact}


def model_window(cell: Cell) -> int | None:
    """The model's sliding window (Mistral's), None where it has none."""
    architecture = cell.architecture
    if architecture.config_json:
        return hf.json_field(architecture.config_json, "sliding_window")
    return architecture.fields.get("sliding_window")


def config_problems(cfg) -> list[str]:
    chosen = as_value(cfg.bench.hf_attention)
    if chosen == HFAttention.suite.value or cfg.attention.name == "full":
        return []
    return [
        f"bench.hf_attention={chosen} runs transformers' own attention, not attention={cfg.attention.name}: "
        f"run it with attention=full (its records are labelled hf:{chosen})"
    ]


# transformers' own implementations -> the suite backend whose memory model stands for theirs
MEMORY_LIKE = {"eager": "full", "sdpa": "sdpa", "flex_attention": "flex"}


def hf_config(cell: Cell, positions: int):
    """(the transformers config of the cell's model, its parameter count)."""
    try:
        import transformers
    except ImportError as e:
        raise Unavailable("bench=model needs transformers: pip install -e '.[hf]'") from e
    architecture = cell.architecture
    config = hf.model_config(
        cell.model,
        architecture.model_type,
        dict(architecture.fields),
        architecture.config_json,
        cell.vocab_size(),
        positions,
    )
    with torch.device("meta"):  # counted before anything is allocated
        parameters = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(config).parameters())
    return config, parameters


def predicted_bytes(cell: Cell, config, parameters: int, positions: int) -> tuple[float, float, float]:
    """(weights, the prefill's peak above them, the training step's): the prefill holds the cache,
    one layer's activations and attention core; the training step every layer's, the logits of
    every position with their loss and gradient, and the gradients."""
    element = cell.element_size
    shape = cell.shape()
    b, n, d, layers = cell.batch_size, cell.seq_len, cell.model.d_model, cell.model.n_layers
    activations = b * n * (d * 8 + cell.model.d_ff * 3) * element  # one layer's, its attention core aside
    cache = 2 * layers * b * positions * cell.n_kv_heads * cell.head_dim * element
    chosen = cell.bench.hf_attention.value
    backend, options = (cell.backend, cell.options) if chosen == "suite" else (get_backend(MEMORY_LIKE[chosen]), {})
    prefill = cache + activations + backend.memory_bytes(shape, False, **options)
    core = backend.memory_bytes(shape, True, **options)
    training = layers * (activations + core) + 3 * b * n * config.vocab_size * 4 + parameters * element
    return parameters * element, prefill, training


def run_model(cell: Cell, **context) -> ModelResult:
    device, n, b = cell.device, cell.seq_len, cell.batch_size
    bench = cell.bench
    if reason := cell.backend.unsupported_reason(cell.setting(kv_cache=True), **cell.options):
        raise Unsupported(f"decoding with a KV cache: {reason}")
    decode_steps = bench.warmup + max(bench.decode_tokens, bench.max_decode_tokens if bench.min_time_s > 0 else 0)
    positions = n + decode_steps
    config, parameters = hf_config(cell, positions)
    weights, prefill_bytes, training_bytes = predicted_bytes(cell, config, parameters, positions)
    budget = measure.memory_budget_bytes(device, bench.memory_budget_gib)
    if weights + prefill_bytes > budget:
        raise PredictedOOM(
            f"predicted prefill peak {(weights + prefill_bytes) / measure.GIB:,.1f} GiB (weights "
            f"{weights / measure.GIB:,.1f}) exceeds the budget of {budget / measure.GIB:,.1f} GiB "
            "(bench.memory_budget_gib; fewer model.n_layers need less); not run"
        )
    train = bench.backward and weights + training_bytes <= budget
    from transformers import AutoModelForCausalLM

    name = implementation(cell)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=name)
    model = model.to(device=device, dtype=cell.torch_dtype).eval()
    tokens = torch.randint(config.vocab_size, (b, positions + 1), device=device)  # [b, positions + 1]
    prompt = tokens[:, :n]
    timing = dict(warmup=bench.warmup, repeats=bench.repeats, min_time_s=bench.min_time_s)
    result = dict(architecture=config.model_type, parameters=parameters, weights_mib=weights / MIB)
    result["predicted_mem_mib"] = max(prefill_bytes, training_bytes if bench.backward else 0) / MIB
    problems = []

    with torch.no_grad():
        caches = []

        def prefill():
            caches[:] = [model(prompt, use_cache=True, logits_to_keep=1)]

        peak, ops = measure.profile_step(prefill, device)  # untimed: the peak, the kernels, compilation
        t = measure.time_ms(prefill, device, **timing)
        problems.append(nonfinite(caches[0].logits, "the prefill's logits"))
        result.update(prefill_ms=t["median"], prefill_ms_p20=t["p20"], prefill_ms_p80=t["p80"])
        result.update(prefill_samples=t["samples"], prefill_tokens_per_s=b * n / (t["median"] / 1e3))
        result.update(prefill_peak_mem_mib=peak / MIB, prefill_ops=ops)

        state = {"cache": caches.pop().cache, "decoded": 0, "logits": None}  # the timed prefill's cache

        def decode():  # token n + i: one query per sequence against the cache, which grows by it
            i = n + state["decoded"]
            state["logits"] = model(tokens[:, i : i + 1], cache=state["cache"], use_cache=True).logits  # [b, 1, vocab]
            state["decoded"] += 1

        t = measure.time_ms(
            decode,
            device,
            warmup=bench.warmup,
            repeats=bench.decode_tokens,
            min_time_s=bench.min_time_s,
            max_repeats=decode_steps - bench.warmup,
        )
        problems.append(nonfinite(state.pop("logits"), "the last decode step's logits"))
        state.clear()  # the cache is freed before the error check and the training step
        result.update(
            decode_ms=t["median"], decode_ms_p20=t["p20"], decode_ms_p80=t["p80"], decode_samples=t["samples"]
        )

        if bench.check_error:
            compared = compared_with_sdpa(cell, model, prompt, name)
            problems.append(compared.pop("problem", None))
            result.update(compared)

    if bench.backward and not train:
        result["note"] = (
            f"no training step: its predicted peak {(weights + training_bytes) / measure.GIB:,.1f} GiB exceeds "
            f"the budget of {budget / measure.GIB:,.1f} GiB (bench.memory_budget_gib)"
        )
    elif bench.backward and name.startswith(hf.PREFIX) and not cell.backend.trains_on(device, **cell.options):
        result["note"] = f"no training step: {cell.attention} has no backward on {device}" + cell.option_words()
    elif bench.backward:
        losses = []

        def train_step():
            model.zero_grad(set_to_none=True)
            losses[:] = [model(prompt, labels=prompt, use_cache=False).loss]
            losses[0].backward()

        try:
            peak, _ = measure.profile_step(train_step, device)
        except NotImplementedError as e:  # transformers' own, e.g. flex_attention has no backward on CPU
            return finished(ModelResult(**result, note=f"no training step: {e}"), problems)
        t = measure.time_ms(train_step, device, **timing)
        problems += [nonfinite(losses[0].detach(), "the training step's loss"), gradient_problem(model)]
        model.zero_grad(set_to_none=True)
        result.update(fwd_bwd_ms=t["median"], fwd_bwd_ms_p20=t["p20"], fwd_bwd_ms_p80=t["p80"])
        result.update(fwd_bwd_samples=t["samples"], fwd_bwd_peak_mem_mib=peak / MIB)

    return finished(ModelResult(**result), problems)


def finished(result: ModelResult, problems: list[str | None]) -> ModelResult:
    """``result``, or WrongOutput with it when a check found a problem."""
    if problem := next((p for p in problems if p), None):
        raise WrongOutput(problem, measured=result)
    return result


def compared_with_sdpa(cell: Cell, model, prompt, name: str) -> dict:
    """``max_abs_err`` (final hidden states against HF sdpa's), ``reference_scale``, ``reference``,
    and ``problem``: why the output is wrong, or None."""
    hidden = model.base_model(prompt).last_hidden_state  # [b, n, d]
    if problem := nonfinite(hidden, "the final hidden states", HIDDEN_DIMS):
        return {"max_abs_err": float("nan"), "problem": problem, "reference": "HF's sdpa"}
    if name == "sdpa":
        return {"reference": "this is HF's sdpa: the reference itself", "reference_scale": hidden.abs().max().item()}
    model.set_attn_implementation("sdpa")
    try:
        expected = model.base_model(prompt).last_hidden_state
    finally:
        model.set_attn_implementation(name)
    where = f"the same model with HF's sdpa, same weights and tokens, {cell.dtype} on {cell.device}"
    compared = {"reference": where, "reference_scale": expected.abs().max().item()}
    if not describes(cell)["exact"]:
        error = (hidden - expected).abs().max().item()
        return {**compared, "max_abs_err": error, "reference": where + " (an approximation: not checked)"}
    tolerance = cell.backend.capabilities.tolerance.get(cell.dtype) if name.startswith(hf.PREFIX) else None
    tolerance = tolerance or TOLERANCE.get(cell.dtype, 1e-2)
    error, problem = beyond_tolerance(hidden, expected, tolerance, "the final hidden states", HIDDEN_DIMS)
    return {**compared, "max_abs_err": error, "problem": problem}


# transformers' own implementations against its sdpa: rounding of each dtype, as the exact backends'.
TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}


register_bench(
    Bench(
        "model",
        ModelBenchConfig,
        run_model,
        ModelResult,
        describes=describes,
        config_problems=config_problems,
        bounds={
            "warmup": Bound(0),
            "repeats": Bound(1),
            "min_time_s": Bound(0),
            "decode_tokens": Bound(1),
            "max_decode_tokens": Bound(1),
            "memory_budget_gib": Bound(0, open=True),
            "threads": Bound(1),
        },
    )
)
