"""``bench=accuracy``: train a model with any backend on a task, then evaluate it.

The loop users expect: AdamW, linear warm-up then cosine decay, gradient clipping, bf16
autocast on GPU, validation every ``eval_every`` steps, the best weights on validation kept
(``best.pt``, weights only, loaded with ``weights_only=True``), a progress bar, seeded data
order and initialisation, and a clean resume from ``last.pt`` (``bench.resume=true``, or a SLURM
job requeued after preemption: model, optimiser, schedule, step, the data order or stream
position, and the memory). The learning curve goes to the W&B run's history; the record gets
the test metric, throughput, peak memory, wall time and steps. What is read and how it is scored
comes from the task (``bench/tasks``).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from tqdm import tqdm

from bench import measure, records
from bench.benches import Bench, register_bench
from bench.cell import Cell, build_model
from bench.results import Result, measured
from bench.tasks import get_task, task_names
from efficient.attention import Unsupported
from efficient.bounds import Bound


@dataclass
class AccuracyBenchConfig:
    name: str = "accuracy"
    steps: int = 2000
    lr: float = 1e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.01
    warmup_steps: int = 100  # linear warm-up, then cosine decay to zero
    clip: float = 1.0  # gradient norm clipping
    eval_every: int = 200  # validation accuracy (and checkpoints) every this many steps
    amp: bool = True  # bf16 autocast on GPU
    resume: bool = False  # continue from last.pt in the output folder
    progress: bool = True  # the progress bar
    threads: Optional[int] = None  # CPU threads; None: the cores allotted (SLURM, affinity); 1 side by side


def save_checkpoint(state: dict, path: Path) -> None:
    """torch.save, atomically: a kill during the save leaves the previous checkpoint whole."""
    with records.atomic_file(path, "wb") as f:
        torch.save(state, f)


class DamagedCheckpoint(Exception):
    """A checkpoint that cannot be loaded; the message names the file and what to do."""


@contextlib.contextmanager
def readable_checkpoint(path: Path):
    """Turn a failure to load ``path`` into one sentence that names the file and the fix."""
    try:
        yield
    except Exception as e:
        first_line = (str(e).splitlines() or [""])[0]
        raise DamagedCheckpoint(
            f"checkpoint {path} cannot be loaded ({type(e).__name__}: {first_line}); it is damaged or from "
            f"another model or suite version. Delete it (training then starts from step 0) or point the "
            f"run at another output folder"
        ) from e


def learning_rate(step: int, warmup: int, total: int) -> float:
    """Multiplier of the peak rate: linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass(frozen=True, kw_only=True)
class AccuracyResult(Result):
    """A model trained on the task with the cell's attention, then scored on its test split."""

    TABLE = "Training and test (bench=accuracy)"

    metric: str = measured("the test metric's name: test_accuracy, test_bpc, ...", column="metric")
    value: float = measured(
        "the test metric on the best weights on validation",
        pivot="Test metric (the record's metric)",
        column="test",
        headline="{record[metric]} {0:.4g}",
    )
    best_val: float = measured("the best validation score of the same metric", column="best validation")
    best_step: int = measured(
        "the step of the best validation score (its weights are tested)", column="at step", fmt=","
    )
    steps: int = measured("training steps taken", column="steps", fmt=",")
    resumed_from_step: int = measured("the step the job resumed from (0: it started afresh)")
    train_seconds: float = measured("training time, s", column="training s", fmt=",.0f")
    fwd_bwd_tokens_per_s: float = measured("real (unpadded) tokens trained on per second")
    peak_mem_mib: float = measured(
        "peak memory of one training step above the inputs, MiB", column="peak MiB", fmt=",.0f"
    )
    data: dict = measured("what the task read: its source, splits, truncation")


