"""Every suite backend as a Hugging Face transformers attention implementation.

    from efficient.integrations import hf
    hf.register()                                    # efficient_full, efficient_chunked, ...
    model = LlamaForCausalLM._from_config(config, attn_implementation="efficient_chunked")
    hf.register("chunked", "efficient_chunked_512", query_chunk=512, key_chunk=512)  # with options

transformers calls an attention implementation with the layer's queries [b, hq, lq, d] and its
keys and values [b, hkv, lk, d] (grouped-query heads not repeated; a KV cache already appended:
query i sees key j iff j <= i + lk - lq, the suite's bottom-right alignment), ``scaling``,
``dropout``, and a mask made by the mask function registered under the same name. Here that
function does not draw a dense [lq, lk] mask (that would undo an O(n)-memory backend): it
returns a ``Pattern``, the 2D padding of the keys, whether the layer is causal, and its sliding
window (Mistral's: the ``window`` latest keys, its own included). The backend's core
(``attend``) then runs on those, its projections left out: the model's own are used. A setting
the backend cannot honour (a window it does not have, a pattern that is neither causal nor
bidirectional, a backend without a plain attention core) is refused with the reason, never
dropped. A query that sees no key (left padding) outputs zeros, not NaN.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from efficient.attention import Setting, Unsupported, backend_names, build_attention, get_backend
from efficient.attention.base import ProjectedAttention

PREFIX = "efficient_"


@dataclass(frozen=True)
class Pattern:
    """What a layer's mask says, without drawing it: which keys are real, causal or not, and a
    sliding window of ``window`` keys (None: none). Queries sit at the end of the keys."""

    padding: torch.Tensor | None  # [b, lk] bool, True = a real key; None: no padding
    causal: bool
    window: int | None


def pattern_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    **kwargs: Any,
) -> Pattern:
    """transformers' mask hook (``AttentionMaskInterface``): the layer's ``Pattern``.

    ``mask_function`` is read at a few positions to tell causal from bidirectional and to check
    that ``local_size`` is the whole story (a chunked or block pattern is refused)."""
    padding = None
    if attention_mask is not None:
        padding = attention_mask.bool()
        if (missing := kv_offset + kv_length - padding.shape[-1]) > 0:  # keys past the mask are real
            padding = torch.nn.functional.pad(padding, (0, missing), value=True)
        padding = padding[:, kv_offset : kv_offset + kv_length]
        if bool(padding.all()):
            padding = None
    shift = q_offset - kv_offset  # query i (0-based) is at key position i + shift
    if shift != kv_length - q_length:
        raise Unsupported(f"queries at key positions {shift}.. of {kv_length}: not aligned with the keys' end")
    causal = mask_function is None or not _allows(mask_function, q_offset, q_offset + 1)
    pattern = Pattern(padding, causal, local_size)
    probe = range(max(0, q_offset - 2 * (local_size or 2)), q_offset + 3)
    for q in range(q_offset, q_offset + 3):
        for kv in probe:
            expected = (not causal or kv <= q) and (local_size is None or kv > q - local_size)
            if _allows(mask_function, q, kv) != expected:
                raise Unsupported(
                    "this layer's mask is neither causal nor bidirectional with a sliding window "
                    "(e.g. chunked or blockwise attention): no suite backend takes it"
                )
    return pattern


def _allows(mask_function, q: int, kv: int) -> bool:
    if mask_function is None:
        return kv <= q
    index = torch.tensor(0), torch.tensor(0), torch.tensor(q), torch.tensor(kv)
    return bool(mask_function(*index))


def attention_forward(
    name: str,
    options: dict[str, Any],
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Pattern | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention hook: [b, hq, lq, d] queries, [b, hkv, lk, d] keys and values ->
    [b, lq, hq, d], through the backend's core."""
    if kwargs.get("softcap") is not None:
        raise Unsupported(f"{name} has no logit soft-capping (softcap={kwargs['softcap']})")
    pattern = attention_mask
    if pattern is not None and not isinstance(pattern, Pattern):
        raise Unsupported(
            f"{PREFIX}{name} got a dense mask: the model made its mask without this implementation's "
            "mask function (register with efficient.integrations.hf.register)"
        )
    if pattern is None:
        pattern = Pattern(None, bool(getattr(module, "is_causal", True)), None)
    core = core_of(module, name, options, query)
    check(core, name, pattern, query, key)
    head_dim = query.shape[-1]
    if scaling is not None and not math.isclose(scaling, head_dim**-0.5, rel_tol=1e-12):
        query = query * (scaling * math.sqrt(head_dim))  # the core scales by 1 / sqrt(d)
    core.dropout = dropout  # what transformers passes: its attention dropout when training, else 0
    core.train(dropout > 0)
    out = core.attend(query, key, value, pattern.padding, pattern.causal)  # [b, hq, lq, d]
    return out.transpose(1, 2).contiguous(), None


