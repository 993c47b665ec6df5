"""Byte-level language modelling (efficient/datasets/charlm.py, bench/tasks/charlm.py): the byte
loader, the default corpus, stream training with memory, and bits per character recorded."""

import pytest
import torch
from conftest import compose
from presets import CHARLM

from bench.records import validate
from bench.tasks.data import StreamData
from efficient.datasets import charlm


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
