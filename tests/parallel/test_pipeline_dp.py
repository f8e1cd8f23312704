"""DP x PP: 4 ranks as 2 pipelines of 2 ranks; the two replicas of each stage average their
gradients with `DataParallel`. Gradients equal single-process training on the whole batch, for
every schedule (with 2 chunks per rank, each its own DataParallel, for interleaved-1f1b and
zbv; data-parallel stages keep their whole backward under the zero-bubble schedules).

Rank r holds stage r % 2 of pipeline r // 2; pipeline groups {0, 1} and {2, 3}, data-parallel
groups {0, 2} and {1, 3}. Each pipeline trains on its half of the batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fastpar.parallel.data_parallel import DataParallel
from fastpar.parallel.pipeline import Pipeline, split_sequential
from fastpar.parallel.pipeline.schedules import Placement
from fastpar.testing.distributed import run_multiprocess

STAGES, REPLICAS, HALF = 2, 2, 7  # 7 rows per pipeline: 3 micro-batches do not divide it
# schedule, micro-batches, steps, split points of the global stages
CASES = [
    ("gpipe", 3, 1, [3]),
    ("1f1b", 4, 2, [3]),
    ("interleaved-1f1b", 4, 1, [1, 2, 3]),
    ("zero-bubble", 3, 2, [3]),
    ("zbv", 5, 1, [1, 2, 3]),
]


def _model() -> nn.Sequential:
    torch.manual_seed(99)
    return nn.Sequential(
        nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 2)
    )


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(31 + step)
    rows = REPLICAS * HALF
    return torch.randn(rows, 5, generator=generator), torch.randn(rows, 2, generator=generator)


def _dp_pp(rank: int, world_size: int) -> list[list[Any]]:
    # Every rank creates every group, in the same order (new_group is collective).
    pipelines = [dist.new_group([p * STAGES + s for s in range(STAGES)]) for p in range(REPLICAS)]
    replicas = [dist.new_group([p * STAGES + s for p in range(REPLICAS)]) for s in range(STAGES)]
    replica, place = divmod(rank, STAGES)
    results = []
    for schedule, num_microbatches, steps, points in CASES:
        stages = split_sequential(_model(), points)
        mine = Placement.of(schedule, STAGES, len(stages)).stages_of(place)
        chunks = [DataParallel(stages[s], group=replicas[place], comm="torch") for s in mine]
        pipe = Pipeline(
            chunks[0] if len(chunks) == 1 else chunks,
            stage_index=mine[0] if len(chunks) == 1 else list(mine),
            num_stages=len(stages),
            group=pipelines[replica],
            loss_fn=nn.MSELoss(),
            schedule=schedule,
            num_microbatches=num_microbatches,
            timeout_s=60,
        )
        for step in range(steps):
            x, y = _batch(step)
            rows = slice(replica * HALF, (replica + 1) * HALF)
            pipe.step(x[rows], y[rows])
        results.append([p.grad.numpy() for s in mine for p in stages[s].parameters()])
    return results


def test_dp_x_pp_matches_single_process() -> None:
    results = run_multiprocess(_dp_pp, STAGES * REPLICAS, timeout=120)
    for case, (schedule, _, steps, points) in enumerate(CASES):
        model = _model()
        for step in range(steps):
            x, y = _batch(step)
            nn.MSELoss()(model(x), y).backward()
        reference = split_sequential(model, points)
        placement = Placement.of(schedule, STAGES, len(reference))
        for rank, per_rank in enumerate(results):
            mine = placement.stages_of(rank % STAGES)
            want = [p.grad for s in mine for p in reference[s].parameters()]
            got = [torch.from_numpy(g) for g in per_rank[case]]
            assert len(got) == len(want) > 0
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
            # Replicas of a stage hold bitwise-identical gradients.
            twin = results[(rank + STAGES) % (STAGES * REPLICAS)][case]
            assert all((a == b).all() for a, b in zip(per_rank[case], twin, strict=True))
