"""Waits on the store that end: for every rank's key (`wait_for_ranks`), for any of a few keys
(`wait_for_any`), and the count by which the last of a group's ranks learns it is the last
(`count_out`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch.distributed as dist

from fastpar.comm.errors import CommTimeoutError
from fastpar.comm.processes import process_alive

LIVENESS_PERIOD_S = 0.2  # how often a wait checks that the awaited peers' processes live
ANY_KEY_PERIOD_S = 0.05  # how often `wait_for_any` looks for its keys

# What the ranks of most exchanges here are doing (the ring's setup and its shared areas);
# other callers name their own (`during`).
CREATING_A_RING = "creating a RingAllReduce"


def wait_for_ranks(
    store: dist.Store,
    keys: dict[int, str],
    timeout: timedelta,
    rank: int,
    what: str,
    pids: dict[int, int] | None = None,
    *,
    during: str = CREATING_A_RING,
    stop: Callable[[], str] | None = None,
) -> None:
    """Wait until every key of `keys` (rank -> key) is set; CommTimeoutError naming the ranks
    that did not set theirs within `timeout`, or at once (within LIVENESS_PERIOD_S) when the
    process of one of them, as given by `pids` (rank -> pid), is gone, or when `stop()` gives
    a reason to stop waiting ("" while there is none; e.g. another rank gave up).

    The message reads "... waiting for rank(s) [1] to {what} while {during}": `what` is the
    step a peer missed ("say which host it runs on"), `during` what this rank was doing
    ("constructing a DataParallel")."""
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        left = deadline - time.monotonic()
        step = min(left, LIVENESS_PERIOD_S) if pids or stop else left
        try:
            store.wait(list(keys.values()), timedelta(seconds=max(step, 1e-3)))
            return
        except RuntimeError as error:
            missing = [r for r, key in keys.items() if not store.check([key])]
            if not missing:
                return
            gone = [r for r in missing if pids and r in pids and not process_alive(pids[r])]
            if gone:
                raise CommTimeoutError(
                    f"rank {rank} stopped waiting for rank(s) {gone} to {what} while {during}: "
                    f"the process of rank(s) {gone} exited"
                ) from error
            reason = stop() if stop is not None else ""
            if reason:
                raise CommTimeoutError(
                    f"rank {rank} stopped waiting for rank(s) {missing} to {what} while "
                    f"{during}: {reason}"
                ) from error
            if time.monotonic() >= deadline:
                raise CommTimeoutError(
                    f"rank {rank} timed out after {timeout.total_seconds():g} s waiting for "
                    f"rank(s) {missing} to {what} while {during} (is every rank of the group "
                    f"{during}?)"
                ) from error


def wait_for_any(store: dist.Store, keys: Sequence[str], timeout: timedelta) -> bool:
    """Whether any key of `keys` is set within `timeout` (looked for every ANY_KEY_PERIOD_S);
    the store only reads."""
    deadline = time.monotonic() + timeout.total_seconds()
    while not any(store.check([key]) for key in keys):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(left, ANY_KEY_PERIOD_S))
    return True


def count_out(store: dist.Store, counter: str, world_size: int) -> bool:
    """Count this rank out at `counter`: True for the last of `world_size` ranks, which may then
    delete what they all read (the counter itself is deleted here)."""
    if store.add(counter, 1) != world_size:
        return False
    store.delete_key(counter)
    return True
