"""Straggler benchmark: fixed vs throughput slicing on 2 CPU processes, with a straggler that
appears mid-run and recovers.

Each process trains the same 2-layer LSTM language model on its own block of every step;
gradients are summed with torch.distributed (gloo) and every step is synchronous, so the step
takes as long as the slowest rank. A run is a sequence of phases (`--phases`, steps each) that
alternate between all ranks at full speed and rank 1 slowed `--slowdown` times by an injected
delay per sample (calibrated on the measured compute time per sample). Scenarios, measured in
the same run and interleaved step by step so that load from other processes hits them alike:

- fixed: equal halves of the global batch, whatever the speeds;
- throughput: DynamicSlicer(policy="throughput") splits the global batch so that every rank's
  modelled step time (fixed part + per-sample part, fitted on its measured compute) is the
  same, knowing nothing of the phases; its statistics ride along in the gradient all-reduce
  (`step_statistics` / `record_reduced`), so it adds no collective; with --probe-steps N,
  once its fit after a change has settled, it tries the neighbouring splits (N steps each,
  in turn with its own);
- line (with --baseline-line): the same slicer without those trials (probe_steps=0), the
  same-run reference for --probe-steps;
- oracle: the best split of each phase, switched exactly at each change. The time-equalising
  split from the step-time line fixed + per_sample * n measured in the calibration (both
  ranks alternate a 3/4 and a 1/4 block; the line through the medians, averaged over the
  ranks) plus the known delay on the slow rank's per-sample part is the first guess; the
  splits up to ORACLE_REACH samples either side of it are then measured with a slow phase's
  delay (ORACLE_PROBE steps each), and the one with the smallest median slowest compute
  wins (a step's time is not quite a line in its block: the 1/4 and 3/4 blocks of the
  calibration mispredict the blocks in between by a few per cent). The fixed part stays, so
  the slowed rank's equal-time block is smaller than its speed share at equal blocks (about
  34/14 of 48 with a 30 % fixed part, not 32/16).

Every figure is given for two clocks: "wall", rank 0's wall-clock step (what the job sees;
on a shared host it carries other processes' load and the all-reduce's scheduling), and
"compute", the slowest rank's compute CPU time per step (the synchronous step with free
communication on an idle host: what the slicer balances, and stable under load).

Reported: samples/s per scenario over the whole run and per phase; the share of the oracle's
gain over fixed slicing that throughput slicing achieves over the whole run (goal >= 90 %), per
round and their median; and, after each speed change, how many steps the throughput slicer took
until every rank's block stayed within 10 % of the oracle's split for the rest of the phase
(goal <= 20; median and per round), and how often its blocks changed once there (oscillation).

Each slowdown costs change_steps steps at the old split before the slicer follows it (one
while no rank had a slower burst in the last burst_memory steps), and each recovery one (a
step back at the old speed, far outside the measured noise, confirms it alone; speedup_steps
where it is not): with 40 slow steps and the defaults (2 + 1 steps) that alone caps the share
near 94 % against an exact oracle (1 + 1: near 96 %); `--change-steps` trades it against
ignoring longer bursts (4 + 1: near 88 %).

The share is a ratio of differences: the oracle's gain is a fifth of the run's time, so a load
spike of a few per cent of one scenario's total moves a round's share by tens of points on
the wall clock. The pooled share (all rounds' steps summed) averages that out better than the
median of rounds; a same-run comparison of two slicers (--baseline-line) sees the same load.

    python bench/slicing.py [--rounds 5] [--phases 20,40,40] [--change-steps 4]
        [--probe-steps 6] [--baseline-line] [--csv results/slicing.csv]
"""

from __future__ import annotations

import argparse
import bisect
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import LSTMLanguageModel, device_name, format_table, write_csv

from fastpar.data import DynamicSlicer, DynamicSlicerConfig
from fastpar.data.step_model import StepTimeModel, equal_time_split
from fastpar.testing.distributed import run_multiprocess

WORLD_SIZE = 2
SLOW_RANK = 1
SCENARIOS = ("fixed", "throughput", "oracle")
# With --baseline-line: the throughput slicer without trials of neighbouring splits
# (probe_steps=0), its line's split alone, in the same interleaved run.
LINE = "line"
TOLERANCE = 0.1  # a block within 10 % of the oracle's size counts as balanced
ORACLE_REACH = 2  # the oracle measures the splits this many samples either side of its guess
ORACLE_PROBE = 12  # steps per measured split
HEADERS = (
    "device", "clock", "scenario", "phase", "slowdown", "rank_blocks", "step_ms", "p20_ms",
    "p80_ms", "samples_per_s", "vs_fixed",
)  # fmt: skip


