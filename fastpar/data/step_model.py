"""Per-rank step-time model of the throughput slicer: t = fixed + per_sample * n.

Glossary: n samples in a rank's block, t the rank's compute seconds for it, W ranks.

A step's time is not proportional to its block: a per-step cost (launches, the optimizer, the
loss) does not shrink with the block. Splitting by samples/s then drifts when that fixed part
dominates (the rank with the smaller block looks slower and gets smaller still). Each rank's
time is therefore modelled as `fixed + per_sample * n`, fitted over its recent steps, and the
global batch is split so that the predicted step times are equal (the slowest rank's predicted
time is as small as the bounds allow).

Everything here is a pure function of the all-reduced measurements, computed in rank order, so
every rank that feeds the same numbers gets the same model and the same split.
"""

from __future__ import annotations

import heapq
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Observation = Literal["first", "fitted", "settled", "candidate", "changed", "returned"]
"""What one measurement did to a model: the first one; folded into the fit; folded in and
completing the window fitted since the last speed change; set aside as a possible change;
confirmed a change to a new speed; confirmed a return to the speed before the last change."""

# Weight of the previous per-sample cost in the fit, as a spread of this fraction of the mean
# block on every point of the window: with blocks that stay put (no spread, the slope is not
# identifiable) the slope stays where it was; after a rebalance the data decide.
_PRIOR_SPREAD = 0.05
# Relative doubt in the previous per-sample cost, against which the data's slope is weighed by
# its noise (see _fit).
_PRIOR_DOUBT = 0.25
# Weight of the old mean square in the noise's running average: about ten steps, so that one
# quiet stretch of two or three steps does not lower the bar a move must clear.
_NOISE_MOMENTUM = 0.9
# Past this many steps the running average's start no longer biases it (0.9**64 < 0.002).
_NOISE_STEPS_CAP = 64
# How many times the measured noise a faster step must lie below the model to confirm a return
# to the previous speed on its own (see StepTimeModel._returns): +-20 % noise per step has an
# r.m.s. of 0.115 in log, so 4 of them is a factor 1.6, which noise alone does not reach.
_RETURN_NOISES = 4.0
# Steps the noise must have averaged before one step may confirm a change on its own (see
# StepTimeModel._one_step_bar): an r.m.s. of one or two steps is often a fraction of the true
# one, and 4 of it then lies within one step's noise (under +-20 % noise, nearly every
# one-step slowdown confirmed that early was noise); over 6 steps its relative error is about
# a quarter, which 4 noises absorb.
_TRUSTED_NOISE_STEPS = 6
# How many times the measured noise (once averaged over _TRUSTED_NOISE_STEPS steps) the
# candidates' median must lie off the model for change_steps of them to confirm a change (see
# StepTimeModel._confirms). The noise is measured about the model's own predictions, so it
# holds the fit's error too, and that error is the same for consecutive steps: under +-20 %
# noise (r.m.s. 0.115), two steps in a row beyond a bare 30 % of a fit a few percent off were
# a false change in about 4 of 10 runs of 60 steps; 3 noises (a factor 1.41) leave a 2x
# slowdown's candidates (a factor 1.6 at least under that noise) confirming as before.
_CONFIRM_NOISES = 3.0


