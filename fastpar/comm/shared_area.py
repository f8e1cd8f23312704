"""Symmetric shared memory on one host: each rank of a group allocates an area of the same size,
in the same order, and every rank maps every rank's area, so a tensor at byte offset `o` of one
rank's area has its counterparts at offset `o` of all the others (as PyTorch's SymmetricMemory
and NCCL's registered buffers do on GPUs). The ring all-reduce reduces such tensors without
copying them in or out (`csrc/shm_ring.h`, "Tensors in registered areas").

Each area is a file in /dev/shm per rank, its pages reserved at creation (so a full /dev/shm
fails there, with its free space in the message, and never later with SIGBUS), and unlinked as
soon as every rank has mapped it: a crash leaves nothing behind. The mappings live as long as a
tensor of them does.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from datetime import timedelta

import torch
import torch.distributed as dist

from fastpar.comm.errors import CommError, CommMismatchError
from fastpar.comm.exchange import StoreExchange

SHM_DIR = "/dev/shm"
# What the ranks of an allocation are doing, for the messages of its store waits.
ALLOCATING = "allocating shared memory (empty_shared)"
PAGE_BYTES = 4096
_MIB = 2**20


class SharedMemoryUnavailableError(CommError, RuntimeError):
    """Shared memory for the group could not be allocated (a full /dev/shm, a group across
    hosts, a device without an implementation); raised on every rank, with the reason."""


def area_bytes(numel: int, dtype: torch.dtype) -> int:
    """Bytes of the file holding `numel` elements of `dtype`: whole pages, at least one."""
    nbytes = numel * dtype.itemsize
    return max(PAGE_BYTES, (nbytes + PAGE_BYTES - 1) // PAGE_BYTES * PAGE_BYTES)


def _free_bytes(directory: str) -> int:
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize


def _reserve_file(path: str, nbytes: int, world_size: int) -> str:
    """Creates `path` with `nbytes` reserved; "" on success, else why not (with the free space
    of the file system)."""
    free = _free_bytes(os.path.dirname(path))
    shortage = (
        f"{os.path.dirname(path)} has {free / _MIB:.1f} MiB free and each of the {world_size} "
        f"ranks needs {nbytes / _MIB:.1f} MiB (docker's default is 64 MiB in all: "
        "--shm-size raises it)"
    )
    if free < nbytes:
        return shortage
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError as error:
        return f"creating {path} failed: {error}"
    try:
        os.posix_fallocate(fd, 0, nbytes)  # the pages now, not a SIGBUS at the first write
    except OSError as error:
        os.unlink(path)
        return f"{shortage}; reserving them failed: {error}"
    finally:
        os.close(fd)
    return ""


def describe_request(numel: int, dtype: torch.dtype) -> str:
    """An allocation as the ranks compare it, e.g. "1024 x float32"."""
    return f"{numel} x {str(dtype).removeprefix('torch.')}"


_FAILURES = {cls.__name__: cls for cls in (SharedMemoryUnavailableError, CommMismatchError)}


def agree_on_allocation(
    allocation: StoreExchange, kind: str, group: dist.ProcessGroup, *, request: str,
    failure: SharedMemoryUnavailableError | CommMismatchError | None = None, payload: str = "",
) -> list[str]:  # fmt: skip
    """The first stage of `allocation`, this process's next `kind` exchange over `group`
    (`StoreExchange.begin`): every rank posts the allocation it asked for (`describe_request`),
    its `failure` if it had one, and a `payload` for the others (e.g. its file's path); all read
    every post. A rank that missed an allocation the others gave up on joins their next one.

    Returns:
        Every rank's payload, in rank order.

    Raises:
        The first failure in rank order (its type and message), on every rank; else
        CommMismatchError when the ranks asked for different allocations; CommTimeoutError
        when a peer does not post within the exchange's timeout (or its process is gone).
    """
    kind_of_failure = "" if failure is None else type(failure).__name__
    mine = "|".join((request, payload, kind_of_failure, str(failure or "")))
    records = allocation.begin(kind, group, mine.encode(), "allocate its shared area")
    posts = [record.decode().split("|", 3) for record in records]
    for _, _, failed, message in posts:
        if failed:
            raise _FAILURES[failed](message)
    if any(asked != request for asked, *_ in posts):
        calls = "; ".join(f"rank {r}: {asked}" for r, (asked, *_) in enumerate(posts))
        raise CommMismatchError(
            "shared memory was allocated with different sizes or dtypes on different ranks, "
            f"or in a different order ({calls})"
        )
    return [payload for _, payload, _, _ in posts]


def allocate_symmetric(
    store: dist.Store,
    kind: str,
    group: dist.ProcessGroup,
    *,
    numel: int,
    dtype: torch.dtype,
    timeout: timedelta,
    pids: dict[int, int] | None = None,
) -> list[torch.Tensor]:
    """Allocates one area per rank of `group` (collective: every rank calls it).

    Arguments:
        store: where the ranks exchange their files' names; no key is left once every rank is
            through.
        kind: names this caller's allocations (`exchange_prefix`): the ranks number them alike.
        group: the ranks that share the areas.
        numel, dtype: the area's size; every rank must ask for the same.
        timeout: how long to wait for the peers; `pids` (group rank -> pid) ends the wait at
            once when a peer's process is gone.

    Returns:
        areas[p]: rank p's area as mapped here, `area_bytes(numel, dtype)` uint8 each, zeros.

    Raises:
        CommMismatchError: ranks asked for different sizes or dtypes (on every rank).
        SharedMemoryUnavailableError: some rank could not create or map an area (on every rank).
        CommTimeoutError: a peer did not take part within the timeout.
    """
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    nbytes = area_bytes(numel, dtype)
    path = f"{SHM_DIR}/fastpar-area-{os.getpid()}-{uuid.uuid4().hex[:16]}"
    problem = _reserve_file(path, nbytes, world_size)
    failure = None
    if problem:
        failure = SharedMemoryUnavailableError(
            f"rank {rank} could not allocate shared memory: {problem}"
        )
    try:
        with StoreExchange(store, rank, world_size, timeout, during=ALLOCATING,
                           pids=pids) as allocation:  # fmt: skip
            paths = agree_on_allocation(
                allocation, kind, group, request=describe_request(numel, dtype),
                failure=failure, payload=path,
            )  # fmt: skip
            areas: list[torch.Tensor] = []
            problem = ""
            try:
                for peer_path in paths:
                    areas.append(
                        torch.from_file(peer_path, shared=True, size=nbytes, dtype=torch.uint8)
                    )
            except (RuntimeError, OSError) as error:
                problem = f"mapping a peer's shared area failed: {error}"
            reason = allocation.agree("mapped", problem, "map every rank's shared area")
        if reason is not None:
            raise SharedMemoryUnavailableError(f"shared memory is unavailable: {reason}")
        return areas
    finally:
        # Mapped by every rank (or given up): the name is no longer needed.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
