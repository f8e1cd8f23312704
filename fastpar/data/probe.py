"""Trials of neighbouring splits: the throughput slicer's measured correction of its line.

Glossary: W ranks, a split = one block size per rank (summing to the global batch), the
bottleneck = the rank whose measured step time is the longest at a split.

After a speed change the step-time model (`step_model.StepTimeModel`) is refitted at the one
or two block sizes the rank ran since: it predicts those well but hardly sees its slope, a real
step time is not quite a line in the block (small blocks use the hardware less well), and a
move of one sample gains less than the noise bar a move must clear. Its split can then stay a
sample from the fastest one, at a cost in every step of the phase (the benchmark measured
2-3 % of a straggler's step). So, once the fit after a change has settled, the slicer runs the
neighbouring split that takes one sample off the measured bottleneck (the only move that can
shorten the slowest rank's time) for a few steps, keeps it when the slowest rank's typical
time there (`_typical`) is shorter, and then tries the next one in the same way; it goes back
as soon as a trial is not faster. A trial's measurements are the reference of the next, so
each move costs one trial.

Everything here is a pure function of the all-reduced measurements, in rank order: every rank
takes the same decisions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fastpar.data.step_model import StepTimeModel

# Accepted moves per speed change at most, as the benchmark's oracle searches two samples
# either side of its guess: noise could otherwise walk the blocks along a flat optimum.
MAX_MOVES = 2


@dataclass
class SplitProbe:
    """A search for a faster neighbour of `base`, one trial at a time.

    The base is measured first unless the steps already run there suffice (`start`); then the
    trial split runs until it has as many measurements, and `record` compares the two.
    """

    base: list[int]
    """The split trials are compared with: the best measured so far."""
    base_times: list[list[float]]
    """Per rank, the seconds measured at `base`."""
    trial: list[int] | None = None
    """The neighbouring split on trial (None: the base is still being measured)."""
    trial_times: list[list[float]] = field(default_factory=list)
    """Per rank, the seconds measured at `trial`."""
    moves: int = 0
    """Trials kept so far."""
    over: bool = False
    """The search has ended: `sizes` are the blocks to keep."""

    @classmethod
    def start(
        cls, base: Sequence[int], models: Sequence[StepTimeModel], *, steps: int, low: int,
        high: int,
    ) -> SplitProbe:  # fmt: skip
        """A probe of `base` that takes as its reference the measurements each model's window
        holds at its rank's block of `base`, and goes to its first trial at once; when some
        rank has fewer than `steps` of them, it measures the base first. `sizes` may still be
        `base` when no neighbour is within [low, high] (then the probe is `over`)."""
        times = [[t for n, t in model.window if n == size]
                 for size, model in zip(base, models, strict=True)]  # fmt: skip
        if min(len(ts) for ts in times) < steps:
            return cls(list(base), [[] for _ in base])
        probe = cls(list(base), times)
        probe._next_trial(None, models, low, high)
        return probe

    @property
    def sizes(self) -> list[int]:
        """The blocks to run next."""
        return list(self.base if self.trial is None else self.trial)

    def record(
        self, blocks: Sequence[int], seconds: Sequence[float], models: Sequence[StepTimeModel],
        *, steps: int, low: int, high: int,
    ) -> bool:  # fmt: skip
        """Fold in one step; returns whether the probe is `over` (then `sizes` are the blocks
        to keep). A step counts when it ran the split being measured (not the last of an
        epoch); a burst among them is a long step, which `_typical` leaves out as long as it
        lasts fewer than half of them, so it does not delay the trials either."""
        if list(blocks) == self.sizes:
            times = self.base_times if self.trial is None else self.trial_times
            for rank, value in enumerate(seconds):
                times[rank].append(value)
        if min(len(ts) for ts in self.base_times) < steps:
            return False
        if self.trial is not None:
            if min(len(ts) for ts in self.trial_times) < steps:
                return False
            if _slowest(self.trial_times) >= _slowest(self.base_times):
                self.trial, self.over = None, True  # no faster: back to the base
                return True
            previous = self.base
            self.base, self.base_times = self.trial, self.trial_times
            self.moves += 1
            if self.moves >= MAX_MOVES:
                self.trial, self.over = None, True
                return True
        else:
            previous = None
        self._next_trial(previous, models, low, high)
        return self.over

    def _next_trial(
        self, previous: list[int] | None, models: Sequence[StepTimeModel], low: int, high: int
    ) -> None:
        """Put the base's neighbour on trial, or end the probe when there is none or it is
        only the split just left behind."""
        self.trial = _neighbour(self.base, self.base_times, models, low, high)
        self.trial_times = [[] for _ in self.base]
        if self.trial is None or self.trial == previous:
            self.trial, self.over = None, True

    def state(self) -> dict[str, Any]:
        return {
            "base": list(self.base),
            "base_times": [list(ts) for ts in self.base_times],
            "trial": None if self.trial is None else list(self.trial),
            "trial_times": [list(ts) for ts in self.trial_times],
            "moves": self.moves,
            "over": self.over,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SplitProbe:
        trial = state["trial"]
        return cls(
            base=[int(n) for n in state["base"]],
            base_times=[[float(t) for t in ts] for ts in state["base_times"]],
            trial=None if trial is None else [int(n) for n in trial],
            trial_times=[[float(t) for t in ts] for ts in state["trial_times"]],
            moves=int(state["moves"]),
            over=bool(state["over"]),
        )


def _typical(times: Sequence[float]) -> float:
    """A rank's step time at a split: the mean of the faster half of its measurements. Load
    from other processes only lengthens steps (a long tail above, little spread below), so
    the faster half tells two splits apart in fewer steps than the median or the mean."""
    faster = sorted(times)[: max(1, len(times) // 2)]
    return sum(faster) / len(faster)


def _slowest(times: Sequence[Sequence[float]]) -> float:
    """The split's step time: the slowest rank's typical time."""
    return max(_typical(ts) for ts in times)


def _neighbour(
    base: Sequence[int], times: Sequence[Sequence[float]], models: Sequence[StepTimeModel],
    low: int, high: int,
) -> list[int] | None:  # fmt: skip
    """`base` with one sample moved from the measured bottleneck to the rank whose predicted
    time with one more sample is the shortest (ties to the lower rank); None when the bounds
    allow no such move."""
    typical = [_typical(ts) for ts in times]
    bottleneck = max(range(len(base)), key=lambda r: (typical[r], -r))
    takers = [r for r in range(len(base)) if r != bottleneck and base[r] < high]
    if base[bottleneck] <= low or not takers:
        return None
    taker = min(takers, key=lambda r: (models[r].predict(base[r] + 1), r))
    trial = list(base)
    trial[bottleneck] -= 1
    trial[taker] += 1
    return trial
