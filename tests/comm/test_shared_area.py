"""Tensors in the ring's shared areas (`empty_shared`): reduced without copies, with exactly the
results of gloo and of the copying path (bitwise, every dtype and op, any offset and size), and
the same checks and failures as every other call: different allocations or places raise on
every rank, a dead peer is named, nothing is left in /dev/shm."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import fastpar.comm.shared_area as shared_area
from fastpar.comm import (
    CommMismatchError,
    CommTimeoutError,
    RingAllReduce,
    SharedMemoryUnavailableError,
    all_reduce,
    empty_shared,
)
from fastpar.comm.api import close_rings
from fastpar.comm.reduce import SUPPORTED_DTYPES
from fastpar.testing.distributed import run_multiprocess
from tests.comm import util
from tests.comm.killed import KILLED, check_killed_rank_named, killed_mid_call
from tests.comm.util import every_call, expect_gloo, fold_in_rank_order, integer_valued, places

R = dist.ReduceOp
# With SMALL_RING (4 KiB chunks) calls of 8 chunks (32 KiB) or more are reduced in place.
AREA_ELEMENTS = 300_007


def _areas(pid: int) -> set[str]:
    return {path.name for path in Path("/dev/shm").glob(f"fastpar-area-{pid}-*")}


def _places(generator: torch.Generator) -> list[tuple[int, int]]:
    """At the start, at odd offsets, the whole area, none of it; sizes below, at and above a
    chunk, never a multiple of it."""
    fixed = [(0, 0), (0, 1), (3, 7), (5, 1009), (0, 4099), (1, 65537), (0, AREA_ELEMENTS)]
    return places(generator, fixed, area=AREA_ELEMENTS, drawn=3)


def _in_area_every_dtype_and_op(rank: int, world_size: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed + rank)
    places = _places(torch.Generator().manual_seed(seed))  # the same on every rank
    with RingAllReduce(**util.SMALL_RING) as ring:
        areas = {dtype: ring.empty_shared(AREA_ELEMENTS, dtype=dtype) for dtype in SUPPORTED_DTYPES}
        for dtype, op, (offset, size) in every_call(places):
            area = areas[dtype]
            area.copy_(integer_valued(AREA_ELEMENTS, dtype, op, generator))
            outside = area.clone()
            tensor = area[offset : offset + size]
            copy = tensor.clone()  # ordinary memory: the copying path
            expected = expect_gloo(tensor, op, world_size)
            ring.all_reduce(tensor, op)
            ring.all_reduce(copy, op)
            where = f"seed {seed}: {size} x {dtype} {op} at {offset}"
            assert torch.equal(tensor, expected), f"{where} differs from gloo"
            assert torch.equal(tensor.view(torch.uint8), copy.view(torch.uint8)), where
            outside[offset : offset + size] = tensor
            assert torch.equal(area, outside), f"{where}: elements outside it changed"


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_dtype_and_op_equals_gloo_and_the_copying_path(world_size: int) -> None:
    run_multiprocess(_in_area_every_dtype_and_op, world_size, args=(util.SEED,), timeout=240)


def _random_floats(rank: int, world_size: int, seed: int) -> list[bytes]:
    generator = torch.Generator().manual_seed(seed + rank)
    out = []
    with RingAllReduce(**util.SMALL_RING) as ring:
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            area = ring.empty_shared(20011, dtype=dtype)
            for op in (R.SUM, R.AVG, R.PRODUCT, R.MAX):
                area.copy_(torch.randn(20011, generator=generator).to(dtype))
                tensor = area[11:]
                gathered = [torch.empty_like(tensor) for _ in range(world_size)]
                dist.all_gather(gathered, tensor)
                copy = tensor.clone()
                ring.all_reduce(tensor, op)
                ring.all_reduce(copy, op)
                assert torch.equal(tensor, fold_in_rank_order(gathered, op)), f"{dtype} {op}"
                assert torch.equal(tensor.view(torch.uint8), copy.view(torch.uint8))
                out.append(tensor.view(torch.uint8).numpy().tobytes())
    return out


def test_random_floats_are_the_rank_order_fold_bitwise_on_every_rank() -> None:
    results = run_multiprocess(_random_floats, 3, args=(util.SEED,), timeout=120)
    assert results[1] == results[0] and results[2] == results[0]


def _rewritten_at_once(rank: int, world_size: int, seed: int) -> int:
    """Each call's inputs are written the moment the previous call returns: a rank that
    returned while a peer still read its area would corrupt that peer's result."""
    generator = torch.Generator().manual_seed(seed + rank)
    sizes = torch.Generator().manual_seed(seed)
    calls = []
    for _ in range(60):
        size = int(torch.randint(1, 70000, (1,), generator=sizes))
        tensor = integer_valued(size, torch.int64, R.SUM, generator)
        calls.append((tensor, expect_gloo(tensor, R.SUM, world_size)))
    with RingAllReduce(**util.SMALL_RING) as ring:
        area = ring.empty_shared(70000, dtype=torch.int64)
        for index, (tensor, expected) in enumerate(calls):
            target = area[: tensor.numel()]
            target.copy_(tensor)
            ring.all_reduce(target)
            assert torch.equal(target, expected), f"seed {seed}: call {index}"
    return len(calls)


