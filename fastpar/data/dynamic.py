"""Dynamic slicing: per-rank block sizes that adapt during data-parallel training.

Glossary: n samples, W ranks, step = one synchronous training step in which every rank
processes its own block and the global batch is the sum of the W block sizes.

Every rank holds a DynamicSlicer built with the same arguments. Each step, `next_step()` cuts
the next global batch from the epoch's index order (a permutation seeded with seed + epoch, or
0 .. n-1) into one block per rank; each rank trains on its block and reports what it measured
with `record_step` (a collective). The measurements of all ranks are all-reduced, and the new
sizes are computed from the reduced numbers in a fixed order, so every rank takes the same
decision and the slicers stay identical: the state of any rank resumes all of them.

`last_stats` shows what the last step measured and decided (per-rank blocks, samples/s,
modelled rates, grow/shrink or rebalance), read from the same reduced numbers: it costs no
communication.

Policies (the throughput policy's decisions: `throughput_policy.ThroughputPolicy`):
    "throughput": a fixed global batch is split so that every rank's predicted compute time
        is the same, so a slow worker gets less and nobody waits long for it. Each rank's step
        time is modelled as a fixed part plus a per-sample part (`step_model.StepTimeModel`),
        fitted over its last `model_window` steps at the blocks it actually ran: a fixed
        per-step cost does not make a smaller block look slower, so equal speeds keep equal
        blocks. A measurement off the prediction by more than a factor 1 + `change_threshold`
        (either way: a straggler's recovery is judged as its slowdown) is set aside, and
        only when `change_steps` of them in a row lie on the same side (`speedup_steps` when
        faster; noise shortens steps too; one far outside the noise while bursts are rare,
        `burst_memory`) is it a speed change: the model is rescaled by their
        median and refitted from them (bursts of fewer steps, e.g. another process's spike,
        are ignored); a change back to the speed before the last one restores the model of
        that speed instead (stragglers come and go). A new split replaces the current
        one only when it shortens the slowest rank's predicted time by more than
        `gain_threshold` and by more than the fits' noise can tell (so not before every
        rank's second step), and moves some block by more than `rebalance_threshold`, so the
        blocks neither flicker nor drift where the split makes no difference; once the fit
        after a speed change has a full `model_window` of its own, the split is corrected by
        any amount that shortens that time; with `probe_steps`, the neighbouring split that
        takes a sample off the bottleneck is then tried, in turn with it, and kept when
        measured faster (`probe.SplitProbe`): the line cannot see a one-sample gain.
    "loss": all ranks use one block size, multiplied by `growth` after every step whose loss
        is stable and by `shrink` after one whose loss jumps above its running average by more
        than `jump_threshold` (relative).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import Any, Literal

import torch
import torch.distributed as dist

from fastpar._checks import check_choice, check_float, check_int, check_member
from fastpar.comm import all_reduce
from fastpar.comm.devices import collective_device
from fastpar.data.apportion import apportion
from fastpar.data.slicer_config import DynamicSlicerConfig, SlicerStats
from fastpar.data.throughput_policy import ThroughputPolicy

_STATE_VERSION = 2
# Rows of the statistics matrix that record_step all-reduces: one column per rank, each rank
# fills only its own column, so the sum is exact and the same bits on every rank.
_SAMPLES, _SECONDS, _LOSS, _HAS_LOSS, _EPOCH, _CURSOR = range(6)


class DynamicSlicer:
    """Per-step, per-rank blocks of sample indices whose sizes adapt during training.

    Every sample is in exactly one block per epoch. Full steps give every rank a block within
    [min_size, max_size]; see DynamicSlicerConfig for the last step of an epoch.

    Process groups: when torch.distributed is initialised and `group` (default: the world) has
    more than one rank, this process is one rank of it and `record_step` is a collective that
    every rank must call once per step, after the same `next_step`. Otherwise one process plays
    all `world_size` ranks (default 1) and reports for all of them with `record_all`.

    Typical data-parallel loop (every rank runs it). Blocks differ in size, so each rank
    weights its mean loss by its share of the step's global batch, and the gradients are summed
    (with a DDP-style average over W ranks, multiply the weight by W):

        slicer = DynamicSlicer(len(data), min_size=8, max_size=64, global_batch=128)
        for epoch in range(epochs):
            for indices in slicer.blocks():              # this rank's block of each step
                start = time.perf_counter()
                loss = mean_loss(model, data[indices])
                (loss * len(indices) / sum(slicer.last_sizes)).backward()
                slicer.record_step(len(indices), time.perf_counter() - start, loss.item())
                all_reduce_sum_gradients(model); optimizer.step(); optimizer.zero_grad()

    `record_step` is timed before the gradient all-reduce on purpose (see there). To save its
    collective, send `step_statistics(...)` along with the gradient all-reduce and hand the sum
    to `record_reduced`. `last_stats` (`SlicerStats`) holds what the last step measured and
    decided: blocks, samples/s per rank, modelled rates, grow/shrink/rebalance/hold. In the last
    step of an epoch a rank gets an empty block only when fewer samples than ranks remain; it
    then still steps with its peers: it contributes zero gradients and calls `record_step` with
    0 samples (with a DataLoader, see `batch_sampler`).

    Arguments:
        num_samples: n, the number of samples (indices 0 .. n-1), >= 1.
        config: the options; or pass them as keyword arguments (`min_size=...`), not both.
        group: process group whose ranks share the slicer (None: the default group).
        world_size: the number of ranks; with a process group it must match the group's size
            (None: taken from the group, or 1 without one).
        comm: how `record_step` all-reduces its statistics. "auto": fastpar's all-reduce on a
            group whose collectives run on the CPU (one host: the shared-memory ring, ~20 us
            where gloo takes 0.5 ms and more, on steps of tens of ms), torch.distributed on
            GPU groups; "torch": torch.distributed always. The sum, and so every decision, is
            the same either way (each rank fills its own column).
        **options: fields of DynamicSlicerConfig when `config` is None.
    """

    def __init__(
        self,
        num_samples: int,
        config: DynamicSlicerConfig | None = None,
        *,
        group: dist.ProcessGroup | None = None,
        world_size: int | None = None,
        comm: Literal["auto", "torch"] = "auto",
        **options: Any,
    ) -> None:
        check_choice("comm", comm, ("auto", "torch"))
        self.comm = comm
        if config is None:
            config = DynamicSlicerConfig(**options)
        elif options:
            raise TypeError(f"pass either config or its fields, not both (got {sorted(options)})")
        self.config = config
        self.num_samples = check_int("num_samples", num_samples, 1)
        self.group = group
        self.rank, self.world_size = _world(group, world_size)
        if config.policy == "throughput":
            batch = config.global_batch
            low, high = self.world_size * config.min_size, self.world_size * config.max_size
            if batch is None or not low <= batch <= high:
                raise ValueError(
                    f"global_batch {batch} is outside [world_size {self.world_size} * min_size "
                    f"{config.min_size}, world_size {self.world_size} * max_size "
                    f"{config.max_size}] = [{low}, {high}]"
                )
        self._epoch = 0
        self._cursor = 0
        self._steps = 0
        # Also kept under policy "loss", where it stays as built: every state has its keys.
        self._throughput = ThroughputPolicy(config, self.world_size)
        self._size = float(config.initial_size or config.min_size)
        self._loss_average: float | None = None
        self._sizes = self._decide_sizes()
        self._last_sizes = [0] * self.world_size
        self._order = self._epoch_order()
        self._last_stats: SlicerStats | None = None

    # ------------------------------------------------------------------ iteration

    @property
    def last_stats(self) -> SlicerStats | None:
        """What the last `record_step`/`record_all` measured and decided (None before the first;
        not part of the state dict)."""
        return self._last_stats

    @property
    def epoch(self) -> int:
        """The epoch the next step is cut from (an exhausted epoch moves on at the next step)."""
        return self._epoch

    @property
    def position(self) -> int:
        """How many samples of the current epoch have been handed out."""
        return self._cursor

    @property
    def last_sizes(self) -> list[int]:
        """Each rank's block size in the step `next_step` cut last (their sum is that step's
        global batch; smaller than a full step's at the end of an epoch)."""
        return list(self._last_sizes)

    @property
    def sizes(self) -> list[int]:
        """Each rank's block size for the next full step, indexed by rank."""
        return list(self._sizes)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its beginning (optional: epochs also follow each other).

        Arguments:
            epoch: the epoch number, >= 0; selects the permutation with `shuffle`.
        """
        self._epoch = check_int("epoch", epoch, 0)
        self._cursor = 0
        self._order = self._epoch_order()

    def next_step(self) -> list[list[int]]:
        """Cut the next step's blocks, one per rank, and advance the position.

        When the current epoch is exhausted, the next epoch starts first, so this never returns
        an empty step.

        Returns:
            blocks[rank]: the sample indices of each rank's block for this step.
        """
        if self._cursor >= self.num_samples:
            self.set_epoch(self._epoch + 1)
        sizes = self._sizes
        remaining = self.num_samples - self._cursor
        if remaining < sum(sizes):
            sizes = self._last_step_sizes(remaining)
        blocks = []
        for size in sizes:
            blocks.append(self._order[self._cursor : self._cursor + size].tolist())
            self._cursor += size
        self._last_sizes = list(sizes)
        return blocks

    def _last_step_sizes(self, remaining: int) -> list[int]:
        """The epoch's last blocks: `remaining` samples (fewer than a full step) shared in
        proportion to the current sizes, at least one per rank while `world_size` remain and at
        most one when fewer do. Without the lower bound a slow rank's small share rounds to 0
        (sizes [2, 30], 3 left: [0, 3]): an empty block where none is needed."""
        world = self.world_size
        if remaining >= world:
            return apportion(remaining, self._sizes, [1] * world, self._sizes)
        return apportion(remaining, self._sizes, [0] * world, [1] * world)

    def steps(self) -> Iterator[list[list[int]]]:
        """Yield `next_step()` until the end of the epoch (starting the next one if the current
        one is exhausted). Sizes change as `record_step`/`record_all` are called in between.

        Returns:
            An iterator over steps; each step is a list of blocks indexed by rank.
        """
        if self._cursor >= self.num_samples:
            self.set_epoch(self._epoch + 1)
        epoch = self._epoch
        while self._epoch == epoch and self._cursor < self.num_samples:
            yield self.next_step()

    def blocks(self) -> Iterator[list[int]]:
        """Yield this rank's block of each step until the end of the epoch (see `steps`).

        Returns:
            An iterator over this rank's index lists.

        Raises:
            RuntimeError: this process plays several ranks (no process group): use `steps`.
        """
        rank = self._own_rank()
        for blocks in self.steps():
            yield blocks[rank]

    def batch_sampler(self) -> _Blocks:
        """This rank's blocks as a re-iterable DataLoader `batch_sampler` (one epoch per pass).

        A DataLoader with worker processes fetches `prefetch_factor * num_workers` blocks ahead,
        cut with the sizes known at that time: sizes then follow the measurements with that lag
        (the same on every rank when all ranks use the same loader settings).

        It has no `len()`, so neither has the DataLoader: how many blocks an epoch takes
        depends on the sizes the measurements choose while it runs.

        Every rank's pass yields the same number of blocks: when fewer samples than ranks are
        left for an epoch's last step, the ranks without one get an empty list, not nothing. A
        rank that skipped it would end its epoch a step early while its peers wait for it in
        the step's gradient all-reduce and `record_step`. PyTorch's default collate fails on an
        empty list, so give the loader `collate_fn=BlockCollate(dataset)`
        (`fastpar.data.collate`): the empty block arrives as a batch of 0 samples, whose loss
        weighted by its share of the step (0) gives zero gradients, and the rank reports it with
        `record_step(0, ...)`:

            loader = DataLoader(dataset, batch_sampler=slicer.batch_sampler(),
                                collate_fn=BlockCollate(dataset))

        Returns:
            An iterable whose every iteration is `self.blocks()`.
        """
        self._own_rank()
        return _Blocks(self)

    # ------------------------------------------------------------------ measurements

    def record_step(self, samples: int, seconds: float, loss: float | None = None) -> None:
        """Report this rank's step and update the sizes (a collective across the group).

        Arguments:
            samples: how many samples this rank processed in the step (its block's length).
            seconds: time this rank spent computing its block, excluding any wait for other
                ranks (e.g. forward + backward before the gradient all-reduce): in synchronous
                training the whole step takes the same time on every rank, so that would carry
                no signal for the "throughput" policy.
            loss: this rank's mean loss over its block; required (on every rank with samples)
                by policy "loss", ignored with 0 samples. A non-finite loss counts as a jump.

        Raises:
            RuntimeError: the ranks are at different positions (they did not step together),
                raised on every rank alike; or this process plays several ranks (use
                `record_all`).
            ValueError: policy "loss" and some rank with samples gave no loss (on every rank,
                after the collective); or a bad `samples`/`seconds`, raised on this rank before
                the collective (the other ranks then wait in it until the group's timeout).
        """
        stats = self.step_statistics(samples, seconds, loss)
        if self.rank is not None and self.world_size > 1:
            device = collective_device(self.group)
            if self.comm == "auto" and device.type == "cpu":
                all_reduce(stats, group=self.group)
            else:
                reduced = stats.to(device)
                dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=self.group)
                stats = reduced.cpu()
        self.record_reduced(stats)

    def step_statistics(
        self, samples: int, seconds: float, loss: float | None = None
    ) -> torch.Tensor:
        """This rank's part of `record_step`'s collective, to send with an all-reduce that runs
        anyway (e.g. appended to the gradients' buffer): the summed result goes to
        `record_reduced`, on every rank, in the same step. Saves one collective per step.

        Arguments: as `record_step`.

        Returns:
            (6 * W,) float64 on the CPU: zeros but for this rank's column. Every column holds
            one rank's numbers, so a sum in float32 is exact too (sample counts and positions
            below 2**24).
        """
        rank = self._own_rank()
        check_int("samples", samples, 0)
        check_float("seconds", seconds, 0.0, math.inf)
        stats = torch.zeros(6, self.world_size, dtype=torch.float64)
        stats[:, rank] = torch.tensor(self._row(samples, seconds, loss), dtype=torch.float64)
        return stats.flatten()

    def record_reduced(self, stats: torch.Tensor) -> None:
        """Update the sizes from the sum over the group of every rank's `step_statistics`
        (any dtype or device, any shape with 6 * W elements); raises as `record_step`."""
        self._apply(stats.detach().to("cpu", torch.float64).reshape(6, self.world_size).tolist())

    def record_all(
        self,
        samples: Sequence[int],
        seconds: Sequence[float],
        losses: Sequence[float | None] | None = None,
    ) -> None:
        """Report every rank's step from this one process and update the sizes (no collective).

        Arguments:
            samples: samples processed per rank, indexed by rank.
            seconds: compute seconds per rank (see `record_step`).
            losses: mean loss per rank (None entries or None: not given).

        Raises:
            RuntimeError: this process is one rank of a process group (use `record_step`).
            ValueError: lengths do not match world_size, or bad values (see `record_step`).
        """
        if self.rank is not None and self.world_size > 1:
            raise RuntimeError(
                f"this process is rank {self.rank} of {self.world_size}: report with "
                "record_step (a collective), not record_all"
            )
        losses = [None] * self.world_size if losses is None else list(losses)
        if not len(samples) == len(seconds) == len(losses) == self.world_size:
            raise ValueError(
                f"need one value per rank (world_size {self.world_size}), got "
                f"{len(samples)} samples, {len(seconds)} seconds, {len(losses)} losses"
            )
        columns = []
        for rank in range(self.world_size):
            check_int(f"samples[{rank}]", samples[rank], 0)
            check_float(f"seconds[{rank}]", seconds[rank], 0.0, math.inf)
            columns.append(self._row(samples[rank], seconds[rank], losses[rank]))
        self._apply([list(row) for row in zip(*columns, strict=True)])

    def _row(self, samples: int, seconds: float, loss: float | None) -> list[float]:
        value = 0.0 if loss is None else float(loss)
        return [samples, seconds, value, 0.0 if loss is None else 1.0, self._epoch, self._cursor]

    def _apply(self, stats: list[list[float]]) -> None:
        # Everything below reads the reduced statistics only, in rank order: same decision on
        # every rank.
        positions = list(zip(stats[_EPOCH], stats[_CURSOR], strict=True))
        if len(set(positions)) > 1:
            readable = [(int(e), int(c)) for e, c in positions]
            raise RuntimeError(
                f"ranks are at different (epoch, position) pairs {readable}: every rank must "
                "call next_step and then record_step once per step"
            )
        samples, seconds = stats[_SAMPLES], stats[_SECONDS]
        measured = [
            n / t if n > 0 and t > 0 else 0.0 for n, t in zip(samples, seconds, strict=True)
        ]
        with_loss = [n if has else 0.0 for n, has in zip(samples, stats[_HAS_LOSS], strict=True)]
        total = sum(with_loss)
        # The global batch's mean loss: each rank's mean weighted by its samples. A rank with an
        # empty block adds nothing, whatever it gave: the mean of no samples is NaN in torch.
        weighted = zip(stats[_LOSS], with_loss, strict=True)
        loss = (
            sum(value * count for value, count in weighted if count > 0) / total
            if total > 0
            else None
        )
        if self.config.policy == "throughput":
            self._sizes, event = self._throughput.update(self._sizes, samples, seconds)
        else:
            missing = [
                r for r in range(self.world_size) if samples[r] > 0 and stats[_HAS_LOSS][r] == 0
            ]
            if missing:
                raise ValueError(
                    f"policy 'loss' needs the loss of every rank with samples; "
                    f"rank(s) {missing} gave none"
                )
            event = self._update_size(loss)
            self._sizes = self._decide_sizes()
        self._steps += 1
        self._last_stats = SlicerStats(
            step=self._steps,
            blocks=tuple(int(n) for n in samples),
            seconds=tuple(seconds),
            samples_per_s=tuple(measured),
            rates=self._rates(),
            loss=loss,
            event=event,
            sizes=tuple(self._sizes),
            probing=self._throughput.probing,
        )

    def _rates(self) -> tuple[float, ...]:
        """The samples/s each rank's model predicts for its next block (0.0: not measured)."""
        if self.config.policy != "throughput":
            return (0.0,) * self.world_size
        return self._throughput.rates(self._sizes)

    def _update_size(self, loss: float | None) -> Literal["grow", "shrink", "hold", "start"]:
        if loss is None:
            return "hold"
        config = self.config
        event: Literal["grow", "shrink", "hold", "start"]
        if not math.isfinite(loss):
            event = "shrink"
        elif self._loss_average is None:
            self._loss_average = loss  # the first loss only sets the reference
            return "start"
        else:
            average = self._loss_average
            jumped = loss - average > config.jump_threshold * abs(average)
            event = "shrink" if jumped else "grow"
            self._loss_average = config.loss_momentum * average + (1 - config.loss_momentum) * loss
        self._size *= config.shrink if event == "shrink" else config.growth
        self._size = min(max(self._size, float(config.min_size)), float(config.max_size))
        return event

    def _decide_sizes(self) -> list[int]:
        if self.config.policy == "loss":
            return [int(self._size)] * self.world_size
        return self._throughput.split()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume identically (plain Python values; the same on every
        rank, so one rank's copy resumes all). The permutation is rebuilt from seed + epoch.

        Returns:
            A dict for `load_state_dict`.
        """
        return {
            "version": _STATE_VERSION,
            "num_samples": self.num_samples,
            "world_size": self.world_size,
            "config": asdict(self.config),
            "epoch": self._epoch,
            "position": self._cursor,
            "steps": self._steps,
            **self._throughput.state(),
            "size": self._size,
            "loss_average": self._loss_average,
            "sizes": list(self._sizes),
            "last_sizes": list(self._last_sizes),
        }

    def load_state_dict(self, state: dict[str, Any], *, reshard: bool = False) -> None:
        """Resume from `state_dict()` of a slicer with the same samples, world size and config.

        With `reshard`, the state may come from a slicer with another world size or global
        batch (a run resumed on another layout): the position (epoch, samples handed out) and
        the "loss" policy's block size and loss average carry over; the per-rank throughput
        measurements do not (this slicer measures its own ranks afresh). The order of the
        samples must be the same: num_samples, shuffle and seed must match.

        Arguments:
            state: what `state_dict` returned.
            reshard: accept another world size and global batch (see above).

        Raises:
            ValueError: the state is from another version or sample count, or from another
                world size or config (without `reshard`), or another sample order (with it).
        """
        config = asdict(self.config)
        # Options added since the state was saved take this slicer's values (speedup_steps), so
        # an older checkpoint still resumes.
        state = {**state, "config": {**config, **state["config"]}}
        expected: dict[str, Any] = {"version": _STATE_VERSION, "num_samples": self.num_samples}
        if not reshard:
            expected.update(world_size=self.world_size, config=config)
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(
                    f"state {key} {state.get(key)!r} does not match this slicer's {value!r}"
                )
        for key in ("policy", "shuffle", "seed"):
            if state["config"][key] != config[key]:
                raise ValueError(
                    f"state config {key} {state['config'][key]!r} does not match this "
                    f"slicer's {config[key]!r}"
                )
        self._epoch = check_int("epoch", state["epoch"], 0)
        self._cursor = check_int("position", state["position"], 0, self.num_samples)
        self._steps = state["steps"]
        self._size = float(state["size"])
        average = state["loss_average"]
        self._loss_average = None if average is None else float(average)
        self._order = self._epoch_order()
        if reshard and (state["world_size"], state["config"]) != (self.world_size, config):
            low, high = float(self.config.min_size), float(self.config.max_size)
            self._size = min(max(self._size, low), high)
            self._throughput = ThroughputPolicy(self.config, self.world_size)
            self._sizes = self._decide_sizes()
            self._last_sizes = [0] * self.world_size
            return
        self._throughput.load_state(state)
        self._sizes = [int(size) for size in state["sizes"]]
        self._last_sizes = [int(size) for size in state["last_sizes"]]

    # ------------------------------------------------------------------ helpers

    def _epoch_order(self) -> torch.Tensor:
        if self.config.shuffle:
            generator = torch.Generator().manual_seed(self.config.seed + self._epoch)
            return torch.randperm(self.num_samples, generator=generator)
        return torch.arange(self.num_samples)

    def _own_rank(self) -> int:
        if self.rank is None:
            raise RuntimeError(
                f"this process plays all {self.world_size} ranks (no process group): use "
                "steps()/next_step() for the blocks and record_all for the measurements"
            )
        return self.rank


class _Blocks:
    """Re-iterable view of one rank's blocks, for DataLoader(batch_sampler=...)."""

    def __init__(self, slicer: DynamicSlicer) -> None:
        self.slicer = slicer

    def __iter__(self) -> Iterator[list[int]]:
        return self.slicer.blocks()


def _world(group: dist.ProcessGroup | None, world_size: int | None) -> tuple[int | None, int]:
    """(this process's rank or None when it plays all ranks, world size)."""
    distributed = dist.is_available() and dist.is_initialized()
    if group is not None and not distributed:
        raise ValueError("a group was given but torch.distributed is not initialised")
    if distributed:
        # A process outside `group` reads rank and size -1 from it, which would make it a
        # one-rank slicer that deals itself the group's samples.
        rank = check_member(group)
        size = dist.get_world_size(group)
        if world_size is not None and world_size != size:
            raise ValueError(f"world_size {world_size} != the process group's size {size}")
        if size > 1:
            return rank, size
    size = 1 if world_size is None else check_int("world_size", world_size, 1)
    return (0 if size == 1 else None), size
