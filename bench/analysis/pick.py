"""Recommend an attention backend for a length, from measured records.

    python -m bench.pick PATH --seq-len N [--memory-budget GiB] [--causal] [--dtype D]
                         [--device D] [--device-name NAME] [--inference | --decode] [--n-kv-heads K]
                         [--scope attention|model] [--d-model D] [--hf-model]
                         [--min-accuracy TASK=VALUE ...] [--allow-approximate] [--json]

Ranks every backend by the time of a training step (forward+backward; ``--inference``: the
forward; ``--decode``: one decoded token against a KV cache of N tokens, from ``bench=decode``
records, within a memory budget that then includes the cache; ``--hf-model``: from ``bench=model``
records, a transformers model's training step, prefill or decode step) at N tokens, on one device,
dtype and causal setting, and from one machine (``device_name``: the most measured unless
named), since times and peaks from two CPUs or two GPU models do not compare. Where N was measured the
record is used; otherwise each backend's power law (time and memory ~ n^k, least squares over
its measured lengths) is extrapolated and the row says so, with the fit's spread. A power law
fitted on short inputs says little far beyond them: extrapolating more than
``--max-extrapolation`` times (default 8x) past the longest (or below the shortest) measured
length excludes the backend, with that reason, unless the limit is raised. Every
backend left out is listed with its reason: unsupported, out of memory (measured, or predicted
over ``--memory-budget``), below an accuracy floor, approximate without accuracy evidence, or
not measured on this device.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.analysis.common import fit_power_law, label, setting
from bench.records import LOWER_IS_BETTER, best_value, load_records

CELL_SETTINGS = ("scope", "batch_size", "d_model", "n_heads", "n_kv_heads", "n_layers", "architecture")
MAX_EXTRAPOLATION = 8.0  # times beyond the measured lengths that a fitted power law is trusted


@dataclass
class Candidate:
    backend: str
    exact: bool
    time_ms: float
    memory_mib: float
    basis: str  # "measured at n=..." or "extrapolated from ..."
    extrapolated: bool = False
    accuracy: dict[str, float] = field(default_factory=dict)
    error: tuple[float, int] | None = None  # an approximation's max |output - full attention|, at n


@dataclass
class Exclusion:
    backend: str
    reason: str


@dataclass
class Recommendation:
    seq_len: int
    settings: dict[str, Any]
    ranked: list[Candidate]
    excluded: list[Exclusion]
    justification: str


def finite(value: Any) -> bool:
    """A number pick can rank by: not None, NaN or Inf."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_exact(records: list[dict]) -> bool:
    """Equal to full softmax attention (not an approximation, nor exact only under a sparse mask),
    as the records say (``exact``, written when measured; a version-1 record does not say)."""
    return bool(records) and all(r.get("exact") is True for r in records)


def approximation_error(records: list[dict], seq_len: int) -> tuple[float, int] | None:
    """An approximate backend's error against full attention, and the length it was measured at:
    the median of ``max_abs_err`` (an approximation) or ``max_abs_err_vs_full`` (a sparse mask)
    at ``seq_len``, else at the longest length with a finite figure. None for an exact backend
    or where none was measured."""
    if is_exact(records):
        return None
    field_name = "max_abs_err_vs_full" if any(finite(r.get("max_abs_err_vs_full")) for r in records) else "max_abs_err"
    by_length: dict[int, list[float]] = defaultdict(list)
    for r in records:
        if finite(r.get(field_name)):
            by_length[r["seq_len"]].append(r[field_name])
    if not by_length:
        return None
    n = seq_len if seq_len in by_length else max(by_length)
    return statistics.median(by_length[n]), n


def most_common(values) -> Any:
    counts = Counter(values)
    return counts.most_common(1)[0][0] if counts else None


