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
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from efficient.attention import Setting, Unsupported, backend_names, build_attention, get_backend
from efficient.attention.base import ProjectedAttention
from efficient.models import ModelSize

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
    for q in range(q_offset, q_offset + 3):  # the pattern's edges (the causal one, the window's) and far keys
        edges = (0, q // 2, q - 1, q, q + 1)
        edges += (q - local_size - 1, q - local_size, q - local_size + 1) if local_size else ()
        for kv in (kv for kv in edges if kv >= 0):
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
    device = query.device.type
    if torch.is_grad_enabled() and query.requires_grad and not core.trains_on(device, **core.options()):
        raise Unsupported(f"{name} has no backward on {device}: run its inference under torch.no_grad()")
    if pattern.window is not None and pattern.window < key.shape[2]:
        own = getattr(core, "window", None) if name in SLIDING_WINDOW_BACKENDS else None
        if own != pattern.window:
            raise Unsupported(
                f"{name} cannot apply this layer's sliding window of {pattern.window} keys"
                + (f" (its window is {own})" if own else "")
                + f": use sliding_window or flex with window={pattern.window} (attention.window={pattern.window})"
            )


# The backends whose ``window`` option is Mistral's sliding window: the ``window`` latest keys, the
# query's own included, and nothing else (``longformer``'s window is symmetric and has global tokens).
SLIDING_WINDOW_BACKENDS = ("sliding_window", "flex")


def computes_the_model_s_attention(name: str, options: dict[str, Any], window: int | None, length: int) -> bool:
    """Whether backend ``name`` with ``options`` computes the model's own attention over ``length``
    keys (the model's sliding ``window``, None: none), so that it must equal HF's up to rounding;
    otherwise it is an approximation, known by its error."""
    capabilities = get_backend(name).capabilities
    own = options.get("window") if name in SLIDING_WINDOW_BACKENDS else None
    if not capabilities.exact:
        return False
    if own is not None:  # the latest query sees min(window, length) keys, in both
        return min(own, length) == min(window or length, length)
    return not capabilities.sparse_mask  # a window the backend lacks is refused (``check``)


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


# The suite's model sizes under the names a transformers config.json uses (GPT-2's first);
# a missing key/value head count is n_heads, a missing feed-forward width 4 x d_model (GPT-2's).
SIZE_KEYS = {
    "d_model": ("hidden_size", "n_embd", "d_model"),
    "n_heads": ("num_attention_heads", "n_head"),
    "n_kv_heads": ("num_key_value_heads",),
    "n_layers": ("num_hidden_layers", "n_layer"),
    "d_ff": ("intermediate_size", "n_inner"),
}


def json_field(path: str, field: str) -> Any:
    """``field`` of a transformers ``config.json`` (a file, or a folder holding one): the suite's
    size names (``d_model``, ``n_heads``, ``n_kv_heads``, ``n_layers``, ``d_ff``) read under
    transformers' names, any other key as it is. Read without importing transformers: the
    config resolver ``${hf_json:PATH,FIELD}`` of ``conf/model/hf_json.yaml``."""
    if not path:
        raise ValueError("model=hf_json reads the model's sizes from model.config_json=PATH: none given")
    file = Path(path).expanduser()
    file = file / "config.json" if file.is_dir() else file
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"model.config_json={path}: cannot read a transformers config.json there ({e})") from e
    if "text_config" in config:
        raise ValueError(f"{file} describes a multimodal model: give the config.json of its text model")
    if field not in SIZE_KEYS:
        return config.get(field)
    value = next((config[k] for k in SIZE_KEYS[field] if config.get(k) is not None), None)
    if field == "d_ff" and value is None:
        return 4 * json_field(path, "d_model")
    if value is None and field != "n_kv_heads":
        raise ValueError(f"{file} has none of {', '.join(SIZE_KEYS[field])}: the model's {field}")
    return value


def model_config(
    size: ModelSize,
    architecture: str | None,
    fields: dict[str, Any],
    config_json: str | None,
    vocab_size: int,
    positions: int,
):
    """A transformers config: ``architecture``'s (its ``model_type``) with ``fields`` (vocabulary,
    RoPE, sliding window, ...), or a user's ``config_json``, at the suite's ``size`` (width, heads,
    layers, feed-forward width), with at least ``positions`` positions (the weights are random:
    nothing limits a model to the length it was trained at). ``vocab_size``: where neither gives one."""
    from transformers import AutoConfig

    if config_json:
        config = AutoConfig.from_pretrained(str(Path(config_json).expanduser()))
    elif architecture:
        config = AutoConfig.for_model(architecture, **({"vocab_size": vocab_size} | dict(fields)))
    else:
        raise Unsupported("an HF model needs model.architecture (e.g. llama, mistral, gpt2) or model.config_json")
    config.hidden_size, config.num_attention_heads = size.d_model, size.n_heads
    config.num_hidden_layers = size.n_layers
    kv_heads = size.n_kv_heads or size.n_heads
    if hasattr(config, "num_key_value_heads"):
        config.num_key_value_heads = kv_heads
    elif kv_heads != size.n_heads:
        raise Unsupported(f"{config.model_type} has no grouped-query attention: model.n_kv_heads must be n_heads")
    setattr(config, "intermediate_size" if hasattr(config, "intermediate_size") else "n_inner", size.d_ff)
    head_dim = size.d_model // size.n_heads
    given = json_field(config_json, "head_dim") if config_json else fields.get("head_dim")
    if given not in (None, head_dim):
        raise Unsupported(
            f"this {config.model_type} has heads {given} wide, not d_model / n_heads = {head_dim}: "
            "not a shape the suite's records describe"
        )
    if hasattr(config, "head_dim"):  # derived from the defaults' width when the config was made
        config.head_dim = head_dim
    config.max_position_embeddings = max(config.max_position_embeddings, positions)
    return config
