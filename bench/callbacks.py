"""Hydra callbacks: at the end of a sweep, say what resume skipped, print the table, write the report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from bench import report, resume, tracking


class SweepReport(Callback):
    def on_multirun_start(self, config, **kwargs: Any) -> None:
        self.started = time.time()

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        if config.get("resume"):
            skipped = resume.count_skipped(sweep_dir, getattr(self, "started", 0.0))
            print(f"resume: skipped {skipped} cell(s) already recorded in {sweep_dir}")
        rows = report.load(sweep_dir)
        if not rows:
            return
        text = report.markdown(rows)
        print(f"\n{text}")
        (sweep_dir / "report.md").write_text(text)
        report.write_csv(rows, sweep_dir / "results.csv")
        print(f"Report: {sweep_dir / 'report.md'}   CSV: {sweep_dir / 'results.csv'}")
        tracking.log_sweep_table(config, rows, sweep_dir)