def core_of(module: torch.nn.Module, name: str, options: dict[str, Any], query: torch.Tensor) -> ProjectedAttention:
    """The backend built once per transformers layer (its own state: random features, chunk sizes),
    without its projections, on the layer's device and dtype."""
    cores = module.__dict__.setdefault("_efficient_cores", {})  # not a submodule: no weights added
    key = (name, tuple(sorted(options.items())))
    if key not in cores:
        n_heads, head_dim = query.shape[1], query.shape[-1]
        n_kv_heads = n_heads // getattr(module, "num_key_value_groups", 1)
        core = build_attention(name, n_heads * head_dim, n_heads, 0.0, n_kv_heads, **options)
        del core.q_proj, core.kv_proj, core.out_proj  # the model's own projections are used
        cores[key] = core.to(device=query.device, dtype=query.dtype)
    return cores[key]


def check(core: ProjectedAttention, name: str, pattern: Pattern, query: torch.Tensor, key: torch.Tensor) -> None:
    """Refuse, with the reason, what the backend cannot honour."""
    setting = Setting(
        device=query.device.type,
        dtype=str(query.dtype).removeprefix("torch."),
        causal=pattern.causal,
        key_padding_mask=pattern.padding is not None,
        head_dim=query.shape[-1],
        grouped_query=key.shape[1] != query.shape[1],
        kv_cache=query.shape[2] != key.shape[2],
    )
    if reason := core.cannot_run(setting, **core.options()):
        raise Unsupported(reason)
    if pattern.window is not None and pattern.window < key.shape[2]:
        own = getattr(core, "window", None)
        if own != pattern.window:
            raise Unsupported(
                f"{name} cannot apply this layer's sliding window of {pattern.window} keys"
                + (f" (its window is {own})" if own else "")
                + f": register sliding_window or flex with window={pattern.window}"
            )


def register(backend: str | None = None, as_name: str | None = None, **options: Any) -> list[str]:
    """Register ``backend`` (every backend with an attention core when None) with transformers'
    ``AttentionInterface`` and ``AttentionMaskInterface`` as ``efficient_<backend>`` (or
    ``as_name``), built with ``options``. Returns the names registered. A backend that is a
    whole layer rather than an attention core (``xl``: its own relative positions and memory) is
    refused."""
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
    except ImportError as e:
        raise ImportError("the Hugging Face integration needs transformers: pip install -e '.[hf]'") from e
    names = [backend] if backend else [n for n in backend_names() if issubclass(get_backend(n), ProjectedAttention)]
    registered = []
    for name in names:
        if not issubclass(get_backend(name), ProjectedAttention):  # an unknown name lists the valid ones
            raise Unsupported(f"{name} is a whole layer with its own positions and state, not an attention core")
        implementation = as_name or PREFIX + name
        AttentionInterface.register(implementation, functools.partial(attention_forward, name, options))
        AttentionMaskInterface.register(implementation, pattern_mask)
        registered.append(implementation)
    return registered
