"""The GPU study as named steps in value order, under a time budget. ``bench/gpu/recipe.sh`` is
the entry point (it installs the offline wheels first); this module plans and runs the steps.

    recipe.sh first --budget 540        # the first pass: tests, harness, kernels, maxlen, decode
    recipe.sh next --budget 540         # on from the first step not yet done, in the order below
    recipe.sh STEP [--budget S]         # one step
    recipe.sh --rehearse first|next|all|STEP   # the same steps on CPU, with tiny shapes
    recipe.sh first --budget 510 --pack-to "$OUT"   # on a lent machine: only the tarball comes back

Each step writes under OUT/<step>/ (Hydra sweeps with resume=true: a step cut at its deadline
keeps its records and goes on from there next time). OUT/recipe_state.json says how each step
ended, and OUT/recipe.tar.gz packs every record, report, CSV and log (under 16 MiB) after every
run. With a budget each step gets a deadline, its share of the seconds left; a step whose least
useful time no longer fits is skipped, and says so. One line per finished cell is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Callable

from bench.records import STATUSES

REPO = Path(__file__).resolve().parents[2]
RESERVE_S = 15.0  # of a budget, for the tarball at the end
TARBALL_LIMIT = 16 * 2**20  # what a lent machine sends back per file
PACKED = ("result.json", "report.md", "results.csv", "harness_check.json", "log.txt", "recipe_state.json")
PROGRESS = re.compile(
    rf"^\S+: (skipped, already recorded|{'|'.join(STATUSES)})\b"  # run.py's line per cell
    r"|^resume: skipped \d+"  # a sweep's recorded cells
    r"|^=+ .*\b(passed|failed|skipped|error)"  # pytest's summary
    r"|^\| \w+ \| \d+ \|"
)  # the harness check's rows


@dataclasses.dataclass(frozen=True)
class Profile:
    """Where the steps run: the GPU itself, or a CPU rehearsal with tiny shapes."""

    name: str
    cell: tuple[str, ...]  # overrides that place a cell outside an experiment (device, dtype, model)
    n: Callable[[int], int]  # a GPU sequence length -> this profile's
    extra: dict[str, tuple[str, ...]]  # per-step overrides (the rehearsal's shrink the work)

    def lengths(self, *gpu_lengths: int) -> str:
        return ",".join(str(n) for n in dict.fromkeys(map(self.n, gpu_lengths)))


GPU = Profile(
    "gpu",
    ("device=cuda", "dtype=bfloat16", "model=gpu_d128"),
    lambda n: n,
    {
        "speed": ("bench.min_time_s=0.25",),  # each measurement: hundreds of runs of a few ms, within the budget
        "linformer": ("attention.k=128,256",),
        "decode": ("model.n_kv_heads=8,1",),
        "xl_eval": ("device=cuda", "seq_len=800,3800"),
        "lra": ("bench.amp=true",),
    },
)
TINY = (
    "device=cpu",
    "dtype=float32",
    "model.d_model=256",
    "model.n_heads=8",
    "model.d_ff=256",
    "model.n_layers=1",
)  # heads of 32, as on the GPU a multiple of 8
REHEARSAL = Profile(
    "rehearsal",
    TINY,
    lambda n: min(max(n // 64, 16), 512),
    {
        "speed": ("bench.warmup=1", "bench.repeats=2", "bench.min_time_s=0"),
        "experiment": TINY,  # over an experiment's own device, dtype and model
        "maxlen": ("bench.memory_budget_gib=0.05", "bench.limit=4096"),
        "linformer": ("attention.k=8,16",),
        "decode": (
            *TINY,
            "model.n_kv_heads=2,1",
            "bench.prefill_chunk=128",
            "bench.decode_tokens=4",
            "bench.warmup=1",
            "bench.min_time_s=0",
        ),
        "xl_eval": (
            "device=cpu",
            "seq_len=48,96",
            "model.d_model=64",
            "model.n_heads=2",
            "model.d_ff=128",
            "bench.tgt_len=16",
            "bench.repeats=1",
            "bench.min_time_s=0",
        ),
        "hf_model": (
            "device=cpu",
            "dtype=float32",
            "model.d_model=128",
            "model.n_heads=4",
            "model.n_kv_heads=2",
            "model.d_ff=192",
            "model.hf_config.vocab_size=101",
            "bench.warmup=0",
            "bench.repeats=1",
            "bench.min_time_s=0",
            "bench.decode_tokens=2",
            "bench.max_decode_tokens=2",
        ),
        "hf_lengths": ("seq_len=64,128",),
        "cp_lengths": ("seq_len=64",),
        "cp_ranks": ("bench.ranks=2",),
        "cp": ("bench.repeats=1", "bench.warmup=0"),
        "hf_mistral": ("model.hf_config.sliding_window=32",),
        "hf_window": ("attention.window=32",),
        "lra": (
            "device=cpu",
            "task.n_train=64",
            "task.n_val=16",
            "task.n_test=16",
            "task.min_length=20",
            "task.max_length=120",
            "seq_len=120",
            "batch_size=8",
            "model.d_model=64",
            "model.n_heads=2",
            "model.n_layers=1",
            "model.d_ff=128",
            "bench.steps=4",
            "bench.warmup_steps=1",
            "bench.eval_every=2",
            "bench.progress=false",
        ),
    },
)


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    share_s: float  # planning estimate of its GPU seconds: its share of a budget
    least_s: float  # below this many seconds it is not worth starting
    commands: Callable[[Profile, Path], list[list[str]]]
    what: str
    ran: tuple[int, ...] = (0,)  # exit codes of a command that did its work (failing tests are a result)


def sweep(out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "run.py", "-m", f"hydra.sweep.dir={out}", "resume=true", *overrides]


def speed_cells(p: Profile) -> tuple[str, ...]:
    return ("bench=speed", "bench.scope=attention", "batch_size=1", *p.cell, *p.extra.get("speed", ()))


def tests(p: Profile, out: Path) -> list[list[str]]:
    return [[sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]]


def harness(p: Profile, out: Path) -> list[list[str]]:
    return [
        [sys.executable, "-m", "bench.gpu.harness_check", "--out", str(out)]
        + (["--rehearse"] if p is REHEARSAL else [])
    ]


KERNEL_GROUPS = (
    ("attention=sdpa", "attention.kernel=flash,efficient,cudnn"),
    ("attention=xformers", "attention.op=auto,flash3"),
    ("attention=flex,chunked,full",),
)


def kernels(p: Profile, out: Path) -> list[list[str]]:
    """Forward and forward+backward, one layer: non-causal at 4K, 16K, 64K, then causal at 16K."""
    cells = speed_cells(p)
    return [
        sweep(out, *group, *cells, f"seq_len={p.lengths(4096, 16384, 65536)}", "causal=false")
        for group in KERNEL_GROUPS
    ] + [sweep(out, *group, *cells, f"seq_len={p.n(16384)}", "causal=true") for group in KERNEL_GROUPS]


def maxlen(p: Profile, out: Path) -> list[list[str]]:
    return [sweep(out, "bench=maxlen", "attention=sdpa,chunked,flex", *p.cell, *p.extra.get("maxlen", ()))]


def decode(p: Profile, out: Path) -> list[list[str]]:
    cells = ("experiment=decode_gpu", f"seq_len={p.lengths(32768, 131072)}", "batch_size=1", *p.extra["decode"])
    return [sweep(out, *cells, "attention=sdpa,flex"), sweep(out, *cells, "attention=xformers", "attention.op=splitk")]


def scaling(p: Profile, out: Path) -> list[list[str]]:
    cells = (
        "experiment=scaling_gpu",
        f"seq_len={p.lengths(*(1024 * 2**i for i in range(8)))}",
        *p.extra.get("experiment", ()),
        *p.extra.get("speed", ()),
    )
    return [
        sweep(out, *cells, "causal=false,true"),
        sweep(out, *cells, *KERNEL_GROUPS[0], "causal=false,true"),
        sweep(out, *cells, "attention=xformers", "attention.op=cutlass,flash,flash3", "causal=false,true"),
    ]


def linformer(p: Profile, out: Path) -> list[list[str]]:
    """Linformer's Table 3 (k = 128, 256) against exact attention, 4K to 64K."""
    cells = (*speed_cells(p), f"seq_len={p.lengths(4096, 8192, 16384, 32768, 65536)}")
    return [sweep(out, "attention=linformer", *p.extra["linformer"], *cells), sweep(out, "attention=full,sdpa", *cells)]


