"""``bench=context_parallel``: one attention layer over one sequence split across P processes.

Each process (a rank) holds its zigzag part of the sequence (``efficient/context_parallel.py``)
and runs the layer's projections on it; the attention spans the ranks by ``bench.strategy``:
``ring`` (keys and values passed around; each block with its log-sum-exp, by the suite's tile
arithmetic with ``attention=full`` or torch's fused CPU flash kernel with ``attention=sdpa``) or
``allgather`` (keys and values gathered once, then the
backend ``attention=`` names) or ``torch`` (torch's own ``context_parallel`` around the ``sdpa``
backend's call; CUDA only). Launch:

- ``python run.py bench=context_parallel bench.ranks=4 ...``: the job starts 4 processes on this
  machine (gloo on CPU; NCCL and a GPU each on CUDA), and records what rank 0 gathers;
- ``torchrun --nproc_per_node 4 run.py bench=context_parallel ...`` (or SLURM with 4 tasks): the
  job runs in the processes the launcher started, and only rank 0 writes the record.

Measured: the forward and forward+backward step (each repeat's time is the slowest rank's;
the median of the repeats), every rank's peak memory, the bytes each rank hands to the network
(counted at the calls) beside the strategy's model, and the max error of the gathered output
against the single-process exact layer on the whole sequence. Every rank runs the same number of
repeats (no time budget: the ranks must make the same calls).
"""

from __future__ import annotations

import copy
import os
import pickle
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

from bench import measure, ranks
from bench.benches import Bench, register_bench
from bench.cell import Cell, make_attention
from bench.measure import MIB
from bench.output_check import WrongOutput, check_exact
from bench.results import Result, measured
from efficient import context_parallel as cp
from efficient.attention import Attention, Unsupported
from efficient.bounds import Bound

OUTPUT_DIMS = ("batch", "position", "feature")


class Strategy(Enum):
    ring = "ring"
    allgather = "allgather"
    torch = "torch"


class Rotate(Enum):  # how torch's context_parallel moves K/V (its set_rotate_method)
    allgather = "allgather"
    alltoall = "alltoall"


@dataclass
class ContextParallelBenchConfig:
    name: str = "context_parallel"
    strategy: Strategy = Strategy.ring  # ring (full or sdpa) | allgather (any exact backend) | torch (sdpa, CUDA)
    rotate: Rotate = Rotate.allgather  # strategy=torch: K/V gathered once (torch's default) | alltoall: one hop a step
    ranks: int = 2  # processes this job starts (under torchrun or SLURM tasks: theirs instead)
    warmup: int = 1  # untimed steps first
    repeats: int = 5  # timed steps, the same on every rank
    backward: bool = True  # also the forward+backward step
    check_error: bool = True  # the gathered output against the single-process exact layer
    threads: Optional[int] = None  # CPU threads per rank; None: the cores allotted, shared by the ranks


