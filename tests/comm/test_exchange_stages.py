"""Every stage of a store exchange ends with one verdict on every rank: all read every record,
or all raise. Ranks are threads sharing one store (a HashStore, or a TCPStore with a client
each), driven by tests/comm/exchange_driver.py, so the order of their steps is set by the
test, not by timing."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import torch.distributed as dist

from fastpar.comm.errors import CommTimeoutError
from fastpar.comm.exchange import StoreExchange
from tests.comm.exchange_driver import (
    LONG_S,
    SHORT_S,
    STOPPED_WITHIN_S,
    Schedule,
    after_event,
    after_keys,
    after_rank,
    agree,
    begin,
    drive,
    first,
    gather,
    raises,
    rank_stores,
)

STORES = ["hash", "tcp"]


@pytest.mark.parametrize("kind", STORES)
def test_three_ranks_through_several_stages_read_every_record(kind: str) -> None:
    stores, written = rank_stores(kind, 3)
    keys_before = stores[0].num_keys()
    stages = [first("test/stages"), gather("second"),
              agree("verdict", "decide", {2: "no P2P"}), gather("third")]  # fmt: skip
    ended = drive(stores, stages, [Schedule()] * 3)
    expected = [
        [b"first 0", b"first 1", b"first 2"],
        [b"second 0", b"second 1", b"second 2"],
        "rank 2: no P2P",
        [b"third 0", b"third 1", b"third 2"],
    ]
    assert [(rank.results, rank.error) for rank in ended] == [(expected, None)] * 3
    assert stores[0].num_keys() == keys_before
    assert written.left() == []


@pytest.mark.parametrize("kind", STORES)
def test_a_rank_late_to_a_later_stage_raises_at_once_as_the_one_that_gave_up(kind: str) -> None:
    """Rank 1 came to the second stage after rank 0 had given up on it, found every record
    posted and went on alone: in the CUDA ring, with a peer that had freed its buffers."""
    stores, written = rank_stores(kind, 2)
    keys_before = stores[0].num_keys()
    gave_up, late = drive(
        stores,
        [first("test/late-stage"), agree("mapped", "map the peers' buffers")],
        [Schedule(timeout_s=SHORT_S), Schedule(before={"mapped": after_rank(0)})],
    )
    assert gave_up.results == late.results == [[b"first 0", b"first 1"]]
    assert isinstance(gave_up.error, CommTimeoutError)
    assert gave_up.message.startswith("rank 0 timed out after 0.2 s waiting for rank(s) [1] to map")
    assert isinstance(late.error, CommTimeoutError)
    assert late.message == (
        "rank 1 came to map the peers' buffers while testing after rank 0 had given up "
        "waiting for it"
    )
    assert late.stage_s < STOPPED_WITHIN_S, late.stage_s
    assert stores[0].num_keys() == keys_before
    assert written.left() == []


@pytest.mark.parametrize("kind", STORES)
def test_ranks_waiting_in_a_later_stage_stop_once_another_gave_up(kind: str) -> None:
    """Rank 2 (long timeout) waited its own 60 s in the second stage after rank 1 had given up
    on rank 0; rank 0, coming after, found every record and went on."""
    stores, written = rank_stores(kind, 3)
    keys_before = stores[0].num_keys()
    late, gave_up, stopped = drive(
        stores,
        [first("test/stop"), agree("mapped")],
        [
            Schedule(before={"mapped": after_rank(1)}),  # comes after
            Schedule(timeout_s=SHORT_S, before={"mapped": after_keys("mapped/2")}),
            Schedule(),
        ],
    )
    assert all(isinstance(rank.error, CommTimeoutError) for rank in (late, gave_up, stopped))
    assert gave_up.message.startswith("rank 1 timed out after 0.2 s waiting for rank(s) [0] to map")
    assert stopped.message == (
        "rank 2 stopped waiting for rank(s) [0] to map while testing: rank 1 gave up waiting "
        "for them first"
    )
    assert stopped.stage_s < STOPPED_WITHIN_S, stopped.stage_s
    assert (
        late.message == "rank 0 came to map while testing after rank 1 had given up waiting for it"
    )
    assert stores[0].num_keys() == keys_before
    assert written.left() == []


@pytest.mark.parametrize("kind", STORES)
def test_a_rank_that_raised_between_stages_stops_the_others_at_once(kind: str) -> None:
    """The others waited out their timeouts for a record the rank that raised never posted."""
    stores, written = rank_stores(kind, 3)
    keys_before = stores[0].num_keys()
    between = raises(ValueError("between stages"), then=after_keys("mapped/1", "mapped/2"))
    raised, *stopped = drive(
        stores,
        [first("test/raised"), agree("mapped")],
        [Schedule(before={"mapped": between}), Schedule(), Schedule()],
    )
    assert isinstance(raised.error, ValueError)
    for rank, ended in enumerate(stopped, start=1):
        assert isinstance(ended.error, CommTimeoutError)
        assert ended.message == (
            f"rank {rank} stopped waiting for rank(s) [0] to map while testing: rank 0 left on "
            "an error"
        )
        assert ended.stage_s < STOPPED_WITHIN_S, ended.stage_s
    assert stores[0].num_keys() == keys_before
    assert written.left() == []


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
    stores, written = rank_stores("hash", 2)
    fails = Schedule(view=lambda store: _FailsInStage(store, "handles", "test/inside/mapped/1"))
    failed, stopped = drive(
        stores,
        [first("test/inside"), gather("handles", "share its handle"), agree("mapped")],
        [fails, Schedule()],
    )
    assert isinstance(failed.error, OSError) and failed.message == "interrupted"
    assert stopped.results[1] == [b"handles 0", b"handles 1"]
    assert isinstance(stopped.error, CommTimeoutError)
    assert stopped.message in (
        "rank 1 stopped waiting for rank(s) [0] to map while testing: rank 0 left on an error",
        "rank 1 came to map while testing after rank 0 had left on an error",
    )
    assert stopped.stage_s < STOPPED_WITHIN_S, stopped.stage_s
    assert stores[0].num_keys() == 0
    assert written.left() == []


class _GoneStore:
    """A store whose server went away once `gone` is set: writes raise."""

    def __init__(self, store: dist.Store) -> None:
        self._store = store
        self.gone = False

    def _write(self, method: str) -> object:
        def write(*args: object) -> object:
            if self.gone:
                raise RuntimeError("connection reset by peer")
            return getattr(self._store, method)(*args)

        return write

    def __getattr__(self, name: str) -> object:
        if name in ("set", "add", "compare_set", "delete_key"):
            return self._write(name)
        return getattr(self._store, name)


def _store_goes(run: object, ex: StoreExchange) -> None:
    ex.store.gone = True  # type: ignore[attr-defined]
    raise ValueError("the caller's error")


def test_an_error_leaving_a_failed_exchange_is_kept_as_a_note() -> None:
    """The store's error leaving the exchange replaced the error that made the rank leave."""
    stores, _ = rank_stores("hash", 1)
    (ended,) = drive(stores, [first("test/gone"), gather("after")],
                     [Schedule(before={"after": _store_goes}, view=_GoneStore)])  # fmt: skip
    assert ended.results == [[b"first 0"]]
    assert isinstance(ended.error, ValueError) and ended.message == "the caller's error"
    assert ended.error.__notes__ == [
        "rank 0 could not leave the store exchange test/gone: RuntimeError: connection reset "
        "by peer"
    ]


