"""What the ring does when ranks disagree, are absent or die: every rank raises an error that
names the cause within twice the timeout, and nothing is left in /dev/shm."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

from fastpar import _native
from fastpar.comm import CommClosedError, CommMismatchError, CommTimeoutError, RingAllReduce
from fastpar.testing.distributed import run_multiprocess
from tests.comm.killed import KILLED, check_killed_rank_named, killed_mid_call
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


def _late_rank(rank: int, world_size: int, timeout_s: float) -> list[str]:
    """Rank 0 calls and gives up; only then does rank 1 call, for a one-shot call (<= 64 KB)
    and a call of several chunks."""
    store = dist.distributed_c10d._get_default_store()
    messages = []
    for size in (1000, 300_000):
        with RingAllReduce(timeout=timeout_s, chunk_bytes=65536) as ring:
            tensor = torch.full((size,), float(rank + 1))
            if rank == 0:
                with pytest.raises(CommTimeoutError) as error:
                    ring.all_reduce(tensor)
                store.set(f"late/{size}/gave-up", "1")
            else:
                store.wait([f"late/{size}/gave-up"])
                with pytest.raises(CommTimeoutError) as error:
                    ring.all_reduce(tensor)  # must not succeed where rank 0 failed
            messages.append(str(error.value))
            with pytest.raises(CommClosedError):
                ring.all_reduce(tensor)
            store.set(f"late/{size}/done/{rank}", "1")
            store.wait([f"late/{size}/done/{r}" for r in range(world_size)])
    return messages


def test_a_rank_arriving_after_its_peer_gave_up_raises_too() -> None:
    results = run_multiprocess(_late_rank, 2, args=(1.0,), timeout=60)
    for message in results[0]:
        assert "rank 0 timed out after 1 s waiting for rank 1" in message, message
    for message in results[1]:
        assert "rank 1 arrived late: rank 0 had given up waiting for it" in message, message


def test_a_killed_peer_is_named_within_two_seconds_whatever_the_timeout() -> None:
    check_killed_rank_named(run_multiprocess(killed_mid_call, 3, timeout=90, may_die=(KILLED,)))


def _different_paths(rank: int, world_size: int) -> list[str]:
    messages = []
    with RingAllReduce(chunk_bytes=4096, slots=3) as ring:
        calls = [
            # rank 0 goes to torch.distributed (int8), rank 1 to the ring (float32)
            torch.ones(100, dtype=torch.int8 if rank == 0 else torch.float32),
            # both go to torch.distributed, with different dtypes
            torch.ones(100, dtype=torch.int8 if rank == 0 else torch.complex64),
            # a ring call of several chunks against torch.distributed
            torch.ones(5000, dtype=torch.int8 if rank == 1 else torch.float64),
        ]
        for tensor in calls:
            with pytest.raises(CommMismatchError) as error:
                ring.all_reduce(tensor)
            messages.append(str(error.value))
        # Still in step: both paths work when the ranks agree.
        for dtype in (torch.float32, torch.int8, torch.complex64):
            tensor = torch.full((3000,), rank + 1, dtype=dtype)
            ring.all_reduce(tensor)
            assert torch.equal(tensor, torch.full((3000,), 3, dtype=dtype))
    return messages


def test_ranks_taking_different_paths_all_say_so() -> None:
    results = run_multiprocess(_different_paths, 2, timeout=60)
    for rank, (paths, dtypes, chunks) in enumerate(results):
        assert "would take different paths" in paths, paths
        assert "rank 0: 100 x int8 SUM via torch.distributed; rank 1: 100 x float32 SUM" in paths
        assert "different arguments" in dtypes and "rank 1: 100 x complex64 SUM via" in dtypes
        assert "rank 0: 5000 x float64 SUM; rank 1: 5000 x int8 SUM via" in chunks, chunks
        if rank == 0:
            assert "on rank 0: dtype torch.int8 is not one of" in paths, paths


def _creator_dies(rank: int, world_size: int) -> tuple[int, str] | None:
    store = dist.distributed_c10d._get_default_store()
    native = _native.load()
    if rank == 0:
        real = native.ShmAllReduce

        def create_then_die(**kwargs: object) -> None:
            real(**kwargs)  # the segment exists in /dev/shm, nobody else has mapped it
            store.set("creator/pid", str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

        native.ShmAllReduce = create_then_die
        RingAllReduce(timeout=120)  # not returned from
    with pytest.raises(CommTimeoutError) as error:
        RingAllReduce(timeout=120)  # only rank 0's death can end this wait early
    return int(store.get("creator/pid").decode()), str(error.value)


def test_a_segment_whose_creator_died_before_it_was_mapped_is_removed() -> None:
    results = run_multiprocess(_creator_dies, 2, timeout=60, may_die=(0,))
    creator, message = results[1]
    assert "the process of rank(s) [0] exited" in message, message
    assert shm_segments(creator) == set()


def _mapping_fails_on_rank_1(rank: int, world_size: int) -> tuple[str, int]:
    """Rank 1 cannot map the segment rank 0 created: each rank's error, and rank 0's pid."""
    native = _native.load()
    if rank == 1:

        def cannot_map(**kwargs: object) -> None:
            raise RuntimeError("no room to map the segment")

        native.ShmAllReduce = cannot_map
    with pytest.raises(RuntimeError) as error:
        RingAllReduce(timeout=60)
    return str(error.value), os.getpid()


def test_a_rank_that_cannot_map_the_segment_is_named_on_every_rank() -> None:
    """The failing rank posted its verdict and left while the others were still in the stage:
    they then raised that it had left, or waited for it, instead of naming its failure."""
    (creator_error, creator), (own_error, _) = run_multiprocess(
        _mapping_fails_on_rank_1, 2, timeout=60
    )
    assert creator_error == "rank 1 could not map the ring's segment: no room to map the segment"
    assert own_error == "no room to map the segment"
    assert shm_segments(creator) == set()
