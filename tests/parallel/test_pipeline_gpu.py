"""Pipelines with stages on GPUs: gradients equal single-process training on the same device,
for every schedule.

Two transports: stages on GPUs with a gloo group (tensors cross through the host; two ranks may
share one GPU), and NCCL (payloads on the GPU, headers on a gloo side group, one NCCL group
per direction), which needs one GPU per rank.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from fastpar.parallel.pipeline import SCHEDULES, Pipeline, split_sequential
from fastpar.parallel.pipeline.schedules import Placement
from fastpar.testing.distributed import run_multiprocess

pytestmark = pytest.mark.gpu

WIDTH = 32
CUTS = {2: [3], 4: [1, 2, 3]}  # per global stage count
CHUNKED = {"interleaved-1f1b": 2, "zbv": 2}  # chunks per rank


def _model(device: torch.device) -> nn.Sequential:
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Linear(8, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 4)
    ).to(device)


def _micro_batches(device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Five micro-batches of differing batch sizes and lengths (B, T, features)."""
    generator = torch.Generator().manual_seed(11)
    shapes = [(1 + k % 3, 3 + 2 * k) for k in range(5)]
    inputs = [torch.randn(b, t, 8, generator=generator).to(device) for b, t in shapes]
    targets = [torch.randn(b, t, 4, generator=generator).to(device) for b, t in shapes]
    return inputs, targets


def _compare_on_device(rank: int, world_size: int, one_gpu_each: bool) -> None:
    if one_gpu_each:
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    inputs, targets = _micro_batches(device)
    total = sum(t.shape[0] for t in targets)
    # The reference: the whole model on this device, the micro-batches' losses weighted by
    # their share of the batch.
    reference = _model(device)
    loss = sum(
        nn.functional.mse_loss(reference(x), y) * (y.shape[0] / total)
        for x, y in zip(inputs, targets, strict=True)
    )
    loss.backward()
    for schedule in SCHEDULES:
        num_stages = CHUNKED.get(schedule, 1) * world_size
        placement = Placement.of(schedule, world_size, num_stages)  # type: ignore[arg-type]
        mine = placement.stages_of(rank)
        wanted = split_sequential(reference, CUTS[num_stages])
        want = [p.grad for s in mine for p in wanted[s].parameters()]
        stages = split_sequential(_model(device), CUTS[num_stages])
        chunks = [stages[s] for s in mine]
        options = dict(schedule=schedule, num_microbatches=len(inputs), loss_fn=nn.MSELoss())
        pipe = Pipeline(
            chunks[0] if len(mine) == 1 else chunks,
            stage_index=mine[0] if len(mine) == 1 else list(mine),
            num_stages=num_stages,
            **options,
        )
        got_loss = pipe.step(inputs, targets)
        torch.cuda.synchronize(device)
        got = [p.grad for chunk in chunks for p in chunk.parameters()]
        for g, expected in zip(got, want, strict=True):
            torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-6)
        if rank == placement.stage_ranks[-1]:
            assert got_loss is not None
            torch.testing.assert_close(got_loss, loss.detach(), rtol=1e-5, atol=0)
    dist.barrier()


def test_gpu_stages_over_gloo_match_single_process() -> None:
    run_multiprocess(_compare_on_device, 2, args=(False,), timeout=300)


@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="NCCL cannot pair two ranks on one GPU; needs 2 GPUs"
)
def test_nccl_pipeline_matches_single_process() -> None:
    run_multiprocess(_compare_on_device, 2, args=(True,), backend="nccl", timeout=300)
