"""LRA's tables beside a folder of records (Tay et al. 2021, Long Range Arena).

    python -m bench.analysis.lra_table PATH [--markdown FILE]

Table 2, from speed records: each backend's training step relative to ``full`` (LRA's
Transformer) and to ``sdpa`` (which LRA did not have), at LRA's lengths. Cells: **speed-up /
memory** = the baseline's forward+backward time over the backend's (above 1: faster) and the
backend's peak memory over the baseline's (below 1: smaller). LRA's column is the same two
ratios from its Table 2 (steps per second and peak GB on a TPU v3 4x4, batch 32, the byte-level
text task), as published.

Table 1 (its ListOps column), from accuracy records of ``task=listops``: each backend's test
accuracy, best validation accuracy and training time, beside LRA's published ListOps accuracy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from bench.records import cell_label, load_records

LENGTHS = (1024, 2048, 3072, 4096)
# LRA Table 2 (Tay et al. 2021): steps/s and peak memory (GB) at 1K, 2K, 3K, 4K.
LRA_STEPS_PER_S = {
    "full": (8.1, 4.9, 2.3, 1.4),
    "local": (9.2, 8.4, 7.4, 7.4),
    "linformer": (9.3, 9.1, 8.5, 7.7),
    "reformer": (4.4, 2.2, 1.5, 1.1),
    "sinkhorn": (9.1, 7.9, 6.6, 5.3),
    "bigbird": (7.4, 3.9, 2.7, 1.5),
    "linear": (9.1, 9.3, 8.6, 7.8),
    "performer": (9.5, 9.4, 8.7, 8.0),
}
LRA_PEAK_GB = {
    "full": (0.85, 2.65, 5.51, 9.48),
    "local": (0.42, 0.76, 1.06, 1.37),
    "linformer": (0.37, 0.55, 0.99, 0.99),
    "reformer": (0.48, 0.99, 1.53, 2.28),
    "sinkhorn": (0.47, 0.83, 1.13, 1.48),
    "bigbird": (0.77, 1.49, 2.18, 2.88),
    "linear": (0.37, 0.57, 0.80, 1.03),
    "performer": (0.37, 0.59, 0.82, 1.06),
}


# LRA Table 1 (Tay et al. 2021), ListOps test accuracy (%).
LRA_LISTOPS = {
    "full": 36.37,
    "reformer": 37.27,
    "bigbird": 36.05,
    "linformer": 35.70,
    "longformer": 35.63,
    "performer": 18.01,
    "linear": 16.13,
    "local": 15.82,
}


def measured(records: list[dict]) -> dict[tuple[str, int], tuple[float, float]]:
    """(backend with its non-default options, n) -> (median forward+backward ms, median peak MiB)
    of the ok records."""
    cells: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for r in records:
        if r.get("status") == "ok" and r.get("fwd_bwd_ms") and r.get("peak_mem_mib"):
            cells.setdefault((options_label(r), r["seq_len"]), []).append((r["fwd_bwd_ms"], r["peak_mem_mib"]))
    return {key: (statistics.median(t for t, _ in v), statistics.median(m for _, m in v)) for key, v in cells.items()}


def ratio_cell(cells, backend: str, baseline: str, n: int) -> str:
    if (backend, n) not in cells or (baseline, n) not in cells:
        return "-"
    (time, memory), (base_time, base_memory) = cells[(backend, n)], cells[(baseline, n)]
    return f"{base_time / time:.1f}x / {memory / base_memory:.2f}"


def lra_cell(label: str, n: int) -> str:
    backend = label.split(" (")[0]
    if backend not in LRA_STEPS_PER_S or n not in LENGTHS:
        return "no row"
    i = LENGTHS.index(n)
    return (
        f"{LRA_STEPS_PER_S[backend][i] / LRA_STEPS_PER_S['full'][i]:.1f}x / "
        f"{LRA_PEAK_GB[backend][i] / LRA_PEAK_GB['full'][i]:.2f}"
    )


def table(records: list[dict]) -> str:
    cells = measured(records)
    backends = sorted({b for b, _ in cells} - {"full"}, key=lambda b: (b != "sdpa", b))
    lines = [
        "| backend | n | vs `full` (here) | vs `sdpa` (here) | LRA vs Transformer (TPU) | ms / MiB (here) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for backend in backends:
        for n in sorted({n for b, n in cells if b == backend}):
            time, memory = cells[(backend, n)]
            versus_sdpa = ratio_cell(cells, backend, "sdpa", n) if backend != "sdpa" else ""
            lines.append(
                f"| {backend} | {n} | {ratio_cell(cells, backend, 'full', n)} | {versus_sdpa} | "
                f"{lra_cell(backend, n)} | {time:,.0f} / {memory:,.0f} |"
            )
    return "\n".join(lines)


def options_label(record: dict) -> str:
    """ "local (block=8)": the backend and the options its record sets away from the defaults."""
    name, _, options = cell_label(record).partition("[")
    return f"{name} ({options.rstrip(']').replace(',', ', ')})" if options else name


def listops_table(records: list[dict]) -> str:
    """One row per ok ListOps accuracy record, the most accurate first."""
    rows = sorted(
        (
            r
            for r in records
            if r.get("status") == "ok" and r.get("task") == "listops" and r.get("metric") == "test_accuracy"
        ),
        key=lambda r: -r["value"],
    )
    lines = [
        "| backend (options) | test accuracy | best validation (step) | training min | peak MiB | LRA ListOps |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        published = f"{LRA_LISTOPS[r['attention']]:.2f}%" if r["attention"] in LRA_LISTOPS else "no row"
        lines.append(
            f"| {options_label(r)} | {100 * r['value']:.1f}% | {100 * (r.get('best_val') or 0):.1f}% "
            f"({r.get('best_step') or '-'}) | {(r.get('train_seconds') or 0) / 60:.1f} | "
            f"{r.get('peak_mem_mib') or 0:,.0f} | {published} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.analysis.lra_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="a folder of result.json files (searched recursively)")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    records = load_records(args.path)
    if not records:
        print(f"no result.json under {args.path}", file=sys.stderr)
        return 2
    tables = []
    if any(r.get("bench") == "accuracy" for r in records):
        tables.append(listops_table(records))
    if any(r.get("bench", "speed") == "speed" for r in records):
        tables.append(table(records))
    text = "\n\n".join(tables)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
