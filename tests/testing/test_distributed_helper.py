"""The multi-process helper itself: results come back, failures and hangs become errors in
bounded time, a rank that cannot start raises its cause, and no child process is left
behind."""

from __future__ import annotations

import os
import pickle
import re
import signal
import time

import pytest
import torch
import torch.distributed as dist

from fastpar.testing.distributed import RankFailure, run_multiprocess


def _all_reduce_rank(rank: int, world_size: int, length: int) -> list[float]:
    tensor = torch.arange(length, dtype=torch.float64) * (rank + 1)
    dist.all_reduce(tensor)
    return [os.getpid(), *tensor.tolist()]


def _raise_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("planted failure on rank one")
    dist.barrier()  # rank 0 waits here until the helper kills it


def _hang_on_rank_zero(rank: int, world_size: int) -> int:
    if rank == 0:
        time.sleep(600)
    return os.getpid()


def _kill_self_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return rank


def _stop_self_on_rank_one(rank: int, world_size: int) -> None:
    store = dist.distributed_c10d._get_default_store()
    if rank == 1:
        store.set("stopped/pid", str(os.getpid()))
        os.kill(os.getpid(), signal.SIGSTOP)  # ignores SIGTERM until continued
    store.wait(["stopped/pid"])
    raise RuntimeError(f"rank 1 (pid {store.get('stopped/pid').decode()}) does not answer")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_results_come_back_per_rank() -> None:
    results = run_multiprocess(_all_reduce_rank, 3, args=(5,), timeout=60)
    expected = [float(v * 6) for v in range(5)]  # ranks multiply by 1 + 2 + 3
    assert [r[1:] for r in results] == [expected] * 3
    assert not any(_alive(int(r[0])) for r in results)


def test_a_raising_rank_fails_with_its_traceback() -> None:
    start = time.monotonic()
    with pytest.raises(RankFailure, match=r"(?s)rank 1 raised.*planted failure on rank one"):
        run_multiprocess(_raise_on_rank_one, 2, timeout=60)
    assert time.monotonic() - start < 30


def test_a_hanging_rank_times_out_and_is_killed() -> None:
    start = time.monotonic()
    # 30 s leaves rank 1 time to start and finish even on a loaded 2-core machine.
    with pytest.raises(RankFailure, match=r"timed out after 30s waiting for rank\(s\) \[0\]"):
        run_multiprocess(_hang_on_rank_zero, 2, timeout=30)
    assert time.monotonic() - start < 60


def test_a_killed_rank_is_reported_unless_allowed() -> None:
    with pytest.raises(RankFailure, match=r"rank 1 died with exit code -9 \(SIGKILL\)"):
        run_multiprocess(_kill_self_on_rank_one, 2, timeout=60)
    assert run_multiprocess(_kill_self_on_rank_one, 2, timeout=60, may_die=(1,)) == [0, None]


def test_a_rank_that_cannot_start_raises_the_cause() -> None:
    # A lambda cannot be pickled for a spawned process: starting rank 0 fails, and that error
    # (not one from cleaning up ranks that never started) reaches the caller.
    with pytest.raises((pickle.PicklingError, AttributeError), match="lambda"):
        run_multiprocess(lambda rank, world_size: rank, 2, timeout=30)


def test_a_stopped_rank_is_named_and_killed() -> None:
    start = time.monotonic()
    with pytest.raises(RankFailure) as failure:
        run_multiprocess(_stop_self_on_rank_one, 2, timeout=60)
    assert time.monotonic() - start < 30
    summary = failure.value.summary.splitlines()
    assert summary[0] == "rank 1: is stopped (SIGSTOP or a debugger) and never answered"
    (pid,) = re.findall(r"rank 0: RuntimeError: rank 1 \(pid (\d+)\) does not answer", summary[1])
    assert not _alive(int(pid))  # killed (SIGCONT + SIGTERM, or SIGKILL) and reaped
