"""One result record per job: its fields, its atomic write, and reading a folder of them."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

STATUSES = ("ok", "oom", "unsupported", "error")
LOWER_IS_BETTER = frozenset({"test_bpc"})  # accuracy-bench metrics where smaller is better


def best_value(metric: str | None, values):
    """The best of several results of one metric: the smallest bits per character, else the largest."""
    return min(values) if metric in LOWER_IS_BETTER else max(values)


RESULT_FILE = "result.json"

# field -> meaning; every record has every field (None when it does not apply).
FIELDS = {
    "attention": "backend name (conf/attention/<name>.yaml)",
    "attention_options": "the backend's options, e.g. {'kernel': 'flash'}",
    "bench": "speed | accuracy",
    "task": "synthetic or a data task",
    "scope": "attention (one layer) | model (the whole stack)",
    "seq_len": "tokens per sequence",
    "batch_size": "sequences per step",
    "n_heads": "attention heads",
    "head_dim": "width of one head",
    "d_model": "model width",
    "n_layers": "blocks in the model",
    "causal": "causal mask (bottom-right aligned)",
    "dtype": "float64 | float32 | float16 | bfloat16",
    "device": "cpu | cuda",
    "device_name": "CPU model or GPU name",
    "threads": "CPU threads used (torch.get_num_threads)",
    "status": "ok | oom | unsupported | error",
    "reason": "for anything but ok: a human sentence",
    "fwd_ms": "median forward latency (no grad), ms",
    "fwd_ms_p20": "20th percentile forward latency, ms",
    "fwd_ms_p80": "80th percentile forward latency, ms",
    "fwd_bwd_ms": "median forward+backward latency, ms",
    "fwd_bwd_ms_p20": "20th percentile forward+backward latency, ms",
    "fwd_bwd_ms_p80": "80th percentile forward+backward latency, ms",
    "fwd_peak_mem_mib": "peak memory of the forward (no grad) above the inputs, MiB",
    "fwd_bwd_peak_mem_mib": "peak memory of forward+backward above the inputs, MiB",
    "peak_mem_mib": "peak memory of the measured step: forward+backward if measured, else forward",
    "first_call_s": "the first forward call, timed apart (includes compilation / autotuning)",
    "attention_ops": "the attention kernels (ATen / xformers / flex ops) seen running the forward",
    "note": "a remark on an ok record, e.g. what was not measured and why",
    "predicted_mem_mib": "the memory model's prediction for the step (the guard's input), MiB",
    "fwd_tokens_per_s": "batch * seq_len / forward time",
    "fwd_bwd_tokens_per_s": "batch * seq_len / forward+backward time",
    "flops_fwd": "analytic forward FLOPs of the measured step",
    "tflops": "achieved forward TFLOP/s",
    "fwd_bwd_tflops": "achieved forward+backward TFLOP/s",
    "mfu": "forward TFLOP/s over the device's dense half-precision peak (when known)",
    "max_abs_err": "max |output - exact reference| on the same inputs and parameters",
    "reference": "what max_abs_err compares against",
    "metric": "accuracy jobs: the metric's name",
    "value": "accuracy jobs: the metric's value",
    "extra": "bench-specific measurements (e.g. xl_eval: both models' per-token times)",
    "seed": "random seed",
    "config_hash": "hash of the resolved config, less how it is run and logged: the cell's identity",
    "host": "machine that ran the job",
    "pid": "process that ran the job",
    "device_lock_wait_s": "time waited for the device's timing lock (timing jobs never share a device)",
    "wall_s": "wall time of the job, s",
    "config": "the full resolved config",
    "versions": "python, torch, cuda, xformers, ... versions",
    "git_sha": "commit of the suite that measured it",
    "traceback": "for status error: the traceback",
}


def empty_record() -> dict[str, Any]:
    return dict.fromkeys(FIELDS)


def validate(record: dict[str, Any]) -> list[str]:
    """Contract violations of ``record`` (empty when it meets the contract)."""
    problems = [f"missing field {k!r}" for k in FIELDS if k not in record]
    status = record.get("status")
    if status not in STATUSES:
        problems.append(f"status {status!r} is not one of {', '.join(STATUSES)}")
    elif status != "ok" and not record.get("reason"):
        problems.append(f"status {status!r} needs a reason")
    if status == "ok" and record.get("bench") == "speed":
        for key in ("fwd_ms", "peak_mem_mib", "tflops"):
            value = record.get(key)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                problems.append(f"ok speed record needs a finite {key}, got {value!r}")
    return problems


def write_atomic(path: Path, record: dict[str, Any]) -> None:
    """Write JSON so that a reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_records(root: Path | str) -> list[dict[str, Any]]:
    """Every ``result.json`` under ``root`` (a folder) or ``root`` itself (a file)."""
    root = Path(root)
    paths: Iterable[Path] = [root] if root.is_file() else sorted(root.rglob(RESULT_FILE))
    records = []
    for path in paths:
        with open(path) as f:
            record = json.load(f)
        record["_path"] = str(path)
        records.append(record)
    return records


# How a cell is run, logged or continued; not what it measures (left out of config_hash).
UNHASHED = {"": ("resume", "wandb"), "bench": ("progress", "resume")}


def config_hash(config: dict[str, Any]) -> str:
    """A stable hash of what a resolved config measures: equal configs, equal hashes."""
    kept = {k: v for k, v in config.items() if k not in UNHASHED[""]}
    if isinstance(kept.get("bench"), dict):
        kept["bench"] = {k: v for k, v in kept["bench"].items() if k not in UNHASHED["bench"]}
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cell_label(record: dict[str, Any]) -> str:
    """'sdpa[kernel=flash]': the backend and the options that differ from its defaults."""
    name, options = record["attention"], record.get("attention_options") or {}
    try:
        from efficient.attention import get_backend, option_defaults

        defaults = {k: getattr(v, "value", v) for k, v in option_defaults(get_backend(name)).items()}
    except KeyError:  # a backend this version of the suite does not have
        defaults = {}
    changed = [f"{k}={v}" for k, v in options.items() if k not in defaults or defaults[k] != v]
    return f"{name}[{','.join(changed)}]" if changed else name


def versions() -> dict[str, str | None]:
    import torch

    found: dict[str, str | None] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    for package in ("xformers", "einops", "hydra-core", "wandb", "triton"):
        try:  # from the installed metadata: importing xformers would print its load warnings
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
