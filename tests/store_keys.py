"""How many keys torch.distributed's default store holds around repeated setups: for tests that
a setup (a ring, a DataParallel) leaves nothing behind in the store."""

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
