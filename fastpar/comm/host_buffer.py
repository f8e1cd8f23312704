"""The shared memory of one host's ranks in the hierarchical all-reduce on CPU: a slot per local
rank, where it puts its part of a chunk, and a result area, where each rank writes the shard it
reduced; twice, so that one chunk can travel between hosts while the next is reduced. One POSIX
shared-memory file of 2 x (ranks + 1) x `chunk_bytes`, mapped by every local rank and unlinked as
soon as all have mapped it (a crash then leaves nothing in /dev/shm). And the host's symmetric
areas (`HostAreas`): tensors from `HierarchicalAllReduce.empty_shared`, which every local rank
maps at the same offset, so the passes inside the host read the peers' tensors where they lie.

Neither synchronises anything itself: the caller orders writes and reads with barriers.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from fastpar.comm.exchange import StoreExchange
from fastpar.comm.shared_area import allocate_symmetric

SHM_DIR = "/dev/shm"


class HostBuffer:
    """2 x (local_size + 1) areas of `chunk_bytes` shared by one host's ranks.

    Arguments:
        setup: the group's setup exchange, through which local rank 0 publishes the file's name
            (deleted with the setup's keys) and the others wait for it (its timeout).
        name: the key of that name under the setup's prefix, unique to this host.
        local_rank, local_size: this rank's position among its host's ranks, and their number.
        owner: the group rank of local rank 0 (named when it does not publish in time).
        chunk_bytes: bytes per area, a multiple of 64.
        barrier: a collective over the host's ranks, run once all have mapped the file.
    """

    def __init__(
        self, setup: StoreExchange, name: str, *, local_rank: int, local_size: int, owner: int,
        chunk_bytes: int, barrier: Callable[[], None],
    ) -> None:  # fmt: skip
        if chunk_bytes <= 0 or chunk_bytes % 64 or chunk_bytes < 64 * local_size:
            raise ValueError(f"chunk_bytes must be a multiple of 64 of at least 64 x {local_size} "
                             f"(the local ranks), got {chunk_bytes}")  # fmt: skip
        self.chunk_bytes = chunk_bytes
        self._local_size = local_size
        size = 2 * (local_size + 1) * chunk_bytes
        path = ""
        try:
            if local_rank == 0:
                # The creator's pid in the name says whose file it is.
                path = f"{SHM_DIR}/fastpar-hier-{os.getpid()}-{uuid.uuid4().hex[:16]}"
                setup.post(name, path)
            else:
                setup.wait({owner: setup.key(name)}, "create its host's buffer")
                path = setup.store.get(setup.key(name)).decode()
            self._memory = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
            barrier()  # every local rank has mapped it: the name is no longer needed
        finally:
            # Whoever gets here first removes the name (a failed setup leaves nothing either).
            if path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    def piece_bytes(self) -> int:
        """Bytes of each local rank's part of an area: an equal share, in whole cache lines."""
        return self.chunk_bytes // self._local_size // 64 * 64

    def _area(self, index: int, dtype: torch.dtype, count: int) -> torch.Tensor:
        start = index * self.chunk_bytes
        nbytes = count * dtype.itemsize
        if nbytes > self.chunk_bytes:
            raise ValueError(f"{nbytes} bytes do not fit an area of {self.chunk_bytes}")
        return self._memory[start : start + nbytes].view(dtype)

    def slot(self, half: int, local_rank: int, dtype: torch.dtype, count: int) -> torch.Tensor:
        """The first `count` elements of local rank `local_rank`'s slot in half `half` (0 or 1),
        as `dtype`."""
        return self._area(half * (self._local_size + 1) + local_rank, dtype, count)

    def result(self, half: int, dtype: torch.dtype, count: int) -> torch.Tensor:
        """The first `count` elements of the result area of half `half`, as `dtype`."""
        return self._area(half * (self._local_size + 1) + self._local_size, dtype, count)

    def close(self) -> None:
        """Drop this rank's mapping (unmapped once no view of it is left)."""
        self._memory = torch.empty(0, dtype=torch.uint8)


class HostAreas:
    """The symmetric areas of one host's ranks (`shared_area.allocate_symmetric` over them), and
    where a tensor lies among them.

    Arguments:
        local_rank, local_size: this rank's position among its host's ranks, and their number.
    """

    def __init__(self, *, local_rank: int, local_size: int) -> None:
        self._local_rank = local_rank
        self._local_size = local_size
        self._areas: list[list[torch.Tensor]] = []  # [area][local rank]: uint8, as mapped here

    def allocate(
        self, store: dist.Store, host_group: dist.ProcessGroup, *, numel: int,
        dtype: torch.dtype, timeout: timedelta,
    ) -> torch.Tensor:  # fmt: skip
        """A zero-filled 1-D tensor of `numel` x `dtype` in a new area (collective over
        `host_group`, the host's ranks in local order); raises as `allocate_symmetric` does,
        naming the ranks by their local ranks."""
        areas = allocate_symmetric(
            store, "host-area", host_group, numel=numel, dtype=dtype, timeout=timeout
        )
        self._areas.append(areas)
        return areas[self._local_rank][: numel * dtype.itemsize].view(dtype)

    def find(self, tensor: torch.Tensor) -> tuple[int, int] | None:
        """(area index, byte offset) of a contiguous CPU `tensor` that lies wholly in one of this
        rank's areas; None when it does not."""
        if tensor.device.type != "cpu" or not tensor.is_contiguous() or not self._areas:
            return None
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        for index, areas in enumerate(self._areas):
            mine = areas[self._local_rank]
            base = mine.data_ptr()
            if base <= start and end <= base + mine.numel():
                return index, start - base
        return None

    def view(self, place: tuple[int, int], local_rank: int, dtype: torch.dtype, lo: int,
             hi: int) -> torch.Tensor:  # fmt: skip
        """Elements [lo, hi) of local rank `local_rank`'s counterpart of the tensor of `dtype` at
        `place` (from `find`), as mapped here."""
        index, offset = place
        size = dtype.itemsize
        return self._areas[index][local_rank][offset + lo * size : offset + hi * size].view(dtype)

    def forget_last(self) -> None:
        """Drop the newest area (one the group's other hosts could not allocate)."""
        self._areas.pop()

    def close(self) -> None:
        """Drop this object's mappings (each unmapped once no tensor of it is left)."""
        self._areas = []
