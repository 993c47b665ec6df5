"""W&B logging: one run per job, grouped by sweep, offline unless the user says otherwise.

Mode: ``wandb.mode`` in the config, else ``$WANDB_MODE``, else ``offline`` (the run is written
under the job's output folder; ``wandb sync`` uploads it later). ``disabled`` logs nothing.
The run is always finished, with a non-zero exit code when the job raised. A W&B failure
never loses a measurement: the result file is written first and W&B problems are warnings.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

from bench.records import cell_label, measured_fields

SUMMARY_SKIP = {"config", "versions", "traceback", "attention_options", "measures", "kinds", "report"}
# How W&B summarises the metrics that jobs log as history (accuracy jobs' learning curves).
# A speed job logs no history: its record is written to the summary as it is.
SUMMARIES = {"train_loss": "min", "val_accuracy": "max", "val_bpc": "min"}


def wandb_mode(cfg) -> str:
    return cfg.wandb.mode or os.environ.get("WANDB_MODE") or "offline"


def run_name(record: dict[str, Any]) -> str:
    """The cell as a run name, naming every setting that tells cells apart, e.g.
    'sdpa[kernel=flash]-n4096-b1-16x128-bfloat16-cuda-causal-#3fa2c1'.

    Backend and options, length, batch, heads x head width, dtype, device; then causal, the
    model scope, a bench and task other than speed/synthetic, a seed other than 0 when they
    apply; and the cell's config hash, so that two runs share a name only if they share a cell.
    """
    r = record
    parts = [
        cell_label(r),
        f"n{r['seq_len']}",
        f"b{r.get('batch_size')}",
        f"{r.get('n_heads')}x{r.get('head_dim')}",
        r["dtype"],
        r["device"],
    ]
    parts += ["causal"] * bool(r.get("causal"))
    parts += [f"model{r.get('n_layers')}L"] * (r.get("scope") == "model")
    parts += [r["bench"]] * (r["bench"] != "speed") + [r.get("task")] * (r.get("task") not in ("synthetic", None))
    parts += [f"seed{r['seed']}"] * bool(r.get("seed"))
    return "-".join(str(p) for p in parts) + (f"-#{r['config_hash'][:6]}" if r.get("config_hash") else "")


class Tracker:
    """Logs to a W&B run, or does nothing when W&B is disabled or failed to start."""

    def __init__(self, run=None):
        self.run = run

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summarize(self, record: dict[str, Any]) -> None:
        """The record as the run's summary. A record that is not ``ok`` (a ``wrong`` one keeps
        its figures) files them under ``unverified``, where no dashboard panel of ``fwd_ms``
        and the like reads them, and the run is tagged with its status."""
        if self.run is None:
            return
        summary = {
            k: v
            for k, v in record.items()
            if k not in SUMMARY_SKIP
            and not k.startswith("_")
            and v is not None
            and not (isinstance(v, float) and not math.isfinite(v))
        }
        if record.get("status") != "ok":
            unverified = {k: summary.pop(k) for k in measured_fields(record) if k in summary}
            if unverified:
                summary["unverified"] = unverified
        try:
            if record.get("status") != "ok":
                self.run.tags = (*self.run.tags, str(record.get("status")))
            self.run.summary.update(summary)
        except Exception as e:  # the record is already written
            warnings.warn(
                f"W&B summary not written ({type(e).__name__}: {e}); the result file has the record", stacklevel=2
            )


def log_sweep_table(cfg, rows: list[dict[str, Any]], sweep_dir: Path) -> None:
    """One W&B run per sweep holding a Table of every cell (status and reason included)."""
    mode = wandb_mode(cfg)
    if mode == "disabled" or not rows:
        return
    try:
        import wandb

        columns = [k for k in rows[0] if k not in SUMMARY_SKIP and not k.startswith("_")]
        table = wandb.Table(
            columns=["cell", *columns], data=[[run_name(r), *[table_value(r.get(k)) for k in columns]] for r in rows]
        )
        run = start_run(
            cfg,
            mode,
            dir=str(sweep_dir),
            group=sweep_dir.name,
            name=f"{sweep_dir.name}-cells",
            job_type="sweep-table",
            tags=["sweep-table", *cfg.wandb.tags],
        )
        run.log({"cells": table})
        run.finish()
    except Exception as e:  # the report files are already written
        warnings.warn(f"W&B sweep table not logged ({type(e).__name__}: {e})", stacklevel=2)


def start_run(cfg, mode: str, **kwargs):
    """wandb.init with the suite's settings: no console capture, no system-metric sampling
    (it would compete with the timed code), quiet."""
    import wandb

    return wandb.init(
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        mode=mode,
        settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
        reinit="finish_previous",
        **kwargs,
    )


def table_value(value: Any) -> Any:
    return value if value is None or isinstance(value, (int, float, str, bool)) else str(value)


@contextlib.contextmanager
def wandb_run(cfg, record: dict[str, Any], output_dir: Path, group: str | None) -> Iterator[Tracker]:
    """Start the job's W&B run (config = the resolved config), yield a Tracker, always finish."""
    mode = wandb_mode(cfg)
    if mode == "disabled":
        yield Tracker()
        return
    try:
        run = start_run(
            cfg,
            mode,
            dir=str(output_dir),
            group=group,
            name=run_name(record),
            job_type=record["bench"],
            tags=[
                record["attention"],
                record["bench"],
                record["task"],
                record["device"],
                record["dtype"],
                *cfg.wandb.tags,
            ],
            config={**record["config"], "cell": {k: record[k] for k in ("attention", "seq_len", "dtype", "device")}},
        )
    except Exception as e:  # no account, no network, ... : keep measuring, say why
        warnings.warn(f"W&B run not started ({type(e).__name__}: {e}); results are still written", stacklevel=2)
        yield Tracker()
        return
    for metric, summary in SUMMARIES.items():
        run.define_metric(metric, summary=summary)
    exit_code = 1
    try:
        yield Tracker(run)
        exit_code = 0
    finally:
        run.finish(exit_code=exit_code)
