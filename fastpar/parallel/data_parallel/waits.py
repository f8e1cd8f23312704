"""Waits for torch.distributed's collectives bounded by `DataParallel`'s timeout.

`timeout` bounds the waits through torch.distributed's gloo too (whose own bound is the
group's timeout, 30 minutes by default): one that runs out raises CommTimeoutError naming this
rank, and since gloo goes on with that collective, the wrapper is unusable afterwards
(CommClosedError), as fastpar's ring is after its timeout.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from fastpar.comm.errors import CommTimeoutError

__all__ = ["deadline", "still_running", "wait_within"]


def deadline(timeout_s: float | None) -> float | None:
    """When a wait that starts now must end (monotonic clock); None: no bound of ours (the
    group's timeout)."""
    return None if timeout_s is None else time.monotonic() + timeout_s


def wait_within(
    work: Any,
    deadline: float | None,
    what: str,
    device: torch.device,
    *,
    timeout_s: float | None,
    group: dist.ProcessGroup,
) -> None:
    """Wait for torch.distributed's `work` on tensors on `device` until `deadline` (None:
    its own bound, the group's timeout); CommTimeoutError naming this rank when it is still
    running then (`timeout_s`, the timeout the deadline came from, is in the message). A
    failure of the collective itself is raised as torch raised it.

    torch.distributed does not cancel a collective whose wait ran out: gloo completes it
    when the peer calls it, or fails it at the group's timeout. Until then it may write into
    its tensors (see `still_running`).

    CPU tensors only (gloo): NCCL's wait(timeout) blocks the host until the kernel ends,
    counts from the launch (a bucket launched early in backward would time out while the
    peers still compute theirs) and aborts the communicator when it runs out; there
    NCCL's watchdog applies the group's timeout."""
    if deadline is None or device.type != "cpu":
        work.wait()
        return
    # At least 1 ms: torch takes a zero timeout for "no bound"
    left = max(deadline - time.monotonic(), 1e-3)
    try:
        work.wait(timeout=timedelta(seconds=left))
    except Exception as error:
        if work.is_completed():  # it ended, failed: not a wait that ran out
            raise
        message = (
            f"rank {dist.get_rank()} timed out after {timeout_s:g} s waiting "
            f"for {what} through torch.distributed ({dist.get_backend(group)}): a "
            "peer has not called the collective (slow, hung, or not calling it at all)"
        )
        raise CommTimeoutError(message) from error


def still_running(timeout: CommTimeoutError) -> str:
    """Why a wrapper whose wait raised `timeout` (from `wait_within`) is unusable."""
    return (
        f"DataParallel is unusable: {timeout}, and that collective may still write "
        "into its tensors (torch.distributed ends it when the peer calls it, or at the "
        "group's timeout)"
    )