def xl_eval(p: Profile, out: Path) -> list[list[str]]:
    return [sweep(out, "bench=xl_eval", "attention=xl", "causal=true", *p.extra["xl_eval"])]


def main_job(p: Profile, out: Path) -> list[list[str]]:
    """``python run.py``'s study, ``experiment=main_gpu`` (the rehearsal: main_cpu, shrunk)."""
    if p is GPU:
        return [sweep(out, "experiment=main_gpu")]
    return [
        sweep(out, "experiment=main_cpu", f"seq_len={p.lengths(1024, 4096)}", *p.extra["experiment"], *p.extra["speed"])
    ]


def field(p: Profile, out: Path) -> list[list[str]]:
    """LRA's Table 2 on the GPU (every family LRA timed), and the sparse masks through
    FlexAttention against their blockwise path, one layer at 4K and 16K."""
    table2 = (
        "experiment=lra_speed_gpu",
        f"seq_len={p.lengths(1024, 2048, 3072, 4096)}",
        *p.extra.get("experiment", ()),
        *p.extra.get("speed", ()),
    )
    return [
        sweep(out, *table2),
        sweep(
            out,
            "attention=local,sliding_window,longformer,bigbird",
            "attention.kernel=flex,blockwise",
            *speed_cells(p),
            f"seq_len={p.lengths(4096, 16384)}",
            "causal=false,true",
        ),
    ]


