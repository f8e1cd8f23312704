"""Errors of fastpar's collectives; each is also a standard Python error of the same meaning."""

from __future__ import annotations

from typing import Any


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
