"""The all-reduces that `fastpar.comm.all_reduce` creates per process group: those of a group
that `destroy_process_group` destroyed are closed at the next creation, so cycles of
destroy/init_process_group leave no rings, mappings or /dev/shm entries behind."""

from __future__ import annotations

import os
import random

import torch
import torch.distributed as dist

import fastpar.comm as comm
from fastpar.testing.distributed import run_multiprocess
from tests.comm.util import integer_valued, shm_segments

R = dist.ReduceOp
SEED = random.randrange(2**31)
CYCLES = 5


def _fastpar_mappings() -> int:
    """This process's mappings of fastpar's shared memory (a ring's segment and its shared
    areas stay mapped until they are closed, though gone from /dev/shm once every rank has
    mapped them)."""
    with open("/proc/self/maps") as maps:
        return sum("/fastpar-" in line for line in maps)


def _held() -> tuple[int, int, int]:
    """(all-reduces in the registry, mappings of fastpar's shared memory, /dev/shm entries of
    the rings and areas this process created)."""
    areas = [
        name for name in os.listdir("/dev/shm") if name.startswith(f"fastpar-area-{os.getpid()}-")
    ]
    return len(comm.api._rings), _fastpar_mappings(), len(shm_segments(os.getpid())) + len(areas)


def _cycles(rank: int, world_size: int, seed: int) -> list[tuple[int, int, int]]:
    """Each cycle reduces on the default group, a subgroup, and in a shared area, then destroys
    the groups and initialises new ones; what is held is counted after each cycle's calls."""
    store = dist.distributed_c10d._get_default_store()
    generator = torch.Generator().manual_seed(seed + rank)
    held = []
    for cycle in range(CYCLES):
        subgroup = dist.new_group([0, 1])
        for group in (None, subgroup):
            tensor = integer_valued(3001, torch.float32, R.SUM, generator)
            expected = tensor.clone()
            dist.all_reduce(expected, group=group)
            comm.all_reduce(tensor, group=group)
            assert torch.equal(tensor, expected), (seed, cycle)
        area = comm.empty_shared(70000)
        area.copy_(integer_valued(70000, torch.float32, R.SUM, generator))
        expected = area.clone()
        dist.all_reduce(expected)
        comm.all_reduce(area)
        assert torch.equal(area, expected), (seed, cycle)
        del area
        held.append(_held())
        dist.destroy_process_group()
        dist.init_process_group(
            "gloo", store=dist.PrefixStore(f"cycle/{cycle}", store), rank=rank,
            world_size=world_size,
        )  # fmt: skip
    comm.close_rings()
    held.append(_held())
    return held


def test_destroyed_groups_leave_no_rings_behind() -> None:
    for rank, held in enumerate(run_multiprocess(_cycles, 2, args=(SEED,), timeout=120)):
        first = held[0]
        assert first[0] == 2 and first[1] > 0, held  # the default group's and the subgroup's
        assert held[:CYCLES] == [first] * CYCLES, f"rank {rank}: {held}"
        assert held[CYCLES] == (0, 0, 0), f"rank {rank}: {held}"
