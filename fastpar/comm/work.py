"""The handle of `all_reduce(..., async_op=True)`, shaped like torch.distributed's Work."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from datetime import timedelta
from typing import Any

import torch


def _copy_back(pending: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Write a reduced contiguous copy into the caller's non-contiguous tensor: `pending` is
    (the caller's tensor, its reduced copy), or None when nothing is left to copy."""
    if pending is not None:
        tensor, reduced = pending
        with torch.no_grad():  # as in torch.distributed, autograd does not see the update
            tensor.copy_(reduced)


class RingWork:
    """An all-reduce running on the ring's worker thread.

    The tensor must not be read or written until `wait()` returns (as with torch.distributed).
    """

    def __init__(self, future: Future[None]) -> None:
        self._future = future

    def wait(self, timeout: timedelta | None = None) -> bool:
        """Block until the all-reduce is done; raise its error if it failed.

        Arguments:
            timeout: give up waiting after this long (the collective itself is bounded by the
                ring's timeout whatever is passed here).

        Returns:
            True, as torch.distributed's Work.wait does.
        """
        seconds = None if timeout is None else timeout.total_seconds()
        try:
            self._future.result(timeout=seconds)
        except TimeoutError:
            if self._future.done():  # the all-reduce's own error (a TimeoutError subclass)
                raise
            raise TimeoutError(
                f"the all-reduce was still running after wait(timeout={seconds:g} s); it goes "
                "on (bounded by the ring's timeout): wait() again before using the tensor"
            ) from None
        return True

    def is_completed(self) -> bool:
        """Whether the all-reduce has finished (successfully or not)."""
        return self._future.done()

    def is_success(self) -> bool:
        """Whether the all-reduce has finished without an error."""
        return self._future.done() and self._future.exception() is None

    def exception(self) -> BaseException | None:
        """The error of a finished all-reduce (None while it runs or when it succeeded)."""
        return self._future.exception() if self._future.done() else None


class CopyBackWork:
    """torch.distributed's work on a contiguous copy of a non-contiguous tensor: `wait()` waits
    for it, then writes the result into the caller's tensor."""

    def __init__(self, work: Any, tensor: torch.Tensor, reduced: torch.Tensor) -> None:
        self._work = work
        self._copy_back: tuple[torch.Tensor, torch.Tensor] | None = (tensor, reduced)

    def wait(self, timeout: timedelta | None = None) -> bool:
        """Wait for the all-reduce (raising its error), then copy the result back.

        Arguments:
            timeout: passed to torch.distributed's `Work.wait`.

        Returns:
            True.
        """
        if timeout is None:
            self._work.wait()
        else:
            self._work.wait(timeout)
        self._copy_back = _copy_back(self._copy_back)
        return True

    def is_completed(self) -> bool:
        """Whether torch.distributed has finished the all-reduce (the copy back happens in
        `wait()`)."""
        return bool(self._work.is_completed())

    def is_success(self) -> bool:
        """Whether the all-reduce finished without an error."""
        return bool(self._work.is_success())

    def exception(self) -> BaseException | None:
        """The all-reduce's error, if it failed."""
        return self._work.exception()


class CudaRingWork:
    """An all-reduce enqueued on the ring's CUDA stream.

    `wait()` blocks the host until the device has finished it and raises what the device found
    (a peer that timed out, named; a mismatch), so a failed all-reduce is never mistaken for a
    reduced tensor; then it orders the caller's current stream after it. (NCCL's work objects
    return at once and report failures later, which lets a caller use unreduced data.)
    """

    def __init__(
        self,
        event: torch.cuda.Event | None,
        device: torch.device,
        copy_back: tuple[torch.Tensor, torch.Tensor] | None,
        check: Callable[[], None],
    ) -> None:
        self._event = event  # None: enqueued while a CUDA graph was being captured
        self._device = device
        self._copy_back = copy_back  # (the caller's non-contiguous tensor, its reduced copy)
        self._check = check

    def wait(self, timeout: timedelta | None = None) -> bool:
        """Wait for the all-reduce; raise its error if it failed.

        Arguments:
            timeout: accepted for torch.distributed's signature; the device-side waits are
                bounded by the ring's timeout.

        Returns:
            True.

        Raises:
            CommTimeoutError, CommMismatchError: what the device found.
        """
        if self._event is not None:
            # Bounded: every device-side wait ends by the timeout, or within about 0.1 s of a
            # peer's death (the ring's watchdog thread tells the spinning kernel).
            self._event.synchronize()
            self._check()
            torch.cuda.current_stream(self._device).wait_event(self._event)
        self._copy_back = _copy_back(self._copy_back)
        return True

    def is_completed(self) -> bool:
        """Whether the device has finished the all-reduce."""
        return self._event is None or self._event.query()
