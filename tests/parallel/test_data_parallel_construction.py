"""A DataParallel whose construction failed leaves nothing that changes a later construction on
the same group: the retry works, the store holds no key of the failed one, and its all-reduce
was closed. Bad arguments are named as the caller passed them."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from fastpar._checks import MAX_TIMEOUT_S
from fastpar.comm import CommTimeoutError, RingAllReduce
from fastpar.parallel import DataParallel
from fastpar.parallel.data_parallel import wrapper
from fastpar.parallel.data_parallel.config import decide_overlap
from fastpar.testing.distributed import run_multiprocess
from tests.comm.util import shm_segments
from tests.store_keys import store_key_counts

TIMEOUT_S = 2.0  # how long the first construction waits for the absent rank
RETRY_TIMEOUT_S = 20.0  # the retry's: ample for ranks that all come


def _retry_after_failures(rank: int, world_size: int) -> tuple[list[torch.Tensor], int, int]:
    """A construction every rank refuses (different shapes), then one that rank 1 misses (the
    others time out), then a retry on every rank. Returns the retry's parameters and the
    store's key count before the first construction and after the retry."""
    store = dist.distributed_c10d._get_default_store()
    dist.barrier()
    keys_before = store.num_keys()
    dist.barrier()  # every rank has counted before the first construction writes

    with pytest.raises(ValueError, match="same parameters and buffers on every rank"):
        DataParallel(nn.Linear(3, 3 + rank), comm="torch", timeout=RETRY_TIMEOUT_S)

    given_up = [f"absent-once/given-up/{r}" for r in range(world_size) if r != 1]
    if rank == 1:  # comes only to the retry, once the others have given up
        store.wait(given_up, timedelta(seconds=RETRY_TIMEOUT_S))
    else:
        with pytest.raises(CommTimeoutError, match=r"waiting for rank\(s\) \[1\]"):
            DataParallel(nn.Linear(3, 3), comm="torch", timeout=TIMEOUT_S)
        store.set(given_up[0 if rank == 0 else 1], "1")

    torch.manual_seed(rank)  # different on purpose: the retry broadcasts rank 0's
    model = nn.Linear(3, 3)
    DataParallel(model, comm="torch", timeout=RETRY_TIMEOUT_S).close()

    dist.barrier()  # every rank done with the store
    if rank == 0:
        for key in given_up:
            store.delete_key(key)
    dist.barrier()
    return [p.detach().clone() for p in model.parameters()], keys_before, store.num_keys()


def test_a_construction_that_failed_leaves_nothing_a_retry_sees() -> None:
    """After rank 1 missed a construction, the others' next one read the keys they had posted
    for the failed one as rank 1's current ones, and rank 1's read the stale ones: the retry
    timed out, and the failed construction's keys stayed in the store."""
    results = run_multiprocess(_retry_after_failures, 3, timeout=120)
    expected = results[0][0]
    torch.manual_seed(0)
    assert all(
        torch.equal(a, b) for a, b in zip(expected, nn.Linear(3, 3).parameters(), strict=True)
    )
    for params, keys_before, keys_after in results:
        assert all(torch.equal(a, b) for a, b in zip(params, expected, strict=True))
        assert keys_after == keys_before, (keys_before, keys_after)


def _store_keys_after_wrappers(rank: int, world_size: int) -> list[int]:
    """The default store's key count before and after each of 3 wrappers built and closed."""
    return store_key_counts(
        lambda: DataParallel(nn.Linear(3, 3), comm="auto", timeout=RETRY_TIMEOUT_S).close()
    )


def test_wrappers_on_fastpars_all_reduce_do_not_grow_the_store() -> None:
    """Each construction with comm="auto" left the host layout's and the ring's keys (10 on two
    ranks) in the store, never deleted."""
    results = run_multiprocess(_store_keys_after_wrappers, 2, timeout=120)
    for counts in results:
        assert counts == [counts[0]] * 4, results


def _bad_timeouts(rank: int, world_size: int) -> list[tuple[str, str]]:
    """What DataParallel raises for each bad timeout: (exception type, message)."""
    raised = []
    for timeout in (timedelta(0), "5", float("nan"), -1):
        with pytest.raises((TypeError, ValueError)) as info:
            DataParallel(nn.Linear(2, 2), comm="torch", timeout=timeout)  # type: ignore[arg-type]
        raised.append((type(info.value).__name__, str(info.value)))
    return raised


