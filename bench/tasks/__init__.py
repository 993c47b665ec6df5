"""Tasks: what a job's model reads (``task=<name>``). Importing this package registers every task module in it.

A task is one module here that calls ``register_task`` plus one ``conf/task/<name>.yaml``. Its
``schema`` (a dataclass) holds its settings and their defaults, which the yaml repeats and a test
compares. The data itself comes from ``efficient.datasets`` (generators and file loaders); the
modules here adapt it to the training loop of ``bench=accuracy`` (``bench/tasks/data.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from efficient.bounds import Bound
from efficient.registry import Registry, import_modules


@dataclass(frozen=True)
class Task:
    name: str
    schema: type  # a dataclass: the task's settings and their defaults
    vocab_size: Callable[[Any], int]  # task config -> the model's vocabulary
    n_classes: Callable[[Any], Optional[int]]  # task config -> classes (None: a causal LM task)
    # (cell, device) -> training data (bench/tasks/data.py); None: random inputs only
    data: Optional[Callable[..., Any]] = None
    bounds: dict[str, Bound] = field(default_factory=dict)  # valid ranges of its numeric settings


TASKS: Registry[Task] = Registry("task", "tasks")
register_task = TASKS.register
task_names = TASKS.names
get_task = TASKS.get

import_modules(__name__, __path__, skip=("data",))
