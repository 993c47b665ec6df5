"""One result record per job: its fields, where it is written, and reading a folder of them.

Records are the suite's product, so three rules hold wherever one is written or read:

- a file is replaced atomically (a reader sees the old file or the whole new one), with the
  mode the umask gives (readable by a team on shared storage);
- a record never replaces another cell's record, nor a better record of its own cell
  (``place``): the record it would have replaced is kept, and nothing is deleted;
- a damaged or incomplete ``result.json`` is skipped with a warning that names it, so that
  one bad file never stops a resume, a report or a pick.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from bench import legacy

STATUSES = ("ok", "oom", "unsupported", "wrong", "error")
LOWER_IS_BETTER = frozenset({"test_bpc"})  # accuracy-bench metrics where smaller is better


def best_value(metric: str | None, values):
    """The best of several results of one metric: the smallest bits per character, else the largest."""
    return min(values) if metric in LOWER_IS_BETTER else max(values)


RESULT_FILE = "result.json"
# 3: each bench's own fields (its ``Result``), described in the record (``measures``, ``report``);
# 2: ``label`` and ``exact`` written when measured. Older records still load: ``bench/legacy.py``
# reads them with version 3's names, and ``python -m bench.records upgrade PATH`` rewrites them.
RECORD_VERSION = 3

# field -> meaning; every record has these fields (None when they do not apply), then the fields
# of its bench's result, which ``measures`` names and explains (``bench/results.py``).
FIELDS = {
    "attention": "backend name (conf/attention/<name>.yaml)",
    "attention_options": "the backend's options, every one resolved, e.g. {'kernel': 'flash', 'scale': None}",
    "label": "the backend and the options set away from its defaults when measured, e.g. 'sdpa[kernel=flash]'",
    "exact": "true: equal to full softmax attention up to rounding; false: an approximation, or exact "
    "only under its own sparse mask",
    "bench": "what the job measured (conf/bench/<name>.yaml): speed, decode, maxlen, xl_eval, accuracy, model, ...",
    "task": "synthetic or a data task",
    "scope": "attention (one layer) | model (the whole stack), for a bench that measures a step",
    "seq_len": "tokens per sequence",
    "batch_size": "sequences per step",
    "n_heads": "attention heads",
    "n_kv_heads": "key/value heads (fewer than n_heads: grouped-query attention)",
    "head_dim": "width of one head",
    "d_model": "model width",
    "n_layers": "blocks in the model",
    "causal": "causal mask (bottom-right aligned)",
    "dtype": "float64 | float32 | float16 | bfloat16",
    "device": "cpu | cuda",
    "device_name": "CPU model or GPU name",
    "threads": "CPU threads used (torch.get_num_threads)",
    "status": "ok | oom | unsupported | wrong (measured, but the output is NaN/Inf or an exact backend's "
    "is beyond its tolerance: its figures must not be used) | error",
    "reason": "for anything but ok: a human sentence",
    "final": "true: the status holds for this cell on any machine, and resume=true skips it; false: it "
    "depends on this machine (no CUDA, a package missing) or is an error, and resume=true runs it again",
    "measures": "the bench's fields in this record, each with its meaning",
    "kinds": "the bench's fields: number, text, list or dict (what a reader may rely on)",
    "report": "how the report shows the bench's fields (tables, fitted exponents, the summary line)",
    "seed": "random seed",
    "record_version": "the record's layout (RECORD_VERSION); none: version 1",
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


def measured_fields(record: dict[str, Any]) -> list[str]:
    """The fields a bench measured in ``record``: in a record that is not ``ok`` (a ``wrong`` one
    keeps them) they must not be read as results (W&B files them under ``unverified``)."""
    if record.get("measures"):
        return list(record["measures"])
    return [k for k in record if k not in FIELDS and not k.startswith("_")]  # a record not yet upgraded


# What a reader may rely on a field being, when it is present and not null: the cell's fields,
# and the figures pick and the report rank by (in any record, described or not).
TYPES: dict[str, tuple[type, ...]] = {
    "attention": (str,),
    "bench": (str,),
    "status": (str,),
    "dtype": (str,),
    "device": (str,),
    "seq_len": (int,),
    "batch_size": (int,),
    "n_heads": (int,),
    "n_kv_heads": (int,),
    "d_model": (int,),
    "causal": (bool,),
    "attention_options": (dict,),
    "label": (str,),
    "exact": (bool,),
    "reason": (str,),
    "metric": (str,),
    "measures": (dict,),
    "kinds": (dict,),
    "report": (dict,),
    **dict.fromkeys(("fwd_ms", "fwd_bwd_ms", "fwd_peak_mem_mib", "fwd_bwd_peak_mem_mib", "peak_mem_mib"), (int, float)),
    **dict.fromkeys(("max_abs_err", "max_abs_err_vs_full", "value", "decode_ms", "prefill_peak_mem_mib"), (int, float)),
}
KINDS: dict[str, tuple[type, ...]] = {"number": (int, float), "text": (str,), "list": (list,), "dict": (dict,)}


def type_problem(record: dict[str, Any]) -> str | None:
    """The first field whose value is not of the type readers rely on, as a sentence; or None."""
    kinds = record.get("kinds") if isinstance(record.get("kinds"), dict) else {}
    expected_types = {**{k: KINDS[kind] for k, kind in kinds.items() if kind in KINDS}, **TYPES}
    for key, types in expected_types.items():
        value = record.get(key)
        if value is None:
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            expected = " or ".join(t.__name__ for t in types)
            return f"field {key!r} is {type(value).__name__} {value!r:.40}, not {expected}"
    return None


def empty_record() -> dict[str, Any]:
    return dict.fromkeys(FIELDS)


def validate(record: dict[str, Any]) -> list[str]:
    """Contract violations of ``record`` (empty when it meets the contract)."""
    problems = [f"missing field {k!r}" for k in [*FIELDS, *(record.get("measures") or {})] if k not in record]
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


class RecordWarning(UserWarning):
    """A result file that cannot be read as a record; it is skipped."""


def umask_mode() -> int:
    """The mode a new file gets here (0o666 less the umask), e.g. 0o644."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_file(path: Path | str, mode: str = "w") -> Iterator[IO]:
    """Write ``path`` through a temporary file in its folder, then rename it into place.

    A reader (or a kill at any moment) sees the old file or the whole new one, never a part.
    The file gets the umask's mode, as an ordinary ``open`` would give it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, umask_mode())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path | str, record: dict[str, Any]) -> None:
    """Write a record (any JSON-able dict) atomically."""
    with atomic_file(path) as f:
        json.dump(record, f, indent=2, sort_keys=False, default=str)
        f.write("\n")


# Which record of one cell is its result.json: the better status wins, a tie goes to the newer.
STATUS_RANK = {"ok": 3, "oom": 2, "unsupported": 2, "wrong": 1, "error": 0}


def rank(record: dict[str, Any]) -> int:
    """ok > oom, unsupported > unsupported on this machine only, wrong > error."""
    if record.get("status") == "unsupported" and record.get("final") is False:
        return 1
    return STATUS_RANK.get(record.get("status"), 0)


def aside_path(folder: Path, kind: str) -> Path:
    """A new ``result.<kind>.<time>.json`` beside ``result.json`` (kept, never read as a record)."""
    return folder / f"result.{kind}.{time.time_ns()}.json"


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive among the processes that place records in ``folder`` (concurrent sweeps)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".result.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def place(folder: Path | str, record: dict[str, Any]) -> tuple[Path, str]:
    """Write ``record`` as the ``result.json`` of its cell in ``folder`` without losing a record.

    - nothing there, or an earlier record of the same cell that is not better: this record
      becomes ``result.json``, and the earlier one is kept as ``result.superseded.<time>.json``;
    - a better record of the same cell (an ``ok`` that a later ``error`` would replace): it
      stays ``result.json``, and this one is kept as ``result.rejected.<time>.json``;
    - another cell's record (two cells sent to one folder): this record goes to the subfolder
      ``cell-<config_hash>/``, under the same rules.

    Returns (the path written, a sentence for the user when more happened than a plain write).
    """
    folder = Path(folder)
    with folder_lock(folder):
        target = folder / RESULT_FILE
        current = read_record(target) if target.exists() else None
        if current is not None and current.get("config_hash") != record.get("config_hash"):
            path, _ = place(folder / f"cell-{record.get('config_hash')}", record)
            return path, (
                f"{target} holds another cell's record ({current['attention']}, n={current['seq_len']}); "
                f"this record is written to {path} instead"
            )
        if current is not None and rank(current) > rank(record):
            path = aside_path(folder, "rejected")
            write_atomic(path, record)
            return path, (
                f"kept the earlier {current['status']} record {target}; this {record.get('status')} "
                f"record is kept beside it as {path.name}"
            )
        note = ""
        if target.exists():  # the same cell measured again (or a damaged file): keep the old one
            kept = aside_path(folder, "superseded")
            os.replace(target, kept)
            note = f"the earlier record of this cell is kept as {kept}"
        write_atomic(target, record)
        return target, note


# What every reader relies on: a record without these is skipped (with a warning).
REQUIRED = ("attention", "bench", "status", "seq_len", "dtype", "device")


def read_record(path: Path) -> dict[str, Any] | None:
    """The record in ``path``, or None (with a warning that names the file) if it is not one."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        warnings.warn(
            f"skipped {path}: not a readable JSON record ({type(e).__name__}: {e})", RecordWarning, stacklevel=2
        )
        return None
    if not isinstance(record, dict):
        warnings.warn(
            f"skipped {path}: a record is a JSON object, not a {type(record).__name__}", RecordWarning, stacklevel=2
        )
        return None
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        warnings.warn(
            f"skipped {path}: not a result record (missing {', '.join(missing)})", RecordWarning, stacklevel=2
        )
        return None
    if record["status"] not in STATUSES:
        warnings.warn(
            f"skipped {path}: status {record['status']!r} is not one of {', '.join(STATUSES)}",
            RecordWarning,
            stacklevel=2,
        )
        return None
    if problem := type_problem(record):
        warnings.warn(f"skipped {path}: {problem}", RecordWarning, stacklevel=2)
        return None
    if record.get("record_version", 1) < 3:
        record = legacy.as_version_3(record)
    record["_path"] = str(path)
    return record


