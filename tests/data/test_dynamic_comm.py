"""`DynamicSlicer(comm=...)`: on a CPU group "auto" all-reduces the statistics through fastpar's
all-reduce (the shared-memory ring on one host) and "torch" through torch.distributed, with the
same decisions either way; `fastpar train --comm` picks it."""

from __future__ import annotations

import random

import pytest
import torch.distributed as dist

from fastpar.data import DynamicSlicer
from fastpar.testing.distributed import run_multiprocess
from fastpar.training.batches import Batches
from fastpar.training.config import TrainConfig
from fastpar.training.parallel_dims import ParallelDims, RankPlace

STEPS = 12


def _slicer(comm: str) -> DynamicSlicer:
    return DynamicSlicer(10_000, min_size=1, max_size=63, global_batch=64, comm=comm)


def _record_both_ways(rank: int, world_size: int) -> list[tuple]:
    calls = []
    original = dist.all_reduce

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(args)
        return original(*args, **kwargs)

    dist.all_reduce = counted  # what comm="auto" must not call on a CPU group
    rng = random.Random(rank)  # each rank its own speed and noise
    speed = 1.0 + rank
    ring, torch_way = _slicer("auto"), _slicer("torch")
    decided = []
    for step in range(STEPS):
        samples = len(ring.next_step()[rank])
        assert samples == len(torch_way.next_step()[rank])
        seconds = speed * (0.01 + 0.001 * samples) * rng.uniform(0.95, 1.05)
        loss = rng.uniform(1.0, 2.0)
        before = len(calls)
        ring.record_step(samples, seconds, loss)
        assert len(calls) == before, f"step {step}: comm='auto' went through torch.distributed"
        torch_way.record_step(samples, seconds, loss)
        assert len(calls) == before + 1
        assert ring.last_stats == torch_way.last_stats
        decided.append(ring.last_stats.sizes)
    return decided


def test_the_statistics_follow_the_comm_choice_with_the_same_decisions() -> None:
    decided = run_multiprocess(_record_both_ways, 2, timeout=120)
    assert decided[0] == decided[1]
    assert decided[0][-1][0] > decided[0][-1][1]  # rank 1 is twice as slow: it gets less


def test_a_bad_comm_is_named() -> None:
    with pytest.raises(ValueError, match="comm must be one of"):
        DynamicSlicer(100, min_size=1, max_size=4, comm="ring")


@pytest.mark.parametrize(("run_comm", "slicer_comm"),
                         [("auto", "auto"), ("ring", "auto"), ("torch", "torch")])  # fmt: skip
def test_fastpar_train_passes_its_comm_to_the_slicer(run_comm: str, slicer_comm: str) -> None:
    config = TrainConfig(batch_size=8, slicing="throughput", comm=run_comm)
    dims = ParallelDims(dp=2, pp=1, world_size=2)
    place = RankPlace(dims=dims, rank=0, replica=0, stage=0, dp_group=None, pp_group=None)
    assert Batches(config, place, 1000).dynamic.comm == slicer_comm
