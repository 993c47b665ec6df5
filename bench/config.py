"""Structured configs: the schema every composed config is validated against before a job runs.

A wrong group choice, option name or value type stops Hydra at composition with a message
that names the valid choices; nothing is measured. Each attention backend's schema is derived
from its constructor (``efficient.attention.options_schema``) and stored under
``schema/attention/<name>``, which ``conf/attention/<name>.yaml`` extends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from hydra.errors import CompactHydraException

from efficient.attention import Bound, backend_names, get_backend, options_schema
from efficient.models import ModelSize


class Device(Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(Enum):
    float64 = "float64"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class Scope(Enum):
    attention = "attention"  # one attention layer: projections + attention core
    model = "model"  # the whole stack: embeddings, every block, the head


class Norm(Enum):
    pre = "pre"
    post = "post"


class Positional(Enum):
    sinusoidal = "sinusoidal"
    learned = "learned"
    none = "none"


@dataclass
class ModelConfig(ModelSize):
    """The library's ModelSize, with its choices as enums so that Hydra validates them."""

    norm: Norm = Norm.pre
    positional: Positional = Positional.sinusoidal


def model_size(model) -> ModelSize:
    """The library's ModelSize from a composed ``model`` config node."""
    return ModelSize(
        model.d_model, model.n_heads, model.n_layers, model.d_ff, model.dropout,
        model.norm.value, model.positional.value,
    )


@dataclass
class SpeedBenchConfig:
    name: str = "speed"
    scope: Scope = Scope.attention
    warmup: int = 2  # untimed runs before timing (also compiles / autotunes)
    repeats: int = 10  # timed runs; the record keeps the median and the 20th/80th percentiles
    backward: bool = True  # also time and measure forward+backward
    check_error: bool = True  # max_abs_err against the exact reference (fp64 CPU / fp32 GPU)
    memory_budget_gib: Optional[float] = None  # None: half the free RAM (CPU), 90% of free GPU memory
    threads: Optional[int] = None  # CPU threads (torch.set_num_threads); None: every core
    pad_fraction: float = 0.0  # fraction of each sequence that is padding (key_padding_mask)


class SearchMethod(Enum):
    auto = "auto"  # measure on GPU, predict on CPU
    measure = "measure"  # run the step: real out-of-memory, measured peak
    predict = "predict"  # the memory guard's model only


@dataclass
class MaxLenBenchConfig:
    name: str = "maxlen"
    scope: Scope = Scope.attention
    backward: bool = True  # the step must fit forward+backward (else the forward)
    method: SearchMethod = SearchMethod.auto
    memory_budget_gib: Optional[float] = None  # None: half the free RAM (CPU), 90% of free GPU memory
    resolution: int = 256  # bisect until the bracket is this narrow (tokens)
    limit: int = 2**22  # never try beyond this length
    pad_fraction: float = 0.0
    threads: Optional[int] = None


@dataclass
class XLEvalBenchConfig:
    name: str = "xl_eval"
    tgt_len: int = 128  # XL's evaluation segment; seq_len is the attention length
    warmup: int = 1
    repeats: int = 5


@dataclass
class AccuracyBenchConfig:
    name: str = "accuracy"
    steps: int = 2000
    lr: float = 1e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.01
    warmup_steps: int = 100  # linear warm-up, then cosine decay to zero
    clip: float = 1.0  # gradient norm clipping
    eval_every: int = 200  # validation accuracy (and checkpoints) every this many steps
    amp: bool = True  # bf16 autocast on GPU
    resume: bool = False  # continue from last.pt in the output folder
    progress: bool = True  # the progress bar
    threads: Optional[int] = None  # CPU threads; None: every core (set 1 when jobs run side by side)


@dataclass
class ListOpsTaskConfig:
    name: str = "listops"
    data_dir: Optional[str] = None  # a folder with LRA's basic_{train,val,test}.tsv; None: generate
    n_train: int = 20000
    n_val: int = 1000
    n_test: int = 2000
    min_length: int = 500  # keep min_length < L < max_length, L = operators + digits + "]" (LRA's window)
    max_length: int = 2000  # LRA: 500 < L < 2000, depth <= 10, <= 10 arguments; inputs are cut to seq_len
    max_depth: int = 10
    max_args: int = 10


@dataclass
class RecallTaskConfig:
    name: str = "recall"
    vocab_size: int = 256  # padding, then keys, values and filler in three equal ranges
    n_pairs: int = 16  # key-value pairs at the start of each sequence
    n_queries: int = 16  # keys asked again at the end; their values are scored
    n_train: int = 10000
    n_val: int = 500
    n_test: int = 1000


@dataclass
class CharLMTaskConfig:
    name: str = "charlm"
    data_path: Optional[str] = None  # a raw byte file (enwik8, or enwik8.zip); None: Python's reference topics


@dataclass
class TaskConfig:
    name: str = "synthetic"  # random inputs for speed and memory
    vocab_size: int = 256  # token ids drawn for the `model` scope
    n_classes: int = 10


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
    causal: bool = False
    seed: int = 0
    resume: bool = False  # skip cells already recorded under the sweep folder (bench/resume.py)
    wandb: WandbConfig = field(default_factory=WandbConfig)


