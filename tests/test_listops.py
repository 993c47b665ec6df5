"""ListOps (efficient/datasets/listops.py, bench/tasks/listops.py): LRA's semantics, rendering,
length window and tokenisation, the generator, and the loader of LRA's TSV files."""

import statistics

import pytest
import torch
from conftest import compose
from presets import LISTOPS

from bench.tasks.listops import encode, listops_splits
from efficient.datasets import listops


def tokens(text: str) -> list[str]:
    return text.split()


@pytest.mark.parametrize(
    "expression,value",
    [
        ("( ( ( [MAX 2 ) 9 ) ] )", 9),
        ("( ( ( [MIN 4 ) 7 ) ] )", 4),
        ("( ( ( ( ( [MED 1 ) 2 ) 3 ) 4 ) ] )", 2),  # median 2.5, rounded down
        ("( ( ( ( [SM 5 ) 7 ) 9 ) ] )", 1),  # 21 mod 10
        ("( ( ( ( ( [MAX 2 ) 9 ) ( ( ( [MIN 4 ) 7 ) ] ) ) 0 ) ] )", 9),
        ("( ( ( [SM ( ( ( [MED 3 ) 8 ) ] ) ) ( ( ( [MAX 1 ) 6 ) ] ) ) ] )", 1),  # (5 + 6) mod 10
    ],
)
def test_hand_checked_expressions(expression, value):
    assert listops.evaluate_tokens(tokens(expression)) == value


def test_rendering_is_lras_left_nested_pairs():
    tree = ("[MAX", [2, 9, ("[MIN", [4, 7]), 0])
    assert " ".join(listops.to_tokens(tree)) == "( ( ( ( ( [MAX 2 ) 9 ) ( ( ( [MIN 4 ) 7 ) ] ) ) 0 ) ] )"
    assert listops.value_of(tree) == 9


def depth_and_arity(tokens: list[str]) -> tuple[int, int]:
    depth = deepest = widest = 0
    counts = []
    for t in tokens:
        if t in listops.OPERATORS:
            depth += 1
            deepest = max(deepest, depth)
            if counts:
                counts[-1] += 1
            counts.append(0)
        elif t == listops.END:
            depth -= 1
            widest = max(widest, counts.pop())
        elif t.isdigit():
            counts[-1] += 1
    return deepest, widest


def test_generator_semantics_lengths_depth_arity_and_reproducibility():
    examples = listops.generate(200, seed=3, min_length=40, max_length=160, max_depth=10, max_args=10)
    for e in examples:
        assert 40 < listops.length(e.tokens) < 160
        assert listops.evaluate_tokens(e.tokens) == e.label
        assert listops.evaluate_tokens(listops.model_tokens(e.tokens)) == e.label  # what the model reads
        depth, arity = depth_and_arity(e.tokens)
        assert depth <= 10 and 2 <= arity <= 10
    again = listops.generate(200, seed=3, min_length=40, max_length=160)
    assert [e.tokens for e in again] == [e.tokens for e in examples]
    assert listops.generate(5, seed=4, min_length=40, max_length=160)[0].tokens != examples[0].tokens


def test_length_counts_operators_digits_and_brackets_not_parentheses():
    rendered = tokens("( ( ( ( ( [MAX 2 ) 9 ) ( ( ( [MIN 4 ) 7 ) ] ) ) 0 ) ] )")
    assert listops.model_tokens(rendered) == tokens("[MAX 2 9 [MIN 4 7 ] 0 ]")
    assert listops.length(rendered) == 9


def test_the_length_window_is_lras_strict_one_on_l():
    """LRA keeps a tree when min_length < L < max_length, L without parentheses."""
    lengths = [listops.length(e.tokens) for e in listops.generate(300, seed=5, min_length=20, max_length=24)]
    assert set(lengths) == {21, 22, 23}  # both ends excluded, every length between reached
    lra = [listops.length(e.tokens) for e in listops.generate(200, seed=0)]  # the default: LRA's 500 < L < 2000
    assert 500 < min(lra) and max(lra) < 2000
    assert 800 < statistics.median(lra) < 1200  # LRA's lengths, not the ~2.5x shorter rendered-token window


def test_the_model_reads_lras_15_symbols_without_parentheses():
    assert "(" not in listops.VOCAB and ")" not in listops.VOCAB
    assert len(listops.VOCAB) == 16 and listops.VOCAB[listops.PAD] == "<pad>"  # 15 symbols + padding
    examples = listops.generate(20, seed=1, min_length=40, max_length=160)
    split, truncated = encode(examples, 160)
    assert truncated == 0
    for e, ids, mask in zip(examples, split.tokens, split.mask):
        assert [listops.VOCAB[i] for i in ids[mask]] == listops.model_tokens(e.tokens)
        assert int(mask.sum()) == listops.length(e.tokens) < len(e.tokens)


def test_inputs_longer_than_seq_len_are_cut_and_counted_as_lra_does():
    examples = listops.generate(10, seed=2, min_length=40, max_length=160)
    cut = 60
    split, truncated = encode(examples, cut)
    assert truncated == sum(listops.length(e.tokens) > cut for e in examples) > 0
    for e, ids in zip(examples, split.tokens):
        assert [listops.VOCAB[i] for i in ids if i != listops.PAD] == listops.model_tokens(e.tokens)[:cut]


def test_label_balance_is_close_to_lras():
    """LRA's ListOps: labels 0 and 9 about 17% each, the others rarer."""
    labels = torch.tensor([e.label for e in listops.generate(600, seed=0)])  # LRA's 500-2000 tokens
    share = torch.bincount(labels, minlength=10).float() / len(labels)
    assert 0.12 < share[0] < 0.24 and 0.12 < share[9] < 0.24
    assert share[1:9].max() < share[0] and share[1:9].max() < share[9]


