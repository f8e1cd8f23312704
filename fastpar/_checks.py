"""Argument checks shared across fastpar's modules."""

from __future__ import annotations


def check_int_at_least(name: str, value: object, minimum: int = 1) -> int:
    """Return `value` when it is an int >= minimum (bool is not: `True` as a size is a bug);
    else raise ValueError naming the argument, the bound and the value."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value
