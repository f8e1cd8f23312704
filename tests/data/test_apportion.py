"""apportion: integer shares that sum to the total, respect bounds and follow the weights."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpar.data import apportion


@st.composite
def problems(draw: st.DrawFn) -> tuple[int, list[float], list[int], list[int]]:
    count = draw(st.integers(1, 6))
    weights = draw(st.lists(st.floats(0.0, 1e6), min_size=count, max_size=count))
    low = draw(st.lists(st.integers(0, 50), min_size=count, max_size=count))
    high = [lo + draw(st.integers(0, 50)) for lo in low]
    return draw(st.integers(sum(low), sum(high))), weights, low, high


@settings(max_examples=30, deadline=None)
@given(problem=problems())
def test_a_numpy_integer_total_is_an_int_total(
    problem: tuple[int, list[float], list[int], list[int]],
) -> None:
    total, weights, low, high = problem
    shares = apportion(np.int64(total), weights, low, high)  # type: ignore[arg-type]
    assert shares == apportion(total, weights, low, high)
    assert all(type(share) is int for share in shares)


@settings(max_examples=150, deadline=None)
@given(problem=problems())
def test_shares_sum_to_total_within_bounds(
    problem: tuple[int, list[float], list[int], list[int]],
) -> None:
    total, weights, low, high = problem
    shares = apportion(total, weights, low, high)
    assert sum(shares) == total
    assert all(lo <= s <= hi for s, lo, hi in zip(shares, low, high, strict=True))
    assert shares == apportion(total, weights, low, high)  # deterministic


@settings(max_examples=150, deadline=None)
@given(
    total=st.integers(0, 10_000),
    weights=st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=6),
)
def test_unbounded_shares_are_proportional(total: int, weights: list[float]) -> None:
    count = len(weights)
    shares = apportion(total, weights, [0] * count, [total] * count)
    for share, weight in zip(shares, weights, strict=True):
        # Rounding moves each share by less than one unit from its exact proportional value.
        assert abs(share - total * weight / sum(weights)) < 1 + 1e-9 * total


def test_pinned_shares_give_their_excess_to_the_others() -> None:
    # Weights 8:1:1 of 100 would be 80/10/10; the first is capped at 50 and the other two split
    # the rest in their own 1:1 ratio.
    assert apportion(100, [8.0, 1.0, 1.0], [0, 0, 0], [50, 100, 100]) == [50, 25, 25]
    # A floor pins the small share, the rest go 2:1.
    assert apportion(60, [2.0, 1.0, 0.01], [0, 0, 15], [60, 60, 60]) == [30, 15, 15]
    assert apportion(7, [1.0, 1.0, 1.0], [0, 0, 0], [7, 7, 7]) == [3, 2, 2]  # ties: low index
    assert apportion(9, [0.0, 0.0, 0.0], [0, 0, 0], [9, 9, 9]) == [3, 3, 3]


def test_bad_problems() -> None:
    with pytest.raises(ValueError, match=r"^total must be an integer in \[2, 8\], got 10$"):
        apportion(10, [1.0, 1.0], [1, 1], [4, 4])
    with pytest.raises(ValueError, match=r"weights must be finite and >= 0"):
        apportion(2, [1.0, -1.0], [0, 0], [4, 4])
    with pytest.raises(ValueError, match=r"got 2 weights, 1 low, 2 high"):
        apportion(2, [1.0, 1.0], [0], [4, 4])
    with pytest.raises(ValueError, match=r"every low bound must be <= its high bound"):
        apportion(2, [1.0, 1.0], [3, 0], [2, 4])
    with pytest.raises(TypeError, match=r"total must be an integer, got float 5.5"):
        apportion(5.5, [1.0, 1.0], [0, 0], [4, 4])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"total must be an integer, got bool True"):
        apportion(True, [1.0, 1.0], [0, 0], [4, 4])
