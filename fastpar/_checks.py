"""Argument checks shared across fastpar: every message names the argument and shows the value.

One rule for the exception type, as Python's own functions do: a value of the wrong type raises
TypeError (a bool is not a number here: `True` as a size is a bug), a value of the right type
that is out of range raises ValueError.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch.distributed as dist


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """Return `value` when it is an int in [low, high] (high None: no upper bound).

    Arguments:
        name: the argument's name, used in the message.
        value: what the caller passed.
        low: smallest allowed value.
        high: largest allowed value, or None.

    Returns:
        `value` as a Python int (a numpy integer is one too, as torch takes it for a size).

    Raises:
        TypeError: `value` is not an integer (or is a bool).
        ValueError: `value` is out of range; the message shows the bounds.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an integer {bounds}, got {value!r}")
    return value


# The largest seed a shuffle's generator takes with room for any epoch count: torch's
# manual_seed takes up to 2**64 - 1, and the slicers seed it with seed + epoch.
MAX_SHUFFLE_SEED = 2**63 - 1


def check_int_at_least(name: str, value: object, minimum: int = 1) -> int:
    """Return `value` when it is an int >= minimum; see `check_int` for what it raises."""
    return check_int(name, value, minimum)


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
        value: what the caller passed (any real number: int, float, numpy scalar).
        low: lower bound.
        high: upper bound (math.inf for none).
        low_open: exclude `low` itself.
        high_open: exclude `high` itself.

    Returns:
        `value` as a float.

    Raises:
        TypeError: `value` is not a real number (or is a bool).
        ValueError: `value` is not finite or out of range; the message shows the interval.
    """
    number = _real(name, value)
    inside = (
        math.isfinite(number)
        and (number > low if low_open else number >= low)
        and (number < high if high_open else number <= high)
    )
    if not inside:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    return number


def check_positive(name: str, value: object) -> float:
    """Return `value` as a float when it is a finite number > 0; see `check_float`."""
    number = _real(name, value)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number


# The longest timeout, in seconds (about 146 years): torch.distributed and gloo keep timeouts and
# deadlines as int64 nanoseconds, and one past 2**63 ns overflows there (gloo refuses it, a
# TCPStore times out at once); half of that leaves room for the clock reading added to it.
MAX_TIMEOUT_S = 2**62 / 1e9


def check_timeout_s(name: str, value: object) -> float:
    """Return `value`, a timeout in seconds, as a float when it is a number > 0 that every
    timeout taker holds: at most `MAX_TIMEOUT_S`, and at least a timedelta's resolution (every
    timeout becomes one: torch.distributed's, a wait's).

    Raises:
        TypeError: `value` is not a real number (or is a bool).
        ValueError: `value` is not finite, not > 0, past `MAX_TIMEOUT_S`, or below a
            timedelta's resolution.
    """
    seconds = _real(name, value)
    # An int past a float's range came out as inf, yet is finite: too large, said below.
    finite = math.isfinite(seconds) or isinstance(value, numbers.Integral)
    if not (seconds > 0 and finite):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if seconds > MAX_TIMEOUT_S:
        raise ValueError(
            f"{name} must be at most {MAX_TIMEOUT_S:.3g} s (torch.distributed keeps timeouts in "
            f"int64 nanoseconds), got {seconds:g}"
        )
    # Rounded to whole microseconds: zero would mean "no bound" to torch.
    if not timedelta(seconds=seconds):
        raise ValueError(
            f"{name} must be at least 1e-06 s (a timedelta's resolution), got {value!r}"
        )
    return seconds


def check_timeout(name: str, value: object) -> timedelta:
    """Return `value`, a timeout given as a `datetime.timedelta` or a number of seconds (as
    torch.distributed takes it), as a timedelta; the rule of `check_timeout_s` (a timedelta
    past `MAX_TIMEOUT_S`, timedelta.max say, is refused too: callers keep seconds).

    Raises:
        TypeError: `value` is neither a timedelta nor a real number (a bool is neither).
        ValueError: `value` is not a duration > 0 that `check_timeout_s` takes.
    """
    if isinstance(value, timedelta):
        if value <= timedelta(0):
            raise ValueError(f"{name} must be a finite number > 0, got {value.total_seconds()!r}")
        check_timeout_s(name, value.total_seconds())
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a datetime.timedelta or a number of seconds, got "
            f"{type(value).__name__} {value!r}"
        )
    return timedelta(seconds=check_timeout_s(name, value))


def _real(name: str, value: object) -> float:
    """`value` as a float when it is a real number: int, float, a numpy scalar (configs read
    from files hand those over), not a bool; else TypeError naming `name`. A number too large
    for a float becomes inf, which the callers' range checks refuse by name."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    try:
        return float(value)
    except OverflowError:  # an int past 1e308
        return math.inf if value > 0 else -math.inf


def check_choice(name: str, value: object, choices: Collection[object]) -> None:
    """Raise ValueError unless `value` is one of `choices` (the message lists them)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_bool(name: str, value: object) -> bool:
    """Return `value` when it is a bool, else raise TypeError (1 or "yes" is not a flag)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_member(group: dist.ProcessGroup | None) -> int:
    """Return this process's rank in `group` (None: the default group), which must be initialised.

    Raises:
        ValueError: this process is not a member of `group`.
    """
    # Imported here so that importing _checks does not import torch (the `fastpar` command
    # parses its arguments before torch is loaded).
    import torch.distributed as dist

    rank = dist.get_rank(group)
    if rank < 0:
        # A process left out of new_group(ranks) holds the placeholder NON_GROUP_MEMBER, which
        # carries no ranks: get_process_group_ranks answers for it with the ranks of the last
        # group this process was left out of, so the message cannot show the group's ranks.
        raise ValueError(
            f"group: this process (global rank {dist.get_rank()} of {dist.get_world_size()}) "
            "is not one of the group's members; call this only on its members"
        )
    return rank
