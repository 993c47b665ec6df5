"""``task=listops``: LRA's ListOps, generated or read from LRA's TSV files (``efficient.datasets.listops``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from bench.tasks import Task, register_task
from bench.tasks.data import ExampleData, Split
from efficient.bounds import Bound
from efficient.datasets import listops


@dataclass
class ListOpsTaskConfig:
    name: str = "listops"
    data_dir: Optional[str] = None  # a folder with LRA's basic_{train,val,test}.tsv; None: generate
    n_train: int = 20000
    n_val: int = 1000
    n_test: int = 2000
    min_length: int = 500  # keep min_length < L < max_length, L = operators + digits + "]" (LRA's window)
    max_length: int = 2000  # LRA: 500 < L < 2000, depth <= 10, <= 10 arguments; inputs are cut to seq_len
    max_depth: int = 10
    max_args: int = 10


def encode(examples: list[listops.Example], seq_len: int) -> tuple[Split, int]:
    """LRA's input pipeline: parentheses dropped, tokens to ids, each input cut to its first
    ``seq_len`` tokens (LRA's ``max_length``), then padded. Returns (the split, how many were cut)."""
    if not examples:
        raise ValueError("no ListOps examples to encode")
    tokens = torch.full((len(examples), seq_len), listops.PAD, dtype=torch.long)
    truncated = 0
    for i, e in enumerate(examples):
        ids = [listops.TOKEN_ID[t] for t in listops.model_tokens(e.tokens)]
        truncated += len(ids) > seq_len
        tokens[i, : min(len(ids), seq_len)] = torch.tensor(ids[:seq_len], dtype=torch.long)
    return Split(tokens, tokens != listops.PAD, torch.tensor([e.label for e in examples])), truncated


def listops_splits(task, seq_len: int, seed: int) -> tuple[dict[str, Split], dict[str, int]]:
    """LRA's TSV files when ``task.data_dir`` is set, else generated splits (seeded, disjoint seeds).

    Returns the splits and, per split, how many inputs were longer than ``seq_len`` and cut.
    """
    if task.data_dir:
        folder = Path(task.data_dir)
        files = {"train": "basic_train.tsv", "val": "basic_val.tsv", "test": "basic_test.tsv"}
        examples = {split: listops.load_tsv(folder / name) for split, name in files.items()}
    else:
        sizes = {"train": task.n_train, "val": task.n_val, "test": task.n_test}
        examples = {
            split: listops.generate(
                n,
                seed=seed * 1000 + i,
                min_length=task.min_length,
                max_length=task.max_length,
                max_depth=task.max_depth,
                max_args=task.max_args,
            )
            for i, (split, n) in enumerate(sizes.items())
        }
    encoded = {split: encode(e, seq_len) for split, e in examples.items()}
    return {split: s for split, (s, _) in encoded.items()}, {split: n for split, (_, n) in encoded.items()}


class ListOpsData(ExampleData):
    """ListOps splits; the record also says how many inputs were cut to ``seq_len``, if any."""

    def __init__(self, cell, device: str):
        splits, self.truncated = listops_splits(cell.task, cell.seq_len, cell.seed)
        super().__init__(splits, cell.batch_size, device, cell.seed)

    def describe(self) -> dict:
        cut = {f"n_{split}_truncated": n for split, n in self.truncated.items() if n}
        return {**super().describe(), **cut}


register_task(
    Task(
        "listops",
        ListOpsTaskConfig,
        vocab_size=lambda task: len(listops.VOCAB),
        n_classes=lambda task: listops.N_CLASSES,
        data=ListOpsData,
        bounds={
            "n_train": Bound(1),
            "n_val": Bound(1),
            "n_test": Bound(1),
            "min_length": Bound(1),
            "max_length": Bound(1),
            "max_depth": Bound(1),
            "max_args": Bound(2),
        },
    )
)
