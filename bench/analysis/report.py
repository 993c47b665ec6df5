"""Comparison tables over a folder of result records.

    python -m bench.report PATH [--markdown FILE] [--csv FILE] [--baseline LABEL]
                                [--html FILE [--pareto-len N]] [--compare OTHER]

Reads every ``result.json`` under PATH and prints, per measured quantity, a table of
backend x seq_len; a cell that did not run shows its status (oom, unsupported, error), a cell
whose output was wrong shows ``wrong`` (its figures are not shown), and the reasons are listed
below the tables. ``--compare OTHER``: instead, the cells of PATH and OTHER (two commits, two
machines) side by side, each quantity with OTHER / PATH.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.analysis.common import SETTINGS, fit_power_law, label, setting, varying_settings
from bench.records import FIELDS, load_records, measured_fields
from bench.results import formatted


def pivot(rows, field, fmt: str, varying) -> tuple[list[int], dict[str, dict[int, str]]]:
    """label -> seq_len -> cell text (the value, or the status when not ok)."""
    lengths = sorted({r["seq_len"] for r in rows})
    table: dict[str, dict[int, str]] = defaultdict(dict)
    for r in sorted(rows, key=lambda r: (label(r, varying), r["seq_len"])):
        table[label(r, varying)][r["seq_len"]] = r["status"] if r["status"] != "ok" else formatted(r.get(field), fmt)
    return lengths, table


def description(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """How records of one bench are shown (their ``report``): the newest record's, or None when
    none describes itself (records written before version 3 and not upgraded)."""
    described = [r for r in rows if isinstance(r.get("report"), dict)]
    return max(described, key=lambda r: r.get("record_version") or 0)["report"] if described else None


def by_bench(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: str(r.get("bench"))):
        groups[str(r.get("bench"))].append(r)
    return groups


def markdown(rows: list[dict[str, Any]], baseline: str | None = None) -> str:
    """Each bench's tables as its records describe them (``bench/results.py``), then the fitted
    exponents, the baseline ratios, the notes, and every cell that did not run."""
    varying = varying_settings(rows)
    fixed = [f"{k}={setting(rows[0], k)}" for k in SETTINGS if k not in varying]
    devices = sorted({str(r.get("device_name")) for r in rows if r.get("device_name")})
    out = [f"Settings: {', '.join(fixed)}" + (f"; measured on {'; '.join(devices)}" if devices else ""), ""]
    for bench, records in by_bench(rows).items():
        spec = description(records)
        if spec is None:
            out += [
                f"({len(records)} records of bench={bench} predate records that describe their fields: "
                "`python -m bench.records upgrade PATH` rewrites them)",
                "",
            ]
            continue
        for field, title, fmt in spec["pivot"]:
            if any(r.get(field) is not None for r in records):
                out += pivot_table(records, field, title, fmt, varying)
        out += bench_table(records, spec["table"], varying)
    out += scaling_table(rows, varying)
    if baseline:
        out += baseline_tables(rows, baseline, varying)
    notes = sorted({f"- {label(r, varying)}: {r['note']}" for r in rows if r["status"] == "ok" and r.get("note")})
    if notes:
        out += ["**Notes**", "", *notes, ""]
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        out += ["**Cells that did not run, or whose output was wrong**", ""]
        seen = set()
        for r in sorted(failed, key=lambda r: (label(r, varying), r["seq_len"])):
            line = f"- {label(r, varying)}, n={r['seq_len']}: {r['status']}: {r.get('reason')}"
            if line not in seen:
                seen.add(line)
                out.append(line)
        out.append("")
    return "\n".join(out)


def pivot_table(rows, field: str, title: str, fmt: str, varying) -> list[str]:
    """backend x length: a quantity per cell (a cell that did not run: its status)."""
    lengths, table = pivot(rows, field, fmt, varying)
    out = [f"**{title}**", "", "| backend | " + " | ".join(f"n={n}" for n in lengths) + " |"]
    out.append("|---|" + "---:|" * len(lengths))
    out += [f"| {name} | " + " | ".join(cells.get(n, "") for n in lengths) + " |" for name, cells in table.items()]
    return out + [""]


def bench_table(rows, table: dict[str, Any], varying) -> list[str]:
    """The bench's own table: one row per ok cell, its ``columns`` (field, header, format)."""
    found = [r for r in rows if r["status"] == "ok"]
    columns = table.get("columns") or []
    if not found or not columns:
        return []
    out = [f"**{table.get('title') or 'Measured'}**", ""]
    out.append("| backend | n | " + " | ".join(header for _, header, _ in columns) + " |")
    kinds = found[0].get("kinds") or {}
    out.append("|---|---:|" + "".join("---:|" if kinds.get(field) == "number" else "---|" for field, _, _ in columns))
    for r in sorted(found, key=lambda r: (label(r, varying), r["seq_len"])):
        cells = " | ".join(formatted(r.get(field), fmt) for field, _, fmt in columns)
        out.append(f"| {label(r, varying)} | {r['seq_len']:,} | {cells} |")
    return out + [""]


