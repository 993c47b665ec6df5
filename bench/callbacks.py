"""Hydra callbacks: at the end of a sweep, print the comparison table and write the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from bench import report, tracking


class SweepReport(Callback):
    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        rows = report.load(sweep_dir)
        if not rows:
            return
        text = report.markdown(rows)
        print(f"\n{text}")
        (sweep_dir / "report.md").write_text(text)
        report.write_csv(rows, sweep_dir / "results.csv")
        print(f"Report: {sweep_dir / 'report.md'}   CSV: {sweep_dir / 'results.csv'}")
        tracking.log_sweep_table(config, rows, sweep_dir)
