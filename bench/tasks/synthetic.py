"""``task=synthetic``: random inputs for speed and memory (normal activations, or uniform token
ids for ``bench.scope=model``); nothing to train on."""

from __future__ import annotations

from dataclasses import dataclass

from bench.tasks import Task, register_task
from efficient.bounds import Bound


@dataclass
class SyntheticTaskConfig:
    name: str = "synthetic"
    vocab_size: int = 256  # token ids drawn for the `model` scope
    n_classes: int = 10


register_task(
    Task(
        "synthetic",
        SyntheticTaskConfig,
        vocab_size=lambda task: task.vocab_size,
        n_classes=lambda task: task.n_classes,
        bounds={"vocab_size": Bound(2), "n_classes": Bound(2)},
    )
)
