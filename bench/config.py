"""Structured configs: the schema every composed config is validated against before a job runs.

A wrong group choice, option name or value type stops Hydra at composition with a message
that names the valid choices; nothing is measured. The top level and ``model`` are defined
here; each bench, task and attention backend brings its own schema through its registry (a
bench's or task's dataclass, a backend's constructor via ``efficient.attention.options_schema``),
stored under ``schema/<group>/<name>``, which ``conf/<group>/<name>.yaml`` extends. The same
registries bound the numeric settings (``value_problems``), checked before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.errors import CompactHydraException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from bench import benches, tasks
from bench.cell import ModelConfig, cell_hash
from efficient.attention import Setting, backend_names, get_backend, options_schema
from efficient.bounds import Bound
from efficient.integrations.hf import json_field


class Device(Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(Enum):
    float64 = "float64"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


@dataclass
class WandbConfig:
    project: str = "efficient-attention"
    entity: Optional[str] = None
    mode: Optional[str] = None  # online | offline | disabled; None: $WANDB_MODE, else offline
    tags: list[str] = field(default_factory=list)


@dataclass
class Config:
    attention: Any = MISSING
    bench: Any = MISSING
    task: Any = MISSING
    model: ModelConfig = MISSING
    seq_len: int = 1024
    batch_size: int = 1
    dtype: DType = DType.float32
    device: Device = Device.auto
    causal: bool = "${oc.select:bench.causal,false}"  # type: ignore[assignment]  # a bench may fix it (decode)
    seed: int = 0
    resume: bool = False  # skip cells already recorded under the sweep folder (bench/resume.py)
    wandb: WandbConfig = field(default_factory=WandbConfig)


# Valid ranges of the top-level and model settings (a key a config does not have is not
# checked). Each bench, task and backend bounds its own (``bounds``, ``option_bounds``). The
# schema checks types, these the values.
BOUNDS = {
    "seq_len": Bound(1),
    "batch_size": Bound(1),
    "model.d_model": Bound(1),
    "model.n_heads": Bound(1),
    "model.n_layers": Bound(1),
    "model.d_ff": Bound(1),
    "model.dropout": Bound(0, high=1),
    "model.n_kv_heads": Bound(1),
}


class InvalidValue(CompactHydraException):
    """A setting outside its valid range: refused before anything runs (Hydra prints the message alone)."""


def value_problems(cfg) -> list[str]:
    """One sentence per setting of ``cfg`` outside its valid range (empty when all are valid)."""
    if unresolved := unresolvable(cfg):
        return unresolved
    bounds = dict(BOUNDS)
    for group, own in (
        ("attention", get_backend(cfg.attention.name).option_bounds),
        ("bench", benches.get_bench(cfg.bench.name).bounds),
        ("task", tasks.get_task(cfg.task.name).bounds),
    ):
        bounds.update({f"{group}.{k}": b for k, b in own.items()})
    problems = []
    for key, bound in bounds.items():
        value = OmegaConf.select(cfg, key, default=None)
        if not bound.admits(value):
            problems.append(f"{key}={value} is out of range: {key} must be {bound}")
    d_model, n_heads = cfg.model.d_model, cfg.model.n_heads
    if n_heads >= 1 and d_model % n_heads:
        problems.append(
            f"model.d_model={d_model} is not a multiple of model.n_heads={n_heads}: every head needs the same width"
        )
    bench = benches.get_bench(cfg.bench.name)
    problems += bench.config_problems(cfg) if bench.config_problems else []
    bench_causal = cfg.bench.get("causal")  # a bench that measures one setting only (decode: causal)
    if bench_causal is not None and cfg.causal != bench_causal:
        problems.append(
            f"bench={cfg.bench.name} runs only with causal={str(bench_causal).lower()}: "
            f"drop causal={str(cfg.causal).lower()}"
        )
    n_kv_heads = cfg.model.get("n_kv_heads")
    if n_kv_heads is not None and n_kv_heads >= 1 and n_heads % n_kv_heads:
        problems.append(
            f"model.n_kv_heads={n_kv_heads} does not divide model.n_heads={n_heads}: "
            f"each key/value head serves a group of n_heads / n_kv_heads query heads"
        )
    return problems


def unresolvable(cfg) -> list[str]:
    """The first setting whose value cannot be found (``???`` left unset, a ``config.json`` that
    cannot be read), in a sentence; empty when every value resolves."""
    try:
        OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    except (InterpolationResolutionError, MissingMandatoryValue) as e:
        return [str(e).splitlines()[0].split(" raised while resolving interpolation: ")[-1]]
    return []


def check_values(cfg) -> None:
    """Raise InvalidValue naming every setting of ``cfg`` outside its valid range."""
    problems = value_problems(cfg)
    if problems:
        raise InvalidValue("; ".join(problems))


def job_cell_hash(*, _root_: DictConfig) -> str:
    """``${cell_hash:}`` in a job's output folder name: the short ``config_hash`` of its cell, so
    that two different cells never share a folder (and a resumed cell finds its own)."""
    try:
        return sweep_job_hash(_root_)[:8]
    except (InterpolationResolutionError, MissingMandatoryValue):  # check_values says which value, in words
        return "unresolved"


def sweep_job_hash(config: DictConfig) -> str:
    """The ``config_hash`` of a job's cell from its config as Hydra composes it (``hydra`` node included)."""
    return cell_hash(OmegaConf.masked_copy(config, [key for key in config if key != "hydra"]))


