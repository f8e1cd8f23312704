"""Which attempt of a torchrun job the ranks belong to, agreed through torchrun's store.

torchrun starts its workers anew after a failure, counted in TORCHELASTIC_RESTART_COUNT, and
after a membership change (a node joined while the group was healthy), not counted: the
workers get no number that tells two attempts apart. Each agent stops its workers before the
rendezvous that starts the next attempt, so what earlier attempts left in the store no longer
changes; but a rank cannot tell such a key from one its own peers just wrote. So no rank acts
on a value it cannot date:

- rank 0 counts the attempts (`add`: a number no earlier attempt had);
- every other rank takes a ticket (`add`: a number no earlier process had), writes its rank
  under it, and waits for rank 0's answer to that ticket, which holds the attempt's number;
- rank 0 answers every ticket taken before it looked (its peers that came first; those of dead
  processes too, which no one reads), then each later ticket in turn, until the last of its
  peers to read an answer takes a ticket that says all have.

Every wait ends within the timeout: a rank that does not come stops the attempt with an error
naming it, never a group made of two attempts.
"""

from __future__ import annotations

import datetime
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch.distributed as dist

_KEYS = "fastpar/attempts/"
_COUNT = _KEYS + "count"  # attempts rank 0 began on this store
_TICKETS = _KEYS + "tickets"  # tickets the other ranks took
_ANSWERED = _KEYS + "answered"  # tickets up to this one have an answer
_ALL_JOINED = "all joined"  # a ticket's text: every rank has its answer


class AttemptError(RuntimeError):
    """The ranks of an attempt could not agree on its number within the timeout."""


def join_attempt(store: dist.Store, *, rank: int, world_size: int, timeout_s: float) -> int:
    """This attempt's number on `store` (1 for the first attempt it serves), the same on every
    rank of the attempt and on no rank of any other.

    Arguments:
        store: torchrun's store (or one that rank 0 hosts for this attempt alone).
        rank, world_size: this process's place, from torchrun's environment.
        timeout_s: how long to wait for the other ranks.

    Raises:
        AttemptError: a rank did not come, or the ranks disagree on the world size.
    """
    deadline = time.monotonic() + timeout_s
    if rank == 0:
        return _lead(store, world_size, deadline, timeout_s)
    return _follow(store, rank, world_size, deadline, timeout_s)


def _lead(store: dist.Store, world_size: int, deadline: float, timeout_s: float) -> int:
    attempt = store.add(_COUNT, 1)
    answer = f"{attempt} {world_size}"
    taken = store.add(_TICKETS, 0)
    answered = int(store.get(_ANSWERED)) if store.check([_ANSWERED]) else 0
    for ticket in range(answered + 1, taken + 1):
        store.set(f"{_KEYS}answer{ticket}", answer)
    if world_size > 1:
        ticket = taken
        while True:
            ticket += 1
            key = f"{_KEYS}ticket{ticket}"
            if not _wait(store, key, deadline):
                missing = [r for r in range(1, world_size)
                           if not store.check([_joined_key(attempt, r)])]  # fmt: skip
                raise AttemptError(
                    f"rank 0: ranks {missing} of attempt {attempt} did not come within "
                    f"--timeout {timeout_s:g} s"
                )
            if store.get(key).decode() == _ALL_JOINED:
                break
            store.set(f"{_KEYS}answer{ticket}", answer)
        taken = ticket
    store.set(_ANSWERED, str(taken))
    return attempt


def _follow(store: dist.Store, rank: int, world_size: int, deadline: float,
            timeout_s: float) -> int:  # fmt: skip
    ticket = store.add(_TICKETS, 1)
    store.set(f"{_KEYS}ticket{ticket}", f"rank {rank}")
    key = f"{_KEYS}answer{ticket}"
    if not _wait(store, key, deadline):
        raise AttemptError(f"rank {rank}: rank 0 did not answer within --timeout {timeout_s:g} s")
    attempt_text, leader_world_size = store.get(key).decode().split()
    attempt = int(attempt_text)
    if int(leader_world_size) != world_size:
        raise AttemptError(
            f"rank {rank}: WORLD_SIZE {world_size} != rank 0's {leader_world_size} in "
            f"attempt {attempt}"
        )
    store.set(_joined_key(attempt, rank), "")
    if store.add(f"{_KEYS}attempt{attempt}/joined", 1) == world_size - 1:
        last = store.add(_TICKETS, 1)  # rank 0 waits for this ticket after its peers'
        store.set(f"{_KEYS}ticket{last}", _ALL_JOINED)
    return attempt


def _joined_key(attempt: int, rank: int) -> str:
    return f"{_KEYS}attempt{attempt}/rank{rank}"


def _wait(store: dist.Store, key: str, deadline: float) -> bool:
    """Wait for `key` until `deadline`; False if it did not come."""
    import torch.distributed as dist

    left = deadline - time.monotonic()
    if left <= 0:
        return store.check([key])
    try:
        store.wait([key], datetime.timedelta(seconds=left))
    except dist.DistStoreError:
        return store.check([key])
    return True
