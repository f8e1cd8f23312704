"""Exchanges through the store that every rank of a group takes part in: each rank posts a
record and reads every rank's, so all take the same path (the ring, or torch.distributed) even
when only one rank cannot serve it (`agree`).

The setups' exchanges (the rings', the host layout's, the shared areas', DataParallel's state
check, `agree`) go through `StoreExchange`: every stage ends with one outcome for all ranks, a
rank that missed a setup the others gave up on catches up with their retry (or gives up without
a trace when none comes), and none leaves keys in the store once every rank is through it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch.distributed as dist

from fastpar.comm.errors import CommTimeoutError
from fastpar.comm.exchange_numbers import PROCESS_NUMBERS, ExchangeNumbers
from fastpar.comm.store_waits import CREATING_A_RING, count_out, wait_for_any, wait_for_ranks


def agree(
    store: dist.Store,
    prefix: str,
    rank: int,
    world_size: int,
    problem: str,
    timeout: timedelta,
    what: str,
    pids: dict[int, int] | None = None,
    *,
    during: str = CREATING_A_RING,
) -> str | None:
    """Every rank's verdict on one question, combined: None when no rank has a problem, else the
    first problem in rank order ("rank 1: ..."), the same string on every rank. The last rank
    to leave deletes the verdicts, whether the ranks agreed or a rank gave up waiting.

    Arguments:
        store: the group's store; `prefix` must be unique to this question and group.
        rank, world_size: this rank and the group's size.
        problem: "" when this rank can take the path, else why not.
        timeout: how long to wait for the other ranks' verdicts.
        what: what the ranks are deciding, for the timeout's message.
        pids: rank -> pid of the peers whose death ends the wait early (`wait_for_ranks`).
        during: what the ranks are creating, for the timeout's message (`wait_for_ranks`).
    """
    with StoreExchange(store, rank, world_size, timeout, during=during, pids=pids) as question:
        verdicts = question.begin_at(prefix, _verdict(problem), what)
    if verdicts is None:
        raise CommTimeoutError(f"rank {rank} came to {what} while {during} {question.late_to}")
    return _first_problem(verdicts)


def _verdict(problem: str) -> bytes:
    return ("no: " + problem if problem else "ok").encode()


def _first_problem(verdicts: Sequence[bytes]) -> str | None:
    for r, verdict in enumerate(verdicts):
        if verdict != b"ok":
            return f"rank {r}: {verdict.decode().removeprefix('no: ')}"
    return None


# Each stage's outcome, set once by the first rank to decide it, so every rank takes the same:
# every rank posted its record ("complete"), or a rank gave up waiting ("abandoned by rank R")
# or left the exchange on an error ("abandoned by rank R on an error"). compare_set(key, "",
# value) sets a missing key on TCPStore, FileStore, HashStore and PrefixStore alike, and returns
# the value that holds afterwards.
_COMPLETE, _ABANDONED, _ON_AN_ERROR = b"complete", b"abandoned by rank ", b" on an error"


def _who_abandoned(outcome: bytes, *, late: bool) -> str:
    """Which rank abandoned a stage and how, from its outcome: as a reason for a rank still
    waiting to stop ("rank 0 gave up waiting for them first"), or, `late`, for one that came
    to the stage after ("after rank 0 had given up waiting for it")."""
    rank = outcome.removeprefix(_ABANDONED).removesuffix(_ON_AN_ERROR).decode()
    left = outcome.endswith(_ON_AN_ERROR)
    if late:
        return f"after rank {rank} had {'left on an error' if left else 'given up waiting for it'}"
    return f"rank {rank} {'left on an error' if left else 'gave up waiting for them first'}"


class StoreExchange:
    """Records the ranks of a group exchange through the store under one key prefix, in stages
    (a ring's setup: hosts, then handles, then verdicts); the first stage decides whether the
    exchange happens.

    Every stage has an outcome, set once: complete (every rank posted its record) or abandoned
    (a rank gave up waiting, or left the exchange on an error), so all ranks take the same path
    through it: all read every record, or all raise CommTimeoutError. The ranks still waiting in
    an abandoned stage stop at once (within LIVENESS_PERIOD_S), naming the rank that gave up,
    rather than wait out their own timeouts; a rank that comes to it later raises at once.

    The ranks number their exchanges alike (`exchange_prefix`) only while each rank takes part in
    each: a rank that missed a setup the others left with a timeout is an exchange behind them.
    So a rank that finds the first stage (`begin`) abandoned before it took part joins the next
    exchange, the others' retry, instead of reading what they posted for the failed one as
    current; it posts there only once another rank has, so when none retries it leaves nothing.

    Leaving (`leave`, or the end of a `with` block) is this rank's word that it reads no key of
    the exchange any more, whether it succeeded or failed: the last rank to leave deletes every
    key any rank posted through this object, so neither a loop of setups nor a failed one grows
    the store. An exchange one rank never comes to (its process died, or it stopped setting up
    while another waited there in time) keeps its keys. A `with` block left on an exception
    abandons the stage this rank will not post in, so the others stop waiting for it at once.

    Arguments:
        store: the group's store (`dist.distributed_c10d._get_default_store()`).
        rank, world_size: this rank and the group's size.
        timeout: how long each wait for the other ranks may take.
        during: what the ranks are doing, for the timeouts' messages (`wait_for_ranks`).
        pids: rank -> pid of the peers whose death ends a wait early; the attribute may be set
            once the first stage has told them.
        numbers: how `begin` numbers the exchanges (this process's count, `PROCESS_NUMBERS`).
    """

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        world_size: int,
        timeout: timedelta,
        *,
        during: str,
        pids: dict[int, int] | None = None,
        numbers: ExchangeNumbers = PROCESS_NUMBERS,
    ) -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout
        self.during = during
        self.pids = pids
        self.numbers = numbers
        self.prefix = ""  # set by `begin`, "" again once this rank has left
        self._posted: list[str] = []
        self._stage = 0  # the stage this rank is in, or comes to next
        self.late_to = ""  # why `begin_at` last returned None ("after rank 0 had given up...")

    def begin(self, kind: str, group: dist.ProcessGroup, mine: bytes, what: str) -> list[bytes]:
        """Post `mine` as this rank's first record of its next `kind` exchange over `group` and
        return every rank's, by rank. An exchange the others abandoned before this rank came is
        skipped, and in the next one (their retry) this rank posts only once another rank has.
        CommTimeoutError naming the ranks that did not post within the timeout, or, when this
        rank skipped an exchange and no rank came to the next, saying it was late."""
        ranks = tuple(dist.get_process_group_ranks(group))
        late_to = ""
        while True:
            prefix = self.numbers.take(kind, ranks)
            if late_to and not self._retried(prefix):
                # The others gave up and did not retry: this rank was the late one. It wrote
                # nothing here, so it leaves no key and hands the number back: its next setup
                # is this exchange again, as theirs is.
                self.numbers.give_back(kind, ranks, prefix)
                raise CommTimeoutError(
                    f"rank {self.rank} came to {what} while {self.during} {late_to}, and no "
                    f"rank retried within {self.timeout.total_seconds():g} s"
                )
            records = self.begin_at(prefix, mine, what)
            if records is not None:
                return records
            late_to = self.late_to

    def _retried(self, prefix: str) -> bool:
        """Whether another rank posts its first record at `prefix`, or decides its first stage,
        within the timeout; this rank only reads."""
        firsts = [f"{prefix}/first/{r}" for r in range(self.world_size) if r != self.rank]
        return wait_for_any(self.store, [*firsts, f"{prefix}/outcome/0"], self.timeout)

    def begin_at(self, prefix: str, mine: bytes, what: str) -> list[bytes] | None:
        """`begin` at a prefix the caller has made unique; None (this rank has left it) when the
        other ranks abandoned it before this rank took part, CommTimeoutError when a rank gave
        up after this one posted."""
        if self.prefix:
            raise RuntimeError(f"rank {self.rank} began {prefix} before leaving {self.prefix}")
        self.prefix, self._stage = prefix, 0
        outcome, keys = self._take_part("first", mine, what)
        if outcome != _COMPLETE and keys:
            # This rank posted, and another gave up on it meanwhile: it fails with them. (A
            # skip would take their retry for this exchange and blame this rank as late.)
            raise CommTimeoutError(f"rank {self.rank} came to {what} while {self.during} "
                                   f"{_who_abandoned(outcome, late=True)}")  # fmt: skip
        if outcome != _COMPLETE:
            self.late_to = _who_abandoned(outcome, late=True)
            self.leave()  # came as the others gave up: their retry is the next exchange
            return None
        return [self.store.get(key) for key in keys.values()]

    def _take_part(self, name: str, mine: bytes | str, what: str) -> tuple[bytes, dict[int, str]]:
        """Post `mine` as this rank's `name` in the current stage and wait for every rank's.
        Returns the stage's outcome (abandoned when another rank gave up before this one was
        through) and the records' keys; CommTimeoutError when this rank gave up itself, or
        stopped because another did."""
        outcome_key = self._outcome_key(self._stage)
        if self.store.check([outcome_key]):  # decided without this rank, so abandoned
            return self.store.get(outcome_key), {}
        keys = self._post_mine(name, mine)
        try:
            self.wait(keys, what)  # stops at once once another rank abandoned the stage
            outcome = self._decide(outcome_key, _COMPLETE)
        except CommTimeoutError:
            if self._decide(outcome_key, _ABANDONED + str(self.rank).encode()) != _COMPLETE:
                raise
            outcome = _COMPLETE  # the last rank posted as this one gave up
        if outcome == _COMPLETE:
            self._stage += 1
        return outcome, keys

    def _decide(self, outcome_key: str, outcome: bytes) -> bytes:
        """Set the stage's outcome unless a rank did first; the outcome that holds."""
        self._posted.append(outcome_key)  # every rank that may set it lists it for deletion
        return self.store.compare_set(outcome_key, "", outcome)

    def _outcome_key(self, stage: int) -> str:
        return self.key(f"outcome/{stage}")

    def _abandoned_by(self, outcome_key: str) -> str:
        """Which rank abandoned the stage, as a reason to stop waiting; "" while none has."""
        if not self.store.check([outcome_key]):
            return ""
        outcome = self.store.get(outcome_key)
        if not outcome.startswith(_ABANDONED):
            return ""
        return _who_abandoned(outcome, late=False)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def post(self, name: str, value: bytes | str) -> None:
        """Set `name` (under the prefix) for the other ranks; deleted once every rank left."""
        if not self.prefix:
            raise RuntimeError(f"rank {self.rank} posted {name!r} outside an exchange: begin first")
        self.store.set(self.key(name), value)
        self._posted.append(self.key(name))

    def wait(
        self, keys: dict[int, str], what: str, *, stop: Callable[[], str] | None = None
    ) -> None:
        """`wait_for_ranks` for `keys` (rank -> key) with this exchange's timeout and pids; by
        default it stops once a rank abandoned the stage this rank is in or comes to next."""
        if stop is None and self.prefix:
            stop = functools.partial(self._abandoned_by, self._outcome_key(self._stage))
        wait_for_ranks(self.store, keys, self.timeout, self.rank, what, self.pids,
                       during=self.during, stop=stop)  # fmt: skip

    def gather(self, name: str, mine: bytes | str, what: str) -> list[bytes]:
        """A later stage: post `mine` as this rank's `name` and return every rank's, by rank.
        CommTimeoutError on every rank when a rank gave up (or left) before all were through,
        at once for a rank that comes to it after."""
        outcome, keys = self._take_part(name, mine, what)
        if outcome != _COMPLETE:
            raise CommTimeoutError(f"rank {self.rank} came to {what} while {self.during} "
                                   f"{_who_abandoned(outcome, late=True)}")  # fmt: skip
        return [self.store.get(key) for key in keys.values()]

    def agree(self, name: str, problem: str, what: str) -> str | None:
        """Every rank's verdict, as `agree`: None, or the first problem ("rank 1: ...")."""
        return _first_problem(self.gather(name, _verdict(problem), what))

    def leave(self) -> None:
        """This rank reads no key of the exchange any more; the last rank to leave deletes them
        all (no rank deletes its own earlier: a slower one may not have read them yet)."""
        # No rank loses a key it will still read: each rank reads and writes the exchange's
        # keys only before it counts out here, and they go once every rank of the group has
        # counted out. A rank that came late reads the first stage's outcome and counts out
        # too; one that waited in vain for the others' retry (`begin`) wrote nothing there and
        # will count out of it when it comes back. An exchange a rank never comes to keeps
        # them all: nobody can tell that rank will not come.
        if not self.prefix:
            return
        prefix, posted = self.prefix, self._posted
        self.prefix, self._posted = "", []
        self.store.set(f"{prefix}/left/{self.rank}", "\n".join(dict.fromkeys(posted)))
        if not count_out(self.store, f"{prefix}/left", self.world_size):
            return
        for r in range(self.world_size):
            lists = f"{prefix}/left/{r}"
            for key in filter(None, self.store.get(lists).decode().split("\n")):
                self.store.delete_key(key)  # an outcome several ranks listed: gone after the first
            self.store.delete_key(lists)

    def _abandon(self) -> None:
        """Leaving on an error, this rank posts in no later stage: it abandons the one it is in,
        or, when the others completed that one with its record, the next one."""
        left = _ABANDONED + str(self.rank).encode() + _ON_AN_ERROR
        if self._decide(self._outcome_key(self._stage), left) == _COMPLETE:
            self._decide(self._outcome_key(self._stage + 1), left)

    def _post_mine(self, name: str, mine: bytes | str) -> dict[int, str]:
        self.post(f"{name}/{self.rank}", mine)
        return {r: self.key(f"{name}/{r}") for r in range(self.world_size)}

    def __enter__(self) -> StoreExchange:
        return self

    def __exit__(self, exc_type: object, error: BaseException | None, traceback: object) -> None:
        if error is None:
            self.leave()
            return
        prefix = self.prefix
        try:
            if prefix:
                self._abandon()
            self.leave()
        except Exception as store_error:  # e.g. the store's server is gone: keep the cause
            error.add_note(f"rank {self.rank} could not leave the store exchange {prefix}: "
                           f"{type(store_error).__name__}: {store_error}")  # fmt: skip


def exchange(
    store: dist.Store,
    kind: str,
    group: dist.ProcessGroup,
    mine: bytes,
    timeout: timedelta,
    what: str,
    *,
    during: str,
    pids: dict[int, int] | None = None,
) -> list[bytes]:
    """Every rank's record of a one-stage exchange (`StoreExchange.begin`), by rank; its keys
    are deleted once every rank is through it. CommTimeoutError, reading "rank R timed out
    after T s waiting for rank(s) [..] to {what} while {during}", when a rank does not post."""
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    with StoreExchange(store, rank, world_size, timeout, during=during, pids=pids) as records:
        return records.begin(kind, group, mine, what)