def run_accuracy(cell: Cell, tracker=None, output_dir: Path | None = None) -> AccuracyResult:
    device = cell.device
    bench, task = cell.bench, get_task(cell.task.name)
    backend = cell.backend
    if not backend.trains_on(device, **cell.options):
        raise Unsupported(
            f"{backend.name} has no backward on {device}{cell.option_words()}, and training needs one "
            f"(it trains on: {', '.join(backend.capabilities.backward_devices)})"
        )
    if task.data is None:
        trainable = [name for name in task_names() if get_task(name).data is not None]
        raise ValueError(f"task {task.name} has no data to train on; bench=accuracy takes: {', '.join(trainable)}")
    if (task.n_classes(cell.task) is None) != bool(cell.causal):
        kind = (
            "a causal language-modelling task: set causal=true"
            if not cell.causal
            else "a classification task for an encoder: set causal=false"
        )
        raise ValueError(f"task {task.name} is {kind}")
    output_dir = Path(output_dir or ".")
    torch.manual_seed(cell.seed)
    data = task.data(cell, device)
    model = build_model(cell).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=bench.lr, weight_decay=bench.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate(step, bench.warmup_steps, bench.steps)
    )
    step, best_val, best_step = 0, None, 0
    last, best = output_dir / "last.pt", output_dir / "best.pt"
    requeued = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0  # preempted and requeued by SLURM
    if (bench.resume or requeued) and last.exists():
        with readable_checkpoint(last):
            state = torch.load(last, weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            data.load_state_dict(state["data"])
            step, best_val, best_step = state["step"], state["best_val"], state["best_step"]
            torch.set_rng_state(state["rng"])  # dropout masks continue as if never stopped
    resumed_from = step

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda" and bench.amp)

    def improves(value: float) -> bool:
        return best_val is None or (value > best_val if data.higher_is_better else value < best_val)

    validation = "val_" + data.metric.removeprefix("test_")
    started, tokens_seen = time.perf_counter(), 0
    model.train()
    progress = tqdm(
        total=bench.steps,
        initial=step,
        desc=f"{cell.attention} {task.name}",
        mininterval=5,
        disable=not bench.progress,
    )
    while step < bench.steps:
        with autocast():
            loss, n_tokens = data.train_loss(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), bench.clip)
        optimizer.step()
        schedule.step()
        step += 1
        tokens_seen += n_tokens
        progress.update(1)
        metrics = {"train_loss": loss.item(), "lr": schedule.get_last_lr()[0]}
        if step % bench.eval_every == 0 or step == bench.steps:
            with autocast():
                metrics[validation] = data.score(model, "val")
            progress.set_postfix(loss=f"{loss.item():.3f}", val=f"{metrics[validation]:.3f}")
            if improves(metrics[validation]):
                best_val, best_step = metrics[validation], step
                save_checkpoint(model.state_dict(), best)
            save_checkpoint(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "data": data.state_dict(),
                    "step": step,
                    "rng": torch.get_rng_state(),
                    "best_val": best_val,
                    "best_step": best_step,
                },
                last,
            )
        if tracker is not None:
            tracker.log(metrics, step=step)
    progress.close()
    train_s = time.perf_counter() - started

    with readable_checkpoint(best):
        model.load_state_dict(torch.load(best, weights_only=True))
    with autocast():
        test_value = data.score(model, "test")

    def one_step():
        data.probe_loss(model).backward()
        model.zero_grad(set_to_none=True)

    peak = measure.peak_memory_bytes(one_step, device)
    return AccuracyResult(
        metric=data.metric,
        value=test_value,
        best_val=best_val,
        best_step=best_step,
        steps=step,
        resumed_from_step=resumed_from,
        train_seconds=train_s,
        fwd_bwd_tokens_per_s=tokens_seen / train_s if tokens_seen else None,  # real (unpadded) tokens
        peak_mem_mib=peak / measure.MIB,
        data=data.describe(),
    )


register_bench(
    Bench(
        "accuracy",
        AccuracyBenchConfig,
        run_accuracy,
        AccuracyResult,
        exclusive=False,
        bounds={
            "steps": Bound(1),
            "lr": Bound(0, open=True),
            "weight_decay": Bound(0),
            "warmup_steps": Bound(0),
            "clip": Bound(0, open=True),
            "eval_every": Bound(1),
            "threads": Bound(1),
        },
    )
)
