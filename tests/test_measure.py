"""bench/measure.py: timing with a budget, percentiles, peak memory as the allocator sees it."""

import time

import torch

from bench import measure


def test_cpu_peak_memory_sees_the_allocator():
    def allocate():
        a = torch.ones(16 * 2**20 // 4)  # 16 MiB
        b = torch.ones(16 * 2**20 // 4)
        return a.sum() + b.sum()

    peak = measure.peak_memory_bytes(allocate, "cpu")
    assert 32 * 2**20 <= peak < 33 * 2**20


def test_percentiles():
    s = measure.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert s["median"] == 3.0 and s["p20"] < 3.0 < s["p80"]


def test_timing_runs_at_least_repeats_then_fills_the_time_budget():
    """time_ms: ``repeats`` runs at the least; more until ``min_time_s``; never beyond ``max_repeats``."""
    calls = []

    def sleep_ms(ms):
        return lambda: (calls.append(1), time.sleep(ms / 1e3))

    assert measure.time_ms(sleep_ms(1), "cpu", warmup=2, repeats=3)["samples"] == 3 and len(calls) == 5
    budget = measure.time_ms(sleep_ms(2), "cpu", warmup=0, repeats=3, min_time_s=0.05)
    assert 3 < budget["samples"] <= 26 and sum(budget["times_ms"]) >= 50
    assert budget["p20"] <= budget["median"] <= budget["p80"] and len(budget["times_ms"]) == budget["samples"]
    capped = measure.time_ms(sleep_ms(2), "cpu", warmup=0, repeats=2, min_time_s=10, max_repeats=5)
    assert capped["samples"] == 5
    slow = measure.time_ms(sleep_ms(30), "cpu", warmup=0, repeats=2, min_time_s=0.01)
    assert slow["samples"] == 2  # the repeats alone exceed the budget
