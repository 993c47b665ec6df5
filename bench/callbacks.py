"""Hydra callbacks: at the end of a sweep, print the table and write the report (and say if launched
jobs found their cell recorded meanwhile)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from bench import resume, tracking
from bench.analysis import report
from bench.records import load_records


class SweepReport(Callback):
    def on_multirun_start(self, config, **kwargs: Any) -> None:
        self.started = time.time()

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        try:
            self.report(config)
        except Exception as e:  # Hydra would turn this into a warning that is easy to miss
            print(
                f"sweep report not written ({type(e).__name__}: {e}); the records are intact: "
                f"python -m bench.report {config.hydra.sweep.dir}",
                file=sys.stderr,
            )

    def report(self, config) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        if config.get("resume"):
            skipped = resume.count_skipped(sweep_dir, getattr(self, "started", 0.0))
            if skipped:  # cells recorded after launch (by another sweep into the same folder)
                print(f"resume: {skipped} launched job(s) found their cell already recorded in {sweep_dir}")
        rows = load_records(sweep_dir)
        if not rows:
            return
        text = report.markdown(rows)
        print(f"\n{text}")
        (sweep_dir / "report.md").write_text(text)
        report.write_csv(rows, sweep_dir / "results.csv")
        print(f"Report: {sweep_dir / 'report.md'}   CSV: {sweep_dir / 'results.csv'}")
        tracking.log_sweep_table(config, rows, sweep_dir)
