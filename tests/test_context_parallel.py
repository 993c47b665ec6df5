"""Context parallelism (efficient/context_parallel.py) on CPU with gloo: 1, 2 and 4 processes, each
holding its zigzag part of one sequence. Outputs and gradients equal single-process exact
attention over the whole sequence: causal or not, a length that 2P divides or not, padded keys,
grouped-query heads."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.benches.context_parallel import free_port
from efficient import context_parallel as cp
from efficient.attention.functional import exact_attention

B, HEADS, KV_HEADS, HEAD_DIM = 2, 4, 2, 16
STRATEGIES = ("ring", "ring-fused", "allgather")  # ring-fused: the ring's blocks by torch's fused CPU kernel


def inputs(n: int, dtype: torch.dtype, padded: bool):
    """q, k, v, the gradient of the output, and the key padding (the second sequence's last 5
    tokens padding), the same on every rank."""
    g = torch.Generator().manual_seed(n)
    q = torch.randn(B, HEADS, n, HEAD_DIM, generator=g, dtype=dtype)
    k, v = (torch.randn(B, KV_HEADS, n, HEAD_DIM, generator=g, dtype=dtype) for _ in range(2))
    grad = torch.randn(B, HEADS, n, HEAD_DIM, generator=g, dtype=dtype)
    real = torch.ones(B, n, dtype=torch.bool)
    if padded:
        real[1, -5:] = False
    return q, k, v, grad, real


def reference(n, dtype, causal, padded):
    """Single-process exact attention over the whole sequence: output and q, k, v gradients."""
    q, k, v, grad, real = inputs(n, dtype, padded)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = exact_attention(q, k, v, real if padded else None, causal)
    (out * grad).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def rank_main(rank, world, port, folder, strategy, n, dtype, causal, padded):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        q, k, v, grad, real = inputs(n, dtype, padded)
        mine = [cp.shard(t, rank, world).clone().requires_grad_() for t in (q, k, v)]
        key_real = cp.local_padding(real if padded else None, n, B, rank, world, q.device)
        if strategy.startswith("ring"):
            out = cp.ring_attention(*mine, key_real, causal, kernel="fused" if strategy == "ring-fused" else "tiles")
        else:
            out = cp.allgather_attention(*mine, key_real, causal, exact_attention)
        (out * cp.shard(grad, rank, world)).sum().backward()
        torch.save([out.detach()] + [t.grad for t in mine], f"{folder}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_on_ranks(world, tmp_path, *args):
    mp.start_processes(rank_main, args=(world, free_port(), str(tmp_path), *args), nprocs=world, start_method="spawn")
    per_rank = [torch.load(tmp_path / f"{rank}.pt") for rank in range(world)]
    return [cp.unshard([parts[i] for parts in per_rank], args[1]) for i in range(4)]


@pytest.mark.parametrize("world", [1, 2, pytest.param(4, marks=pytest.mark.slow)])  # 4: a process each, ~5 s a test
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [48, 37])  # 37: not a multiple of 2P, the layout pads
def test_outputs_and_gradients_equal_single_process_attention_float64(world, strategy, causal, n, tmp_path):
    got = run_on_ranks(world, tmp_path, strategy, n, torch.float64, causal, True)
    expected = reference(n, torch.float64, causal, True)
    for name, g, e in zip(("output", "dq", "dk", "dv"), got, expected):
        assert (g - e).abs().max() < 1e-10, name


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_float32_within_1e_5(strategy, tmp_path):
    got = run_on_ranks(2, tmp_path, strategy, 40, torch.float32, True, False)
    expected = reference(40, torch.float32, True, False)
    for name, g, e in zip(("output", "dq", "dk", "dv"), got, expected):
        assert (g - e).abs().max() < 1e-5, name


def test_the_ring_s_tiles_merge_exactly(monkeypatch, tmp_path):
    """Tiles smaller than a chunk: the log-sum-exp merge inside a block is exercised too."""
    monkeypatch.setattr(cp, "TILE", 5)
    got = run_on_ranks(2, tmp_path, "ring", 48, torch.float64, True, True)
    expected = reference(48, torch.float64, True, True)
    for g, e in zip(got, expected):
        assert (g - e).abs().max() < 1e-10


def test_the_zigzag_layout_balances_the_causal_work():
    """Rank r holds chunks r and 2P-1-r: every rank sees the same number of (query, key) pairs."""
    world, c = 4, 8
    work = []
    for rank in range(world):
        positions = cp.shard(torch.arange(2 * world * c)[:, None], rank, world, dim=0).flatten()
        work.append(int((positions + 1).sum()))  # query at position i sees i + 1 keys
    assert len(set(work)) == 1 and math.isclose(sum(work), (2 * world * c) * (2 * world * c + 1) / 2)
    parts = [cp.shard(torch.arange(37)[None], r, 3, dim=-1) for r in range(3)]
    assert torch.equal(cp.unshard(parts, 37, dim=-1), torch.arange(37)[None])


# ---- bench=context_parallel ------------------------------------------------------------------

LAYER = ("bench=context_parallel", "seq_len=96", "model.d_model=64", "model.n_heads=4", "device=cpu", "bench.repeats=2")


@pytest.mark.parametrize("strategy, backend", [("ring", "full"), ("ring", "sdpa"), ("allgather", "sdpa")])
def test_a_job_splits_the_sequence_over_its_ranks_and_records_it(strategy, backend, tmp_path):
    from conftest import compose

    from bench.harness import run_job

    cfg = compose(*LAYER, f"bench.strategy={strategy}", f"attention={backend}", "causal=true", "bench.ranks=2")
    record = run_job(cfg, output_dir=tmp_path)
    assert record["status"] == "ok", record.get("reason")
    assert record["label"] == f"{strategy} x2: {backend}" and record["ranks"] == 2 and record["tokens_per_rank"] == 48
    assert record["max_abs_err"] < 1e-5 and "one process" in record["reference"]
    assert record["fwd_ms"] > 0 and record["fwd_bwd_ms"] > 0 and len(record["rank_peak_mem_mib"]) == 2
    assert record["sent_mib"] == pytest.approx(record["model_sent_mib"])  # counted at the calls = the model
    if strategy == "ring":  # the forward's hops, timed alone, against the time it stayed blocked on them
        assert record["comm_ms"] > 0 and 0 <= record["exposed_comm_ms"]
        assert record["overlap"] == pytest.approx(max(0.0, 1 - record["exposed_comm_ms"] / record["comm_ms"]))
    else:
        assert record["comm_ms"] is None and record["overlap"] is None


def test_torch_s_own_context_parallelism_is_unsupported_on_cpu_with_its_reason(tmp_path):
    from conftest import compose

    from bench.config import value_problems
    from bench.harness import run_job

    record = run_job(compose(*LAYER, "bench.strategy=torch", "attention=sdpa", "causal=true"), output_dir=tmp_path)
    assert record["status"] == "unsupported" and record["final"] is True
    assert "CUDA's SDPA kernels" in record["reason"] and "ring or allgather" in record["reason"]
    (problem,) = value_problems(compose(*LAYER, "bench.strategy=torch", "attention=full"))
    assert "attention=sdpa" in problem


def torch_cp_on_cpu(rank, world, port, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    entered, q = False, torch.randn(1, 2, 8, 4)
    try:
        with cp.torch_context_parallel(16, True, None, torch.device("cpu"), "alltoall"):
            entered = True  # torch's layout is the zigzag (else the context raises)
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        outcome = "ran"
    except Exception as e:  # torch 2.13: NotImplementedError, "... does not have a sharding strategy registered"
        outcome = f"{type(e).__name__}: {e}"
    finally:
        dist.destroy_process_group()
    (folder / f"{rank}.txt").write_text(f"{entered}\n{outcome}")


def test_torch_s_context_parallel_lays_out_as_the_zigzag_and_still_refuses_cpu_sdpa(tmp_path):
    """What the CPU refusal says is still torch's behaviour (if torch learns CPU, this fails: use it then)."""
    mp.start_processes(torch_cp_on_cpu, args=(2, free_port(), tmp_path), nprocs=2, start_method="spawn")
    for rank in range(2):
        entered, outcome = (tmp_path / f"{rank}.txt").read_text().split("\n", 1)
        assert entered == "True" and outcome != "ran", outcome


