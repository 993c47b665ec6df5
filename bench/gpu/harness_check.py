"""Harness check: the suite's CUDA-event timing against ``triton.testing.do_bench``.

    python -m bench.gpu.harness_check [--out DIR] [--tolerance 0.05]

For the pinned SDPA kernels (flash, cudnn) at 4K and 16K tokens (bf16, one attention layer
of 16 heads x 128, the speed bench's subject), the same forward call is timed by the suite
(``bench.measure.time_ms``: warm-up, L2 flush, CUDA events, median) and by Triton's
``do_bench`` (its own flush and median) in one process. Writes ``harness_check.json`` and
``report.md`` to DIR and exits 1 when a median differs by more than the tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

CASES = [(kernel, n) for kernel in ("flash", "cudnn") for n in (4096, 16384)]


def subject_forward(kernel: str, seq_len: int):
    from hydra import compose, initialize_config_dir

    import bench.config  # noqa: F401  (registers the structured configs)
    from bench.cell import build_subject

    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "attention=sdpa", f"attention.kernel={kernel}", f"seq_len={seq_len}", "device=cuda",
            "dtype=bfloat16", "model=gpu_d128"])
    subject = build_subject(cfg, "cuda", torch.bfloat16)

    def forward():
        with torch.no_grad():
            return subject.forward(subject.module)

    return forward


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu.harness_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for harness_check.json and report.md")
    parser.add_argument("--tolerance", type=float, default=0.05, help="largest relative difference of the medians")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("harness check: needs CUDA", file=sys.stderr)
        return 2
    from triton.testing import do_bench

    from bench.measure import time_ms

    rows = []
    for kernel, n in CASES:
        forward = subject_forward(kernel, n)
        suite = time_ms(forward, "cuda", warmup=3, repeats=20)["median"]
        triton = do_bench(forward, warmup=25, rep=200, return_mode="median")
        rows.append({"kernel": kernel, "seq_len": n, "suite_ms": suite, "do_bench_ms": triton,
                     "relative_difference": suite / triton - 1})
    worst = max(abs(r["relative_difference"]) for r in rows)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"device_name": torch.cuda.get_device_name(), "torch": torch.__version__, "tolerance": args.tolerance,
              "passed": worst <= args.tolerance, "rows": rows}
    (args.out / "harness_check.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Harness check on {result['device_name']} (torch {torch.__version__}): the suite's median "
             f"against triton.testing.do_bench, same call, one process; tolerance {args.tolerance:.0%}.", "",
             "| kernel | n | suite ms | do_bench ms | difference |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['kernel']} | {r['seq_len']} | {r['suite_ms']:.4g} | {r['do_bench_ms']:.4g} | "
              f"{r['relative_difference']:+.1%} |" for r in rows]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
