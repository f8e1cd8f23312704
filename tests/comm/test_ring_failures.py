"""What the ring does when ranks disagree, are absent or die: every rank raises an error that
names the cause within twice the timeout, and nothing is left in /dev/shm."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

from fastpar.comm import CommClosedError, CommMismatchError, CommTimeoutError, RingAllReduce
from fastpar.testing.distributed import run_multiprocess
from tests.comm.util import shm_segments

R = dist.ReduceOp
TIMEOUT_S = 2.0


def _mismatches(rank: int, world_size: int) -> list[str]:
    messages = []
    with RingAllReduce(chunk_bytes=4096, slots=3) as ring:
        calls = [
            (torch.ones(10 + (rank == 1)), R.SUM),  # size
            (torch.ones(10, dtype=torch.float64 if rank == 2 else torch.float32), R.SUM),
            (torch.ones(10), R.MAX if rank == 0 else R.SUM),  # op
            (torch.ones(0 if rank == 1 else 70000), R.SUM),  # empty vs several chunks
        ]
        for tensor, op in calls:
            before = tensor.clone()
            with pytest.raises(CommMismatchError) as error:
                ring.all_reduce(tensor, op)
            assert torch.equal(tensor, before), "a refused call must not touch the tensor"
            messages.append(str(error.value))
        # The ring is still in step afterwards.
        tensor = torch.full((5000,), float(rank + 1))
        ring.all_reduce(tensor)
        assert torch.equal(tensor, torch.full((5000,), float(sum(range(1, world_size + 1)))))
    return messages


def test_mismatched_calls_raise_on_every_rank_naming_them() -> None:
    results = run_multiprocess(_mismatches, 3, timeout=60)
    assert results[0] == results[1] == results[2]  # every rank says the same
    size, dtype, op, empty = results[0]
    assert "rank 0: 10 x float32 SUM; rank 1: 11 x float32 SUM; rank 2: 10 x float32 SUM" in size
    assert "rank 2: 10 x float64 SUM" in dtype
    assert "rank 0: 10 x float32 MAX; rank 1: 10 x float32 SUM" in op
    assert "rank 1: 0 x float32 SUM" in empty


def _absent_peer(
    rank: int, world_size: int, timeout_s: float
) -> tuple[float, str, str, int] | None:
    store = dist.distributed_c10d._get_default_store()
    ring = RingAllReduce(timeout=timeout_s)
    if rank == 1:  # never calls all_reduce; stays alive until rank 0 has given up
        store.wait(["absent/done"])
        ring.close()
        return None
    tensor = torch.ones(1000)
    start = time.monotonic()
    with pytest.raises(CommTimeoutError) as error:
        ring.all_reduce(tensor)
    elapsed = time.monotonic() - start
    with pytest.raises(CommClosedError) as closed:
        ring.all_reduce(tensor)
    store.set("absent/done", "1")
    ring.close()
    return elapsed, str(error.value), str(closed.value), os.getpid()


def test_a_peer_that_never_calls_times_out_naming_it() -> None:
    result = run_multiprocess(_absent_peer, 2, args=(TIMEOUT_S,), timeout=60)[0]
    elapsed, message, closed, pid = result
    assert TIMEOUT_S <= elapsed < 2 * TIMEOUT_S
    assert "rank 0 timed out after 2" in message and "waiting for rank 1" in message
    assert "unusable" in closed and "waiting for rank 1" in closed
    assert shm_segments(pid) == set()


def _killed_peer(rank: int, world_size: int, timeout_s: float) -> tuple[float, str, int]:
    with RingAllReduce(timeout=timeout_s) as ring:
        tensor = torch.ones(1 << 22)
        for _ in range(3):
            ring.all_reduce(tensor)  # the ring works, then one rank dies inside a call
        if rank == 2:
            work = ring.all_reduce(tensor, async_op=True)
            os.kill(os.getpid(), signal.SIGKILL)
            work.wait()  # not reached
        start = time.monotonic()
        with pytest.raises(CommTimeoutError) as error:
            ring.all_reduce(tensor)
        return time.monotonic() - start, str(error.value), os.getpid()


def test_a_killed_peer_makes_the_others_raise_naming_it() -> None:
    results = run_multiprocess(_killed_peer, 3, args=(TIMEOUT_S,), timeout=60, may_die=(2,))
    assert results[2] is None
    for elapsed, message, _ in results[:2]:
        assert elapsed < 2 * TIMEOUT_S, message
        assert "rank 2" in message, message
    assert shm_segments(results[0][2]) == set()


def _absent_peer_async(rank: int, world_size: int, timeout_s: float) -> str | None:
    store = dist.distributed_c10d._get_default_store()
    ring = RingAllReduce(timeout=timeout_s)
    if rank == 1:  # never calls all_reduce
        store.wait(["absent-async/done"])
        ring.close()
        return None
    work = ring.all_reduce(torch.ones(1000), async_op=True)  # returns at once
    with pytest.raises(CommTimeoutError) as error:
        work.wait()
    assert work.is_completed() and not work.is_success()
    store.set("absent-async/done", "1")
    ring.close()
    return str(error.value)


def test_an_async_calls_error_is_raised_by_wait_naming_the_peer() -> None:
    message = run_multiprocess(_absent_peer_async, 2, args=(TIMEOUT_S,), timeout=60)[0]
    assert "waiting for rank 1" in message


def _absent_at_creation(rank: int, world_size: int, timeout_s: float) -> tuple[float, str, int]:
    store = dist.distributed_c10d._get_default_store()
    if rank == 1:  # never creates its RingAllReduce
        store.wait(["creation/done"])
        return 0.0, "", os.getpid()
    start = time.monotonic()
    with pytest.raises(CommTimeoutError) as error:
        RingAllReduce(timeout=timeout_s)
    store.set("creation/done", "1")
    return time.monotonic() - start, str(error.value), os.getpid()


def test_a_peer_that_never_creates_the_ring_times_out_naming_it() -> None:
    result = run_multiprocess(_absent_at_creation, 2, args=(TIMEOUT_S,), timeout=60)[0]
    elapsed, message, pid = result
    assert TIMEOUT_S <= elapsed < 2 * TIMEOUT_S
    assert "waiting for rank(s) [1]" in message
    assert shm_segments(pid) == set()


def _closed(rank: int, world_size: int) -> int:
    ring = RingAllReduce()
    tensor = torch.ones(4)
    ring.all_reduce(tensor)
    ring.close()
    ring.close()  # idempotent
    assert ring.closed and not ring.should_use(tensor)
    with pytest.raises(CommClosedError, match="closed"):
        ring.all_reduce(tensor)
    assert torch.equal(tensor, torch.full((4,), float(world_size)))
    return os.getpid()


def test_a_closed_ring_refuses_calls() -> None:
    pid = run_multiprocess(_closed, 2, timeout=60)[0]
    assert shm_segments(pid) == set()