class Trainer:
    """One rank's model, data and synchronous data-parallel step."""

    def __init__(self, rank: int, args: argparse.Namespace, num_samples: int) -> None:
        torch.manual_seed(0)  # same initial parameters on every rank
        self.rank = rank
        self.model = LSTMLanguageModel(args.vocab, args.embedding, args.hidden, 2)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        generator = torch.Generator().manual_seed(1)
        self.tokens = torch.randint(
            args.vocab, (num_samples, args.seq_len + 1), generator=generator
        )
        self.delay_per_sample = 0.0

    def step(self, indices: list[int], global_size: int, slowdown: float,
             slicer: DynamicSlicer | None = None) -> float:  # fmt: skip
        """Train on this rank's block; returns the compute seconds (before the all-reduce).
        With a `slicer`, its statistics ride along in the gradient all-reduce (no collective
        of its own) and it decides the next step's blocks.

        Compute is this thread's CPU time, and the injected delay spins for CPU time too: on a
        shared machine, time taken by other processes must not pass for a straggler, in the
        calibration, the slicer's measurements or the oracle's split alike.

        The loss is summed over the block and divided by the global batch's token count, so
        the all-reduced sum of gradients is the gradient of the global batch's mean loss. The
        all-reduce comes after the timing on purpose: the throughput slicer must see each
        rank's own compute, and DataParallel's backward would include the wait for the slow
        peer.
        """
        start = time.thread_time()
        batch = self.tokens[indices]
        logits = self.model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        loss = loss / (global_size * (batch.shape[1] - 1))
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        if self.rank == SLOW_RANK and slowdown != 1.0:
            # The injected straggler delay spins rather than sleeps: a slow worker still holds
            # its core, so the other rank does not run faster on a shared machine meanwhile.
            until = time.thread_time() + (slowdown - 1) * self.delay_per_sample * len(indices)
            while time.thread_time() < until:
                pass
        compute = time.thread_time() - start
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        parts = [g.flatten() for g in grads]
        if slicer is not None:
            parts.append(slicer.step_statistics(len(indices), compute).float())
        flat = torch.cat(parts)
        dist.all_reduce(flat)
        offset = 0
        for grad in grads:  # the sums back into .grad
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()
        if slicer is not None:
            slicer.record_reduced(flat[offset:])
        self.optimizer.step()
        return compute


def phase_plan(phases: list[int], slowdown: float) -> list[float]:
    """The slowdown of rank 1 at each step: phases alternate full speed and `slowdown`."""
    return [slowdown if index % 2 else 1.0 for index, steps in enumerate(phases)
            for _ in range(steps)]  # fmt: skip


def phase_bounds(phases: list[int]) -> list[int]:
    """The first step of every phase, then the number of steps."""
    return [sum(phases[:i]) for i in range(len(phases) + 1)]


