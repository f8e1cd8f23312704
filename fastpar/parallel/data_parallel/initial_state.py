"""Construction's agreement on the replicas' state: every rank checks that every rank holds
the same parameter set (names, shapes, dtypes) and buffers, then takes the group's first rank's
parameters and buffers by broadcast.

The check goes through the default store, not a collective, so a rank that never constructs
its DataParallel is named (CommTimeoutError) instead of blocking a collective until the
group's timeout. A check that failed (a timeout, a mismatch) leaves no key in the store once
every rank has been through it, and a rank that missed it joins the others' retry.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from fastpar.comm.agreement import exchange_prefix, wait_for_ranks
from fastpar.comm.errors import CommTimeoutError
from fastpar.comm.timeouts import group_timeout
from fastpar.parallel.data_parallel.waits import deadline, wait_within

__all__ = ["broadcast_state", "check_same_state"]

Signature = list[tuple[str, str, tuple[int, ...], str, bool]]


def state_signature(module: nn.Module) -> Signature:
    """What every rank's module must agree on: each parameter's and buffer's name, shape, dtype
    and requires_grad (a buffer that differs would block or corrupt the broadcast of state)."""
    return [
        (kind, name, tuple(t.shape), str(t.dtype), t.requires_grad)
        for kind, named in (("parameter", module.named_parameters()),
                            ("buffer", module.named_buffers()))
        for name, t in named
    ]  # fmt: skip


def first_difference(mine: Signature, reference: Signature) -> str | None:
    for a, b in zip(mine, reference, strict=False):
        if a != b:
            return f"{a[0]} {a[1:]} here but {b[0]} {b[1:]} on the group's first rank"
    if len(mine) != len(reference):
        return (
            f"{len(mine)} parameters and buffers here but {len(reference)} on the group's "
            "first rank"
        )
    return None


def state_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from (p.data for p in module.parameters())
    yield from module.buffers()


def check_same_state(module: nn.Module, group: dist.ProcessGroup, timeout_s: float | None) -> None:
    """Every rank posts its parameters' and buffers' signature through the default store and
    reads everyone's, waiting at most `timeout_s` (None: the group's timeout; CommTimeoutError
    naming the ranks that did not post theirs); ValueError naming the first rank whose
    signature differs."""
    world_size = dist.get_world_size(group)
    me = dist.get_rank(group)
    store = dist.distributed_c10d._get_default_store()
    mine = pickle.dumps(state_signature(module))
    if timeout_s is not None:
        timeout = timedelta(seconds=timeout_s)
    else:
        device = next(state_tensors(module), torch.empty(0)).device
        timeout = group_timeout(group, device)
    while True:
        prefix = exchange_prefix("data-parallel", group)
        posted = _exchange(store, prefix, me, world_size, mine, timeout)
        if posted is not None:
            break
        # The other ranks gave up on that exchange before this rank took part (it came late
        # to a construction they left with a timeout): it joins their next one, their retry.
    signatures = [pickle.loads(signature) for signature in posted]
    for rank, signature in enumerate(signatures):
        difference = first_difference(signature, signatures[0])
        if difference is not None:
            raise ValueError(
                "DataParallel needs the same parameters and buffers on every rank; on group "
                f"rank {rank}, {difference}"
            )


# An exchange's outcome, set once by the first rank to decide it (store.compare_set), so every
# rank takes it: every rank posted, or a rank gave up waiting.
_COMPLETE, _ABANDONED = b"complete", b"abandoned"


def _exchange(
    store: dist.Store, prefix: str, me: int, world_size: int, mine: bytes, timeout: timedelta
) -> list[bytes] | None:
    """Every rank's signature posted under `prefix`, or None when the other ranks abandoned this
    exchange before this rank took part; CommTimeoutError when this rank abandons it.

    The ranks of a group number their exchanges alike (`exchange_prefix`) only while each rank
    takes part in each: one that missed a construction the others left with a timeout is an
    exchange behind them. The outcome tells it to catch up, instead of taking the keys the
    others posted for the failed construction as theirs for the next one."""
    keys = [f"{prefix}/{r}" for r in range(world_size)]
    outcome_key = f"{prefix}/outcome"
    try:
        if store.check([outcome_key]):  # decided without this rank, so abandoned
            return None
        store.set(keys[me], mine)
        try:
            wait_for_ranks(store, dict(enumerate(keys)), timeout, me,
                           "post its parameter names and shapes",
                           during="constructing a DataParallel")  # fmt: skip
            outcome = store.compare_set(outcome_key, "", _COMPLETE.decode())
        except CommTimeoutError:
            if store.compare_set(outcome_key, "", _ABANDONED.decode()) == _ABANDONED:
                raise
            outcome = _COMPLETE  # the last rank posted as this one gave up
        if outcome != _COMPLETE:
            return None  # came as the others gave up, their keys still posted
        return [store.get(key) for key in keys]
    finally:
        # The last rank to leave the exchange (read, given up or passed by) deletes its keys
        # (no rank may delete its own earlier: a slower one may not have read it yet), so that
        # neither a loop building wrappers nor a failed construction leaves keys in the store.
        left = f"{prefix}/left"
        if store.add(left, 1) == world_size:
            for key in [*keys, outcome_key, left]:
                store.delete_key(key)


@torch.no_grad()
def broadcast_state(module: nn.Module, group: dist.ProcessGroup, timeout_s: float | None) -> None:
    """Overwrite `module`'s parameters and buffers with the group's first rank's, waiting at
    most `timeout_s` for them on CPU (`wait_within`; None: the group's timeout)."""
    until = deadline(timeout_s)
    src = dist.get_global_rank(group, 0)
    what = "the group's first rank's parameters and buffers"
    works = [
        (dist.broadcast(tensor, src=src, group=group, async_op=True), tensor.device)
        for tensor in state_tensors(module)
    ]
    for work, device in works:
        wait_within(work, until, what, device, timeout_s=timeout_s, group=group)
