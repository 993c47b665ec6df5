"""The suite's sweeper: Hydra's basic sweeper, plus what a sweep of cells needs before anything
is launched (``hydra/sweeper=cells``, the default).

- Every job's composed values are checked (``bench.config.value_problems``): ``seq_len=1024,0``
  stops the sweep with one line naming ``seq_len`` and its range, and nothing runs.
- With ``resume=true``, cells that already have a final record under ``hydra.sweep.dir`` are
  dropped before launch, and the sweep says how many: on a cluster, a finished study resumed
  submits no job at all (each job would start Python and torch only to find its record).
- A SLURM launcher whose ``mem_gb`` is null (``hydra/launcher=slurm_cpu``) asks, for each batch,
  for the memory its largest cell needs (``bench.cell.job_memory_gb``).
- A cluster's refusal (``sbatch: error: ...``), or a job that ended without returning (cancelled,
  killed), stops the sweep with one line that says so and what to do, not a traceback; on a
  cluster without accounting, job states come from squeue (``bench.slurm_states``).

Hydra only loads sweepers from the ``hydra_plugins`` package; the logic itself lives in ``bench``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.errors import CompactHydraException

SUBMITIT_FAILURES = ("FailedJobError", "UncompletedJobError", "FailedSubmissionError")


class LaunchFailed(CompactHydraException):
    """The scheduler refused the sweep's jobs, or a job ended without a result."""


class ClearFailures:
    """A launcher whose cluster failures become one sentence (submitit raises them with a traceback)."""

    def __init__(self, launcher):
        self.launcher = launcher

    def __getattr__(self, name):
        return getattr(self.launcher, name)

    def launch(self, batch, initial_job_idx):
        try:
            return self.launcher.launch(batch, initial_job_idx=initial_job_idx)
        except Exception as e:
            if type(e).__name__ not in SUBMITIT_FAILURES:
                raise
            refusals = [line for line in str(e).splitlines() if line.startswith("sbatch: error:")]
            if refusals:
                raise LaunchFailed(f"the cluster refused the jobs: {refusals[-1]} (nothing was run)") from None
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise LaunchFailed(
                f"a job ended without a result ({first}); the sweep's other jobs go on on the "
                f"cluster. Run the same command with resume=true once they are done: it runs "
                f"only the cells without a record"
            ) from None


class CellSweeper(BasicSweeper):
    def setup(self, *, hydra_context, task_function, config) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        if type(self.launcher).__name__ == "SlurmLauncher":
            from bench.slurm_states import watch_without_accounting

            watch_without_accounting()
        self.launcher = ClearFailures(self.launcher)

    def job_config(self, overrides: Sequence[str]):
        return self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))

    def split_arguments(self, overrides, max_batch_size):
        """The batches of jobs to launch, less the cells already recorded when resuming."""
        from bench.config import sweep_job_hash
        from bench.resume import recorded_cells

        batches = BasicSweeper.split_arguments(overrides, max_batch_size)
        jobs = [job for batch in batches for job in batch]
        root = Path(self.config.hydra.sweep.dir)
        if not jobs or not self.job_config(jobs[0]).get("resume"):
            return batches
        recorded = recorded_cells(root)
        left = [job for job in jobs if sweep_job_hash(self.job_config(job)) not in recorded]
        print(
            f"resume: skipped {len(jobs) - len(left)} cell(s) already recorded in {root}; "
            f"launching {len(left)} of {len(jobs)}"
        )
        size = max_batch_size or max(1, len(left))
        return [left[i : i + size] for i in range(0, len(left), size)]

    def get_job_batch(self) -> Sequence[Sequence[str]]:
        batch = super().get_job_batch()
        params = getattr(self.launcher, "params", None)
        if getattr(self, "memory_from_cells", None) is None:  # decided at the first batch
            self.memory_from_cells = (
                type(self.launcher.launcher).__name__ == "SlurmLauncher"
                and isinstance(params, dict)
                and params.get("mem_gb", 0) is None
            )
        if self.memory_from_cells:
            from bench.cell import job_memory_gb

            params["mem_gb"] = max(job_memory_gb(self.job_config(job)) for job in batch)
        return batch

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        from bench.config import InvalidValue, value_problems

        problems: dict[str, None] = {}  # ordered, each sentence once
        for overrides in batch:
            problems.update(dict.fromkeys(value_problems(self.job_config(overrides))))
        if problems:
            raise InvalidValue("; ".join(problems) + " (nothing was run)")
