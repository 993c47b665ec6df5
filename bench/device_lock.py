"""Timing jobs never share a device: one exclusive file lock per device, across processes.

Launchers run jobs side by side (``submitit_local``, ``joblib``, Ray workers on one node). Two
timing jobs on one GPU, or on the same CPU cores, slow each other down and both measure
something untrue; two max-length searches on one GPU take each other's memory. So a timing job
holds an exclusive ``flock`` on a file named after its device (the GPU's UUID, or the host for
the CPU) while it measures, and the others wait their turn: a parallel launcher's timing jobs
are serialised per device, while jobs on different GPUs (SLURM, Ray with ``num_gpus: 1``) run
side by side. Accuracy jobs do not take the lock; they may share a machine (a bench says which it
is: ``Bench.exclusive``).
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch


def lock_path(device: str) -> Path:
    """The lock file of this process's device: $EFFICIENT_LOCK_DIR (else the temp dir)."""
    if device == "cuda":
        properties = torch.cuda.get_device_properties(torch.cuda.current_device())
        name = f"gpu-{getattr(properties, 'uuid', torch.cuda.current_device())}"
    else:
        name = f"cpu-{socket.gethostname()}"
    return Path(os.environ.get("EFFICIENT_LOCK_DIR") or tempfile.gettempdir()) / f"efficient-attention-{name}.lock"


@contextmanager
def held(device: str) -> Iterator[float]:
    """Hold the device's lock for the block; yields the seconds spent waiting for it."""
    path = lock_path(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        started = time.perf_counter()
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        try:
            yield time.perf_counter() - started
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
