"""Shared by the training tests: a small `fastpar train` run as a user starts it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SMALL = [
    "--embed", "8", "--hidden", "16", "--layers", "2", "--seq-len", "16",
    "--batch-size", "4", "--train-bytes", "40000", "--validation-bytes", "4000",
    "--validation-batches", "2", "--sample-bytes", "16", "--log-every", "2", "--lr", "0.01",
    "--timeout", "60",
]  # fmt: skip


def train_cli(tmp: Path, *args: str, env: dict[str, str] | None = None,
              timeout: float = 240) -> subprocess.CompletedProcess[str]:  # fmt: skip
    command = [sys.executable, "-m", "fastpar", "train", *SMALL, "--checkpoint-dir", str(tmp),
               *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env={**os.environ, **(env or {})}, check=False)  # fmt: skip
