"""Splitting an integer total into shares proportional to weights, within per-share bounds.

Used by the dynamic slicer to turn measured rates into per-rank block sizes. The result is a
pure function of its arguments, computed in a fixed order, so every rank that calls it with the
same (all-reduced) numbers gets the same sizes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from fastpar._checks import check_int


def apportion(
    total: int, weights: Sequence[float], low: Sequence[int], high: Sequence[int]
) -> list[int]:
    """Integer shares of `total`, proportional to `weights`, with low[i] <= share[i] <= high[i].

    Shares are first solved over the reals: proportional to the weights, except that a share
    that would leave its bounds is pinned to the bound and the rest is shared among the others
    in proportion to their weights (water-filling). They are then rounded down, and the units
    still missing go to the shares with the largest fractional parts (ties to the lower index).

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
    if sum(weights) == 0:
        weights = [1.0] * count
    real = _bounded_shares(total, weights, low, high)
    shares = [min(max(math.floor(x), lo), hi) for x, lo, hi in zip(real, low, high, strict=True)]
    missing = total - sum(shares)
    # Fractional parts decide who gets the leftover units; rounding error can leave `missing`
    # negative or beyond the shares with a fraction, so room is checked, not assumed.
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
) -> list[float]:
    # The shares x_i(t) = clamp(t * w_i, low_i, high_i) never decrease as t grows, so the t
    # whose shares sum to `total` is found by bisection: proportional where the bounds allow,
    # pinned to a bound where they do not (water-filling). A zero weight stays at its low
    # bound; the integer rounding in `apportion` gives it units only when nothing else can.
    def shares_at(scale: float) -> list[float]:
        return [
            min(max(scale * w, float(lo)), float(hi))
            for w, lo, hi in zip(weights, low, high, strict=True)
        ]

    lower, upper = 0.0, 1.0
    while sum(shares_at(upper)) < total and upper < 1e300:
        upper *= 2.0
    for _ in range(200):
        middle = 0.5 * (lower + upper)
        if middle in (lower, upper):
            break
        if sum(shares_at(middle)) < total:
            lower = middle
        else:
            upper = middle
    return shares_at(upper)