def load_records(root: Path | str) -> list[dict[str, Any]]:
    """Every readable ``result.json`` under ``root`` (a folder) or ``root`` itself (a file).

    Unreadable or incomplete files are skipped with a warning that names them."""
    root = Path(root)
    paths: Iterable[Path] = [root] if root.is_file() else sorted(root.rglob(RESULT_FILE))
    return [record for path in paths if (record := read_record(path)) is not None]


# How a cell is run, logged or continued; not what it measures (left out of config_hash).
UNHASHED = {"": ("resume", "wandb"), "bench": ("progress", "resume")}
# Settings added after records existed, left out of the hash at the value that measures what
# those records measured (so that a study recorded before them still resumes).
NEUTRAL = {
    "model": {"n_kv_heads": None, "architecture": None, "hf_config": None, "config_json": None},
    "bench": {"causal": True, "min_time_s": 0.0},
}


def config_hash(config: dict[str, Any], device: str | None = None) -> str:
    """A stable hash of what a resolved config measures: equal configs, equal hashes.

    ``device``: the device that ``device=auto`` resolved to, so that a CPU run and a GPU run of
    one config are two cells (each is resumed on its own kind of machine).
    """
    kept = {k: v for k, v in config.items() if k not in UNHASHED[""]}
    if device is not None:
        kept["device"] = device
    if isinstance(kept.get("bench"), dict):
        kept["bench"] = {k: v for k, v in kept["bench"].items() if k not in UNHASHED["bench"]}
    for group, neutral in NEUTRAL.items():
        if isinstance(kept.get(group), dict):
            kept[group] = {k: v for k, v in kept[group].items() if k not in neutral or v != neutral[k]}
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def option_label(name: str, options: dict[str, Any], defaults: dict[str, Any]) -> str:
    """'sdpa[kernel=flash]': the backend and the options that differ from ``defaults``."""
    changed = [f"{k}={v}" for k, v in options.items() if k not in defaults or defaults[k] != v]
    return f"{name}[{','.join(changed)}]" if changed else name