def write(path, text):
    path.write_text(text)
    return path


def test_loader_reads_lras_tsv(tmp_path):
    f = write(tmp_path / "basic_train.tsv", "Source\tTarget\n( ( ( [MAX 2 ) 9 ) ] )\t9\n( ( ( [SM 5 ) 7 ) ] )\t2\n")
    examples = listops.load_tsv(f)
    assert [e.label for e in examples] == [9, 2] and examples[0].tokens[3] == "[MAX"


def test_loader_names_the_missing_file_and_the_format(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.tsv not found: expected LRA's TSV \(header 'Source\\tTarget'"):
        listops.load_tsv(tmp_path / "nope.tsv")


@pytest.mark.parametrize(
    "text,message",
    [
        ("Input\tLabel\n1\t1\n", ":1: expected the header"),
        (
            "Source\tTarget\n( ( ( [MAX 2 ) 9 ) ] )\t9\n( [MAX 2 ] )\t2\textra\n",
            ":3: expected 2 tab-separated fields, got 3",
        ),
        ("Source\tTarget\n( ( ( [MAX 2 ) 9 ) ] )\t9\n( ( ( [POW 2 ) 9 ) ] )\t4\n", ":3: unknown token '\\[POW'"),
        ("Source\tTarget\n( ( ( [MAX 2 ) 9 ) ] )\tnine\n", ":2: target 'nine' is not a digit 0-9"),
        (
            "Source\tTarget\n( ( ( [MAX 2 ) 9 ) ] )\t\u00b2\n",
            ":2: target '\u00b2' is not a digit 0-9",
        ),  # isdigit() is True
        ("Source\tTarget\r\n", ":2: no examples after the header"),
        ("Source\tTarget\n\n\n", ":2: no examples after the header"),
        ("Source\tTarget\n( ( ( [MAX 2 ) 9 ) ] )\t9\n\n( ( ( [MIN 2 ) 9 ) ] )\t2\n", ":3: blank line between examples"),
    ],
)
def test_loader_names_the_file_and_line_of_a_malformed_file(tmp_path, text, message):
    with pytest.raises(ValueError, match=r"bad\.tsv" + message):
        listops.load_tsv(write(tmp_path / "bad.tsv", text))


def test_loader_ignores_blank_lines_at_the_end(tmp_path):
    f = write(tmp_path / "basic_train.tsv", "Source\tTarget\r\n( ( ( [MAX 2 ) 9 ) ] )\t9\r\n\r\n\n")
    assert [e.label for e in listops.load_tsv(f)] == [9]


def test_a_header_only_file_is_named_by_the_data_dir_path(tmp_path):
    """Through task.data_dir, an empty split is the loader's message, not a failure in encoding."""
    for split in ("train", "val", "test"):
        write(tmp_path / f"basic_{split}.tsv", "Source\tTarget\r\n( ( ( [MAX 2 ) 9 ) ] )\t9\r\n")
    write(tmp_path / "basic_val.tsv", "Source\tTarget\r\n")
    with pytest.raises(ValueError, match=r"basic_val\.tsv:2: no examples after the header"):
        listops_splits(compose(*LISTOPS, f"task.data_dir={tmp_path}").task, 60, 0)


def write_lra_file(path, examples):
    """Byte for byte what LRA's generator writes: Python's csv writer, a tab, CRLF line endings."""
    rows = ["Source\tTarget"] + [f"{' '.join(e.tokens)}\t{e.label}" for e in examples]
    path.write_bytes(("\r\n".join(rows) + "\r\n").encode())
    return path


def test_lras_files_load_with_the_documented_seq_len_2000(tmp_path):
    """Rows of LRA's lengths (500 < L < 2000: 1,500-6,000 tokens with parentheses), in LRA's exact
    format, through task.data_dir with seq_len=2000: nothing cut, the model reads L tokens."""
    lra = tmp_path / "listops-1000"
    lra.mkdir()
    for i, (split, n) in enumerate({"train": 6, "val": 3, "test": 3}.items()):
        write_lra_file(lra / f"basic_{split}.tsv", listops.generate(n, seed=10 + i))
    raw = (lra / "basic_train.tsv").read_bytes()
    assert raw.startswith(b"Source\tTarget\r\n") and raw.count(b"\r\n") == 7
    rows = [listops.load_tsv(lra / "basic_train.tsv")[i].tokens for i in range(6)]
    assert max(len(r) for r in rows) > 2000  # parentheses included, rows are longer than seq_len

    cfg = compose(*LISTOPS, f"task.data_dir={lra}", "seq_len=2000")
    splits, truncated = listops_splits(cfg.task, cfg.seq_len, cfg.seed)
    assert truncated == {"train": 0, "val": 0, "test": 0}
    assert splits["train"].tokens.shape == (6, 2000)
    assert splits["train"].mask.sum(dim=1).tolist() == [listops.length(r) for r in rows]

    from bench.harness import run_job

    record = run_job(
        compose(
            *LISTOPS, f"task.data_dir={lra}", "seq_len=2000", "batch_size=2", "bench.steps=2", "bench.eval_every=2"
        ),
        output_dir=tmp_path,
    )
    assert record["status"] == "ok", record["reason"]
    assert record["data"]["n_train"] == 6 and not any(k.endswith("_truncated") for k in record["data"])
    (tmp_path / "cut").mkdir()
    cut = run_job(
        compose(*LISTOPS, f"task.data_dir={lra}", "seq_len=600", "batch_size=2", "bench.steps=2", "bench.eval_every=2"),
        output_dir=tmp_path / "cut",
    )
    assert cut["status"] == "ok", cut["reason"]
    assert cut["data"]["n_train_truncated"] == sum(listops.length(r) > 600 for r in rows) > 0
