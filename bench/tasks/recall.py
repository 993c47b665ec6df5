"""``task=recall``: multi-query associative recall, a causal LM task (``efficient.datasets.recall``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.tasks import Task, register_task
from bench.tasks.data import ExampleData, Split
from efficient.bounds import Bound
from efficient.datasets import recall


@dataclass
class RecallTaskConfig:
    name: str = "recall"
    vocab_size: int = 256  # padding, then keys, values and filler in three equal ranges
    n_pairs: int = 16  # key-value pairs at the start of each sequence
    n_queries: int = 16  # keys asked again at the end; their values are scored
    n_train: int = 10000
    n_val: int = 500
    n_test: int = 1000


def recall_splits(task, seq_len: int, seed: int) -> dict[str, Split]:
    """Generated train/val/test splits (seeded, disjoint seeds), every token real."""
    sizes = {"train": task.n_train, "val": task.n_val, "test": task.n_test}
    out = {}
    for i, (split, n) in enumerate(sizes.items()):
        tokens, labels = recall.generate(n, seq_len, task.n_pairs, task.n_queries, task.vocab_size, seed * 1000 + i)
        out[split] = Split(tokens, torch.ones_like(tokens, dtype=torch.bool), labels)
    return out


def recall_data(cell, device: str) -> ExampleData:
    return ExampleData(recall_splits(cell.task, cell.seq_len, cell.seed), cell.batch_size, device, cell.seed)


register_task(
    Task(
        "recall",
        RecallTaskConfig,
        vocab_size=lambda task: task.vocab_size,
        n_classes=lambda task: None,
        data=recall_data,
        bounds={
            "vocab_size": Bound(2),
            "n_pairs": Bound(1),
            "n_queries": Bound(1),
            "n_train": Bound(1),
            "n_val": Bound(1),
            "n_test": Bound(1),
        },
    )
)
