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

from bench import device_lock, measure, records
from bench.benches import get_bench
from bench.cell import PredictedOOM, attention_options, cell_hash, kv_heads, resolved_device
from bench.output_check import WrongOutput
from efficient.attention import Setting, Unavailable, Unsupported, as_value, get_backend, option_defaults


def new_record(cfg) -> dict:
    """A record with everything known before measuring: the cell, the config, the versions."""
    record = records.empty_record()
    record.update(describe_cell(cfg))
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


def describe_cell(cfg) -> dict:
    """The record's fields that say which cell this is (known before anything runs)."""
    scope = cfg.bench.get("scope")
    device = resolved_device(cfg)
    backend = get_backend(cfg.attention.name)
    options = attention_options(cfg)
    defaults = {k: as_value(v) for k, v in option_defaults(backend).items()}
    return {
        "record_version": records.RECORD_VERSION,
        "attention": cfg.attention.name,
        "attention_options": options,
        "label": records.option_label(backend.name, options, defaults),
        "exact": backend.capabilities.exact and not backend.capabilities.sparse_mask,
        "bench": cfg.bench.name,
        "task": cfg.task.name,
        "scope": scope.value if scope else None,
        "seq_len": cfg.seq_len,
        "batch_size": cfg.batch_size,
        "n_heads": cfg.model.n_heads,
        "n_kv_heads": kv_heads(cfg),
        "head_dim": cfg.model.d_model // cfg.model.n_heads,
        "d_model": cfg.model.d_model,
        "n_layers": cfg.model.n_layers,
        "causal": cfg.causal,
        "dtype": cfg.dtype.value,
        "device": device,
        "seed": cfg.seed,
    }


def run_job(cfg, record: dict | None = None, tracker=None, output_dir=None) -> dict:
    """Measure the cell ``cfg`` names and return its record (status set, never raises)."""
    started = time.perf_counter()
    record = record if record is not None else new_record(cfg)
    try:
        device = measure.resolve_device(cfg.device.value)
        record.update(device=device, device_name=measure.device_name(device))
        if device == "cpu":
            torch.set_num_threads(cfg.bench.get("threads") or allotted_cores())
        record["threads"] = torch.get_num_threads()
        check_supported(cfg, device)
        bench = get_bench(cfg.bench.name)
        with device_lock.held(device) if bench.exclusive else nullcontext(None) as waited:
            record["device_lock_wait_s"] = waited
            torch.manual_seed(cfg.seed)
            record.update(bench.run(cfg, device, tracker=tracker, output_dir=output_dir))
        record.update(status="ok", final=True)
    except WrongOutput as e:  # measured, but the output says the figures must not be used
        record.update(e.measured)
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


def allotted_cores() -> int:
    """The cores this job may use: SLURM's allocation where it runs as a SLURM task, else its CPU
    affinity (a cgroup or taskset), not every core of the machine."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    return int(slurm) if slurm else len(os.sched_getaffinity(0))


def check_supported(cfg, device: str) -> None:
    backend = get_backend(cfg.attention.name)
    cell = Setting(
        device=device,
        dtype=cfg.dtype.value,
        causal=cfg.causal,
        key_padding_mask=cfg.bench.get("pad_fraction", 0) > 0,
        head_dim=cfg.model.d_model // cfg.model.n_heads,
        seq_len=cfg.seq_len,
        grouped_query=kv_heads(cfg) != cfg.model.n_heads,
    )
    reason = backend.unsupported_reason(cell, **attention_options(cfg))
    if reason:
        raise Unsupported(reason)
    reason = backend.unavailable_reason(cell, **attention_options(cfg))
    if reason:
        raise Unavailable(reason)
