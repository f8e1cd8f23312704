"""Pipeline step time, fastpar vs torch.distributed.pipelining, and the measured bubble, for
every schedule.

2 ranks (one process each, gloo), 8 micro-batches, an 8-layer 512-wide MLP, batch 64; each
fastpar schedule next to torch's matching one on the same cut of the same model:

    gpipe             ScheduleGPipe                  2 stages, one per rank
    1f1b              Schedule1F1B                   2 stages
    interleaved-1f1b  ScheduleInterleaved1F1B        4 stages, looped: rank r holds r, r + 2
    zero-bubble       ScheduleInterleavedZeroBubble  2 stages (one local stage: ZB-H1)
    zbv               ScheduleZBVZeroBubble          4 stages in a V: rank r holds r, 3 - r

Runs are interleaved step by step in one run so all see the same machine load. A step (forward
and backward; zero_grad comes before) starts on both ranks at one agreed instant (the ranks
share the host's monotonic clock) and lasts until its slowest rank is done: a barrier alone
releases the ranks up to a few hundred microseconds apart, and the rank released first would
count the other's lateness as its own waiting (the replay below starts every rank at 0).

Idle per rank: "bubble" is the fraction of fastpar's pipeline step (from the common start until
the last rank is done) in which the rank was not computing (`Pipeline.last_stats`). "ideal" is
the bubble the schedule alone gives with the stages' measured compute times and free transfers
(`ideal_bubbles`): bubble - ideal is what transfers and overheads cost. "theory" replays the
schedule with every stage at its mean times, i.e. perfectly balanced stages: (p-1)/(m+p-1) for
gpipe and 1f1b, (p-1)/(v m+p-1) for interleaved-1f1b, (p-1)(F+I-W) of idle for zero-bubble
(ZB-H1). torch does not report its compute times.

"idle_ms" and "ideal_idle_ms" are the same bubbles in time, as the zero-bubble paper counts
them: ZB-H1's (p-1)(F+B-W) is 1/3 of 1F1B's (p-1)(F+B+W) with F = B = W. As fractions of the
step the ratio is larger, since zero-bubble's step is also shorter (p = 2, m = 8, F = B = W:
1/25 against 1/9, 0.36; and no schedule does better there: the last stage cannot start before
the first forward, so its idle fraction is at least F / (F + m (F+B+W)) = 1/25). The lines
under the table compare zero-bubble with 1F1B and zbv with interleaved-1f1b per rank.

--batch sets the rows per step: each micro-batch's compute grows with it, while the per-
micro-batch costs (transfers, the executor's Python) stay, so bubble - ideal shrinks.

    python bench/pipeline.py [--steps 40] [--batch 64] [--csv results/pipeline.csv]
"""

from __future__ import annotations

import argparse
import statistics
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from common import device_name, format_table, write_csv
from torch import nn
from torch.distributed import pipelining

from fastpar.parallel.pipeline import Pipeline, StepStats, ideal_bubbles, split_sequential
from fastpar.parallel.pipeline.schedules import Placement, splits_backward
from fastpar.testing.distributed import run_multiprocess

RANKS, MICROBATCHES, LAYERS, WIDTH, WARMUP = 2, 8, 8, 512, 3
START_MARGIN_S = 2e-3  # from the later rank's arrival to the common start: covers the all-reduce
# fastpar schedule -> (torch's schedule class, global stages)
MATCHES = {
    "gpipe": ("ScheduleGPipe", 2),
    "1f1b": ("Schedule1F1B", 2),
    "interleaved-1f1b": ("ScheduleInterleaved1F1B", 4),
    "zero-bubble": ("ScheduleInterleavedZeroBubble", 2),
    "zbv": ("ScheduleZBVZeroBubble", 4),
}
HEADERS = (
    "device", "schedule", "library", "step_ms", "p20_ms", "p80_ms", "torch/this",
    "bubble_r0", "bubble_r1", "ideal_r0", "ideal_r1", "theory",
    "idle_ms_r0", "idle_ms_r1", "ideal_idle_ms_r0", "ideal_idle_ms_r1",
)  # fmt: skip


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for index in range(LAYERS):
        layers.append(nn.Linear(WIDTH, WIDTH))
        if index < LAYERS - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _stages(num_stages: int) -> list[nn.Sequential]:
    """The model cut into `num_stages` stages of equal linear layers (each cut after a ReLU)."""
    per_stage = LAYERS // num_stages
    return split_sequential(_model(), [2 * per_stage * s for s in range(1, num_stages)])


