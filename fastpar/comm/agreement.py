"""What the CUDA ring needs of the ranks' devices, as each rank's verdict for `agree`
(fastpar.comm.exchange): the ranks take the same path (the ring, or torch.distributed) even when
only one rank cannot serve it.

The CUDA ring needs each rank to load and store every peer's device memory: the peer is on the
same device, or peer access (P2P over NVLink or PCIe) works between the two devices. Ranks that
share a GPU are served only on request (`shared_gpu_problem`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

CanAccessPeer = Callable[[int, int], bool]


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
