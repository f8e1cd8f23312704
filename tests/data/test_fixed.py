"""FixedSlicer: block sizes and contents, shuffling per epoch, shards, DataLoader use, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from fastpar.data import FixedSlicer


@st.composite
def slicer_args(draw: st.DrawFn) -> tuple[int, int]:
    num_samples = draw(st.integers(1, 300))
    return num_samples, draw(st.integers(1, num_samples))


@settings(max_examples=60, deadline=None)
@given(
    args=slicer_args(),
    drop_last=st.booleans(),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**31),
    epoch=st.integers(0, 50),
)
def test_blocks_partition_the_indices(
    args: tuple[int, int], drop_last: bool, shuffle: bool, seed: int, epoch: int
) -> None:
    n, k = args
    slicer = FixedSlicer(n, k, drop_last=drop_last, shuffle=shuffle, seed=seed)
    slicer.set_epoch(epoch)
    blocks = list(slicer)
    m, r = n // k, n % k
    expected_sizes = [m] * k if drop_last else [m + 1] * r + [m] * (k - r)
    assert len(slicer) == k
    assert [len(b) for b in blocks] == expected_sizes
    flat = [i for b in blocks for i in b]
    assert len(set(flat)) == len(flat)  # no index twice
    assert set(flat) <= set(range(n))
    assert len(flat) == (n - r if drop_last else n)
    if not shuffle:
        # Contiguous ranges in order; with drop_last the last r indices are the dropped ones.
        assert flat == list(range(len(flat)))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(20, 300), seed=st.integers(0, 2**31), epoch=st.integers(0, 50))
def test_shuffle_is_a_function_of_seed_and_epoch(n: int, seed: int, epoch: int) -> None:
    first = FixedSlicer(n, 4, shuffle=True, seed=seed)
    second = FixedSlicer(n, 4, shuffle=True, seed=seed)
    first.set_epoch(epoch)
    second.set_epoch(epoch)
    assert list(first) == list(second)
    # A permutation of n >= 20 that repeats across epochs would be a 1 in 20! accident.
    second.set_epoch(epoch + 1)
    assert list(first) != list(second)
    assert sorted(i for b in second for i in b) == list(range(n))


@settings(max_examples=60, deadline=None)
@given(args=slicer_args(), world_size=st.integers(1, 8), drop_last=st.booleans())
def test_shards_get_equal_block_counts(
    args: tuple[int, int], world_size: int, drop_last: bool
) -> None:
    n, k = args
    slicer = FixedSlicer(n, k, drop_last=drop_last)
    if drop_last and k < world_size:
        with pytest.raises(ValueError, match=rf"num_blocks \({k}\) < world_size \({world_size}\)"):
            slicer.shard(0, world_size)
        return
    shards = [list(slicer.shard(rank, world_size)) for rank in range(world_size)]
    per_rank = k // world_size if drop_last else -(-k // world_size)
    assert [len(s) for s in shards] == [per_rank] * world_size
    assert [len(slicer.shard(rank, world_size)) for rank in range(world_size)] == [per_rank] * (
        world_size
    )
    blocks = list(slicer)
    # Round-robin dealing of the (padded or cut) block list, as DistributedSampler deals samples.
    dealt = [blocks[i % k] for i in range(per_rank * world_size)]
    for rank, shard in enumerate(shards):
        assert shard == dealt[rank::world_size]
    flat = sorted(i for s in shards for b in s for i in b)
    if drop_last:
        # The last k mod W blocks are dropped; the rest are seen exactly once.
        assert flat == sorted(i for b in blocks[: per_rank * world_size] for i in b)
    else:
        assert set(flat) == set(range(n))


def test_shard_follows_the_slicer_epoch() -> None:
    slicer = FixedSlicer(40, 8, shuffle=True, seed=3)
    shard = slicer.shard(1, 2)
    shard.set_epoch(5)
    assert slicer.epoch == 5
    expected = FixedSlicer(40, 8, shuffle=True, seed=3)
    expected.set_epoch(5)
    assert list(shard) == list(expected)[1::2]


@pytest.mark.parametrize("view", ["slicer", "shard"])
def test_set_epoch_during_a_pass_applies_to_the_next_pass(view: str) -> None:
    slicer = FixedSlicer(20, 4, shuffle=True, seed=7)
    blocks = slicer if view == "slicer" else slicer.shard(0, 1)
    sampler = DistributedSampler(range(20), num_replicas=1, rank=0, shuffle=True, seed=7)
    passes, reference = iter(blocks), iter(sampler)
    started = [next(passes), next(passes)]
    # A loop that moves to the next epoch before the loader's pass is over.
    slicer.set_epoch(1)
    sampler.set_epoch(1)
    assert [i for b in started + list(passes) for i in b] == list(reference)
    assert [i for b in blocks for i in b] == list(sampler)


def test_dataloader_batch_sampler() -> None:
    n = 37
    values = torch.randn(n)
    slicer = FixedSlicer(n, 5, shuffle=True, seed=11)
    slicer.set_epoch(2)
    loader = DataLoader(TensorDataset(values), batch_sampler=slicer)
    batches = [batch for (batch,) in loader]
    assert len(loader) == 5
    for batch, indices in zip(batches, slicer, strict=True):
        torch.testing.assert_close(batch, values[indices], rtol=0, atol=0)
    shard_loader = DataLoader(TensorDataset(values), batch_sampler=slicer.shard(0, 2))
    assert len(shard_loader) == 3
    torch.testing.assert_close(
        torch.cat([b for (b,) in shard_loader]),
        values[[i for j in (0, 2, 4) for i in slicer.block(j)]],
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"num_samples": 0, "num_blocks": 1}, ValueError, r"num_samples must be an integer >= 1"),
        ({"num_samples": 10, "num_blocks": 0}, ValueError, r"num_blocks must be an integer >= 1"),
        (
            {"num_samples": 10, "num_blocks": 12},
            ValueError,
            r"num_blocks \(12\) must not exceed num_samples \(10\)",
        ),
        ({"num_samples": 10, "num_blocks": 2.0}, TypeError, r"num_blocks must be an int"),
        ({"num_samples": True, "num_blocks": 1}, TypeError, r"num_samples must be an int"),
        ({"num_samples": 10, "num_blocks": 2, "seed": -1}, ValueError, r"seed must be an integer"),
        (
            {"num_samples": 10, "num_blocks": 3, "drop_last": "false"},
            TypeError,
            r"drop_last must be a bool, got str 'false'",
        ),
        ({"num_samples": 10, "num_blocks": 3, "shuffle": 0}, TypeError, r"shuffle must be a bool"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        FixedSlicer(**kwargs)  # type: ignore[arg-type]


def test_bad_shard_and_epoch_arguments() -> None:
    slicer = FixedSlicer(10, 4)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, 2\], got 3"):
        slicer.shard(3, 3)
    with pytest.raises(ValueError, match=r"world_size must be an integer >= 1, got 0"):
        slicer.shard(0, 0)
    with pytest.raises(ValueError, match=r"epoch must be an integer >= 0, got -1"):
        slicer.set_epoch(-1)
    with pytest.raises(ValueError, match=r"index must be an integer in \[0, 3\], got 4"):
        slicer.block(4)


def test_the_largest_seed_shuffles_at_any_epoch_and_one_more_is_refused() -> None:
    """The shuffle seeds torch's generator with seed + epoch, which takes at most 2**64 - 1:
    seeds up to 2**63 - 1 leave room for any epoch; a larger one is refused naming it."""
    largest = 2**63 - 1
    slicer = FixedSlicer(10, 2, seed=largest, shuffle=True)
    slicer.set_epoch(10**12)
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(largest + 10**12))
    assert [i for block in range(2) for i in slicer.block(block)] == expected.tolist()
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 9223372036854775807\]"):
        FixedSlicer(10, 2, seed=2**63)
