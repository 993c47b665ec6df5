"""Records of earlier layouts, read as the current one (``records.RECORD_VERSION`` 3).

Until version 3, every bench wrote the same flat fields, so ``fwd_ms`` was a forward pass in
``bench=speed``, a decode step in ``bench=decode`` and a segment in ``bench=xl_eval``, and
``value`` was an accuracy, a length, a bandwidth fraction or a speed-up, with the rest under
``extra``. Version 3 gives each bench its own named fields (its ``Result``). Here, and only
here, the old names are mapped to the new, bench by bench, as they were when version 3 began;
no new bench ever needs a line here.
"""

from __future__ import annotations

from typing import Any

# bench -> {old top-level field: new field (None: dropped, its figure is elsewhere)}
RENAMED: dict[str, dict[str, str | None]] = {
    "decode": {
        "fwd_ms": "decode_ms",
        "fwd_ms_p20": "decode_ms_p20",
        "fwd_ms_p80": "decode_ms_p80",
        "fwd_samples": "decode_samples",
        "fwd_tokens_per_s": "decode_tokens_per_s",
        "value": "bandwidth_fraction",
        "attention_ops": "decode_ops",
        "metric": None,
        "fwd_peak_mem_mib": None,  # both were the prefill's peak: prefill_peak_mem_mib
        "peak_mem_mib": None,
        "note": None,  # it said what fwd_ms meant there
    },
    "xl_eval": {
        "fwd_ms": "xl_segment_ms",
        "fwd_ms_p20": "xl_segment_ms_p20",
        "fwd_ms_p80": "xl_segment_ms_p80",
        "fwd_samples": "xl_samples",
        "fwd_tokens_per_s": "xl_tokens_per_s",
        "value": "speedup_per_token",
        "metric": None,
    },
    "maxlen": {"value": "max_seq_len", "metric": None},
    "accuracy": {"fwd_bwd_peak_mem_mib": None},  # the same figure as peak_mem_mib
}
# bench -> {key under the old ``extra``: new field}; keys not named here stay in ``data`` (accuracy)
# or are dropped (they repeat a figure the record has).
FROM_EXTRA: dict[str, dict[str, str]] = {
    "decode": {
        k: k
        for k in (
            "prefill_ms",
            "prefill_tokens_per_s",
            "prefill_peak_mem_mib",
            "prefill_chunk",
            "prefill_ops",
            "cache_mib",
            "weights_mib",
            "bytes_per_token",
            "achieved_gbs",
            "peak_gbs",
            "peak_source",
        )
    }
    | {"decode_tokens": "decode_samples"},
    "xl_eval": {
        k: k
        for k in (
            "tgt_len",
            "mem_len",
            "xl_ms_per_token",
            "vanilla_ms_per_token",
            "vanilla_ms_p20",
            "vanilla_ms_p80",
            "paper_speedup",
            "ratio_to_paper",
        )
    },
    "maxlen": {k: k for k in ("method", "budget_gib", "first_failing", "resolution", "tried")},
    "accuracy": {k: k for k in ("best_step", "steps", "resumed_from_step", "train_seconds")},
}


def as_version_3(record: dict[str, Any]) -> dict[str, Any]:
    """A record of version 1 or 2 with version 3's field names (its version left as it was: it
    still carries no description of its fields until ``python -m bench.records upgrade``)."""
    bench = record.get("bench")
    new = {k: v for k, v in record.items() if k != "extra"}
    for old, name in RENAMED.get(bench, {}).items():
        value = new.pop(old, None)
        if name is not None and value is not None:
            new[name] = value
    extra = dict(record.get("extra") or {})
    for old, name in FROM_EXTRA.get(bench, {}).items():
        if old in extra:
            new.setdefault(name, extra.pop(old))
    if bench == "accuracy" and "extra" in record:
        best = [k for k in extra if k.startswith("best_val_")]
        if best:
            new["best_val"] = extra.pop(best[0])
        new["data"] = extra
    if bench == "maxlen" and "extra" in record:
        peaks = [t.get("peak_mib") for t in new.get("tried") or [] if t.get("seq_len") == new.get("max_seq_len")]
        new["peak_mib_at_longest"] = max((p for p in peaks if p is not None), default=None)
    return new
