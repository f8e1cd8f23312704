"""DynamicSlicer: the last step of an epoch, when fewer samples remain than a full step. A rank
gets an empty block only when fewer samples than ranks remain, and every sample is still in
exactly one block per epoch."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from fastpar.data import DynamicSlicer, DynamicSlicerConfig


def _epoch(
    slicer: DynamicSlicer, per_sample_s: list[float], rng: random.Random
) -> list[tuple[list[int], list[list[int]]]]:
    """One epoch of steps, each with the full-step sizes it was cut from; ranks take
    per_sample_s[rank] seconds per sample (+-10 %)."""
    steps = []
    for step in slicer.steps():
        steps.append((slicer.sizes, step))
        samples = [len(block) for block in step]
        seconds = [
            0.001 + n * cost * rng.uniform(0.9, 1.1)
            for n, cost in zip(samples, per_sample_s, strict=True)
        ]
        slicer.record_all(samples, seconds, [1.0] * len(step))
    return steps


def test_a_slow_rank_keeps_a_sample_in_the_last_step_of_every_epoch() -> None:
    # Rank 0 is ten times slower: the split of 32 moves towards [3, 29], and the 3 samples left
    # after one step of 35 shared in proportion to it give rank 0 less than one sample.
    slicer = DynamicSlicer(35, world_size=2, min_size=2, max_size=30, global_batch=32)
    rng = random.Random(0)
    skewed = 0
    for epoch in range(8):
        steps = _epoch(slicer, [0.01, 0.001], rng)
        sizes, last = steps[-1]
        remaining = sum(len(block) for block in last)
        assert remaining >= slicer.world_size
        skewed += min(sizes) * remaining < sum(sizes)  # a proportional share below one sample
        assert all(len(block) >= 1 for block in last), (epoch, sizes, last)
        seen = sorted(i for _, step in steps for block in step for i in block)
        assert seen == list(range(35))
    assert skewed >= 5  # the case the lower bound is for did come up


@st.composite
def _runs(draw: st.DrawFn) -> tuple[DynamicSlicer, list[float]]:
    world_size = draw(st.integers(1, 5))
    min_size = draw(st.integers(1, 6))
    max_size = min_size + draw(st.integers(0, 30))
    if draw(st.booleans()):
        policy: dict[str, object] = {
            "policy": "throughput",
            "global_batch": draw(st.integers(world_size * min_size, world_size * max_size)),
        }
    else:
        policy = {"policy": "loss", "growth": draw(st.floats(1.0, 2.0))}
    config = DynamicSlicerConfig(
        min_size=min_size, max_size=max_size, shuffle=draw(st.booleans()), **policy
    )
    slicer = DynamicSlicer(draw(st.integers(1, 300)), config, world_size=world_size)
    # Speeds up to 30x apart, so the last step's proportional shares can round to 0.
    per_sample_s = [draw(st.floats(0.001, 0.03)) for _ in range(world_size)]
    return slicer, per_sample_s


@settings(max_examples=60, deadline=None)
@given(run=_runs(), seed=st.integers(0, 2**31))
def test_an_empty_block_only_when_fewer_samples_than_ranks_remain(
    run: tuple[DynamicSlicer, list[float]], seed: int
) -> None:
    slicer, per_sample_s = run
    rng = random.Random(seed)
    world = slicer.world_size
    for _ in range(3):
        steps = _epoch(slicer, per_sample_s, rng)
        seen = sorted(i for _, step in steps for block in step for i in block)
        assert seen == list(range(slicer.num_samples))
        sizes, last = steps[-1]
        blocks = [len(block) for block in last]
        remaining = sum(blocks)
        if remaining == sum(sizes):
            continue  # the epoch ended with a full step
        assert all(n <= size for n, size in zip(blocks, sizes, strict=True)), (sizes, blocks)
        if remaining >= world:
            assert min(blocks) >= 1, (sizes, blocks)
        else:
            # As many blocks of one sample as there are samples: the fewest empty blocks.
            assert sorted(blocks) == [0] * (world - remaining) + [1] * remaining, blocks
