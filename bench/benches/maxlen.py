"""``bench=maxlen``: the longest sequence a backend's step fits in the memory budget.

From ``seq_len``, the length doubles until a step no longer fits, then the gap between the
last length that fit and the first that did not is bisected down to ``resolution`` tokens.
The step is the one ``bench=speed`` measures (scope, forward+backward unless
``backward=false``). Whether a length fits:

- GPU (``method=auto`` or ``measure``): the step really runs; a CUDA out-of-memory error is
  caught, the memory freed, and counts as "does not fit", as does a measured peak over the
  budget (default: 90% of the free GPU memory).
- CPU (``method=auto`` or ``predict``): the memory guard, the backend's memory model that
  ``bench=speed`` checks before running (default budget: half the free RAM). Running steps
  near the RAM limit would swap the machine, and a sub-quadratic backend's longest length
  would take hours of O(n^2) compute on a few cores.

The record's ``max_seq_len`` is the longest length that fits; its ``tried`` lists every length
tried, with its measured or predicted peak.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from enum import Enum
from typing import Optional

import torch

from bench import measure
from bench.benches import Bench, register_bench
from bench.cell import Cell, PredictedOOM, Scope, build_subject, predicted_bytes
from bench.results import Result, measured
from efficient.attention import Unsupported, as_value
from efficient.bounds import Bound


class SearchMethod(Enum):
    auto = "auto"  # measure on GPU, predict on CPU
    measure = "measure"  # run the step: real out-of-memory, measured peak
    predict = "predict"  # the memory guard's model only


@dataclass
class MaxLenBenchConfig:
    name: str = "maxlen"
    scope: Scope = Scope.attention
    backward: bool = True  # the step must fit forward+backward (else the forward)
    method: SearchMethod = SearchMethod.auto
    memory_budget_gib: Optional[float] = None  # None: half the free RAM (CPU), 90% of free GPU memory
    resolution: int = 256  # bisect until the bracket is this narrow (tokens)
    limit: int = 2**22  # never try beyond this length
    pad_fraction: float = 0.0
    threads: Optional[int] = None


def predicted_fit(cell: Cell, budget: float) -> tuple[bool, float]:
    """(fits, predicted peak bytes) by the memory model alone."""
    predicted = predicted_bytes(cell, cell.shape(), cell.bench.backward)
    return predicted <= budget, predicted


def measured_fit(cell: Cell, budget: float) -> tuple[bool, float | None]:
    """(fits, measured peak bytes or None after out-of-memory) by running the step once."""
    try:
        subject = build_subject(cell)

        def step():
            if cell.bench.backward:
                subject.loss(subject.forward(subject.module)).backward()
            else:
                with torch.no_grad():
                    subject.forward(subject.module)

        peak = measure.peak_memory_bytes(step, cell.device)
        return peak <= budget, peak
    except torch.OutOfMemoryError:
        return False, None
    finally:
        subject = None  # free the step's tensors before the next length
        gc.collect()
        if cell.device == "cuda":
            torch.cuda.empty_cache()


@dataclass(frozen=True, kw_only=True)
class MaxLenResult(Result):
    """The longest length whose step fits the memory budget, and the search that found it."""

    TABLE = "Longest length that fits the memory budget (bench=maxlen; n: the starting length)"

    max_seq_len: int = measured(
        "the longest length that fits the budget (to bench.resolution tokens)",
        column="longest n",
        fmt=",",
        headline="fits up to n={:,}",
    )
    first_failing: int = measured(
        "the shortest length tried that does not fit (None: none tried did not)",
        column="first n that does not fit",
        fmt=",",
    )
    budget_gib: float = measured("the memory budget, GiB", column="budget GiB", fmt=".3g")
    peak_mib_at_longest: float = measured(
        "the measured or predicted peak at max_seq_len, MiB", column="peak MiB at longest", fmt=",.0f"
    )
    method: str = measured("measure (the step ran) | predict (the memory guard's model)", column="how")
    resolution: int = measured("the bisection stops at a bracket this narrow, tokens")
    tried: list = measured("every length tried: {seq_len, fits, peak_mib}")
    note: str = measured("a remark, e.g. that the search limit was reached")


def run_maxlen(cell: Cell, **context) -> MaxLenResult:
    bench, device, backend = cell.bench, cell.device, cell.backend
    if bench.backward and not backend.trains_on(device, **cell.options):
        raise Unsupported(
            f"{backend.name} has no backward on {device}{cell.option_words()}: "
            f"search the forward with bench.backward=false"
        )
    method = as_value(bench.method)
    if method == "auto":
        method = "measure" if device == "cuda" else "predict"
    budget = measure.memory_budget_bytes(device, bench.memory_budget_gib)
    tried: list[dict] = []

    def fits(seq_len: int) -> bool:
        at = cell.at(seq_len=seq_len)
        ok, peak = predicted_fit(at, budget) if method == "predict" else measured_fit(at, budget)
        tried.append({"seq_len": seq_len, "fits": ok, "peak_mib": None if peak is None else peak / measure.MIB})
        return ok

    start, resolution = cell.seq_len, bench.resolution
    if not fits(start):
        raise PredictedOOM(
            f"the starting length {start} does not fit the budget of "
            f"{budget / measure.GIB:,.1f} GiB ({method}); lower seq_len"
        )
    fitting, failing = start, None
    while failing is None and fitting * 2 <= bench.limit:
        if fits(fitting * 2):
            fitting *= 2
        else:
            failing = fitting * 2
    while failing is not None and failing - fitting > resolution:
        middle = (fitting + failing) // 2 // resolution * resolution
        if middle <= fitting:
            break
        if fits(middle):
            fitting = middle
        else:
            failing = middle
    peaks = [t["peak_mib"] for t in tried if t["seq_len"] == fitting and t["peak_mib"] is not None]
    return MaxLenResult(
        max_seq_len=fitting,
        first_failing=failing,
        budget_gib=budget / measure.GIB,
        peak_mib_at_longest=max(peaks, default=None),
        method=method,
        resolution=resolution,
        tried=tried,
        note=None if failing else f"fits up to the search limit bench.limit={bench.limit}",
    )


register_bench(
    Bench(
        "maxlen",
        MaxLenBenchConfig,
        run_maxlen,
        MaxLenResult,
        bounds={
            "memory_budget_gib": Bound(0, open=True),
            "resolution": Bound(1),
            "limit": Bound(1),
            "pad_fraction": Bound(0, high=1),
            "threads": Bound(1),
        },
    )
)
