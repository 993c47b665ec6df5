"""Attention backends. Importing this package registers every backend module in it."""

from efficient.attention.base import (
    Attention,
    Capabilities,
    ProjectedAttention,
    Setting,
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
from efficient.registry import import_modules

import_modules(__name__, __path__, skip=("base", "functional"))

__all__ = [
    "Attention",
    "Capabilities",
    "ProjectedAttention",
    "Setting",
    "Shape",
    "Unavailable",
    "Unsupported",
    "as_value",
    "attention_factory",
    "backend_names",
    "build_attention",
    "get_backend",
    "option_defaults",
    "options_schema",
    "register",
    "training_flops",
]