@dataclass(frozen=True, kw_only=True)
class ContextParallelResult(Result):
    """One sequence's attention layer across P ranks."""

    TABLE = "One sequence across P processes (bench=context_parallel)"

    strategy: str = measured("ring | allgather", column="strategy")
    ranks: int = measured("processes the sequence is split across (P)", column="P")
    tokens_per_rank: int = measured("tokens each rank holds (the sequence padded to 2P chunks) / P")
    threads_per_rank: int = measured("CPU threads each rank computes with (bench.threads)")
    block_kernel: str = measured(
        "what computes the blocks: the ring's tiles or fused kernel, or all-gather's backend", column="blocks"
    )
    fwd_ms: float = measured(
        "median over repeats of the slowest rank's forward, ms",
        pivot="Forward latency, ms (median of the slowest rank)",
        column="fwd ms",
        fmt=",.4g",
        headline="fwd {:,.4g} ms",
    )
    fwd_bwd_ms: float = measured(
        "median over repeats of the slowest rank's forward+backward, ms",
        pivot="Forward+backward latency, ms (median of the slowest rank)",
        column="fwd+bwd ms",
        fmt=",.4g",
        headline="fwd+bwd {:,.4g} ms",
    )
    peak_mem_mib: float = measured(
        "the largest rank's peak memory of the step (forward+backward if measured), MiB",
        pivot="Peak memory of the largest rank, MiB",
        column="peak MiB/rank",
        fmt=",.4g",
        headline="peak {:,.4g} MiB/rank",
    )
    rank_peak_mem_mib: list = measured("each rank's peak memory of the step, MiB")
    sent_mib: float = measured(
        "bytes the busiest rank handed to the network in the step (counted at the calls), MiB",
        column="sent MiB/rank",
        fmt=",.4g",
    )
    model_sent_mib: float = measured("what the strategy's model says a rank sends in the step, MiB", column="model MiB")
    comm_ms: float = measured(
        "the forward ring's P-1 hops alone, no compute (median over repeats of the slowest rank), ms; CPU",
        column="comm ms",
        fmt=",.4g",
    )
    exposed_comm_ms: float = measured(
        "time the forward ring stayed blocked on its hops after each block's compute (median, slowest rank), ms; CPU"
    )
    overlap: float = measured(
        "share of the forward ring's communication hidden behind compute: 1 - exposed_comm_ms / comm_ms, in [0, 1]",
        column="overlap",
        fmt=".0%",
    )
    max_abs_err: float = measured(
        "max |gathered output - the single-process exact layer on the whole sequence|",
        column="err",
        fmt=".1e",
        headline="err {:.1e}",
    )
    reference: str = measured("what max_abs_err compares against")


def ranks_of(cell: Cell) -> int:
    where = ranks.launched()
    return where.world if where else cell.bench.ranks


def describes(cell: Cell) -> dict:
    """The label: strategy, P and the backend, e.g. ``ring x2: full``."""
    from bench.records import option_label
    from efficient.attention import as_value, option_defaults

    defaults = {k: as_value(v) for k, v in option_defaults(cell.backend).items()}
    backend = option_label(cell.attention, dict(cell.options), defaults)
    return {"label": f"{cell.bench.strategy.value} x{ranks_of(cell)}: {backend}"}


def config_problems(cfg) -> list[str]:
    from efficient.attention import as_value

    strategy = as_value(cfg.bench.strategy)
    if strategy == "ring" and cfg.attention.name not in RING_BLOCKS:
        return [
            f"bench.strategy=ring computes each block with its log-sum-exp: attention=full (the suite's tiles) "
            f"or sdpa (torch's fused CPU kernel), not {cfg.attention.name}; bench.strategy=allgather takes any "
            "exact backend"
        ]
    if strategy == "torch" and cfg.attention.name != "sdpa":
        return [f"bench.strategy=torch distributes torch's SDPA: attention=sdpa, not {cfg.attention.name}"]
    return []


RING_BLOCKS = {"full": "tiles", "sdpa": "fused"}  # the ring's block kernel for each backend it takes


def chunk_inputs(cell: Cell, world: int, rank: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's part of the input and of the output's gradient [b, n_local, d]: each of the 2P
    chunks drawn from its own seed, so a rank makes only its own (and rank 0 the whole, to check)."""
    n, d = cell.seq_len, cell.model.d_model
    c = cp.padded_length(n, world) // (2 * world)
    parts = []
    for which in (0, 1):
        chunks = [chunk_tensor(cell, m, c, d, which) for m in cp.chunks_of(rank, world)]
        parts.append(torch.cat(chunks, dim=1).to(device))
    return parts[0], parts[1]


def chunk_tensor(cell: Cell, chunk: int, c: int, d: int, which: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(cell.seed * 1_000_003 + 2 * chunk + which)
    return torch.randn(cell.batch_size, c, d, generator=g, dtype=cell.torch_dtype)


def whole_input(cell: Cell, world: int) -> torch.Tensor:
    """The sequence's input [b, n, d] (its first n tokens), as the ranks hold it in parts."""
    total, d = cp.padded_length(cell.seq_len, world), cell.model.d_model
    c = total // (2 * world)
    return torch.cat([chunk_tensor(cell, m, c, d, 0) for m in range(2 * world)], dim=1)[:, : cell.seq_len]


def timed(fn, device: str, repeats: int, warmup: int) -> list[float]:
    """This rank's time of ``fn`` per repeat, ms, each repeat started together (a barrier)."""
    times = []
    for i in range(warmup + repeats):
        dist.barrier()
        started = time.perf_counter()
        fn()
        measure.synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - started) * 1e3)
    return times


