"""Multi-process tests: `run_multiprocess(fn, world_size)` runs `fn(rank, world_size, *args)` on
N CPU ranks (gloo) with a bounded time; see `fastpar.launch.spawn_ranks`. The ranks are forked
from a server that imported torch, fastpar and pytest once, so a test's ranks start in a
fraction of a second instead of seconds each."""

from __future__ import annotations

import functools

from fastpar.launch import RankFailure, spawn_ranks

__all__ = ["RankFailure", "run_multiprocess"]

run_multiprocess = functools.partial(spawn_ranks, start_method="forkserver")