def hf_model(p: Profile, out: Path) -> list[list[str]]:
    """A Llama-3.1-8B- and a Mistral-7B-shaped model, 2 layers, end to end (bench=model): the
    suite's backends beside transformers' own (the rehearsal: a small Llama and Mistral)."""
    lengths = p.extra.get("hf_lengths", (f"seq_len={p.lengths(4096, 8192, 16384, 32768)}",))
    llama = ("experiment=hf_llama_gpu", *lengths, *p.extra.get("hf_model", ()))
    mistral = ("experiment=hf_mistral_gpu", *lengths, *p.extra.get("hf_model", ()), *p.extra.get("hf_mistral", ()))
    window = p.extra.get("hf_window", ("attention.window=4096",))
    baselines = ("attention=full", "bench.hf_attention=eager,sdpa,flex_attention")
    return [
        sweep(out, *llama),
        sweep(out, *llama, *baselines),
        sweep(out, *mistral, "attention=sliding_window", *window),  # one backend a sweep: Hydra sets
        sweep(out, *mistral, "attention=flex", *window),  # attention.window on the default one first
        sweep(out, *mistral, *baselines),
    ]


def context_parallel(p: Profile, out: Path) -> list[list[str]]:
    """One sequence on as many ranks as the node has GPUs (one H200: a single rank, the
    strategies' cost against one process; several GPUs: the scaling), 16K-64K, causal: the
    suite's ring (tiles), all-gather (SDPA), and torch's own context_parallel (SDPA) with each
    of its two ways of moving K/V."""
    lengths = p.extra.get("cp_lengths", (f"seq_len={p.lengths(16384, 32768, 65536)}",))
    ranks = p.extra.get("cp_ranks", ("bench.ranks=${oc.env:GPUS,1}",))
    cells = ("bench=context_parallel", "causal=true", *p.cell, *lengths, *ranks, *p.extra.get("cp", ()))
    return [
        sweep(out, *cells, "attention=full"),
        sweep(out, *cells, "bench.strategy=allgather", "attention=sdpa"),
        sweep(out, *cells, "bench.strategy=torch", "attention=sdpa", "bench.rotate=allgather,alltoall"),
    ]


def lra(p: Profile, out: Path) -> list[list[str]]:
    return [sweep(out, "bench=accuracy", "experiment=lra_listops", "attention=full,linformer_lra", *p.extra["lra"])]


