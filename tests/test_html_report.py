"""The HTML report: built from the committed results, and opened in a real headless browser."""

import shutil
import subprocess

import matplotlib.image
import numpy as np
import pytest
from conftest import ROOT

from bench.analysis.html_report import dominates, pareto_points, write_html
from bench.records import load_records

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    path = folder / "report.html"
    pngs = write_html(load_records(ROOT / "results"), path)
    return path, pngs


def test_page_embeds_every_plot_and_the_status_grid(page):
    path, pngs = page
    text = path.read_text()
    names = [p.name for p in pngs]
    assert {"report_latency.png", "report_memory.png", "report_throughput.png", "report_pareto.png"} <= set(names)
    assert ("report_accuracy.png" in names) == any(r["bench"] == "accuracy" for r in load_records(ROOT / "results"))
    assert text.count('src="data:image/png;base64,') == len(pngs)
    assert 'title="linformer cannot be causal"' in text  # a reason on hover in the status grid
    assert ">oom</td>" in text and ">unsupported</td>" in text


def test_pareto_front():
    fast = {"time": 1.0, "memory": 10.0, "accuracy": None}
    small = {"time": 5.0, "memory": 1.0, "accuracy": None}
    worse = {"time": 6.0, "memory": 11.0, "accuracy": None}
    assert dominates(fast, worse) and not dominates(fast, small) and not dominates(small, fast)
    accurate = {"time": 7.0, "memory": 12.0, "accuracy": 0.9}
    assert not dominates({**fast, "accuracy": 0.5}, accurate)  # better accuracy keeps it on the front
    rows = [
        {
            "attention": n,
            "attention_options": {},
            "seq_len": 8,
            "status": "ok",
            "bench": "speed",
            "fwd_ms": t,
            "fwd_bwd_ms": None,
            "fwd_peak_mem_mib": m,
        }
        for n, t, m in [("a", 1, 10), ("b", 5, 1), ("c", 6, 11)]
    ]
    points, step = pareto_points(rows, 8, ())
    assert {p["backend"]: p["front"] for p in points} == {"a": True, "b": True, "c": False} and step == "forward"


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install chromium)")
def test_page_loads_in_headless_chromium_with_plots_visible(page, tmp_path):
    path, pngs = page
    browser = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    dom = subprocess.run([*browser, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=180).stdout
    assert f'data-plots="{len(pngs)}"' in dom and f'data-plots-shown="{len(pngs)}"' in dom
    assert "data-js-error" not in dom
    shot = tmp_path / "screenshot.png"
    subprocess.run(
        [*browser, f"--screenshot={shot}", "--window-size=1400,2400", path.as_uri()],
        capture_output=True,
        timeout=180,
        check=True,
    )
    pixels = matplotlib.image.imread(shot)[..., :3]  # [h, w, rgb] in 0..1
    saturation = pixels.max(axis=-1) - pixels.min(axis=-1)
    assert (saturation > 0.3).mean() > 0.002, "no coloured plot lines in the screenshot"
    assert np.std(pixels) > 0.05