# Valid ranges of the numeric settings (a key a config does not have is not checked); each
# backend's own options are bounded by its ``option_bounds``. The schema checks types, these the values.
BOUNDS = {
    "seq_len": Bound(1), "batch_size": Bound(1),
    "model.d_model": Bound(1), "model.n_heads": Bound(1), "model.n_layers": Bound(1), "model.d_ff": Bound(1),
    "model.dropout": Bound(0, high=1),
    "bench.warmup": Bound(0), "bench.repeats": Bound(1), "bench.memory_budget_gib": Bound(0, open=True),
    "bench.threads": Bound(1), "bench.pad_fraction": Bound(0, high=1), "bench.resolution": Bound(1),
    "bench.limit": Bound(1), "bench.tgt_len": Bound(1), "bench.steps": Bound(1), "bench.lr": Bound(0, open=True),
    "bench.weight_decay": Bound(0), "bench.warmup_steps": Bound(0), "bench.clip": Bound(0, open=True),
    "bench.eval_every": Bound(1),
    "task.n_train": Bound(1), "task.n_val": Bound(1), "task.n_test": Bound(1), "task.min_length": Bound(1),
    "task.max_length": Bound(1), "task.max_depth": Bound(1), "task.max_args": Bound(2), "task.vocab_size": Bound(2),
    "task.n_pairs": Bound(1), "task.n_queries": Bound(1), "task.n_classes": Bound(2),
}


class InvalidValue(CompactHydraException):
    """A setting outside its valid range: refused before anything runs (Hydra prints the message alone)."""


def value_problems(cfg) -> list[str]:
    """One sentence per setting of ``cfg`` outside its valid range (empty when all are valid)."""
    bounds = dict(BOUNDS)
    bounds.update({f"attention.{k}": b for k, b in get_backend(cfg.attention.name).option_bounds.items()})
    problems = []
    for key, bound in bounds.items():
        value = OmegaConf.select(cfg, key, default=None)
        if not bound.admits(value):
            problems.append(f"{key}={value} is out of range: {key} must be {bound}")
    d_model, n_heads = cfg.model.d_model, cfg.model.n_heads
    if n_heads >= 1 and d_model % n_heads:
        problems.append(f"model.d_model={d_model} is not a multiple of model.n_heads={n_heads}: "
                        f"every head needs the same width")
    return problems


def check_values(cfg) -> None:
    """Raise InvalidValue naming every setting of ``cfg`` outside its valid range."""
    problems = value_problems(cfg)
    if problems:
        raise InvalidValue("; ".join(problems))


def job_cell_hash(*, _root_: DictConfig) -> str:
    """``${cell_hash:}`` in a job's output folder name: the short ``config_hash`` of its cell, so
    that two different cells never share a folder (and a resumed cell finds its own)."""
    from bench.harness import cell_hash  # the harness imports this module

    job = OmegaConf.masked_copy(_root_, [key for key in _root_ if key != "hydra"])
    return cell_hash(job)[:8]


@dataclass
class CellSweeperConfig:
    """hydra/sweeper=cells: Hydra's basic sweeper that also checks every job's values first."""

    _target_: str = "hydra_plugins.efficient_bench.cell_sweeper.CellSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[dict[str, str]] = None


def backend_list(device: str | None = None, dtype: str = "float32") -> str:
    """``${backends:}``: every registered backend, comma-separated, for a sweep's ``attention``;
    ``${backends:cpu,float32}``: those that can run on that device and dtype here."""
    from efficient.attention import Cell

    names = backend_names()
    if device is not None:
        names = [n for n in names if get_backend(n).cannot_run(Cell(device, dtype)) is None]
    return ",".join(names)


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def config_groups() -> str:
    """``${config_groups:}`` in ``--help``: each group of conf/ and its choices, read from the folder."""
    lines = []
    for folder in sorted(p for p in CONF_DIR.rglob("*") if p.is_dir() and any(p.glob("*.yaml"))):
        group = folder.relative_to(CONF_DIR).as_posix()
        lines.append(f"  {group + ':':<18}{', '.join(sorted(f.stem for f in folder.glob('*.yaml')))}")
    return "\n".join(lines)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="hydra/sweeper", name="cells", node=CellSweeperConfig)
    cs.store(group="schema/bench", name="speed", node=SpeedBenchConfig)
    cs.store(group="schema/bench", name="xl_eval", node=XLEvalBenchConfig)
    cs.store(group="schema/bench", name="maxlen", node=MaxLenBenchConfig)
    cs.store(group="schema/task", name="synthetic", node=TaskConfig)
    cs.store(group="schema/task", name="listops", node=ListOpsTaskConfig)
    cs.store(group="schema/task", name="recall", node=RecallTaskConfig)
    cs.store(group="schema/task", name="charlm", node=CharLMTaskConfig)
    cs.store(group="schema/bench", name="accuracy", node=AccuracyBenchConfig)
    cs.store(group="schema/model", name="model", node=ModelConfig)
    for name in backend_names():
        cs.store(group="schema/attention", name=name, node=options_schema(get_backend(name)))


register_configs()
OmegaConf.register_new_resolver("cell_hash", job_cell_hash, replace=True)
OmegaConf.register_new_resolver("backends", backend_list, replace=True)
OmegaConf.register_new_resolver("config_groups", config_groups, replace=True)
