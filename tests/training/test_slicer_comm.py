"""`fastpar train`'s dynamic slicer statistics: all-reduced by the run's --comm choice (fastpar's
ring on one host unless --comm torch), with the same decisions either way."""

from __future__ import annotations

import random

import torch.distributed as dist

from fastpar.data import DynamicSlicer
from fastpar.testing.distributed import run_multiprocess
from fastpar.training.loop import _record_slicer_step

STEPS = 12


def _slicer() -> DynamicSlicer:
    return DynamicSlicer(10_000, min_size=1, max_size=63, global_batch=64)


def _record_both_ways(rank: int, world_size: int) -> list[tuple]:
    calls = []
    original = dist.all_reduce

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(args)
        return original(*args, **kwargs)

    dist.all_reduce = counted  # what --comm auto must not call
    rng = random.Random(rank)  # each rank its own speed and noise
    speed = 1.0 + rank
    ring, torch_way = _slicer(), _slicer()
    decided = []
    for step in range(STEPS):
        samples = len(ring.next_step()[rank])
        assert samples == len(torch_way.next_step()[rank])
        seconds = speed * (0.01 + 0.001 * samples) * rng.uniform(0.95, 1.05)
        loss = rng.uniform(1.0, 2.0)
        before = len(calls)
        _record_slicer_step(ring, "auto", samples, seconds, loss)
        assert len(calls) == before, f"step {step}: --comm auto went through torch.distributed"
        _record_slicer_step(torch_way, "torch", samples, seconds, loss)
        assert len(calls) == before + 1
        assert ring.last_stats == torch_way.last_stats
        decided.append(ring.last_stats.sizes)
    return decided


def test_slicer_statistics_follow_the_comm_choice_with_the_same_decisions() -> None:
    decided = run_multiprocess(_record_both_ways, 2, timeout=120)
    assert decided[0] == decided[1]
    assert decided[0][-1][0] > decided[0][-1][1]  # rank 1 is twice as slow: it gets less
