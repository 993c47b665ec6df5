"""Multi-query associative recall (efficient/datasets/recall.py, bench/tasks/recall.py): the
sequences, the settings refused, and a causal LM trained on it."""

import pytest
import torch
from conftest import compose
from presets import RECALL

from bench.benches.accuracy import run_accuracy
from bench.cell import Cell
from efficient.datasets import recall


def test_recall_sequences_score_the_value_after_each_queried_key():
    tokens, labels = recall.generate(50, seq_len=64, n_pairs=6, n_queries=4, vocab_size=40, seed=0)
    keys, values, filler = recall.vocabulary(40)
    for seq, lab in zip(tokens, labels):
        pairs = dict(zip(seq[0:12:2].tolist(), seq[1:12:2].tolist()))
        assert len(pairs) == 6 and all(k in keys for k in pairs) and all(v in values for v in pairs.values())
        assert all(t in filler for t in seq[12:56].tolist())
        scored = (lab != recall.IGNORE).nonzero().flatten().tolist()
        assert scored == [56, 58, 60, 62]
        for t in scored:
            assert lab[t] == pairs[seq[t].item()] == seq[t + 1]  # the value that follows the key
    again, _ = recall.generate(50, seq_len=64, n_pairs=6, n_queries=4, vocab_size=40, seed=0)
    assert torch.equal(again, tokens)


def test_recall_refuses_impossible_settings():
    with pytest.raises(ValueError, match="do not fit"):
        recall.generate(1, seq_len=10, n_pairs=4, n_queries=4, vocab_size=40, seed=0)


def test_recall_trains_a_causal_lm(tmp_path):
    result = run_accuracy(Cell.of(compose(*RECALL, "bench.steps=20", "bench.eval_every=10")), output_dir=tmp_path)
    assert result.metric == "test_accuracy" and 0.0 <= result.value <= 1.0
