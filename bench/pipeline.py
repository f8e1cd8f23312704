"""Pipeline step time, fastpar vs torch.distributed.pipelining, and the measured bubble.

2 stages (one process each, gloo), 8 micro-batches, an 8-layer 512-wide MLP cut in the middle,
batch 64: fastpar's Pipeline with "gpipe" and "1f1b" against `ScheduleGPipe` and
`Schedule1F1B` on the same split, interleaved step by step in one run so both see the same
machine load. A step (zero_grad, forward, backward) is as slow as its slowest rank.

Idle per stage: "bubble" is the fraction of fastpar's pipeline step (until the last stage is
done) in which the stage was not running forward or backward (`Pipeline.last_stats`). Next to
it, "theory" (p-1)/(m+p-1) holds for stages of equal speed, and "ideal" is the bubble the
schedule alone gives with the stages' measured compute times and free transfers
(`ideal_bubbles`): bubble - ideal is what transfers and overheads cost. (torch does not report
its compute times.)

    python bench/pipeline.py [--steps 40] [--csv results/pipeline.csv]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from common import device_name, format_table, write_csv
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from fastpar.parallel.pipeline import Pipeline, StepStats, ideal_bubbles, split_sequential
from fastpar.testing.distributed import run_multiprocess

STAGES, MICROBATCHES, LAYERS, WIDTH, BATCH, WARMUP = 2, 8, 8, 512, 64, 3
SCHEDULES = ("gpipe", "1f1b")
TRANSPORTS = ("shm", "torch")
HEADERS = (
    "device", "schedule", "library", "transport", "step_ms", "p20_ms", "p80_ms", "torch/this",
    "bubble_s0", "bubble_s1", "ideal_s0", "ideal_s1", "theory",
)  # fmt: skip


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for index in range(LAYERS):
        layers.append(nn.Linear(WIDTH, WIDTH))
        if index < LAYERS - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _rank(rank: int, world_size: int, steps: int) -> dict[str, Any]:
    # Each stage holds LAYERS / 2 linear layers (the split falls after a ReLU).
    split = [len(_model()) // 2 + 1]
    runners = {}
    for schedule in SCHEDULES:
        for transport in TRANSPORTS:
            stage = split_sequential(_model(), split)[rank]
            pipe = Pipeline(
                stage,
                stage_index=rank,
                num_stages=world_size,
                loss_fn=nn.MSELoss(),
                schedule=schedule,
                num_microbatches=MICROBATCHES,
                transport=transport,
            )
            runners[f"fastpar {schedule} {transport}"] = (stage, pipe)
        torch_stage = split_sequential(_model(), split)[rank]
        schedule_cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        torch_schedule = schedule_cls(
            PipelineStage(torch_stage, rank, world_size, torch.device("cpu")),
            n_microbatches=MICROBATCHES,
            loss_fn=nn.MSELoss(),
        )
        runners[f"torch {schedule}"] = (torch_stage, torch_schedule)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, WIDTH, generator=generator)
    y = torch.randn(BATCH, WIDTH, generator=generator)
    first, last = rank == 0, rank == world_size - 1

    def run(name: str) -> None:
        module, runner = runners[name]
        module.zero_grad(set_to_none=True)
        if isinstance(runner, Pipeline):
            runner.step(x if first else None, y if last else None)
        elif first:
            runner.step(x)
        else:
            runner.step(target=y, losses=[])

    times: dict[str, list[float]] = {name: [] for name in runners}
    stats: dict[str, list[StepStats]] = {name: [] for name in runners if name.startswith("f")}
    for index in range(steps + WARMUP):
        for name in runners:
            dist.barrier()  # both ranks start each step together
            start = time.perf_counter()
            run(name)
            elapsed = time.perf_counter() - start
            if index >= WARMUP:
                times[name].append(elapsed)
                if name in stats:
                    stats[name].append(runners[name][1].last_stats)
    return {"times": times, "stats": stats}


def _idle(schedule: str, per_stage: list[StepStats]) -> tuple[list[float], list[float]]:
    """One step's measured and ideal bubble of every stage, over the pipeline's step."""
    step = max(stats.step_s for stats in per_stage)
    measured = [1.0 - stats.compute_s / step for stats in per_stage]
    durations: dict[str, list[list[float]]] = {"F": [], "B": []}
    for stats in per_stage:
        for kind, rows in durations.items():
            steps = sorted(
                (k, end - begin) for name, k, begin, end in stats.per_microbatch if name == kind
            )
            rows.append([duration for _, duration in steps])
    return measured, ideal_bubbles(schedule, durations["F"], durations["B"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args()
    results = run_multiprocess(_rank, STAGES, args=(args.steps,), timeout=1800)
    steps = {
        name: [max(r["times"][name][i] for r in results) for i in range(args.steps)]
        for name in results[0]["times"]
    }
    theory = (STAGES - 1) / (MICROBATCHES + STAGES - 1)
    rows = []
    for schedule in SCHEDULES:
        baseline = statistics.median(steps[f"torch {schedule}"])
        for name in [f"fastpar {schedule} {t}" for t in TRANSPORTS] + [f"torch {schedule}"]:
            library, _, transport = (
                name.split(" ") if name.count(" ") == 2 else (*name.split(" "), "gloo")
            )
            idle: list[object] = ["-"] * 2 * STAGES  # torch does not report its compute
            if library == "fastpar":
                per_step = [
                    _idle(schedule, [r["stats"][name][i] for r in results])
                    for i in range(args.steps)
                ]
                idle = [
                    statistics.median(step[which][stage] for step in per_step)
                    for which in (0, 1)
                    for stage in range(STAGES)
                ]
            ratio = baseline / statistics.median(steps[name])
            rows.append([
                device_name(), schedule, library, transport, *_ms(steps[name]), ratio, *idle,
                theory,
            ])  # fmt: skip
    print(
        f"MLP {LAYERS} x {WIDTH}, batch {BATCH}, {MICROBATCHES} micro-batches, {STAGES} stages "
        f"(1 thread each, gloo); median of {args.steps} steps, slowest rank per step; "
        "torch/this > 1: faster than torch; transport shm: fastpar's shared-memory pipes "
        "(the default on one host), torch: torch.distributed over gloo"
    )
    print(format_table(HEADERS, rows))
    if args.csv is not None:
        write_csv(args.csv, HEADERS, rows)


def _ms(samples: list[float]) -> list[float]:
    """Median, 20th and 80th percentiles in milliseconds."""
    deciles = statistics.quantiles(samples, n=10)
    return [statistics.median(samples) * 1e3, deciles[1] * 1e3, deciles[7] * 1e3]


if __name__ == "__main__":
    main()
