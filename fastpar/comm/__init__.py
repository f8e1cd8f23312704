"""Collective communication: the native ring all-reduce and its building blocks.

`all_reduce(tensor, op, group, async_op)` means what `torch.distributed.all_reduce` means;
`RingAllReduce` is the object behind it, for callers that manage its lifetime.
"""

from fastpar.comm.api import all_reduce, close_rings
from fastpar.comm.errors import CommClosedError, CommError, CommMismatchError, CommTimeoutError
from fastpar.comm.reduce import reduce_buffers
from fastpar.comm.ring import RingAllReduce
from fastpar.comm.work import CopyBackWork, CudaRingWork, RingWork

__all__ = [
    "CommClosedError",
    "CommError",
    "CommMismatchError",
    "CommTimeoutError",
    "CopyBackWork",
    "CudaRingWork",
    "RingAllReduce",
    "RingWork",
    "all_reduce",
    "close_rings",
    "reduce_buffers",
]
