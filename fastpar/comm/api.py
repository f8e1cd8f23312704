"""`all_reduce` with torch.distributed's signature, on fastpar's ring where it applies.

The first call for a (group, device) creates that pair's RingAllReduce (a collective step, like
the first NCCL call of a group); later calls reuse it. Its waits are bounded by the group's own
timeout (the one given to `init_process_group` or `new_group`). `close_rings()` releases them all
(also run at exit).
"""

from __future__ import annotations

import atexit
import threading

import torch
import torch.distributed as dist

from fastpar.comm.ring import RingAllReduce
from fastpar.comm.work import CopyBackWork, CudaRingWork, RingWork

_rings: dict[tuple[dist.ProcessGroup, torch.device], RingAllReduce] = {}
_rings_lock = threading.Lock()


def _ring_for(group: dist.ProcessGroup, device: torch.device) -> RingAllReduce:
    with _rings_lock:
        ring = _rings.get((group, device))
        if ring is None:
            ring = _rings[(group, device)] = RingAllReduce(group, device=device)
    return ring


def all_reduce(
    tensor: torch.Tensor,
    op: object = dist.ReduceOp.SUM,
    group: dist.ProcessGroup | None = None,
    async_op: bool = False,
) -> RingWork | CudaRingWork | CopyBackWork | dist.Work | None:
    """`torch.distributed.all_reduce` through fastpar's ring where it applies.

    Arguments:
        tensor: reduced in place; see RingAllReduce.all_reduce for what the ring handles (the
            rest goes to torch.distributed, the reason logged once).
        op: a `torch.distributed.ReduceOp`.
        group: the process group (None: the default group).
        async_op: return a work handle with `wait()` and `is_completed()` instead of waiting.

    Returns:
        None, or with `async_op` the work handle.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    pg = group if group is not None else dist.distributed_c10d._get_default_group()
    ring = _rings.get((pg, tensor.device))
    if ring is None:
        if dist.get_rank(pg) < 0:  # not a member: torch.distributed's no-op and warning
            return dist.all_reduce(tensor, op=op, group=pg, async_op=async_op)
        ring = _ring_for(pg, tensor.device)
    return ring.all_reduce(tensor, op, async_op=async_op)


def close_rings() -> None:
    """Close every ring that all_reduce created (local; later calls create new ones)."""
    with _rings_lock:
        rings = list(_rings.values())
        _rings.clear()
    for ring in rings:
        ring.close()


atexit.register(close_rings)
