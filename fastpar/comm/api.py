"""`all_reduce` with torch.distributed's signature, on fastpar's collectives where they apply.

The first call for a (group, device) learns which hosts the group's ranks are on and creates the
all-reduce that layout calls for (`create_all_reduce`; a collective step, like the first NCCL
call of a group): the ring when all ranks share a host, the hierarchical all-reduce when several
hosts hold the same number (>= 2) of ranks, else one that hands every call to torch.distributed;
the choice and its reason are logged once on global rank 0. Later calls reuse it. Its
waits are bounded by the group's own timeout (the one given to `init_process_group` or
`new_group`). `close_rings()` releases them all (also run at exit); those of a group that
`destroy_process_group` destroyed are released at the next call that creates one.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from fastpar._checks import check_member, check_timeout
from fastpar._logging import get_logger, log_once
from fastpar.comm.hierarchical import HierarchicalAllReduce, HierarchicalWork
from fastpar.comm.hosts import gather_host_layout
from fastpar.comm.ring import RingAllReduce
from fastpar.comm.timeouts import group_timeout
from fastpar.comm.work import CopyBackWork, CudaRingWork, RingWork

logger = get_logger(__name__)

AllReduce = RingAllReduce | HierarchicalAllReduce

_rings: dict[tuple[dist.ProcessGroup, torch.device], AllReduce] = {}
_rings_lock = threading.Lock()


def create_all_reduce(
    group: dist.ProcessGroup | None = None,
    *,
    device: torch.device | str = "cpu",
    timeout: timedelta | float | None = None,
    serve_shared_gpu: bool = False,
) -> AllReduce:
    """The all-reduce for `group`'s hosts (collective over `group`; the caller closes it).

    Arguments:
        group: the process group (None: the default group).
        device: the device whose tensors it reduces.
        timeout: bound on every wait for a peer (None: the group's own timeout).
        serve_shared_gpu: CUDA: let the ring serve ranks that share one GPU (see
            RingAllReduce).

    Returns:
        A RingAllReduce when every rank shares this host; else a HierarchicalAllReduce, which
        runs where several hosts hold the same number (>= 2) of ranks and otherwise hands every
        call to torch.distributed (its `fallback_reason` says why).

    Raises:
        ValueError: this process is not a member of `group`.
    """
    pg = group if group is not None else dist.group.WORLD
    check_member(pg)  # else the host exchange fails with KeyError: -1
    wait = group_timeout(pg, device) if timeout is None else check_timeout("timeout", timeout)
    layout = gather_host_layout(pg, wait)
    path, reason = layout.path()
    if path == "ring":
        reducer: AllReduce = RingAllReduce(
            pg, device=device, timeout=wait, serve_shared_gpu=serve_shared_gpu
        )
    else:
        reducer = HierarchicalAllReduce(pg, device=device, timeout=wait, layout=layout,
                                        serve_shared_gpu=serve_shared_gpu)  # fmt: skip
        if path == "hierarchical" and not reducer.should_use(torch.empty(0, device=device)):
            path, reason = "torch", str(reducer.fallback_reason(torch.empty(0, device=device)))
    if dist.get_rank() == 0:  # once per run, not once per group
        log_once(logger, f"fastpar all-reduce: {path} ({reason})")
    return reducer


def _ring_for(group: dist.ProcessGroup, device: torch.device) -> AllReduce:
    with _rings_lock:
        ring = _rings.get((group, device))
    if ring is not None:  # the per-call path: nothing more
        return ring
    _close_rings_of_destroyed_groups()  # a group made after a destroy gets here first
    with _rings_lock:
        ring = _rings.get((group, device))
        if ring is None:
            ring = _rings[(group, device)] = create_all_reduce(group, device=device)
    return ring


def all_reduce(
    tensor: torch.Tensor,
    op: object = dist.ReduceOp.SUM,
    group: dist.ProcessGroup | None = None,
    async_op: bool = False,
) -> RingWork | CudaRingWork | CopyBackWork | HierarchicalWork | dist.Work | None:
    """`torch.distributed.all_reduce` through fastpar's collectives where they apply.

    Arguments:
        tensor: reduced in place; see RingAllReduce.all_reduce and HierarchicalAllReduce for
            what they handle (the rest goes to torch.distributed, the reason logged once).
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


def empty_shared(
    size: int,
    *,
    dtype: torch.dtype = torch.float32,
    group: dist.ProcessGroup | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """A zero-filled tensor in memory every rank of `group` maps, which `all_reduce` reduces
    without copying it in or out (collective: every rank allocates the same sizes in the same
    order). See RingAllReduce.empty_shared (ranks on one host) and
    HierarchicalAllReduce.empty_shared (several hosts: memory shared inside each host).

    Arguments:
        size: number of elements.
        dtype: the element type.
        group: the process group (None: the default group).
        device: the device whose all-reduce serves it (CPU so far).

    Returns:
        A 1-D tensor of `size` elements.

    Raises:
        ValueError: this process is not a member of `group`.
        SharedMemoryUnavailableError: on every rank, when it cannot be allocated (the reason
            says why: /dev/shm too small, one rank per host or uneven hosts, CUDA).
    """
    pg = group if group is not None else dist.distributed_c10d._get_default_group()
    return _ring_for(pg, torch.device(device)).empty_shared(size, dtype=dtype)


def _forget_rings(which: Callable[[dist.ProcessGroup], bool]) -> list[AllReduce]:
    """Take the all-reduces of the groups `which` picks out of the registry (the caller closes
    them, outside the lock: a close waits for the calls still queued)."""
    with _rings_lock:
        keys = [key for key in _rings if which(key[0])]
        return [_rings.pop(key) for key in keys]


def _close_rings_of_destroyed_groups() -> None:
    """Close the all-reduces of the groups that `destroy_process_group` has destroyed, which
    torch.distributed no longer registers (it calls no hook): else each cycle of
    destroy/init_process_group would leave one mapped until `close_rings()`. Their closes are
    local, waiting for no peer (see RingAllReduce.close)."""
    registered = dist.distributed_c10d._world.pg_map
    for ring in _forget_rings(lambda group: group not in registered):
        ring.close()


def close_rings() -> None:
    """Close every all-reduce that all_reduce created (local; later calls create new ones)."""
    for ring in _forget_rings(lambda group: True):
        ring.close()


atexit.register(close_rings)
