"""`fastpar.comm.all_reduce` with torch.distributed's semantics: groups, async handles, and the
calls the ring hands to torch.distributed (logged once)."""

from __future__ import annotations

import datetime
import logging
import os
import random

import pytest
import torch
import torch.distributed as dist

import fastpar.comm as comm
from fastpar.testing.distributed import run_multiprocess
from tests.comm.util import integer_valued, shm_segments

R = dist.ReduceOp
SEED = random.randrange(2**31)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _module_api(rank: int, world_size: int, seed: int) -> tuple[list[str], int]:
    records = _Records()
    logging.getLogger("fastpar.comm.ring").addHandler(records)
    logging.getLogger("fastpar.comm.ring").setLevel(logging.INFO)
    generator = torch.Generator().manual_seed(seed + rank)

    def check(tensor: torch.Tensor, op: R = R.SUM, async_op: bool = False) -> None:
        expected = tensor.clone()
        dist.all_reduce(expected, op=op)
        result = comm.all_reduce(tensor, op=op, async_op=async_op)
        if async_op:
            assert result is not None and result.wait()
        else:
            assert result is None
        assert torch.equal(tensor, expected), (seed, tensor.dtype, op)

    check(integer_valued(3001, torch.float32, R.SUM, generator))
    check(integer_valued(3001, torch.bfloat16, R.MIN, generator), R.MIN, async_op=True)
    # Not handled by the ring: go to gloo, each reason logged once.
    for _ in range(3):
        check(torch.randint(-9, 9, (100,), generator=generator, dtype=torch.int8))
        check(torch.randint(0, 1 << 20, (100,), generator=generator), R.BAND)
    ring = comm.api._rings[(dist.group.WORLD, torch.device("cpu"))]
    assert ring.should_use(torch.ones(3)) and not ring.should_use(torch.ones(3, dtype=torch.int8))
    assert not ring.should_use(torch.ones(3, dtype=torch.int64), R.BXOR)
    # Bad arguments name themselves.
    with pytest.raises(TypeError, match=r"tensor must be a torch\.Tensor, got list"):
        comm.all_reduce([1.0, 2.0])
    with pytest.raises(ValueError, match="op AVG needs a floating-point tensor"):
        comm.all_reduce(torch.ones(3, dtype=torch.int32), R.AVG)
    comm.close_rings()
    return records.messages, os.getpid()


def test_module_all_reduce_and_its_fallbacks() -> None:
    messages, pid = run_multiprocess(_module_api, 2, args=(SEED,), timeout=60)[0]
    fallbacks = [m for m in messages if "goes to torch.distributed" in m]
    assert len(fallbacks) == 2, messages  # once per reason, not once per call
    assert "dtype torch.int8" in fallbacks[0]
    assert "op RedOpType.BAND" in fallbacks[1]
    assert shm_segments(pid) == set()


def _subgroup(rank: int, world_size: int, seed: int) -> list[float]:
    group = dist.new_group([0, 2])
    tensor = torch.full((7,), float(rank + 1))
    result = comm.all_reduce(tensor, group=group)  # rank 1 is not a member: a no-op
    assert result is None
    if rank == 1:  # collectives a non-member cannot take part in: named, not KeyError: -1
        not_a_member = (
            r"^group: this process \(global rank 1 of 3\) is not one of the group's members; "
            r"call this only on its members$"
        )
        with pytest.raises(ValueError, match=not_a_member):
            comm.empty_shared(3, group=group)
        with pytest.raises(ValueError, match=not_a_member):
            comm.create_all_reduce(group)
        with pytest.raises(ValueError, match=not_a_member):
            comm.RingAllReduce(group)
        with pytest.raises(ValueError, match=not_a_member):
            comm.HierarchicalAllReduce(group)
    with comm.RingAllReduce(group) if rank != 1 else _nothing() as ring:
        if ring is not None:
            other = torch.full((2,), float(rank))
            with pytest.raises(ValueError, match="group must be None or the group"):
                ring.all_reduce(other, group=dist.group.WORLD)
    comm.close_rings()
    return tensor.tolist()


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: object) -> None:
        return None


def test_a_subgroup_reduces_over_its_members_only() -> None:
    results = run_multiprocess(_subgroup, 3, args=(SEED,), timeout=60)
    assert results == [[4.0] * 7, [2.0] * 7, [4.0] * 7]


def test_op_codes_and_what_falls_back() -> None:
    from fastpar.comm.ops import ring_op_code, unsupported_reason

    assert [ring_op_code(op) for op in (R.SUM, R.PRODUCT, R.MIN, R.MAX, R.AVG)] == [0, 1, 2, 3, 4]
    assert ring_op_code(dist.ReduceOp(R.MAX)) == 3  # an instance, not the enum value
    assert ring_op_code("avg") == 4
    for op in (R.BAND, R.BOR, R.BXOR, R.PREMUL_SUM, "mean", [1]):
        assert ring_op_code(op) is None
    assert unsupported_reason(torch.float16, 0, R.SUM) is None
    assert "dtype torch.uint8" in str(unsupported_reason(torch.uint8, 0, R.SUM))
    assert "op RedOpType.BOR" in str(unsupported_reason(torch.int32, None, R.BOR))


def _timeouts(rank: int, world_size: int) -> tuple[list[float], str]:
    world = comm.api._ring_for(dist.group.WORLD, torch.device("cpu"))
    short = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=2))
    seconds = [
        world.timeout.total_seconds(),
        comm.RingAllReduce(short, timeout=1.5).timeout.total_seconds(),
    ]
    store = dist.distributed_c10d._get_default_store()
    message = ""
    if rank == 0:  # rank 1 never calls: the subgroup's own 2 s bound the wait
        with pytest.raises(comm.CommTimeoutError) as error:
            comm.all_reduce(torch.ones(10), group=short)
        seconds.append(comm.api._rings[(short, torch.device("cpu"))].timeout.total_seconds())
        message = str(error.value)
        store.set("timeouts/done", "1")
    else:
        comm.api._ring_for(short, torch.device("cpu"))  # creation is collective
        store.wait(["timeouts/done"])
    comm.close_rings()
    return seconds, message


def test_rings_take_their_groups_timeout() -> None:
    results = run_multiprocess(_timeouts, 2, timeout=60, group_timeout=7)
    assert results[0][0] == [7.0, 1.5, 2.0]
    assert results[1][0] == [7.0, 1.5]
    assert "rank 0 timed out after 2" in results[0][1] and "waiting for rank 1" in results[0][1]


def _wait_with_a_timeout(rank: int, world_size: int) -> tuple[str, list[float]]:
    """torch's Work.wait(timeout): a wait that runs out leaves the call running, and says so."""
    ring = comm.create_all_reduce(dist.group.WORLD)
    store = dist.distributed_c10d._get_default_store()
    tensor = torch.full((4,), float(rank + 1))
    message = ""
    if rank == 0:
        work = ring.all_reduce(tensor, async_op=True)
        with pytest.raises(TimeoutError) as error:  # rank 1 calls only once told to
            work.wait(datetime.timedelta(milliseconds=50))
        message = str(error.value)
        store.set("wait_timeout/late", "1")
        work.wait()
    else:
        store.wait(["wait_timeout/late"])
        ring.all_reduce(tensor)
    ring.close()
    return message, tensor.tolist()


def test_a_wait_that_runs_out_says_the_call_goes_on() -> None:
    results = run_multiprocess(_wait_with_a_timeout, 2, timeout=60)
    assert results[0][0].startswith("the all-reduce was still running after wait(timeout=0.05 s)")
    assert results[0][1] == results[1][1] == [3.0] * 4
