"""Keys left in a store: how many torch.distributed's default store holds around repeated setups
(`store_key_counts`), and which of the keys written through a view are still there
(`WrittenKeys`), for tests that a setup or an exchange leaves nothing behind in the store."""

from __future__ import annotations

from collections.abc import Callable

import torch.distributed as dist


def store_key_counts(setup: Callable[[], object], setups: int = 3) -> list[int]:
    """The default store's key count before the first of `setups` calls of `setup` (on every
    rank: a collective) and after each."""
    store = dist.distributed_c10d._get_default_store()
    counts = []
    for done in range(setups + 1):
        dist.barrier()  # every rank's setup (and store writes) done, none begun
        counts.append(store.num_keys())
        dist.barrier()  # every rank has counted before the next setup writes
        if done < setups:
            setup()
    return counts


class WrittenKeys:
    """A view of a store that notes every key written through it (`set`, `add`,
    `compare_set`), for tests whose ranks are threads: `left()` names those still in the store.
    Views over one store (or over clients of one TCPStore) may share one `written` set."""

    def __init__(self, store: dist.Store, written: set[str] | None = None) -> None:
        self._store = store
        self.written = set() if written is None else written

    def left(self) -> list[str]:
        return sorted(key for key in self.written if self._store.check([key]))

    def _noting(self, method: str) -> Callable[..., object]:
        def write(key: str, *args: object) -> object:
            self.written.add(key)
            return getattr(self._store, method)(key, *args)

        return write

    def __getattr__(self, name: str) -> object:
        if name in ("set", "add", "compare_set"):
            return self._noting(name)
        return getattr(self._store, name)
