"""Registries by name: the attention backends here, the suite's benches and tasks in bench/.

Each entry (a class or an object with a ``name``) is registered by the module that defines it;
importing a package's modules (``import_modules``) is all it takes for the entries to join.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Generic, Iterable, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, plural: str):
        self.kind, self.plural = kind, plural  # e.g. "attention backend", "backends": for messages
        self.entries: dict[str, T] = {}

    def register(self, entry: T) -> T:
        name = entry.name
        if name in self.entries and self.entries[name] is not entry:
            raise ValueError(f"two {self.kind}s are named {name!r}")
        self.entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove an entry (a test's probe, once the test is done)."""
        self.entries.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self.entries)

    def get(self, name: str) -> T:
        try:
            return self.entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; valid {self.plural}: {', '.join(self.names())}") from None


def import_modules(package: str, path: Iterable[str], skip: Iterable[str] = ()) -> None:
    """Import every module of ``package`` (its ``__path__``) but ``skip``: each registers its entries."""
    for module in pkgutil.iter_modules(path):
        if module.name not in set(skip):
            importlib.import_module(f"{package}.{module.name}")