def slowest(times: list[float]) -> list[float]:
    """Each repeat's time across the ranks: the slowest rank's."""
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, times)
    return [max(column) for column in zip(*every)]


def rank_main(where: ranks.Launched, cell: Cell, out_file: str | None) -> dict | None:
    """One rank's measurement; rank 0 returns (and writes to ``out_file``) the gathered figures."""
    device = cell.device
    if device == "cuda":
        torch.cuda.set_device(where.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        dist.init_process_group(backend, rank=where.rank, world_size=where.world)
    try:
        figures = measure_rank(where, cell)
        if where.rank == 0 and out_file:
            Path(out_file).write_bytes(pickle.dumps(figures))
        return figures
    finally:
        dist.destroy_process_group()


def measure_rank(where: ranks.Launched, cell: Cell) -> dict | None:
    rank, world = where.rank, where.world
    device = "cuda" if cell.device == "cuda" else "cpu"
    if device == "cpu":
        torch.set_num_threads(cell.bench.threads or max(1, ranks.allotted_cores() // where.sharing_cores))
    torch.manual_seed(cell.seed)  # the same weights on every rank
    layer = make_attention(cell)(0).to(device=device, dtype=cell.torch_dtype).eval()
    bench = cell.bench
    model = cp.ContextParallelAttention(layer, bench.strategy.value, rotate=bench.rotate.value)
    x, grad = chunk_inputs(cell, world, rank, device)
    key_real = cp.local_padding(None, cell.seq_len, cell.batch_size, rank, world, device)

    def forward():
        with torch.no_grad(), model.step(world * x.shape[1], cell.causal, device):
            return model(x, key_real, cell.causal)

    def forward_backward():
        xr = x.detach().requires_grad_()
        model.zero_grad(set_to_none=True)
        with model.step(world * x.shape[1], cell.causal, device):
            (model(xr, key_real, cell.causal) * grad).sum().backward()

    figures: dict = {"strategy": bench.strategy.value, "ranks": world, "tokens_per_rank": x.shape[1]}
    figures["threads_per_rank"] = torch.get_num_threads() if device == "cpu" else None
    figures["block_kernel"] = block_kernel(cell)
    if bench.strategy is Strategy.ring and world > 1:
        figures |= ring_overlap(cell, forward, x.shape[1], device)
    steps = [("fwd", forward)] + ([("fwd_bwd", forward_backward)] if bench.backward else [])
    for name, fn in steps:
        per_repeat = slowest(timed(fn, device, bench.repeats, bench.warmup))
        figures[f"{name}_ms"] = statistics.median(per_repeat)
        cp.SENT["bytes"] = 0
        peak, _ = measure.profile_step(fn, device)
        sent = [None] * world
        dist.all_gather_object(sent, (cp.SENT["bytes"], peak))
        figures["rank_peak_mem_mib"] = [p / MIB for _, p in sent]
        if bench.strategy is not Strategy.torch:  # torch's own collectives are not counted
            figures["sent_mib"] = max(s for s, _ in sent) / MIB
            figures["model_sent_mib"] = model_bytes(cell, world, x.shape[1]) / MIB
    figures["peak_mem_mib"] = max(figures["rank_peak_mem_mib"])
    output = forward()
    outputs = [None] * world
    dist.all_gather_object(outputs, output.cpu())
    if rank != 0:
        return None
    if bench.check_error:
        gathered = cp.unshard(outputs, cell.seq_len, dim=1)
        figures["max_abs_err"], figures["problem"], figures["reference"] = compared(cell, layer, gathered, world)
    return figures


def block_kernel(cell: Cell) -> str:
    """What computes the blocks: the ring's tiles or fused kernel, all-gather's backend, or torch's
    SDPA kernel and how it moves K/V."""
    if cell.bench.strategy is Strategy.ring:
        return RING_BLOCKS[cell.attention]
    if cell.bench.strategy is Strategy.torch:
        return f"sdpa:{cell.options.get('kernel', 'auto')}, {cell.bench.rotate.value}"
    return cell.attention


def ring_overlap(cell: Cell, forward, local: int, device: str) -> dict:
    """How much of the forward ring's communication its compute hides (CPU: gloo's hops run on
    threads of their own, and a rank blocks on a hop only once its compute is done): the hops
    alone, timed without compute, against the time the forward stayed blocked on them. On CUDA
    a hop's wait is the stream's, not the host's: there these figures need a profiler's trace."""
    if device != "cpu":
        return {}
    b, hk, dh = cell.batch_size, cell.n_kv_heads, cell.head_dim
    block = [torch.zeros(b, hk, local, dh, dtype=cell.torch_dtype) for _ in (0, 1)]
    block.append(torch.zeros(b, local, dtype=torch.uint8))  # k, v and the key padding, as the ring sends them
    alone = slowest(timed(lambda: cp.ring_pass(block), device, cell.bench.repeats, cell.bench.warmup))
    waits = []

    def counted_forward():
        cp.WAITED["seconds"] = 0.0
        forward()
        waits.append(cp.WAITED["seconds"] * 1e3)

    timed(counted_forward, device, cell.bench.repeats, cell.bench.warmup)
    exposed = slowest(waits[cell.bench.warmup :])
    comm, blocked = statistics.median(alone), statistics.median(exposed)
    return {"comm_ms": comm, "exposed_comm_ms": blocked, "overlap": min(1.0, max(0.0, 1 - blocked / comm))}


def model_bytes(cell: Cell, world: int, local: int) -> float:
    """What a rank sends in the measured step: the ring passes its key/value block (and its key
    padding) on P-1 times, and in backward once more with their gradients (and the gradients
    alone home); all-gather sends its part to every other rank (backward: the gradients back)."""
    element = cell.element_size
    kv = 2 * cell.batch_size * local * cell.n_kv_heads * cell.head_dim * element
    mask = cell.batch_size * local
    if world == 1:
        return 0.0
    if cell.bench.strategy is Strategy.ring:
        forward = (world - 1) * (kv + mask)
        backward = (world - 1) * (2 * kv + mask) + kv  # k, v, mask, dk, dv; then dk, dv home
    else:
        forward = (world - 1) * (kv + mask * element)
        backward = (world - 1) * kv
    return forward + (backward if cell.bench.backward else 0)


def compared(cell: Cell, layer: Attention, gathered: torch.Tensor, world: int) -> tuple[float, str | None, str]:
    """(max |gathered output - exact|, why it is wrong or None, what was compared): the same layer
    in its exact reference mode, on one process, over the whole sequence (float64 on CPU)."""
    ref_dtype = torch.float32 if cell.device == "cuda" else torch.float64
    reference = copy.deepcopy(layer).to(ref_dtype)
    reference.reference_mode = True
    with torch.no_grad():
        x = whole_input(cell, world).to(next(reference.parameters()).device, ref_dtype)
        expected, _ = reference(x, causal=cell.causal)
    error, problem = check_exact(
        cell.attention, cell.dtype, gathered.to(expected.device), expected, "the gathered output", OUTPUT_DIMS
    )
    where = f"the same layer's exact attention on one process, {str(ref_dtype).removeprefix('torch.')}"
    return error, problem, where


class RankFailed(RuntimeError):
    """One of the job's processes failed or was killed: the job is an error, with nothing measured kept."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawned_rank(rank: int, world: int, cell: Cell, out_file: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    rank_main(ranks.Launched(rank, world, local_rank=rank, sharing_cores=world), cell, out_file)


def unsupported_reason(cell: Cell) -> str | None:
    strategy, world = cell.bench.strategy, ranks_of(cell)
    if strategy is Strategy.ring and cell.attention == "sdpa" and cell.device == "cuda":
        return (
            "the ring's fused blocks are torch's CPU flash kernel: on CUDA run the ring with attention=full "
            "(the suite's tiles), bench.strategy=torch (torch's own ring on SDPA) or allgather"
        )
    if strategy is Strategy.torch and cell.device != "cuda":
        return (
            "torch's context_parallel distributes CUDA's SDPA kernels (flash, efficient, cuDNN) only: on CPU its "
            "SDPA (aten._scaled_dot_product_flash_attention_for_cpu) has no sharding strategy; here run the ring "
            "or allgather"
        )
    kernel = cell.options.get("kernel", "auto")
    if strategy is Strategy.torch and kernel not in ("auto", *cp.TORCH_KERNELS):
        return f"torch's context_parallel distributes the {', '.join(cp.TORCH_KERNELS)} kernels, not kernel={kernel}"
    if strategy is Strategy.torch and cell.seq_len % (2 * world):
        return (
            f"torch's context_parallel needs a length that 2P = {2 * world} divides (it masks no padding), not "
            f"seq_len={cell.seq_len}; the ring and allgather pad"
        )
    if cell.device == "cuda" and not ranks.launched() and cell.bench.ranks > torch.cuda.device_count():
        return f"bench.ranks={cell.bench.ranks} needs as many GPUs; this machine has {torch.cuda.device_count()}"
    return None


def run_context_parallel(cell: Cell, **context) -> ContextParallelResult:
    if reason := unsupported_reason(cell):
        raise Unsupported(reason)
    if where := ranks.launched():
        ranks.rendezvous()
        figures = rank_main(where, cell, None)
        if figures is None:  # not rank 0: its figures went to rank 0, which records them
            return ContextParallelResult(strategy=cell.bench.strategy.value, ranks=where.world)
    else:
        with tempfile.TemporaryDirectory() as folder:
            out_file = str(Path(folder) / "rank0.pkl")
            try:
                torch.multiprocessing.start_processes(
                    spawned_rank,
                    args=(cell.bench.ranks, cell, out_file, free_port()),
                    nprocs=cell.bench.ranks,
                    start_method="spawn",
                )
            except ProcessExitedException as e:  # killed, or exited without a word: the others are stopped
                raise RankFailed(
                    f"rank {e.error_index} of {cell.bench.ranks} ended during the job ({e}); the other ranks "
                    "were stopped and no figure is kept"
                ) from None
            except ProcessRaisedException as e:
                last = str(e).strip().splitlines()[-1]
                raise RankFailed(f"rank {e.error_index} of {cell.bench.ranks} failed: {last}") from None
            figures = pickle.loads(Path(out_file).read_bytes())
    problem = figures.pop("problem", None)
    result = ContextParallelResult(**figures)
    if problem:
        raise WrongOutput(problem, measured=result)
    return result


register_bench(
    Bench(
        "context_parallel",
        ContextParallelBenchConfig,
        run_context_parallel,
        ContextParallelResult,
        exclusive=False,  # its ranks are processes of their own; under torchrun each would wait on the others
        describes=describes,
        config_problems=config_problems,
        bounds={"ranks": Bound(1), "warmup": Bound(0), "repeats": Bound(1), "threads": Bound(1)},
    )
)
