"""The ranks of a torchrun attempt agree on its number through the store its dead predecessors
wrote into (`attempts.join_attempt`): in every order of arrival, after attempts that died at
any point of the agreement, and with an error in time when a rank does not come. Each rank is a
thread on one `dist.HashStore`, as torchrun's store serves every process of every attempt."""

from __future__ import annotations

import datetime
import threading
from typing import Any

import pytest
import torch.distributed as dist

from fastpar.training.attempts import AttemptError, join_attempt

WORLD_SIZE = 3
TIMEOUT_S = 30.0


class _WatchedStore:
    """A HashStore that tells when a rank (a thread named "rank<N>") first waits: by then it
    has written all it writes before it hears from the others."""

    def __init__(self) -> None:
        self.store = dist.HashStore()
        self.waiting: dict[str, threading.Event] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def wait(self, keys: list[str], timeout: datetime.timedelta) -> None:
        self.waiting[threading.current_thread().name].set()
        self.store.wait(keys, timeout)


def _attempt(store: _WatchedStore, order: list[int], *, timeout_s: float = TIMEOUT_S,
             world_sizes: dict[int, int] | None = None) -> dict[int, int | str]:  # fmt: skip
    """One attempt whose ranks arrive in `order`, each once the one before waits for the others
    (`world_sizes`: a rank's own WORLD_SIZE, else WORLD_SIZE). Returns each rank's attempt
    number, or its error."""
    results: dict[int, int | str] = {}

    def rank_main(rank: int) -> None:
        world_size = (world_sizes or {}).get(rank, WORLD_SIZE)
        try:
            results[rank] = join_attempt(
                store,  # type: ignore[arg-type]  # a dist.Store in all it is asked
                rank=rank,
                world_size=world_size,
                timeout_s=timeout_s,
            )
        except AttemptError as error:
            results[rank] = str(error)

    threads = []
    for rank in order:
        name = f"rank{rank}"
        store.waiting[name] = threading.Event()
        thread = threading.Thread(target=rank_main, args=(rank,), name=name)
        thread.start()
        threads.append(thread)
        assert store.waiting[name].wait(TIMEOUT_S)
    for thread in threads:
        thread.join(TIMEOUT_S)
        assert not thread.is_alive()
    return results


def _agreed(results: dict[int, int | str]) -> int:
    assert sorted(results) == list(range(WORLD_SIZE))
    assert len(set(results.values())) == 1, results
    number = results[0]
    assert isinstance(number, int)
    return number


ORDERS = {"rank 0 first": [0, 1, 2], "rank 0 last": [2, 1, 0], "rank 0 between": [1, 0, 2]}


@pytest.mark.parametrize("order", ORDERS)
def test_every_rank_of_each_attempt_gets_its_number_and_no_other_attempt_gets_it(
    order: str,
) -> None:
    """Attempts on one store, their ranks coming in every order: no rank may take an earlier
    attempt's number for its own (it would join the dead attempt's group)."""
    store = _WatchedStore()
    numbers = [_agreed(_attempt(store, orders)) for orders in [ORDERS[order], *ORDERS.values()]]
    assert numbers == sorted(set(numbers)), numbers


def test_an_attempt_after_ones_that_died_while_agreeing_gets_a_new_number() -> None:
    """Attempts died at every point of the agreement (rank 0 alone; rank 1 alone, asking and
    never answered; ranks 0 and 2 without rank 1): each says who did not come, within its
    timeout, and the next full attempt, in any order, gets a number none of them had."""
    store = _WatchedStore()
    first = _agreed(_attempt(store, [0, 1, 2]))
    alone = _attempt(store, [0], timeout_s=0.2)
    assert alone == {0: f"rank 0: ranks [1, 2] of attempt {first + 1} did not come within "
                        "--timeout 0.2 s"}  # fmt: skip
    assert _attempt(store, [1], timeout_s=0.2) == {
        1: "rank 1: rank 0 did not answer within --timeout 0.2 s"
    }
    partial = _attempt(store, [2, 0], timeout_s=0.5)
    assert partial[0] == (f"rank 0: ranks [1] of attempt {first + 2} did not come within "
                          "--timeout 0.5 s")  # fmt: skip
    for order in ORDERS.values():
        assert _agreed(_attempt(store, order)) > first + 2


def test_ranks_that_disagree_on_the_world_size_are_told() -> None:
    store = _WatchedStore()
    results = _attempt(store, [0, 1], timeout_s=0.5, world_sizes={1: 2})
    assert results == {
        0: "rank 0: ranks [1, 2] of attempt 1 did not come within --timeout 0.5 s",
        1: "rank 1: WORLD_SIZE 2 != rank 0's 3 in attempt 1",
    }
