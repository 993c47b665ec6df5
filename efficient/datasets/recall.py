"""Multi-query associative recall (MQAR, Arora et al. 2023), a causal language-modelling task.

A sequence lists ``n_pairs`` key-value pairs, then filler tokens, then ``n_queries`` of the keys
again, each followed by its value:

    k3 v3 k7 v7 k1 v1 . . . . . . k7 v7 k3 v3
                                  ^^ the model must predict v7 after k7 (and v3 after k3)

Only the tokens right after a queried key are scored: the model must look back across the
filler to the pair. Keys, values and filler come from disjoint parts of the vocabulary
(``vocab_size`` tokens: 0 is padding, then keys, values, filler). Labels are -100 where nothing
is scored (PyTorch's ignore index).
"""

from __future__ import annotations

import torch

IGNORE = -100


def vocabulary(vocab_size: int) -> tuple[range, range, range]:
    """(keys, values, filler) token ranges; 0 is reserved for padding."""
    third = (vocab_size - 1) // 3
    if third < 2:
        raise ValueError(f"recall needs vocab_size >= 7, got {vocab_size}")
    return range(1, 1 + third), range(1 + third, 1 + 2 * third), range(1 + 2 * third, vocab_size)


def generate(n: int, seq_len: int, n_pairs: int, n_queries: int, vocab_size: int, seed: int):
    """(tokens [n, seq_len], labels [n, seq_len]): labels[i, t] is the value to predict at t."""
    keys, values, filler = vocabulary(vocab_size)
    if n_pairs > len(keys):
        raise ValueError(f"{n_pairs} pairs need {n_pairs} distinct keys, the vocabulary has {len(keys)}")
    if n_queries > n_pairs or 2 * (n_pairs + n_queries) > seq_len:
        raise ValueError(f"{n_pairs} pairs and {n_queries} queries do not fit {seq_len} tokens")
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(filler.start, filler.stop, (n, seq_len), generator=g)
    labels = torch.full((n, seq_len), IGNORE)
    query_start = seq_len - 2 * n_queries
    for i in range(n):
        k = torch.randperm(len(keys), generator=g)[:n_pairs] + keys.start
        v = torch.randint(values.start, values.stop, (n_pairs,), generator=g)
        tokens[i, 0 : 2 * n_pairs : 2], tokens[i, 1 : 2 * n_pairs : 2] = k, v
        asked = torch.randperm(n_pairs, generator=g)[:n_queries]
        tokens[i, query_start::2], tokens[i, query_start + 1 :: 2] = k[asked], v[asked]
        labels[i, query_start::2] = v[asked]  # predicted at the key's position: the next token
    return tokens, labels
