"""Peer access decided by every rank: one rank's "no P2P" makes all ranks fall back together;
ranks sharing a GPU are left to gloo unless the ring is asked for."""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import torch.distributed as dist

from fastpar.comm.agreement import SHARED_GPU_REASON, cuda_peer_problem, shared_gpu_problem
from fastpar.comm.errors import CommTimeoutError
from fastpar.comm.exchange import agree
from fastpar.comm.hierarchical import HierarchicalAllReduce
from fastpar.comm.hosts import gather_host_layout
from fastpar.comm.store_waits import wait_for_ranks
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


def test_a_timeout_names_what_the_rank_was_doing() -> None:
    """The messages said "while creating a RingAllReduce" whoever waited (the host layout,
    DataParallel)."""
    store = dist.HashStore()
    store.set("test/during/0", "1")  # rank 1 never posts
    keys = {0: "test/during/0", 1: "test/during/1"}
    during = "gathering something else"
    with pytest.raises(CommTimeoutError) as info:
        wait_for_ranks(store, keys, timedelta(seconds=0.1), 0, "post it", during=during)
    assert str(info.value).startswith(
        f"rank 0 timed out after 0.1 s waiting for rank(s) [1] to post it while {during} "
    ), info.value
    assert "RingAllReduce" not in str(info.value)
    with pytest.raises(CommTimeoutError, match=f"to decide while {during}"):
        agree(store, "test/during-agree", 0, 2, "", timedelta(seconds=0.1), "decide",
              during=during)  # fmt: skip


def test_an_agreement_leaves_no_key_in_the_store() -> None:
    """Every verdict stayed in the store, so each ring setup grew it."""
    store = dist.HashStore()

    def decide(rank: int) -> str | None:
        problem = "no P2P" if rank == 1 else ""
        return agree(store, "test/clean", rank, 2, problem, timedelta(seconds=30), "decide")

    with ThreadPoolExecutor(2) as ranks:
        verdicts = list(ranks.map(decide, range(2)))
    assert verdicts == ["rank 1: no P2P"] * 2
    assert store.num_keys() == 0


def test_a_rank_late_to_an_abandoned_agreement_is_told_so() -> None:
    """The late rank read the verdict rank 0 had left behind and took it as agreed."""
    store = dist.HashStore()
    with pytest.raises(CommTimeoutError, match=r"waiting for rank\(s\) \[1\] to decide"):
        agree(store, "test/late", 0, 2, "", timedelta(seconds=0.1), "decide")
    with pytest.raises(CommTimeoutError, match="after rank 0 had given up waiting for it"):
        agree(store, "test/late", 1, 2, "", timedelta(seconds=30), "decide")
    assert store.num_keys() == 0  # the last rank through deleted the abandoned verdicts


def test_a_dead_peer_is_named_with_what_the_rank_was_doing() -> None:
    store = dist.HashStore()
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()  # reaped: its pid names no process
    keys = {0: "test/gone/0", 1: "test/gone/1"}
    store.set(keys[0], "1")
    with pytest.raises(CommTimeoutError) as info:
        wait_for_ranks(store, keys, timedelta(seconds=30), 0, "post it", {1: gone.pid},
                       during="testing")  # fmt: skip
    assert str(info.value) == (
        "rank 0 stopped waiting for rank(s) [1] to post it while testing: the process of "
        "rank(s) [1] exited"
    )


def _one_rank_gathers_alone(rank: int, world_size: int) -> list[str]:
    """Rank 0 sets up alone what every rank must set up together; rank 1 stays away."""
    store = dist.distributed_c10d._get_default_store()
    messages = []
    if rank == 0:
        for create in (
            lambda: gather_host_layout(dist.group.WORLD, timedelta(seconds=0.5)),
            lambda: HierarchicalAllReduce(dist.group.WORLD, timeout=0.5),
        ):
            with pytest.raises(CommTimeoutError) as info:
                create()
            messages.append(str(info.value))
        store.set("test/alone/done", "1")
    else:
        store.wait(["test/alone/done"], timedelta(seconds=30))
    return messages


def test_the_host_layouts_timeout_names_what_was_being_created() -> None:
    messages, _ = run_multiprocess(_one_rank_gathers_alone, 2, timeout=60)
    waiting = "rank 0 timed out after 0.5 s waiting for rank(s) [1] to say which host it runs on"
    layout, hierarchical = messages
    assert layout.startswith(
        f"{waiting} while creating fastpar's all-reduce (fastpar.comm.create_all_reduce)"
    ), layout
    assert hierarchical.startswith(f"{waiting} while creating a HierarchicalAllReduce"), messages
    assert all("RingAllReduce" not in message for message in messages), messages


def test_a_rank_still_waiting_stops_once_another_gave_up() -> None:
    """Rank 2 (long timeout) waited out its own timeout after rank 1 had given up on rank 0."""
    store = dist.HashStore()
    long_timeout_s = 60.0

    def wait_long() -> tuple[str, float]:
        start = time.monotonic()
        with pytest.raises(CommTimeoutError) as info:
            agree(store, "test/abandoned", 2, 3, "", timedelta(seconds=long_timeout_s), "decide")
        return str(info.value), time.monotonic() - start

    with ThreadPoolExecutor(1) as rank_2:
        waiting = rank_2.submit(wait_long)
        store.wait(["test/abandoned/first/2"], timedelta(seconds=30))  # rank 2 waits now
        with pytest.raises(CommTimeoutError, match=r"waiting for rank\(s\) \[0\] to decide"):
            agree(store, "test/abandoned", 1, 3, "", timedelta(seconds=0.2), "decide")
        message, waited_s = waiting.result(timeout=long_timeout_s + 10)
    assert message.startswith(
        "rank 2 stopped waiting for rank(s) [0] to decide while creating a RingAllReduce: "
        "rank 1 gave up waiting for them first"
    ), message
    # Within a few liveness periods on a quiet host; the bound leaves room for a loaded CI
    # host and still fails on the old wait of its own 60 s.
    assert waited_s < long_timeout_s / 4, waited_s
