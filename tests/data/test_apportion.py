"""apportion: integer shares that sum to the total, respect bounds and follow the weights."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fastpar.data import apportion

NON_NEGATIVE_WEIGHTS = st.floats(0.0, 1e6)


@st.composite
def problems(
    draw: st.DrawFn,
    weight: st.SearchStrategy[float] = NON_NEGATIVE_WEIGHTS,
    max_count: int = 6,
    max_low: int = 50,
    max_room: int = 50,
) -> tuple[int, list[float], list[int], list[int]]:
    """(total, weights, low, high): up to `max_count` shares, each weight drawn from `weight`."""
    count = draw(st.integers(1, max_count))
    weights = draw(st.lists(weight, min_size=count, max_size=count))
    low = draw(st.lists(st.integers(0, max_low), min_size=count, max_size=count))
    high = [lo + draw(st.integers(0, max_room)) for lo in low]
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


def _reference(total: int, weights: list[float], low: list[int], high: list[int]) -> list[int]:
    """apportion's documented rule in exact fractions, for positive weights and low >= 0: the
    real shares are clamp(t * w_i, low_i, high_i) summing to `total`, found by trying every
    assignment of each share to its low bound, its high bound or free (t from the free ones);
    then floors, and the missing units to the largest fractional parts, ties to the lower
    index."""
    w = [Fraction(x) for x in weights]
    for states in itertools.product("LFH", repeat=len(w)):
        pinned = {i: low[i] if s == "L" else high[i] for i, s in enumerate(states) if s != "F"}
        free = [i for i, s in enumerate(states) if s == "F"]
        if free:
            t = (total - sum(pinned.values())) / sum(w[i] for i in free)
        elif sum(pinned.values()) == total:
            t = max((Fraction(high[i]) / w[i] for i in pinned if states[i] == "H"), default=0)
        else:
            continue
        consistent = t >= 0 and all(
            (low[i] <= t * w[i] <= high[i]) if s == "F"
            else (t * w[i] <= low[i]) if s == "L"
            else (t * w[i] >= high[i])
            for i, s in enumerate(states)
        )  # fmt: skip
        if consistent:
            real = [t * w[i] if i in free else Fraction(pinned[i]) for i in range(len(w))]
            break
    else:
        raise AssertionError(f"no real shares for {total} {weights} {low} {high}")
    shares = [math.floor(x) for x in real]
    by_fraction = sorted(range(len(w)), key=lambda i: (-(real[i] - shares[i]), i))
    for i in by_fraction[: total - sum(shares)]:
        shares[i] += 1
    return shares


# Any positive finite float: from the smallest subnormal to the largest, often mixed.
positive_floats = st.one_of(
    st.floats(5e-324, 1.7976931348623157e308),
    st.builds(math.ldexp, st.floats(0.5, 1.0, exclude_max=True), st.integers(-1073, 1024)),
    st.integers(1, 1000).map(float),
)


def positive_problems() -> st.SearchStrategy[tuple[int, list[float], list[int], list[int]]]:
    return problems(positive_floats, max_count=5, max_low=40, max_room=60)


@settings(max_examples=300, deadline=None)
@given(problem=positive_problems())
def test_shares_equal_an_exact_reference(
    problem: tuple[int, list[float], list[int], list[int]],
) -> None:
    total, weights, low, high = problem
    assert apportion(total, weights, low, high) == _reference(total, weights, low, high)


@settings(max_examples=200, deadline=None)
@given(problem=positive_problems(), exponent=st.integers(-2100, 2100))
def test_rescaled_weights_share_alike(
    problem: tuple[int, list[float], list[int], list[int]], exponent: int
) -> None:
    total, weights, low, high = problem
    assume(all(math.frexp(w)[1] + exponent <= 1024 for w in weights))  # no overflow
    scaled = [math.ldexp(w, exponent) for w in weights]
    # Only scalings that are exact in floats (no overflow, no bits lost to subnormals).
    assume(all(0 < s < math.inf and Fraction(s) == Fraction(w) * Fraction(2) ** exponent
               for s, w in zip(scaled, weights, strict=True)))  # fmt: skip
    assert apportion(total, scaled, low, high) == apportion(total, weights, low, high)


def test_tiny_and_huge_weights() -> None:
    tiny = 5e-324  # the smallest subnormal: 2**-1074
    assert apportion(10, [tiny, 3 * tiny], [0, 0], [10, 10]) == [3, 7]  # 2.5, 7.5: a tie
    assert apportion(10, [tiny, 3 * tiny], [0, 0], [10, 10]) == apportion(
        10, [1, 3], [0, 0], [10, 10]
    )
    assert apportion(9, [math.ldexp(1, -1000)] * 3, [0] * 3, [9] * 3) == [3, 3, 3]
    assert apportion(7, [1e-310, 1e-310, 1e-310], [0] * 3, [7] * 3) == [3, 2, 2]
    assert apportion(10, [tiny, 1e308], [0, 0], [10, 10]) == [0, 10]
    assert apportion(10, [tiny, 1e308], [0, 0], [4, 10]) == [0, 10]
    assert apportion(10, [1e308, tiny], [0, 3], [10, 10]) == [7, 3]
    assert apportion(12, [1e308, 1e308, 1e308], [0] * 3, [12] * 3) == [4, 4, 4]  # sum: inf


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
