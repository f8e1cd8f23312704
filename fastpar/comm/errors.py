"""Errors of fastpar's collectives; each is also a standard Python error of the same meaning."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

_Result = TypeVar("_Result")


class CommError(Exception):
    """Base of the errors raised by fastpar.comm."""


class CommTimeoutError(CommError, TimeoutError):
    """A peer did not arrive within the timeout (dead, hung, or not calling); the message names
    the rank waited for. The object that raised it is unusable afterwards."""


class CommMismatchError(CommError, ValueError):
    """Ranks called a collective with different sizes, dtypes or ops; raised on every rank, with
    each rank's call in the message. The object stays usable."""


class CommClosedError(CommError, RuntimeError):
    """The object was closed, or an earlier failure left it unusable (the message says which)."""


# The native extension's exception types -> the errors above; filled by native_error_types.
_BY_NATIVE_TYPE: dict[type[BaseException], type[CommError]] = {}


def native_error_types(native: Any) -> tuple[type[BaseException], ...]:
    """The exception types of the native extension `native` that `translate_native_error`
    turns into the errors above (for an `except` clause)."""
    _BY_NATIVE_TYPE.update(
        {
            native.RingTimeoutError: CommTimeoutError,
            native.RingMismatchError: CommMismatchError,
            native.RingClosedError: CommClosedError,
        }
    )
    return tuple(_BY_NATIVE_TYPE)


def translate_native_error(error: BaseException) -> CommError:
    """The fastpar.comm error for an exception of the native extension's ring."""
    return _BY_NATIVE_TYPE[type(error)](str(error))


@dataclass(frozen=True)
class CallFailure:
    """A failure a CUDA ring's device reported, and the number of the ring call that met it
    (the native ring numbers the calls it enqueues: 1, 2, ...; None: not known)."""

    error: CommError
    call: int | None


class FirstFailure:
    """The first failure a CUDA ring's device reported, kept: asked again, the native ring says
    only "unusable after an earlier failure", and once stopped, "closed". `read()` asks the
    native `check` until a failure is known or `read_last()` was called; `failed_call` gives
    the number of the call that failed once `check` has raised (-1: not known).

    The native ring tells a failure once, to whichever asks first: `check`, or a native call
    that checks first (`all_reduce`, `agree_torch_path`), which the ring makes through `call()`.
    A reader told "unusable after an earlier failure" while such a call is under way waits for
    it to keep the failure it was told, so that a timeout stays a CommTimeoutError (a
    TimeoutError) and is not kept as the less specific CommClosedError."""

    def __init__(
        self,
        check: Callable[[], None],
        native_errors: tuple[type[BaseException], ...],
        failed_call: Callable[[], int] = lambda: -1,
    ) -> None:
        self._check = check
        self._native_errors = native_errors
        self._failed_call = failed_call
        self._lock = threading.Lock()
        self._calls_ended = threading.Condition(self._lock)
        self._calls_under_way = 0
        self._failure: CallFailure | None = None
        self._asking = True

    def read(self) -> CommError | None:
        """The first failure reported so far (None: none); the same error object every time.
        Does not wait for the device."""
        failure = self.read_call_failure()
        return None if failure is None else failure.error

    def read_call_failure(self) -> CallFailure | None:
        """The first failure reported so far with the number of the call that met it (None:
        none); the same object every time. Does not wait for the device (only, once the ring
        has failed, for a native call under way to return)."""
        with self._lock:
            return self._read()

    def _read(self) -> CallFailure | None:
        if self._failure is None and self._asking:
            try:
                self._check()
            except self._native_errors as error:
                failure = translate_native_error(error)
                if isinstance(failure, CommClosedError):
                    # Maybe a call under way was told the failure itself: it keeps it.
                    self._calls_ended.wait_for(lambda: self._calls_under_way == 0)
                if self._failure is None:
                    self._failure = self._with_call(failure)
        return self._failure

    def _with_call(self, error: CommError) -> CallFailure:
        call = self._failed_call()
        return CallFailure(error, call if call >= 0 else None)

    def call(self, native_call: Callable[..., _Result], *args: Any, **kwargs: Any) -> _Result:
        """`native_call(*args, **kwargs)`, a call of the native ring that asks it for a failure
        as `check` does; a failure it raises is kept as the first one, and raised as it was."""
        with self._lock:
            self._calls_under_way += 1
        try:
            return native_call(*args, **kwargs)
        except self._native_errors as error:
            self.keep(translate_native_error(error))
            raise
        finally:
            with self._lock:
                self._calls_under_way -= 1
                self._calls_ended.notify_all()

    def keep(self, failure: CommError) -> None:
        """Keep `failure`, which a call raised, as the first one unless one is known already
        ("closed" is no failure of the device)."""
        if isinstance(failure, CommClosedError):
            return
        with self._lock:
            if self._failure is None:
                self._failure = self._with_call(failure)

    def read_last(self) -> None:
        """Read once more, then never ask `check` again: for when every call has finished and
        the native ring is about to stop."""
        with self._lock:
            self._read()
            self._asking = False
