"""How a rank of `fastpar train` under torchrun leaves its process group: like a rank the
local launcher spawned, after every rank is done with it (gloo closes a rank's connections at
once, and a peer still finishing would fail with "Connection closed by peer")."""

from __future__ import annotations

import os
import time
from pathlib import Path

from fastpar.testing.distributed import run_multiprocess
from fastpar.training import cli
from fastpar.training.config import TrainConfig

LAST_RANK_WAITS_S = 2.0  # for rank 0 to be back from the run: it never should be


def _finish_as_under_torchrun(rank: int, world_size: int, checkpoints: str, done: str) -> bool:
    """Run `cli._run_under_torchrun` in a group already formed (a stand-in for torchrun's), with
    a training that ends at once on rank 0 and, on rank 1, only after waiting for rank 0 to be
    back from its run. Returns, on rank 1, whether rank 0 came back before rank 1 finished."""
    rank0_came_back: list[bool] = []

    def train(rank: int, world_size: int, config: TrainConfig, resume: object) -> None:
        if rank == 1:
            deadline = time.monotonic() + LAST_RANK_WAITS_S
            while not os.path.exists(done) and time.monotonic() < deadline:
                time.sleep(0.05)
            rank0_came_back.append(os.path.exists(done))

    cli._init_under_torchrun = lambda timeout_s: (None, 1)  # type: ignore[assignment]
    cli._prepare_under_torchrun = lambda config, restarts, store, attempt: (None, config)  # type: ignore[assignment]
    cli._train_entry = train  # type: ignore[assignment]
    assert cli._run_under_torchrun(TrainConfig(checkpoint_dir=Path(checkpoints))) == 0
    if rank == 0:
        Path(done).touch()
    return bool(rank0_came_back and rank0_came_back[0])


def test_a_rank_under_torchrun_leaves_the_group_after_every_rank(tmp_path: Path) -> None:
    done = str(tmp_path / "rank0-came-back")
    results = run_multiprocess(_finish_as_under_torchrun, 2, args=(str(tmp_path), done),
                               timeout=60)  # fmt: skip
    assert results == [False, False]
