"""DataParallel under uses that used to leave the replicas silently different: parameters that
are strided views, a closed wrapper, `load_state_dict(assign=True)`, a backward retried after
one that raised, one rank abandoning a backward its peers finished. Each either does what DDP
or a one-process run does, or raises on every rank."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastpar.parallel import DataParallel
from fastpar.testing.distributed import run_multiprocess


class StridedView(nn.Module):
    """A parameter that is columns 0-1 of a 4x4 storage whose columns 2-3 are another tensor."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.storage = torch.full((4, 4), -7.0 - rank)
        self.weight = nn.Parameter(self.storage[:, :2])
        with torch.no_grad():
            self.weight.copy_(torch.arange(8.0).view(4, 2) * (rank + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def _strided_parameter_against_ddp(rank: int, world_size: int, comm: str) -> None:
    ours, theirs = StridedView(rank), StridedView(rank)
    dp = DataParallel(ours, comm=comm)
    DistributedDataParallel(theirs)
    assert torch.equal(ours.weight, theirs.weight), (ours.weight, theirs.weight)
    assert torch.equal(ours.storage, theirs.storage), (ours.storage, theirs.storage)
    dp.close()


@pytest.mark.parametrize("comm", ["torch", "auto"])
def test_a_strided_parameter_is_broadcast_as_ddp_does(comm: str) -> None:
    """gloo broadcast the view's storage as if contiguous: rank 1 kept half of its own values
    and had the memory beside the view overwritten."""
    run_multiprocess(_strided_parameter_against_ddp, 2, args=(comm,), timeout=60)
