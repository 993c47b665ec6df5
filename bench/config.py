"""Structured configs: the schema every composed config is validated against before a job runs.

A wrong group choice, option name or value type stops Hydra at composition with a message
that names the valid choices; nothing is measured. Each attention backend's schema is derived
from its constructor (``efficient.attention.options_schema``) and stored under
``schema/attention/<name>``, which ``conf/attention/<name>.yaml`` extends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from efficient.attention import backend_names, get_backend, options_schema
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


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
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