def pick(
    records: list[dict[str, Any]],
    seq_len: int,
    memory_budget_gib: float | None = None,
    causal: bool = False,
    dtype: str | None = None,
    device: str | None = None,
    inference: bool = False,
    min_accuracy: dict[str, float] | None = None,
    allow_approximate: bool = False,
    max_extrapolation: float = MAX_EXTRAPOLATION,
    decode: bool = False,
    n_kv_heads: int | None = None,
    device_name: str | None = None,
    scope: str | None = None,
    d_model: int | None = None,
    hf_model: bool = False,
) -> Recommendation:
    if seq_len < 1:
        raise ValueError(f"seq_len must be a positive number of tokens, got {seq_len}")
    min_accuracy = min_accuracy or {}
    causal = causal or decode or hf_model  # decoding is causal, and so are the HF models (causal LMs)
    speed = [r for r in records if r.get("bench") == ("model" if hf_model else "decode" if decode else "speed")]
    chosen = {"n_kv_heads": n_kv_heads, "scope": scope, "d_model": d_model}  # the rest: the most measured
    for key, value in chosen.items():
        if value is not None:
            speed = [r for r in speed if setting(r, key) == value]
    accuracy = [r for r in records if r.get("bench") == "accuracy" and r.get("status") == "ok"]
    device = device or most_common(r["device"] for r in speed)
    on_device = [r for r in speed if r["device"] == device]
    device_name = device_name or most_common(r.get("device_name") for r in on_device)
    on_device = [r for r in on_device if r.get("device_name") == device_name]
    dtype = dtype or most_common(r["dtype"] for r in on_device)
    matching = [r for r in on_device if r["dtype"] == dtype and bool(r["causal"]) == causal]
    cell = most_common(tuple(setting(r, k) for k in CELL_SETTINGS) for r in matching)
    if cell is not None:
        matching = [r for r in matching if tuple(setting(r, k) for k in CELL_SETTINGS) == cell]
    step = (
        "decode step (one token against a KV cache of n; memory: the prefill's peak, cache included)"
        if decode
        else "prefill of n tokens (memory: its peak, cache included)"
        if hf_model and inference
        else "forward (inference)"
        if inference
        else "forward+backward (training step)"
    )
    settings = {
        "device": device,
        **({"device_name": device_name} if device_name else {}),
        "dtype": dtype,
        "causal": causal,
        "step": step,
        "memory_budget_gib": memory_budget_gib,
        **dict(zip(CELL_SETTINGS, cell or ())),
    }
    time_field = "decode_ms" if decode else ("prefill_ms" if hf_model else "fwd_ms") if inference else "fwd_bwd_ms"
    memory_field = (
        "prefill_peak_mem_mib"
        if decode or (hf_model and inference)
        else "fwd_peak_mem_mib"
        if inference
        else "fwd_bwd_peak_mem_mib"
    )

    by_backend: dict[str, list[dict]] = defaultdict(list)
    for r in matching:
        by_backend[label(r)].append(r)
    ranked, excluded = [], []
    for name in sorted({label(r) for r in speed} - set(by_backend)):
        excluded.append(
            Exclusion(name, f"not measured on {device_name or device} with {dtype}, causal={causal} and these settings")
        )

    for name, cells in sorted(by_backend.items()):
        verdict = assess(name, cells, seq_len, time_field, memory_field, max_extrapolation)
        if isinstance(verdict, Exclusion):
            excluded.append(verdict)
            continue
        if memory_budget_gib is not None and verdict.memory_mib > memory_budget_gib * 1024:
            how = "predicted" if verdict.extrapolated else "measured"
            excluded.append(
                Exclusion(
                    name,
                    f"{how} peak {verdict.memory_mib / 1024:.2f} GiB exceeds the "
                    f"{memory_budget_gib:g} GiB budget ({verdict.basis})",
                )
            )
            continue
        floor_problem = check_accuracy(verdict, accuracy, min_accuracy)
        if floor_problem:
            excluded.append(Exclusion(name, floor_problem))
            continue
        if not verdict.exact and not allow_approximate and not min_accuracy:
            unknown = any("exact" not in r for r in cells)
            what = (
                "not known to be exact (records of version 1: `python -m bench.records upgrade PATH` says)"
                if unknown
                else "not exact attention"
            )
            excluded.append(
                Exclusion(
                    name,
                    f"{what}: recommended only with accuracy evidence "
                    "(--min-accuracy TASK=VALUE) or --allow-approximate",
                )
            )
            continue
        ranked.append(verdict)
    ranked.sort(key=lambda c: (c.time_ms, c.memory_mib))
    return Recommendation(seq_len, settings, ranked, excluded, justify(seq_len, settings, ranked, excluded))


