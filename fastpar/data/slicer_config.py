"""The dynamic slicer's options (`DynamicSlicerConfig`) and what each step measured and decided
(`SlicerStats`); the policies they tune are described in `fastpar.data.dynamic`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from fastpar._checks import MAX_SHUFFLE_SEED, check_bool, check_choice, check_float, check_int


@dataclass(kw_only=True, frozen=True)
class DynamicSlicerConfig:
    """Options of a DynamicSlicer; invalid values and combinations raise ValueError/TypeError.

    Block sizes of full steps stay within [min_size, max_size]. Only the last step of an epoch
    can be smaller: when fewer samples remain than a full global batch, they are shared among
    the ranks in proportion to the current sizes, at least one each (a rank can get fewer than
    min_size samples); when fewer samples than ranks remain, one each to as many ranks as there
    are samples, and the others get none.
    """

    min_size: int
    """Smallest block a rank gets in a full step, >= 1."""
    max_size: int
    """Largest block a rank gets, >= min_size."""
    policy: Literal["throughput", "loss"] = "throughput"
    """How sizes adapt: equal predicted step times (measured per rank), or by the loss."""
    global_batch: int | None = None
    """"throughput" only (required there): samples per step summed over ranks; it must lie
    in [world_size * min_size, world_size * max_size], checked when the world size is known."""
    rate_momentum: float = 0.5
    """"throughput": weight of the old step-time model in model <- m * model + (1 - m) * fit,
    after each step within change_threshold of the prediction, in [0, 1)."""
    model_window: int = 8
    """"throughput": the last steps each rank's step-time model is fitted on, >= 2."""
    change_threshold: float = 0.3
    """"throughput": a step time off the model's prediction by more than a factor
    1 + change_threshold either way (slower or faster) is a candidate speed change, not
    fitted, > 0."""
    change_steps: int = 2
    """"throughput": slower candidates in a row that can confirm a speed change (rescale the
    model); bursts of fewer steps are ignored, >= 1. They confirm it when their median lies off
    the model by more than the candidate bar (a factor 1 + change_threshold; in log,
    sqrt((1 + 1/m) / (1 + 1/model_window)) times that while a rank's first fit holds
    m < model_window steps: 1.33 for m = 1 at the default window) and, once the measured
    noise (r.m.s. of log(measured / predicted)) has averaged 6 steps, by more than 3 times that
    noise. Candidates short of it wait for the next one; a step within the bar drops them as a
    burst; model_window of them in a row confirm the change whatever the noise. Each slowdown
    runs at least this many steps at the old split (but see burst_memory); a burst this long
    and this far off is followed, and costs speedup_steps steps at its split once it ends
    (about what one of its own steps cost): 2 follows a straggler soon and still ignores
    single-step spikes; raise it where bursts of several steps are common and speed changes
    rare."""
    speedup_steps: int = 2
    """"throughput": the same for candidates faster than the model (never more than
    change_steps), >= 1. Load from other processes only lengthens steps, but noise shortens
    them too: with +-20 % noise per step, 1 let single short steps rescale the model and the
    blocks swing. One step is enough for a return to the speed before the last change when it
    lies far outside the measured noise (a straggler's recovery); the blocks in use before
    that change then come back."""
    burst_memory: int | None = 64
    """"throughput": a slowdown far outside the measured noise (4 times its r.m.s.) is
    confirmed by one step, not change_steps, when no rank had a burst in its last this many
    steps (a burst: slower candidates that came to nothing, or a change one step confirmed and
    the next step undid). A real slowdown then costs one step at the old split instead of
    change_steps; a burst followed this way costs one step at the new split, and after it the
    ranks wait for change_steps again until this many steps pass without a burst. None: always
    change_steps, >= 1."""
    rebalance_threshold: float = 0.05
    """"throughput": the blocks change only when some rank's new block differs from its
    current one by more than this fraction of it (and by more than one sample), >= 0."""
    gain_threshold: float = 0.05
    """"throughput": ... and when the new split shortens the slowest rank's predicted step
    time by more than this fraction, >= 0."""
    probe_steps: int = 0
    """"throughput": once the fit after a speed change has settled, the neighbouring split
    that takes a sample off the bottleneck runs this many steps, in turn with the current
    split, and is kept when measured faster; then the next one, at most twice
    (`probe.SplitProbe`). A line fitted at the one block a rank ran since the change can hold
    it a sample from its fastest split, at a cost in every step of the phase; each trial costs
    up to this many steps at a worse split. 0 (the default): no trials, >= 0. 4 found the
    fastest split in simulations where the line misses it (+0.7 points of the oracle's gain
    at +-3 % noise), but gave nothing measurable on a shared 2-core host, whose load hides a
    one-sample difference (bench/slicing.py --probe-steps 4 --baseline-line)."""
    initial_size: int | None = None
    """"loss": block size of the first step, in [min_size, max_size]; None: min_size."""
    growth: float = 1.25
    """"loss": factor applied to the block size after a stable step, >= 1."""
    shrink: float = 0.5
    """"loss": factor applied after a loss jump, in (0, 1]."""
    jump_threshold: float = 0.2
    """"loss": a step's loss jumps when loss - average > jump_threshold * |average|, > 0."""
    loss_momentum: float = 0.9
    """"loss": weight of the old average in average <- m * average + (1 - m) * loss."""
    shuffle: bool = False
    """Permute the indices every epoch (generator seeded with seed + epoch)."""
    seed: int = 0
    """Base seed of the permutation, 0 to 2**63 - 1."""

    def __post_init__(self) -> None:
        check_int("min_size", self.min_size, 1)
        check_int("max_size", self.max_size, 1)
        if self.max_size < self.min_size:
            raise ValueError(f"max_size {self.max_size} < min_size {self.min_size}")
        check_choice("policy", self.policy, ("throughput", "loss"))
        if self.policy == "throughput":
            if self.global_batch is None:
                raise ValueError("policy 'throughput' needs global_batch (samples per step)")
            check_int("global_batch", self.global_batch, self.min_size)
        elif self.global_batch is not None:
            raise ValueError(
                f"global_batch ({self.global_batch}) applies to policy 'throughput' only; "
                "policy 'loss' uses one block size per rank"
            )
        check_float("rate_momentum", self.rate_momentum, 0.0, 1.0, high_open=True)
        check_float("change_threshold", self.change_threshold, 0.0, math.inf, low_open=True)
        check_int("model_window", self.model_window, 2)
        check_int("change_steps", self.change_steps, 1)
        check_int("speedup_steps", self.speedup_steps, 1)
        if self.burst_memory is not None:
            check_int("burst_memory", self.burst_memory, 1)
        check_float("rebalance_threshold", self.rebalance_threshold, 0.0, math.inf)
        check_float("gain_threshold", self.gain_threshold, 0.0, math.inf)
        check_int("probe_steps", self.probe_steps, 0)
        if self.initial_size is not None:
            check_int("initial_size", self.initial_size, self.min_size, self.max_size)
        check_float("growth", self.growth, 1.0, math.inf)
        check_float("shrink", self.shrink, 0.0, 1.0, low_open=True)
        check_float("jump_threshold", self.jump_threshold, 0.0, math.inf, low_open=True)
        check_float("loss_momentum", self.loss_momentum, 0.0, 1.0, high_open=True)
        check_bool("shuffle", self.shuffle)
        check_int("seed", self.seed, 0, MAX_SHUFFLE_SEED)


