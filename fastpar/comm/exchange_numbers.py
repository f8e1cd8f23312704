"""How the ranks of a group name their store exchanges alike without a word between them: each
process counts the exchanges of each kind it has begun over each group, and the ranks begin
theirs in the same order (fastpar.comm.exchange)."""

from __future__ import annotations

import threading

import torch.distributed as dist


class ExchangeNumbers:
    """How many store exchanges of each kind over each group (its global ranks) this process
    has begun: the ranks of a group begin theirs in the same order, so the count names the same
    exchange on every rank. One per process (`PROCESS_NUMBERS`); threads that stand for ranks
    in a test hold one each."""

    def __init__(self) -> None:
        self._begun: dict[tuple[str, tuple[int, ...]], int] = {}
        self._lock = threading.Lock()

    def take(self, kind: str, ranks: tuple[int, ...]) -> str:
        """The key prefix of this process's next `kind` exchange over `ranks`."""
        with self._lock:
            index = self._begun.get((kind, ranks), 0)
            self._begun[(kind, ranks)] = index + 1
        return f"fastpar/{kind}/{'-'.join(map(str, ranks))}/{index}"

    def give_back(self, kind: str, ranks: tuple[int, ...], prefix: str) -> None:
        """Undo the `take` that gave `prefix`, the last one: this rank left no trace in that
        exchange, so its next `kind` exchange is that one again, as it is the other ranks'."""
        index = int(prefix.rsplit("/", 1)[1])
        with self._lock:
            if self._begun.get((kind, ranks)) == index + 1:
                self._begun[(kind, ranks)] = index


PROCESS_NUMBERS = ExchangeNumbers()


def exchange_prefix(kind: str, group: dist.ProcessGroup) -> str:
    """The store-key prefix of this process's next `kind` exchange over `group` (a ring, a
    host layout...), the same on every rank of the group."""
    return PROCESS_NUMBERS.take(kind, tuple(dist.get_process_group_ranks(group)))
