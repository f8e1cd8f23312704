"""`collective_device`: gloo groups (the world, a subgroup) take CPU tensors, and one reduced
there holds the sum; NCCL takes the current CUDA device."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from fastpar.comm import devices
from fastpar.testing.distributed import run_multiprocess


def _on_gloo(rank: int, world_size: int) -> list[str]:
    subgroup = dist.new_group([0, 1])
    found = []
    for group in (None, subgroup):
        device = devices.collective_device(group)
        tensor = torch.tensor([rank + 1.0], device=device)
        dist.all_reduce(tensor, group=group)
        assert tensor.item() == 3.0
        found.append(str(device))
    return found


def test_gloo_groups_take_cpu_tensors() -> None:
    assert run_multiprocess(_on_gloo, 2, timeout=60) == [["cpu", "cpu"]] * 2


def test_nccl_takes_the_current_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert devices.collective_device(None) == torch.device("cuda", 3)
