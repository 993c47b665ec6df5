"""Every record checks what it measured: a wrong output is recorded as ``wrong``, never ``ok``.

Two checks, on the outputs the bench produced:

- finite: any NaN or Inf in an output (or a gradient) makes the cell wrong, whatever the backend;
- exact: a backend whose capabilities say ``exact`` must stay within its dtype's tolerance of the
  exact reference (``Capabilities.tolerance``, relative to the output's scale). Approximate
  backends keep their error as a figure (``max_abs_err``).

A bench raises ``WrongOutput`` after measuring, with what it measured, so that the record keeps
its figures beside the status that says they must not be used.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from efficient.attention import get_backend


class WrongOutput(Exception):
    """A measured output is wrong: the record's status is ``wrong`` and the reason says where."""

    def __init__(self, reason: str, measured: Any = None):
        super().__init__(reason)
        self.measured = measured  # the bench's Result: its figures, kept beside the status


def position(index: Sequence[int], dims: Sequence[str]) -> str:
    """'batch 1, position 7, feature 3' (or the bare index where the dims are not named)."""
    if len(dims) != len(index):
        return f"index {list(index)}"
    return ", ".join(f"{dim} {i}" for dim, i in zip(dims, index))


def nonfinite(tensor: torch.Tensor, what: str, dims: Sequence[str] = ()) -> str | None:
    """A sentence saying where ``tensor`` has NaN or Inf values, or None when it has none."""
    bad = ~torch.isfinite(tensor.detach())
    if not bad.any():
        return None
    first = [int(i) for i in bad.nonzero()[0]]
    kinds = " and ".join(k for k, present in (("NaN", tensor.isnan().any()), ("Inf", tensor.isinf().any())) if present)
    return f"{what}: {int(bad.sum()):,} {kinds} value(s) of {tensor.numel():,}, the first at {position(first, dims)}"


def beyond_tolerance(
    output: torch.Tensor, reference: torch.Tensor, tolerance: float, what: str, dims: Sequence[str] = ()
) -> tuple[float, str | None]:
    """(max |output - reference|, a sentence when it exceeds ``tolerance`` x the reference's scale)."""
    difference = (output.detach().to(reference.dtype) - reference).abs()
    error = difference.max().item()
    scale = max(reference.abs().max().item(), torch.finfo(reference.dtype).tiny)
    if error <= tolerance * scale:
        return error, None
    where = [int(i) for i in torch.unravel_index(difference.argmax(), difference.shape)]
    return error, (
        f"{what}: |output - exact reference| reaches {error:.3g} at {position(where, dims)}, beyond "
        f"the backend's tolerance {tolerance:g} x output scale {scale:.3g} = {tolerance * scale:.3g}"
    )


def check_exact(
    attention: str, dtype: str, output: torch.Tensor, reference: torch.Tensor, what: str, dims: Sequence[str] = ()
) -> tuple[float, str | None]:
    """(max abs error, why the output is wrong or None): NaN/Inf always; the tolerance when the
    backend is exact."""
    if problem := nonfinite(output, what, dims):
        return float("nan"), problem
    capabilities = get_backend(attention).capabilities
    tolerance = capabilities.tolerance.get(dtype) if capabilities.exact else None
    if tolerance is None:
        return (output.detach().to(reference.dtype) - reference).abs().max().item(), None
    return beyond_tolerance(output, reference, tolerance, what, dims)
