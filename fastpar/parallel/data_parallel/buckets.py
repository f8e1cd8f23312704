"""Gradient buckets: the flat buffers every parameter's gradient becomes a view into, and the
all-reduce that sums each.

Parameters are cut into buckets in reverse registration order (backward produces gradients
roughly in that order), the first bucket small so communication starts early. Each bucket is
one flat buffer; every parameter's gradient is a view into it. With `shared_buckets=True`
(CPU, fastpar's ring or hierarchical all-reduce) the buffers live in memory every rank of a
host maps (`RingAllReduce.empty_shared`, `HierarchicalAllReduce.empty_shared`), so the
all-reduce of a large bucket reads the host's peers' gradients where they lie instead of
copying them in and out (small ones copy, which is faster there); where that memory cannot
be allocated (a small /dev/shm), ordinary buffers serve, with the same results, and the
reason is logged once.

After the gradients, a buffer holds one "used" flag per parameter (see backward.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fastpar._logging import get_logger, log_once
from fastpar.parallel.data_parallel.config import DataParallelConfig

__all__ = ["FINISHED", "Bucket", "build_buckets", "is_view", "scale_into"]

logger = get_logger(__name__)

_MB = 2**20


@dataclass(eq=False)
class Bucket:
    index: int
    params: list[nn.Parameter]
    buffer: torch.Tensor  # gradients, then one "used" flag per parameter
    views: list[torch.Tensor]  # views[slot]: params[slot]'s gradient inside `buffer`
    comm: Callable[[torch.Tensor, bool], Any]  # sums a buffer (async_op: returns its work)
    through_torch: bool  # comm is torch.distributed's (its waits are bounded by ours)
    pending: int = 0
    ready: list[bool] = field(default_factory=list)
    # accumulated[slot]: params[slot] got a gradient under no_sync() since the last
    # synchronised backward, so it counts as used there (DDP's local_used_map)
    accumulated: list[bool] = field(default_factory=list)
    work: Any = None

    @property
    def numel(self) -> int:
        return self.buffer.numel() - len(self.params)

    @property
    def grads(self) -> torch.Tensor:
        return self.buffer[: self.numel]

    @property
    def flags(self) -> torch.Tensor:
        return self.buffer[self.numel :]


def build_buckets(
    params: list[nn.Parameter], config: DataParallelConfig, group: dist.ProcessGroup
) -> tuple[list[Bucket], Any]:
    """Cut `params` (those that require gradients, in registration order) into buckets.

    Returns:
        The buckets in launch order, and fastpar's all-reduce they use (None when every
        bucket goes through torch.distributed), which the caller closes. When building
        raises (e.g. comm="ring" and a bucket it cannot serve), that all-reduce is closed
        here: no close() will come for it.
    """
    builder = _BucketBuilder(config, group)
    try:
        return builder.build(params), builder.ring
    except BaseException:
        if builder.ring is not None:
            builder.ring.close()
        raise


class _BucketBuilder:
    """Builds the buckets, creating fastpar's all-reduce (`ring`) on first use."""

    def __init__(self, config: DataParallelConfig, group: dist.ProcessGroup) -> None:
        self.config = config
        self.group = group
        self.ring: Any = None
        self._shared_memory_problem: str | None = None  # why buckets are in ordinary memory

    def build(self, params: list[nn.Parameter]) -> list[Bucket]:
        buckets: list[Bucket] = []
        current: list[nn.Parameter] = []
        current_bytes = 0

        def close_bucket() -> None:
            nonlocal current, current_bytes
            if current:
                buckets.append(self._make_bucket(len(buckets), current))
            current, current_bytes = [], 0

        for param in reversed(params):
            cap = (self.config.first_bucket_mb if not buckets else self.config.bucket_cap_mb) * _MB
            if current and (
                param.dtype != current[0].dtype
                or param.device != current[0].device
                or current_bytes + param.numel() * param.element_size() > cap
            ):
                close_bucket()
            current.append(param)
            current_bytes += param.numel() * param.element_size()
        close_bucket()
        return buckets

    def _fastpar_all_reduce(self, device: torch.device) -> Any:
        """fastpar's all-reduce of the group (created on first use, collectively)."""
        if self.ring is None:
            from fastpar.comm import create_all_reduce

            self.ring = create_all_reduce(
                self.group,
                device=device,
                timeout=self.config.timeout_s,
                serve_shared_gpu=self.config.comm == "ring",
            )
        return self.ring

    def _bucket_buffer(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A zero-filled bucket: in fastpar's shared memory where fastpar will reduce it and
        that memory can be allocated (the same verdict on every rank), else ordinary memory."""
        if self.config.comm != "torch" and self.config.shared_buckets and device.type == "cpu":
            from fastpar.comm import SharedMemoryUnavailableError

            ring = self._fastpar_all_reduce(device)
            probe = torch.empty(0, dtype=dtype)
            if ring.should_use(probe, dist.ReduceOp.SUM) and self._shared_memory_problem is None:
                try:
                    return ring.empty_shared(numel, dtype=dtype)
                except SharedMemoryUnavailableError as error:
                    self._shared_memory_problem = str(error)  # the same on every rank
                    if dist.get_rank() == 0:
                        log_once(
                            logger, f"DataParallel keeps its buckets in ordinary memory: {error}"
                        )
        return torch.zeros(numel, dtype=dtype, device=device)

    def _comm_for(self, buffer: torch.Tensor) -> tuple[Callable[[torch.Tensor, bool], Any], bool]:
        """The sum of this bucket across the group (the hooks divided the gradients already),
        and whether torch.distributed computes it."""
        choice = self.config.comm
        if choice != "torch":
            ring = self._fastpar_all_reduce(buffer.device)
            if ring.should_use(buffer, dist.ReduceOp.SUM):
                return (lambda tensor, async_op: ring.all_reduce(tensor, async_op=async_op)), False
            reason = ring.fallback_reason(buffer, dist.ReduceOp.SUM)
            if choice == "ring":
                raise ValueError(
                    f"comm='ring' was requested but fastpar's all-reduce cannot serve this "
                    f"{buffer.dtype} bucket on {buffer.device}: {reason}; use comm='auto'"
                )
            if dist.get_rank() == 0:  # once per run (create_all_reduce said why for a layout)
                log_once(logger, f"DataParallel uses torch.distributed: {reason}")
        group = self.group
        return (
            lambda tensor, async_op: dist.all_reduce(tensor, group=group, async_op=async_op)
        ), True

    def _make_bucket(self, index: int, params: list[nn.Parameter]) -> Bucket:
        total = sum(p.numel() for p in params)
        buffer = self._bucket_buffer(total + len(params), params[0].dtype, params[0].device)
        views, start = [], 0
        for param in params:
            views.append(buffer[start : start + param.numel()].view_as(param))
            start += param.numel()
        comm, through_torch = self._comm_for(buffer)
        return Bucket(
            index=index,
            params=params,
            buffer=buffer,
            views=views,
            comm=comm,
            through_torch=through_torch,
            pending=len(params),
            ready=[False] * len(params),
            accumulated=[False] * len(params),
        )


def is_view(grad: torch.Tensor | None, view: torch.Tensor) -> bool:
    """Whether `grad` is the bucket view `view` (the same memory, shape and strides)."""
    return (
        grad is not None
        and grad.layout == torch.strided  # a sparse one has no data pointer
        and grad.data_ptr() == view.data_ptr()
        and grad.stride() == view.stride()
    )


@torch.no_grad()
def scale_into(view: torch.Tensor, grad: torch.Tensor, scale: float) -> None:
    """view = grad * scale, in the one pass that copies the gradient into its bucket."""
    if grad.layout != torch.strided:  # Embedding(sparse=True): buckets are dense
        grad = grad.to_dense()
    if scale == 1.0:
        view.copy_(grad)
    else:
        torch.mul(grad, scale, out=view)


class _Finished:
    """The work of an all-reduce that ran synchronously."""

    def wait(self) -> bool:
        return True


FINISHED = _Finished()