def assess(
    name: str,
    cells: list[dict],
    seq_len: int,
    time_field: str,
    memory_field: str,
    max_extrapolation: float = MAX_EXTRAPOLATION,
):
    """A Candidate (measured or extrapolated) or the Exclusion that says why not."""
    exact = is_exact(cells)
    wrong = sorted((r for r in cells if r["status"] == "wrong"), key=lambda r: r["seq_len"])
    if wrong:  # one wrong output says the backend cannot be trusted in these settings
        return Exclusion(name, f"wrong output at n={wrong[0]['seq_len']}: {wrong[0].get('reason')}")
    usable = [r for r in cells if r["status"] == "ok" and finite(r.get(time_field)) and finite(r.get(memory_field))]
    here = [r for r in usable if r["seq_len"] == seq_len]
    if here:
        basis = f"measured at n={seq_len}" + (f" ({len(here)} records, median)" if len(here) > 1 else "")
        return Candidate(
            name,
            exact,
            statistics.median(r[time_field] for r in here),
            statistics.median(r[memory_field] for r in here),
            basis,
            error=None if exact else approximation_error(usable, seq_len),
        )
    unsupported = [r for r in cells if r["status"] == "unsupported"]
    failed_here = [r for r in cells if r["seq_len"] == seq_len and r["status"] not in ("ok", "unsupported")]
    if failed_here:
        return Exclusion(name, f"{failed_here[0]['status']} at n={seq_len}: {failed_here[0].get('reason')}")
    if unsupported:
        return Exclusion(name, f"unsupported: {unsupported[0].get('reason')}")
    too_big = sorted(r["seq_len"] for r in cells if r["status"] == "oom" and r["seq_len"] <= seq_len)
    if too_big:
        return Exclusion(name, f"out of memory already at n={too_big[0]} (< {seq_len})")
    points = defaultdict(list)
    for r in usable:
        points[r["seq_len"]].append((r[time_field], r[memory_field]))
    not_finite = [r for r in cells if r["status"] == "ok" and r not in usable]
    if not points and not_finite:
        r = not_finite[0]
        return Exclusion(
            name,
            f"no finite {time_field} and {memory_field} in its ok records (n={r['seq_len']}: "
            f"{r.get(time_field)!r}, {r.get(memory_field)!r})",
        )
    if len(points) < 2:
        notes = {r.get("note") for r in cells if r.get("note")}
        why = f" ({notes.pop()})" if notes else f" (needs {time_field} at 2 lengths or more)"
        return Exclusion(name, f"too few measurements to extrapolate to n={seq_len}{why}")
    lengths = sorted(points)
    factor = max(seq_len / lengths[-1], lengths[0] / seq_len)
    if factor > max_extrapolation:
        return Exclusion(
            name,
            f"n={seq_len} is {factor:.0f}x outside the measured n={lengths[0]}-{lengths[-1]}; "
            f"a power law is trusted up to {max_extrapolation:g}x (--max-extrapolation): "
            f"measure longer inputs",
        )
    times = [statistics.median(t for t, _ in points[n]) for n in lengths]
    memories = [statistics.median(m for _, m in points[n]) for n in lengths]
    k_time, c_time, spread_time = fit_power_law(lengths, times)
    k_mem, c_mem, spread_mem = fit_power_law(lengths, memories)
    spread = math.exp(max(spread_time, spread_mem)) - 1
    basis = (
        f"extrapolated {factor:.1f}x from n={lengths[0]}-{lengths[-1]}: time ~ n^{k_time:.2f}, "
        f"memory ~ n^{k_mem:.2f}, fit spread ±{spread:.0%}"
    )
    return Candidate(
        name,
        exact,
        c_time * seq_len**k_time,
        c_mem * seq_len**k_mem,
        basis,
        extrapolated=True,
        error=None if exact else approximation_error(usable, seq_len),
    )


