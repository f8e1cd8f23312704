"""Multi-process tests: `run_multiprocess(fn, world_size)` runs `fn(rank, world_size, *args)` on
N spawned CPU ranks (gloo) with a bounded time; see `fastpar.launch.spawn_ranks`."""

from __future__ import annotations

from fastpar.launch import RankFailure, spawn_ranks

run_multiprocess = spawn_ranks

__all__ = ["RankFailure", "run_multiprocess"]
