"""Byte-level language modelling: bits per character on real text.

Two sources of bytes, each split into contiguous train / validation / test streams:

- ``load_bytes(path)``: a raw byte file, e.g. enwik8 (the first 10^8 bytes of an English
  Wikipedia dump, http://mattmahoney.net/dc/enwik8.zip; the raw file or the zip). The standard
  split is the first 90M bytes for training, the next 5M for validation and the last 5M for
  test: ``split_stream`` with its default percentages gives exactly that on enwik8.
- ``default_corpus()``: text that exists offline on every machine with Python: the topics of
  the Python Language Reference that CPython ships for ``help()`` (``pydoc_data.topics``),
  about 0.47 MB of English technical prose, joined in sorted topic order.

Every byte is a token (vocabulary 256), so the mean loss in bits per token is bits per
character, as enwik8 results are reported.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import torch

VOCAB_SIZE = 256
SPLIT_PERCENT = (90, 5, 5)  # enwik8: 90M / 5M / 5M bytes
ENWIK8_HINT = (
    "a raw byte file such as enwik8 (10^8 bytes; the file itself or enwik8.zip from "
    "http://mattmahoney.net/dc/enwik8.zip)"
)


def load_bytes(path: str | Path) -> bytes:
    """The bytes of a raw file, or of the single member of a zip archive (enwik8.zip)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"charlm data file {path} does not exist: expected {ENWIK8_HINT}")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            if len(members) != 1:
                raise ValueError(
                    f"{path}: expected a zip with one file ({ENWIK8_HINT}), "
                    f"found {len(members)}: {', '.join(m.filename for m in members[:5])}"
                )
            data = archive.read(members[0])
    else:
        data = path.read_bytes()
    if not data:
        raise ValueError(f"{path} is empty: expected {ENWIK8_HINT}")
    return data


def default_corpus() -> bytes:
    """The Python Language Reference topics shipped with CPython, UTF-8, sorted by topic."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics)).encode("utf-8")


def split_stream(data: bytes, percent: tuple[int, int, int] = SPLIT_PERCENT) -> dict[str, torch.Tensor]:
    """Contiguous train / val / test byte streams ([T] int64 each) in file order."""
    n_train, n_val = (len(data) * p // 100 for p in percent[:2])
    stream = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    return {"train": stream[:n_train], "val": stream[n_train : n_train + n_val], "test": stream[n_train + n_val :]}


def describe(data: bytes, source: str) -> dict:
    """What the record says about the corpus: where from, how big, and its content hash."""
    return {"corpus": source, "corpus_bytes": len(data), "corpus_sha256": hashlib.sha256(data).hexdigest()[:16]}
