"""The training text: the Python standard library's own source files, read as bytes.

Every machine with Python has them, so the job needs no download. Files are split into train
and validation by a hash of their name (about one in ten goes to validation), which is the same
on every run and every rank. Bytes are the characters: the vocabulary is the 256 byte values.
"""

from __future__ import annotations

import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB_SIZE = 256


@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor  # (N_train,) uint8
    validation: torch.Tensor  # (N_val,) uint8
    files: int


def _is_validation(name: str) -> bool:
    return zlib.crc32(name.encode()) % 10 == 0


def load_corpus(max_train_bytes: int, max_validation_bytes: int) -> Corpus:
    """Reads the standard library's top-level `*.py` files in name order.

    Arguments:
        max_train_bytes: stop adding training text past this many bytes.
        max_validation_bytes: the same for validation text.

    Returns:
        A `Corpus` of byte tensors.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if not files:
        raise RuntimeError(f"no Python sources found in {root} to train on")
    train: list[bytes] = []
    validation: list[bytes] = []
    sizes = {"train": 0, "validation": 0}
    for path in files:
        part = "validation" if _is_validation(path.name) else "train"
        limit = max_validation_bytes if part == "validation" else max_train_bytes
        if sizes[part] >= limit:
            continue
        data = path.read_bytes()[: limit - sizes[part]]
        (validation if part == "validation" else train).append(data)
        sizes[part] += len(data)
    return Corpus(
        train=torch.frombuffer(bytearray(b"".join(train)), dtype=torch.uint8),
        validation=torch.frombuffer(bytearray(b"".join(validation)), dtype=torch.uint8),
        files=len(train) + len(validation),
    )


def num_windows(text: torch.Tensor, seq_len: int) -> int:
    """How many non-overlapping windows of `seq_len` inputs (+1 target) the text holds."""
    return max(0, (text.numel() - 1) // seq_len)


def windows(
    text: torch.Tensor, indices: list[int], seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets for the windows `indices`.

    Returns:
        inputs, targets: (len(indices), seq_len) int64 tensors.
    """
    starts = torch.tensor(indices, dtype=torch.int64) * seq_len
    offsets = starts[:, None] + torch.arange(seq_len + 1)
    chunk = text[offsets].long()
    return chunk[:, :-1], chunk[:, 1:]
