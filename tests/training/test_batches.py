"""The data position of fixed slicing across layouts, and the layout object's checks (in this
process: each replica's `Batches` is built with its place, no process group needed)."""

from __future__ import annotations

import json

import pytest

from fastpar.training.batches import Batches, PositionError
from fastpar.training.config import TrainConfig
from fastpar.training.parallel_dims import ParallelDims, RankPlace

NUM_SAMPLES = 103  # 25 blocks of 4, 3 samples dropped per epoch
CONFIG = TrainConfig(batch_size=4, seed=5)


def _replicas(dp: int, config: TrainConfig = CONFIG) -> list[Batches]:
    dims = ParallelDims(dp=dp, pp=1, world_size=dp)
    return [
        Batches(
            config,
            RankPlace(dims=dims, rank=r, replica=r, stage=0, dp_group=None, pp_group=None),
            NUM_SAMPLES,
        )
        for r in range(dp)
    ]


def _step(replicas: list[Batches]) -> list[int]:
    taken = []
    for batches in replicas:
        indices, global_samples = batches.next()
        assert global_samples == len(replicas) * CONFIG.batch_size
        taken += indices
    return taken


@pytest.mark.parametrize(("old", "new"), [(2, 1), (2, 3), (3, 2), (4, 2)])
def test_fixed_slicing_goes_on_at_the_same_sample_on_another_layout(old: int, new: int) -> None:
    before = _replicas(old)
    seen = [i for _ in range(3) for i in _step(before)]
    state = json.loads(json.dumps(before[0].state_dict()))
    assert state == {"slicing": "fixed", "seed": 5, "epoch": 0, "samples_consumed": 12 * old}
    after = _replicas(new)
    for batches in after:
        batches.load_state_dict(state)
    while after[0].epoch == 0 and after[0].consumed + new * 4 <= 25 * 4:
        seen += _step(after)
    assert len(seen) == len(set(seen))  # no sample twice in the epoch
    assert len(seen) > 100 - new * 4  # and only the blocks that do not fill a step are left
    _step(after)
    assert after[0].epoch == 1


def test_the_same_layout_resumes_the_same_samples() -> None:
    whole = _replicas(2)
    expected = [_step(whole) for _ in range(20)]  # crosses the end of epoch 0 (12 steps)
    first = _replicas(2)
    got = [_step(first) for _ in range(7)]
    second = _replicas(2)
    for batches in second:
        batches.load_state_dict(first[0].state_dict())
    got += [_step(second) for _ in range(13)]
    assert got == expected


def test_a_position_of_another_seed_or_batch_size_is_refused() -> None:
    state = _replicas(1)[0].state_dict() | {"samples_consumed": 6}
    (batches,) = _replicas(1)
    with pytest.raises(PositionError, match=r"not a whole number of blocks of --batch-size 4"):
        batches.load_state_dict(state)
    with pytest.raises(PositionError, match=r"written with --seed 7"):
        batches.load_state_dict(state | {"seed": 7})
    with pytest.raises(PositionError, match=r"written with --slicing loss"):
        batches.load_state_dict({"slicing": "loss"})


def test_parallel_dims_show_the_numbers() -> None:
    with pytest.raises(ValueError, match=r"world_size 6 != dp 4 \* pp 2"):
        ParallelDims(dp=4, pp=2, world_size=6)
    with pytest.raises(TypeError, match=r"dp must be an integer, got bool True"):
        ParallelDims(dp=True, pp=1, world_size=1)
    dims = ParallelDims(dp=3, pp=2, world_size=6)
    assert dims.coordinates(5) == (2, 1)
    assert dims.pipeline_ranks(1) == [2, 3] and dims.replica_ranks(1) == [1, 3, 5]
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, 5\], got 6"):
        dims.coordinates(6)
    assert TrainConfig(parallel="dp+pp", pp_stages=2).layout(6) == dims


@pytest.mark.parametrize("slicing", ["throughput", "loss"])
def test_dynamic_slicing_goes_on_at_the_same_sample_on_another_layout(slicing: str) -> None:
    config = TrainConfig(batch_size=4, seed=5, slicing=slicing)  # type: ignore[arg-type]
    (two,) = _replicas(2, config)[:1]  # one process plays both replicas (no group)
    assert two.dynamic is not None
    seen = []
    for _ in range(3):
        blocks = two.dynamic.next_step()
        seen += [i for block in blocks for i in block]
        two.dynamic.record_all([len(b) for b in blocks], [0.01 * (r + 1) for r in range(2)],
                               [1.0, 1.0])  # fmt: skip
    state = json.loads(json.dumps(two.state_dict()))
    (one,) = _replicas(1, config)
    one.load_state_dict(state)
    assert one.dynamic is not None and one.dynamic.position == len(seen)
    while one.dynamic.epoch == 0 and one.dynamic.position < NUM_SAMPLES:
        indices, global_samples = one.next()
        assert global_samples == len(indices)
        seen += indices
    assert sorted(seen) == list(range(NUM_SAMPLES))  # the epoch, each sample once
    with pytest.raises(PositionError, match=r"written with --slicing"):
        _replicas(1)[0].load_state_dict(state)
