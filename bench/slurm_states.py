"""Job states on a SLURM cluster that keeps no accounting.

submitit learns its jobs' states from ``sacct``. Where accounting is off (small clusters, the
tests' one-node cluster) sacct fails, every state reads UNKNOWN, and a sweep whose job was
cancelled or killed before writing its result waits for it forever. ``squeue --states=all``
knows a job for ``MinJobAge`` (300 s by default) after it ended: ask it instead, and take a job
it no longer lists as ended (a job that returned has left its result, found before any state).
"""

from __future__ import annotations

import functools
import subprocess

from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

GONE = "ENDED"  # the state of a job squeue no longer lists: done, with or without a result


@functools.lru_cache(maxsize=None)
def accounting_available() -> bool:
    """Whether sacct answers on this cluster ("Slurm accounting storage is disabled" otherwise)."""
    try:
        return subprocess.run(["sacct", "--noheader", "--jobs=1"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class SqueueWatcher(SlurmInfoWatcher):
    """submitit's watcher, asking squeue for this user's jobs when sacct cannot answer."""

    def _make_command(self) -> list[str] | None:
        command = super()._make_command()
        if command is None or accounting_available():
            return command
        return ["squeue", "--me", "--states=all", "--array", "--format=%i|%T"]  # one line per array task

    def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
        text = string.decode() if isinstance(string, bytes) else string
        if not text.startswith("JOBID|STATE"):  # sacct's answer
            return super().read_info(text)
        listed = super().read_info("JobID|State" + text.removeprefix("JOBID|STATE"))
        gone = {job: {"JobID": job, "State": GONE} for job in self._registered - set(listed)}
        return {**gone, **listed}


def watch_without_accounting() -> None:
    """Make every submitit SLURM job of this process use ``SqueueWatcher``."""
    if not isinstance(SlurmJob.watcher, SqueueWatcher):
        SlurmJob.watcher = SqueueWatcher(delay_s=SlurmJob.watcher._delay_s)
