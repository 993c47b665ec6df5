"""Segment-level recurrence for a causal LM over one long token stream (Transformer-XL).

The stream is cut into ``batch_size`` contiguous columns (column c continues where column c-1's
text would go on), and each column is read in order, ``tgt_len`` tokens at a time, with every
layer's memory carried from one segment of a column to the next. Nothing is shuffled: the
memory of column c always holds the text just before the current segment of column c.
Evaluation may use a longer memory than training (the paper's setting): ``evaluate_stream``'s
``mem_len``, which the accuracy bench takes from the layers' ``eval_mem_len`` option.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from efficient.models import CausalLM, at_least_float32


def ordered_columns(stream: torch.Tensor, batch_size: int) -> torch.Tensor:
    """[T] token ids -> [batch_size, T // batch_size]: contiguous columns, the tail dropped."""
    per_column = stream.numel() // batch_size
    if per_column < 2:
        raise ValueError(f"a stream of {stream.numel()} tokens is too short for {batch_size} columns")
    return stream[: per_column * batch_size].view(batch_size, per_column)


def segments(columns: torch.Tensor, tgt_len: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive (inputs [b, L], next-token targets [b, L]) along the columns, in order."""
    length = columns.shape[1] - 1  # the last token is only ever a target
    for start in range(0, length, tgt_len):
        stop = min(start + tgt_len, length)
        yield columns[:, start:stop], columns[:, start + 1 : stop + 1]


def stateful_layers(model: nn.Module) -> list[nn.Module]:
    """The attention layers that carry a memory (Transformer-XL)."""
    return [
        m
        for m in model.modules()
        if hasattr(m, "mem_len") and getattr(m, "capabilities", None) and m.capabilities.stateful
    ]


def set_mem_len(model: nn.Module, mem_len: int) -> None:
    """Give every stateful attention layer a memory of ``mem_len`` positions.

    Refused (nothing changed) where a layer cannot take it: a negative length, or 0 for a
    ``same_length`` layer, whose window of mem_len keys would be empty (all-zero outputs).
    """
    layers = stateful_layers(model)
    if mem_len < 0:
        raise ValueError(f"mem_len must be >= 0, got {mem_len}")
    if mem_len == 0 and any(getattr(layer, "same_length", False) for layer in layers):
        raise ValueError(
            "mem_len=0 with same_length=True: every query would see a window of no keys; "
            "give a memory > 0 or a model without same_length"
        )
    for layer in layers:
        layer.mem_len = mem_len


def eval_mem_len(model: nn.Module) -> int | None:
    """The memory the model's stateful layers ask for at evaluation (their ``eval_mem_len``), or
    None: evaluate with the training memory."""
    lengths = {
        layer.eval_mem_len for layer in stateful_layers(model) if getattr(layer, "eval_mem_len", None) is not None
    }
    if len(lengths) > 1:
        raise ValueError(f"the layers ask for different evaluation memories: {sorted(lengths)}")
    return lengths.pop() if lengths else None


def segment_loss(model: CausalLM, inputs, targets, states):
    """(mean cross-entropy in nats over the segment's tokens, the layers' new memories)."""
    logits, states = model(inputs, states=states)
    loss = nn.functional.cross_entropy(at_least_float32(logits).flatten(0, 1), targets.flatten())
    return loss, states


@torch.no_grad()
def evaluate_stream(model: CausalLM, columns: torch.Tensor, tgt_len: int, mem_len: int | None = None) -> float:
    """Mean cross-entropy (nats per token) over every target of the columns, memory carried.

    ``mem_len``: the memory to evaluate with (None: the layers' own); the model's memory
    length and training mode are restored afterwards, whatever happens.
    """
    was_training = model.training
    saved = [(layer, layer.mem_len) for layer in stateful_layers(model)]
    try:
        if mem_len is not None:
            set_mem_len(model, mem_len)
        model.eval()
        total, count, states = 0.0, 0, None
        for inputs, targets in segments(columns, tgt_len):
            loss, states = segment_loss(model, inputs, targets, states)
            total += loss.item() * targets.numel()
            count += targets.numel()
    finally:
        for layer, length in saved:
            layer.mem_len = length
        model.train(was_training)
    return total / count
