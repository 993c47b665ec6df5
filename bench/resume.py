"""``resume=true``: a sweep started again skips every cell it has already recorded.

A cell is known by its ``config_hash`` (the resolved config with ``device=auto`` resolved,
less how it is run and logged). A job whose cell already has a final record under the sweep
folder (``ok``, ``oom``, or ``unsupported`` by the backend) writes a small ``skipped.json``
beside it and measures nothing. An ``error``, or an ``unsupported`` that only this machine
caused (``final: false``: no CUDA, a package missing), is run again, and the record it replaces
is kept as ``result.superseded.<time>.json`` so that every cell has one ``result.json``.
Records are written atomically, so a sweep killed at any point leaves each cell either whole
or absent, and ``resume=true`` with the same ``hydra.sweep.dir`` finishes it.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench import records

FINAL = ("ok", "oom", "unsupported")  # an error is worth another try; these are not
SKIPPED_FILE = "skipped.json"


def is_final(record: dict) -> bool:
    """Would another run of this cell, on any machine, end the same way? (Older records have no
    ``final`` field: their status decides.)"""
    return record["status"] in FINAL and record.get("final") is not False


def previous(root: Path, config_hash: str) -> list[dict]:
    """The records of this cell under ``root`` (a sweep folder)."""
    if not root.exists():
        return []
    return [r for r in records.load_records(root) if r.get("config_hash") == config_hash]


def recorded_cells(root: Path) -> set[str]:
    """The config hashes of the cells with a final record under ``root`` (a sweep folder)."""
    if not root.exists():
        return set()
    return {r["config_hash"] for r in records.load_records(root) if is_final(r) and r.get("config_hash")}


def final_record(root: Path, record: dict) -> dict | None:
    """The final record of this cell under ``root`` if there is one, else None."""
    return next((done for done in previous(root, record["config_hash"]) if is_final(done)), None)


def skip_if_recorded(root: Path, record: dict, output_dir: Path) -> dict | None:
    """The final record of this cell if there is one (and mark this job skipped), else None."""
    if done := final_record(root, record):
        records.write_atomic(
            output_dir / SKIPPED_FILE,
            dict(result=done["_path"], status=done["status"], config_hash=record["config_hash"], at=time.time()),
        )
    return done


def retire_retried(root: Path, record: dict, kept: Path) -> None:
    """Set aside this cell's earlier records that were run again (errors, machine-only
    unsupported) in other folders of the sweep, so that one ``result.json`` remains per cell."""
    if kept.name != records.RESULT_FILE:  # the new record was itself set aside: the old one stays
        return
    for old in previous(root, record["config_hash"]):
        path = Path(old["_path"])
        if not is_final(old) and path.resolve() != kept.resolve():
            path.replace(records.aside_path(path.parent, "superseded"))


def count_skipped(root: Path, since: float) -> int:
    """Jobs of the sweep started at ``since`` that found their cell already recorded."""
    return sum(1 for path in root.rglob(SKIPPED_FILE) if path.stat().st_mtime >= since)
