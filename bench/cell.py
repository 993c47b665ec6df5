"""The cell: what a job measures, shared by every bench.

A cell is one backend with its options, one length, batch, model size, dtype and device. The
harness builds it once from the composed config (``Cell.of``, frozen) and hands it to the bench;
this module turns it into what is built for it (the attention factory, the model, the measured
subject of ``bench=speed`` and ``bench=maxlen``) and into what is predicted for it before
anything is built (the attention shape, the memory model, the FLOP count).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional

import torch
from omegaconf import OmegaConf
from torch import nn

from bench import measure, records
from bench.tasks import get_task
from efficient.attention import (
    Attention,
    Setting,
    Shape,
    Unsupported,
    as_value,
    attention_factory,
    get_backend,
    option_defaults,
    training_flops,
)
from efficient.models import CausalLM, EncoderClassifier, ModelSize


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
    """The library's ModelSize, with its choices as enums so that Hydra validates them, and the
    Hugging Face architecture ``bench=model`` builds at that size (the other benches build the
    suite's own models, which use ``norm`` and ``positional``; an HF architecture has its own)."""

    norm: Norm = Norm.pre
    positional: Positional = Positional.sinusoidal
    architecture: Optional[str] = None  # transformers' model_type (llama, mistral, gpt2, ...); None: llama
    hf_config: Optional[dict[str, Any]] = None  # its config's other fields: vocab_size, rope_parameters, ...
    config_json: Optional[str] = None  # or a user's config.json (a file or a folder), read in their place


@dataclass(frozen=True)
class Architecture:
    """The Hugging Face model ``bench=model`` builds at the cell's size: transformers' ``model_type``
    and its config's other fields, or a user's ``config.json``."""

    model_type: str
    fields: Mapping[str, Any]
    config_json: str | None = None

    @classmethod
    def of(cls, model) -> Architecture:
        fields = model.get("hf_config") or {}
        if OmegaConf.is_config(fields):
            fields = OmegaConf.to_container(fields, resolve=True)
        return cls(model.get("architecture") or "llama", MappingProxyType(fields), model.get("config_json"))

    def __reduce__(self):  # a read-only mapping does not pickle (a spawned process gets a copy)
        return rebuilt, (type(self), {**vars(self), "fields": dict(self.fields)})


def rebuilt(cls: type, values: dict):
    """A frozen dataclass of ``values`` whose plain dicts become read-only mappings again."""
    return cls(**{k: MappingProxyType(v) if isinstance(v, dict) else v for k, v in values.items()})


class PredictedOOM(Exception):
    """The memory model predicts that the cell does not fit the budget; nothing was run."""


def model_size(model) -> ModelSize:
    """The library's ModelSize from a ``model`` config node (enums or their plain values)."""
    return ModelSize(
        model.d_model,
        model.n_heads,
        model.n_layers,
        model.d_ff,
        model.dropout,
        as_value(model.norm),
        as_value(model.positional),
        model.get("n_kv_heads"),
    )


def settings(node, schema: type) -> Any:
    """A bench's or task's config node as an instance of its schema dataclass (a record's plain
    config too: merged onto the schema, so it is typed and checked the same way)."""
    if not OmegaConf.is_config(node):
        node = OmegaConf.create(node)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))


