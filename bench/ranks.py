"""Where a job runs: the cores it is allotted, and its rank where a launcher (torchrun, or
SLURM's tasks) started several processes for it.

One job of ``bench=context_parallel`` may span processes that a launcher started: each runs the
same job, rank 0 records it. torchrun says who is who in ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``, with ``MASTER_ADDR`` and ``MASTER_PORT`` to meet at. ``srun`` (and so the
``hydra/launcher=slurm`` launcher with ``tasks_per_node`` above 1) says it in ``SLURM_PROCID``,
``SLURM_STEP_NUM_TASKS`` and ``SLURM_LOCALID``; the rendezvous is then the step's first node, on a
port drawn from the job's id, so that every task finds the same one without being told.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class Launched:
    rank: int  # this process, 0..world-1
    world: int  # processes of the job
    local_rank: int  # this process among those of its node (its GPU)
    sharing_cores: int  # processes that share the cores this one is allotted (allotted_cores)


def allotted_cores() -> int:
    """The cores this job may use: SLURM's allocation where it runs as a SLURM task, else its CPU
    affinity (a cgroup or taskset), not every core of the machine."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    return int(slurm) if slurm else len(os.sched_getaffinity(0))


def launched() -> Launched | None:
    """This process's place where a launcher started several for one job, else None."""
    env = os.environ
    if int(env.get("WORLD_SIZE", "1")) > 1 and "RANK" in env:  # torchrun (or any launcher that sets them)
        local_world = int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"]))
        return Launched(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"])), local_world)
    if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and "SLURM_PROCID" in env:  # srun's tasks
        # SLURM_CPUS_PER_TASK: cores of its own; else the node's cores, shared by its tasks
        sharing = 1 if "SLURM_CPUS_PER_TASK" in env else int(env.get("SLURM_NTASKS_PER_NODE", "1"))
        return Launched(
            int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", 0)), sharing
        )
    return None


def launched_rank() -> int:
    """This process's rank in its job: 0 where it is alone."""
    where = launched()
    return where.rank if where else 0


def rendezvous() -> None:
    """Set where ``init_process_group`` (given the rank and world size) meets the others, if the
    launcher did not (SLURM): the step's first node, on a port from the job's id."""
    env = os.environ
    if "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = first_node(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
    env.setdefault("MASTER_PORT", str(20_000 + int(env.get("SLURM_JOB_ID", "0")) % 20_000))


def first_node(nodelist: str) -> str:
    """The first host of a SLURM node list (``gpu[03-05],cpu1`` -> ``gpu03``), by ``scontrol``."""
    if nodelist and not any(c in nodelist for c in "[],"):
        return nodelist
    try:
        hosts = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=60
        ).stdout.split()
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(
            f"cannot tell the first node of SLURM's node list {nodelist!r} ({e}): set MASTER_ADDR (and MASTER_PORT) "
            "for the job's tasks to meet at"
        ) from None
    if not hosts:
        raise RuntimeError(f"scontrol names no host in SLURM's node list {nodelist!r}: set MASTER_ADDR")
    return hosts[0]
