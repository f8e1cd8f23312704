"""Decisions every rank of a group takes together: each rank states a local verdict through the
store, and all read every verdict, so all take the same path (the ring, or torch.distributed)
even when only one rank cannot serve it.

The CUDA ring needs each rank to load and store every peer's device memory: the peer is on the
same device, or peer access (P2P over NVLink or PCIe) works between the two devices. Ranks that
share a GPU are served only on request (`shared_gpu_problem`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch.distributed as dist

from fastpar.comm.errors import CommTimeoutError
from fastpar.comm.processes import process_alive

LIVENESS_PERIOD_S = 0.2  # how often a wait checks that the awaited peers' processes live

CanAccessPeer = Callable[[int, int], bool]

# What the ranks of most exchanges here are doing (the ring's setup and its shared areas);
# other callers name their own (`during`).
CREATING_A_RING = "creating a RingAllReduce"


def wait_for_ranks(
    store: dist.Store,
    keys: dict[int, str],
    timeout: timedelta,
    rank: int,
    what: str,
    pids: dict[int, int] | None = None,
    *,
    during: str = CREATING_A_RING,
) -> None:
    """Wait until every key of `keys` (rank -> key) is set; CommTimeoutError naming the ranks
    that did not set theirs within `timeout`, or at once (within LIVENESS_PERIOD_S) when the
    process of one of them, as given by `pids` (rank -> pid), is gone.

    The message reads "... waiting for rank(s) [1] to {what} while {during}": `what` is the
    step a peer missed ("say which host it runs on"), `during` what this rank was doing
    ("constructing a DataParallel")."""
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        left = deadline - time.monotonic()
        step = min(left, LIVENESS_PERIOD_S) if pids else left
        try:
            store.wait(list(keys.values()), timedelta(seconds=max(step, 1e-3)))
            return
        except RuntimeError as error:
            missing = [r for r, key in keys.items() if not store.check([key])]
            if not missing:
                return
            gone = [r for r in missing if pids and r in pids and not process_alive(pids[r])]
            if gone:
                raise CommTimeoutError(
                    f"rank {rank} stopped waiting for rank(s) {gone} to {what} while {during}: "
                    f"the process of rank(s) {gone} exited"
                ) from error
            if time.monotonic() >= deadline:
                raise CommTimeoutError(
                    f"rank {rank} timed out after {timeout.total_seconds():g} s waiting for "
                    f"rank(s) {missing} to {what} while {during} (is every rank of the group "
                    f"{during}?)"
                ) from error


def agree(
    store: dist.Store,
    prefix: str,
    rank: int,
    world_size: int,
    problem: str,
    timeout: timedelta,
    what: str,
    pids: dict[int, int] | None = None,
    *,
    during: str = CREATING_A_RING,
) -> str | None:
    """Every rank's verdict on one question, combined: None when no rank has a problem, else the
    first problem in rank order ("rank 1: ..."), the same string on every rank.

    Arguments:
        store: the group's store; `prefix` must be unique to this question and group.
        rank, world_size: this rank and the group's size.
        problem: "" when this rank can take the path, else why not.
        timeout: how long to wait for the other ranks' verdicts.
        what: what the ranks are deciding, for the timeout's message.
        pids: rank -> pid of the peers whose death ends the wait early (`wait_for_ranks`).
        during: what the ranks are creating, for the timeout's message (`wait_for_ranks`).
    """
    keys = {r: f"{prefix}/{r}" for r in range(world_size)}
    store.set(keys[rank], "no: " + problem if problem else "ok")
    wait_for_ranks(store, keys, timeout, rank, what, pids, during=during)
    for r, key in keys.items():
        verdict = store.get(key).decode()
        if verdict != "ok":
            return f"rank {r}: {verdict.removeprefix('no: ')}"
    return None


# Per kind and group (its global ranks), how many store exchanges of that kind this process
# has begun: the ranks of a group begin theirs in the same order, so the count names the same
# exchange on every rank.
_begun: dict[tuple[str, tuple[int, ...]], int] = {}
_begun_lock = threading.Lock()


def exchange_prefix(kind: str, group: dist.ProcessGroup) -> str:
    """The store-key prefix of this process's next `kind` exchange over `group` (a ring, a
    host layout...), the same on every rank of the group."""
    ranks = tuple(dist.get_process_group_ranks(group))
    with _begun_lock:
        index = _begun.get((kind, ranks), 0)
        _begun[(kind, ranks)] = index + 1
    return f"fastpar/{kind}/{'-'.join(map(str, ranks))}/{index}"


# Processes on one GPU (without MPS) run their kernels in turns, one time slice each: a rank's
# kernel spins in a barrier while the peer it waits for cannot run before the slice ends, so
# every barrier costs about a slice per peer (2 ranks: 2.54 ms per call from 1 KB to 256 KB;
# 4 ranks: 7.3 ms; 64 MB, 16 barriers: 36.5 and 109 ms), where gloo on the same CUDA tensors
# takes 0.53 and 1.1 ms (64 MB: 34.9 and 51 ms). Measured on one H200, torch 2.11.
SHARED_GPU_REASON = (
    "ranks share one GPU: processes time-slice it, and the ring's in-kernel barriers wait out "
    "each slice; measured 2.5 ms vs gloo 0.53 ms per 1 KB call on H200"
)


def shared_gpu_problem(device_ids: Sequence[str], serve_shared_gpu: bool, cuda_backend: str) -> str:
    """Why the ring leaves ranks that share a GPU to torch.distributed, or "" when it serves them.

    Arguments:
        device_ids: every rank's device, as a process-independent id (the GPU's UUID).
        serve_shared_gpu: the caller asked for the ring there (comm="ring").
        cuda_backend: the name of the group's torch.distributed backend for CUDA tensors ("" for
            none). Only gloo reduces tensors of ranks sharing a GPU (NCCL refuses them), so with
            any other the ring stays the only path.
    """
    if serve_shared_gpu or cuda_backend != "gloo" or len(set(device_ids)) == len(device_ids):
        return ""
    return f"{SHARED_GPU_REASON} (serve_shared_gpu=True asks for the ring, e.g. under MPS)"


def default_can_access_peer(device: int, peer: int) -> bool:
    import torch

    return bool(torch.cuda.can_device_access_peer(device, peer))


def cuda_peer_problem(
    rank: int,
    device_ids: Sequence[str],
    local_ids: Sequence[str],
    can_access_peer: CanAccessPeer = default_can_access_peer,
) -> str:
    """Why this rank cannot map every peer's buffer, or "" when it can.

    Arguments:
        rank: this rank; `device_ids[rank]` is its own device.
        device_ids: every rank's device, as a process-independent id (the GPU's UUID).
        local_ids: the UUIDs of the devices this process sees, by local index.
        can_access_peer: (local device, local peer device) -> whether peer access works
            (`torch.cuda.can_device_access_peer`; tests pass a fake).
    """
    local = {uuid: index for index, uuid in enumerate(local_ids)}
    mine = local.get(device_ids[rank])
    if mine is None:
        return f"its own device {device_ids[rank]} is not visible to it"
    for peer, uuid in enumerate(device_ids):
        if uuid == device_ids[rank]:
            continue  # the same device: always addressable
        other = local.get(uuid)
        if other is None:
            return (
                f"rank {peer}'s GPU {uuid} is not visible to it (CUDA_VISIBLE_DEVICES), so "
                "it cannot map that GPU's memory"
            )
        if not can_access_peer(mine, other):
            return f"no peer access (P2P) from cuda:{mine} to rank {peer}'s GPU cuda:{other}"
    return ""


def local_device_ids() -> list[str]:
    """The UUIDs of the CUDA devices this process sees, by index."""
    import torch

    return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