@dataclass(frozen=True)
class Cell:
    """One job's cell, built once from its composed config (``Cell.of``) and handed to its bench:
    the backend and its options, the bench's and the task's settings (instances of their
    schemas), the model's size, the length, batch, dtype, the device it runs on, and the seed.
    Everything a bench builds or predicts comes from here, never from the raw config."""

    attention: str
    options: Mapping[str, Any]  # every option of the backend, resolved (enums as plain values)
    bench: Any  # the bench's settings, e.g. SpeedBenchConfig(scope=Scope.attention, repeats=10, ...)
    task: Any  # the task's settings, e.g. SyntheticTaskConfig(vocab_size=...)
    model: ModelSize
    seq_len: int
    batch_size: int
    dtype: str  # "float32", ...
    device: str  # "cpu" | "cuda": ``device=auto`` resolved
    causal: bool
    seed: int
    architecture: Architecture  # the HF model of bench=model (model.architecture, hf_config, config_json)

    @classmethod
    def of(cls, cfg, device: str | None = None) -> Cell:
        """The cell of a composed config (or a record's ``config``) on ``device`` (default: the
        config's own, ``auto`` resolved)."""
        from bench.benches import get_bench  # the benches import this module

        return cls(
            attention=cfg.attention.name,
            options=MappingProxyType({k: as_value(v) for k, v in cfg.attention.items() if k != "name"}),
            bench=settings(cfg.bench, get_bench(cfg.bench.name).schema),
            task=settings(cfg.task, get_task(cfg.task.name).schema),
            model=model_size(cfg.model),
            seq_len=cfg.seq_len,
            batch_size=cfg.batch_size,
            dtype=as_value(cfg.dtype),
            device=device or resolved_device(cfg),
            causal=cfg.causal,
            seed=cfg.seed,
            architecture=Architecture.of(cfg.model),
        )

    def __reduce__(self):  # a read-only mapping does not pickle (a spawned process gets a copy)
        return rebuilt, (type(self), {**vars(self), "options": dict(self.options)})

    def at(self, **changes: Any) -> Cell:
        """This cell with other values, e.g. ``cell.at(seq_len=8192)``."""
        return dataclasses.replace(self, **changes)

    @property
    def backend(self) -> type[Attention]:
        return get_backend(self.attention)

    @property
    def head_dim(self) -> int:
        return self.model.d_model // self.model.n_heads

    @property
    def n_kv_heads(self) -> int:
        """The model's key/value heads (``model.n_kv_heads``, default ``n_heads``)."""
        return self.model.n_kv_heads or self.model.n_heads

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def element_size(self) -> int:
        return torch.tensor([], dtype=self.torch_dtype).element_size()

    @property
    def scope(self) -> str | None:
        """``attention`` or ``model`` for a bench that measures a step (speed, maxlen), else None."""
        return as_value(getattr(self.bench, "scope", None))

    def setting(self, **changes: Any) -> Setting:
        """What the support check needs to know of this cell (``changes``: e.g. ``kv_cache=True``)."""
        return Setting(
            device=self.device,
            dtype=self.dtype,
            causal=self.causal,
            key_padding_mask=getattr(self.bench, "pad_fraction", 0) > 0,
            head_dim=self.head_dim,
            seq_len=self.seq_len,
            grouped_query=self.n_kv_heads != self.model.n_heads,
            **changes,
        )

    def option_words(self) -> str:
        """ " with kernel=flex": the options set away from the backend's defaults ("" if none)."""
        defaults = option_defaults(self.backend)
        changed = [f"{k}={v}" for k, v in self.options.items() if k in defaults and as_value(defaults[k]) != v]
        return f" with {', '.join(changed)}" if changed else ""

    def vocab_size(self) -> int:
        return get_task(self.task.name).vocab_size(self.task)

    def head_width(self) -> int:
        """The model's output width: the vocabulary (causal LM) or the classes."""
        return self.vocab_size() if self.causal else get_task(self.task.name).n_classes(self.task)

    def shape(self) -> Shape:
        """The attention's sizes, for its FLOP count and memory model."""
        memory = self.options.get("mem_len", 0) or 0  # Transformer-XL keys: [memory ; segment]
        return Shape(
            batch=self.batch_size,
            n_heads=self.model.n_heads,
            head_dim=self.head_dim,
            q_len=self.seq_len,
            k_len=self.seq_len + memory,
            causal=self.causal,
            bytes_per_element=self.element_size,
            device=self.device,
            n_kv_heads=self.model.n_kv_heads,
        )


def make_attention(cell: Cell, **overrides) -> Callable[[int], Attention]:
    """layer index -> the cell's attention layer (``overrides`` replace its options).

    A backend built for a length (Linformer's ``max_len``) is built for the cell's ``seq_len``
    unless the config sets one: the one place where that happens.
    """
    size = cell.model
    options = {**cell.options, **overrides}
    if cell.backend.capabilities.needs_max_len and options.get("max_len") is None:
        options["max_len"] = cell.seq_len
    return attention_factory(cell.attention, size.d_model, size.n_heads, size.dropout, size.n_kv_heads, **options)


def language_model(cell: Cell, make: Callable[[int], Attention] | None = None, max_len: int | None = None) -> CausalLM:
    """A causal LM over the task's vocabulary, ``max_len`` positions (default ``seq_len``), with the
    cell's attention (or ``make``'s)."""
    return CausalLM(cell.vocab_size(), max_len or cell.seq_len, cell.model, make or make_attention(cell))


def build_model(cell: Cell, make: Callable[[int], Attention] | None = None) -> CausalLM | EncoderClassifier:
    """The cell's model: a causal LM when ``causal``, else an encoder classifier over the task's classes."""
    if cell.causal:
        return language_model(cell, make)
    return EncoderClassifier(
        cell.vocab_size(), cell.head_width(), cell.seq_len, cell.model, make or make_attention(cell)
    )


def resolved_device(cfg) -> str:
    """The device the job runs on (``auto`` resolved), or the one it asked for if it is missing."""
    try:
        return measure.resolve_device(as_value(cfg.device))
    except Unsupported:
        return as_value(cfg.device)


