"""Where a process group's collectives take their tensors, for callers that build a tensor only
to reduce or gather it (statistics, metrics)."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["collective_device"]


def collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where a tensor must live for `group`'s collectives (None: the default group): NCCL
    reduces CUDA tensors only, on the current device; gloo (and others) take CPU tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