STEPS = (
    Step("tests", 60, 20, tests, "python -m pytest -m gpu", ran=(0, 1, 5)),  # passed, some failed, none selected
    Step(
        "harness",
        45,
        25,
        harness,
        "the suite's timing against triton.testing.do_bench (sdpa flash, cudnn; 4K, 16K)",
        ran=(0, 1),
    ),  # 1: a median beyond the tolerance, which the report shows
    Step("kernels", 210, 60, kernels, "every exact kernel, bf16 16 x 128, 4K/16K/64K and causal 16K, fwd and fwd+bwd"),
    Step("maxlen", 90, 40, maxlen, "the longest training step that fits: sdpa, chunked, flex"),
    Step(
        "decode", 120, 45, decode, "decode against 32K and 128K caches, 8 and 1 KV heads: sdpa, flex, xformers splitk"
    ),
    Step(
        "hf_model", 300, 90, hf_model, "Llama-3.1-8B and Mistral-7B shapes, 2 layers, 4K-32K, end to end (bench=model)"
    ),
    Step(
        "context_parallel",
        120,
        45,
        context_parallel,
        "one sequence over the node's GPUs (bench.ranks = $GPUS, default 1): ring, all-gather, torch's, 16K-64K",
    ),
    Step("scaling", 900, 120, scaling, "experiment=scaling_gpu: every backend 1K-128K, causal and not, every kernel"),
    Step("linformer", 400, 60, linformer, "Linformer's Table 3 to 64K (k = 128, 256) against full and sdpa"),
    Step("xl_eval", 200, 60, xl_eval, "Transformer-XL's evaluation speed at attention lengths 800 and 3,800"),
    Step("main", 300, 60, main_job, "the GPU main job (python run.py)"),
    Step("field", 300, 60, field, "LRA's Table 2 (batch 32, bf16) and the sparse masks: flex against blockwise"),
    Step("lra", 3600, 300, lra, "LRA ListOps at full length, bf16 autocast: full and linformer_lra"),
)
FIRST_PASS = ("tests", "harness", "kernels", "maxlen", "decode")
BY_NAME = {s.name: s for s in STEPS}


# -- state ----------------------------------------------------------------------------------
def read_state(out: Path) -> dict:
    path = out / "recipe_state.json"
    return json.loads(path.read_text()) if path.exists() else {"steps": {}}


def write_state(out: Path, state: dict) -> None:
    path = out / "recipe_state.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, path)


def plan(which: str, state: dict) -> list[Step]:
    """The steps a call runs, in order: ``first`` the first pass, ``next`` every step from the first
    one not yet done (a failed step is not retried by ``next``: run it by name), else one step."""
    ended = {name for name, s in state["steps"].items() if s["status"] in ("done", "failed")}
    if which == "first":
        return [BY_NAME[name] for name in FIRST_PASS if name not in ended]
    if which == "next":
        return [s for s in STEPS if s.name not in ended]
    if which == "all":
        return list(STEPS)
    return [BY_NAME[which]]


# -- running --------------------------------------------------------------------------------
def run_command(command: list[str], log, deadline: float | None, started: float) -> int | None:
    """Run ``command`` in the repository, its output into ``log`` and its progress lines (one per
    finished cell) to stdout; its process group is stopped at ``deadline``. The exit code, or None
    if it was cut."""
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    proc = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    cut = threading.Event()

    def watchdog():
        while proc.poll() is None:
            if deadline is not None and time.time() > deadline:
                cut.set()
                stop(proc)
                return
            time.sleep(0.5)

    guard = threading.Thread(target=watchdog, daemon=True)
    guard.start()
    for line in proc.stdout:
        log.write(line)
        if PROGRESS.search(line):
            print(f"[{time.time() - started:5.0f} s] {line.rstrip()}", flush=True)
    proc.wait()
    guard.join()
    return None if cut.is_set() else proc.returncode


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the whole process group (a sweep and whatever it started), then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(step: Step, profile: Profile, out: Path, deadline: float | None, started: float) -> dict:
    """Run one step's commands in turn; how it ended: done, cut (at its deadline) or failed."""
    folder = out / step.name
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    commands = step.commands(profile, folder)
    codes = []
    with open(folder / "log.txt", "a") as log:
        for command in commands:
            code = run_command(command, log, deadline, started)
            if code is None:
                break
            codes.append(code)
    write_report(folder)
    ended = {"seconds": round(time.time() - t0, 1), "exit_codes": codes}
    if len(codes) < len(commands):
        return {"status": "cut", **ended, "reason": "stopped at its deadline; `recipe.sh next` goes on from there"}
    if any(code not in step.ran for code in codes):
        return {"status": "failed", **ended, "reason": f"a command exited with an error: see {step.name}/log.txt"}
    return {"status": "done", **ended}


