"""Rank functions for tests/test_launch_start.py, in a module of their own: a rank imports it
when it starts (it is not preloaded), so what it reads at import time shows which environment
the rank had then."""

from __future__ import annotations

import os
import time

IMPORTED_WITH = os.environ.get("FASTPAR_LAUNCH_PROBE")


def environment(rank: int, world_size: int) -> tuple[str | None, str | None, str | None, str]:
    """(the probe variable when this module was imported, now, a removed variable, RANK)."""
    current = os.environ.get("FASTPAR_LAUNCH_PROBE")
    return IMPORTED_WITH, current, os.environ.get("FASTPAR_LAUNCH_REMOVED"), os.environ["RANK"]


def sleep_then_report(rank: int, world_size: int, pid_file: str) -> None:
    """Write this rank's pid to `pid_file`.<rank>, then sleep far past any test's patience."""
    with open(f"{pid_file}.{rank}", "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)


def intra_op_threads(rank: int, world_size: int) -> int:
    """The rank's torch intra-op thread count."""
    import torch

    return torch.get_num_threads()
