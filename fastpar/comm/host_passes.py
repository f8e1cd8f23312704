"""The passes inside one host of the hierarchical all-reduce on CPU (`HierarchicalAllReduce`,
steps 1 and 3; step 2, between hosts, is the caller's), through the host's shared memory
(`host_buffer`).

Three paths, chosen per call from its size and where its tensor lies (the same on every local
rank, or the first barrier raises CommMismatchError):
- `_whole_tensor`, small calls: every rank reduces the whole tensor and sends it between hosts
  (one barrier);
- `_in_area`, tensors in the host's symmetric areas (`HierarchicalAllReduce.empty_shared`):
  each rank reads the peers' tensors where they lie (three barriers);
- `_chunked`, other tensors: chunk by chunk through the host's buffer (a barrier per chunk and
  pass).
Each local rank l reduces shard l (`shard_length`) of its host's tensors in local rank order,
the same shards and fold on every path that scatters, so every path gives the same bits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastpar.comm.host_buffer import HostAreas, HostBuffer
from fastpar.comm.reduce import SUPPORTED_DTYPES, reduce_buffers

CHUNK_BYTES = 2 << 20  # per area of a host's buffer: 2 x (local ranks + 1) areas
# Calls whose bytes times the local ranks are at most this take `_whole_tensor` (one barrier;
# every rank sends the whole tensor between hosts), larger ones a shard each. At 64 KiB on
# 2 x 2 CPU ranks the one barrier saves 10-20% of the latency, measured side by side.
WHOLE_BYTES = 512 << 10

CallKey = tuple[int, int, int]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def shard_length(count: int, local_size: int, align: int) -> int:
    """Elements of each local rank's shard of `count`: equal parts rounded up to `align`
    elements (whole cache lines on CPU), so trailing shards may be short or empty."""
    return _round_up(_round_up(count, local_size) // local_size, align)


def call_key(count: int, dtype: torch.dtype, code: int,
             place: tuple[int, int] | None = None) -> CallKey:  # fmt: skip
    """What the host's ranks must agree on at every barrier of a call: its size, its dtype and
    op as one number, and where it lies (0: ordinary memory, else the area and byte offset of
    `place`, from `HostAreas.find`)."""
    where = 0 if place is None else 1 + (place[0] << 40) + place[1]
    return count, SUPPORTED_DTYPES.index(dtype) * 16 + code, where


class CpuHostPasses:
    """Steps 1 and 3 of one rank's CPU calls.

    Arguments:
        buffer: the host's shared slots.
        areas: the host's symmetric areas.
        local_rank, local_size: this rank's position among its host's ranks, and their number.
        barrier: waits for the host's ranks, raising CommMismatchError when their keys differ.
        between_hosts: step 2: all-reduces a shard, in place, with the other hosts (blocking).
    """

    def __init__(
        self, buffer: HostBuffer, areas: HostAreas, *, local_rank: int, local_size: int,
        barrier: Callable[[CallKey], None],
        between_hosts: Callable[[torch.Tensor, object], None],
    ) -> None:  # fmt: skip
        self.buffer = buffer
        self.areas = areas
        self._local_rank, self._local_size = local_rank, local_size
        self._barrier = barrier
        self._between_hosts = between_hosts
        self._steps = 0  # steps through the buffer so far (each uses one half)

    def run(self, flat: torch.Tensor, op: object, code: int) -> None:
        """The all-reduce of `flat` (1-D, contiguous) with `op` (`code` its ring code, for the
        barriers' keys), in place."""
        if self._small(flat):
            self._whole_tensor(flat, op, code)
        elif (place := self.areas.find(flat)) is not None:
            self._in_area(flat, place, op, code)
        else:
            self._chunked(flat, op, code)

    def _chunked(self, flat: torch.Tensor, op: object, code: int) -> None:
        """A reduce-scatter inside the host, one all-reduce of each rank's shard between
        hosts, an all-gather inside the host.

        The passes inside the host go through the host's buffer chunk by chunk (chunk k holds
        the k-th piece of every rank's shard), alternating between its two halves, one barrier
        per chunk: every write to a half follows a barrier that all ranks reach only after
        their last read of it. Reduce-scatter: each rank copies its pieces of the others'
        shards into its slot; after the barrier it reduces its own piece from the peers' slots
        and its own tensor, in local order, in place in its tensor. All-gather: each rank
        copies its piece of the finished shard into the result area; after the barrier it
        copies the others' pieces into its tensor. The shard travels between hosts in one
        call, after the reduce-scatter: on CPU the passes and gloo compete for the same cores,
        and splitting the shard to overlap them was slower (measured side by side, 2 x 2 ranks)."""
        buffer, dtype, count = self.buffer, flat.dtype, flat.numel()
        local, me = self._local_size, self._local_rank
        piece = buffer.piece_bytes() // flat.element_size()  # of each shard, per chunk
        per = shard_length(count, local, 64 // flat.element_size())
        key = call_key(count, dtype, code)
        slots = [[buffer.slot(half, rank, dtype, local * piece) for rank in range(local)]
                 for half in (0, 1)]  # fmt: skip
        results = [buffer.result(half, dtype, local * piece) for half in (0, 1)]

        def parts(chunk: int) -> list[tuple[int, slice, slice]]:
            """Chunk `chunk`: each local rank's piece, where it lies in `flat` and in an area."""
            out = []
            for rank in range(local):
                end = min(count, (rank + 1) * per)
                lo = min(end, rank * per + chunk * piece)
                hi = min(end, lo + piece)
                if hi > lo:
                    out.append((rank, slice(lo, hi), slice(rank * piece, rank * piece + hi - lo)))
            return out

        chunks = [parts(chunk) for chunk in range(max(1, -(-per // piece)))]
        for here in chunks:  # reduce-scatter
            area = slots[self._next_half()]
            for rank, at, part in here:
                if rank != me:
                    area[me][part].copy_(flat[at])
            self._barrier(key)
            for rank, at, part in here:
                if rank == me:
                    inputs = [flat[at] if r == me else area[r][part] for r in range(local)]
                    reduce_buffers(inputs, out=flat[at], op=op)
        lo, hi = min(count, me * per), min(count, (me + 1) * per)
        if hi > lo:
            self._between_hosts(flat[lo:hi], op)
        for here in chunks:  # all-gather
            result = results[self._next_half()]
            for rank, at, part in here:
                if rank == me:
                    result[part].copy_(flat[at])
            self._barrier(key)
            for rank, at, part in here:
                if rank != me:
                    flat[at].copy_(result[part])

    def _in_area(self, flat: torch.Tensor, place: tuple[int, int], op: object,
                 code: int) -> None:  # fmt: skip
        """A tensor in one of the host's areas (`HierarchicalAllReduce.empty_shared`): the
        passes read the peers' tensors where they lie, in three barriers. After the first
        (every rank's input is in place), each rank reduces its shard from the host's tensors,
        in local order, into its own (the shards and fold of `_chunked`, so the same bits), and
        all-reduces it between hosts. After the second (every shard is final), it copies the
        other shards from their owners' areas; the third keeps it from returning, and its
        caller from overwriting the tensor, while a peer still copies from it. A rank writes
        the others' shards in its area only after the second barrier, and they read them only
        before it. Against `_chunked`, each rank skips copying the others' parts in and its
        shard out, and two barriers per chunk: measured on 2 x 2 CPU ranks, 1.2-1.4x faster
        at 16-64 MB and 1.1-1.3x at 0.5-4 MB. Splitting the shard between hosts into pieces
        that travel while the next is reduced gained nothing there (the cores are busy)."""
        local, me, dtype, count = self._local_size, self._local_rank, flat.dtype, flat.numel()
        per = shard_length(count, local, 64 // flat.element_size())
        key = call_key(count, dtype, code, place)

        def shard(rank: int) -> tuple[int, int]:
            return min(count, rank * per), min(count, (rank + 1) * per)

        self._barrier(key)
        lo, hi = shard(me)
        if hi > lo:
            inputs = [flat[lo:hi] if rank == me else self.areas.view(place, rank, dtype, lo, hi)
                      for rank in range(local)]  # fmt: skip
            reduce_buffers(inputs, out=flat[lo:hi], op=op)
            self._between_hosts(flat[lo:hi], op)
        self._barrier(key)
        for rank in range(local):
            lo, hi = shard(rank)
            if rank != me and hi > lo:
                flat[lo:hi].copy_(self.areas.view(place, rank, dtype, lo, hi))
        self._barrier(key)

    def _small(self, flat: torch.Tensor) -> bool:
        """Whether a call of `flat` takes `_whole_tensor`: small enough, and within a slot."""
        nbytes = flat.numel() * flat.element_size()
        return nbytes * self._local_size <= WHOLE_BYTES and nbytes <= self.buffer.chunk_bytes

    def _next_half(self) -> int:
        """The half of the host buffer for the next step (a write, a barrier, reads): halves
        alternate over all steps of all calls, so a step writes a half only after a barrier
        that every rank reaches once done reading it (the step before last)."""
        self._steps += 1
        return self._steps % 2

    def _whole_tensor(self, flat: torch.Tensor, op: object, code: int) -> None:
        """Small calls: one barrier instead of two per chunk. Each rank copies its tensor
        into its slot; after the barrier, every rank reduces all of them (local order) into its
        tensor, so the host's ranks hold the same bits, and all-reduces the whole tensor with
        the same-index ranks of the other hosts: the same inputs in every such group, hence the
        same result. Each rank sends the whole tensor between hosts, not a shard, which only
        small calls (latency-bound) afford."""
        local, me, dtype, count = self._local_size, self._local_rank, flat.dtype, flat.numel()
        half = self._next_half()
        slots = [self.buffer.slot(half, rank, dtype, count) for rank in range(local)]
        slots[me].copy_(flat)
        self._barrier(call_key(count, dtype, code))
        if count:
            reduce_buffers([flat if r == me else slots[r] for r in range(local)], out=flat, op=op)
            self._between_hosts(flat, op)
