"""``bench=speed``: latency, peak memory, achieved FLOP/s and error of one cell.

The subject is one attention layer (``bench.scope=attention``: projections + attention core)
or the whole model (``bench.scope=model``). Measurements run in eval mode (dropout off) so
that every backend computes the same function; gradients still flow for forward+backward.
Before anything is allocated, the backend's memory model predicts the step's peak: a cell
predicted over the budget is recorded as ``oom`` without running.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Optional

import torch

from bench import measure
from bench.benches import Bench, register_bench
from bench.cell import Cell, PredictedOOM, Scope, Subject, build_subject, layer_flops, predicted_bytes
from bench.measure import MIB
from bench.output_check import WrongOutput, check_exact, nonfinite
from bench.results import Result, measured
from efficient.attention import Attention
from efficient.bounds import Bound

OUTPUT_DIMS = ("batch", "position", "feature")  # the subject's output: [b, n, d_model] (or logits)


@dataclass
class SpeedBenchConfig:
    name: str = "speed"
    scope: Scope = Scope.attention
    warmup: int = 2  # untimed runs before timing (also compiles / autotunes)
    repeats: int = 10  # at least this many timed runs; the record keeps the median and 20th/80th percentiles
    min_time_s: float = 1.0  # and timed runs until they add up to this (a fast step gets more of them)
    backward: bool = True  # also time and measure forward+backward
    check_error: bool = True  # max_abs_err against the exact reference (fp64 CPU / fp32 GPU); NaN/Inf always
    memory_budget_gib: Optional[float] = None  # None: half the free RAM (CPU), 90% of free GPU memory
    threads: Optional[int] = None  # CPU threads (torch.set_num_threads); None: the cores allotted
    pad_fraction: float = 0.0  # fraction of each sequence that is padding (key_padding_mask)


@dataclass(frozen=True, kw_only=True)
class SpeedResult(Result):
    """One cell's step, timed and measured: forward (no grad) and forward+backward."""

    predicted_mem_mib: float = measured("the memory model's prediction for the step (the guard's input), MiB")
    first_call_s: float = measured("the first forward call, timed apart (compilation, autotuning), s")
    fwd_ms: float = measured(
        "median forward latency (no grad), ms",
        pivot="Forward latency, ms (median)",
        fmt=".3g",
        scaling="forward time",
        ratio="forward time",
        headline="fwd {:.3g} ms",
    )
    fwd_ms_p20: float = measured("20th percentile forward latency, ms")
    fwd_ms_p80: float = measured("80th percentile forward latency, ms")
    fwd_samples: int = measured("timed forward runs (at least bench.repeats, more until bench.min_time_s)")
    fwd_tokens_per_s: float = measured("batch * seq_len / forward time")
    flops_fwd: float = measured("analytic forward FLOPs of the step")
    tflops: float = measured("achieved forward TFLOP/s", pivot="Achieved forward TFLOP/s", fmt=".3g")
    mfu: float = measured("forward TFLOP/s over the device's dense half-precision peak (when known)")
    fwd_peak_mem_mib: float = measured(
        "peak memory of the forward (no grad) above the inputs, MiB",
        pivot="Peak memory above inputs, MiB (forward, no grad)",
        scaling="forward memory",
        ratio="forward memory",
    )
    fwd_bwd_ms: float = measured(
        "median forward+backward latency, ms",
        pivot="Forward+backward latency, ms (median)",
        fmt=".3g",
        scaling="fwd+bwd time",
        ratio="fwd+bwd time",
        headline="fwd+bwd {:.3g} ms",
    )
    fwd_bwd_ms_p20: float = measured("20th percentile forward+backward latency, ms")
    fwd_bwd_ms_p80: float = measured("80th percentile forward+backward latency, ms")
    fwd_bwd_samples: int = measured("timed forward+backward runs")
    fwd_bwd_tokens_per_s: float = measured("batch * seq_len / forward+backward time")
    fwd_bwd_tflops: float = measured("achieved forward+backward TFLOP/s")
    fwd_bwd_peak_mem_mib: float = measured("peak memory of forward+backward above the inputs, MiB")
    peak_mem_mib: float = measured(
        "peak memory of the step: forward+backward if measured, else forward, MiB",
        pivot="Peak memory above inputs, MiB (forward+backward)",
        scaling="fwd+bwd memory",
        ratio="fwd+bwd memory",
        headline="peak {:.4g} MiB",
    )
    attention_ops: list = measured("the attention kernels (ATen / xformers / flex ops) seen running the forward")
    max_abs_err: float = measured(
        "max |output - exact reference| on the same inputs and parameters",
        pivot="Max abs error against the exact reference",
        fmt=".1e",
        headline="err {:.1e}",
    )
    reference: str = measured("what max_abs_err compares against")
    max_abs_err_vs_full: float = measured(
        "a sparse mask's backend: max |output - full attention| (max_abs_err is under its mask)",
        pivot="Max abs error of a sparse mask against full attention",
        fmt=".1e",
    )
    note: str = measured("what was not measured, and why (e.g. no backward on this device)")


