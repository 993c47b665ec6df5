"""A one-node SLURM cluster for the tests: munged, slurmctld and slurmd started as root without
systemd, in a folder of their own, and stopped by PID.

Debian's ``slurmctld``, ``slurmd``, ``slurm-client`` and ``munge`` packages (``.ci/run`` installs
them where missing) are all it needs. The configuration is the smallest that behaves like a real
cluster for the suite: the node's real CPUs and memory, one partition, limits enforced at
submission (an impossible request is refused at once instead of pending forever), no accounting
database, and one line per finished job in ``jobcomp.txt`` (how the tests count submissions).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue")
PARTITION = "cpu"


def missing() -> str | None:
    """Why no cluster can be started here, or None."""
    if os.geteuid() != 0:
        return "starting slurmctld and slurmd needs root"
    absent = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if absent:
        return (
            f"SLURM is not installed ({', '.join(absent)} missing: apt-get install slurmctld slurmd slurm-client munge)"
        )
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_line() -> str:
    """'NodeName=vm CPUs=2 ... RealMemory=24105' as slurmd itself measures the machine."""
    measured = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    return measured + " State=UNKNOWN"


@dataclass
class Cluster:
    folder: Path
    conf: Path
    node: str

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def finished_jobs(self, at_least: int = 0, timeout: float = 30) -> list[str]:
        """One line per job that ended (jobcomp/filetxt), in order. slurmctld writes a job's line a
        moment after the job's result has reached the sweep: wait for `at_least` lines to appear."""
        path = self.folder / "jobcomp.txt"
        deadline = time.monotonic() + timeout
        while True:
            lines = path.read_text().splitlines() if path.exists() else []
            if len(lines) >= at_least or time.monotonic() > deadline:
                return lines
            time.sleep(0.2)

    def run(self, *command: str) -> str:
        return subprocess.run(
            command, env={**os.environ, **self.env}, capture_output=True, text=True, check=True
        ).stdout

    def wait_idle(self, timeout: float = 60) -> None:
        """Until no job is queued or running."""
        deadline = time.monotonic() + timeout
        while self.run("squeue", "-h").strip():
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs still queued after {timeout} s:\n{self.run('squeue')}")
            time.sleep(0.5)


def write_conf(folder: Path) -> Path:
    node = node_line()
    name = node.split()[0].removeprefix("NodeName=")
    conf = folder / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=efficient-test",
                f"SlurmctldHost={name}(127.0.0.1)",
                "SlurmUser=root",
                "AuthType=auth/munge",
                f"SlurmctldPort={free_port()}",
                f"SlurmdPort={free_port()}",
                f"StateSaveLocation={folder}/state",
                f"SlurmdSpoolDir={folder}/spool",
                f"SlurmctldPidFile={folder}/slurmctld.pid",
                f"SlurmdPidFile={folder}/slurmd.pid",
                f"SlurmctldLogFile={folder}/slurmctld.log",
                f"SlurmdLogFile={folder}/slurmd.log",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "MpiDefault=none",
                "AccountingStorageType=accounting_storage/none",
                "JobCompType=jobcomp/filetxt",
                f"JobCompLoc={folder}/jobcomp.txt",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core_Memory",
                "EnforcePartLimits=ALL",
                "ReturnToService=2",
                "KillWait=5",  # seconds between SIGTERM and SIGKILL for a cancelled job (default 30)
                "MinJobAge=300",
                node,
                f"PartitionName={PARTITION} Nodes={name} Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    return conf


def start_munge(folder: Path) -> int:
    """munged as the munge user (the package made its key); returns its PID."""
    run_dir = Path("/run/munge")
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.chown(run_dir, "munge", "munge")
    pid_file = run_dir / "munged.pid"
    if pid_file.exists():  # one already running (a former session, or the machine's own)
        pid = int(pid_file.read_text())
        try:
            os.kill(pid, 0)
            return -1  # not ours: not stopped afterwards
        except ProcessLookupError:
            pid_file.unlink()
    subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True, capture_output=True)
    return int(pid_file.read_text())


def start(folder: Path) -> tuple[Cluster, list[int]]:
    """The running cluster and the PIDs to stop afterwards."""
    conf = write_conf(folder)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    pids = [start_munge(folder)]
    subprocess.run(["slurmctld", "-f", str(conf)], env=env, check=True, capture_output=True)
    subprocess.run(["slurmd", "-f", str(conf)], env=env, check=True, capture_output=True)
    node = conf.read_text().split("NodeName=")[1].split()[0]
    cluster = Cluster(folder, conf, node)
    deadline = time.monotonic() + 30
    while "idle" not in cluster.run("sinfo", "-h", "-o", "%T"):
        if time.monotonic() > deadline:
            logs = "\n".join(
                (folder / f).read_text()[-2000:] for f in ("slurmctld.log", "slurmd.log") if (folder / f).exists()
            )
            raise RuntimeError(f"the test cluster did not come up in 30 s:\n{logs}")
        time.sleep(0.2)
    pids += [int((folder / f"{d}.pid").read_text()) for d in ("slurmctld", "slurmd")]
    return cluster, pids


def stop(pids: list[int]) -> None:
    for pid in reversed(pids):
        if pid > 0:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
