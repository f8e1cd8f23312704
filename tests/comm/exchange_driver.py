"""Ranks of a store exchange as threads over one store, so the test, not timing, orders their
steps. Every rank goes through the same stages (`first`, `gather`, `agree`, `begin`); its
`Schedule` says how long it waits for the others and what it does before a stage (waits for a
key or for another rank's end, raises), and `drive` returns how each rank ended."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import cast
from unittest import mock

import torch.distributed as dist

from fastpar.comm.exchange import StoreExchange
from fastpar.comm.exchange_numbers import ExchangeNumbers
from tests.store_keys import WrittenKeys

SHORT_S = 0.2  # the timeout of a rank that gives up
LONG_S = 60.0  # the timeout of the ranks that must stop early, not wait it out
# Well under LONG_S yet loose enough for a loaded host; the ranks stop within a few
# LIVENESS_PERIOD_S.
STOPPED_WITHIN_S = LONG_S / 4

Step = Callable[[StoreExchange, int], object]  # a stage: what rank r does in it, its result
Hook = Callable[["Run", StoreExchange], None]  # what a rank does before a stage


@dataclass(frozen=True)
class Stage:
    name: str
    step: Step


def first(prefix: str) -> Stage:
    """The first stage at `prefix` (`begin_at`): rank r posts "first r"."""
    return Stage("first", lambda ex, r: ex.begin_at(prefix, f"first {r}".encode(), "begin"))


def begin(kind: str) -> Stage:
    """The first stage of the rank's next `kind` exchange (`begin`): rank r posts "first r"."""
    return Stage("first", lambda ex, r: ex.begin(kind, None, f"first {r}".encode(), "post"))


def gather(name: str, what: str = "map") -> Stage:
    """A later stage (`gather`): rank r posts "{name} r"."""
    return Stage(name, lambda ex, r: ex.gather(name, f"{name} {r}", what))


def agree(name: str, what: str = "map", problems: Mapping[int, str] | None = None) -> Stage:
    """A later stage (`StoreExchange.agree`) where rank r has `problems[r]` ("" if none)."""
    problems = problems or {}
    return Stage(name, lambda ex, r: ex.agree(name, problems.get(r, ""), what))


@dataclass(frozen=True)
class Schedule:
    """One rank's part: its timeout, a hook per stage name run before that stage, and its view
    of the store (a wrapper that fails, say)."""

    timeout_s: float = LONG_S
    before: Mapping[str, Hook] = field(default_factory=dict)
    view: Callable[[dist.Store], object] | None = None


@dataclass(frozen=True)
class Ended:
    """How a rank ended: each stage's result up to the one that raised, the error (None if
    it went through every stage), and how long the last stage it came to took."""

    results: list[object]
    error: BaseException | None
    stage_s: float

    @property
    def message(self) -> str:
        return str(self.error)


class Run:
    """What the hooks see: the ranks' stores and which ranks have ended."""

    def __init__(self, stores: Sequence[dist.Store]) -> None:
        self.stores = stores
        self.ended = [threading.Event() for _ in stores]


def after_rank(*ranks: int) -> Hook:
    """Wait until every rank of `ranks` has ended (returned or raised)."""
    return lambda run, ex: _check(all(run.ended[rank].wait(LONG_S) for rank in ranks))


def after_event(event: threading.Event) -> Hook:
    """Wait until `event` is set (by another rank's store, say)."""
    return lambda run, ex: _check(event.wait(LONG_S))


def after_keys(*names: str) -> Hook:
    """Wait until `names` (under the exchange's prefix) are set: e.g. other ranks wait there."""
    keys = [f"{{}}/{name}" for name in names]
    return lambda run, ex: ex.store.wait([key.format(ex.prefix) for key in keys],
                                         timedelta(seconds=LONG_S))  # fmt: skip


def raises(error: BaseException, *, then: Hook | None = None) -> Hook:
    """Raise `error`, after `then`."""

    def hook(run: Run, ex: StoreExchange) -> None:
        if then is not None:
            then(run, ex)
        raise error

    return hook


def _check(waited: bool) -> None:
    assert waited, f"not within {LONG_S} s"


def rank_stores(kind: str, world_size: int) -> tuple[list[dist.Store], WrittenKeys]:
    """One store per rank over the same keys: one HashStore, or a client each of one TCPStore
    (the first is the server); each notes the keys written through it in one `WrittenKeys`."""
    if kind == "hash":
        stores = [dist.HashStore()] * world_size
    else:
        server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        clients = [dist.TCPStore("127.0.0.1", server.port, is_master=False)
                   for _ in range(world_size - 1)]  # fmt: skip
        stores = [server, *clients]
    written = WrittenKeys(stores[0])
    views = [cast(dist.Store, WrittenKeys(store, written.written)) for store in stores]
    return views, written


def drive(
    stores: Sequence[dist.Store],
    stages: Sequence[Stage],
    schedules: Sequence[Schedule],
    numbers: Sequence[ExchangeNumbers] | None = None,
) -> list[Ended]:
    """Rank r (a thread) goes through `stages` in a `StoreExchange` over `stores[r]` (as
    `schedules[r]` views it) following `schedules[r]`, numbering its exchanges with
    `numbers[r]` (its own, fresh, by default); how each ended, by rank. The group's ranks, for
    `begin`, are 0..len(schedules)-1."""
    world_size = len(schedules)
    run = Run(stores)
    numbers = numbers or [ExchangeNumbers() for _ in schedules]

    def rank_fn(rank: int) -> Ended:
        schedule, results, started = schedules[rank], [], time.monotonic()
        store = stores[rank] if schedule.view is None else schedule.view(stores[rank])
        ex = StoreExchange(cast(dist.Store, store), rank, world_size,
                           timedelta(seconds=schedule.timeout_s), during="testing",
                           numbers=numbers[rank])  # fmt: skip
        try:
            with ex:
                for stage in stages:
                    schedule.before.get(stage.name, lambda run, ex: None)(run, ex)
                    started = time.monotonic()
                    results.append(stage.step(ex, rank))
            return Ended(results, None, time.monotonic() - started)
        except Exception as error:
            return Ended(results, error, time.monotonic() - started)
        finally:
            run.ended[rank].set()

    ranks = list(range(world_size))
    with (
        mock.patch.object(dist, "get_process_group_ranks", lambda group: ranks),
        ThreadPoolExecutor(world_size) as threads,
    ):
        futures = [threads.submit(rank_fn, rank) for rank in ranks]
        return [future.result(timeout=LONG_S + 30) for future in futures]
