"""A self-contained HTML page (and PNGs beside it) over a folder of result records.

    python -m bench.report PATH --html report.html [--pareto-len N]

Plots: latency and memory against length on log-log axes with each backend's fitted slope,
(decode records) per-token latency and bandwidth fraction against the cache length,
achieved TFLOP/s (or MFU when the device peak is known), accuracy per task, and the Pareto
front of latency, memory and accuracy at one length; then a status grid of every cell with the
reason of anything that did not run on hover. The PNGs are embedded (the page needs nothing
else) and also written next to it.
"""

from __future__ import annotations

import base64
import html
import io
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.analysis.common import fit_power_law, label, varying_settings  # noqa: E402
from bench.records import LOWER_IS_BETTER  # noqa: E402

STATUS_COLOURS = {"ok": "#d9f2d9", "oom": "#f8d7a8", "unsupported": "#e0e0e0", "wrong": "#e8a0e0", "error": "#f4b6b6"}


def series(rows, field, varying, bench: str = "speed") -> dict[str, list[tuple[int, float]]]:
    """label -> sorted (seq_len, value) of its ok ``bench`` records that have ``field``."""
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        if r["status"] == "ok" and r.get("bench") == bench and r.get(field):
            out[label(r, varying)].append((r["seq_len"], r[field]))
    return {k: sorted(v) for k, v in sorted(out.items())}


def colour_map(rows, varying) -> dict[str, Any]:
    """One colour per backend, the same in every plot (20 distinct ones where there are more than 10)."""
    names = sorted({label(r, varying) for r in rows})
    if len(names) <= 10:
        return {name: f"C{i}" for i, name in enumerate(names)}
    palette = plt.get_cmap("tab20")
    return {name: palette(i % 20) for i, name in enumerate(names)}


def loglog_panel(
    ax, data: dict[str, list[tuple[int, float]]], ylabel: str, title: str, colours, legend: bool = True
) -> None:
    for name, points in data.items():
        ns, values = zip(*points)
        text = name
        if len(points) >= 3:
            k, _, _ = fit_power_law(ns, values)
            text += f" (slope {k:.2f})"
        ax.plot(ns, values, marker="o", label=text, color=colours[name])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if data and legend:
        ax.legend(fontsize=8)


def figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def latency_figure(rows, varying, colours) -> bytes:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    loglog_panel(axes[0], series(rows, "fwd_ms", varying), "ms (median)", "Forward latency", colours)
    loglog_panel(axes[1], series(rows, "fwd_bwd_ms", varying), "ms (median)", "Forward+backward latency", colours)
    return figure_png(fig)


def memory_figure(rows, varying, colours) -> bytes:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    loglog_panel(
        axes[0], series(rows, "fwd_peak_mem_mib", varying), "MiB above inputs", "Peak memory, forward", colours
    )
    loglog_panel(
        axes[1],
        series(rows, "fwd_bwd_peak_mem_mib", varying),
        "MiB above inputs",
        "Peak memory, forward+backward",
        colours,
    )
    return figure_png(fig)


def throughput_figure(rows, varying, colours) -> bytes:
    use_mfu = any(r.get("mfu") for r in rows)
    field = "mfu" if use_mfu else "tflops"
    fig, ax = plt.subplots(figsize=(12, 4))
    for name, points in series(rows, field, varying).items():
        ns, values = zip(*points)
        ax.plot(ns, values, marker="o", label=name, color=colours[name])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("MFU" if use_mfu else "TFLOP/s (forward)")
    ax.set_title("Model FLOP utilisation" if use_mfu else "Achieved forward TFLOP/s")
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    return figure_png(fig)


def decode_figure(rows, varying, colours) -> bytes | None:
    """bench=decode: the latency of one decoded token, and the fraction of the device's
    bandwidth it achieves, against the cache length."""
    latency = series(rows, "decode_ms", varying, bench="decode")
    if not latency:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    title = "Decode step against a KV cache of n tokens"
    loglog_panel(axes[0], latency, "ms per token (median)", title, colours, legend=False)
    for name, points in series(rows, "bandwidth_fraction", varying, bench="decode").items():
        ns, values = zip(*points)
        axes[1].plot(ns, values, marker="o", color=colours[name])
    axes[1].set_xscale("log", base=2)
    axes[1].set_ylim(0, 1)
    axes[1].set_xlabel("cache length (tokens)")
    axes[1].set_ylabel("achieved / peak bandwidth")
    axes[1].set_title("Fraction of the memory bandwidth a decode step achieves")
    axes[1].grid(True, alpha=0.3)
    # One legend below both panels: a decode study has a series per backend and KV-head setting
    # (two dozen), which a legend inside a panel would cover.
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8, frameon=False)
    return figure_png(fig)


