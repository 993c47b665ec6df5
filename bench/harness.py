"""One job = one measurement = one record. No failure escapes as an exception.

A cell a backend cannot run is ``unsupported`` (checked from its capabilities before anything
is built); a cell predicted over the memory budget, or that really runs out of memory, is
``oom``; a cell whose measured output is NaN/Inf, or beyond an exact backend's tolerance, is
``wrong`` (its figures kept beside that status); anything else that goes wrong is ``error``
with its traceback in the record.
``final`` says whether the status belongs to the cell (ok, oom, unsupported by the backend) or
to this machine (no CUDA here, xformers missing; and every error): resume retries the latter.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from contextlib import nullcontext

import torch
from omegaconf import OmegaConf

from bench import device_lock, measure, ranks, records
from bench.benches import get_bench
from bench.cell import Cell, PredictedOOM, cell_hash
from bench.output_check import WrongOutput
from efficient.attention import Unavailable, Unsupported, as_value, option_defaults


def new_record(cfg) -> dict:
    """A record with everything known before measuring: the cell, the config, the versions."""
    record = records.empty_record()
    cell = Cell.of(cfg)
    record.update(describe_cell(cell))
    described = get_bench(cell.bench.name).result.describe()  # the record describes its measurements
    record.update(dict.fromkeys(described["measures"]), **described)  # each None until measured
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    record.update(
        config=config,
        config_hash=cell_hash(cfg),
        versions=records.versions(),
        git_sha=records.git_sha(),
        host=socket.gethostname(),
        pid=os.getpid(),
    )
    return record


def describe_cell(cell: Cell) -> dict:
    """The record's fields that say which cell this is (known before anything runs)."""
    backend = cell.backend
    defaults = {k: as_value(v) for k, v in option_defaults(backend).items()}
    bench = get_bench(cell.bench.name)
    own = bench.describes(cell) if bench.describes else {}  # e.g. bench=model: hf:sdpa, a model's own window
    return {
        "record_version": records.RECORD_VERSION,
        "attention": cell.attention,
        "attention_options": dict(cell.options),
        "label": own.get("label") or records.option_label(backend.name, dict(cell.options), defaults),
        "exact": own.get("exact", backend.capabilities.exact and not backend.capabilities.sparse_mask),
        "bench": cell.bench.name,
        "task": cell.task.name,
        "scope": cell.scope,
        "seq_len": cell.seq_len,
        "batch_size": cell.batch_size,
        "n_heads": cell.model.n_heads,
        "n_kv_heads": cell.n_kv_heads,
        "head_dim": cell.head_dim,
        "d_model": cell.model.d_model,
        "n_layers": cell.model.n_layers,
        "causal": cell.causal,
        "dtype": cell.dtype,
        "device": cell.device,
        "seed": cell.seed,
    }


def run_job(cfg, record: dict | None = None, tracker=None, output_dir=None) -> dict:
    """Measure the cell ``cfg`` names and return its record (status set, never raises)."""
    started = time.perf_counter()
    record = record if record is not None else new_record(cfg)
    try:
        cell = Cell.of(cfg, measure.resolve_device(as_value(cfg.device)))
        record.update(device=cell.device, device_name=measure.device_name(cell.device))
        if cell.device == "cpu":
            torch.set_num_threads(getattr(cell.bench, "threads", None) or ranks.allotted_cores())
        record["threads"] = torch.get_num_threads()
        check_supported(cell)
        bench = get_bench(cell.bench.name)
        with device_lock.held(cell.device) if bench.exclusive else nullcontext(None) as waited:
            record["device_lock_wait_s"] = waited
            torch.manual_seed(cell.seed)
            record.update(bench.run(cell, tracker=tracker, output_dir=output_dir).fields())
        record.update(status="ok", final=True)
    except WrongOutput as e:  # measured, but the output says the figures must not be used
        if e.measured is not None:
            record.update(e.measured.fields())
        record.update(status="wrong", reason=str(e), final=False)
    except Unavailable as e:
        record.update(status="unsupported", reason=str(e), final=False)
    except Unsupported as e:
        record.update(status="unsupported", reason=str(e), final=True)
    except PredictedOOM as e:
        record.update(status="oom", reason=str(e), final=True)
    except (torch.OutOfMemoryError, MemoryError) as e:
        record.update(status="oom", reason=f"out of memory while running: {str(e).splitlines()[0]}", final=True)
    except Exception as e:  # recorded, so that a sweep goes on past a failing cell
        reason = f"{type(e).__name__}: {e}"
        if type(e).__name__ == "UncompletedJobError":  # submitit, on SLURM's signal at the time limit
            reason = f"the scheduler stopped the job before it finished ({e}); resume=true runs it again"
        record.update(status="error", reason=reason, traceback=traceback.format_exc(), final=False)
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    record["wall_s"] = time.perf_counter() - started
    return record


def check_supported(cell: Cell) -> None:
    """Unsupported (the backend cannot run the cell) or Unavailable (this machine cannot), with the reason."""
    reason = cell.backend.unsupported_reason(cell.setting(), **cell.options)
    if reason:
        raise Unsupported(reason)
    reason = cell.backend.unavailable_reason(cell.setting(), **cell.options)
    if reason:
        raise Unavailable(reason)
