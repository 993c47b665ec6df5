"""What a bench returns: a frozen result whose fields are its measurements, each field saying
what it means and how the report shows it.

A bench declares its result as a dataclass of ``Result`` with ``measured(...)`` fields. The
harness writes the fields into the job's record, and with them the result's description
(``describe``): each field's meaning (``measures``) and kind (``kinds``), and the bench's
report (``report``): which fields get a backend x length table (``pivot``), which make the
columns of the bench's own table of ok cells (``table``), which are fitted against the length
(``scaling``) or divided by a baseline's (``ratio``), and which the job's one-line summary prints
(``headline``). So a record
describes itself: the report, pick and the CSV read it without importing the bench (or torch),
and a new bench needs neither the report nor the records module to change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

KIND_OF = {"float": "number", "int": "number", "str": "text", "list": "list", "dict": "dict"}  # annotation -> kind


def measured(
    meaning: str,
    *,
    pivot: str | None = None,
    column: str | None = None,
    fmt: str = ".4g",
    scaling: str | None = None,
    ratio: str | None = None,
    headline: str | None = None,
) -> Any:
    """A result field (None until measured). ``meaning``: one sentence, with the unit.
    ``pivot``: the title of its backend x length table. ``column``: its header in the bench's
    table of ok cells. ``fmt``: a format spec (``.3g``, ``,.0f``, ``.0%``; ``list``: items joined).
    ``scaling`` / ``ratio``: its name in the fitted-exponent and the baseline tables.
    ``headline``: the summary line's words around the value, e.g. ``"fwd {:.3g} ms"`` (the
    record's other fields as ``{record[name]}``)."""
    shown = {"pivot": pivot, "column": column, "scaling": scaling, "ratio": ratio, "headline": headline}
    return dataclasses.field(default=None, metadata={"meaning": meaning, "fmt": fmt, **shown})


@dataclass(frozen=True, kw_only=True)
class Result:
    """The measurements of one job; subclasses declare theirs with ``measured``."""

    TABLE: ClassVar[str] = ""  # title of the bench's table of ok cells (its ``column`` fields)

    def fields(self) -> dict[str, Any]:
        """The record's measured fields, in declaration order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """``{"measures": {field: meaning}, "kinds": {...}, "report": {...}}``: what a record of this
        bench says of itself."""
        declared = [(f.name, f.metadata) for f in dataclasses.fields(cls)]

        def marked(key: str) -> list[list[str]]:
            return [[name, m[key], m["fmt"]] for name, m in declared if m.get(key)]

        kinds = {f.name: KIND_OF.get(str(f.type)) for f in dataclasses.fields(cls)}
        return {
            "measures": {name: m["meaning"] for name, m in declared},
            "kinds": {name: kind for name, kind in kinds.items() if kind},
            "report": {
                "pivot": marked("pivot"),
                "table": {"title": cls.TABLE, "columns": marked("column")},
                "scaling": marked("scaling"),
                "ratio": marked("ratio"),
                "headline": [[name, m["headline"]] for name, m in declared if m.get("headline")],
            },
        }


def formatted(value: Any, fmt: str) -> str:
    """``value`` as a table shows it: ``-`` for None, a list joined, a number by ``fmt``."""
    if value is None:
        return "-"
    if fmt == "list" or isinstance(value, (list, tuple)):
        return ", ".join(str(v).removeprefix("aten::") for v in value) or "-"
    if isinstance(value, str) or isinstance(value, bool):
        return str(value)
    try:
        return format(value, fmt)
    except (TypeError, ValueError):
        return str(value)
