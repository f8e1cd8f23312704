"""The timeout a process group was created with, so that fastpar's waits honour the one the
user gave torch.distributed (`init_process_group(timeout=...)`, `new_group(timeout=...)`)."""

from __future__ import annotations

import numbers
from datetime import timedelta

import torch
import torch.distributed as dist

from fastpar._checks import check_positive

# The longest timeout a timedelta holds (999999999 days), in seconds.
_MAX_SECONDS = timedelta.max.total_seconds()


def as_timedelta(name: str, timeout: timedelta | float) -> timedelta:
    """`timeout` (a timedelta or seconds) as a timedelta; TypeError / ValueError naming `name`
    unless it is a finite duration > 0 that a timedelta holds."""
    if isinstance(timeout, timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, numbers.Real) and not isinstance(timeout, bool):
        seconds = timeout
    else:
        raise TypeError(
            f"{name} must be a datetime.timedelta or a number of seconds, got "
            f"{type(timeout).__name__} {timeout!r}"
        )
    seconds = check_positive(name, seconds)
    if seconds > _MAX_SECONDS:
        raise ValueError(
            f"{name} must be at most {_MAX_SECONDS:g} s (a timedelta's range), got {seconds:g}"
        )
    return timedelta(seconds=seconds)


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
