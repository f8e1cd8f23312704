"""Setups through the store that one rank missed leave nothing that changes the next one: the
late rank joins the others' retry, which works, and no setup leaves keys in the store."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from fastpar import comm
from fastpar.comm import CommTimeoutError, RingAllReduce
from fastpar.comm.hosts import HOST_ENV, HostLayout, gather_host_layout, host_identity
from fastpar.testing.distributed import run_multiprocess
from tests.store_keys import store_key_counts

TIMEOUT_S = 1.0  # how long the missed setup waits for the absent rank
RETRY_TIMEOUT_S = 30.0  # the retry's: ample for ranks that all come


def _reduce_with(reducer: comm.RingAllReduce | comm.HierarchicalAllReduce) -> list[bool]:
    """Whether the reducer's all-reduce of integer-valued tensors equals torch.distributed's."""
    equal = []
    with reducer:
        for size in (1, 1009, 65537):
            tensor = torch.arange(size, dtype=torch.float32) * (dist.get_rank() + 1)
            expected = tensor.clone()
            dist.all_reduce(expected)
            reducer.all_reduce(tensor)
            equal.append(torch.equal(tensor, expected))
    return equal


def _ring(timeout_s: float) -> list[bool]:
    return _reduce_with(RingAllReduce(timeout=timeout_s))


def _created(timeout_s: float) -> list[bool]:
    return _reduce_with(comm.create_all_reduce(timeout=timeout_s))


def _hosts(timeout_s: float) -> list[bool]:
    layout = gather_host_layout(dist.group.WORLD, timedelta(seconds=timeout_s))
    identities = [host_identity()] * dist.get_world_size()  # every rank runs on this host
    return [layout == HostLayout.from_identities(identities, dist.get_rank())]


SETUPS: dict[str, Callable[[float], list[bool]]] = {
    "ring": _ring,
    "create_all_reduce": _created,
    "gather_host_layout": _hosts,
}


def _missed_then_retried(rank: int, world_size: int, setup: str) -> tuple[list[bool], int, int]:
    """Rank 1 misses a setup (the others time out), then every rank sets up. Returns what the
    retry's setup checks and the store's key count before the first setup and after the retry."""
    store = dist.distributed_c10d._get_default_store()
    dist.barrier()
    keys_before = store.num_keys()
    dist.barrier()  # every rank has counted before the first setup writes

    given_up = [f"missed/given-up/{r}" for r in range(world_size) if r != 1]
    if rank == 1:  # comes only to the retry, once the others have given up
        store.wait(given_up, timedelta(seconds=RETRY_TIMEOUT_S))
    else:
        with pytest.raises(CommTimeoutError, match=r"waiting for rank\(s\) \[1\] to say which"):
            SETUPS[setup](TIMEOUT_S)
        store.set(f"missed/given-up/{rank}", "1")

    checks = SETUPS[setup](RETRY_TIMEOUT_S)

    dist.barrier()  # every rank done with the store
    if rank == 0:
        for key in given_up:
            store.delete_key(key)
    dist.barrier()
    return checks, keys_before, store.num_keys()


@pytest.mark.parametrize("setup", list(SETUPS))
def test_a_rank_that_missed_a_setup_joins_the_retry(setup: str) -> None:
    """The late rank read the keys the others had posted for the failed setup as current, and
    they waited for it in the next one: the retry timed out, and the failed setup's keys (and
    every successful one's) stayed in the store."""
    results = run_multiprocess(_missed_then_retried, 3, args=(setup,), timeout=120)
    for checks, keys_before, keys_after in results:
        assert checks and all(checks), results
        assert keys_after == keys_before, results


def _store_keys_after_setups(rank: int, world_size: int, setup: str) -> list[int]:
    """The default store's key count before and after each of 3 setups."""

    def checked_setup() -> None:
        assert all(SETUPS[setup](RETRY_TIMEOUT_S))

    return store_key_counts(checked_setup)


@pytest.mark.parametrize("setup", list(SETUPS))
def test_setups_in_a_loop_do_not_grow_the_store(setup: str) -> None:
    """Each ring left its host, pid, segment and mapped keys in the store, never deleted."""
    results = run_multiprocess(_store_keys_after_setups, 2, args=(setup,), timeout=120)
    for counts in results:
        assert counts == [counts[0]] * 4, results


