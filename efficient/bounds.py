"""Valid ranges of numeric settings: a backend's options, a bench's or task's settings, the model's.

The config check (``bench/config.py``) refuses a value outside its range before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Bound:
    """The valid range of a numeric setting: ``low <= value`` (``low < value`` when ``open``),
    and ``value < high`` when ``high`` is set. None is always valid (an unset option)."""

    low: float
    open: bool = False
    high: float | None = None

    def admits(self, value: Any) -> bool:
        if value is None:
            return True
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        above = value > self.low if self.open else value >= self.low
        return above and (self.high is None or value < self.high)

    def __str__(self) -> str:
        if self.high is not None:
            return f"in {'(' if self.open else '['}{self.low:g}, {self.high:g})"
        return f"{'>' if self.open else '>='} {self.low:g}"
