"""`DataParallel`: replicas of one module on the ranks of a group, with gradients averaged by
bucketed all-reduces that overlap the rest of the backward pass. Shaped like PyTorch's
`DistributedDataParallel` with `gradient_as_bucket_view=True`.

    dp = DataParallel(model, comm="auto")    # every rank; rank 0's weights everywhere
    loss_fn(dp(x), y).backward()              # returns with every .grad the average
    optimizer.step()

How a step flows:
1. Construction checks that every rank holds the same parameter set (names, shapes, dtypes)
   and broadcasts parameters and buffers from the group's first rank (initial_state.py).
2. Parameters are cut into buckets in reverse registration order, each one flat buffer that
   every parameter's gradient is a view into (buckets.py).
3. During backward, a hook per parameter scales its gradient into its bucket, and a complete
   bucket's all-reduce may start while autograd goes on; a callback at the end of backward
   launches the rest and waits for all (backward.py). A parameter no rank used keeps its
   `.grad`; one that an all-reduce failed for has none: no rank steps on unreduced gradients.

The package, one role per module:
    config.py         `DataParallelConfig`, `CommStats`, how overlap="auto" decides
    initial_state.py  the check that every rank holds the same state, the broadcast of rank 0's
    buckets.py        `Bucket`, cutting parameters into buckets and picking each one's all-reduce
    waits.py          waits for torch.distributed bounded by the timeout
    loading.py        loading a state dict: under a parent's prefix, in place while open
    backward.py       `BackwardSync`: the hooks, launching, finishing, abandoning a backward
    wrapper.py        `DataParallel`, the module
"""

from fastpar.parallel.data_parallel.config import (
    CommChoice,
    CommStats,
    DataParallelConfig,
    OverlapChoice,
    has_spare_core,
)
from fastpar.parallel.data_parallel.wrapper import DataParallel

__all__ = [
    "CommChoice",
    "CommStats",
    "DataParallel",
    "DataParallelConfig",
    "OverlapChoice",
    "has_spare_core",
]
