"""Argument checks shared by the slicers: every message names the argument and its value."""

from __future__ import annotations

import math


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """Return `value` when it is an int in [low, high] (high None: no upper bound).

    Arguments:
        name: the argument's name, used in the message.
        value: what the caller passed.
        low: smallest allowed value.
        high: largest allowed value, or None.

    Returns:
        `value`, typed as int.

    Raises:
        TypeError: `value` is not an int (bool is rejected too: `True` as a size is a bug).
        ValueError: `value` is out of range; the message shows the bounds.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def check_float(
    name: str,
    value: object,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return `value` as a float when it is finite and inside the interval from low to high.

    Arguments:
        name: the argument's name, used in the message.
        value: what the caller passed (int or float).
        low: lower bound (math.inf is allowed as `high` for no upper bound).
        high: upper bound.
        low_open: exclude `low` itself.
        high_open: exclude `high` itself.

    Returns:
        `value` as a float.

    Raises:
        TypeError: `value` is not a real number.
        ValueError: `value` is not finite or out of range; the message shows the interval.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    number = float(value)
    inside = (
        math.isfinite(number)
        and (number > low if low_open else number >= low)
        and (number < high if high_open else number <= high)
    )
    if not inside:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value}")
    return number
