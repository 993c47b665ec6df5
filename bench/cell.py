"""The cell: what a config builds and measures, shared by every bench.

A cell is one backend with its options, one length, batch, model size, dtype and device. This
module turns a composed config into what is built for it (the attention factory, the model,
the measured subject of ``bench=speed`` and ``bench=maxlen``) and into what is predicted for it
before anything is built (the attention shape, the memory model, the FLOP count).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable

import torch
from omegaconf import OmegaConf
from torch import nn

from bench import measure, records
from bench.tasks import get_task
from efficient.attention import (
    Attention,
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
    """The library's ModelSize, with its choices as enums so that Hydra validates them."""

    norm: Norm = Norm.pre
    positional: Positional = Positional.sinusoidal


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


def attention_options(cfg) -> dict:
    """The backend's options as the config sets them (enums as their plain values)."""
    return {k: as_value(v) for k, v in cfg.attention.items() if k != "name"}


def option_words(cfg) -> str:
    """ " with kernel=flex": the options the config sets away from the backend's defaults ("" if none)."""
    defaults = option_defaults(get_backend(cfg.attention.name))
    changed = [f"{k}={v}" for k, v in attention_options(cfg).items() if k in defaults and as_value(defaults[k]) != v]
    return f" with {', '.join(changed)}" if changed else ""


def make_attention(cfg, **overrides) -> Callable[[int], Attention]:
    """layer index -> the config's attention layer (``overrides`` replace its options).

    A backend built for a length (Linformer's ``max_len``) is built for the cell's ``seq_len``
    unless the config sets one: the one place where that happens.
    """
    size = model_size(cfg.model)
    options = {**attention_options(cfg), **overrides}
    if get_backend(cfg.attention.name).capabilities.needs_max_len and options.get("max_len") is None:
        options["max_len"] = cfg.seq_len
    return attention_factory(cfg.attention.name, size.d_model, size.n_heads, size.dropout, size.n_kv_heads, **options)


def language_model(cfg, make: Callable[[int], Attention] | None = None, max_len: int | None = None) -> CausalLM:
    """A causal LM over the task's vocabulary, ``max_len`` positions (default ``seq_len``), with the
    config's attention (or ``make``'s)."""
    vocab_size = get_task(cfg.task.name).vocab_size(cfg.task)
    return CausalLM(vocab_size, max_len or cfg.seq_len, model_size(cfg.model), make or make_attention(cfg))


def build_model(cfg, make: Callable[[int], Attention] | None = None) -> CausalLM | EncoderClassifier:
    """The config's model: a causal LM when ``causal``, else an encoder classifier over the task's classes."""
    if cfg.causal:
        return language_model(cfg, make)
    task = get_task(cfg.task.name)
    return EncoderClassifier(
        task.vocab_size(cfg.task),
        task.n_classes(cfg.task),
        cfg.seq_len,
        model_size(cfg.model),
        make or make_attention(cfg),
    )


def resolved_device(cfg) -> str:
    """The device the job runs on (``auto`` resolved), or the one it asked for if it is missing."""
    try:
        return measure.resolve_device(cfg.device.value)
    except Unsupported:
        return cfg.device.value


def cell_hash(cfg) -> str:
    """The cell's identity: the resolved config, ``device=auto`` resolved (``records.config_hash``)."""
    return records.config_hash(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), resolved_device(cfg))


def kv_heads(cfg) -> int:
    """The model's key/value heads (``model.n_kv_heads``, default ``n_heads``)."""
    return cfg.model.get("n_kv_heads") or cfg.model.n_heads


def head_width(cfg) -> int:
    """The model's output width: the vocabulary (causal LM) or the classes."""
    task = get_task(cfg.task.name)
    return task.vocab_size(cfg.task) if cfg.causal else task.n_classes(cfg.task)


def cell_shape(cfg, device: str) -> Shape:
    dtype = getattr(torch, as_value(cfg.dtype))
    memory = cfg.attention.get("mem_len", 0) or 0  # Transformer-XL keys: [memory ; segment]
    return Shape(
        batch=cfg.batch_size,
        n_heads=cfg.model.n_heads,
        head_dim=cfg.model.d_model // cfg.model.n_heads,
        q_len=cfg.seq_len,
        k_len=cfg.seq_len + memory,
        causal=cfg.causal,
        bytes_per_element=torch.tensor([], dtype=dtype).element_size(),
        device=device,
        n_kv_heads=cfg.model.get("n_kv_heads"),
    )