def torch_cannot_run(placement: Placement) -> str | None:
    """Why this torch cannot run its schedule on this placement over gloo, or None.

    torch before the warm-up protocol of 2.13 (`_PipelineSchedule._warmup_p2p`) opens every
    pipeline by sending each stage's neighbours a message through the process group, even a
    neighbour on the same rank, and gloo cannot send to its own rank: with torch 2.11, ZBV on
    2 ranks (stages 1 and 2 both on rank 1) failed on every rank."""
    if hasattr(pipelining.schedules._PipelineSchedule, "_warmup_p2p"):
        return None
    if any(rank == next_rank for rank, next_rank in pairwise(placement.stage_ranks)):
        return (f"torch {torch.__version__} sends to a neighbouring stage on the same rank "
                "through gloo, which gloo refuses (torch 2.13 runs it)")  # fmt: skip
    return None


def _runners(rank: int, world_size: int) -> dict[str, tuple[list[nn.Module], Any, bool, bool]]:
    """name -> (modules, runner, holds stage 0, holds the last stage); torch's runner of a
    schedule it cannot run here (`torch_cannot_run`) is left out."""
    runners = {}
    for schedule, (torch_name, num_stages) in MATCHES.items():
        placement = Placement.of(schedule, world_size, num_stages)  # type: ignore[arg-type]
        mine = placement.stages_of(rank)
        first, last = 0 in mine, num_stages - 1 in mine
        stages = _stages(num_stages)
        chunks = [stages[s] for s in mine]
        pipe = Pipeline(
            chunks[0] if len(chunks) == 1 else chunks,
            stage_index=mine[0] if len(chunks) == 1 else list(mine),
            num_stages=num_stages,
            loss_fn=nn.MSELoss(),
            schedule=schedule,  # type: ignore[arg-type]
            num_microbatches=MICROBATCHES,
        )
        runners[f"fastpar {schedule}"] = (chunks, pipe, first, last)
        if torch_cannot_run(placement) is not None:
            continue
        stages = _stages(num_stages)
        torch_stages = [
            pipelining.PipelineStage(stages[s], s, num_stages, torch.device("cpu")) for s in mine
        ]
        schedule_cls = getattr(pipelining, torch_name)
        single = torch_name in ("ScheduleGPipe", "Schedule1F1B")
        torch_schedule = schedule_cls(
            torch_stages[0] if single else torch_stages,
            n_microbatches=MICROBATCHES,
            loss_fn=nn.MSELoss(),
        )
        runners[f"torch {schedule}"] = ([stages[s] for s in mine], torch_schedule, first, last)
    return runners


def _rank(rank: int, world_size: int, steps: int, batch: int) -> dict[str, Any]:
    runners = _runners(rank, world_size)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, WIDTH, generator=generator)
    y = torch.randn(batch, WIDTH, generator=generator)

    def run(name: str) -> None:
        _, runner, first, last = runners[name]
        if isinstance(runner, Pipeline):
            runner.step(x if first else None, y if last else None)
            return
        kwargs: dict[str, Any] = {"target": y, "losses": []} if last else {}
        runner.step(*([x] if first else []), **kwargs)

    times: dict[str, list[float]] = {name: [] for name in runners}
    stats: dict[str, list[StepStats]] = {name: [] for name in runners if name.startswith("f")}
    for index in range(steps + WARMUP):
        for name in runners:
            for module in runners[name][0]:
                module.zero_grad(set_to_none=True)
            start = _common_start()
            run(name)
            elapsed = time.perf_counter() - start
            if index >= WARMUP:
                times[name].append(elapsed)
                if name in stats:
                    stats[name].append(runners[name][1].last_stats)
    return {"times": times, "stats": stats}


def _common_start() -> float:
    """Wait until an instant both ranks agree on (the later one's arrival plus a margin) and
    return it: perf_counter is the host's monotonic clock, the same in every process."""
    start = torch.tensor([time.perf_counter() + START_MARGIN_S], dtype=torch.float64)
    dist.all_reduce(start, op=dist.ReduceOp.MAX)
    instant = start.item()
    while time.perf_counter() < instant:
        pass
    return instant