def marked(rows: list[dict[str, Any]], key: str) -> list[tuple[str, str]]:
    """(field, name) of every field the records' descriptions list under ``key`` (scaling, ratio)."""
    found: dict[str, str] = {}
    for r in rows:
        for field, name, _ in (r.get("report") or {}).get(key, []):
            found.setdefault(field, name)
    return list(found.items())


def scaling_table(rows: list[dict[str, Any]], varying: tuple[str, ...]) -> list[str]:
    """Fitted exponents k of value ~ n^k per backend, over its ok cells (3 lengths or more)."""
    scaling = marked(rows, "scaling")
    by_label: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["status"] == "ok":
            by_label[label(r, varying)].append(r)
    out = []
    for name, cells in sorted(by_label.items()):
        fits = []
        for field, _ in scaling:
            points = sorted((r["seq_len"], r[field]) for r in cells if r.get(field))
            if len(points) < 3:
                fits.append("-")
                continue
            k, _, spread = fit_power_law(*zip(*points))
            fits.append(f"{k:.2f} (±{spread:.2f})")
        lengths = sorted({r["seq_len"] for r in cells})
        if any(f != "-" for f in fits):
            out.append(f"| {name} | {lengths[0]}-{lengths[-1]} | " + " | ".join(fits) + " |")
    if not out:
        return []
    header = "| backend | lengths | " + " | ".join(t for _, t in scaling) + " |"
    return [
        "**Fitted exponent k in value ~ n^k (log-log least squares; ± = residual spread)**",
        "",
        header,
        "|---|---|" + "---:|" * len(scaling),
        *out,
        "",
    ]


def baseline_tables(rows: list[dict[str, Any]], baseline: str, varying: tuple[str, ...]) -> list[str]:
    """'baseline value / backend value' per backend and length: how many times faster / smaller."""
    ok = [r for r in rows if r["status"] == "ok"]
    base = {r["seq_len"]: r for r in ok if label(r, varying) == baseline}
    if not base:
        return [f"(no ok records of the baseline {baseline!r}: nothing to compare against)", ""]
    out = []
    for field, title in marked(rows, "ratio"):
        lengths = sorted({n for n, r in base.items() if r.get(field)})
        table = defaultdict(dict)
        for r in ok:
            name, n = label(r, varying), r["seq_len"]
            if name != baseline and n in lengths and r.get(field):
                table[name][n] = f"{base[n][field] / r[field]:.3g}x"
        if table:
            out += [
                f"**{title}: {baseline} / backend (above 1: the backend saves that factor)**",
                "",
                "| backend | " + " | ".join(f"n={n}" for n in lengths) + " |",
                "|---|" + "---:|" * len(lengths),
            ]
            out += [
                f"| {name} | " + " | ".join(cells.get(n, "") for n in lengths) + " |"
                for name, cells in sorted(table.items())
            ]
            out.append("")
    return out


