"""Errors of fastpar's collectives; each is also a standard Python error of the same meaning."""

from __future__ import annotations


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


# Names of the native extension's exception types -> the errors above.
NATIVE_ERRORS: dict[str, type[CommError]] = {
    "RingTimeoutError": CommTimeoutError,
    "RingMismatchError": CommMismatchError,
    "RingClosedError": CommClosedError,
}


def translate_native_error(error: Exception) -> CommError:
    """The fastpar.comm error for an exception of the native extension's ring."""
    return NATIVE_ERRORS[type(error).__name__](str(error))
