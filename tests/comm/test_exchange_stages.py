"""Every stage of a store exchange ends with one verdict on every rank: all read every record,
or all raise. Ranks are threads sharing one store (a HashStore, or a TCPStore with a client
each), so the order of their steps is set by the test, not by timing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import cast

import pytest
import torch.distributed as dist

from fastpar.comm.errors import CommTimeoutError
from fastpar.comm.exchange import StoreExchange, exchange
from fastpar.testing.distributed import run_multiprocess

SHORT_S = 0.2  # the timeout of the rank that gives up
LONG_S = 60.0  # the timeout of the ranks that must stop early, not wait it out
# Well under LONG_S yet loose enough for a loaded host; the ranks stop within a few
# LIVENESS_PERIOD_S.
STOPPED_WITHIN_S = LONG_S / 4


def _rank_stores(kind: str, world_size: int) -> list[dist.Store]:
    """One store per rank over the same keys: one HashStore, or a client each of one TCPStore
    (the first is the server)."""
    if kind == "hash":
        return [dist.HashStore()] * world_size
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    clients = [dist.TCPStore("127.0.0.1", server.port, is_master=False)
               for _ in range(world_size - 1)]  # fmt: skip
    return [server, *clients]


def _run_ranks(world_size: int, rank_fn: Callable[[int], object]) -> list[object]:
    """`rank_fn(rank)` on a thread per rank; their results by rank (a rank's error is raised)."""
    with ThreadPoolExecutor(world_size) as ranks:
        futures = [ranks.submit(rank_fn, rank) for rank in range(world_size)]
        return [future.result(timeout=LONG_S + 30) for future in futures]


def _exchange(store: dist.Store, rank: int, world_size: int, timeout_s: float) -> StoreExchange:
    return StoreExchange(store, rank, world_size, timedelta(seconds=timeout_s), during="testing")


STORES = ["hash", "tcp"]


@pytest.mark.parametrize("kind", STORES)
def test_three_ranks_through_several_stages_read_every_record(kind: str) -> None:
    stores = _rank_stores(kind, 3)
    keys_before = stores[0].num_keys()

    def rank_fn(rank: int) -> tuple[list[bytes], list[bytes], str | None, list[bytes]]:
        with _exchange(stores[rank], rank, 3, LONG_S) as ex:
            first = ex.begin_at("test/stages", f"first {rank}".encode(), "begin")
            assert first is not None
            second = ex.gather("second", f"second {rank}", "post the second")
            verdict = ex.agree("verdict", "no P2P" if rank == 2 else "", "decide")
            third = ex.gather("third", f"third {rank}", "post the third")
        return first, second, verdict, third

    results = _run_ranks(3, rank_fn)
    expected = (
        [b"first 0", b"first 1", b"first 2"],
        [b"second 0", b"second 1", b"second 2"],
        "rank 2: no P2P",
        [b"third 0", b"third 1", b"third 2"],
    )
    assert results == [expected] * 3
    assert stores[0].num_keys() == keys_before


@pytest.mark.parametrize("kind", STORES)
def test_a_rank_late_to_a_later_stage_raises_at_once_as_the_one_that_gave_up(kind: str) -> None:
    """Rank 1 came to the second stage after rank 0 had given up on it, found every record
    posted and went on alone: in the CUDA ring, with a peer that had freed its buffers."""
    stores = _rank_stores(kind, 2)
    keys_before = stores[0].num_keys()
    given_up = threading.Event()

    def rank_fn(rank: int) -> tuple[str, float]:
        with _exchange(stores[rank], rank, 2, SHORT_S if rank == 0 else LONG_S) as ex:
            assert ex.begin_at("test/late-stage", b"", "begin") is not None
            if rank == 1:  # comes once rank 0 has given up
                assert given_up.wait(LONG_S)
            start = time.monotonic()
            with pytest.raises(CommTimeoutError) as info:
                ex.agree("mapped", "", "map the peers' buffers")
            given_up.set()
            return str(info.value), time.monotonic() - start

    (gave_up, _), (late, late_s) = _run_ranks(2, rank_fn)
    assert gave_up.startswith("rank 0 timed out after 0.2 s waiting for rank(s) [1] to map")
    assert late == (
        "rank 1 came to map the peers' buffers while testing after rank 0 had given up "
        "waiting for it"
    )
    assert late_s < STOPPED_WITHIN_S, late_s
    assert stores[0].num_keys() == keys_before


@pytest.mark.parametrize("kind", STORES)
def test_ranks_waiting_in_a_later_stage_stop_once_another_gave_up(kind: str) -> None:
    """Rank 2 (long timeout) waited its own 60 s in the second stage after rank 1 had given up
    on rank 0; rank 0, coming after, found every record and went on."""
    stores = _rank_stores(kind, 3)
    keys_before = stores[0].num_keys()
    given_up = threading.Event()

    def rank_fn(rank: int) -> tuple[str, float]:
        with _exchange(stores[rank], rank, 3, SHORT_S if rank == 1 else LONG_S) as ex:
            assert ex.begin_at("test/stop", b"", "begin") is not None
            if rank == 1:  # gives up once rank 2 waits in the stage
                stores[1].wait([ex.key("mapped/2")], timedelta(seconds=LONG_S))
            if rank == 0:  # comes after
                assert given_up.wait(LONG_S)
            start = time.monotonic()
            with pytest.raises(CommTimeoutError) as info:
                ex.agree("mapped", "", "map")
            if rank == 1:
                given_up.set()
            return str(info.value), time.monotonic() - start

    (late, _), (gave_up, _), (stopped, stopped_s) = _run_ranks(3, rank_fn)
    assert gave_up.startswith("rank 1 timed out after 0.2 s waiting for rank(s) [0] to map")
    assert stopped == (
        "rank 2 stopped waiting for rank(s) [0] to map while testing: rank 1 gave up waiting "
        "for them first"
    )
    assert stopped_s < STOPPED_WITHIN_S, stopped_s
    assert late == "rank 0 came to map while testing after rank 1 had given up waiting for it"
    assert stores[0].num_keys() == keys_before


@pytest.mark.parametrize("kind", STORES)
def test_a_rank_that_raised_between_stages_stops_the_others_at_once(kind: str) -> None:
    """The others waited out their timeouts for a record the rank that raised never posted."""
    stores = _rank_stores(kind, 3)
    keys_before = stores[0].num_keys()

    def rank_fn(rank: int) -> tuple[str, float]:
        ex = _exchange(stores[rank], rank, 3, LONG_S)
        if rank == 0:
            with pytest.raises(ValueError, match="between stages"), ex:
                assert ex.begin_at("test/raised", b"", "begin") is not None
                # Once the others wait in the second stage.
                stores[0].wait([ex.key("mapped/1"), ex.key("mapped/2")],
                               timedelta(seconds=LONG_S))  # fmt: skip
                raise ValueError("between stages")
            return "", 0.0
        with ex:
            assert ex.begin_at("test/raised", b"", "begin") is not None
            start = time.monotonic()
            with pytest.raises(CommTimeoutError) as info:
                ex.agree("mapped", "", "map")
        return str(info.value), time.monotonic() - start

    _, *stopped = _run_ranks(3, rank_fn)
    for rank, (message, waited_s) in enumerate(stopped, start=1):
        assert message == (
            f"rank {rank} stopped waiting for rank(s) [0] to map while testing: rank 0 left on "
            "an error"
        )
        assert waited_s < STOPPED_WITHIN_S, waited_s
    assert stores[0].num_keys() == keys_before


class _FailsInStage:
    """Rank 0's view of the store: its wait in stage `name` fails (an interrupt, a store error)
    once rank 1 has posted in the stage after it, so rank 1 completed `name` with rank 0's
    record."""

    def __init__(self, store: dist.Store, name: str, then: str) -> None:
        self._store, self._name, self._then = store, name, then

    def wait(self, keys: list[str], timeout: timedelta) -> None:
        if any(f"/{self._name}/" in key for key in keys):
            self._store.wait([self._then], timedelta(seconds=LONG_S))
            raise OSError("interrupted")
        self._store.wait(keys, timeout)

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


def test_a_rank_that_failed_inside_a_completed_stage_stops_the_others_at_the_next() -> None:
    """Rank 1 went through the stage with rank 0's record, then waited its own 60 s at the next
    one for rank 0, which had left on an error."""
    store = dist.HashStore()

    def rank_fn(rank: int) -> tuple[str, float]:
        if rank == 0:
            failing = cast(dist.Store, _FailsInStage(store, "handles", "test/inside/mapped/1"))
            with (
                pytest.raises(OSError, match="interrupted"),
                _exchange(failing, 0, 2, LONG_S) as ex,
            ):
                assert ex.begin_at("test/inside", b"", "begin") is not None
                ex.gather("handles", "handle 0", "share its handle")
            return "", 0.0
        with _exchange(store, 1, 2, LONG_S) as ex:
            assert ex.begin_at("test/inside", b"", "begin") is not None
            handles = ex.gather("handles", "handle 1", "share its handle")
            assert handles == [b"handle 0", b"handle 1"]
            start = time.monotonic()
            with pytest.raises(CommTimeoutError) as info:
                ex.agree("mapped", "", "map")
        return str(info.value), time.monotonic() - start

    _, (message, waited_s) = _run_ranks(2, rank_fn)
    assert message in (
        "rank 1 stopped waiting for rank(s) [0] to map while testing: rank 0 left on an error",
        "rank 1 came to map while testing after rank 0 had left on an error",
    )
    assert waited_s < STOPPED_WITHIN_S, waited_s
    assert store.num_keys() == 0


class _GoneStore:
    """A store whose server went away after the first stage: writes raise."""

    def __init__(self) -> None:
        self._store = dist.HashStore()
        self.gone = False

    def _write(self, method: str) -> Callable[..., object]:
        def write(*args: object) -> object:
            if self.gone:
                raise RuntimeError("connection reset by peer")
            return getattr(self._store, method)(*args)

        return write

    def __getattr__(self, name: str) -> object:
        if name in ("set", "add", "compare_set", "delete_key"):
            return self._write(name)
        return getattr(self._store, name)


def test_an_error_leaving_a_failed_exchange_is_kept_as_a_note() -> None:
    """The store's error leaving the exchange replaced the error that made the rank leave."""
    store = _GoneStore()
    ex = _exchange(cast(dist.Store, store), 0, 1, LONG_S)
    with pytest.raises(ValueError, match="the caller's error") as info, ex:
        assert ex.begin_at("test/gone", b"", "begin") == [b""]
        store.gone = True
        raise ValueError("the caller's error")
    assert info.value.__notes__ == [
        "rank 0 could not leave the store exchange test/gone: RuntimeError: connection reset "
        "by peer"
    ]


def _late_to_an_exchange(rank: int, world_size: int) -> str:
    """Rank 0 gives up on rank 1, which comes after and finds no rank in the retry."""
    store = dist.distributed_c10d._get_default_store()
    timeout = timedelta(seconds=SHORT_S if rank == 0 else 1.0)
    if rank == 1:
        store.wait(["test/late/given-up"], timedelta(seconds=LONG_S))
    with pytest.raises(CommTimeoutError) as info:
        exchange(store, "test-late", dist.group.WORLD, b"", timeout, "post", during="testing")
    if rank == 0:
        store.set("test/late/given-up", "1")
    return str(info.value)


def test_a_rank_late_to_an_exchange_nobody_retried_is_told_it_was_late() -> None:
    """The late rank skipped to the retry, waited its timeout there and then blamed rank 0,
    which had been on time."""
    gave_up, late = run_multiprocess(_late_to_an_exchange, 2, timeout=60)
    assert gave_up.startswith("rank 0 timed out after 0.2 s waiting for rank(s) [1] to post")
    assert late == (
        "rank 1 came to post while testing after rank 0 had given up waiting for it, and no "
        "rank retried within 1 s"
    )


def test_posting_outside_an_exchange_is_refused() -> None:
    """Before `begin`, or after leaving, there is no prefix: a key would land outside any
    exchange and never be deleted."""
    store = dist.HashStore()
    records = StoreExchange(store, 0, 1, timedelta(seconds=1), during="testing")
    with pytest.raises(RuntimeError, match="outside an exchange"):
        records.gather("name", "mine", "post")
    assert store.num_keys() == 0
