"""`ThroughputPolicy`: the decisions of the dynamic slicer's "throughput" policy, from one step's
all-reduced measurements to the next step's blocks (the policy in words: `fastpar.data.dynamic`;
each rank's fitted step time: `step_model`; trials of neighbouring splits: `probe`).

Everything here is a pure function of the reduced measurements, taken in rank order, so every
rank's copy takes the same decision and the copies stay identical.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fastpar.data.probe import SplitProbe
from fastpar.data.slicer_config import DynamicSlicerConfig
from fastpar.data.step_model import Observation, StepTimeModel, equal_time_split, slowest


@dataclass(frozen=True)
class _Change:
    """A confirmed speed change of one rank, as the policy remembers it."""

    rank: int
    sizes: list[int]
    """The blocks in use before the change (balanced for the speeds before it)."""
    model: tuple[float, float]
    """The rank's (fixed, per_sample) before the change: a return restores exactly these."""


class ThroughputPolicy:
    """Every rank's step-time model, the speed changes they confirmed, and the split of the
    global batch they decide.

    Arguments:
        config: the slicer's options (`global_batch` is needed by `split` and `update` only).
        world_size: the number of ranks.
    """

    def __init__(self, config: DynamicSlicerConfig, world_size: int) -> None:
        self.config = config
        self.world_size = world_size
        self.models = [StepTimeModel() for _ in range(world_size)]
        # Confirmed speed changes not yet undone, the latest last (see _after_changes).
        self._changes: list[_Change] = []
        self._hold = 0  # steps the blocks stay put after a restore (see _after_changes)
        # Whether the blocks in use were chosen from measurements: moved to, restored, or held
        # with every rank's noise measured (see _after_changes). The start's split was not.
        self._chosen = False
        self._probe: SplitProbe | None = None  # the trials of neighbouring splits under way
        self._probe_due = False  # a speed change's settled split is still to be probed

    @property
    def probing(self) -> bool:
        """Whether a trial of neighbouring splits is under way (see
        `DynamicSlicerConfig.probe_steps`)."""
        return self._probe is not None

    def split(self) -> list[int]:
        """The blocks, within the size bounds, that give every rank the same predicted time (the
        slowest one's as small as the bounds allow)."""
        config = self.config
        assert config.global_batch is not None  # the config requires it for this policy
        return equal_time_split(
            config.global_batch,
            self.models,
            [config.min_size] * self.world_size,
            [config.max_size] * self.world_size,
        )

    def rates(self, sizes: Sequence[int]) -> tuple[float, ...]:
        """The samples/s each rank's model predicts for its block in `sizes` (0.0: not
        measured)."""
        return tuple(
            n / m.predict(n) if m.known and n > 0 and m.predict(n) > 0 else 0.0
            for n, m in zip(sizes, self.models, strict=True)
        )

    def update(
        self, sizes: list[int], samples: Sequence[float], seconds: Sequence[float]
    ) -> tuple[list[int], Literal["rebalance", "hold"]]:
        """Fold one step's measurements into the models and decide the next step's blocks.

        Arguments:
            sizes: the blocks of the current full step.
            samples, seconds: each rank's samples and compute seconds in the step, in rank
                order (a rank with none of either measured nothing).

        Returns:
            The next full step's blocks and the decision: "rebalance" when they differ from
            `sizes`, else "hold".
        """
        config = self.config
        # A trial's steps inform the probe, not the fits (see StepTimeModel.observe).
        trial = self._probe is not None and [int(n) for n in samples] == self._probe.trial
        memory = config.burst_memory
        # Bursts hit any rank of a host alike: one burst anywhere makes every rank wait.
        quiet = memory is not None and all(
            model.since_burst is None or model.since_burst >= memory for model in self.models
        )
        observations = [
            model.observe(
                int(n), t, window=config.model_window,
                change_threshold=config.change_threshold,
                change_steps=config.change_steps,
                speedup_steps=min(config.speedup_steps, config.change_steps),
                momentum=config.rate_momentum, fit=not trial,
                follow_at_once=quiet,
            ) if n > 0 and t > 0 else None
            for model, n, t in zip(self.models, samples, seconds, strict=True)
        ]  # fmt: skip
        if any(seen in ("changed", "returned") for seen in observations):
            self._probe = None  # measured at speeds that are gone
            self._probe_due = "changed" in observations
        restored = self._after_changes(observations, sizes)
        if restored is not None:
            proposal, moved = restored, restored != sizes
        elif self._probe is not None:
            blocks = [int(n) for n in samples]
            if self._probe.record(blocks, seconds, self.models, **self._probe_options()):
                proposal, self._probe = self._probe.sizes, None
            else:
                proposal = self._probe.sizes
            moved = proposal != sizes
        elif self._hold > 0:
            self._hold -= 1
            proposal, moved = sizes, False
        else:
            proposal = self.split()
            moved = self._moves(proposal, sizes, "settled" in observations)
            self._chosen = self._chosen or moved or self._noise_measured()
            if "settled" in observations and self._probe_due and config.probe_steps > 0:
                self._probe_due = False
                base = proposal if moved else sizes
                probe = SplitProbe.start(
                    base, self.models, low=config.min_size, high=config.max_size
                )
                self._probe = None if probe.over else probe
                proposal = probe.sizes
                moved = proposal != sizes
        return (proposal, "rebalance") if moved else (list(sizes), "hold")

    def _probe_options(self) -> dict[str, Any]:
        config = self.config
        return {"steps": config.probe_steps, "low": config.min_size, "high": config.max_size}

    def _after_changes(
        self, observations: list[Observation | None], sizes: list[int]
    ) -> list[int] | None:
        """The blocks to restore when this step confirmed that a rank is back at its speed
        before its latest change, that change being the latest of all (a straggler that
        recovered; nested changes unwind in order); None otherwise.

        Those blocks were balanced for the speeds that are back, while a split recomputed now
        would rest on models fitted at other blocks (the other ranks' at the straggler's
        split), a sample or two off, which the thresholds would then keep for the whole phase.
        After a restore the blocks stay put for model_window steps, until every model is
        fitted at them again; a new change ends that at once.

        Only blocks chosen from measurements are restored. The start's equal split, in use
        until every rank's noise is measured, is balanced for nothing; and a change confirmed
        then is judged against the first step or two alone: with +-20 % noise per step, two
        steps in a row beyond a 30 % threshold of a lucky (or warm-up) first one are common,
        and two more back make its "return"."""
        changed = [r for r, seen in enumerate(observations) if seen in ("changed", "returned")]
        if not changed:
            return None
        self._hold = 0
        if len(changed) > 1:
            self._changes.clear()  # several at once: no earlier split fits them
            return None
        rank = changed[0]
        model = self.models[rank]
        if observations[rank] == "changed":
            assert model.previous is not None  # a confirmed change keeps the model before it
            if not self._chosen:
                return None
            before = (model.previous.fixed, model.previous.per_sample)
            self._changes = [*self._changes, _Change(rank, list(sizes), before)]
            del self._changes[: -2 * self.world_size]
            return None
        latest = self._changes.pop() if self._changes else None
        if latest is None or (latest.rank, latest.model) != (rank, (model.fixed, model.per_sample)):
            self._changes.clear()
            return None
        self._hold = self.config.model_window
        self._chosen = True
        return latest.sizes

    def _noise_measured(self) -> bool:
        """Whether every rank's model is measured, its noise included (a finite `doubt`)."""
        return all(model.known and math.isfinite(model.doubt) for model in self.models)

    def _moves(self, proposal: list[int], sizes: list[int], settled: bool) -> bool:
        """Whether `proposal` shortens the slowest rank's predicted time with `sizes` by more
        than the fits can tell (twice the largest `doubt`) and by more than the gain threshold,
        and moves some block by more than the rebalance threshold. When a model has just
        `settled` after a speed change, the thresholds are waived (the noise bound stays): they
        keep noise from moving well-fitted blocks, but the split made right after the change
        rests on a rough fit, and a block left one sample off would cost every step until the
        next change."""
        config = self.config
        current = slowest(sizes, self.models)
        if current > 0:
            doubt = max(model.doubt for model in self.models if model.known)
            gain = 1 - slowest(proposal, self.models) / current
            if settled:
                return proposal != sizes and gain > 2 * doubt
            if gain <= max(config.gain_threshold, 2 * doubt):
                return False
        return any(
            abs(new - old) > max(1.0, config.rebalance_threshold * old)
            for new, old in zip(proposal, sizes, strict=True)
        )

    def state(self) -> dict[str, Any]:
        """The policy's part of the slicer's state dict (plain Python values)."""
        return {
            "models": [model.state() for model in self.models],
            "changes": [[c.rank, list(c.sizes), list(c.model)] for c in self._changes],
            "hold": self._hold,
            "chosen": self._chosen,
            "probe": None if self._probe is None else self._probe.state(),
            "probe_due": self._probe_due,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Resume from a state dict holding `state()`'s keys ("models" at least: the others are
        absent from states saved before the policy kept them)."""
        self.models = [StepTimeModel.from_state(model) for model in state["models"]]
        self._changes = [
            _Change(int(rank), [int(n) for n in sizes], (float(model[0]), float(model[1])))
            for rank, sizes, model in state.get("changes", [])
        ]
        self._hold = int(state.get("hold", 0))
        # States saved before the flag: blocks that came this far were chosen.
        self._chosen = bool(state.get("chosen", True))
        probe = state.get("probe")
        self._probe = None if probe is None else SplitProbe.from_state(probe)
        self._probe_due = bool(state.get("probe_due", False))