def test_a_bad_timeout_is_named_timeout() -> None:
    """The check ran on the config's field: "timeout_s must be ...", a name the caller never
    wrote."""
    raised = run_multiprocess(_bad_timeouts, 1, timeout=60)[0]
    assert raised == [
        ("ValueError", "timeout must be a finite number > 0, got 0.0"),
        ("TypeError", "timeout must be a datetime.timedelta or a number of seconds, got str '5'"),
        ("ValueError", "timeout must be a finite number > 0, got nan"),
        ("ValueError", "timeout must be a finite number > 0, got -1"),
    ]


def _longest_timeout_step(rank: int, world_size: int) -> tuple[list[bool], str]:
    """One step of wrappers given the longest timeout, on each comm path: whether it
    averaged; and what timedelta.max raises."""
    averaged = []
    for comm in ("torch", "auto"):
        model = nn.Linear(2, 2)
        wrapped = DataParallel(model, comm=comm, timeout=MAX_TIMEOUT_S)
        wrapped(torch.ones(1, 2)).sum().backward()
        wrapped.close()
        averaged.append(model.weight.grad is not None)
    with pytest.raises(ValueError) as info:
        DataParallel(nn.Linear(2, 2), comm="torch", timeout=timedelta.max)
    return averaged, str(info.value)


def test_the_longest_timeout_is_one_torch_takes() -> None:
    """timedelta.max passed the check of `timeout`, then its seconds were refused under the
    config's name (timeout_s); and timeouts torch.distributed cannot hold (past int64
    nanoseconds) passed, to fail inside torch (gloo refuses them, a wait ends at once)."""
    averaged, refused = run_multiprocess(_longest_timeout_step, 1, timeout=60)[0]
    assert averaged == [True, True]
    assert refused.startswith("timeout must be at most 4.61e+09 s")


@pytest.mark.parametrize("value", ["", "two", "0"])
def test_a_bad_local_world_size_is_named(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """int() said only "invalid literal for int() with base 10: ''"."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", value)
    expected = f"LOCAL_WORLD_SIZE must be an integer >= 1.*got {value!r}"
    with pytest.raises(ValueError, match=expected):
        decide_overlap("auto", torch.device("cpu"), 2)


def _held_shared_memory() -> tuple[int, int]:
    """(this process's mappings of fastpar's shared memory, /dev/shm entries it created)."""
    with open("/proc/self/maps") as maps:
        mapped = sum("/fastpar-" in line for line in maps)
    areas = list(Path("/dev/shm").glob(f"fastpar-area-{os.getpid()}-*"))
    return mapped, len(areas) + len(shm_segments(os.getpid()))


def _failure_after_the_buckets(rank: int, world_size: int) -> tuple[tuple[int, int], ...]:
    """A construction on fastpar's ring with shared buckets that fails after the buckets were
    built; returns what shared memory was held before it and after it, and the ring's closes."""
    closes = []
    close = RingAllReduce.close

    def counted_close(ring: RingAllReduce) -> None:
        closes.append(ring)
        close(ring)

    def fails(*args: object) -> bool:
        raise RuntimeError("after the buckets")

    RingAllReduce.close = counted_close  # type: ignore[method-assign]
    wrapper.decide_overlap = fails  # type: ignore[assignment]
    before = _held_shared_memory()
    with pytest.raises(RuntimeError, match="after the buckets") as raised:
        DataParallel(nn.Linear(64, 64), comm="ring", shared_buckets=True, timeout=20.0)
    # While the error (its frames hold the failed wrapper) is kept, as a caller's handler may.
    after = _held_shared_memory()
    del raised
    dist.barrier()  # no rank counts after a peer's exit unmapped what it shared
    return before, after, (len(closes), len({id(ring) for ring in closes}))


def test_a_construction_that_fails_after_the_buckets_closes_its_ring() -> None:
    """The ring and its shared buckets stayed mapped as long as the raised error (whose frames
    hold the failed wrapper) was kept: no close() comes for a wrapper that raised from its
    constructor."""
    for before, after, closes in run_multiprocess(_failure_after_the_buckets, 2, timeout=120):
        assert closes == (1, 1)
        assert before == (0, 0) and after == before, (before, after)
