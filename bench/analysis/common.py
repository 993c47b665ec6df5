"""What the report, the HTML page and pick share: how a record is named, which settings vary
across a set of records, and the power-law fit of a quantity against the length."""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.records import cell_label

# Fields that tell cells apart beside the backend and the length.
SETTINGS = ("dtype", "device", "causal", "scope", "batch_size", "d_model", "n_heads", "n_kv_heads", "bench", "task")


def setting(record: dict[str, Any], key: str) -> Any:
    """A record's setting; records made before ``n_kv_heads`` existed had n_heads of them."""
    if key == "n_kv_heads":
        return record.get("n_kv_heads") or record.get("n_heads")
    return record.get(key)


def label(record: dict[str, Any], varying: tuple[str, ...] = ()) -> str:
    """'sdpa[kernel=flash]' plus any setting that varies across the records shown."""
    text = cell_label(record)
    extra = [f"{k}={setting(record, k)}" for k in varying]
    return f"{text} ({', '.join(extra)})" if extra else text


def varying_settings(rows: list[dict[str, Any]]) -> tuple[str, ...]:
    return tuple(k for k in SETTINGS if len({str(setting(r, k)) for r in rows}) > 1)


def fit_power_law(lengths: list[float], values: list[float]) -> tuple[float, float, float]:
    """Least squares of log(value) = log(c) + k log(n): (k, c, spread of the log residuals)."""
    x, y = np.log(np.asarray(lengths, dtype=float)), np.log(np.asarray(values, dtype=float))
    k, log_c = np.polyfit(x, y, 1)
    spread = float(np.std(y - (k * x + log_c)))
    return float(k), float(np.exp(log_c)), spread