def _rank_main(rank: int, world_size: int, args: argparse.Namespace) -> dict[str, object]:
    plan = phase_plan(args.phases, args.slowdown)
    bounds = phase_bounds(args.phases)
    half = args.global_batch // 2
    # Enough samples that no run reaches the end of an epoch: every step is a full one.
    num_samples = args.global_batch * (len(plan) + args.calibrate + 1)
    trainer = Trainer(rank, args, num_samples)

    def block(step: int, sizes: list[int]) -> list[int]:
        start = (step % (len(plan) + args.calibrate)) * args.global_batch + sum(sizes[:rank])
        return list(range(start, start + sizes[rank]))

    # Calibration without delay, after a warm-up: every rank alternates a 3/4 and a 1/4 block;
    # the line fixed + per_sample * n through the medians at the two sizes, averaged over the
    # ranks (they run the same model), is every rank's undelayed step time. The delay unit is
    # its time per sample at the equal split, so a slowdown s makes the slow rank's equal-split
    # step take s times as long.
    small, large = half - half // 2, half + half // 2
    probe = [[large, small] if i % 2 else [small, large] for i in range(args.calibrate)]
    seconds = [trainer.step(block(i, probe[i]), args.global_batch, 1.0)
               for i in range(args.calibrate)]  # fmt: skip
    kept = range(args.calibrate // 2, args.calibrate)
    medians = torch.tensor([statistics.median(seconds[i] for i in kept if probe[i][rank] == n)
                            for n in (small, large)], dtype=torch.float64)  # fmt: skip
    dist.all_reduce(medians)
    fixed, per_sample = _line(small, large, *(medians / world_size).tolist())
    trainer.delay_per_sample = (fixed + per_sample * half) / half

    # The oracle's splits: equal step times for each phase's lines (the slow rank's delay adds
    # to its per-sample part only).
    delays = [(plan[first] - 1) * trainer.delay_per_sample for first in bounds[:-1]]
    lines = [[(fixed, per_sample + delay if r == SLOW_RANK else per_sample)
              for r in range(world_size)] for delay in delays]  # fmt: skip
    low, high = [1] * world_size, [args.global_batch - 1] * world_size
    splits = [equal_time_split(args.global_batch, [StepTimeModel(fixed=a, per_sample=b)
                                                   for a, b in row], low, high)
              for row in lines]  # fmt: skip

    # Scenarios interleaved step by step: whatever else runs on the machine hits them alike.
    scenarios = _scenarios(args)
    times: dict[str, list[list[float]]] = {name: [] for name in scenarios}
    compute: dict[str, list[list[float]]] = {name: [] for name in scenarios}
    sizes: dict[str, list[list[list[int]]]] = {name: [] for name in scenarios}
    round_splits = []
    for _ in range(args.rounds):
        # Measured again before every round, from the last round's: the host's speed drifts.
        # At full speed the ranks are alike: equal halves.
        splits = [best_nearby_split(trainer, split, plan[first],
                                    lambda i, s: block(len(plan) + args.calibrate + i, s))
                  if plan[first] != 1.0 else split
                  for split, first in zip(splits, bounds, strict=False)]  # fmt: skip
        round_splits.append(splits)
        slicers = {name: DynamicSlicer(num_samples, min_size=1, max_size=args.global_batch - 1,
                                       global_batch=args.global_batch,
                                       change_steps=args.change_steps,
                                       speedup_steps=args.speedup_steps,
                                       probe_steps=0 if name == LINE else args.probe_steps)
                   for name in scenarios if name in ("throughput", LINE)}  # fmt: skip
        for name in scenarios:
            times[name].append([])
            compute[name].append([])
            sizes[name].append([])
        dist.barrier()
        for step, slowdown in enumerate(plan):
            # A different order each step, so no scenario always follows the same one.
            turn = step % len(scenarios)
            for name in scenarios[turn:] + scenarios[:turn]:
                start = time.perf_counter()
                slicer = slicers.get(name)
                if slicer is not None:
                    step_sizes = [len(b) for b in slicer.next_step()]
                elif name == "oracle":
                    step_sizes = splits[bisect.bisect_right(bounds, step) - 1]
                else:
                    step_sizes = [half] * world_size
                indices = block(args.calibrate + step, step_sizes)
                seconds = trainer.step(indices, args.global_batch, slowdown, slicer)
                times[name][-1].append(time.perf_counter() - start)
                compute[name][-1].append(seconds)
                sizes[name][-1].append(step_sizes)
    return {"times": times, "compute": compute, "sizes": sizes, "splits": round_splits,
            "lines": lines, "delay": trainer.delay_per_sample}  # fmt: skip


def best_nearby_split(
    trainer: Trainer, guess: list[int], slowdown: float,
    block: Callable[[int, list[int]], list[int]],
) -> list[int]:  # fmt: skip
    """The split of two ranks within ORACLE_REACH samples of `guess` whose median slowest
    compute over ORACLE_PROBE steps at `slowdown` is the smallest (the same on every rank:
    the per-rank medians are all-reduced)."""
    candidates = [[guess[0] + k, guess[1] - k] for k in range(-ORACLE_REACH, ORACLE_REACH + 1)
                  if min(guess[0] + k, guess[1] - k) >= 1]  # fmt: skip
    medians = torch.zeros(len(candidates), WORLD_SIZE, dtype=torch.float64)
    for index, split in enumerate(candidates):
        seconds = [trainer.step(block(index * ORACLE_PROBE + i, split), sum(split), slowdown)
                   for i in range(ORACLE_PROBE)]  # fmt: skip
        medians[index, trainer.rank] = statistics.median(seconds)
    dist.all_reduce(medians)
    return candidates[int(medians.max(dim=1).values.argmin())]


def _line(small: int, large: int, small_t: float, large_t: float) -> tuple[float, float]:
    """(fixed seconds, seconds per sample) of the line through (small, small_t) and (large,
    large_t); through the origin at `large` when a part would be negative (noise)."""
    per_sample = (large_t - small_t) / (large - small)
    fixed = small_t - per_sample * small
    if fixed < 0 or per_sample <= 0:
        return 0.0, large_t / large
    return fixed, per_sample


def settle_steps(blocks: list[list[int]], target: list[int]) -> tuple[int | None, int]:
    """(steps until every block stays within TOLERANCE of `target` to the end, or None when it
    never does; how often the blocks changed after that)."""
    balanced = [all(abs(b - t) <= TOLERANCE * t for b, t in zip(step, target, strict=True))
                for step in blocks]  # fmt: skip
    settled = len(blocks)
    while settled > 0 and balanced[settled - 1]:
        settled -= 1
    if settled == len(blocks):
        return None, 0
    changes = sum(blocks[i] != blocks[i - 1] for i in range(settled + 1, len(blocks)))
    return settled, changes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of scenarios")
    parser.add_argument("--phases", type=lambda s: [int(x) for x in s.split(",")],
                        default=[20, 40, 40],
                        help="steps per phase: all at full speed, rank 1 slow, ...")  # fmt: skip
    parser.add_argument("--slowdown", type=float, default=2.0, help="rank 1's slowdown")
    parser.add_argument("--calibrate", type=int, default=48, help="steps measuring compute")
    defaults = DynamicSlicerConfig(min_size=1, max_size=1, global_batch=1)
    parser.add_argument("--change-steps", type=int, default=defaults.change_steps,
                        help="the throughput slicer's change_steps (slowdowns)")  # fmt: skip
    parser.add_argument("--speedup-steps", type=int, default=defaults.speedup_steps,
                        help="the throughput slicer's speedup_steps")  # fmt: skip
    parser.add_argument("--probe-steps", type=int, default=defaults.probe_steps,
                        help="the throughput slicer's probe_steps (0: no trials)")  # fmt: skip
    parser.add_argument("--baseline-line", action="store_true",
                        help=f"also run the slicer with probe_steps=0 ('{LINE}') in the same "
                             "interleaved steps")  # fmt: skip
    parser.add_argument("--global-batch", type=int, default=48)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--embedding", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args()
    if args.calibrate < 4:
        parser.error(
            f"--calibrate needs >= 4 steps (warm-up, then two sizes), got {args.calibrate}"
        )
    torch.set_num_threads(1)  # as in each rank (run_multiprocess)
    results = run_multiprocess(_rank_main, WORLD_SIZE, args=(args,), timeout=1200)
    plan = phase_plan(args.phases, args.slowdown)
    bounds = phase_bounds(args.phases)

    # Synchronous steps: rank 0's wall-clock step times are the job's; the slowest rank's
    # compute (CPU time) is what the step would take with free communication and no other
    # process on the machine, and what the slicer balances.
    sizes, splits, lines = results[0]["sizes"], results[0]["splits"], results[0]["lines"]
    clocks = {
        "wall": results[0]["times"],
        "compute": {name: [[max(ts) for ts in zip(*(r["compute"][name][i] for r in results),
                                                   strict=True)]
                           for i in range(args.rounds)] for name in _scenarios(args)},
    }  # fmt: skip
    rows = []
    for clock, times in clocks.items():
        rows += _rows(clock, times, sizes, args, plan, bounds)
    if args.csv is not None:
        write_csv(args.csv, HEADERS, rows)
    print(format_table(HEADERS, rows))
    delay_ms = results[SLOW_RANK]["delay"] * 1e3
    print(f"\ncompute per sample (the delay unit on rank {SLOW_RANK}): {delay_ms:.3f} ms")
    slicers = [name for name in _scenarios(args) if name in ("throughput", LINE)]
    for clock, times in clocks.items():
        for name in slicers:
            shares = [oracle_share(times["fixed"][r], times[name][r], times["oracle"][r])
                      for r in range(args.rounds)]  # fmt: skip
            pooled = oracle_share(*([t for run in times[n] for t in run]
                                    for n in ("fixed", name, "oracle")))  # fmt: skip
            print(f"whole run ({clock} step time): {name} slicing wins "
                  f"{statistics.median(shares):.0%} of the oracle's gain over fixed slicing "
                  f"(median of {args.rounds} rounds: {', '.join(f'{s:.0%}' for s in shares)}; "
                  f"pooled {pooled:.0%}; goal >= 90%)")  # fmt: skip
        if LINE in slicers:
            # Paired by round: both slicers' shares have the same fixed and oracle steps.
            gains = [oracle_share(times["fixed"][r], times["throughput"][r], times["oracle"][r])
                     - oracle_share(times["fixed"][r], times[LINE][r], times["oracle"][r])
                     for r in range(args.rounds)]  # fmt: skip
            print(
                f"  throughput - {LINE} ({clock}): {statistics.median(gains):+.1%} of the "
                f"oracle's gain (median of rounds: {', '.join(f'{g:+.0%}' for g in gains)})"
            )
    print(
        f"after each speed change (blocks within {TOLERANCE:.0%} of the oracle's split to the "
        "end of the phase; goal <= 20 steps):"
    )
    for phase in range(1, len(args.phases)):
        first, last = bounds[phase], bounds[phase + 1]
        fitted = ", ".join(f"{a * 1e3:.2f} + {b * 1e3:.3f} n" for a, b in lines[phase])
        oracle = ", ".join("/".join(map(str, round_splits[phase])) for round_splits in splits)
        print(f"  step {first} (rank {SLOW_RANK} slowdown {plan[first]:g}; calibrated ms per "
              f"step {fitted}; oracle's split per round {oracle}):")  # fmt: skip
        for name in slicers:
            settled = [
                settle_steps(run[first:last], round_splits[phase])
                for run, round_splits in zip(sizes[name], splits, strict=True)
            ]
            steps = ["never" if s is None else str(s) for s, _ in settled]
            median = statistics.median(last - first if s is None else s for s, _ in settled)
            changes = [str(c) for _, c in settled]
            print(f"    {name}: settled after {median:g} steps (median; per round "
                  f"{', '.join(steps)}); block changes after settling: {', '.join(changes)} "
                  "(per round)")  # fmt: skip


def _scenarios(args: argparse.Namespace) -> tuple[str, ...]:
    return SCENARIOS + ((LINE,) if args.baseline_line else ())


def _rows(
    clock: str,
    times: dict[str, list[list[float]]],
    sizes: dict[str, list[list[list[int]]]],
    args: argparse.Namespace,
    plan: list[float],
    bounds: list[int],
) -> list[list[object]]:
    """Table rows of one clock: per scenario, the whole run and each phase."""
    rows: list[list[object]] = []
    for name in _scenarios(args):
        for phase in range(-1, len(args.phases)):
            first, last = (0, len(plan)) if phase < 0 else (bounds[phase], bounds[phase + 1])
            samples = [t for run in times[name] for t in run[first:last]]
            phase_sizes = [s for run in sizes[name] for s in run[first:last]]
            q = statistics.quantiles(samples, n=10)
            median_blocks = "/".join(
                str(round(statistics.median(s[r] for s in phase_sizes))) for r in range(WORLD_SIZE)
            )
            phase_rate = args.global_batch * len(samples) / sum(samples)
            rows.append([
                device_name(), clock, name, "all" if phase < 0 else phase,
                "" if phase < 0 else plan[first], median_blocks, statistics.median(samples) * 1e3,
                q[1] * 1e3, q[7] * 1e3, phase_rate, 0.0,
            ])  # fmt: skip
    fixed_rates = {row[3]: row[9] for row in rows if row[2] == "fixed"}
    for row in rows:
        row[10] = row[9] / fixed_rates[row[3]]
    return rows


def oracle_share(fixed: list[float], throughput: list[float], oracle: list[float]) -> float:
    """The share of the oracle's gain in throughput over fixed slicing that throughput slicing
    wins, from one round's step times (same steps, same global batch: rates are 1 / total)."""
    rates = [1.0 / sum(times) for times in (fixed, throughput, oracle)]
    return (rates[1] - rates[0]) / (rates[2] - rates[0])


if __name__ == "__main__":
    main()
