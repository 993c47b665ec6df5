"""``bench=accuracy``: train a model with any backend on a task, then evaluate it.

The loop users expect: AdamW, linear warm-up then cosine decay, gradient clipping, bf16
autocast on GPU, validation every ``eval_every`` steps, the best weights on validation kept
(``best.pt``, weights only, loaded with ``weights_only=True``), a progress bar, seeded data
order and initialisation, and a clean resume from ``last.pt`` (``bench.resume=true``: model,
optimiser, schedule, step, the data order or stream position, and the memory). The learning
curve goes to the W&B run's history; the record gets the test metric, throughput, peak memory,
wall time and steps.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from bench import measure, records
from bench.config import model_size
from bench.speed import attention_options
from efficient.attention import attention_factory, get_backend
from efficient.models import CausalLM, EncoderClassifier
from efficient.recurrence import eval_mem_len, evaluate_stream, ordered_columns, segment_loss
from efficient.tasks import charlm, listops, recall


@dataclass
class Split:
    tokens: torch.Tensor  # [N, seq_len] token ids, padded with 0
    mask: torch.Tensor  # [N, seq_len] True = real token
    labels: torch.Tensor  # [N] (classification) or [N, seq_len] (language modelling, -100 = not scored)


def encode(examples: list[listops.Example], seq_len: int) -> tuple[Split, int]:
    """LRA's input pipeline: parentheses dropped, tokens to ids, each input cut to its first
    ``seq_len`` tokens (LRA's ``max_length``), then padded. Returns (the split, how many were cut)."""
    if not examples:
        raise ValueError("no ListOps examples to encode")
    tokens = torch.full((len(examples), seq_len), listops.PAD, dtype=torch.long)
    truncated = 0
    for i, e in enumerate(examples):
        ids = [listops.TOKEN_ID[t] for t in listops.model_tokens(e.tokens)]
        truncated += len(ids) > seq_len
        tokens[i, : min(len(ids), seq_len)] = torch.tensor(ids[:seq_len], dtype=torch.long)
    return Split(tokens, tokens != listops.PAD, torch.tensor([e.label for e in examples])), truncated


def listops_splits(task, seq_len: int, seed: int) -> tuple[dict[str, Split], dict[str, int]]:
    """LRA's TSV files when ``task.data_dir`` is set, else generated splits (seeded, disjoint seeds).

    Returns the splits and, per split, how many inputs were longer than ``seq_len`` and cut.
    """
    if task.data_dir:
        folder = Path(task.data_dir)
        files = {"train": "basic_train.tsv", "val": "basic_val.tsv", "test": "basic_test.tsv"}
        examples = {split: listops.load_tsv(folder / name) for split, name in files.items()}
    else:
        sizes = {"train": task.n_train, "val": task.n_val, "test": task.n_test}
        examples = {split: listops.generate(n, seed=seed * 1000 + i, min_length=task.min_length,
                                            max_length=task.max_length, max_depth=task.max_depth,
                                            max_args=task.max_args)
                    for i, (split, n) in enumerate(sizes.items())}
    encoded = {split: encode(e, seq_len) for split, e in examples.items()}
    return {split: s for split, (s, _) in encoded.items()}, {split: n for split, (_, n) in encoded.items()}


def recall_splits(task, seq_len: int, seed: int) -> dict[str, Split]:
    sizes = {"train": task.n_train, "val": task.n_val, "test": task.n_test}
    out = {}
    for i, (split, n) in enumerate(sizes.items()):
        tokens, labels = recall.generate(n, seq_len, task.n_pairs, task.n_queries, task.vocab_size, seed * 1000 + i)
        out[split] = Split(tokens, torch.ones_like(tokens, dtype=torch.bool), labels)
    return out


class ExampleData:
    """Independent examples (ListOps, recall): shuffled batches, scored by accuracy."""

    metric, higher_is_better = "test_accuracy", True

    def __init__(self, splits: dict[str, Split], batch_size: int, device: str, seed: int):
        self.splits, self.batch_size, self.device = splits, batch_size, device
        self.order = torch.Generator().manual_seed(seed)  # the data order, saved with the checkpoint
        self.permutation, self.position = self.new_epoch(), 0

    def new_epoch(self) -> torch.Tensor:
        return torch.randperm(len(self.splits["train"].labels), generator=self.order)

    def batch(self, index) -> tuple[torch.Tensor, ...]:
        train = self.splits["train"]
        return tuple(t[index].to(self.device) for t in (train.tokens, train.mask, train.labels))

    def train_loss(self, model: nn.Module) -> tuple[torch.Tensor, int]:
        """(the loss of the next training batch, its real tokens)."""
        if self.position + self.batch_size > len(self.permutation):  # a new epoch, a new order
            self.permutation, self.position = self.new_epoch(), 0
        tokens, mask, labels = self.batch(self.permutation[self.position : self.position + self.batch_size])
        self.position += self.batch_size
        return loss_of(logits_of(model, tokens, mask), labels), int(mask.sum())

    def probe_loss(self, model: nn.Module) -> torch.Tensor:
        """The loss of the first training batch (for the peak-memory probe)."""
        tokens, mask, labels = self.batch(slice(0, self.batch_size))
        return loss_of(logits_of(model, tokens, mask), labels)

    def score(self, model: nn.Module, split: str) -> float:
        return accuracy_of(model, self.splits[split], self.batch_size, self.device)

    def state_dict(self) -> dict:
        return {"order": self.order.get_state(), "permutation": self.permutation, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.order.set_state(state["order"])
        self.permutation, self.position = state["permutation"], state["position"]

    def describe(self) -> dict:
        return {"n_train": len(self.splits["train"].labels), "n_test": len(self.splits["test"].labels),
                "majority_class_test_accuracy": majority_accuracy(self.splits)}


class StreamData:
    """One text stream per split (charlm): ordered segments, memory carried, bits per character.

    Training reads ``batch_size`` contiguous columns of the training stream ``seq_len`` tokens at
    a time, in order, handing each layer's memory (Transformer-XL) from one step to the next;
    the memory is reset when the columns wrap around. Validation and test read their streams
    the same way (``efficient.recurrence``), so a model with memory is scored with memory: that
    of ``attention.eval_mem_len`` where set (the paper evaluates with a longer one).
    """

    metric, higher_is_better = "test_bpc", False

    def __init__(self, streams: dict[str, torch.Tensor], batch_size: int, seq_len: int, device: str, source: dict):
        self.columns = {split: ordered_columns(s, batch_size).to(device) for split, s in streams.items()}
        self.seq_len, self.source = seq_len, source
        self.position, self.states = 0, None  # where the next segment starts; the layers' memories

    def train_loss(self, model: CausalLM) -> tuple[torch.Tensor, int]:
        train = self.columns["train"]
        if self.position + 1 >= train.shape[1]:  # the columns are read through: start again, no memory
            self.position, self.states = 0, None
        stop = min(self.position + self.seq_len, train.shape[1] - 1)
        inputs, targets = train[:, self.position : stop], train[:, self.position + 1 : stop + 1]
        loss, self.states = segment_loss(model, inputs, targets, self.states)
        self.position = stop
        return loss, targets.numel()

    def probe_loss(self, model: CausalLM) -> torch.Tensor:
        train = self.columns["train"]
        return segment_loss(model, train[:, : self.seq_len], train[:, 1 : self.seq_len + 1], self.states)[0]

    def score(self, model: CausalLM, split: str) -> float:
        """Bits per byte on ``split``, with the memory the layers ask for at evaluation
        (Transformer-XL's ``eval_mem_len``; None: the training memory)."""
        nats = evaluate_stream(model, self.columns[split], self.seq_len, mem_len=eval_mem_len(model))
        return nats / math.log(2)

    def state_dict(self) -> dict:
        return {"position": self.position, "states": self.states}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.states = state["position"], state["states"]

    def describe(self) -> dict:
        return {**self.source, **{f"n_{split}_bytes": c.numel() for split, c in self.columns.items()}}


class ListOpsData(ExampleData):
    """ListOps splits; the record also says how many inputs were cut to ``seq_len``, if any."""

    def __init__(self, cfg, device: str):
        splits, self.truncated = listops_splits(cfg.task, cfg.seq_len, cfg.seed)
        super().__init__(splits, cfg.batch_size, device, cfg.seed)

    def describe(self) -> dict:
        cut = {f"n_{split}_truncated": n for split, n in self.truncated.items() if n}
        return {**super().describe(), **cut}


def listops_data(cfg, device: str):
    return ListOpsData(cfg, device)


def recall_data(cfg, device: str):
    return ExampleData(recall_splits(cfg.task, cfg.seq_len, cfg.seed), cfg.batch_size, device, cfg.seed)


def charlm_data(cfg, device: str):
    path = cfg.task.data_path
    data = charlm.load_bytes(path) if path else charlm.default_corpus()
    source = charlm.describe(data, str(path) if path else "pydoc_data.topics (Python Language Reference)")
    return StreamData(charlm.split_stream(data), cfg.batch_size, cfg.seq_len, device, source)


# name -> (data(cfg, device), vocabulary size, classes or None for a causal LM task)
TASKS = {
    "listops": (listops_data, lambda task: len(listops.VOCAB), listops.N_CLASSES),
    "recall": (recall_data, lambda task: task.vocab_size, None),
    "charlm": (charlm_data, lambda task: charlm.VOCAB_SIZE, None),
}


def save_checkpoint(state: dict, path: Path) -> None:
    """torch.save, atomically: a kill during the save leaves the previous checkpoint whole."""
    with records.atomic_file(path, "wb") as f:
        torch.save(state, f)


class DamagedCheckpoint(Exception):
    """A checkpoint that cannot be loaded; the message names the file and what to do."""


@contextlib.contextmanager
def readable_checkpoint(path: Path):
    """Turn a failure to load ``path`` into one sentence that names the file and the fix."""
    try:
        yield
    except Exception as e:
        first_line = (str(e).splitlines() or [""])[0]
        raise DamagedCheckpoint(
            f"checkpoint {path} cannot be loaded ({type(e).__name__}: {first_line}); it is damaged or from "
            f"another model or suite version. Delete it (training then starts from step 0) or point the "
            f"run at another output folder") from e


def learning_rate(step: int, warmup: int, total: int) -> float:
    """Multiplier of the peak rate: linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def logits_of(model: nn.Module, tokens, mask) -> torch.Tensor:
    """[b, classes] for a classifier, [b, n, vocab] for a causal LM."""
    if isinstance(model, CausalLM):
        return model(tokens)[0]
    return model(tokens, mask)


def loss_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=recall.IGNORE)


@torch.no_grad()
def accuracy_of(model: nn.Module, split: Split, batch_size: int, device: str) -> float:
    """Share of scored targets predicted right (labels of -100 are not scored)."""
    model.eval()
    correct = scored = 0
    for start in range(0, len(split.labels), batch_size):
        tokens, mask = (t[start : start + batch_size].to(device) for t in (split.tokens, split.mask))
        labels = split.labels[start : start + batch_size]
        predictions = logits_of(model, tokens, mask).argmax(-1).cpu()
        scored_here = labels != recall.IGNORE
        correct += (predictions[scored_here] == labels[scored_here]).sum().item()
        scored += scored_here.sum().item()
    model.train()
    return correct / scored


def run_accuracy(cfg, device: str, tracker=None, output_dir: Path | None = None) -> dict:
    bench, task = cfg.bench, cfg.task
    if task.name not in TASKS:
        raise ValueError(f"bench=accuracy has no task {task.name!r}; valid: {', '.join(TASKS)}")
    make_data, vocab_size_of, n_classes = TASKS[task.name]
    if (n_classes is None) != bool(cfg.causal):
        kind = "a causal language-modelling task: set causal=true" if n_classes is None else \
            "a classification task for an encoder: set causal=false"
        raise ValueError(f"task {task.name} is {kind}")
    output_dir = Path(output_dir or ".")
    torch.manual_seed(cfg.seed)
    data = make_data(cfg, device)

    options = attention_options(cfg)
    if get_backend(cfg.attention.name).capabilities.needs_max_len and options.get("max_len") is None:
        options["max_len"] = cfg.seq_len
    size = model_size(cfg.model)
    make = attention_factory(cfg.attention.name, size.d_model, size.n_heads, size.dropout, **options)
    if n_classes is None:
        model = CausalLM(vocab_size_of(task), cfg.seq_len, size, make).to(device)
    else:
        model = EncoderClassifier(vocab_size_of(task), n_classes, cfg.seq_len, size, make).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=bench.lr, weight_decay=bench.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate(step, bench.warmup_steps, bench.steps))
    step, best_val, best_step = 0, None, 0
    last, best = output_dir / "last.pt", output_dir / "best.pt"
    if bench.resume and last.exists():
        with readable_checkpoint(last):
            state = torch.load(last, weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            data.load_state_dict(state["data"])
            step, best_val, best_step = state["step"], state["best_val"], state["best_step"]
            torch.set_rng_state(state["rng"])  # dropout masks continue as if never stopped

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda" and bench.amp)

    def improves(value: float) -> bool:
        return best_val is None or (value > best_val if data.higher_is_better else value < best_val)

    validation = "val_" + data.metric.removeprefix("test_")
    started, tokens_seen = time.perf_counter(), 0
    model.train()
    progress = tqdm(total=bench.steps, initial=step, desc=f"{cfg.attention.name} {task.name}", mininterval=5,
                    disable=not bench.progress)
    while step < bench.steps:
        with autocast():
            loss, n_tokens = data.train_loss(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), bench.clip)
        optimizer.step()
        schedule.step()
        step += 1
        tokens_seen += n_tokens
        progress.update(1)
        metrics = {"train_loss": loss.item(), "lr": schedule.get_last_lr()[0]}
        if step % bench.eval_every == 0 or step == bench.steps:
            with autocast():
                metrics[validation] = data.score(model, "val")
            progress.set_postfix(loss=f"{loss.item():.3f}", val=f"{metrics[validation]:.3f}")
            if improves(metrics[validation]):
                best_val, best_step = metrics[validation], step
                save_checkpoint(model.state_dict(), best)
            save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "schedule": schedule.state_dict(), "data": data.state_dict(), "step": step,
                             "rng": torch.get_rng_state(), "best_val": best_val, "best_step": best_step}, last)
        if tracker is not None:
            tracker.log(metrics, step=step)
    progress.close()
    train_s = time.perf_counter() - started

    with readable_checkpoint(best):
        model.load_state_dict(torch.load(best, weights_only=True))
    with autocast():
        test_value = data.score(model, "test")

    def one_step():
        data.probe_loss(model).backward()
        model.zero_grad(set_to_none=True)

    peak = measure.peak_memory_bytes(one_step, device)
    return {
        "metric": data.metric, "value": test_value,
        "fwd_bwd_tokens_per_s": tokens_seen / train_s if tokens_seen else None,  # real (unpadded) tokens
        "peak_mem_mib": peak / measure.MIB, "fwd_bwd_peak_mem_mib": peak / measure.MIB,
        "extra": {"best_" + validation: best_val, "best_step": best_step, "steps": step,
                  "train_seconds": train_s, **data.describe()},
    }


def majority_accuracy(splits: dict[str, Split]) -> float:
    """Test accuracy of always answering the training set's most frequent (scored) label."""
    train, test = splits["train"].labels, splits["test"].labels
    majority = torch.bincount(train[train != recall.IGNORE]).argmax()
    return (test[test != recall.IGNORE] == majority).float().mean().item()
