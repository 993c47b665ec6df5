"""Harness check: the suite's CUDA-event timing against ``triton.testing.do_bench``.

    python -m bench.gpu.harness_check [--out DIR] [--tolerance 0.05] [--rehearse]

For the pinned SDPA kernels (flash, cudnn) at 4K and 16K tokens (bf16, one attention layer
of 16 heads x 128, the speed bench's subject), the same forward call is timed by the suite
(``bench.measure.time_ms``: warm-up, L2 flush, CUDA events, median) and by Triton's
``do_bench`` (its own flush and median) in one process. Writes ``harness_check.json`` and
``report.md`` to DIR and exits 1 when a median differs by more than the tolerance.

``--rehearse`` runs the same check on CPU with tiny shapes (float32, 8 heads x 32, 64 and 256
tokens), against ``torch.utils.benchmark.Timer`` (do_bench needs CUDA): it proves the plumbing,
not the GPU timing. A kernel that cannot run the cell (cudnn on CPU) is a row with its reason.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

KERNELS = ("flash", "cudnn")
GPU_CELL = ("device=cuda", "dtype=bfloat16", "model=gpu_d128")
REHEARSAL_CELL = ("device=cpu", "dtype=float32", "model.d_model=256", "model.n_heads=8")


def subject_forward(kernel: str, seq_len: int, cell: tuple[str, ...]):
    from hydra import compose, initialize_config_dir

    import bench.config
    from bench.cell import Cell, build_subject

    bench.config.register()

    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["attention=sdpa", f"attention.kernel={kernel}", f"seq_len={seq_len}", *cell],
        )
    reason = cannot_run(cfg)
    if reason:
        return None, reason
    subject = build_subject(Cell.of(cfg))

    def forward():
        with torch.no_grad():
            return subject.forward(subject.module)

    return forward, None


def cannot_run(cfg) -> str | None:
    from bench.cell import Cell
    from bench.harness import check_supported
    from efficient.attention import Unavailable, Unsupported

    try:
        check_supported(Cell.of(cfg))
    except (Unsupported, Unavailable) as refusal:
        return str(refusal)
    return None


def cpu_timer_ms(forward) -> float:
    """The median of ``torch.utils.benchmark``'s blocked runs, in ms: the CPU's independent timer."""
    from torch.utils.benchmark import Timer

    timer = Timer("forward()", globals={"forward": forward}, num_threads=torch.get_num_threads())  # as the suite runs
    return timer.blocked_autorange(min_run_time=0.5).median * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu.harness_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for harness_check.json and report.md")
    parser.add_argument("--tolerance", type=float, default=0.05, help="largest relative difference of the medians")
    parser.add_argument("--rehearse", action="store_true", help="on CPU, tiny shapes, torch.utils.benchmark")
    args = parser.parse_args(argv)
    if args.rehearse:
        device, cell, lengths, reference, reference_name = (
            "cpu",
            REHEARSAL_CELL,
            (64, 256),
            cpu_timer_ms,
            "torch.utils.benchmark",
        )
    elif not torch.cuda.is_available():
        print("harness check: needs CUDA (--rehearse runs it on CPU)", file=sys.stderr)
        return 2
    else:
        from triton.testing import do_bench

        device, cell, lengths, reference_name = "cuda", GPU_CELL, (4096, 16384), "triton.testing.do_bench"

        def reference(forward):
            return do_bench(forward, warmup=25, rep=200, return_mode="median")

    from bench.measure import time_ms

    rows, refused = [], []
    for kernel in KERNELS:
        for n in lengths:
            forward, reason = subject_forward(kernel, n, cell)
            if reason:
                refused.append({"kernel": kernel, "seq_len": n, "reason": reason})
                continue
            suite = time_ms(forward, device, warmup=3, repeats=20)["median"]
            theirs = reference(forward)
            rows.append(
                {
                    "kernel": kernel,
                    "seq_len": n,
                    "suite_ms": suite,
                    "reference_ms": theirs,
                    "relative_difference": suite / theirs - 1,
                }
            )
    if not rows:
        print(f"harness check: no kernel could run here: {refused}", file=sys.stderr)
        return 2
    worst = max(abs(r["relative_difference"]) for r in rows)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu (rehearsal)",
        "torch": torch.__version__,
        "reference": reference_name,
        "tolerance": args.tolerance,
        "passed": worst <= args.tolerance,
        "rows": rows,
        "refused": refused,
    }
    (args.out / "harness_check.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"Harness check on {result['device_name']} (torch {torch.__version__}): the suite's median "
        f"against {reference_name}, same call, one process; tolerance {args.tolerance:.0%}.",
        "",
        "| kernel | n | suite ms | reference ms | difference |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['kernel']} | {r['seq_len']} | {r['suite_ms']:.4g} | {r['reference_ms']:.4g} | "
        f"{r['relative_difference']:+.1%} |"
        for r in rows
    ]
    lines += [f"| {r['kernel']} | {r['seq_len']} | - | - | cannot run: {r['reason']} |" for r in refused]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
