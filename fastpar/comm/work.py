"""The handles of `all_reduce(..., async_op=True)`, shaped like torch.distributed's Work:
`wait()`, `is_completed()`, `is_success()`, `exception()`, `result()` and `get_future()`."""

from __future__ import annotations

import abc
import contextlib
import copy
import numbers
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import torch

from fastpar._checks import check_timeout
from fastpar.comm.errors import CallFailure

# Threads that complete the futures of `get_future()` and run their callbacks. They start only
# as needed; several let a callback that waits for another all-reduce's future (PowerSGD's DDP
# hook does) leave the other futures' completions running.
COMPLETION_THREADS = 32

# What torch's Work.wait takes for "no bound" (its default, c10d's kNoTimeout).
NO_BOUND = timedelta(0)

_completion_pool: ThreadPoolExecutor | None = None
_completion_lock = threading.Lock()
# Guards every handle's creation and claiming of its future (a few instructions each): one lock
# for all handles, so that a call that never asks for a future allocates none.
_future_lock = threading.Lock()


def _completion_executor() -> ThreadPoolExecutor:
    global _completion_pool
    with _completion_lock:
        if _completion_pool is None:
            _completion_pool = ThreadPoolExecutor(
                COMPLETION_THREADS, thread_name_prefix="fastpar-work-future"
            )
        return _completion_pool


def _forget_completion_pool() -> None:
    """In a forked child: the pool's threads stayed in the parent, so the child starts its own."""
    global _completion_pool, _completion_lock, _future_lock
    _completion_pool = None
    _completion_lock = threading.Lock()
    _future_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_completion_pool)


def _wait_bound(timeout: timedelta | float | None) -> timedelta | None:
    """`wait()`'s `timeout` as the handles' `_wait` takes it: None where it sets no bound (None,
    or zero as torch's default `timedelta(0)`); any other is checked by `check_timeout`."""
    if timeout is None:
        return None
    duration = isinstance(timeout, timedelta | numbers.Real) and not isinstance(timeout, bool)
    if duration and not timeout:  # zero
        return None
    return check_timeout("timeout", timeout)


def wait_ran_out(timeout: timedelta) -> TimeoutError:
    """The error of a handle's `wait(timeout)` that ran out while its all-reduce still runs."""
    return TimeoutError(
        f"the all-reduce was still running after wait(timeout={timeout.total_seconds():g} s); "
        "it goes on (bounded by the all-reduce's own timeout): wait() again before using the "
        "tensor"
    )


class _CopyBack:
    """The write of a reduced contiguous copy into the caller's non-contiguous tensor, done once
    (by `wait()`, `result()` or the future's completion, whichever comes first): a later run
    must not undo what the caller wrote into the tensor since."""

    def __init__(self, tensor: torch.Tensor, reduced: torch.Tensor) -> None:
        self._tensor = tensor
        self._reduced: torch.Tensor | None = None if reduced is tensor else reduced
        # Only a copy to write back needs one: a contiguous tensor was reduced in place.
        self._lock: contextlib.AbstractContextManager[Any] = (
            contextlib.nullcontext() if self._reduced is None else threading.Lock()
        )

    def run(self) -> None:
        with self._lock:
            if self._reduced is not None:
                with torch.no_grad():  # as in torch.distributed, autograd does not see the update
                    self._tensor.copy_(self._reduced)
                self._reduced = None