def cell_hash(cfg) -> str:
    """The cell's identity: the resolved config, ``device=auto`` resolved (``records.config_hash``)."""
    return records.config_hash(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), resolved_device(cfg))


def layer_flops(cell: Cell, shape: Shape) -> tuple[float, float]:
    """(forward, forward+backward) FLOPs of the measured step.

    Attention core: the backend's own count (FlashAttention's convention for exact kernels),
    backward 2.5x. Linear layers: 2 * tokens * fan_in * fan_out forward, backward 2x.
    """
    core = cell.backend.flops(shape, **cell.options)
    tokens, d = shape.batch * shape.q_len, shape.d_model
    key_tokens = shape.batch * shape.k_len  # the queries' tokens plus a memory's (Transformer-XL)
    kv_width = d * shape.kv_heads // shape.n_heads  # grouped-query attention: fewer key/value heads
    linear = 2 * d * d * 2 * tokens + 2 * d * kv_width * 2 * key_tokens  # q and output; k and v over every key
    if cell.scope == "model":
        linear += 2 * tokens * d * cell.model.d_ff * 2  # the FFN
        core, linear = core * cell.model.n_layers, linear * cell.model.n_layers
        linear += 2 * tokens * d * cell.head_width()
    return core + linear, training_flops(core) + 3 * linear


def predicted_bytes(cell: Cell, shape: Shape, training: bool) -> float:
    """The memory model: the backend's core plus the layer's (or model's) linear activations."""
    core = cell.backend.memory_bytes(shape, training, **cell.options)
    activation = shape.batch * shape.q_len * shape.d_model * shape.bytes_per_element
    if cell.scope == "attention":
        return core + activation * (16 if training else 8)
    per_layer = activation * (8 + 2 * cell.model.d_ff // cell.model.d_model)
    layers = cell.model.n_layers if training else 1  # training keeps every layer's activations
    logits = shape.batch * shape.q_len * cell.head_width() * 4 * (3 if training else 1)
    return (core + per_layer * (2 if training else 1)) * layers + logits


@dataclass
class Subject:
    """What is measured: a module, its inputs, and a loss for the backward pass."""

    module: nn.Module
    forward: Callable[[nn.Module], torch.Tensor]  # module -> output
    loss: Callable[[torch.Tensor], torch.Tensor]  # output -> scalar


def build_subject(cell: Cell) -> Subject:
    """The step ``bench.scope`` names (one attention layer, or the whole model) on random inputs."""
    b, n, d = cell.batch_size, cell.seq_len, cell.model.d_model
    device, dtype = cell.device, cell.torch_dtype
    padding = None
    if cell.bench.pad_fraction > 0:
        real = max(1, round(n * (1 - cell.bench.pad_fraction)))
        padding = (torch.arange(n, device=device) < real).expand(b, n)  # [b, n], right padding

    if cell.scope == "attention":
        module = make_attention(cell)(0)
        x = torch.randn(b, n, d, device=device, dtype=dtype, requires_grad=True)  # [b, n, d]
        grad = torch.randn(b, n, d, device=device, dtype=dtype)
        state = module.example_state(b, device, dtype)  # Transformer-XL: a full memory

        def forward(m):
            return m(x.to(next(m.parameters()).dtype), key_padding_mask=padding, causal=cell.causal, state=state)[0]

        def loss(y):
            return (y * grad.to(y.dtype)).sum()

    else:
        module = build_model(cell)
        tokens = torch.randint(cell.vocab_size(), (b, n), device=device)  # [b, n]
        targets = torch.randint(cell.head_width(), (b, n) if cell.causal else (b,), device=device)
        states = [block.attention.example_state(b, device, dtype) for block in module.encoder.blocks]

        def forward(m):
            if cell.causal:
                return m(tokens, key_padding_mask=padding, states=states)[0]  # logits
            return m(tokens, key_padding_mask=padding)

        def loss(y):
            return nn.functional.cross_entropy(y.flatten(0, -2).float(), targets.flatten())

    return Subject(module.to(device=device, dtype=dtype).eval(), forward, loss)


PROCESS_BYTES = 2**30  # Python, torch and the suite loaded, before the step (about 0.3-0.7 GiB measured)
UNPREDICTED_BYTES = 4 * 2**30  # a bench without a memory model (accuracy, xl_eval)


def job_memory_gb(cfg) -> int:
    """The memory a cluster job for this cell asks for, in whole GB: the process plus the step's
    predicted peak (benches with a ``scope``: the memory model the guard uses) with a 50% margin."""
    cell = Cell.of(cfg, device="cpu")
    if cell.scope is None:
        step = UNPREDICTED_BYTES
    else:
        step = predicted_bytes(cell, cell.shape(), getattr(cell.bench, "backward", True))
    return max(1, -(-int(PROCESS_BYTES + 1.5 * step) // 10**9))
