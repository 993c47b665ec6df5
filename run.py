"""Entry point: one Hydra job = one measurement = one result.json (+ one W&B run).

    python run.py                                   # the main job: the default sweep for this machine
    python run.py attention=full seq_len=2048       # one cell
    python run.py -m attention=full seq_len=1024,2048,4096   # a sweep
    python run.py -m ... hydra.sweep.dir=D resume=true       # finish a sweep: skip recorded cells

With no arguments it runs the main job, ``-m experiment=main_cpu`` (or ``main_gpu`` where CUDA
is available; conf/experiment/main_*.yaml): every backend that can run on the device over a
ladder of lengths (CPU: a small layer up to 4K tokens, about five and a half minutes on 2 cores; GPU: bf16,
16 heads x 128, 1K to 16K), then the comparison table. ``+experiment=X`` means ``experiment=X``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

import bench.config
from bench import ranks, records, resume, tracking
from bench.harness import new_record, run_job

bench.config.register()  # here, not under __main__: a SLURM job imports this module to run main()


def main_job() -> list[str]:
    """The arguments of the main job: the study conf/experiment/main_{gpu,cpu}.yaml for this machine."""
    return ["--multirun", f"experiment=main_{'gpu' if torch.cuda.is_available() else 'cpu'}"]


def importable_in_jobs() -> None:
    """Jobs launched elsewhere (SLURM, submitit_local) unpickle this suite's functions in a new
    Python: give them this checkout on their path, whether or not the suite is pip-installed."""
    root = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))


def plus_experiment_as_override(argv: list[str]) -> list[str]:
    """``+experiment=X`` (the older spelling) is ``experiment=X``: the group is in the defaults list."""
    return [a.removeprefix("+") if a.startswith("+experiment=") else a for a in argv]


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg) -> None:
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    group = Path(hydra_cfg.sweep.dir).name if sweeping else None
    root = Path(hydra_cfg.sweep.dir) if sweeping else output_dir  # where resume=true looks
    bench.config.check_values(cfg)  # a sweep's jobs were checked before launch (hydra/sweeper=cells)
    record = new_record(cfg)
    if ranks.launched_rank() > 0:  # one of several processes of one job (torchrun, SLURM tasks): rank 0 records it
        if not (cfg.resume and resume.final_record(root, record)):  # rank 0 skips it too
            run_job(cfg)
        return
    if cfg.resume and (done := resume.skip_if_recorded(root, record, output_dir)):
        print(f"{tracking.run_name(record)}: skipped, already recorded ({done['status']}) in {done['_path']}")
        return
    with tracking.wandb_run(cfg, record, output_dir, group) as tracker:
        record = run_job(cfg, record, tracker, output_dir)
        written, note = records.place(output_dir, record)
        tracker.summarize(record)
    if cfg.resume:
        resume.retire_retried(root, record, written)
    print(summary_line(record))
    if note:
        print(f"  note: {note}")


def quiet_rank_overrides() -> list[str]:
    """For ranks other than 0: Hydra writes its folders and logs in a private temporary folder."""
    if ranks.launched_rank() == 0:
        return []
    folder = Path(tempfile.gettempdir()) / f"efficient-attention-rank{ranks.launched_rank()}"
    return [f"hydra.run.dir={folder}/run", f"hydra.sweep.dir={folder}/sweep", "hydra.output_subdir=null"]


def summary_line(r: dict) -> str:
    """One line per job: the status, and the measurements its bench names as headlines."""
    cell = f"{tracking.run_name(r)}:"
    if r["status"] != "ok":
        return f"{cell} {r['status']}: {r['reason']}"
    headline = (r.get("report") or {}).get("headline", [])
    parts = [words.format(r[name], record=r) for name, words in headline if r.get(name) is not None]
    return f"{cell} ok: " + (", ".join(parts) or "measured")


if __name__ == "__main__":
    importable_in_jobs()
    sys.argv = [sys.argv[0], *(plus_experiment_as_override(sys.argv[1:]) or main_job()), *quiet_rank_overrides()]
    main()
