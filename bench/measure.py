"""How the suite measures: device resolution, latency, peak memory, and the memory budget.

GPU latency: CUDA events around each repeat, the L2 cache flushed between repeats.
CPU latency: wall clock (perf_counter) with a fixed, recorded thread count.
Both, in every bench (``time_ms``): warm-up runs first, then timed runs until there are at least
``repeats`` of them and they add up to ``min_time_s``; the median and 20th/80th percentiles.
Peak memory: the allocator's own view, above what was allocated before the step: CUDA's
peak statistics on GPU; on CPU the PyTorch profiler's allocator events (every tensor
allocation and free, summed in order), which tracemalloc cannot see.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import statistics
import sys
import time
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from efficient.attention import Unavailable

ATTENTION_OP = re.compile(r"attention|fmha|flex|flash|cudnn", re.IGNORECASE)
MIB = 2**20
GIB = 2**30

# Dense bf16/fp16 tensor-core peaks, TFLOP/s (vendor figures), for MFU.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0}
# HBM bandwidth, GB/s (vendor figures), the limit of memory-bound decoding.
PEAK_BANDWIDTH_GBS = {"H100 PCIe": 2000.0, "H100 NVL": 3900.0, "H100": 3350.0, "H200": 4800.0}


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise Unavailable("device=cuda was requested but CUDA is not available on this machine")
    return requested


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def peak_tflops(name: str, dtype: torch.dtype) -> float | None:
    """The device's dense half-precision peak, when known and the run is half precision."""
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    for key, value in PEAK_TFLOPS.items():  # "H100 PCIe" is checked before plain "H100"
        if key in name:
            return value
    return None


def peak_bandwidth(device: str) -> tuple[float, str]:
    """(GB/s, where the figure comes from): the vendor's HBM figure for a known GPU, else the
    copy bandwidth measured here (a CPU: with this job's threads)."""
    name = device_name(device)
    for key, value in PEAK_BANDWIDTH_GBS.items():  # the longer names are checked first
        if key in name:
            return value, f"{key} vendor figure"
    return copy_bandwidth_gbs(device), f"measured copy bandwidth ({torch.get_num_threads()} threads)"


_copy_bandwidth: dict[tuple[str, int], float] = {}


def copy_bandwidth_gbs(device: str, mib: int = 512, repeats: int = 7) -> float:
    """The machine's memory bandwidth as a large copy sees it, measured once per process and
    thread count: bytes read + written / median time, GB/s (10^9 bytes per second)."""
    key = (device, torch.get_num_threads())
    if key not in _copy_bandwidth:
        source = torch.ones(mib * MIB // 4, device=device)  # far beyond any cache
        target = torch.empty_like(source)
        t = time_ms(lambda: target.copy_(source), device, warmup=2, repeats=repeats)
        _copy_bandwidth[key] = 2 * source.numel() * 4 / (t["median"] / 1e3) / 1e9
    return _copy_bandwidth[key]


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


MAX_REPEATS = 10_000  # a budget never runs more timed repeats than this


def time_ms(
    fn: Callable[[], object],
    device: str,
    warmup: int,
    repeats: int,
    min_time_s: float = 0.0,
    max_repeats: int = MAX_REPEATS,
) -> dict[str, float]:
    """Median and 20th/80th percentiles of ``fn``'s latency in milliseconds, the number of timed
    runs (``samples``) and their times (``times_ms``): after ``warmup`` untimed runs, at least
    ``repeats`` timed runs, and more until they add up to ``min_time_s`` (the time budget of
    torch.utils.benchmark's ``blocked_autorange``), at most ``max_repeats``. A fast step thus gets enough runs for its
    percentiles to mean something; a slow one is not run longer than ``repeats`` needs."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples: list[float] = []
    flush = torch.empty(256 * MIB, dtype=torch.int8, device="cuda") if device == "cuda" else None  # > H100's L2
    while len(samples) < max(1, repeats) or (sum(samples) < min_time_s * 1e3 and len(samples) < max_repeats):
        if flush is not None:
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return {**summarize(samples), "samples": len(samples), "times_ms": samples}


def summarize(samples: list[float]) -> dict[str, float]:
    if len(samples) == 1:
        return {"median": samples[0], "p20": samples[0], "p80": samples[0]}
    q = statistics.quantiles(samples, n=10, method="inclusive")  # deciles
    return {"median": statistics.median(samples), "p20": q[1], "p80": q[7]}


def peak_memory_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak bytes allocated while ``fn`` runs, above what was allocated before it."""
    return profile_step(fn, device)[0]


def profile_step(fn: Callable[[], object], device: str) -> tuple[int, list[str]]:
    """Run ``fn`` once: (peak bytes above the baseline, the attention ops that ran).

    The op names (ATen's ``_scaled_dot_product_flash_attention``, ``_efficient_attention``,
    xformers' and FlexAttention's ops, ...) say which kernel really ran.
    """
    with native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        if device == "cuda":
            torch.cuda.synchronize()
            baseline = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        fn()
        synchronize(device)
    events = prof.profiler.kineto_results.events()
    ops = sorted({e.name() for e in events if ATTENTION_OP.search(e.name())})
    if device == "cuda":
        return torch.cuda.max_memory_allocated() - baseline, ops
    memory = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    current = peak = 0
    for event in memory:
        if event.device_type() == torch.autograd.DeviceType.CPU:
            current += event.nbytes()
            peak = max(peak, current)
    return peak, ops


@contextlib.contextmanager
def native_stderr_silenced():
    """Send file descriptor 2 to /dev/null: the profiler prints start/stop lines from C++."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def memory_budget_bytes(device: str, budget_gib: float | None) -> float:
    """What a cell may use: the configured budget, else half the free RAM / 90% of free GPU memory."""
    if budget_gib is not None:
        return budget_gib * GIB
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return 0.9 * free
    return 0.5 * available_ram_bytes()


def available_ram_bytes() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    import psutil  # not Linux: fall back to psutil

    return float(psutil.virtual_memory().available)
