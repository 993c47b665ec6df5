"""``resume=true``: a sweep started again skips every cell it has already recorded.

A cell is known by its ``config_hash`` (the resolved config, less how it is run and logged).
A job whose cell already has an ``ok``, ``oom`` or ``unsupported`` record under the sweep
folder writes a small ``skipped.json`` beside it and measures nothing; an ``error`` record is
run again, and the error it replaces is renamed ``result.superseded.json`` so that every cell
is recorded once. Records are written atomically, so a sweep killed at any point leaves each
cell either whole or absent, and ``resume=true`` with the same ``hydra.sweep.dir`` finishes it.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench import records

FINAL = ("ok", "oom", "unsupported")  # an error is worth another try; these are not
SKIPPED_FILE = "skipped.json"
SUPERSEDED_FILE = "result.superseded.json"


def previous(root: Path, config_hash: str) -> list[dict]:
    """The records of this cell under ``root`` (a sweep folder)."""
    if not root.exists():
        return []
    return [r for r in records.load_records(root) if r.get("config_hash") == config_hash]


def skip_if_recorded(root: Path, record: dict, output_dir: Path) -> dict | None:
    """The final record of this cell if there is one (and mark this job skipped), else None."""
    earlier = previous(root, record["config_hash"])
    for done in earlier:
        if done["status"] in FINAL:
            records.write_atomic(output_dir / SKIPPED_FILE, {"result": done["_path"], "status": done["status"],
                                                             "config_hash": record["config_hash"], "at": time.time()})
            return done
    return None


def retire_errors(root: Path, record: dict, kept: Path) -> None:
    """Rename this cell's earlier error records (other than ``kept``) so one record remains."""
    for old in previous(root, record["config_hash"]):
        path = Path(old["_path"])
        if old["status"] == "error" and path.resolve() != kept.resolve():
            path.replace(path.with_name(SUPERSEDED_FILE))


def count_skipped(root: Path, since: float) -> int:
    """Jobs of the sweep started at ``since`` that found their cell already recorded."""
    return sum(1 for path in root.rglob(SKIPPED_FILE) if path.stat().st_mtime >= since)
