"""``bench=speed``: latency, peak memory, achieved FLOP/s and error of one cell.

The subject is one attention layer (``bench.scope=attention``: projections + attention core)
or the whole model (``bench.scope=model``). Measurements run in eval mode (dropout off) so
that every backend computes the same function; gradients still flow for forward+backward.
Before anything is allocated, the backend's memory model predicts the step's peak: a cell
predicted over the budget is recorded as ``oom`` without running.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from efficient.attention import Attention, Shape, as_value, attention_factory, get_backend, training_flops
from bench import measure
from bench.config import model_size
from bench.measure import MIB


class PredictedOOM(Exception):
    """The memory model predicts that the cell does not fit the budget; nothing was run."""


@dataclass
class Subject:
    """What is measured: a module, its inputs, and a loss for the backward pass."""

    module: nn.Module
    forward: Callable[[nn.Module], torch.Tensor]  # module -> output
    loss: Callable[[torch.Tensor], torch.Tensor]  # output -> scalar


def attention_options(cfg) -> dict:
    """The backend's options from the config (enums as their plain values)."""
    return {k: as_value(v) for k, v in cfg.attention.items() if k != "name"}


def cell_shape(cfg, device: str) -> Shape:
    dtype = getattr(torch, cfg.dtype.value)
    memory = cfg.attention.get("mem_len", 0) or 0  # Transformer-XL keys: [memory ; segment]
    return Shape(
        batch=cfg.batch_size, n_heads=cfg.model.n_heads, head_dim=cfg.model.d_model // cfg.model.n_heads,
        q_len=cfg.seq_len, k_len=cfg.seq_len + memory, causal=cfg.causal,
        bytes_per_element=torch.tensor([], dtype=dtype).element_size(), device=device,
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
    linear = 2 * d * d * (2 * tokens + 2 * key_tokens)  # q and output; k and v over every key
    if cfg.bench.scope.value == "model":
        linear += 2 * tokens * d * cfg.model.d_ff * 2  # the FFN
        core, linear = core * cfg.model.n_layers, linear * cfg.model.n_layers
        linear += 2 * tokens * d * head_width(cfg)
    return core + linear, training_flops(core) + 3 * linear


def head_width(cfg) -> int:
    return cfg.task.vocab_size if cfg.causal else cfg.task.n_classes


def predicted_bytes(cfg, shape: Shape, training: bool) -> float:
    """The memory model: the backend's core plus the layer's (or model's) linear activations."""
    backend = get_backend(cfg.attention.name)
    core = backend.memory_bytes(shape, training, **attention_options(cfg))
    activation = shape.batch * shape.q_len * shape.d_model * shape.bytes_per_element
    if cfg.bench.scope.value == "attention":
        return core + activation * (16 if training else 8)
    per_layer = activation * (8 + 2 * cfg.model.d_ff // cfg.model.d_model)
    layers = cfg.model.n_layers if training else 1  # training keeps every layer's activations
    logits = shape.batch * shape.q_len * head_width(cfg) * 4 * (3 if training else 1)
    return (core + per_layer * (2 if training else 1)) * layers + logits


def build_subject(cfg, device: str, dtype: torch.dtype) -> Subject:
    options = attention_options(cfg)
    b, n, d = cfg.batch_size, cfg.seq_len, cfg.model.d_model
    padding = None
    if cfg.bench.pad_fraction > 0:
        real = max(1, round(n * (1 - cfg.bench.pad_fraction)))
        padding = (torch.arange(n, device=device) < real).expand(b, n)  # [b, n], right padding

    if get_backend(cfg.attention.name).capabilities.needs_max_len and options.get("max_len") is None:
        options["max_len"] = n  # built for the run's length unless the config says otherwise
    make_attention = attention_factory(cfg.attention.name, d, cfg.model.n_heads, cfg.model.dropout, **options)

    if cfg.bench.scope.value == "attention":
        module = make_attention(0)
        x = torch.randn(b, n, d, device=device, dtype=dtype, requires_grad=True)  # [b, n, d]
        grad = torch.randn(b, n, d, device=device, dtype=dtype)
        state = module.example_state(b, device, dtype)  # Transformer-XL: a full memory

        def forward(m):
            return m(x.to(next(m.parameters()).dtype), key_padding_mask=padding, causal=cfg.causal, state=state)[0]

        def loss(y):
            return (y * grad.to(y.dtype)).sum()

    else:
        from efficient.models import CausalLM, EncoderClassifier

        size = model_size(cfg.model)
        if cfg.causal:
            module = CausalLM(cfg.task.vocab_size, n, size, make_attention)
        else:
            module = EncoderClassifier(cfg.task.vocab_size, cfg.task.n_classes, n, size, make_attention)
        tokens = torch.randint(cfg.task.vocab_size, (b, n), device=device)  # [b, n]
        targets = torch.randint(head_width(cfg), (b, n) if cfg.causal else (b,), device=device)
        states = [block.attention.example_state(b, device, dtype) for block in module.encoder.blocks]

        def forward(m):
            if cfg.causal:
                return m(tokens, key_padding_mask=padding, states=states)[0]  # logits
            return m(tokens, key_padding_mask=padding)

        def loss(y):
            return nn.functional.cross_entropy(y.flatten(0, -2).float(), targets.flatten())

    return Subject(module.to(device=device, dtype=dtype).eval(), forward, loss)


def max_abs_error(subject: Subject, device: str) -> tuple[float, str]:
    """Compare the subject's output with the exact reference math on the same parameters.

    The reference is a copy of the module in float64 on CPU (float32 on GPU) with every
    attention layer in ``reference_mode``: the exact softmax attention its backend stands for.
    """
    ref_dtype = torch.float32 if device == "cuda" else torch.float64
    with torch.no_grad():
        output = subject.forward(subject.module)
        reference = copy.deepcopy(subject.module).to(ref_dtype)
        for layer in reference.modules():
            if isinstance(layer, Attention):
                layer.reference_mode = True
        expected = subject.forward(reference)
        error = (output.to(ref_dtype) - expected).abs().max().item()
    return error, f"exact attention, same parameters, {str(ref_dtype).removeprefix('torch.')} on {device}"


def run_speed(cfg, device: str, **context) -> dict:
    """Measure one cell; raises Unsupported / PredictedOOM / torch.OutOfMemoryError."""
    dtype = getattr(torch, cfg.dtype.value)
    shape = cell_shape(cfg, device)
    training = cfg.bench.backward
    predicted = predicted_bytes(cfg, shape, training)
    budget = measure.memory_budget_bytes(device, cfg.bench.memory_budget_gib)
    result: dict = {"predicted_mem_mib": predicted / MIB}
    if predicted > budget:
        raise PredictedOOM(
            f"predicted peak memory {predicted / measure.GIB:,.1f} GiB exceeds the budget of "
            f"{budget / measure.GIB:,.1f} GiB (bench.memory_budget_gib); not run"
        )

    subject = build_subject(cfg, device, dtype)
    module, warmup, repeats = subject.module, cfg.bench.warmup, cfg.bench.repeats

    def fwd():
        with torch.no_grad():
            return subject.forward(module)

    def fwd_bwd():
        module.zero_grad(set_to_none=True)
        subject.loss(subject.forward(module)).backward()

    tokens = cfg.batch_size * cfg.seq_len
    flops_fwd, flops_fwd_bwd = layer_flops(cfg, shape)
    started = time.perf_counter()
    fwd()  # the first call compiles (flex), autotunes or initialises: timed apart
    measure.synchronize(device)
    result["first_call_s"] = time.perf_counter() - started
    t = measure.time_ms(fwd, device, warmup, repeats)
    peak, ops = measure.profile_step(fwd, device)
    result.update(
        fwd_ms=t["median"], fwd_ms_p20=t["p20"], fwd_ms_p80=t["p80"],
        fwd_tokens_per_s=tokens / (t["median"] / 1e3), flops_fwd=flops_fwd,
        tflops=flops_fwd / (t["median"] / 1e3) / 1e12,
        fwd_peak_mem_mib=peak / MIB, peak_mem_mib=peak / MIB, attention_ops=ops,
    )
    backend = get_backend(cfg.attention.name)
    if training and device not in backend.capabilities.backward_devices:
        result["note"] = f"forward only: {backend.name} has no backward on {device}"
        training = False
    if training:
        t = measure.time_ms(fwd_bwd, device, warmup, repeats)
        module.zero_grad(set_to_none=True)
        result.update(
            fwd_bwd_ms=t["median"], fwd_bwd_ms_p20=t["p20"], fwd_bwd_ms_p80=t["p80"],
            fwd_bwd_tokens_per_s=tokens / (t["median"] / 1e3),
            fwd_bwd_tflops=flops_fwd_bwd / (t["median"] / 1e3) / 1e12,
            fwd_bwd_peak_mem_mib=measure.peak_memory_bytes(fwd_bwd, device) / MIB,
        )
        module.zero_grad(set_to_none=True)
        result["peak_mem_mib"] = result["fwd_bwd_peak_mem_mib"]
    peak = measure.peak_tflops(measure.device_name(device), dtype)
    result["mfu"] = result["tflops"] / peak if peak else None
    if cfg.bench.check_error:
        result["max_abs_err"], result["reference"] = max_abs_error(subject, device)
    return result
