"""Splitting an integer total into shares proportional to weights, within per-share bounds.

Used by the dynamic slicer to turn measured rates into per-rank block sizes. The result is a
pure function of its arguments, computed in a fixed order, so every rank that calls it with the
same (all-reduced) numbers gets the same sizes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from fractions import Fraction

from fastpar._checks import check_int


def apportion(
    total: int, weights: Sequence[float], low: Sequence[int], high: Sequence[int]
) -> list[int]:
    """Integer shares of `total`, proportional to `weights`, with low[i] <= share[i] <= high[i].

    Shares are first solved over the reals: proportional to the weights, except that a share
    that would leave its bounds is pinned to the bound and the rest is shared among the others
    in proportion to their weights (water-filling). They are then rounded down, and the units
    still missing go to the shares with the largest fractional parts (ties to the lower index).
    All of it in exact rational arithmetic: only the weights' ratios count, so weights of any
    positive finite size (subnormal to 1e308, mixed) share as the same weights rescaled do.

    Arguments:
        total: the sum of the shares, an integer (numpy's too) in [sum(low), sum(high)].
        weights: one non-negative finite weight per share; all zero means equal weights.
        low: lower bound per share.
        high: upper bound per share, >= low.

    Returns:
        One int per weight, summing to `total`.

    Raises:
        TypeError: `total` is not an integer (or is a bool).
        ValueError: lengths differ, a weight is negative or not finite, or `total` is outside
            [sum(low), sum(high)].
    """
    count = len(weights)
    if count == 0 or len(low) != count or len(high) != count:
        raise ValueError(
            f"need one low and high bound per weight, got {count} weights, {len(low)} low, "
            f"{len(high)} high (and at least one weight)"
        )
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"weights must be finite and >= 0, got {list(weights)}")
    if any(lo > hi for lo, hi in zip(low, high, strict=True)):
        raise ValueError(f"every low bound must be <= its high bound, got {low} and {high}")
    # Integer shares cannot sum to 5.5: they would silently sum to 5.
    total = check_int("total", total, sum(low), sum(high))
    if all(w == 0 for w in weights):
        weights = [1.0] * count
    real = _bounded_shares(total, weights, low, high)
    shares = [min(max(math.floor(x), lo), hi) for x, lo, hi in zip(real, low, high, strict=True)]
    missing = total - sum(shares)
    # Fractional parts decide who gets the leftover units. The real shares sum to `total`
    # exactly unless the bounds keep them from it (a total that needs units of zero-weight
    # shares, or negative low bounds whose shares at t = 0 exceed it), so room is checked.
    by_fraction = sorted(range(count), key=lambda i: (-(real[i] - math.floor(real[i])), i))
    while missing > 0:
        for i in by_fraction:
            if missing > 0 and shares[i] < high[i]:
                shares[i] += 1
                missing -= 1
    while missing < 0:
        for i in reversed(by_fraction):
            if missing < 0 and shares[i] > low[i]:
                shares[i] -= 1
                missing += 1
    return shares


def _bounded_shares(
    total: int, weights: Sequence[float], low: Sequence[int], high: Sequence[int]
) -> list[Fraction]:
    # The shares x_i(t) = clamp(t * w_i, low_i, high_i) never decrease as t grows, and their sum
    # S(t) is linear between the breakpoints t = low_i / w_i and high_i / w_i, where a share
    # reaches a bound: the t with S(t) = total lies between the last breakpoint below it and
    # the first at or above, found by bisection over the sorted breakpoints. In exact fractions
    # (a float weight is a dyadic rational), so the shares do not depend on the weights' scale
    # (1e-320 and 1e300 alike) and ties of fractional parts are ties, not rounding noise.
    # Water-filling: proportional where the bounds allow, pinned to a bound where they do not.
    # A zero weight stays at its low bound; the integer rounding in `apportion` gives it units
    # only when nothing else can.
    exact = [
        Fraction(w) if isinstance(w, numbers.Rational) else Fraction(float(w)) for w in weights
    ]
    bounds = [(Fraction(lo), Fraction(hi)) for lo, hi in zip(low, high, strict=True)]

    def shares_at(scale: Fraction) -> list[Fraction]:
        return [min(max(scale * w, lo), hi) for w, (lo, hi) in zip(exact, bounds, strict=True)]

    breakpoints = sorted(
        {b for w, (lo, hi) in zip(exact, bounds, strict=True) if w > 0 for b in (lo / w, hi / w)}
    )
    points = [Fraction(0), *(b for b in breakpoints if b > 0)]
    sums = {0: sum(shares_at(points[0]))}

    def sum_at(index: int) -> Fraction:
        if index not in sums:
            sums[index] = sum(shares_at(points[index]))
        return sums[index]

    if sum_at(0) >= total:  # no share can shrink below its value at t = 0
        return shares_at(points[0])
    first, last = 1, len(points)  # the first breakpoint whose sum reaches total, in [1, last]
    while first < last:
        middle = (first + last) // 2
        if sum_at(middle) < total:
            first = middle + 1
        else:
            last = middle
    if first == len(points):  # past the last breakpoint, every weighted share is at its high
        return shares_at(points[-1])
    below, above = points[first - 1], points[first]
    scale = below + (above - below) * (total - sum_at(first - 1)) / (
        sum_at(first) - sum_at(first - 1)
    )
    return shares_at(scale)