def exact_reference(subject: Subject, device: str, unmasked: bool = False) -> tuple[torch.Tensor, str]:
    """The exact reference math on the same parameters and inputs, and what it is.

    The reference is a copy of the module in float64 on CPU (float32 on GPU) with every
    attention layer in ``reference_mode``: the exact softmax attention its backend stands for
    (a sparse mask's backend: under its mask; with ``unmasked``, full attention instead).
    """
    ref_dtype = torch.float32 if device == "cuda" else torch.float64
    with torch.no_grad():
        reference = copy.deepcopy(subject.module).to(ref_dtype)
        for layer in reference.modules():
            if isinstance(layer, Attention):
                layer.reference_mode = True
                if unmasked:
                    layer.unmasked_reference = True
        expected = subject.forward(reference)
    return expected, f"exact attention, same parameters, {str(ref_dtype).removeprefix('torch.')} on {device}"


def gradient_problem(module: torch.nn.Module) -> Optional[str]:
    """Where the step's parameter gradients hold NaN or Inf, or None."""
    for name, parameter in module.named_parameters():
        if parameter.grad is not None and (problem := nonfinite(parameter.grad, f"the gradient of {name}")):
            return problem
    return None


def run_speed(cell: Cell, **context) -> SpeedResult:
    """Measure one cell; raises Unsupported / PredictedOOM / torch.OutOfMemoryError."""
    device, shape, training = cell.device, cell.shape(), cell.bench.backward
    predicted = predicted_bytes(cell, shape, training)
    budget = measure.memory_budget_bytes(device, cell.bench.memory_budget_gib)
    result: dict = {"predicted_mem_mib": predicted / MIB}
    if predicted > budget:
        raise PredictedOOM(
            f"predicted peak memory {predicted / measure.GIB:,.1f} GiB exceeds the budget of "
            f"{budget / measure.GIB:,.1f} GiB (bench.memory_budget_gib); not run"
        )

    subject = build_subject(cell)
    module = subject.module
    timing = dict(warmup=cell.bench.warmup, repeats=cell.bench.repeats, min_time_s=cell.bench.min_time_s)

    def fwd():
        with torch.no_grad():
            return subject.forward(module)

    def fwd_bwd():
        module.zero_grad(set_to_none=True)
        subject.loss(subject.forward(module)).backward()

    tokens = cell.batch_size * cell.seq_len
    wrong = None  # a gradient with NaN or Inf (forward+backward)
    flops_fwd, flops_fwd_bwd = layer_flops(cell, shape)
    started = time.perf_counter()
    fwd()  # the first call compiles (flex), autotunes or initialises: timed apart
    measure.synchronize(device)
    result["first_call_s"] = time.perf_counter() - started
    t = measure.time_ms(fwd, device, **timing)
    peak, ops = measure.profile_step(fwd, device)
    result.update(
        fwd_ms=t["median"],
        fwd_ms_p20=t["p20"],
        fwd_ms_p80=t["p80"],
        fwd_samples=t["samples"],
        fwd_tokens_per_s=tokens / (t["median"] / 1e3),
        flops_fwd=flops_fwd,
        tflops=flops_fwd / (t["median"] / 1e3) / 1e12,
        fwd_peak_mem_mib=peak / MIB,
        peak_mem_mib=peak / MIB,
        attention_ops=ops,
    )
    backend = cell.backend
    if training and not backend.trains_on(device, **cell.options):
        result["note"] = f"forward only: {backend.name} has no backward on {device}" + cell.option_words()
        training = False
    if training:
        t = measure.time_ms(fwd_bwd, device, **timing)
        wrong = gradient_problem(module)
        module.zero_grad(set_to_none=True)
        result.update(
            fwd_bwd_ms=t["median"],
            fwd_bwd_ms_p20=t["p20"],
            fwd_bwd_ms_p80=t["p80"],
            fwd_bwd_samples=t["samples"],
            fwd_bwd_tokens_per_s=tokens / (t["median"] / 1e3),
            fwd_bwd_tflops=flops_fwd_bwd / (t["median"] / 1e3) / 1e12,
            fwd_bwd_peak_mem_mib=measure.peak_memory_bytes(fwd_bwd, device) / MIB,
        )
        module.zero_grad(set_to_none=True)
        result["peak_mem_mib"] = result["fwd_bwd_peak_mem_mib"]
    peak = measure.peak_tflops(measure.device_name(device), cell.torch_dtype)
    result["mfu"] = result["tflops"] / peak if peak else None
    output = fwd()
    if cell.bench.check_error:
        reference, result["reference"] = exact_reference(subject, device)
        result["max_abs_err"], problem = check_exact(
            cell.attention, cell.dtype, output, reference, "the forward output", OUTPUT_DIMS
        )
        if backend.capabilities.sparse_mask:  # what the mask costs against full attention
            full, _ = exact_reference(subject, device, unmasked=True)
            result["max_abs_err_vs_full"] = (output.double() - full.double()).abs().max().item()
    else:
        problem = nonfinite(output, "the forward output", OUTPUT_DIMS)
    if problem or wrong:
        raise WrongOutput(problem or wrong, measured=SpeedResult(**result))
    return SpeedResult(**result)


register_bench(
    Bench(
        "speed",
        SpeedBenchConfig,
        run_speed,
        SpeedResult,
        bounds={
            "warmup": Bound(0),
            "repeats": Bound(1),
            "min_time_s": Bound(0),
            "memory_budget_gib": Bound(0, open=True),
            "threads": Bound(1),
            "pad_fraction": Bound(0, high=1),
        },
    )
)
