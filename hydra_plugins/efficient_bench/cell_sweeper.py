"""The suite's sweeper: Hydra's basic sweeper, plus the suite's value checks on every job's
config before any job of the sweep is launched (``hydra/sweeper=cells``, the default).

Hydra composes each job's config before launching a batch; this sweeper also checks the
composed values (``bench.config.value_problems``), so ``seq_len=1024,0`` stops the sweep with
one line naming ``seq_len`` and its range, and nothing runs. Hydra only loads sweepers from the
``hydra_plugins`` package; the logic itself lives in ``bench``.
"""

from __future__ import annotations

from typing import Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper


class CellSweeper(BasicSweeper):
    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        from bench.config import InvalidValue, value_problems

        problems: dict[str, None] = {}  # ordered, each sentence once
        for overrides in batch:
            config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            problems.update(dict.fromkeys(value_problems(config)))
        if problems:
            raise InvalidValue("; ".join(problems) + " (nothing was run)")