@dataclass
class CellSweeperConfig:
    """hydra/sweeper=cells: Hydra's basic sweeper that also checks every job's values first."""

    _target_: str = "hydra_plugins.efficient_bench.cell_sweeper.CellSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[dict[str, str]] = None


def backend_list(device: str | None = None, dtype: str = "float32") -> str:
    """``${backends:}``: every registered backend, comma-separated, for a sweep's ``attention``;
    ``${backends:cpu,float32}``: those that can run on that device and dtype here."""
    names = backend_names()
    if device is not None:
        names = [n for n in names if get_backend(n).cannot_run(Setting(device, dtype)) is None]
    return ",".join(names)


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def config_groups() -> str:
    """``${config_groups:}`` in ``--help``: each group of conf/ and its choices, read from the folder."""
    lines = []
    for folder in sorted(p for p in CONF_DIR.rglob("*") if p.is_dir() and any(p.glob("*.yaml"))):
        group = folder.relative_to(CONF_DIR).as_posix()
        lines.append(f"  {group + ':':<18}{', '.join(sorted(f.stem for f in folder.glob('*.yaml')))}")
    return "\n".join(lines)


def register() -> None:
    """Store the schemas in Hydra's ConfigStore and register the resolvers the yaml files use
    (``${cell_hash:}``, ``${backends:}``, ``${config_groups:}``, ``${hf_json:PATH,FIELD}``). Called
    once before composing: by run.py when it is imported (a SLURM job unpickles it), by the tests,
    by the GPU check."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="hydra/sweeper", name="cells", node=CellSweeperConfig)
    cs.store(group="schema/model", name="model", node=ModelConfig)
    for bench in map(benches.get_bench, benches.bench_names()):
        cs.store(group="schema/bench", name=bench.name, node=bench.schema)
    for task in map(tasks.get_task, tasks.task_names()):
        cs.store(group="schema/task", name=task.name, node=task.schema)
    for name in backend_names():
        cs.store(group="schema/attention", name=name, node=options_schema(get_backend(name)))
    OmegaConf.register_new_resolver("cell_hash", job_cell_hash, replace=True)
    OmegaConf.register_new_resolver("backends", backend_list, replace=True)
    OmegaConf.register_new_resolver("config_groups", config_groups, replace=True)
    OmegaConf.register_new_resolver("hf_json", json_field, replace=True)