@pytest.mark.parametrize("kind", STORES)
def test_a_rank_late_to_an_exchange_nobody_retried_is_told_it_was_late(kind: str) -> None:
    """The late rank skipped to the retry, waited its timeout there and then blamed rank 0,
    which had been on time."""
    stores, _ = rank_stores(kind, 2)
    gave_up, late = drive(
        stores,
        [begin("test-late")],
        [Schedule(timeout_s=SHORT_S), Schedule(timeout_s=1.0, before={"first": after_rank(0)})],
    )
    assert isinstance(gave_up.error, CommTimeoutError)
    assert gave_up.message.startswith(
        "rank 0 timed out after 0.2 s waiting for rank(s) [1] to post"
    )
    assert isinstance(late.error, CommTimeoutError)
    assert late.message == (
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


class _DecidesAfter:
    """A rank's store whose first compare_set of an outcome starting with `outcome` sets
    `deciding`, waits for `go`, and then sets `decided`."""

    def __init__(self, store: object, outcome: bytes, deciding: threading.Event,
                 go: threading.Event, decided: threading.Event) -> None:  # fmt: skip
        self._store, self._outcome = store, outcome
        self._deciding, self._go, self._decided = deciding, go, decided

    def compare_set(self, key: str, expected: str, value: bytes) -> bytes:
        if not value.startswith(self._outcome) or self._deciding.is_set():
            return self._store.compare_set(key, expected, value)  # type: ignore[attr-defined]
        self._deciding.set()
        assert self._go.wait(LONG_S)
        try:
            return self._store.compare_set(key, expected, value)  # type: ignore[attr-defined]
        finally:
            self._decided.set()

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


POSTER_TIMEOUT_S = 10.0


@pytest.mark.parametrize("kind", STORES)
def test_a_rank_that_posted_as_another_gave_up_fails_with_it(kind: str) -> None:
    """Rank 1 posted and saw every record just as rank 0 gave up on it (rank 0's "abandoned"
    landed before rank 1's "complete"): rank 1 was taken for one that came late, skipped to a
    retry nobody made, waited its timeout there and then called itself late."""
    stores, written = rank_stores(kind, 2)
    gives_up, gave_up, decides, decided = (threading.Event() for _ in range(4))
    schedules = [
        Schedule(
            timeout_s=SHORT_S,
            view=lambda store: _DecidesAfter(store, b"abandoned", gives_up, decides, gave_up),
        ),
        Schedule(
            timeout_s=POSTER_TIMEOUT_S,
            before={"first": after_event(gives_up)},
            view=lambda store: _DecidesAfter(store, b"complete", decides, gave_up, decided),
        ),
    ]
    timed_out, posted = drive(stores, [begin("test-poster")], schedules)
    assert isinstance(timed_out.error, CommTimeoutError)
    assert timed_out.message.startswith("rank 0 timed out after 0.2 s waiting for rank(s) [1]")
    assert isinstance(posted.error, CommTimeoutError)
    assert posted.message == (
        "rank 1 came to post while testing after rank 0 had given up waiting for it"
    )
    assert posted.stage_s < POSTER_TIMEOUT_S / 2  # it did not wait for a retry
    assert written.left() == []