def check_accuracy(candidate: Candidate, accuracy: list[dict], floors: dict[str, float]) -> str | None:
    for task, floor in floors.items():
        measured = [r for r in accuracy if label(r) == candidate.backend and r.get("task") == task]
        if not measured:
            return f"no accuracy measured on {task} (floor {floor:g})"
        metric = measured[0].get("metric") or "accuracy"
        best = best_value(metric, [r["value"] for r in measured])
        candidate.accuracy[task] = best
        if metric in LOWER_IS_BETTER and best > floor:
            return f"{task} {metric} {best:.4g} is above the ceiling {floor:g}"
        if metric not in LOWER_IS_BETTER and best < floor:
            return f"{task} {metric} {best:.4g} is below the floor {floor:g}"
    return None


def justify(seq_len: int, settings: dict, ranked: list[Candidate], excluded: list[Exclusion]) -> str:
    where = f"{settings['device']}, {settings['dtype']}, causal={settings['causal']}, {settings['step']}"
    if not ranked:
        return (
            f"No backend qualifies at n={seq_len} ({where}): "
            + "; ".join(f"{e.backend}: {e.reason}" for e in excluded)
            + "."
        )  # every reason matters here
    best = ranked[0]
    text = (
        f"At n={seq_len} ({where}), {best.backend} is recommended: {best.time_ms:,.4g} ms and "
        f"{best.memory_mib:,.4g} MiB per step ({best.basis}); it is "
        f"{'exact attention' if best.exact else 'not exact attention (admitted on accuracy evidence or by request)'}."
    )
    if len(ranked) > 1:
        runner = ranked[1]
        text += (
            f" The next, {runner.backend}, takes {runner.time_ms / best.time_ms:.2f}x its time and "
            f"{runner.memory_mib / best.memory_mib:.2f}x its memory."
        )
    if best.extrapolated:
        text += (
            " WARNING: this length was not measured; the figures are extrapolated "
            f"({best.basis.split(':')[0]}) and must be confirmed by a run."
        )
    unmeasured = [e.backend for e in excluded if e.reason.startswith("not measured")]
    others = [f"{e.backend} ({e.reason})" for e in excluded if not e.reason.startswith("not measured")]
    if others:
        text += " Left out: " + "; ".join(others) + "."
    if unmeasured:
        text += f" Not measured in these settings: {', '.join(unmeasured)}."
    return text


def format_table(rec: Recommendation) -> str:
    lines = [
        f"Backends at n={rec.seq_len}: " + ", ".join(f"{k}={v}" for k, v in rec.settings.items() if v is not None),
        "",
        "| rank | backend | exact | error vs full | time ms | peak MiB | basis |",
        "|---:|---|---|---:|---:|---:|---|",
    ]
    for i, c in enumerate(rec.ranked, 1):
        mark = "~" if c.extrapolated else ""
        error = (
            ""
            if c.exact
            else "not measured"
            if c.error is None
            else f"{c.error[0]:.1e}" + ("" if c.error[1] == rec.seq_len else f" (n={c.error[1]})")
        )
        lines.append(
            f"| {i} | {c.backend} | {'yes' if c.exact else 'no'} | {error} | {mark}{c.time_ms:,.4g} | "
            f"{mark}{c.memory_mib:,.4g} | {c.basis} |"
        )
    if rec.excluded:
        lines += ["", "Excluded:"] + [f"- {e.backend}: {e.reason}" for e in rec.excluded]
    return "\n".join(lines + ["", rec.justification])


