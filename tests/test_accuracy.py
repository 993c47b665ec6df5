"""The accuracy track: ListOps' semantics, the LRA loader, and the training loop."""

import statistics

import pytest
import torch
from conftest import compose

from bench.benches.accuracy import learning_rate, run_accuracy
from bench.cell import Cell
from bench.records import validate
from bench.tasks.listops import encode, listops_splits
from efficient.attention import flex
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
        listops_splits(compose(*TINY, f"task.data_dir={tmp_path}").task, 60, 0)


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

    cfg = compose(*TINY, f"task.data_dir={lra}", "seq_len=2000")
    splits, truncated = listops_splits(cfg.task, cfg.seq_len, cfg.seed)
    assert truncated == {"train": 0, "val": 0, "test": 0}
    assert splits["train"].tokens.shape == (6, 2000)
    assert splits["train"].mask.sum(dim=1).tolist() == [listops.length(r) for r in rows]

    from bench.harness import run_job

    record = run_job(
        compose(*TINY, f"task.data_dir={lra}", "seq_len=2000", "batch_size=2", "bench.steps=2", "bench.eval_every=2"),
        output_dir=tmp_path,
    )
    assert record["status"] == "ok", record["reason"]
    assert record["data"]["n_train"] == 6 and not any(k.endswith("_truncated") for k in record["data"])
    (tmp_path / "cut").mkdir()
    cut = run_job(
        compose(*TINY, f"task.data_dir={lra}", "seq_len=600", "batch_size=2", "bench.steps=2", "bench.eval_every=2"),
        output_dir=tmp_path / "cut",
    )
    assert cut["status"] == "ok", cut["reason"]
    assert cut["data"]["n_train_truncated"] == sum(listops.length(r) > 600 for r in rows) > 0


def test_warmup_then_cosine_decay():
    assert learning_rate(0, 10, 100) == pytest.approx(0.1) and learning_rate(9, 10, 100) == pytest.approx(1.0)
    assert learning_rate(55, 10, 100) == pytest.approx(0.5) and learning_rate(100, 10, 100) == pytest.approx(0.0)


TINY = [
    "bench=accuracy",
    "task=listops",
    "task.n_train=256",
    "task.n_val=64",
    "task.n_test=64",
    "task.min_length=20",
    "task.max_length=60",
    "seq_len=60",
    "batch_size=16",
    "model.d_model=32",
    "model.n_heads=2",
    "model.n_layers=1",
    "model.d_ff=64",
    "bench.lr=3e-3",
    "bench.warmup_steps=5",
    "bench.progress=false",
    "device=cpu",
]


class StopAt:
    """A tracker that interrupts training after a given step (a killed job)."""

    def __init__(self, step):
        self.step = step

    def log(self, metrics, step):
        if step == self.step:
            raise KeyboardInterrupt


def test_training_reduces_loss_and_records_the_test_accuracy(tmp_path):
    losses = []

    class Recorder:
        def log(self, metrics, step):
            losses.append(metrics["train_loss"])

    cfg = compose(*TINY, "bench.steps=60", "bench.eval_every=30")
    result = run_accuracy(Cell.of(cfg), tracker=Recorder(), output_dir=tmp_path)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10
    assert result.metric == "test_accuracy" and 0.0 <= result.value <= 1.0
    assert result.steps == 60 and (tmp_path / "best.pt").exists()
    torch.load(tmp_path / "best.pt", weights_only=True)  # weights only: loads safely


CHARLM = [
    "bench=accuracy",
    "task=charlm",
    "attention=xl",
    "attention.mem_len=16",
    "causal=true",
    "seq_len=16",
    "batch_size=4",
    "model.d_model=32",
    "model.n_heads=2",
    "model.n_layers=2",
    "model.d_ff=64",
    "bench.lr=3e-3",
    "bench.warmup_steps=5",
    "bench.progress=false",
    "device=cpu",
]


