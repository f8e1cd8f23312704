"""Peer access decided by every rank: one rank's "no P2P" makes all ranks fall back together;
ranks sharing a GPU are left to gloo unless the ring is asked for."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch.distributed as dist

from fastpar.comm.agreement import (
    SHARED_GPU_REASON,
    agree,
    cuda_peer_problem,
    shared_gpu_problem,
)
from fastpar.testing.distributed import run_multiprocess

GPUS = ["GPU-a", "GPU-b", "GPU-c"]


def test_same_device_needs_no_peer_access() -> None:
    def never(device: int, peer: int) -> bool:
        raise AssertionError("peer access asked about one device")

    assert cuda_peer_problem(1, ["GPU-a"] * 4, ["GPU-a"], never) == ""


def test_peer_access_is_asked_between_local_indices() -> None:
    asked = []

    def record(device: int, peer: int) -> bool:
        asked.append((device, peer))
        return True

    # This process sees the GPUs in another order than their ranks.
    assert cuda_peer_problem(0, ["GPU-b", "GPU-a"], ["GPU-a", "GPU-b"], record) == ""
    assert asked == [(1, 0)]


@pytest.mark.parametrize(
    ("device_ids", "local_ids", "message"),
    [
        (["GPU-a", "GPU-b"], ["GPU-a", "GPU-b"], "no peer access (P2P) from cuda:0 to rank 1"),
        (["GPU-a", "GPU-c"], ["GPU-a", "GPU-b"], "rank 1's GPU GPU-c is not visible"),
        (["GPU-x", "GPU-a"], ["GPU-a"], "its own device GPU-x is not visible"),
    ],
)
def test_problems_are_named(device_ids: list[str], local_ids: list[str], message: str) -> None:
    assert message in cuda_peer_problem(0, device_ids, local_ids, lambda a, b: False)


def _decide(rank: int, world_size: int) -> str | None:
    # Rank 1's driver answers "no P2P"; the others' answer yes.
    def can_access(device: int, peer: int) -> bool:
        return rank != 1

    problem = cuda_peer_problem(rank, GPUS[:world_size], GPUS, can_access)
    store = dist.distributed_c10d._get_default_store()
    return agree(store, "test/p2p", rank, world_size, problem, timedelta(seconds=30), "decide")


def test_one_rank_without_peer_access_makes_every_rank_fall_back() -> None:
    decisions = run_multiprocess(_decide, 3, timeout=60)
    assert decisions[0] == decisions[1] == decisions[2]
    assert decisions[0] == "rank 1: no peer access (P2P) from cuda:1 to rank 0's GPU cuda:0"


@pytest.mark.parametrize(
    ("device_ids", "serve", "backend", "declined"),
    [
        (["GPU-a", "GPU-a"], False, "gloo", True),  # one GPU time-sliced: gloo is faster
        (["GPU-a", "GPU-b", "GPU-a"], False, "gloo", True),  # two of three share one
        (["GPU-a", "GPU-a"], True, "gloo", False),  # asked for (comm="ring")
        (["GPU-a", "GPU-a"], False, "nccl", False),  # NCCL refuses them: the ring is the path
        (["GPU-a", "GPU-a"], False, "", False),  # no torch backend for CUDA tensors
        (["GPU-a", "GPU-b"], False, "gloo", False),  # a GPU each
    ],
)
def test_ranks_sharing_a_gpu_are_left_to_gloo_unless_asked(
    device_ids: list[str], serve: bool, backend: str, declined: bool
) -> None:
    problem = shared_gpu_problem(device_ids, serve, backend)
    assert (SHARED_GPU_REASON in problem) == declined, problem
    assert bool(problem) == declined


def _decide_shared(rank: int, world_size: int) -> str | None:
    from fastpar.comm.ring import _cuda_backend_name

    # Only rank 0 asks for the ring: the others' "no" decides for all.
    backend = _cuda_backend_name(dist.group.WORLD)
    problem = shared_gpu_problem(["GPU-a"] * world_size, rank == 0, backend)
    store = dist.distributed_c10d._get_default_store()
    return agree(store, "test/shared", rank, world_size, problem, timedelta(seconds=30), "decide")


def test_a_gloo_group_on_one_gpu_agrees_to_leave_it_to_gloo() -> None:
    decisions = run_multiprocess(_decide_shared, 2, timeout=60)
    assert decisions[0] == decisions[1]
    assert decisions[0].startswith(f"rank 1: {SHARED_GPU_REASON}"), decisions[0]
