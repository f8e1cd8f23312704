"""fastpar._checks: a real number of any type (int, float, numpy scalar, Fraction) is taken as
its float, a bool never; and every timeout argument in fastpar is one rule, `check_timeout_s` /
`check_timeout`, whatever it is called and wherever it is given."""

from __future__ import annotations

import math
from datetime import timedelta
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

from fastpar._checks import (
    MAX_TIMEOUT_S,
    check_float,
    check_positive,
    check_timeout,
    check_timeout_s,
)
from fastpar.comm.work import _wait_bound
from fastpar.parallel.data_parallel.config import DataParallelConfig
from fastpar.parallel.pipeline.config import PipelineConfig
from fastpar.training.config import TrainConfig

# What a config read with numpy, or computed, hands over: each is a numbers.Real.
REAL_NUMBERS = [3, 2.5, np.int64(3), np.int32(2), np.float32(1.5), np.float64(2.5), Fraction(1, 2)]


@pytest.mark.parametrize("value", REAL_NUMBERS, ids=lambda v: type(v).__name__)
def test_a_real_number_of_any_type_is_taken_as_its_float(value: object) -> None:
    """check_positive and check_float took int and float only, refusing the numpy integers and
    float32 that the timeout checks took."""
    expected = float(value)  # type: ignore[arg-type]
    assert check_positive("x", value) == expected
    assert check_float("x", value, 0.0, math.inf, low_open=True) == expected
    assert check_timeout_s("timeout", value) == expected
    assert check_timeout("timeout", value) == timedelta(seconds=expected)


@pytest.mark.parametrize("value", [True, np.bool_(True), "5", None, timedelta(seconds=5)])
def test_what_is_no_number_is_refused_with_a_type_error_naming_it(value: object) -> None:
    for check in (check_positive, check_timeout_s):
        with pytest.raises(TypeError, match=rf"^x must be a number, got {type(value).__name__}"):
            check("x", value)


def test_a_huge_integer_is_refused_as_out_of_range() -> None:
    """float(10**400) raises OverflowError; the checks say which argument is too large."""
    with pytest.raises(ValueError, match=r"^x must be a finite number > 0, got 1000"):
        check_positive("x", 10**400)
    with pytest.raises(ValueError, match=r"^x must be a finite number in \[0.0, 1.0\]"):
        check_float("x", 10**400, 0.0, 1.0)


# Bad timeouts, with the message each gets; None of them is a duration a timedelta holds.
BAD_TIMEOUTS = [
    (0, ValueError, r"must be a finite number > 0, got 0"),
    (-1.0, ValueError, r"must be a finite number > 0, got -1.0"),
    (np.float64("nan"), ValueError, r"must be a finite number > 0, got np.float64\(nan\)"),
    (math.inf, ValueError, r"must be a finite number > 0, got inf"),
    # Past int64 nanoseconds' half: gloo refuses it, a TCPStore times out at once.
    (MAX_TIMEOUT_S * 1.01, ValueError, r"must be at most 4.61e\+09 s \(torch.distributed keeps"),
    (timedelta.max.total_seconds(), ValueError, r"must be at most 4.61e\+09 s \(torch"),
    (10**400, ValueError, r"must be at most 4.61e\+09 s \(torch"),
    # Rounds to timedelta(0), which torch's waits read as "no bound".
    (1e-7, ValueError, r"must be at least 1e-06 s \(a timedelta's resolution\), got 1e-07"),
    (True, TypeError, r"must be a (datetime.timedelta or a )?number.*, got bool True"),
    ("5", TypeError, r"must be a (datetime.timedelta or a )?number.*, got str '5'"),
]


@pytest.mark.parametrize(("value", "error", "message"), BAD_TIMEOUTS)
def test_a_timeout_that_is_no_duration_is_refused_by_name(
    value: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match="^timeout " + message):
        check_timeout("timeout", value)
    with pytest.raises(error, match="^timeout_s " + message):
        check_timeout_s("timeout_s", value)


def test_a_timedelta_is_a_timeout_as_it_is() -> None:
    for value in (timedelta(microseconds=1), timedelta(minutes=30)):
        assert check_timeout("timeout", value) is value
    # Accepted, then refused in seconds by the next check under another name, before.
    with pytest.raises(ValueError, match=r"^timeout must be at most 4.61e\+09 s"):
        check_timeout("timeout", timedelta.max)
    for value in (timedelta(0), timedelta(seconds=-1)):
        with pytest.raises(ValueError, match=r"^timeout must be a finite number > 0, got -?\d"):
            check_timeout("timeout", value)
    assert check_timeout("timeout", 2) == timedelta(seconds=2)


# Every place that takes a timeout from the user, under the name it gives it.
TIMEOUT_ARGUMENTS: dict[str, Any] = {
    "DataParallelConfig": lambda value: DataParallelConfig(timeout_s=value),
    "PipelineConfig": lambda value: PipelineConfig(num_stages=2, timeout_s=value),
    "TrainConfig": lambda value: TrainConfig(timeout_s=value),
    "work.wait": _wait_bound,
}


@pytest.mark.parametrize("where", TIMEOUT_ARGUMENTS)
def test_every_timeout_argument_follows_the_one_rule(where: str) -> None:
    """The same value is a timeout everywhere or nowhere, with the same exception type as
    check_timeout_s (a wait's zero excepted: torch's default, no bound)."""
    take = TIMEOUT_ARGUMENTS[where]
    for value in REAL_NUMBERS:
        take(value)
    for value, error, _ in BAD_TIMEOUTS:
        if where == "work.wait" and value == 0:
            continue
        with pytest.raises(error, match="timeout"):
            take(value)
