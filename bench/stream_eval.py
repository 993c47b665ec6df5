"""Evaluate a finished charlm job's best weights with other evaluation memories (Transformer-XL).

    python -m bench.stream_eval JOB_DIR --eval-mem-len 0 128 256 512 [--out DIR] [--threads N]

JOB_DIR is the output folder of a ``bench=accuracy task=charlm`` job: its ``result.json`` (the
resolved config) and ``best.pt`` (the weights kept on validation). Nothing is trained: the
model is rebuilt from the job's config, loaded, and the validation and test streams are read
again with every layer's memory set to each ``eval_mem_len`` in turn (the paper evaluates with
a longer memory than it trains with). Each evaluation memory gives one record,
``DIR/eval_mem_len_<M>/result.json`` (default DIR: JOB_DIR/eval_memory): the job's record with
``attention.eval_mem_len`` set to M, the test bits per byte as its value, the validation ones
in ``extra.val_bpc``, and ``wall_s`` the evaluation's time (training's stays in
``extra.train_seconds``). With M equal to the job's own evaluation memory, the value is the
job's own test figure: a test checks it. ``python -m bench.report DIR`` tabulates them.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from bench import records
from bench.cell import Cell, language_model
from bench.tasks.charlm import charlm_data
from efficient.attention import as_value, get_backend, option_defaults
from efficient.models import CausalLM
from efficient.recurrence import evaluate_stream


def load_job(job: Path, device: str = "cpu", task: str = "charlm") -> tuple[dict, CausalLM]:
    """(a finished causal-LM accuracy job's record, its model with the best weights, in eval mode)."""
    job = Path(job)
    record_path, weights = job / records.RESULT_FILE, job / "best.pt"
    for path in (record_path, weights):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: JOB_DIR must be a finished {task} accuracy job's folder")
    record = records.upgrade(json.loads(record_path.read_text()))  # an older job's record in today's layout
    config = record["config"]
    if config["bench"]["name"] != "accuracy" or config["task"]["name"] != task or record["status"] != "ok":
        raise ValueError(
            f"{job} is not a finished {task} accuracy job "
            f"(bench={config['bench']['name']}, task={config['task']['name']}, status={record['status']})"
        )
    model = language_model(Cell.of(OmegaConf.create(config), device)).to(device)
    model.load_state_dict(torch.load(weights, weights_only=True, map_location=device))
    return record, model.eval()


def evaluate(job: Path, eval_mem_lens: list[int], out: Path | None = None, device: str = "cpu") -> list[dict]:
    """One record per evaluation memory, written under ``out`` (default JOB/eval_memory)."""
    job = Path(job)
    out = Path(out) if out is not None else job / "eval_memory"
    record, model = load_job(job, device)
    config = record["config"]
    data = charlm_data(Cell.of(OmegaConf.create(config), device), device)
    written = []
    for mem_len in eval_mem_lens:
        started = time.perf_counter()
        bpc = {
            split: evaluate_stream(model, data.columns[split], config["seq_len"], mem_len=mem_len) / math.log(2)
            for split in ("val", "test")
        }
        derived = copy.deepcopy(record)
        derived["config"]["attention"]["eval_mem_len"] = mem_len
        derived["attention_options"] = {**record["attention_options"], "eval_mem_len": mem_len}
        defaults = {k: as_value(v) for k, v in option_defaults(get_backend(record["attention"])).items()}
        derived.update(
            label=records.option_label(record["attention"], derived["attention_options"], defaults),
            value=bpc["test"],
            best_val=bpc["val"],
            config_hash=records.config_hash(derived["config"]),
            wall_s=time.perf_counter() - started,
            threads=torch.get_num_threads(),
            git_sha=records.git_sha(),
            versions=records.versions(),
            note=(
                f"bench.stream_eval: the job {record['config_hash']}'s best weights (mem_len="
                f"{config['attention'].get('mem_len')}) read with eval_mem_len={mem_len}; "
                "training figures are that job's"
            ),
        )
        derived["data"] = {
            **(record.get("data") or {}),
            "evaluated_from": str(job),
            "trained_config_hash": record["config_hash"],
            "trained_git_sha": record.get("git_sha"),
        }
        derived.pop("_path", None)
        records.write_atomic(out / f"eval_mem_len_{mem_len}" / records.RESULT_FILE, derived)
        written.append(derived)
        print(
            f"eval_mem_len={mem_len}: val {bpc['val']:.4f} bpc, test {bpc['test']:.4f} bpc ({derived['wall_s']:.1f} s)"
        )
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stream_eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("job", type=Path, help="a finished charlm accuracy job's output folder")
    parser.add_argument("--eval-mem-len", type=int, nargs="+", required=True, help="evaluation memories")
    parser.add_argument("--out", type=Path, default=None, help="where the records go (default JOB/eval_memory)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    evaluate(args.job, args.eval_mem_len, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
