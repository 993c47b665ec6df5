"""How ``bench=accuracy`` reads a task: batches to train on, splits to score, state to checkpoint.

Two kinds, one interface (``train_loss``, ``probe_loss``, ``score``, ``state_dict``,
``load_state_dict``, ``describe``, and the ``metric`` the record reports):

- ``ExampleData``: independent examples (ListOps, recall), shuffled batches, scored by accuracy;
- ``StreamData``: one text stream per split (charlm), ordered segments with the layers' memory
  carried along, scored in bits per character.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from efficient.datasets import recall
from efficient.models import CausalLM
from efficient.recurrence import eval_mem_len, evaluate_stream, ordered_columns, segment_loss

IGNORE = recall.IGNORE  # a label that is not scored (-100)


@dataclass
class Split:
    tokens: torch.Tensor  # [N, seq_len] token ids, padded with 0
    mask: torch.Tensor  # [N, seq_len] True = real token
    labels: torch.Tensor  # [N] (classification) or [N, seq_len] (language modelling, -100 = not scored)


def logits_of(model: nn.Module, tokens, mask) -> torch.Tensor:
    """[b, classes] for a classifier, [b, n, vocab] for a causal LM."""
    if isinstance(model, CausalLM):
        return model(tokens)[0]
    return model(tokens, mask)


def loss_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE)


@torch.no_grad()
def accuracy_of(model: nn.Module, split: Split, batch_size: int, device: str) -> float:
    """Share of scored targets predicted right (labels of -100 are not scored)."""
    model.eval()
    correct = scored = 0
    for start in range(0, len(split.labels), batch_size):
        tokens, mask = (t[start : start + batch_size].to(device) for t in (split.tokens, split.mask))
        labels = split.labels[start : start + batch_size]
        predictions = logits_of(model, tokens, mask).argmax(-1).cpu()
        scored_here = labels != IGNORE
        correct += (predictions[scored_here] == labels[scored_here]).sum().item()
        scored += scored_here.sum().item()
    model.train()
    return correct / scored


def majority_accuracy(splits: dict[str, Split]) -> float:
    """Test accuracy of always answering the training set's most frequent (scored) label."""
    train, test = splits["train"].labels, splits["test"].labels
    majority = torch.bincount(train[train != IGNORE]).argmax()
    return (test[test != IGNORE] == majority).float().mean().item()


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
        return {
            "n_train": len(self.splits["train"].labels),
            "n_test": len(self.splits["test"].labels),
            "majority_class_test_accuracy": majority_accuracy(self.splits),
        }


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
