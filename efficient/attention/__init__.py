"""Attention backends. Importing this package registers every backend module in it."""

import importlib
import pkgutil

from efficient.attention.base import (
    Attention,
    Bound,
    Capabilities,
    Cell,
    ProjectedAttention,
    Shape,
    Unavailable,
    Unsupported,
    as_value,
    attention_factory,
    backend_names,
    build_attention,
    get_backend,
    option_defaults,
    options_schema,
    register,
    training_flops,
)

_SHARED = {"base", "functional"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _SHARED:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Attention", "Bound", "Capabilities", "Cell", "ProjectedAttention", "Shape", "Unavailable", "Unsupported",
    "as_value", "attention_factory", "backend_names", "build_attention", "get_backend", "option_defaults", "options_schema",
    "register", "training_flops",
]
