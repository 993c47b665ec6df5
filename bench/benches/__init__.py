"""Benches: what a job measures (``bench=<name>``). Importing this package registers every bench module in it.

A bench is one module here that calls ``register_bench`` plus one ``conf/bench/<name>.yaml``.
Its ``run(cell, tracker=None, output_dir=None)`` takes the job's frozen ``Cell`` (``bench/cell.py``:
the backend, the bench's and task's settings, the shapes, the device), returns its measurements
as its own frozen ``Result`` (``bench/results.py``: the fields, their meanings and how the
report shows them), and raises ``Unsupported``, ``PredictedOOM`` or an out-of-memory error for
the harness to record (``bench/harness.py``). Its ``schema`` (a dataclass) holds its settings
and their defaults, which the yaml repeats and a test compares. Neither the report nor the
records module knows any bench by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from bench.results import Result
from efficient.bounds import Bound
from efficient.registry import Registry, import_modules


@dataclass(frozen=True)
class Bench:
    name: str
    schema: type  # a dataclass: the bench's settings and their defaults
    run: Callable[..., Result]  # (cell, tracker=None, output_dir=None) -> the job's measurements
    result: type[Result]  # what ``run`` returns: its fields and how the report shows them (bench/results.py)
    exclusive: bool = True  # a timing bench: it holds its device alone while it runs (bench/device_lock.py)
    bounds: dict[str, Bound] = field(default_factory=dict)  # valid ranges of its numeric settings
    # (cell) -> the record's ``label`` and ``exact`` where the bench, not the backend, decides them
    describes: Callable[..., dict[str, Any]] | None = None
    config_problems: Callable[..., list[str]] | None = None  # (cfg) -> sentences: settings it cannot take together


BENCHES: Registry[Bench] = Registry("bench", "benches")
register_bench = BENCHES.register
bench_names = BENCHES.names
get_bench = BENCHES.get

import_modules(__name__, __path__)