def compared(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(field, title) of the quantities two folders are compared by: every field the records'
    descriptions give a table of its own, then the numeric columns of the benches' tables."""
    fields = dict(marked(rows, "pivot"))
    for r in rows:
        kinds = r.get("kinds") or {}
        for field, header, _ in ((r.get("report") or {}).get("table") or {}).get("columns", []):
            if kinds.get(field) == "number":
                fields.setdefault(field, f"{header} ({r['bench']})")
    return list(fields.items())


# What makes two records the same cell across two folders (the machine and the commit may differ).
CELL_KEY = ("label", "seq_len", *SETTINGS)


def cell_key(record: dict[str, Any]) -> tuple:
    return tuple(str(label(record) if k == "label" else setting(record, k)) for k in CELL_KEY)


def provenance(rows: list[dict[str, Any]]) -> str:
    """'AMD EPYC (2 cores), commit 2f52b27': where and from which commits a folder's records come."""
    machines = sorted({str(r.get("device_name")) for r in rows if r.get("device_name")})
    commits = sorted({str(r.get("git_sha"))[:7] for r in rows if r.get("git_sha")})
    return f"{'; '.join(machines) or 'machine not recorded'}, commit {', '.join(commits) or 'not recorded'}"


def compare_markdown(rows: list[dict[str, Any]], others: list[dict[str, Any]], name: str, other_name: str) -> str:
    """Cells measured in both sets, side by side: each quantity in both and ``other / this``
    (below 1: ``other`` is faster or smaller). Several records of one cell: their median."""

    def by_cell(records):
        cells: dict[tuple, list[dict]] = defaultdict(list)
        for r in records:
            cells[cell_key(r)].append(r)
        return cells

    mine, theirs = by_cell(rows), by_cell(others)
    shared = sorted(set(mine) & set(theirs), key=lambda k: (k[0], int(k[1]), k[2:]))
    varying = varying_settings([r for k in shared for r in mine[k] + theirs[k]])
    out = [
        f"Comparing A = {name} ({provenance(rows)})",
        f"with B = {other_name} ({provenance(others)}).",
        "",
        f"{len(shared)} cells in both; {len(set(mine) - set(theirs))} only in A, "
        f"{len(set(theirs) - set(mine))} only in B.",
        "",
    ]

    def figure(records, field):
        ok = [r[field] for r in records if r["status"] == "ok" and isinstance(r.get(field), (int, float))]
        return statistics.median(ok) if ok else None

    def text(records, value):
        if value is not None:
            return f"{value:.4g}"
        return "/".join(sorted({r["status"] for r in records if r["status"] != "ok"})) or "-"

    for field, title in compared([r for k in shared for r in mine[k] + theirs[k]]):
        lines = []
        for key in shared:
            a, b = figure(mine[key], field), figure(theirs[key], field)
            if a is None and b is None:
                continue
            ratio = f"{b / a:.3g}x" if a and b is not None else "-"
            lines.append(
                f"| {label(mine[key][0], varying)} | {key[1]} | {text(mine[key], a)} | "
                f"{text(theirs[key], b)} | {ratio} |"
            )
        if lines:
            out += [
                f"**{title}: B / A**",
                "",
                "| backend | n | A | B | B / A |",
                "|---|---:|---:|---:|---:|",
                *lines,
                "",
            ]
    return "\n".join(out)


def write_csv(rows: list[dict[str, Any]], path: Path | str) -> None:
    """One row per record: the cell's fields, then every bench's measured fields (lists and
    dicts as JSON); descriptions, configs and tracebacks are left to the record files."""
    left_out = ("config", "versions", "traceback", "measures", "kinds", "report")
    columns = [k for k in FIELDS if k not in left_out]
    columns += list(dict.fromkeys(k for r in rows for k in measured_fields(r) if k not in columns))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v := r.get(k), (list, dict)) else v for k in columns})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="a folder of result.json files (searched recursively)")
    parser.add_argument("--markdown", type=Path, help="also write the tables as Markdown here")
    parser.add_argument("--csv", type=Path, help="also write one row per record as CSV here")
    parser.add_argument("--html", type=Path, help="also write a self-contained HTML page with plots (PNGs beside it)")
    parser.add_argument("--pareto-len", type=int, help="the length of the Pareto plot (default: the longest measured)")
    parser.add_argument(
        "--compare",
        type=Path,
        metavar="OTHER",
        help="another folder of records (another commit "
        "or machine): print the cells of both side by side, with OTHER / PATH",
    )
    parser.add_argument(
        "--baseline",
        help="a backend label (e.g. full, sdpa[kernel=flash]): add tables of "
        "its time and memory divided by every other backend's",
    )
    args = parser.parse_args(argv)
    if not args.path.exists():
        parser.error(f"{args.path} does not exist")
    rows = load_records(args.path)
    if not rows:
        print(f"no result.json under {args.path}", file=sys.stderr)
        return 1
    if args.compare:
        if not args.compare.exists():
            parser.error(f"{args.compare} does not exist")
        others = load_records(args.compare)
        if not others:
            print(f"no result.json under {args.compare}", file=sys.stderr)
            return 1
        text = compare_markdown(rows, others, str(args.path), str(args.compare))
    else:
        text = markdown(rows, args.baseline)
    print(text)
    try:  # an output file's folder is made if missing; one that cannot be written is a one-line error
        for output in (args.markdown, args.csv, args.html):
            if output:
                output.parent.mkdir(parents=True, exist_ok=True)
        if args.markdown:
            args.markdown.write_text(text)
        if args.csv:
            write_csv(rows, args.csv)
        if args.html:
            from bench.analysis.html_report import write_html  # matplotlib is needed only here

            pngs = write_html(rows, args.html, args.pareto_len)
            print(f"HTML report: {args.html} (plots: {', '.join(p.name for p in pngs)})")
    except OSError as e:
        print(f"report: cannot write {e.filename or 'the output'}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
