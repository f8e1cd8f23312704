"""Collective communication: the native ring all-reduce, the hierarchical all-reduce across
hosts, and their building blocks.

`all_reduce(tensor, op, group, async_op)` means what `torch.distributed.all_reduce` means;
`create_all_reduce` makes the object behind it (`RingAllReduce` on one host,
`HierarchicalAllReduce` across hosts), for callers that manage its lifetime. `empty_shared`
allocates tensors in memory every rank maps, which the ring reduces without copies.
"""

from fastpar.comm.api import all_reduce, close_rings, create_all_reduce, empty_shared
from fastpar.comm.errors import CommClosedError, CommError, CommMismatchError, CommTimeoutError
from fastpar.comm.hierarchical import HierarchicalAllReduce, HierarchicalWork
from fastpar.comm.hosts import HOST_ENV, HostLayout
from fastpar.comm.reduce import reduce_buffers
from fastpar.comm.ring import RingAllReduce
from fastpar.comm.shared_area import SharedMemoryUnavailableError
from fastpar.comm.work import CopyBackWork, CudaRingWork, RingWork

__all__ = [
    "HOST_ENV",
    "CommClosedError",
    "CommError",
    "CommMismatchError",
    "CommTimeoutError",
    "CopyBackWork",
    "CudaRingWork",
    "HierarchicalAllReduce",
    "HierarchicalWork",
    "HostLayout",
    "RingAllReduce",
    "RingWork",
    "SharedMemoryUnavailableError",
    "all_reduce",
    "close_rings",
    "create_all_reduce",
    "empty_shared",
    "reduce_buffers",
]