@dataclass(frozen=True)
class SlicerStats:
    """What one step measured and what the slicer decided from it, indexed by rank; the same on
    every rank (it is read from the all-reduced statistics)."""

    step: int
    """Steps recorded so far, this one included (1 for the first)."""
    blocks: tuple[int, ...]
    """Samples each rank reported for the step: the blocks it trained on."""
    seconds: tuple[float, ...]
    """Compute seconds each rank reported."""
    samples_per_s: tuple[float, ...]
    """blocks / seconds of this step (0.0 where a rank had no samples or no time)."""
    rates: tuple[float, ...]
    """"throughput": the samples/s each rank's step-time model predicts for its next block
    (0.0: not measured yet); "loss": all 0.0."""
    loss: float | None
    """The step's mean loss over all ranks' samples (None when no rank gave one)."""
    event: Literal["grow", "shrink", "rebalance", "hold", "start"]
    """The decision: "loss" grows the block after a stable step or shrinks it after a jump
    ("start": the first loss only sets the reference); "throughput" rebalances the blocks or
    holds them (a new split would gain too little time or move no block far enough)."""
    sizes: tuple[int, ...]
    """The blocks of the next full step."""
    probing: bool = False
    """"throughput": a trial of neighbouring splits is under way
    (`DynamicSlicerConfig.probe_steps`): the blocks take turns between the current split and
    a neighbour to compare them, which is not an oscillation."""