def _hierarchical_missed_then_retried(rank: int, world_size: int) -> list[bool]:
    """Two simulated hosts of two ranks: rank 1 misses a setup (the others time out), then every
    rank sets up. Returns whether the retry's all-reduces equal torch.distributed's."""
    os.environ[HOST_ENV] = f"simulated-{rank // 2}"
    layout = gather_host_layout(dist.group.WORLD, timedelta(seconds=RETRY_TIMEOUT_S))
    store = dist.distributed_c10d._get_default_store()
    given_up = [f"missed/given-up/{r}" for r in range(world_size) if r != 1]
    if rank == 1:
        store.wait(given_up, timedelta(seconds=RETRY_TIMEOUT_S))
    else:
        with pytest.raises(CommTimeoutError, match=r"waiting for rank\(s\) \[1\] to begin"):
            comm.HierarchicalAllReduce(layout=layout, timeout=TIMEOUT_S)
        store.set(f"missed/given-up/{rank}", "1")
    reducer = comm.HierarchicalAllReduce(layout=layout, timeout=RETRY_TIMEOUT_S)
    assert reducer.fallback_reason(torch.empty(0)) is None
    return _reduce_with(reducer)


def test_a_rank_that_missed_a_hierarchical_setup_joins_the_retry() -> None:
    """The late rank named its subgroups after the failed setup, so the retry never met."""
    results = run_multiprocess(_hierarchical_missed_then_retried, 4, timeout=120)
    assert all(checks and all(checks) for checks in results), results


def _shared_areas_in_a_loop(rank: int, world_size: int, hosts: int) -> list[int]:
    """The store's key count before and after each of 3 allocations of a shared area (and a
    call on it) by a ring, or by a hierarchical all-reduce set up each time over `hosts`
    simulated hosts."""
    expected = torch.full((70_000,), float(sum(range(1, world_size + 1))))

    def allocate_and_reduce(reducer: comm.RingAllReduce | comm.HierarchicalAllReduce) -> None:
        area = reducer.empty_shared(expected.numel())
        area.fill_(rank + 1)
        reducer.all_reduce(area)
        assert torch.equal(area, expected)

    if hosts == 1:
        with RingAllReduce(timeout=RETRY_TIMEOUT_S) as ring:
            return store_key_counts(lambda: allocate_and_reduce(ring))

    def set_up_and_allocate(layout: HostLayout) -> None:
        with comm.HierarchicalAllReduce(layout=layout, timeout=RETRY_TIMEOUT_S) as reducer:
            assert reducer.fallback_reason(torch.empty(0)) is None
            allocate_and_reduce(reducer)

    return _hierarchical_key_counts(rank, world_size, hosts, set_up_and_allocate)


def _hierarchical_key_counts(
    rank: int, world_size: int, hosts: int, setup: Callable[[HostLayout], object]
) -> list[int]:
    """`store_key_counts` of `setup` over `hosts` simulated hosts, less the keys of the process
    groups each hierarchical setup creates (one per host, one per local index): their gloo
    rendezvous leaves torch's own keys, counted here by creating the same groups alone."""
    os.environ[HOST_ENV] = f"simulated-{rank * hosts // world_size}"
    layout = gather_host_layout(dist.group.WORLD, timedelta(seconds=RETRY_TIMEOUT_S))
    counts = store_key_counts(lambda: setup(layout))
    before, after = store_key_counts(lambda: _subgroups_like_a_setup(layout), setups=1)
    return [count - done * (after - before) for done, count in enumerate(counts)]


def _subgroups_like_a_setup(layout: HostLayout) -> None:
    from fastpar.comm.hierarchical import _subgroup

    name = f"test_subgroups_{next(_subgroup_names)}"
    timeout = timedelta(seconds=RETRY_TIMEOUT_S)
    _subgroup(layout.hosts[layout.host], f"{name}_host{layout.host}", timeout)
    _subgroup(
        [host[layout.local_rank] for host in layout.hosts],
        f"{name}_local{layout.local_rank}",
        timeout,
    )


_subgroup_names = itertools.count()