def write_report(folder: Path) -> None:
    if any(folder.rglob("result.json")):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.report",
                str(folder),
                "--markdown",
                str(folder / "report.md"),
                "--csv",
                str(folder / "results.csv"),
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            check=False,
        )


def pack(out: Path) -> Path:
    """OUT/recipe.tar.gz: every record, report, CSV and log under OUT, paths relative to OUT."""
    tarball = out / "recipe.tar.gz"
    tmp = tarball.with_suffix(".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(out.rglob("*")):
            if path.is_file() and path.name in PACKED:
                tar.add(path, arcname=str(path.relative_to(out)))
    os.replace(tmp, tarball)
    return tarball


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bash bench/gpu/recipe.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("which", choices=["first", "next", "all", *BY_NAME], help="what to run")
    parser.add_argument("--budget", type=float, help="seconds for the whole call (default: no limit)")
    parser.add_argument("--rehearse", action="store_true", help="on CPU, with tiny shapes")
    parser.add_argument("--out", type=Path, help="results folder (default results/gpu_<GPU>, or outputs/gpu_rehearsal)")
    parser.add_argument("--pack-to", type=Path, help="also copy recipe.tar.gz there (a lent machine's $OUT)")
    args = parser.parse_args(argv)
    started = time.time()
    profile = REHEARSAL if args.rehearse else GPU
    import torch

    if profile is GPU and not torch.cuda.is_available():
        print("recipe: no CUDA device here (--rehearse runs the steps on CPU)", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name().replace(" ", "_") if profile is GPU else "cpu_rehearsal"
    out = (args.out or REPO / ("results/gpu_" + device if profile is GPU else "outputs/gpu_rehearsal")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    state = read_state(out)
    state.update(device=device, profile=profile.name)
    steps = plan(args.which, state)
    print(
        f"recipe: {', '.join(s.name for s in steps) or 'nothing left'} -> {out}"
        + (f" (budget {args.budget:.0f} s)" if args.budget else ""),
        flush=True,
    )
    for i, step in enumerate(steps):
        deadline = None
        if args.budget is not None:
            left = args.budget - RESERVE_S - (time.time() - started)
            least = step.least_s if profile is GPU else 1.0
            if left < least:
                print(
                    f"recipe: skip {step.name}: it needs at least {least:.0f} s and {max(left, 0):.0f} s are left "
                    f"(`recipe.sh next` runs it)",
                    flush=True,
                )
                if state["steps"].get(step.name, {}).get("status") != "cut":  # a cut step keeps its own words
                    state["steps"][step.name] = {
                        "status": "skipped",
                        "reason": f"{max(left, 0):.0f} s of the budget left",
                    }
                continue
            deadline = time.time() + max(least, left * step.share_s / sum(s.share_s for s in steps[i:]))
        print(
            f"recipe: {step.name}: {step.what}"
            + (f" (deadline in {deadline - time.time():.0f} s)" if deadline else ""),
            flush=True,
        )
        state["steps"][step.name] = ended = run_step(step, profile, out, deadline, started)
        print(f"recipe: {step.name} {ended['status']} in {ended['seconds']} s", flush=True)
        write_state(out, state)
    write_state(out, state)
    tarball = pack(out)
    size = tarball.stat().st_size
    if args.pack_to:
        args.pack_to.mkdir(parents=True, exist_ok=True)
        shutil.copy(tarball, args.pack_to / tarball.name)
    print(f"recipe: {tarball} ({size / 2**20:.2f} MiB) in {time.time() - started:.0f} s", flush=True)
    if size > TARBALL_LIMIT:
        print(
            f"recipe: the tarball is over {TARBALL_LIMIT / 2**20:.0f} MiB: a lent machine would not send it back",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