def accuracy_figure(rows, varying, colours) -> bytes | None:
    accuracy = [
        r
        for r in rows
        if r.get("bench") == "accuracy"
        and r["status"] == "ok"
        and r.get("value") is not None
        and r.get("metric") not in LOWER_IS_BETTER
    ]  # accuracies only: bits per character is in the table
    if not accuracy:
        return None
    cells = sorted({(r["task"], r["seq_len"]) for r in accuracy})
    names = sorted({label(r, varying) for r in accuracy})
    fig, ax = plt.subplots(figsize=(12, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [
            max(
                (r["value"] for r in accuracy if label(r, varying) == name and (r["task"], r["seq_len"]) == c),
                default=0.0,
            )
            for c in cells
        ]
        ax.bar([x + i * width for x in range(len(cells))], values, width, label=name, color=colours[name])
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cells))])
    ax.set_xticklabels([f"{task}\nn={n}" for task, n in cells])
    ax.set_ylabel(accuracy[0].get("metric") or "value")
    ax.set_title("Accuracy per task and length")
    ax.legend(fontsize=8)
    return figure_png(fig)


def pareto_points(rows, seq_len: int, varying) -> tuple[list[dict[str, Any]], str]:
    """Backends at ``seq_len`` with (time, memory, best accuracy), whether each is on the front,
    and the step compared: the training step if every backend has it, else the forward."""
    here = {
        name: [r for r in cells if r["seq_len"] == seq_len and r["status"] == "ok" and r.get("bench") == "speed"]
        for name, cells in group(rows, varying).items()
    }
    here = {name: cells for name, cells in here.items() if cells}
    training = all(any(r.get("fwd_bwd_ms") for r in cells) for cells in here.values())
    time_field, memory_field = ("fwd_bwd_ms", "fwd_bwd_peak_mem_mib") if training else ("fwd_ms", "fwd_peak_mem_mib")
    points = []
    for name, cells in here.items():
        timed = [r for r in cells if r.get(time_field) and r.get(memory_field)]
        if not timed:
            continue
        accuracy = [
            r["value"]
            for r in rows
            if label(r, varying) == name
            and r.get("bench") == "accuracy"
            and r["status"] == "ok"
            and r.get("metric") not in LOWER_IS_BETTER
        ]
        points.append(
            {
                "backend": name,
                "time": min(r[time_field] for r in timed),
                "memory": min(r[memory_field] for r in timed),
                "accuracy": max(accuracy) if accuracy else None,
            }
        )
    for p in points:
        p["front"] = not any(dominates(q, p) for q in points if q is not p)
    return points, "forward+backward" if training else "forward"


def dominates(a: dict, b: dict) -> bool:
    """a is no worse than b on time, memory and accuracy (when both have it), and better on one."""
    pairs = [(-a["time"], -b["time"]), (-a["memory"], -b["memory"])]
    if a["accuracy"] is not None and b["accuracy"] is not None:
        pairs.append((a["accuracy"], b["accuracy"]))
    return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)


