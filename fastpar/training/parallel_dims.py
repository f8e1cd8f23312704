"""The process layout of a training run: how many data-parallel replicas (dp) of a pipeline of
how many stages (pp), validated once, and the process groups that connect them.

Rank layout: rank = replica * pp + stage. The ranks of one replica form a pipeline (its own
process group); the ranks of one stage across replicas form a data-parallel group whose gradients
are averaged.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastpar._checks import check_int, check_timeout_s

if TYPE_CHECKING:  # imported by `build`: the launcher checks a layout without torch
    import torch.distributed as dist


@dataclass(kw_only=True, frozen=True)
class ParallelDims:
    """dp replicas x pp stages = world_size ranks."""

    dp: int
    """Data-parallel replicas, >= 1."""
    pp: int
    """Pipeline stages per replica, >= 1."""
    world_size: int
    """Ranks in the run: dp * pp."""

    def __post_init__(self) -> None:
        check_int("dp", self.dp, 1)
        check_int("pp", self.pp, 1)
        check_int("world_size", self.world_size, 1)
        if self.dp * self.pp != self.world_size:
            raise ValueError(f"world_size {self.world_size} != dp {self.dp} * pp {self.pp}")

    def coordinates(self, rank: int) -> tuple[int, int]:
        """(replica, stage) of `rank`."""
        check_int("rank", rank, 0, self.world_size - 1)
        return divmod(rank, self.pp)

    def pipeline_ranks(self, replica: int) -> list[int]:
        """The ranks of one replica's pipeline, stage by stage."""
        return [replica * self.pp + stage for stage in range(self.pp)]

    def replica_ranks(self, stage: int) -> list[int]:
        """The ranks holding `stage` in every replica (one data-parallel group)."""
        return [replica * self.pp + stage for replica in range(self.dp)]

    def build(self, rank: int, timeout_s: float) -> RankPlace:
        """This rank's place and process groups (a collective: every rank calls it, in the same
        order). Every group waits at most `timeout_s` seconds for a peer."""
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=check_timeout_s("timeout_s", timeout_s))
        replica, stage = self.coordinates(rank)
        dp_group = pp_group = None
        # new_group is collective: every rank creates every group, in the same order.
        if self.dp > 1:
            for s in range(self.pp):
                group = dist.new_group(self.replica_ranks(s), timeout=timeout)
                if s == stage:
                    dp_group = group
        if self.pp > 1:
            for r in range(self.dp):
                group = dist.new_group(self.pipeline_ranks(r), timeout=timeout)
                if r == replica:
                    pp_group = group
        return RankPlace(dims=self, rank=rank, replica=replica, stage=stage,
                         dp_group=dp_group, pp_group=pp_group)  # fmt: skip


@dataclass(kw_only=True, frozen=True)
class RankPlace:
    """Where one rank sits in a `ParallelDims` layout, with its process groups."""

    dims: ParallelDims
    rank: int
    replica: int
    stage: int
    dp_group: dist.ProcessGroup | None
    """This stage's data-parallel group; None with one replica."""
    pp_group: dist.ProcessGroup | None
    """This replica's pipeline group; None with one stage."""

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.dims.pp - 1
