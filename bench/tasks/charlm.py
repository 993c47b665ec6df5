"""``task=charlm``: byte-level language modelling in bits per character (``efficient.datasets.charlm``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from bench.tasks import Task, register_task
from bench.tasks.data import StreamData
from efficient.datasets import charlm


@dataclass
class CharLMTaskConfig:
    name: str = "charlm"
    data_path: Optional[str] = None  # a raw byte file (enwik8, or enwik8.zip); None: Python's reference topics


def charlm_data(cell, device: str) -> StreamData:
    path = cell.task.data_path
    data = charlm.load_bytes(path) if path else charlm.default_corpus()
    source = charlm.describe(data, str(path) if path else "pydoc_data.topics (Python Language Reference)")
    return StreamData(charlm.split_stream(data), cell.batch_size, cell.seq_len, device, source)


register_task(
    Task(
        "charlm",
        CharLMTaskConfig,
        vocab_size=lambda task: charlm.VOCAB_SIZE,
        n_classes=lambda task: None,
        data=charlm_data,
    )
)