class _Work(abc.ABC):
    """What every handle builds on its `_wait()` and `is_completed()`: `wait()`, `result()` and
    `get_future()`, with torch.distributed's meanings.

    The tensor must not be read or written until `wait()` returns or the future completes (as
    with torch.distributed).
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        self._tensor = tensor
        # CUDA: the caller's stream, on which the future's completion waits for the call and
        # writes a view's result back, as wait() there would (the view's copy was allocated on
        # it, so the allocator reuses it only after that write).
        self._call_stream = torch.cuda.current_stream(tensor.device) if tensor.is_cuda else None
        self._torch_future: torch.futures.Future[list[torch.Tensor]] | None = None
        self._future_claimed = False  # a thread is completing the future (or has)

    @abc.abstractmethod
    def _wait(self, timeout: timedelta | None) -> None:
        """Wait for the call (and write a view's result back), raising its error."""

    @abc.abstractmethod
    def is_completed(self) -> bool:
        """Whether the call has finished (successfully or not)."""

    def wait(self, timeout: timedelta | float | None = None) -> bool:
        """Block until the all-reduce is done (the tensor holds the result); raise its error if
        it failed.

        Arguments:
            timeout: give up waiting after this long (a timedelta, or seconds as torch takes
                them), where the handle can (each handle's class says how); None or zero
                (`timedelta(0)`, torch's default) sets no bound of the wait's own. The
                all-reduce itself is bounded by its own timeout.

        Returns:
            True, as torch.distributed's Work.wait does.

        Raises:
            TypeError: `timeout` is neither a timedelta, a number nor None (a bool is none).
            ValueError: `timeout` is negative, not finite, or past `check_timeout_s`'s bound.
            TimeoutError: the wait ran out; the all-reduce goes on (see `wait_ran_out`).
        """
        self._wait(_wait_bound(timeout))
        if self._torch_future is not None:  # as torch's: once wait() returns, so has the future
            self._complete_future()
            self._torch_future.wait()  # at once, or once the thread completing it has
        return True

    def result(self) -> list[torch.Tensor]:
        """The all-reduce's output, `[tensor]`, as torch.distributed's `Work.result()`.

        Raises:
            RuntimeError: the all-reduce has not finished yet (as torch's gloo work raises).
            The all-reduce's error, when it failed (never an unreduced tensor).
        """
        if not self.is_completed():
            raise RuntimeError("the all-reduce has not finished: call wait() before result()")
        self.wait()
        return [self._tensor]

    def get_future(self) -> torch.futures.Future[list[torch.Tensor]]:
        """A `torch.futures.Future` completed, without a call of `wait()`, once the all-reduce
        has finished: with `[tensor]` (a non-contiguous tensor's result written into it first),
        or with the all-reduce's error, which `fut.wait()` raises. As torch.distributed's
        `Work.get_future()`, e.g. for DDP communication hooks.

        Its callbacks (`then`, `add_done_callback`) run on a thread of fastpar's, never on the
        ring's worker, so a callback may wait for another all-reduce; inline where the future
        has already completed.

        Returns:
            The same future on every call.
        """
        with _future_lock:
            created = self._torch_future is None
            if created:
                # A future of CUDA tensors orders the waiter's stream after its value's.
                devices = [self._tensor.device] if self._tensor.is_cuda else None
                self._torch_future = torch.futures.Future(devices=devices)
            future = self._torch_future
        if created:
            if self.is_completed():
                self._complete_future()  # a finished call's future is done when returned
            else:
                self._complete_future_when_done()
        assert future is not None
        return future

    @abc.abstractmethod
    def _complete_future_when_done(self) -> None:
        """Have `_complete_future` run once the all-reduce has finished, not on this thread."""

    def _complete_future(self) -> None:
        """Complete the future with the outcome of `_wait()`: once, by the first thread here."""
        with _future_lock:
            if self._future_claimed:
                return
            self._future_claimed = True
        future = self._torch_future
        assert future is not None
        on_call_stream = (
            contextlib.nullcontext()
            if self._call_stream is None
            else torch.cuda.stream(self._call_stream)
        )
        # On the caller's stream, set_result included: it records the event that orders the
        # future's waiters after the call (and a view's write-back), on the current stream.
        with on_call_stream:
            try:
                self._wait(None)
            except Exception as error:
                future.set_exception(error)
            else:
                future.set_result([self._tensor])


class RingWork(_Work):
    """An all-reduce running on the ring's worker thread (`future`, the worker's task, reduces
    `tensor`). `wait(timeout)` gives up after `timeout`, leaving the call running."""

    def __init__(self, future: Future[Any], tensor: torch.Tensor) -> None:
        super().__init__(tensor)
        self._future = future

    def _wait(self, timeout: timedelta | None) -> None:
        try:
            self._future.result(timeout=None if timeout is None else timeout.total_seconds())
        except TimeoutError:
            if timeout is None:  # the all-reduce's own error (a subclass)
                raise
            if self._future.done():
                # It ended as the wait ran out: its own outcome, a success or its error.
                self._future.result()
                return
            raise wait_ran_out(timeout) from None

    def _complete_future_when_done(self) -> None:
        # Not on the ring's worker (where the done-callback runs): a callback there that waits
        # for another call of the ring would wait for itself.
        self._future.add_done_callback(
            lambda _: _completion_executor().submit(self._complete_future)
        )

    def is_completed(self) -> bool:
        """Whether the all-reduce has finished (successfully or not)."""
        return self._future.done()

    def is_success(self) -> bool:
        """Whether the all-reduce has finished without an error."""
        return self._future.done() and self._future.exception() is None

    def exception(self) -> BaseException | None:
        """The error of a finished all-reduce (None while it runs or when it succeeded)."""
        return self._future.exception() if self._future.done() else None


class CopyBackWork(_Work):
    """torch.distributed's `work` on `reduced`, a contiguous copy of the non-contiguous
    `tensor`: `wait()` waits for it (`timeout` passed to torch's `Work.wait`), then writes the
    result into `tensor`."""

    def __init__(self, work: Any, tensor: torch.Tensor, reduced: torch.Tensor) -> None:
        super().__init__(tensor)
        self._work = work
        self._copy_back = _CopyBack(tensor, reduced)

    def _wait(self, timeout: timedelta | None) -> None:
        if timeout is None:
            self._work.wait()
        else:
            self._work.wait(timeout)
        self._copy_back.run()

    def _complete_future_when_done(self) -> None:
        # Not on torch's thread that completes its future: the callbacks of ours may block.
        self._work.get_future().add_done_callback(
            lambda _: _completion_executor().submit(self._complete_future)
        )

    def is_completed(self) -> bool:
        """Whether torch.distributed has finished the all-reduce; once it has succeeded, a CPU
        tensor holds the result (written back here, if `wait()`, `result()` or the future's
        completion has not yet), as torch's CPU handles hold their output once completed."""
        if not self._work.is_completed():
            return False
        # CPU only: on CUDA the copy is ordered on the streams by wait(). Success is read from
        # torch's future: its Work.is_success() and exception() print deprecation warnings,
        # NCCL's refuse them, and torch 2.11's exception() cannot return its value to Python.
        if not self._tensor.is_cuda and self.is_success():
            self._copy_back.run()
        return True

    def is_success(self) -> bool:
        """Whether the all-reduce finished without an error."""
        return self._work.get_future().done() and self.exception() is None

    def exception(self) -> BaseException | None:
        """The error of a finished all-reduce (None while it runs or when it succeeded)."""
        future = self._work.get_future()
        if not future.done():
            return None
        try:
            future.value()
        except Exception as error:  # the all-reduce's failure, as wait() raises it
            return error
        return None


class CudaRingWork(_Work):
    """An all-reduce of `tensor` enqueued on the ring's CUDA stream (`reduced`: `tensor`, or
    the contiguous copy of it that the ring reduced; `event`: recorded behind the call, None
    when captured in a CUDA graph; `call`: the number the native ring gave the call;
    `reported_failure`: the first failure the device reported about the ring's calls so far,
    with the number of the call that met it, or None).

    Its verdict is read once the call has finished and kept: a later failure of the ring, or
    its close(), leaves a finished call's outcome as it was. The ring's kernels run one after
    the other in the order of their numbers, and once one has failed, the later ones return at
    once without running. So a failure of call F says of call `call`: F > call, it had ended
    before (success); F == call, this is the failure; F < call, it did not run (an error).

    `wait()` blocks the host until the device has finished it and raises what the device found
    (a peer that timed out, named; a mismatch), so a failed all-reduce is never mistaken for a
    reduced tensor; then it orders the caller's current stream after it. (NCCL's work objects
    return at once and report failures later, which lets a caller use unreduced data.) Its
    `timeout` is accepted for torch.distributed's signature; the device-side waits are bounded
    by the ring's timeout.
    """

    def __init__(
        self,
        event: torch.cuda.Event | None,
        device: torch.device,
        tensor: torch.Tensor,
        reduced: torch.Tensor,
        call: int,
        reported_failure: Callable[[], CallFailure | None],
    ) -> None:
        super().__init__(tensor)
        self._event = event  # None: enqueued while a CUDA graph was being captured
        self._device = device
        self._copy_back = _CopyBack(tensor, reduced)
        self._call = call
        self._reported_failure = reported_failure
        self._verdict: BaseException | None = None
        self._verdict_read = False

    def _wait(self, timeout: timedelta | None) -> None:
        if self._event is not None:
            # Bounded: every device-side wait ends by the timeout, or within about 0.1 s of a
            # peer's death (the ring's watchdog thread tells the spinning kernel).
            self._event.synchronize()
            failure = self._read_verdict()
            if failure is not None:
                raise copy.copy(failure)  # a fresh traceback for each raise
            torch.cuda.current_stream(self._device).wait_event(self._event)
        self._copy_back.run()

    def _read_verdict(self) -> BaseException | None:
        """The device's verdict on this (finished) call: read the first time asked, then kept."""
        if not self._verdict_read:
            verdict = self._verdict_on_this_call(self._reported_failure())
            with _future_lock:
                if not self._verdict_read:  # the first reader's stands
                    self._verdict, self._verdict_read = verdict, True
        return self._verdict

    def _verdict_on_this_call(self, failure: CallFailure | None) -> BaseException | None:
        """What the ring's first failure, `failure`, says of this call: None when it succeeded.

        Success is said of a call numbered before the failing one only, and only where it ran
        on the ring's stream. CUDA graphs: a captured call keeps the number it got at capture
        in every replay, and replays run between the ring's later calls, so numbers need not
        follow the order in which kernels run; that can only make a verdict an error, never a
        success:
        - the failing call F was captured, this call was not: numbered before F, this call was
          enqueued before the capture, so it had ended before any replay (no two calls of a
          ring run at once, see RingAllReduce.all_reduce) and did succeed; numbered after F, it
          is told it did not run, which is true when it came after the failing replay and an
          error where it succeeded before;
        - this call was captured: its replays come before and after any other call, so any
          failure but its own makes it an error (its own is the failure).
        """
        if failure is None:
            return None
        failed = failure.call
        if failed is None or failed == self._call:
            return failure.error  # its own failure, or one of an unknown call (maybe its own)
        if self._event is None:
            return type(failure.error)(
                f"this captured all-reduce (call {self._call} of the ring) does not run in the "
                f"replays after call {failed} failed: {failure.error}"
            )
        if failed > self._call:
            return None  # it had ended when the later call failed
        return type(failure.error)(
            f"this all-reduce (call {self._call} of the ring) did not run: call {failed} failed "
            f"before it: {failure.error}"
        )

    def _complete_future_when_done(self) -> None:
        # NCCL completes its future once the call is enqueued and reports a failure later; this
        # future carries the device's verdict instead, so a thread of the pool waits for the
        # event (bounded, as wait() is): CUDA offers no host callback through torch.
        _completion_executor().submit(self._complete_future)

    def is_completed(self) -> bool:
        """Whether the device has finished the all-reduce."""
        return self._event is None or self._event.query()

    def is_success(self) -> bool:
        """Whether the device has finished the all-reduce without reporting an error."""
        return self.is_completed() and self.exception() is None

    def exception(self) -> BaseException | None:
        """What the device reported once the all-reduce has finished (None while it runs or
        when it succeeded), as `wait()` would raise it."""
        if not self.is_completed():
            return None
        return self._read_verdict()