def pareto_figure(points, step: str, seq_len: int) -> bytes:
    fig, ax = plt.subplots(figsize=(12, 4.5))
    for p in points:
        colour = "tab:red" if p["front"] else "tab:gray"
        ax.scatter(p["time"], p["memory"], s=80, color=colour, zorder=3)
        text = p["backend"] + (f" (acc {p['accuracy']:.3g})" if p["accuracy"] is not None else "")
        ax.annotate(text, (p["time"], p["memory"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"{step} time, ms")
    ax.set_ylabel(f"{step} peak memory, MiB")
    ax.set_title(f"Pareto front at n={seq_len} (red: not dominated on time, memory and accuracy)")
    ax.grid(True, which="both", alpha=0.3)
    return figure_png(fig)


def group(rows, varying) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        out[label(r, varying)].append(r)
    return dict(sorted(out.items()))


def default_pareto_length(rows) -> int | None:
    """The longest length at which two or more backends ran."""
    counts: dict[int, int] = defaultdict(int)
    for r in rows:
        if r["status"] == "ok" and r.get("bench") == "speed":
            counts[r["seq_len"]] += 1
    lengths = [n for n, c in counts.items() if c >= 2]
    return max(lengths) if lengths else None


def status_grid(rows, varying) -> str:
    lengths = sorted({r["seq_len"] for r in rows})
    head = "".join(f"<th>n={n}</th>" for n in lengths)
    body = []
    for name, cells in group(rows, varying).items():
        tds = []
        for n in lengths:
            here = [r for r in cells if r["seq_len"] == n]
            if not here:
                tds.append("<td></td>")
                continue
            r = here[0]
            hover = r.get("reason") or r.get("note") or "ok"
            tds.append(
                f'<td class="status" style="background:{STATUS_COLOURS.get(r["status"], "#fff")}" '
                f'title="{html.escape(str(hover))}">{r["status"]}</td>'
            )
        body.append(f"<tr><th>{html.escape(name)}</th>{''.join(tds)}</tr>")
    return f"<table><tr><th>backend</th>{head}</tr>{''.join(body)}</table>"


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1400px; }}
img {{ max-width: 100%; display: block; margin: 1em 0; border: 1px solid #ddd; }}
table {{ border-collapse: collapse; margin: 1em 0; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; }}
td.status {{ text-align: center; }} .settings {{ color: #555; }}
</style></head>
<body>
<h1>{title}</h1>
<p class="settings">{settings}</p>
{sections}
<h2>Status of every cell</h2>
<p>Hover over a cell for the reason it did not run.</p>
{grid}
<script>
window.addEventListener("error", function (e) {{ document.body.dataset.jsError = String(e.message); }});
window.addEventListener("load", function () {{
  var images = Array.from(document.images);
  var shown = images.filter(function (i) {{ return i.complete && i.naturalWidth > 0; }});
  document.body.dataset.plots = images.length;
  document.body.dataset.plotsShown = shown.length;
}});
</script>
</body></html>
"""


def write_html(
    rows: list[dict[str, Any]], path: Path, pareto_len: int | None = None, title: str | None = None
) -> list[Path]:
    """Write the page at ``path`` and its PNGs beside it; return the PNG paths."""
    path = Path(path)
    varying = varying_settings(rows)
    colours = colour_map(rows, varying)
    figures: list[tuple[str, str, bytes]] = [
        ("latency", "Latency against length", latency_figure(rows, varying, colours)),
        ("memory", "Peak memory against length", memory_figure(rows, varying, colours)),
        ("throughput", "Throughput against length", throughput_figure(rows, varying, colours)),
    ]
    decode = decode_figure(rows, varying, colours)
    if decode:
        figures.append(("decode", "Decoding against a KV cache", decode))
    accuracy = accuracy_figure(rows, varying, colours)
    if accuracy:
        figures.append(("accuracy", "Accuracy per task", accuracy))
    pareto_len = pareto_len or default_pareto_length(rows)
    if pareto_len:
        points, step = pareto_points(rows, pareto_len, varying)
        figures.append(("pareto", f"Pareto front at n={pareto_len}", pareto_figure(points, step, pareto_len)))
    written, sections = [], []
    for name, heading, png in figures:
        png_path = path.with_name(f"{path.stem}_{name}.png")
        png_path.write_bytes(png)
        written.append(png_path)
        data = base64.b64encode(png).decode()
        sections.append(f'<h2>{html.escape(heading)}</h2><img alt="{name}" src="data:image/png;base64,{data}">')
    if not accuracy:
        sections.append("<p>No accuracy records in this folder: run <code>bench=accuracy</code> jobs to add them.</p>")
    devices = sorted({str(r.get("device_name")) for r in rows if r.get("device_name")})
    fixed = [
        f"{k}={rows[0].get(k)}"
        for k in ("dtype", "device", "causal", "scope", "batch_size", "d_model", "n_heads")
        if k not in varying
    ]
    settings = html.escape(", ".join(fixed) + (f"; measured on {'; '.join(devices)}" if devices else ""))
    page = PAGE.format(
        title=html.escape(title or f"Attention benchmark: {path.parent.name or 'results'}"),
        settings=settings,
        sections="\n".join(sections),
        grid=status_grid(rows, varying),
    )
    path.write_text(page)
    return written