@dataclass
class StepTimeModel:
    """One rank's fitted step time `fixed + per_sample * n` and the steps it was fitted on.

    A measurement off the prediction by more than a factor 1 + `change_threshold` either way
    is set aside as a candidate speed change; `change_steps` of them in a row on the same side
    confirm it (`speedup_steps` when they are faster: noise shortens steps too, and with +-20 %
    of it per step, one short step alone would rescale the model and make the blocks swing):
    the model is scaled by their median ratio measured / predicted and refitted from them alone.
    Shorter bursts (a preempted step, another process's spike) leave the model untouched; a
    rank that had no burst for a while follows a slowdown far outside the noise, once measured
    over a few steps, after one step (`_follows_at_once`).

    The model in use before the last confirmed change is kept (`previous`): stragglers come and
    go, and a change that brings the rank back to that speed (the candidates' median within
    the threshold of its prediction) restores it, fitted over many steps, where the
    candidates alone would leave a one- or two-step estimate.
    """

    fixed: float = 0.0
    """Seconds per step whatever the block, >= 0."""
    per_sample: float = 0.0
    """Seconds per sample, > 0 once measured (0.0: nothing measured yet)."""
    window: list[tuple[int, float]] = field(default_factory=list)
    """The accepted (n, t) of recent steps, oldest first."""
    candidates: list[tuple[int, float]] = field(default_factory=list)
    """Measurements set aside as a possible speed change, oldest first."""
    previous: StepTimeModel | None = None
    """The model in use before the last confirmed speed change (None: no change yet)."""
    settling: int = 0
    """Accepted steps left until the fit after the last confirmed change has a full window
    (0: none pending). The split made right after a change rests on a rough fit; the one made
    when this reaches 0 may correct it by any amount its noise can tell (see `observe`'s
    return and `doubt`)."""
    noise: float = 0.0
    """Spread of accepted steps about the prediction made before each of them (root mean
    square of log(measured / predicted), a running average over about ten steps, started at
    0.0; see `noise_level`). A property of the host more than of the speed: it carries across
    changes."""
    noise_steps: int = 0
    """How many steps `noise` has averaged (0: none; capped, it only corrects the start)."""
    since_burst: int | None = None
    """Steps measured since this rank's last burst (None: none yet): slower candidates that ended
    without confirming a change, or a change undone before it lasted `change_steps` steps
    (one a single step confirmed, see `_follows_at_once`)."""

    @property
    def known(self) -> bool:
        return self.per_sample > 0

    def predict(self, samples: float) -> float:
        """Predicted compute seconds of a block of `samples`."""
        return self.fixed + self.per_sample * samples

    @property
    def noise_level(self) -> float:
        """`noise` without the bias of its start at 0.0 (the running average's first steps
        would understate it); infinite while no step has measured it: until then nothing can
        tell a real difference from noise."""
        if self.noise_steps == 0:
            return math.inf
        return self.noise / math.sqrt(1 - _NOISE_MOMENTUM**self.noise_steps)

    @property
    def doubt(self) -> float:
        """Relative standard error of a prediction: `noise_level` over the square root of the
        steps fitted. A predicted gain smaller than a couple of these is noise."""
        return self.noise_level / math.sqrt(max(len(self.window), 1))

    def observe(
        self, samples: int, seconds: float, *, window: int, change_threshold: float,
        change_steps: int, speedup_steps: int, momentum: float, fit: bool = True,
        follow_at_once: bool = False,
    ) -> Observation:  # fmt: skip
        """Fold one step's measurement (samples > 0, seconds > 0) into the model; with `fit`
        False, a measurement within the threshold updates the noise only (a trial of a block
        one sample away: the fit's ridge would drift its slope towards what a one-sample spread
        under noise suggests, step after step). With `follow_at_once` (no rank had a burst for a
        while), a slowdown far outside the noise is confirmed by one step (`_follows_at_once`).

        Returns:
            What the measurement did (`Observation`); "settled" when it completes the window
            fitted since the last confirmed speed change: from now on the model is as well
            fitted as before it.
        """
        if not self.known:
            # The first measurement: no fixed part can be told apart yet.
            self.fixed, self.per_sample = 0.0, seconds / samples
            self.window = [(samples, seconds)]
            return "first"
        if self.since_burst is not None:
            self.since_burst += 1
        predicted = self.predict(samples)
        # A factor either way: a slowdown by 1 + c and its recovery (1 / (1 + c), a smaller
        # relative step) are judged alike, so a straggler's recovery is caught as fast.
        deviation = math.log(seconds / predicted)
        if abs(deviation) <= self._candidate_bar(change_threshold, window):
            self._drop_candidates()
            self.noise = math.sqrt(
                _NOISE_MOMENTUM * self.noise**2 + (1 - _NOISE_MOMENTUM) * deviation**2
            )
            self.noise_steps = min(self.noise_steps + 1, _NOISE_STEPS_CAP)
            if not fit:
                return "fitted"
            self.window = (self.window + [(samples, seconds)])[-window:]
            fixed, per_sample = _fit(self.window, self.per_sample)
            self.fixed = momentum * self.fixed + (1 - momentum) * fixed
            self.per_sample = momentum * self.per_sample + (1 - momentum) * per_sample
            if self.settling == 0:
                return "fitted"
            self.settling -= 1
            return "fitted" if self.settling else "settled"
        if self.candidates and self._slower(*self.candidates[-1]) != (seconds > predicted):
            self._drop_candidates()  # the other side: not the same change
        self.candidates.append((samples, seconds))
        if self._returns(samples, seconds, deviation):
            return self._change(window, change_threshold, change_steps, back=True)
        steps = speedup_steps if seconds < predicted else change_steps
        if (len(self.candidates) >= steps and self._confirms(change_threshold, window)) or (
            follow_at_once and self._follows_at_once(deviation)
        ):
            return self._change(window, change_threshold, change_steps)
        return "candidate"

    def _candidate_bar(self, change_threshold: float, window: int) -> float:
        """How far (in log) a step must lie from the model to be a candidate: a factor
        1 + change_threshold, set for a fit on a full window. A rank's first fit, on m < window
        steps, misses a step by sqrt(1 + 1/m) noises (r.m.s.) where a full one misses it by
        sqrt(1 + 1/window): until its window is full the bar widens by their ratio (1.33 on
        one step, 1.15 on two). The first steps are the ones a warm-up or a lucky step leaves
        a fit on; judged against them, two ordinary steps in a row made a false change in
        about a quarter of the runs under +-20 % noise. After a change the bar stays as set:
        a return to the previous speed must be seen at once."""
        bar = math.log1p(change_threshold)
        fitted = len(self.window)
        if self.previous is None and fitted < window:
            bar *= math.sqrt((1 + 1 / fitted) / (1 + 1 / window))
        return bar

    def _confirms(self, change_threshold: float, window: int) -> bool:
        """Whether the candidates, as many as change_steps (speedup_steps) require, confirm a
        change: their median lies off the model by more than `_candidate_bar` and, once the
        noise is measured (`_one_step_bar`), by more than _CONFIRM_NOISES times it. Candidates
        short of it wait for more (a step within the threshold drops them as a burst); a full
        window of them confirms whatever the noise, so a model never waits on a noise it can
        no longer measure."""
        if len(self.candidates) >= window:
            return True
        deviation = abs(
            statistics.median(math.log(t / self.predict(n)) for n, t in self.candidates)
        )
        bar = self._candidate_bar(change_threshold, window)
        if self.noise_steps >= _TRUSTED_NOISE_STEPS:
            bar = max(bar, _CONFIRM_NOISES * self.noise_level)
        return deviation > bar

    def _slower(self, samples: int, seconds: float) -> bool:
        return seconds > self.predict(samples)

    def _drop_candidates(self) -> None:
        """Forget the candidates: they were a burst. Only slower ones count for `since_burst`:
        lucky or warm-up steps do not make a slowdown followed at once a mistake."""
        if self.candidates and self._slower(*self.candidates[-1]):
            self.since_burst = 0
        self.candidates.clear()

    def _follows_at_once(self, deviation: float) -> bool:
        """Whether one slower step, at a time when bursts are rare (the caller knows), confirms
        a slowdown: it lies above the model by more than _RETURN_NOISES times the measured
        `noise` (`_one_step_bar`). Waiting for change_steps candidates costs every real
        slowdown that many steps at the old split; following a burst costs one step at the new
        split (the next step, back at speed, returns at once, and `since_burst` remembers
        it)."""
        return deviation > self._one_step_bar()

    def _one_step_bar(self) -> float:
        """How far (in log) one step must lie from the model to confirm a change on its own:
        _RETURN_NOISES times the measured noise, once it has averaged _TRUSTED_NOISE_STEPS
        steps; before that, out of reach (change_steps confirm changes)."""
        if self.noise_steps < _TRUSTED_NOISE_STEPS:
            return math.inf
        return _RETURN_NOISES * self.noise_level

    def _returns(self, samples: int, seconds: float, deviation: float) -> bool:
        """Whether one faster step is enough to confirm a return to the speed before the last
        change: it lies below this model by more than _RETURN_NOISES times the measured
        `noise` (`_one_step_bar`; a straggler's recovery or the end of a burst, not a lucky
        step), and nearer the previous model than this one. Nearer, not within the threshold:
        the blocks moved with the change, and the previous model, fitted at other blocks, can
        miss the new ones by more than the threshold. A slowdown needs more
        (`_follows_at_once`): a single long step is the common burst (a pause, another
        process), while a step does not come out much shorter than its speed allows."""
        previous = self.previous
        if previous is None or deviation >= -self._one_step_bar():
            return False
        return abs(math.log(seconds / previous.predict(samples))) < -deviation

    def _change(
        self, window: int, change_threshold: float, change_steps: int, back: bool = False
    ) -> Observation:
        """Follow the speed change the candidates confirm: back to the previous model when
        they fit it or `back` says so ("returned"), else this one rescaled by their median
        ratio and refitted from them ("changed"). A return from a speed measured on fewer than
        `change_steps` steps undoes a burst that one step confirmed (`_follows_at_once`)."""
        candidates, self.candidates = self.candidates, []
        # `before` keeps the model before it (its own one dropped, so the chain stays two
        # long): undoing a burst puts both back.
        earlier = None if self.previous is None else StepTimeModel(
            self.previous.fixed, self.previous.per_sample, self.previous.window
        )  # fmt: skip
        before = StepTimeModel(
            self.fixed, self.per_sample, self.window, previous=earlier,
            noise=self.noise, noise_steps=self.noise_steps,
        )  # fmt: skip
        previous = self.previous
        returned = previous is not None and (
            back
            or abs(math.log(statistics.median(t / previous.predict(n) for n, t in candidates)))
            <= math.log1p(change_threshold)
        )
        burst = returned and len(self.window) < change_steps
        if returned:
            self.fixed, self.per_sample, self.window = (
                previous.fixed, previous.per_sample, previous.window
            )  # fmt: skip
        else:
            factor = statistics.median(t / self.predict(n) for n, t in candidates)
            self.window = candidates[-window:]
            self.fixed, self.per_sample = _fit(self.window, self.per_sample * factor)
        if burst:
            # A change one step confirmed, undone before it lasted change_steps: a burst.
            # The model before it comes back as it was, with the one before that.
            assert previous is not None
            self.previous, self.since_burst = previous.previous, 0
        else:
            self.previous = before
        self.settling = window
        return "returned" if returned else "changed"

    def state(self) -> dict[str, Any]:
        return {
            "fixed": self.fixed,
            "per_sample": self.per_sample,
            "window": [list(p) for p in self.window],
            "candidates": [list(p) for p in self.candidates],
            "previous": None if self.previous is None else self.previous.state(),
            "settling": self.settling,
            "noise": self.noise,
            "noise_steps": self.noise_steps,
            "since_burst": self.since_burst,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> StepTimeModel:
        noise = float(state.get("noise", 0.0))
        return cls(
            fixed=float(state["fixed"]),
            per_sample=float(state["per_sample"]),
            window=[(int(n), float(t)) for n, t in state["window"]],
            candidates=[(int(n), float(t)) for n, t in state["candidates"]],
            # Absent from states saved before the model kept it.
            previous=None if state.get("previous") is None else cls.from_state(state["previous"]),
            settling=int(state.get("settling", 0)),
            noise=noise,
            # States saved before the count: a measured noise counts as long measured.
            noise_steps=int(state.get("noise_steps", _NOISE_STEPS_CAP if noise > 0 else 0)),
            # States saved before the count: bursts unknown, as at the start.
            since_burst=None if state.get("since_burst") is None else int(state["since_burst"]),
        )


def _fit(points: Sequence[tuple[int, float]], prior_slope: float) -> tuple[float, float]:
    """(fixed, per_sample) of `points`: the slope by least squares pulled towards
    `prior_slope` (ridge), the fixed part as the median residual, so a burst inside the window
    moves it little. A negative fixed part is not physical: then the line goes through the
    origin (per_sample = median seconds per sample).

    The ridge weighs the prior as a Bayesian would: the data's slope counts by its precision
    spread / noise**2, the prior's by 1 / (_PRIOR_DOUBT * prior_slope)**2, with the noise
    measured as the spread of the points about the least-squares line. Blocks a few samples
    apart under noisy times then barely move the slope (they cannot tell it), blocks far apart
    decide it; _PRIOR_SPREAD keeps a floor for exact times."""
    count = len(points)
    mean_n = sum(n for n, _ in points) / count
    mean_t = sum(t for _, t in points) / count
    spread = sum((n - mean_n) ** 2 for n, _ in points)
    covariance = sum((n - mean_n) * (t - mean_t) for n, t in points)
    prior = count * (_PRIOR_SPREAD * mean_n) ** 2
    if prior_slope > 0:
        slope = covariance / spread if spread > 0 else prior_slope
        noise = sum((t - mean_t - slope * (n - mean_n)) ** 2 for n, t in points)
        variance = noise / (count - 2) if count > 2 else 0.0
        prior += variance / (_PRIOR_DOUBT * prior_slope) ** 2
    per_sample = max((covariance + prior * prior_slope) / (spread + prior), 0.0)
    fixed = statistics.median(t - per_sample * n for n, t in points)
    if fixed < 0 or per_sample == 0:
        return 0.0, statistics.median(t / n for n, t in points)
    return fixed, per_sample


def equal_time_split(
    total: int, models: Sequence[StepTimeModel], low: Sequence[int], high: Sequence[int]
) -> list[int]:
    """Integer blocks summing to `total` within [low, high] that minimise the slowest rank's
    predicted time: every unit goes to the rank whose predicted time after taking it is the
    smallest (ties to the lower rank), which is optimal for times that grow linearly.

    Arguments:
        total: the global batch, in [sum(low), sum(high)].
        models: one model per rank; a rank not measured yet is assumed to be the mean of the
            measured ones (all unknown: equal costs).
        low, high: per-rank bounds.

    Returns:
        One block size per rank.
    """
    known = [m for m in models if m.known]
    if known:
        mean_fixed = sum(m.fixed for m in known) / len(known)
        mean_slope = sum(m.per_sample for m in known) / len(known)
    else:
        mean_fixed, mean_slope = 0.0, 1.0
    costs = [(m.fixed, m.per_sample) if m.known else (mean_fixed, mean_slope) for m in models]
    sizes = list(low)
    heap = [
        (fixed + slope * (size + 1), rank)
        for rank, ((fixed, slope), size) in enumerate(zip(costs, sizes, strict=True))
        if size < high[rank]
    ]
    heapq.heapify(heap)
    for _ in range(total - sum(sizes)):
        _, rank = heapq.heappop(heap)
        sizes[rank] += 1
        if sizes[rank] < high[rank]:
            fixed, slope = costs[rank]
            heapq.heappush(heap, (fixed + slope * (sizes[rank] + 1), rank))
    return sizes


def slowest(sizes: Sequence[int], models: Sequence[StepTimeModel]) -> float:
    """The slowest measured rank's predicted seconds with these blocks (0.0: none measured)."""
    return max((m.predict(n) for n, m in zip(sizes, models, strict=True) if m.known), default=0.0)
