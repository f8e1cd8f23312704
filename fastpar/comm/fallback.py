"""Calls that go to torch.distributed, made safe for any tensor layout.

torch.distributed's CPU backend (gloo) reduces a tensor's storage as if it were contiguous: on a
strided or transposed view it reads and writes the wrong elements, some outside the view. Here a
non-contiguous view is reduced through a contiguous copy that is written back (on `wait()` for
an asynchronous call); a view whose elements share memory (as after `expand()`) is refused.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fastpar.comm.work import CopyBackWork


def has_internal_overlap(tensor: torch.Tensor) -> bool:
    """Whether two elements of `tensor` may share memory (as after expand()); conservative."""
    extent = 1
    dims = zip(tensor.stride(), tensor.shape, strict=True)
    for stride, size in sorted((s, n) for s, n in dims if n > 1):
        if stride < extent:
            return True
        extent += stride * (size - 1)
    return False


def dense(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` when contiguous, else a contiguous copy of it (the caller copies the result
    back).

    Raises:
        ValueError: elements of `tensor` share memory, so an in-place reduction is ill-defined.
    """
    if tensor.is_contiguous():
        return tensor
    if has_internal_overlap(tensor):
        raise ValueError(
            "tensor has elements that share memory (as after expand()), so an in-place "
            "all_reduce is ill-defined; pass tensor.clone()"
        )
    return tensor.detach().contiguous()


def torch_all_reduce(
    tensor: torch.Tensor, op: object, group: dist.ProcessGroup, async_op: bool
) -> dist.Work | CopyBackWork | None:
    """`torch.distributed.all_reduce(tensor, op, group, async_op)` for a tensor of any layout:
    elements outside a view are never touched."""
    target = dense(tensor)
    work = dist.all_reduce(target, op=op, group=group, async_op=async_op)
    if target is tensor:
        return work
    if async_op:
        return CopyBackWork(work, tensor, target)
    with torch.no_grad():  # as in torch.distributed, autograd does not see the update
        tensor.copy_(target)
    return None
