"""The common attention interface, capabilities as data, and the backend registry.

Every backend is an ``nn.Module`` built as ``Backend(d_model, n_heads, dropout, n_kv_heads, **options)``
and called as ``y, state = attn(x, context=None, key_padding_mask=None, causal=False, state=None)``:

    x                 [batch, q_len, d_model]
    context           [batch, k_len, d_model] or None (self-attention: keys come from x)
    key_padding_mask  [batch, k_len] bool, True = real token, or None
    causal            bool; with q_len != k_len the mask is aligned bottom-right: query i sees
                      key j iff j <= i + (k_len - q_len), so the last query sees every key
                      (the convention of a KV cache and of Transformer-XL's memory)
    state             a backend's recurrent state (Transformer-XL memory), a ``KVCache``
                      (inference: x holds the newest tokens, whose keys and values are appended
                      to the cache before attending over all of it), or None
    y                 [batch, q_len, d_model]; a query that sees no key at all outputs zeros

``n_kv_heads`` (default ``n_heads``, must divide it): grouped-query attention (Ainslie et al.
2023; ``n_kv_heads=1`` is multi-query attention, Shazeer 2019). Query head i reads key/value
head ``i // (n_heads // n_kv_heads)``, the layout of SDPA's and FlexAttention's ``enable_gqa``.

A stateful backend (``capabilities.stateful``) also takes ``norm``: a pre-LN block's LayerNorm,
which the backend applies to [state ; x] itself, its state then holding un-normalised inputs.

A backend's options are the keyword-only arguments of its ``__init__``; their annotations are
the schema Hydra validates ``conf/attention/<name>.yaml`` against. Adding a backend is one
module in this package (decorated with ``@register``) plus that yaml.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from einops import rearrange
from torch import nn

from efficient.attention.functional import exact_attention, repeat_kv
from efficient.bounds import Bound
from efficient.registry import Registry

DTYPES = ("float64", "float32", "float16", "bfloat16")
# How far an exact backend's output may be from the exact reference (float64 on CPU, float32 on
# GPU), relative to the output's scale (its largest |value|): forward fp16 4e-3 and bf16 2e-2 as
# in xformers' tests; float32 1e-4; float64 against float64, rounding only.
EXACT_TOLERANCE = {"float64": 1e-8, "float32": 1e-4, "float16": 4e-3, "bfloat16": 2e-2}


class Unsupported(Exception):
    """Raised when a backend cannot run a cell; the sentence is recorded as the reason."""


class Unavailable(Unsupported):
    """Raised when this machine cannot run a cell that another could: a device or a package is
    missing here. A sweep resumed on another machine runs such a cell again."""


@dataclass(frozen=True)
class Capabilities:
    causal: bool = True
    key_padding_mask: bool = True
    cross_attention: bool = True
    stateful: bool = False
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[str, ...] = DTYPES
    backward_devices: tuple[str, ...] = ("cpu", "cuda")  # where gradients can be computed
    needs_max_len: bool = False  # the construction needs the longest sequence it will see
    exact: bool = True  # equals softmax attention up to floating-point rounding
    relative_positions: bool = False  # encodes positions itself: models add no absolute ones
    grouped_query: bool = True  # takes n_kv_heads < n_heads (grouped-query attention)
    kv_cache: bool = True  # decodes against a KVCache (state=KVCache), or against its own decoding state
    constant_state: bool = False  # decodes with a state of fixed size (RunningSums): no keys are kept
    sparse_mask: bool = False  # exact only under its own sparse mask: to full attention, an approximation
    # dtype -> the relative error an exact backend may show (see EXACT_TOLERANCE); beyond it,
    # a measured output is recorded as wrong. Approximate backends keep their error as a figure.
    tolerance: dict[str, float] = dataclasses.field(default_factory=lambda: dict(EXACT_TOLERANCE))


@dataclass(frozen=True)
class Setting:
    """The setting a backend is asked to run in (device, dtype, masks, ...): enough to decide
    support before anything is built."""

    device: str  # "cpu" | "cuda"
    dtype: str  # one of DTYPES
    causal: bool = False
    cross_attention: bool = False
    key_padding_mask: bool = False
    head_dim: int = 64
    seq_len: int | None = None  # the longest input, when known (a backend built for a length checks it)
    grouped_query: bool = False  # fewer key/value heads than query heads
    kv_cache: bool = False  # inference against a KV cache (bench=decode)


@dataclass(frozen=True)
class Shape:
    """The sizes that FLOP counts and memory models need."""

    batch: int
    n_heads: int
    head_dim: int
    q_len: int
    k_len: int
    causal: bool = False
    bytes_per_element: int = 4
    device: str = "cuda"  # memory models may differ by device (CPU kernels are not all fused)
    n_kv_heads: int | None = None  # None: n_heads

    @property
    def d_model(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


class Attention(nn.Module):
    """Base of every backend: capabilities, support checks, FLOP and memory models."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities] = Capabilities()
    option_bounds: ClassVar[dict[str, Bound]] = {}  # numeric options -> valid range (checked by configs)

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, n_kv_heads: int | None = None):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        n_kv_heads = n_kv_heads or n_heads
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads={n_kv_heads} must divide n_heads={n_heads}")
        if n_kv_heads != n_heads and not self.capabilities.grouped_query:
            raise Unsupported(grouped_query_reason(self.name))
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.n_kv_heads = n_kv_heads
        self.dropout = dropout
        # When True, forward computes the exact reference math with the same parameters
        # (used by the harness, in float64 on CPU, to measure each backend's error).
        self.reference_mode = False

    # -- support -------------------------------------------------------------------------------
    @classmethod
    def unsupported_reason(cls, setting: Setting, **options: Any) -> str | None:
        """A sentence saying why this backend cannot run ``setting``, or None if it can."""
        caps = cls.capabilities
        if setting.device not in caps.devices:
            return f"{cls.name} does not run on {setting.device} (runs on: {', '.join(caps.devices)})"
        if setting.dtype not in caps.dtypes:
            return f"{cls.name} does not support {setting.dtype} (supports: {', '.join(caps.dtypes)})"
        if setting.causal and not caps.causal:
            return f"{cls.name} cannot be causal"
        if setting.cross_attention and not caps.cross_attention:
            return f"{cls.name} does not support cross-attention"
        if setting.key_padding_mask and not caps.key_padding_mask:
            return f"{cls.name} does not support a key padding mask"
        if setting.grouped_query and not caps.grouped_query:
            return grouped_query_reason(cls.name)
        if setting.kv_cache and not caps.kv_cache:
            return f"{cls.name} cannot decode against a KV cache" + ("" if caps.causal else " (it cannot be causal)")
        return None

    @classmethod
    def unavailable_reason(cls, setting: Setting, **options: Any) -> str | None:
        """Why this machine cannot run ``setting`` though another could (a package missing or
        broken here), or None. Checked after ``unsupported_reason``."""
        return None

    @classmethod
    def cannot_run(cls, setting: Setting, **options: Any) -> str | None:
        """Why ``setting`` cannot run here, for either of the two reasons above, or None."""
        return cls.unsupported_reason(setting, **options) or cls.unavailable_reason(setting, **options)

    def check_call(self, x: torch.Tensor, context, key_padding_mask, causal: bool, kv_cache: bool = False) -> None:
        setting = Setting(
            device=x.device.type,
            dtype=str(x.dtype).removeprefix("torch."),
            causal=causal,
            cross_attention=context is not None,
            key_padding_mask=key_padding_mask is not None,
            head_dim=self.head_dim,
            grouped_query=self.n_kv_heads != self.n_heads,
            kv_cache=kv_cache,
        )
        reason = self.unsupported_reason(setting, **self.options())
        if reason:
            raise Unsupported(reason)
        reason = self.unavailable_reason(setting, **self.options())
        if reason:
            raise Unavailable(reason)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        if needs_grad and not self.trains_on(setting.device, **self.options()):
            raise Unsupported(f"{self.name} has no backward on {setting.device}; run it under torch.no_grad()")

    @classmethod
    def trains_on(cls, device: str, **options: Any) -> bool:
        """Whether gradients can be computed on ``device`` (with these options)."""
        return device in cls.capabilities.backward_devices

    def options(self) -> dict[str, Any]:
        """This instance's options (the keyword-only constructor arguments)."""
        return {name: getattr(self, name) for name in option_defaults(type(self))}

    @classmethod
    def layer_factory(
        cls, d_model: int, n_heads: int, dropout: float = 0.0, n_kv_heads: int | None = None, **options
    ) -> Callable[[int], "Attention"]:
        """``make(layer_index) -> Attention`` for the layers of one model (a backend whose
        parameters are shared across layers overrides this)."""
        return lambda layer: cls(d_model, n_heads, dropout, n_kv_heads, **options)

    def empty_decoding_state(self, batch: int, capacity: int, device=None, dtype=None):
        """What this layer keeps between decode steps, for up to ``capacity`` tokens: a KV cache."""
        from efficient.kv_cache import KVCache

        return KVCache.empty(batch, self.n_kv_heads, self.head_dim, capacity, device, dtype)

    @classmethod
    def decoding_state_elements(cls, n_kv_heads: int, head_dim: int, length: int, **options: Any) -> int:
        """Numbers per sequence in one layer's decoding state after ``length`` tokens (what a decode
        step reads): a KV cache's keys and values."""
        return 2 * n_kv_heads * length * head_dim

    @classmethod
    def decoding_read_elements(cls, n_kv_heads: int, head_dim: int, length: int, **options: Any) -> int:
        """Numbers per sequence that one layer's decode step reads of its state (the newest query's
        keys and values): by default the whole state."""
        return cls.decoding_state_elements(n_kv_heads, head_dim, length, **options)

    def example_state(self, batch: int, device, dtype):
        """A recurrent state as a long stream would have it in steady state (None: stateless)."""
        return None

    # -- cost models ---------------------------------------------------------------------------
    @classmethod
    def flops(cls, shape: Shape, **options: Any) -> float:
        """Forward FLOPs of the attention core, FlashAttention's convention.

        4 * B * H * Mq * Mk * D (two matmuls), halved when causal; softmax not counted.
        Backward is 2.5x the forward, forward+backward 3.5x (see ``training_flops``).
        """
        f = 4.0 * shape.batch * shape.n_heads * shape.q_len * shape.k_len * shape.head_dim
        return f / 2 if shape.causal else f

    @classmethod
    def memory_bytes(cls, shape: Shape, training: bool, **options: Any) -> float:
        """Predicted peak bytes of the attention core above its inputs (for the memory guard).

        Default: a fused kernel, linear in length: the output (+ its gradients when training).
        """
        tensor = shape.batch * shape.n_heads * max(shape.q_len, shape.k_len) * shape.head_dim
        return tensor * shape.bytes_per_element * (6 if training else 2)