# charlm with memory takes minutes on 2 cores: slow (CI runs it; `-m "not slow"` skips it in a quick loop)
@pytest.mark.parametrize(
    "task", [TINY, pytest.param(CHARLM, marks=pytest.mark.slow)], ids=["listops", "charlm-with-memory"]
)
def test_resume_continues_the_same_run(tmp_path, task):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    for folder in (straight, interrupted):
        folder.mkdir()
    cfg = compose(*task, "bench.steps=40", "bench.eval_every=20")
    run_accuracy(Cell.of(cfg), output_dir=straight)
    with pytest.raises(KeyboardInterrupt):
        run_accuracy(Cell.of(cfg), tracker=StopAt(25), output_dir=interrupted)  # last.pt is at step 20
    resumed = compose(*task, "bench.steps=40", "bench.eval_every=20", "bench.resume=true")
    run_accuracy(Cell.of(resumed), output_dir=interrupted)
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(interrupted / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 40
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_accuracy_job_record_and_missing_data(tmp_path):
    from bench.harness import run_job

    record = run_job(compose(*TINY, "bench.steps=10", "bench.eval_every=10"), output_dir=tmp_path)
    assert record["status"] == "ok" and validate(record) == [] and record["metric"] == "test_accuracy"
    missing = run_job(compose(*TINY, f"task.data_dir={tmp_path}/lra"), output_dir=tmp_path)
    assert missing["status"] == "error" and "basic_train.tsv not found: expected LRA's TSV" in missing["reason"]


# -- associative recall (a causal LM task) ---------------------------------------------------
from efficient.datasets import recall  # noqa: E402


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


RECALL = [
    "bench=accuracy",
    "task=recall",
    "task.vocab_size=16",
    "task.n_pairs=3",
    "task.n_queries=2",
    "task.n_train=256",
    "task.n_val=32",
    "task.n_test=32",
    "seq_len=24",
    "batch_size=16",
    "causal=true",
    "model.d_model=32",
    "model.n_heads=2",
    "model.n_layers=1",
    "model.d_ff=64",
    "bench.progress=false",
    "bench.warmup_steps=5",
    "bench.lr=3e-3",
    "device=cpu",
]


def test_recall_trains_a_causal_lm(tmp_path):
    result = run_accuracy(Cell.of(compose(*RECALL, "bench.steps=20", "bench.eval_every=10")), output_dir=tmp_path)
    assert result.metric == "test_accuracy" and 0.0 <= result.value <= 1.0


def test_a_backend_that_cannot_do_the_task_is_unsupported(tmp_path):
    from bench.harness import run_job

    record = run_job(compose(*RECALL, "attention=linformer", "bench.steps=5"), output_dir=tmp_path)
    assert record["status"] == "unsupported" and record["reason"] == "linformer cannot be causal"
    no_backward = run_job(compose(*RECALL, "attention=flex", "bench.steps=5", "model.d_model=64"), output_dir=tmp_path)
    refused_here = flex.cpu_isa_problem(32)  # a CPU whose flex kernel torch gets wrong: said first
    assert no_backward["status"] == "unsupported"
    assert (refused_here or "flex has no backward on cpu, and training needs one") in no_backward["reason"]
    encoder = [o for o in RECALL if not o.startswith("causal")] + ["causal=false", "bench.steps=5"]
    mismatch = run_job(compose(*encoder), output_dir=tmp_path)
    assert mismatch["status"] == "error" and "set causal=true" in mismatch["reason"]


# -- byte-level language modelling -----------------------------------------------------------
from bench.tasks.data import StreamData  # noqa: E402
from efficient.datasets import charlm  # noqa: E402


def test_byte_loader_reads_raw_and_zipped_files_and_splits_90_5_5_in_order(tmp_path):
    import zipfile

    data = bytes(range(200)) * 5  # 1000 bytes
    raw = tmp_path / "enwik8"
    raw.write_bytes(data)
    with zipfile.ZipFile(tmp_path / "enwik8.zip", "w") as archive:
        archive.writestr("enwik8", data)
    for path in (raw, tmp_path / "enwik8.zip"):
        streams = charlm.split_stream(charlm.load_bytes(path))
        assert [len(streams[s]) for s in ("train", "val", "test")] == [900, 50, 50]
        assert bytes(torch.cat(list(streams.values())).tolist()) == data  # contiguous, in file order


def test_byte_loader_names_the_path_and_format_of_bad_files(tmp_path):
    import zipfile

    with pytest.raises(FileNotFoundError, match=r"enwik8 does not exist: expected a raw byte file such as enwik8"):
        charlm.load_bytes(tmp_path / "enwik8")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ValueError, match="empty is empty"):
        charlm.load_bytes(tmp_path / "empty")
    with zipfile.ZipFile(tmp_path / "two.zip", "w") as archive:
        archive.writestr("a", "x")
        archive.writestr("b", "y")
    with pytest.raises(ValueError, match="a zip with one file.*found 2: a, b"):
        charlm.load_bytes(tmp_path / "two.zip")


def test_default_corpus_is_english_text_shipped_with_python():
    corpus = charlm.default_corpus()
    assert len(corpus) > 400_000 and corpus == charlm.default_corpus()
    assert b'The "assert" statement' in corpus


def test_stream_training_reads_consecutive_segments_and_carries_memory():
    stream = torch.arange(4 * 41) % 256  # 4 columns of 41 tokens: 40 targets each
    data = StreamData(
        {"train": stream, "val": stream, "test": stream}, batch_size=4, seq_len=16, device="cpu", source={}
    )
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, inputs, states=None):
            seen.append((inputs[:, 0].tolist(), inputs.shape[1], states))
            return torch.zeros(*inputs.shape, 256, requires_grad=True), [inputs[:, -1:]]

    model = Recorder()
    for _ in range(4):
        data.train_loss(model)
    columns = stream.view(4, 41)
    assert [(first, length) for first, length, _ in seen] == [
        (columns[:, 0].tolist(), 16),
        (columns[:, 16].tolist(), 16),
        (columns[:, 32].tolist(), 8),
        (columns[:, 0].tolist(), 16),
    ]  # read through: start again
    assert seen[0][2] is None and torch.equal(seen[1][2][0], columns[:, 15:16])  # the memory is handed on
    assert seen[3][2] is None  # and reset when the columns wrap around


def test_charlm_records_bits_per_character_and_a_missing_file(tmp_path):
    from bench.harness import run_job

    record = run_job(compose(*CHARLM, "bench.steps=10", "bench.eval_every=10"), output_dir=tmp_path)
    assert record["status"] == "ok" and validate(record) == [] and record["metric"] == "test_bpc"
    assert 0 < record["value"] < 8.5 and record["data"]["corpus"].startswith("pydoc_data.topics")
    missing = run_job(compose(*CHARLM, f"task.data_path={tmp_path}/enwik8"), output_dir=tmp_path)
    assert (
        missing["status"] == "error" and f"{tmp_path}/enwik8 does not exist: expected a raw byte" in missing["reason"]
    )