def cell_label(record: dict[str, Any]) -> str:
    """The record's label, written when it was measured. A version-1 record has none until
    upgraded (``upgrade``): it is labelled with every option it has."""
    return record.get("label") or option_label(record["attention"], record.get("attention_options") or {}, {})


def upgrade(record: dict[str, Any]) -> dict[str, Any]:
    """An older record as the current version writes it: version 2's ``label`` and ``exact``,
    from the backend's defaults and capabilities in this checkout of the suite (the defaults may
    have changed since it was measured, so this is done once, on purpose); version 3's field
    names (``bench/legacy.py``) and its bench's description. Needs torch and the registries."""
    version = record.get("record_version", 1)
    if version >= RECORD_VERSION:
        return record
    from bench.benches import bench_names, get_bench
    from efficient.attention import as_value, backend_names, get_backend, option_defaults

    record = dict(record)
    if version < 2:
        if record["attention"] in backend_names():
            backend = get_backend(record["attention"])
            defaults = {k: as_value(v) for k, v in option_defaults(backend).items()}
            record["label"] = option_label(record["attention"], record.get("attention_options") or {}, defaults)
            record["exact"] = backend.capabilities.exact and not backend.capabilities.sparse_mask
        else:  # a backend this version of the suite does not have: labelled with every option
            record["label"], record["exact"] = cell_label(record), False
    record = legacy.as_version_3(record)
    if record["bench"] in bench_names():
        record.update(get_bench(record["bench"]).result.describe())
    record["record_version"] = RECORD_VERSION
    return record


def upgrade_folder(root: Path | str) -> int:
    """Upgrade every older ``result.json`` under ``root`` in place (atomically); returns how many."""
    count = 0
    paths: Iterable[Path] = [Path(root)] if Path(root).is_file() else sorted(Path(root).rglob(RESULT_FILE))
    for path in paths:
        record = read_record(path)
        if record is not None and record.get("record_version", 1) < RECORD_VERSION:
            record.pop("_path")
            write_atomic(path, upgrade(record))
            count += 1
    return count


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
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m bench.records",
        description="Upgrade older result records in "
        "place to the current layout (label, exactness, each bench's own fields and their description).",
    )
    parser.add_argument("command", choices=["upgrade"])
    parser.add_argument("path", type=Path, help="a folder of result.json files (searched recursively), or one file")
    args = parser.parse_args()
    print(f"upgraded {upgrade_folder(args.path)} records under {args.path} to version {RECORD_VERSION}")
