"""Where a recall model's attention heads look (Transformer-XL), and how it scores per split.

    python -m bench.recall_probe JOB_DIR [JOB_DIR ...] [--examples 1000] [--markdown FILE]

JOB_DIR is a finished ``bench=accuracy task=recall`` job with an ``xl`` model (its
``result.json`` and ``best.pt``). For each job: the accuracy on the first ``--examples``
sequences of the training, validation and test splits (memorising the training set shows as
training accuracy far above test), and for every layer and head the mean attention mass that a
queried key's position (where the value is predicted) puts on: the value of the queried pair,
its key, the other pairs' values, their keys, the filler, the query region (itself included).
``prev@values`` is the mean mass each pair's value position puts on its key, just before it (a
previous-token head: the first half of the textbook recall circuit, which copies each key
into its value's position).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf

from bench.stream_eval import load_job
from bench.tasks.data import Split, accuracy_of
from bench.tasks.recall import recall_splits
from efficient.datasets import recall

REGIONS = ("value", "key", "other values", "other keys", "filler", "queries")


@torch.no_grad()
def attention_mass(model, split: Split, n_pairs: int, batch_size: int) -> torch.Tensor:
    """[layers, heads, len(REGIONS) + 1]: mean attention mass at queried keys by region, + prev@values."""
    layers = [block.attention for block in model.encoder.blocks]
    for layer in layers:
        layer.keep_probs = True
    sums, count, prev = None, 0, None
    try:
        for start in range(0, len(split.labels), batch_size):
            tokens, labels = split.tokens[start : start + batch_size], split.labels[start : start + batch_size]
            model(tokens)
            probs = torch.stack([layer.last_probs for layer in layers], dim=1)  # [b, L, h, n, n]
            b, _, _, n, _ = probs.shape
            # each pair's value position (odd, < 2 n_pairs): its mass on the key just before it
            diagonal = probs.diagonal(offset=-1, dim1=-2, dim2=-1)[..., 0 : 2 * n_pairs : 2]  # [b, L, h, pairs]
            prev = diagonal.mean(-1).sum(0) if prev is None else prev + diagonal.mean(-1).sum(0)
            for i, t in zip(*torch.nonzero(labels != recall.IGNORE, as_tuple=True)):
                pair_keys = tokens[i, 0 : 2 * n_pairs : 2]
                key_at = 2 * int(torch.nonzero(pair_keys == tokens[i, t])[0])
                query_start = int(torch.nonzero(labels[i] != recall.IGNORE)[0])
                row = probs[i, :, :, t]  # [L, h, n]
                values, keys = row[..., 1 : 2 * n_pairs : 2].sum(-1), row[..., 0 : 2 * n_pairs : 2].sum(-1)
                parts = [
                    row[..., key_at + 1],
                    row[..., key_at],
                    values - row[..., key_at + 1],
                    keys - row[..., key_at],
                    row[..., 2 * n_pairs : query_start].sum(-1),
                    row[..., query_start : t + 1].sum(-1),
                ]
                mass = torch.stack(parts, dim=-1)  # [L, h, regions]
                sums = mass if sums is None else sums + mass
                count += 1
    finally:
        for layer in layers:
            layer.keep_probs, layer.last_probs = False, None
    return torch.cat([sums / count, (prev / len(split.labels)).unsqueeze(-1)], dim=-1)


def probe(job: Path, examples: int = 1000) -> str:
    record, model = load_job(job, task="recall")
    cfg = OmegaConf.create(record["config"])
    splits = recall_splits(cfg.task, cfg.seq_len, cfg.seed)
    first = {name: Split(*(t[:examples] for t in (s.tokens, s.mask, s.labels))) for name, s in splits.items()}
    accuracy = {name: accuracy_of(model, s, cfg.batch_size, "cpu") for name, s in first.items()}
    model.eval()
    mass = attention_mass(model, first["test"], cfg.task.n_pairs, cfg.batch_size)
    options = ", ".join(f"{k}={v}" for k, v in record["attention_options"].items())
    lines = [
        f"**{record['attention']} ({options})**: accuracy on the first {examples} sequences: "
        + ", ".join(f"{name} {100 * a:.1f}%" for name, a in accuracy.items()),
        "",
        "| layer.head | " + " | ".join(REGIONS) + " | prev@values |",
        "|---|" + "---:|" * (len(REGIONS) + 1),
    ]
    for layer in range(mass.shape[0]):
        for head in range(mass.shape[1]):
            lines.append(f"| {layer}.{head} | " + " | ".join(f"{v:.3f}" for v in mass[layer, head].tolist()) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.recall_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("jobs", type=Path, nargs="+", help="finished recall accuracy jobs' output folders")
    parser.add_argument("--examples", type=int, default=1000, help="sequences per split (default 1000)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables to this file")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    text = "\n".join(probe(job, args.examples) for job in args.jobs)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