def parse_floor(text: str) -> tuple[str, float]:
    task, _, value = text.partition("=")
    try:
        return task, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TASK=VALUE (e.g. listops=0.35), got {text!r}") from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of tokens, got {text!r}")
    return value


def factor_at_least_one(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value >= 1:
        raise argparse.ArgumentTypeError(f"expected a factor >= 1, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pick", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="a folder of result.json files (searched recursively)")
    parser.add_argument("--seq-len", type=positive_int, required=True, help="the input length to choose for")
    parser.add_argument("--memory-budget", type=float, metavar="GiB", help="exclude backends whose peak exceeds this")
    parser.add_argument("--causal", action="store_true", help="a causal (decoder) workload")
    parser.add_argument("--dtype", help="float32, bfloat16, ... (default: the most measured)")
    parser.add_argument("--device", help="cpu or cuda (default: the most measured)")
    parser.add_argument(
        "--device-name",
        metavar="NAME",
        help="the machine, as records name it (e.g. 'AMD EPYC (2 cores)'; default: the most "
        "measured): records from other machines are left out",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--inference", action="store_true", help="rank by the forward pass instead of a training step")
    mode.add_argument(
        "--decode",
        action="store_true",
        help="rank by the per-token decode latency against a KV cache of --seq-len tokens "
        "(bench=decode records; the memory budget includes the cache)",
    )
    parser.add_argument(
        "--n-kv-heads",
        type=positive_int,
        metavar="K",
        help="only records with K key/value heads (default: the most measured)",
    )
    parser.add_argument(
        "--scope",
        choices=["attention", "model"],
        help="one attention layer's records or the whole model's (default: the most measured)",
    )
    parser.add_argument(
        "--d-model", type=positive_int, metavar="D", help="only records of model width D (default: the most measured)"
    )
    parser.add_argument(
        "--hf-model",
        action="store_true",
        help="rank from bench=model records: a transformers model with each backend (its training step; "
        "--inference: its prefill; --decode: a decode step against its cache)",
    )
    parser.add_argument(
        "--min-accuracy",
        type=parse_floor,
        action="append",
        default=[],
        metavar="TASK=VALUE",
        help="exclude backends whose best accuracy on TASK is below VALUE (for a metric "
        "where lower is better, bits per character, above VALUE) (repeatable)",
    )
    parser.add_argument(
        "--allow-approximate", action="store_true", help="rank approximate backends even without accuracy evidence"
    )
    parser.add_argument(
        "--max-extrapolation",
        type=factor_at_least_one,
        default=MAX_EXTRAPOLATION,
        metavar="X",
        help=f"exclude backends that would be extrapolated more than X times beyond their "
        f"measured lengths (default {MAX_EXTRAPOLATION:g})",
    )
    parser.add_argument("--json", action="store_true", help="print the recommendation as JSON")
    args = parser.parse_args(argv)
    if not args.path.exists():
        parser.error(f"{args.path} does not exist")
    records = load_records(args.path)
    wanted = "model" if args.hf_model else "decode" if args.decode else "speed"
    if not any(r.get("bench") == wanted for r in records):
        print(f"no {wanted} records under {args.path}", file=sys.stderr)
        return 1
    rec = pick(
        records,
        args.seq_len,
        args.memory_budget,
        args.causal,
        args.dtype,
        args.device,
        args.inference,
        dict(args.min_accuracy),
        args.allow_approximate,
        args.max_extrapolation,
        args.decode,
        args.n_kv_heads,
        args.device_name,
        args.scope,
        args.d_model,
        args.hf_model,
    )
    print(json.dumps(asdict(rec), indent=2) if args.json else format_table(rec))
    far = [c for c in rec.ranked if c.extrapolated]
    if far and not args.json:
        print(
            f"\nWARNING: {', '.join(c.backend for c in far)}: not measured at n={args.seq_len}; "
            "extrapolated figures (marked ~) must be confirmed by a run.",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