def _idle(schedule: str, per_rank: list[StepStats], step: float) -> list[list[float]]:
    """One step's measured and ideal bubble of every rank, the balanced-stage theory, and the
    measured and ideal idle seconds of every rank (the bubble's time, as the zero-bubble paper
    counts it: (p-1)(F+B-W) for ZB-H1 against (p-1)(F+B+W) for 1F1B). `step`: seconds from the
    common start until the last rank was done."""
    measured = [1.0 - stats.compute_s / step for stats in per_rank]
    split = splits_backward(schedule)  # type: ignore[arg-type]
    kinds = ("F", "I", "W") if split else ("F", "B")
    times: list[list[list[float]]] = []
    for kind in kinds:
        by_stage: dict[int, list[float]] = {}
        for stats in per_rank:
            by_stage.update(stats.durations(kind))
        times.append([by_stage[s] for s in sorted(by_stage)])
    ideal = ideal_bubbles(schedule, *times, num_ranks=RANKS)  # type: ignore[arg-type]
    means = [[[statistics.mean(t for row in kind for t in row)] * MICROBATCHES
              for _ in kind] for kind in times]  # fmt: skip
    theory = max(ideal_bubbles(schedule, *means, num_ranks=RANKS))  # type: ignore[arg-type]
    idle = [step - stats.compute_s for stats in per_rank]
    # The replay's step is each rank's compute / (1 - its ideal bubble).
    ideal_idle = [stats.compute_s * b / (1.0 - b) for stats, b in zip(per_rank, ideal, strict=True)]
    return [measured, ideal, [theory], idle, ideal_idle]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument(
        "--batch", type=int, default=64, help=f"rows per step ({MICROBATCHES} micro-batches)"
    )
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args()
    results = run_multiprocess(_rank, RANKS, args=(args.steps, args.batch), timeout=1800)
    steps = {
        name: [max(r["times"][name][i] for r in results) for i in range(args.steps)]
        for name in results[0]["times"]
    }
    rows = []
    idles: dict[str, list[float]] = {}  # measured and ideal idle ms per rank
    not_run: list[str] = []
    for schedule, (torch_name, num_stages) in MATCHES.items():
        why = torch_cannot_run(Placement.of(schedule, RANKS, num_stages))  # type: ignore[arg-type]
        if why is not None:
            not_run.append(f"torch {schedule} ({torch_name}) not run: {why}")
        baseline = statistics.median(steps[f"torch {schedule}"]) if why is None else None
        for library in ("fastpar", "torch"):
            name = f"{library} {schedule}"
            idle: list[object] = ["-"] * (4 * RANKS + 1)  # torch does not report its compute
            if name not in steps:
                rows.append([device_name(), schedule, library, "n/a", "-", "-", "-", *idle])
                continue
            if library == "fastpar":
                per_step = [
                    _idle(schedule, [r["stats"][name][i] for r in results], steps[name][i])
                    for i in range(args.steps)
                ]
                idle = [
                    statistics.median(step[which][rank] for step in per_step) * scale
                    for which, scale in ((0, 1), (1, 1), (2, 1), (3, 1e3), (4, 1e3))
                    for rank in range(len(per_step[0][which]))
                ]
                idles[schedule] = idle[-2 * RANKS :]
            ratio = "-" if baseline is None else baseline / statistics.median(steps[name])
            rows.append([device_name(), schedule, library, *_ms(steps[name]), ratio, *idle])
    print(
        f"MLP {LAYERS} x {WIDTH}, batch {args.batch}, {MICROBATCHES} micro-batches, {RANKS} ranks "
        f"(1 thread each, gloo; fastpar over its shared-memory pipes); median of {args.steps} "
        "steps, slowest rank per step; torch/this > 1: faster than torch"
    )
    print(format_table(HEADERS, rows))
    for line in not_run:
        print(line)
    for pair in (("zero-bubble", "1f1b"), ("zbv", "interleaved-1f1b")):
        ratios = [a / b for a, b in zip(idles[pair[0]], idles[pair[1]], strict=True)]
        print(f"{pair[0]} idle / {pair[1]} idle, per rank: measured "
              f"{' '.join(f'{r:.2f}' for r in ratios[:RANKS])}, ideal "
              f"{' '.join(f'{r:.2f}' for r in ratios[RANKS:])}")  # fmt: skip
    if args.csv is not None:
        write_csv(args.csv, HEADERS, rows)


def _ms(samples: list[float]) -> list[float]:
    """Median, 20th and 80th percentiles in milliseconds."""
    deciles = statistics.quantiles(samples, n=10)
    return [statistics.median(samples) * 1e3, deciles[1] * 1e3, deciles[7] * 1e3]


if __name__ == "__main__":
    main()
