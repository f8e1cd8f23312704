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

from fastpar.comm.exchange import exchange
from fastpar.comm.timeouts import group_timeout
from fastpar.parallel.data_parallel.waits import deadline, wait_within

__all__ = ["broadcast_state", "check_same_state"]

Signature = list[tuple[str, str, tuple[int, ...], str, bool]]


def state_signature(module: nn.Module) -> Signature:
    """What every rank's module must agree on: each parameter's and buffer's name, shape, dtype
    and requires_grad (a buffer that differs would block or corrupt the broadcast of state).
    Strides may differ: `broadcast_state` sends and receives every tensor that is not
    contiguous through a contiguous copy, so only the shape decides what travels."""
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
    store = dist.distributed_c10d._get_default_store()
    mine = pickle.dumps(state_signature(module))
    if timeout_s is not None:
        timeout = timedelta(seconds=timeout_s)
    else:
        device = next(state_tensors(module), torch.empty(0)).device
        timeout = group_timeout(group, device)
    posted = exchange(store, "data-parallel", group, mine, timeout,
                      "post its parameter names and shapes",
                      during="constructing a DataParallel")  # fmt: skip
    signatures = [pickle.loads(signature) for signature in posted]
    for rank, signature in enumerate(signatures):
        difference = first_difference(signature, signatures[0])
        if difference is not None:
            raise ValueError(
                "DataParallel needs the same parameters and buffers on every rank; on group "
                f"rank {rank}, {difference}"
            )


@torch.no_grad()
def broadcast_state(module: nn.Module, group: dist.ProcessGroup, timeout_s: float | None) -> None:
    """Overwrite `module`'s parameters and buffers with the group's first rank's, waiting at
    most `timeout_s` for them on CPU (`wait_within`; None: the group's timeout)."""
    until = deadline(timeout_s)
    src = dist.get_global_rank(group, 0)
    what = "the group's first rank's parameters and buffers"
    tensors = list(state_tensors(module))
    # gloo sends and receives a strided view's storage as if it were contiguous (the ranks got
    # different values, and memory outside the view was overwritten): such a tensor goes through
    # a contiguous copy, written back into it once received.
    staged = [tensor if tensor.is_contiguous() else tensor.contiguous() for tensor in tensors]
    works = [
        (dist.broadcast(copy, src=src, group=group, async_op=True), copy.device) for copy in staged
    ]
    for work, device in works:
        wait_within(work, until, what, device, timeout_s=timeout_s, group=group)
    for tensor, copy in zip(tensors, staged, strict=True):
        if copy is not tensor:
            tensor.copy_(copy)
