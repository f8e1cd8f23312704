"""Trials of neighbouring splits: the throughput slicer's measured correction of its line.

Glossary: W ranks, a split = one block size per rank (summing to the global batch), the
bottleneck = the rank whose measured step time is the longest at a split.

After a speed change the step-time model (`step_model.StepTimeModel`) is refitted at the one
or two block sizes the rank ran since: it predicts those well but hardly sees its slope, a real
step time is not quite a line in the block (small blocks use the hardware less well), and a
move of one sample gains less than the noise bar a move must clear. Its split can then stay a
sample from the fastest one, at a cost in every step of the phase (the benchmark measured
2-3 % of a straggler's step). So, once the fit after a change has settled, the slicer tries the
neighbouring split that takes one sample off the predicted bottleneck (the only move that can
shorten the slowest rank's time): it runs that trial and the current split in turn, step by
step, and keeps the trial when the slowest rank's typical time there (`_typical`) is shorter
by more than half a standard error of the difference; then it tries the next one in the same
way (from the measured bottleneck), at most MAX_MOVES times, and stops at the first trial
that is not faster. Taking turns matters on a shared host: load from other processes comes
and goes over many steps, and a trial run in one stretch after its reference is judged by
that load more than by its split.

Everything here is a pure function of the all-reduced measurements, in rank order: every rank
takes the same decisions.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fastpar.data.step_model import StepTimeModel

# A trial is kept when it is faster by more than this many standard errors of the difference:
# under heavy load a one-sample gain is lost in the noise, and a split kept by luck costs as
# much as one missed.
_CONFIDENCE = 0.5
# Accepted moves per speed change at most, as the benchmark's oracle searches two samples
# either side of its guess: noise could otherwise walk the blocks along a flat optimum.
MAX_MOVES = 2


@dataclass
class SplitProbe:
    """A search for a faster neighbour of `base`, one trial at a time.

    The trial split and the base take turns, step by step, until each has run `steps` times,
    so that load from other processes, which comes and goes over many steps, falls on both
    alike (as the benchmark interleaves its scenarios); then `record` compares them.
    """

    base: list[int]
    """The split trials are compared with: the best measured so far."""
    trial: list[int] | None
    """The neighbouring split on trial (None: the search has ended, keep `base`)."""
    base_times: list[list[float]] = field(default_factory=list)
    """Per rank, the seconds measured at `base` during this trial."""
    trial_times: list[list[float]] = field(default_factory=list)
    """Per rank, the seconds measured at `trial`."""
    turn: int = 0
    """Steps run in this trial: even ones run the trial split, odd ones the base."""
    moves: int = 0
    """Trials kept so far."""

    @classmethod
    def start(
        cls, base: Sequence[int], models: Sequence[StepTimeModel], *, low: int, high: int
    ) -> SplitProbe:
        """A search from `base`, whose first trial takes a sample off the rank the models
        (fitted at these blocks once settled) predict to be the slowest."""
        predicted = [[model.predict(n)] for n, model in zip(base, models, strict=True)]
        probe = cls(list(base), None)
        probe._next_trial(predicted, None, models, low, high)
        return probe

    @property
    def over(self) -> bool:
        """The search has ended: `sizes` are the blocks to keep."""
        return self.trial is None

    @property
    def sizes(self) -> list[int]:
        """The blocks to run next."""
        return list(self.base if self.trial is None or self.turn % 2 else self.trial)

    def record(
        self, blocks: Sequence[int], seconds: Sequence[float], models: Sequence[StepTimeModel],
        *, steps: int, low: int, high: int,
    ) -> bool:  # fmt: skip
        """Fold in one step; returns whether the search is `over`. A step counts when it ran
        the split of its turn (not the last, smaller one of an epoch); a burst among them is a
        long step, which `_typical` leaves out as long as it lasts fewer than half of them."""
        if self.trial is None:
            return True
        if list(blocks) == self.sizes:
            times = self.base_times if self.turn % 2 else self.trial_times
            for rank, value in enumerate(seconds):
                times[rank].append(value)
        self.turn += 1
        if min(len(ts) for ts in self.base_times + self.trial_times) < steps:
            return False
        trial, trial_error = _slowest(self.trial_times)
        base, base_error = _slowest(self.base_times)
        if trial + _CONFIDENCE * math.hypot(trial_error, base_error) >= base:
            self.trial = None  # not measurably faster: keep the base
            return True
        previous, self.base = self.base, self.trial
        self.moves += 1
        if self.moves >= MAX_MOVES:
            self.trial = None
            return True
        self._next_trial(self.trial_times, previous, models, low, high)
        return self.over

    def _next_trial(
        self, times: Sequence[Sequence[float]], previous: list[int] | None,
        models: Sequence[StepTimeModel], low: int, high: int,
    ) -> None:  # fmt: skip
        """Put on trial the base's neighbour away from the bottleneck in `times` (the base's),
        unless there is none or it is the split just left behind."""
        trial = _neighbour(self.base, times, models, low, high)
        self.trial = None if trial == previous else trial
        self.base_times = [[] for _ in self.base]
        self.trial_times = [[] for _ in self.base]
        self.turn = 0

    def state(self) -> dict[str, Any]:
        return {
            "base": list(self.base),
            "trial": None if self.trial is None else list(self.trial),
            "base_times": [list(ts) for ts in self.base_times],
            "trial_times": [list(ts) for ts in self.trial_times],
            "turn": self.turn,
            "moves": self.moves,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SplitProbe:
        trial = state["trial"]
        return cls(
            base=[int(n) for n in state["base"]],
            trial=None if trial is None else [int(n) for n in trial],
            base_times=[[float(t) for t in ts] for ts in state["base_times"]],
            trial_times=[[float(t) for t in ts] for ts in state["trial_times"]],
            turn=int(state["turn"]),
            moves=int(state["moves"]),
        )


def _typical(times: Sequence[float]) -> float:
    """A rank's step time at a split: the mean of the faster half of its measurements. Load
    from other processes only lengthens steps (a long tail above, little spread below), so
    the faster half tells two splits apart in fewer steps than the median or the mean."""
    faster = sorted(times)[: max(1, len(times) // 2)]
    return sum(faster) / len(faster)


def _slowest(times: Sequence[Sequence[float]]) -> tuple[float, float]:
    """The split's step time, the slowest rank's typical time, and its standard error: the
    spread of that rank's measurements (median absolute deviation, scaled to a normal
    distribution's standard deviation) over the root of their count."""
    rank = max(range(len(times)), key=lambda r: _typical(times[r]))
    values = times[rank]
    middle = statistics.median(values)
    spread = 1.4826 * statistics.median(abs(t - middle) for t in values)
    return _typical(values), spread / math.sqrt(len(values))


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
