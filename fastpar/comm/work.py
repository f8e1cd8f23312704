"""The handle of `all_reduce(..., async_op=True)`, shaped like torch.distributed's Work."""

from __future__ import annotations

from concurrent.futures import Future
from datetime import timedelta


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
        self._future.result(timeout=seconds)
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