def layer_flops(cfg, shape: Shape) -> tuple[float, float]:
    """(forward, forward+backward) FLOPs of the measured step.

    Attention core: the backend's own count (FlashAttention's convention for exact kernels),
    backward 2.5x. Linear layers: 2 * tokens * fan_in * fan_out forward, backward 2x.
    """
    backend = get_backend(cfg.attention.name)
    core = backend.flops(shape, **attention_options(cfg))
    tokens, d = shape.batch * shape.q_len, shape.d_model
    key_tokens = shape.batch * shape.k_len  # the queries' tokens plus a memory's (Transformer-XL)
    kv_width = d * shape.kv_heads // shape.n_heads  # grouped-query attention: fewer key/value heads
    linear = 2 * d * d * 2 * tokens + 2 * d * kv_width * 2 * key_tokens  # q and output; k and v over every key
    if as_value(cfg.bench.scope) == "model":
        linear += 2 * tokens * d * cfg.model.d_ff * 2  # the FFN
        core, linear = core * cfg.model.n_layers, linear * cfg.model.n_layers
        linear += 2 * tokens * d * head_width(cfg)
    return core + linear, training_flops(core) + 3 * linear


def predicted_bytes(cfg, shape: Shape, training: bool) -> float:
    """The memory model: the backend's core plus the layer's (or model's) linear activations."""
    backend = get_backend(cfg.attention.name)
    core = backend.memory_bytes(shape, training, **attention_options(cfg))
    activation = shape.batch * shape.q_len * shape.d_model * shape.bytes_per_element
    if as_value(cfg.bench.scope) == "attention":
        return core + activation * (16 if training else 8)
    per_layer = activation * (8 + 2 * cfg.model.d_ff // cfg.model.d_model)
    layers = cfg.model.n_layers if training else 1  # training keeps every layer's activations
    logits = shape.batch * shape.q_len * head_width(cfg) * 4 * (3 if training else 1)
    return (core + per_layer * (2 if training else 1)) * layers + logits


@dataclass
class Subject:
    """What is measured: a module, its inputs, and a loss for the backward pass."""

    module: nn.Module
    forward: Callable[[nn.Module], torch.Tensor]  # module -> output
    loss: Callable[[torch.Tensor], torch.Tensor]  # output -> scalar


def build_subject(cfg, device: str, dtype: torch.dtype) -> Subject:
    """The step ``bench.scope`` names (one attention layer, or the whole model) on random inputs."""
    b, n, d = cfg.batch_size, cfg.seq_len, cfg.model.d_model
    padding = None
    if cfg.bench.pad_fraction > 0:
        real = max(1, round(n * (1 - cfg.bench.pad_fraction)))
        padding = (torch.arange(n, device=device) < real).expand(b, n)  # [b, n], right padding

    if as_value(cfg.bench.scope) == "attention":
        module = make_attention(cfg)(0)
        x = torch.randn(b, n, d, device=device, dtype=dtype, requires_grad=True)  # [b, n, d]
        grad = torch.randn(b, n, d, device=device, dtype=dtype)
        state = module.example_state(b, device, dtype)  # Transformer-XL: a full memory

        def forward(m):
            return m(x.to(next(m.parameters()).dtype), key_padding_mask=padding, causal=cfg.causal, state=state)[0]

        def loss(y):
            return (y * grad.to(y.dtype)).sum()

    else:
        module = build_model(cfg)
        tokens = torch.randint(get_task(cfg.task.name).vocab_size(cfg.task), (b, n), device=device)  # [b, n]
        targets = torch.randint(head_width(cfg), (b, n) if cfg.causal else (b,), device=device)
        states = [block.attention.example_state(b, device, dtype) for block in module.encoder.blocks]

        def forward(m):
            if cfg.causal:
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
    if cfg.bench.get("scope") is None:
        step = UNPREDICTED_BYTES
    else:
        step = predicted_bytes(cfg, cell_shape(cfg, "cpu"), cfg.bench.get("backward", True))
    return max(1, -(-int(PROCESS_BYTES + 1.5 * step) // 10**9))