@pytest.mark.parametrize(("world_size", "hosts"), [(2, 1), (4, 2)])
def test_shared_areas_and_hierarchical_setups_leave_no_keys(world_size: int, hosts: int) -> None:
    """Each allocation left every rank's file name in the store; each hierarchical setup its
    host buffer's name too."""
    results = run_multiprocess(_shared_areas_in_a_loop, world_size, args=(hosts,), timeout=120)
    for counts in results:
        assert counts == [counts[0]] * 4, results


def _failed_hierarchical_setups(rank: int, world_size: int) -> list[int]:
    """Key counts around 3 hierarchical all-reduces whose one call fails (rank 1 passes a larger
    tensor), each closed."""

    def fail_once(layout: HostLayout) -> None:
        with (
            comm.HierarchicalAllReduce(layout=layout, timeout=3.0) as reducer,
            pytest.raises(comm.CommMismatchError, match="different sizes"),
        ):
            reducer.all_reduce(torch.ones(100 + (rank == 1)))

    return _hierarchical_key_counts(rank, world_size, 2, fail_once)


def test_a_hierarchical_failure_report_is_deleted_once_every_rank_closed() -> None:
    """The failure a rank posted for the others stayed in the store after every rank closed."""
    results = run_multiprocess(_failed_hierarchical_setups, 4, timeout=120)
    for counts in results:
        assert counts == [counts[0]] * 4, results


def _host_buffer_fails(rank: int, world_size: int) -> tuple[list[int], list[bool]]:
    """Key counts around 3 hierarchical setups over hosts [0, 0, 1, 1] whose host buffer fails
    on rank 0 after the host's ring was created (rank 1 then times out waiting for it, host 1
    sets up and closes), and whether each ring they created was closed."""
    import fastpar.comm.hierarchical as hierarchical

    rings = []

    class RecordedRing(RingAllReduce):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            rings.append(self)

    def no_buffer(*args: object, **kwargs: object) -> None:
        raise OSError("no shared memory for the host buffer")

    hierarchical.RingAllReduce = RecordedRing
    if rank == 0:
        hierarchical.HostBuffer = no_buffer

    def fail_on_host_0(layout: HostLayout) -> None:
        if rank >= 2:
            comm.HierarchicalAllReduce(layout=layout, timeout=2.0).close()
            return
        error = OSError if rank == 0 else CommTimeoutError
        with pytest.raises(error, match=r"no shared memory|rank\(s\) \[0\] to create its"):
            comm.HierarchicalAllReduce(layout=layout, timeout=2.0)

    counts = _hierarchical_key_counts(rank, world_size, 2, fail_on_host_0)
    return counts, [ring.closed for ring in rings]


def test_a_failed_hierarchical_setup_closes_its_host_ring() -> None:
    """The host's ring stayed open when a later step of the setup raised, and the ranks that
    failed never counted themselves out of the store's failure report."""
    results = run_multiprocess(_host_buffer_fails, 4, timeout=120)
    for counts, closed in results:
        assert closed == [True] * 3, results
        assert counts == [counts[0]] * 4, results


def _missed_allocation(rank: int, world_size: int) -> bool:
    """Rank 1 misses an allocation (the others time out), then every rank allocates: whether the
    retry's area reduces to the sum."""
    store = dist.distributed_c10d._get_default_store()
    given_up = [f"missed-area/given-up/{r}" for r in range(world_size) if r != 1]
    with RingAllReduce(timeout=3.0) as ring:
        if rank == 1:
            store.wait(given_up, timedelta(seconds=RETRY_TIMEOUT_S))
        else:
            with pytest.raises(CommTimeoutError, match=r"rank\(s\) \[1\] to allocate its shared"):
                ring.empty_shared(1000)
            store.set(f"missed-area/given-up/{rank}", "1")
        area = ring.empty_shared(1000)
        area.fill_(rank + 1)
        ring.all_reduce(area)
        return torch.equal(area, torch.full((1000,), float(sum(range(1, world_size + 1)))))


def test_a_rank_that_missed_an_allocation_joins_the_retry() -> None:
    """Allocations were numbered per ring: the late rank waited in the one the others had
    abandoned while they waited in the next."""
    assert run_multiprocess(_missed_allocation, 3, timeout=120) == [True] * 3