# ---- launched by torchrun or SLURM ----------------------------------------------------------


TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
SRUN = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4"}


@pytest.mark.parametrize(
    "env, expected",
    [
        (TORCHRUN, (3, 4, 1, 2)),
        (SRUN, (5, 8, 1, 4)),  # srun's tasks, sharing the node's cores
        ({**SRUN, "SLURM_CPUS_PER_TASK": "3"}, (5, 8, 1, 1)),  # each with cores of its own
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}, None),  # an allocation's shell, no step: one process
        ({"RANK": "0", "WORLD_SIZE": "1"}, None),
    ],
)
def test_a_job_knows_its_place_among_the_launcher_s_processes(env, expected, monkeypatch):
    from bench import ranks

    for name in [n for n in os.environ if n.startswith("SLURM_")] + list(TORCHRUN):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    where = ranks.launched()
    assert (where and (where.rank, where.world, where.local_rank, where.sharing_cores)) == expected


def test_slurm_tasks_meet_at_the_first_node_scontrol_names(tmp_path, monkeypatch):
    from bench import ranks

    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[03-05],cpu1" ] && printf "gpu03\\ngpu04\\n"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert ranks.first_node("gpu[03-05],cpu1") == "gpu03" and ranks.first_node("node7") == "node7"
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(RuntimeError, match="set MASTER_ADDR"):
        ranks.first_node("gpu[03-05]")


def test_srun_s_tasks_run_one_job_and_rank_0_records_it(tmp_path):
    """Two processes of one job as ``srun`` starts them (SLURM_* only, no MASTER_*): they meet at
    the step's node, on the job id's port, and one record is written."""
    import socket
    import subprocess
    import sys

    from conftest import ROOT, no_time_budget, results_under

    for port in range(29_000, 39_000, 7):  # a free port the job id maps to (20000 + id % 20000)
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                break
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    env.update(WANDB_MODE="disabled", SLURM_STEP_NUM_TASKS="2", SLURM_JOB_ID=str(port - 20_000))
    env.update(SLURM_STEP_NODELIST="127.0.0.1")
    cmd = [sys.executable, str(ROOT / "run.py"), *no_time_budget(LAYER), "attention=full", "causal=true"]
    tasks = [
        subprocess.Popen(
            [*cmd, f"hydra.run.dir={tmp_path}/run"] if task == 0 else cmd,
            env={**env, "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task)},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for task in (0, 1)
    ]
    outputs = [task.communicate(timeout=300)[0] for task in tasks]
    (record,) = results_under(tmp_path)
    assert record["status"] == "ok", outputs
    assert record["ranks"] == 2 and record["label"] == "ring x2: full" and record["max_abs_err"] < 1e-5
