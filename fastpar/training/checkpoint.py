"""Checkpoints written atomically: a file is written under a temporary name, flushed to disk
and renamed, and the `latest` pointer moves only once every rank's file of that step exists.

Layout: DIR/step-00000120/rank0.pt ... rankN.pt, and DIR/latest holding "step-00000120".
Each rank saves what it alone holds (its stage's weights, optimizer state, RNG states, data
position), so any parallel layout resumes with the same number of ranks.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

LATEST = "latest"


def _atomic_write(path: Path, write: Any) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def save_rank_state(root: Path, step: int, rank: int, state: dict[str, Any]) -> None:
    directory = step_dir(root, step)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / f"rank{rank}.pt", lambda f: torch.save(state, f))


def publish(root: Path, step: int, keep: int = 2) -> None:
    """Point `latest` at `step` (call once all ranks saved it) and drop all but `keep` steps."""
    _atomic_write(root / LATEST, lambda f: f.write(step_dir(root, step).name.encode()))
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_step(root: Path) -> int | None:
    pointer = root / LATEST
    if not pointer.exists():
        return None
    return int(pointer.read_text().strip().removeprefix("step-"))


def load_rank_state(root: Path, step: int, rank: int) -> dict[str, Any]:
    path = step_dir(root, step) / f"rank{rank}.pt"
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint {path} is missing: resume with the same number of ranks and the same "
            "--parallel layout as the run that wrote it"
        )
    return torch.load(path, weights_only=True)