def grouped_query_reason(name: str) -> str:
    return f"{name} has one key/value head per query head: it cannot take n_kv_heads < n_heads"


def materialised_memory_bytes(shape: Shape, training: bool) -> float:
    """Memory model of attention that materialises the [n, m] scores (``full``, SDPA math).

    Scores and probabilities in float32 plus softmax temporaries; training keeps the
    probabilities for backward and materialises their gradient too.
    """
    scores = shape.batch * shape.n_heads * shape.q_len * shape.k_len * 4
    return scores * (5 if training else 3) + Attention.memory_bytes(shape, training)


def training_flops(forward_flops: float) -> float:
    """Forward + backward FLOPs: backward is 2.5x the forward (FlashAttention's convention)."""
    return 3.5 * forward_flops


class ProjectedAttention(Attention):
    """Backends that project x to per-head q, k, v, attend, then project back.

    Subclasses implement ``attend``; the projections, masks and the reference path are shared,
    so every exact backend is compared against the same math on the same parameters. Keys and
    values have ``n_kv_heads`` heads; with a ``KVCache`` as ``state`` the new tokens' keys and
    values are appended to it and the queries attend over every cached key
    (``key_padding_mask`` then covers them all: [b, cached + new]).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, n_kv_heads: int | None = None):
        super().__init__(d_model, n_heads, dropout, n_kv_heads)
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = nn.Linear(d_model, 2 * self.n_kv_heads * self.head_dim)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x, context=None, key_padding_mask=None, causal=False, state=None):
        if state is not None and context is not None:
            raise ValueError("a KV cache holds self-attention keys: decode without a context")
        if not self.reference_mode:  # the reference is plain exact math: it runs anywhere
            self.check_call(x, context, key_padding_mask, causal, kv_cache=state is not None)
        source = x if context is None else context
        q = rearrange(self.q_proj(x), "b n (h d) -> b h n d", h=self.n_heads)
        k, v = rearrange(self.kv_proj(source), "b m (two h d) -> two b h m d", two=2, h=self.n_kv_heads)
        if self.reference_mode:
            if state is not None:
                k, v = state.append(k, v)  # [b, hk, cached + new, d]
            o = self.reference_attend(q, k, v, key_padding_mask, causal)
        elif state is not None:
            o = self.attend_cached(q, k, v, state, key_padding_mask, causal)
        else:
            o = self.attend(q, k, v, key_padding_mask, causal)  # [b, h, n, d]
        return self.out_proj(rearrange(o, "b h n d -> b n (h d)")), state

    def attend(self, q, k, v, key_padding_mask, causal):  # pragma: no cover - abstract
        """q [b, h, n, d], k and v [b, hk, m, d] (hk = n_kv_heads divides h) -> o [b, h, n, d]."""
        raise NotImplementedError

    def attend_cached(self, q, k, v, cache, key_padding_mask, causal):
        """q [b, h, t, d], k and v [b, hk, t, d] of the t newest tokens: they join ``cache`` (a
        ``KVCache``, or the backend's own ``empty_decoding_state``), then the queries attend over
        every token it holds."""
        k, v = cache.append(k, v)  # [b, hk, length, d]
        return self.attend(q, k, v, key_padding_mask, causal)

    def reference_attend(self, q, k, v, key_padding_mask, causal):
        """The exact math ``attend`` stands for (query-blocked so that long inputs fit), with every
        query head's keys and values written out (no grouping)."""
        k, v = (repeat_kv(t, q.shape[1]) for t in (k, v))
        return exact_attention(q, k, v, key_padding_mask, causal, query_block=256)

    @property
    def dropout_p(self) -> float:
        return self.dropout if self.training else 0.0


# -- registry ----------------------------------------------------------------------------------
BACKENDS: Registry[type[Attention]] = Registry("attention backend", "backends")


def register(cls: type[Attention]) -> type[Attention]:
    """Class decorator: make a backend available by its ``name`` to configs, sweeps and tests."""
    return BACKENDS.register(cls)


def backend_names() -> list[str]:
    return BACKENDS.names()


def get_backend(name: str) -> type[Attention]:
    return BACKENDS.get(name)


def build_attention(
    name: str, d_model: int, n_heads: int, dropout: float = 0.0, n_kv_heads: int | None = None, **options
) -> Attention:
    cls = get_backend(name)
    valid = option_defaults(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"{name} has no option(s) {', '.join(unknown)}; valid options: {', '.join(valid) or 'none'}")
    return cls(d_model, n_heads, dropout, n_kv_heads, **options)


def attention_factory(
    name: str, d_model: int, n_heads: int, dropout: float = 0.0, n_kv_heads: int | None = None, **options
) -> Callable[[int], Attention]:
    """``make(layer_index) -> Attention`` building the layers of one model with backend ``name``."""
    build_attention(name, d_model, n_heads, dropout, n_kv_heads, **options)  # validates the name and options
    return get_backend(name).layer_factory(d_model, n_heads, dropout, n_kv_heads, **options)


@functools.lru_cache(maxsize=None)
def option_defaults(cls: type[Attention]) -> dict[str, Any]:
    """The backend's options and defaults: the keyword-only arguments of its ``__init__``."""
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def options_schema(cls: type[Attention]) -> type:
    """A dataclass of ``name`` plus the backend's typed options, for Hydra's structured configs."""
    hints = inspect.get_annotations(cls.__init__, eval_str=True)
    fields = [("name", str, dataclasses.field(default=cls.name))]
    for option, default in option_defaults(cls).items():
        field = dataclasses.field(default=default)
        fields.append((option, hints.get(option, Any), field))
    return dataclasses.make_dataclass(f"{cls.__name__}Options", fields)


def as_value(option: Any) -> Any:
    """Enum options arrive from configs as enums; backends store their plain values."""
    return option.value if isinstance(option, enum.Enum) else option
