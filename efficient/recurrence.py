"""Segment-level recurrence for a causal LM over one long token stream (Transformer-XL).

The stream is cut into ``batch_size`` contiguous columns (column c continues where column c-1's
text would go on), and each column is read in order, ``tgt_len`` tokens at a time, with every
layer's memory carried from one segment of a column to the next. Nothing is shuffled: the
memory of column c always holds the text just before the current segment of column c.
Evaluation may use a longer memory than training (the paper's setting): ``set_mem_len``.
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


def set_mem_len(model: nn.Module, mem_len: int) -> None:
    """Give every stateful attention layer a memory of ``mem_len`` positions."""
    for module in model.modules():
        if hasattr(module, "mem_len") and getattr(module, "capabilities", None) and module.capabilities.stateful:
            module.mem_len = mem_len


def segment_loss(model: CausalLM, inputs, targets, states):
    """(mean cross-entropy in nats over the segment's tokens, the layers' new memories)."""
    logits, states = model(inputs, states=states)
    loss = nn.functional.cross_entropy(at_least_float32(logits).flatten(0, 1), targets.flatten())
    return loss, states


@torch.no_grad()
def evaluate_stream(model: CausalLM, columns: torch.Tensor, tgt_len: int, mem_len: int | None = None) -> float:
    """Mean cross-entropy (nats per token) over every target of the columns, memory carried."""
    was_training = model.training
    model.eval()
    if mem_len is not None:
        set_mem_len(model, mem_len)
    total, count, states = 0.0, 0, None
    for inputs, targets in segments(columns, tgt_len):
        loss, states = segment_loss(model, inputs, targets, states)
        total += loss.item() * targets.numel()
        count += targets.numel()
    model.train(was_training)
    return total / count