def test_inputs_written_right_after_return_do_not_reach_peers() -> None:
    assert run_multiprocess(_rewritten_at_once, 3, args=(util.SEED,), timeout=120) == [60] * 3


def _default_ring(rank: int, world_size: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed + rank)
    # Through fastpar.comm's own ring: 256 KiB chunks, one-shot calls up to 128 KiB.
    area = empty_shared(3 << 20, dtype=torch.float32)
    for size in (100, 16 * 1024, 32 * 1024 + 1, 3 << 20):
        tensor = area[:size]
        tensor.copy_(integer_valued(size, torch.float32, R.SUM, generator))
        expected = expect_gloo(tensor, R.AVG, world_size)
        all_reduce(tensor, R.AVG)
        assert torch.equal(tensor, expected), f"seed {seed}: {size}"
    close_rings()


def test_empty_shared_of_the_default_group() -> None:
    run_multiprocess(_default_ring, 2, args=(util.SEED,), timeout=120)


def _mismatches(rank: int, world_size: int) -> tuple[str, str, str, int]:
    with RingAllReduce(**util.SMALL_RING) as ring:
        with pytest.raises(CommMismatchError) as allocation:
            ring.empty_shared(1000 + rank)  # a different size (an allocation out of order)
        area = ring.empty_shared(10000)
        area.fill_(1)
        with pytest.raises(CommMismatchError) as place:
            ring.all_reduce(area[rank : rank + 5000])  # the same size at different offsets
        ordinary = torch.ones(5000)
        with pytest.raises(CommMismatchError) as kind:
            ring.all_reduce(area[:5000] if rank == 0 else ordinary)
        # Still usable and in step.
        ring.all_reduce(area)
        assert torch.equal(area, torch.full((10000,), float(world_size)))
        return str(allocation.value), str(place.value), str(kind.value), os.getpid()


def test_different_allocations_or_places_raise_on_every_rank() -> None:
    results = run_multiprocess(_mismatches, 2, timeout=60)
    assert results[0][:3] == results[1][:3]  # every rank says the same
    allocation, place, kind, pid = results[0]
    assert "rank 0: 1000 x float32; rank 1: 1001 x float32" in allocation
    assert "rank 0: 5000 x float32 SUM in shared area 0 at byte 0" in place
    assert "rank 1: 5000 x float32 SUM in shared area 0 at byte 4" in place
    assert "rank 1: 5000 x float32 SUM;" in kind or kind.endswith("rank 1: 5000 x float32 SUM)")
    assert _areas(pid) == set()


def _full_dev_shm(rank: int, world_size: int) -> str:
    if rank == 1:
        shared_area._free_bytes = lambda directory: 1 << 20  # 1 MiB free here
    with RingAllReduce(**util.SMALL_RING) as ring:
        with pytest.raises(SharedMemoryUnavailableError) as error:
            ring.empty_shared(1 << 20)  # 4 MiB
        small = ring.empty_shared(1000)  # still in step: the next allocation works
        small.fill_(2)
        ring.all_reduce(small)
        assert torch.equal(small, torch.full((1000,), 4.0))
        return str(error.value)


def test_a_full_dev_shm_raises_on_every_rank_saying_how_full() -> None:
    messages = run_multiprocess(_full_dev_shm, 2, timeout=60)
    assert messages[0] == messages[1]
    assert "rank 1 could not allocate shared memory" in messages[0]
    assert "1.0 MiB free" in messages[0] and "needs 4.0 MiB" in messages[0]


def test_a_killed_peer_is_named_within_two_seconds() -> None:
    results = run_multiprocess(
        killed_mid_call, 3, args=("cpu", True), timeout=90, may_die=(KILLED,)
    )
    check_killed_rank_named(results)


def _world_of_one(rank: int, world_size: int) -> None:
    with RingAllReduce() as ring:
        tensor = ring.empty_shared(10, dtype=torch.int32)
        tensor.copy_(torch.arange(10))
        ring.all_reduce(tensor)
        assert torch.equal(tensor, torch.arange(10, dtype=torch.int32))


def test_world_of_one() -> None:
    run_multiprocess(_world_of_one, 1, timeout=60)


def _allocates_alone(rank: int, world_size: int) -> str:
    store = dist.distributed_c10d._get_default_store()
    message = ""
    if rank == 0:
        with pytest.raises(CommTimeoutError) as info:
            shared_area.allocate_symmetric(
                store, "test-area", dist.group.WORLD, numel=16, dtype=torch.float32,
                timeout=timedelta(seconds=0.1),
            )  # fmt: skip
        message = str(info.value)
        store.set("test/alone/done", "1")
    else:
        store.wait(["test/alone/done"], timedelta(seconds=30))
    return message


def test_a_peer_that_never_allocates_is_named_with_what_was_being_done() -> None:
    """empty_shared's store waits said "while creating a RingAllReduce" (it allocates)."""
    message, _ = run_multiprocess(_allocates_alone, 2, timeout=60)
    assert message.startswith(
        "rank 0 timed out after 0.1 s waiting for rank(s) [1] to allocate its shared area "
        "while allocating shared memory (empty_shared)"
    ), message
