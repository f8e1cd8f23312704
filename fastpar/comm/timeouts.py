"""The timeout a process group was created with, so that fastpar's waits honour the one the
user gave torch.distributed (`init_process_group(timeout=...)`, `new_group(timeout=...)`). A
timeout the user gives fastpar is checked by `fastpar._checks.check_timeout`."""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist


def group_timeout(group: dist.ProcessGroup, device: torch.device | str = "cpu") -> timedelta:
    """The timeout of `group`'s backend for tensors on `device` (gloo's for CPU, NCCL's for
    CUDA; the group's other backend when it has none for that device): the `timeout` given to
    `init_process_group` or `new_group`, else `torch.distributed.default_pg_timeout`."""
    wanted = torch.device(device).type
    for device_type in (wanted, *(t for t in ("cpu", "cuda") if t != wanted)):
        try:
            timeout = group._get_backend(torch.device(device_type)).options._timeout
        except (AttributeError, RuntimeError, ValueError):  # no such backend, or a custom one
            continue
        if isinstance(timeout, timedelta) and timeout.total_seconds() > 0:
            return timeout
    return dist.default_pg_timeout
