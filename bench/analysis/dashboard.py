"""A W&B workspace for comparing the suite's runs, built in code (wandb-workspaces).

    python -m bench.dashboard --entity E --project P [--name NAME]

Sections: latency against length per backend (forward, forward+backward, log-log), memory
against length, achieved TFLOP/s, accuracy per task, and the status of every cell (the table
each sweep logs). Runs are grouped by backend. With W&B online and an API key the workspace is
saved to the project; otherwise (offline, disabled, or no key) it is only built, and the
command says what it would save.
"""

from __future__ import annotations

import argparse
import os
import sys


def build_workspace(entity: str, project: str, name: str = "Attention backends"):
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    def versus_length(title: str, metric: str):
        return wr.ScatterPlot(
            title=title, x=wr.SummaryMetric("seq_len"), y=wr.SummaryMetric(metric), log_x=True, log_y=True
        )

    sections = [
        ws.Section(
            name="Latency against length",
            is_open=True,
            panels=[
                versus_length("Forward latency (ms) vs length", "fwd_ms"),
                versus_length("Forward+backward latency (ms) vs length", "fwd_bwd_ms"),
            ],
        ),
        ws.Section(
            name="Memory against length",
            is_open=True,
            panels=[
                versus_length("Peak memory, forward (MiB) vs length", "fwd_peak_mem_mib"),
                versus_length("Peak memory, forward+backward (MiB) vs length", "fwd_bwd_peak_mem_mib"),
            ],
        ),
        ws.Section(
            name="Throughput",
            panels=[
                versus_length("Achieved forward TFLOP/s vs length", "tflops"),
                versus_length("MFU vs length", "mfu"),
            ],
        ),
        ws.Section(
            name="Accuracy per task",
            panels=[
                wr.BarPlot(
                    title="Accuracy (metric value) per backend",
                    metrics=[wr.SummaryMetric("value")],
                    groupby=wr.Config("task"),
                ),
            ],
        ),
        ws.Section(name="Status of every cell", panels=[wr.WeavePanelSummaryTable(table_name="cells")]),
    ]
    runset = ws.RunsetSettings(groupby=[ws.Config("attention.name")])
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections, runset_settings=runset)


def describe(workspace) -> str:
    lines = [f"workspace {workspace.name!r} for {workspace.entity}/{workspace.project}, runs grouped by backend:"]
    for section in workspace.sections:
        titles = ", ".join(getattr(p, "title", None) or type(p).__name__ for p in section.panels)
        lines.append(f"  {section.name}: {titles}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dashboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--entity", required=True, help="W&B entity (user or team)")
    parser.add_argument("--project", default="efficient-attention", help="W&B project of the runs")
    parser.add_argument("--name", default="Attention backends", help="the workspace's name")
    args = parser.parse_args(argv)
    workspace = build_workspace(args.entity, args.project, args.name)
    mode = os.environ.get("WANDB_MODE", "online")
    if mode in ("offline", "disabled") or not has_api_key():
        print(f"Not saved (WANDB_MODE={mode}, API key {'found' if has_api_key() else 'missing'}). Would save:")
        print(describe(workspace))
        return 0
    workspace.save()
    print(f"Saved: {describe(workspace)}\n{workspace.url}")
    return 0


def has_api_key() -> bool:
    """A W&B key in the environment or in ~/.netrc (where `wandb login` puts it)."""
    return bool(os.environ.get("WANDB_API_KEY")) or os.path.exists(os.path.expanduser("~/.netrc"))


if __name__ == "__main__":
    sys.exit(main())
