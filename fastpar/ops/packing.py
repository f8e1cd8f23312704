"""Packed rows to and from the padded (T, B, .) tensor of a batch sorted by length, each way
one row gather (in forward and in backward).

torch's ``pad_packed_sequence`` and ``pack_padded_sequence`` copy one run of equal batch size
(or one time step) at a time, and their backward does the same: at B64 T512 with lengths
spread from T/8 to T, one LSTM layer's forward+backward through them issued about 3,000 tensor
operations, 700 of them copies, each a kernel launch on a GPU.
A packed batch is in sorted order already (its rows at step t are the batch_sizes[t] longest
sequences), so where each of its rows sits in the padded tensor of that order follows from
batch_sizes alone, which lives on the CPU: both index tensors are built there and copied
without waiting for the device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class _TakeRows(torch.autograd.Function):
    """out[i] = source[index[i]], or a zero row where index[i] == len(source) (``zero_row``:
    whether any may). Each row of ``source`` is taken at most once, so the gradient is the same
    gather the other way: by ``back`` (back[j]: where row j went, or len(out) for a row not
    taken)."""

    @staticmethod
    def forward(source: Tensor, index: Tensor, back: Tensor, zero_row: bool) -> Tensor:
        return take_rows(source, index, zero_row)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        _, ctx.index, ctx.back, ctx.zero_row = inputs

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        grad_source = _TakeRows.apply(grad, ctx.back, ctx.index, not ctx.zero_row)
        return grad_source, None, None, None


def take_rows(source: Tensor, index: Tensor, zero_row: bool) -> Tensor:
    """source[index] along dim 0, index == len(source) giving a zero row when ``zero_row``."""
    if zero_row:
        source = torch.cat([source, source.new_zeros((1, *source.shape[1:]))])
    return source.index_select(0, index)


def checked_lengths(lengths: Tensor, steps: int) -> Tensor:
    """``lengths`` as int64 on the CPU, each checked to lie in [1, steps]."""
    lengths = lengths.to("cpu", torch.int64)
    if lengths.numel() and int(lengths.min()) < 1:
        raise ValueError(f"lengths must all be >= 1, got {lengths.tolist()}")
    if lengths.numel() and int(lengths.max()) > steps:
        raise ValueError(f"lengths must be <= T = {steps}, got {lengths.tolist()}")
    return lengths


def batch_sizes_of(sorted_lengths: Tensor) -> Tensor:
    """(max length,) int64: how many of the (longest first, >= 0) sequences run at each step."""
    longest = int(sorted_lengths[0]) if sorted_lengths.numel() else 0
    # Step t runs the sequences longer than t: all but those that end at t or before. A count
    # per length, not a (T, B) mask.
    ended = torch.bincount(sorted_lengths, minlength=longest + 1).cumsum(0)[:longest]
    return sorted_lengths.numel() - ended


class PackedLayout:
    """Where each packed row of a batch sorted by length sits in its padded (T, B, .) tensor.

    Arguments:
        batch_sizes: (S,) on the CPU, non-increasing: rows running at each step.
        device: where the tensors to pack and pad live.
        steps: T >= S (None: S); the steps past S hold no row.

    Attributes:
        steps, batch: T and B; lengths: (B,) int64 on the CPU, longest first.
    """

    def __init__(self, batch_sizes: Tensor, device: torch.device, steps: int | None = None) -> None:
        sizes = batch_sizes.to(torch.int64)
        self.steps = sizes.numel() if steps is None else steps
        self.batch = int(sizes[0]) if sizes.numel() else 0
        # Built from the S batch sizes and the N rows, without a (T, B) mask: a reduction and
        # a nonzero over T * B booleans took most of the host time of building a layout.
        # Sequence b runs while batch_sizes[t] > b; the sizes do not increase.
        self.lengths = torch.searchsorted(sizes.neg(), torch.arange(0, -self.batch, -1))
        rows = int(sizes.sum())
        starts = sizes.cumsum(0) - sizes  # the first packed row of each step
        # Packed row k = starts[t] + j is padded row t * B + j; padded row r is packed row
        # where[r], or the zero row (index N) past its sequence's length. A blocking copy would
        # wait for every kernel queued before it; these CPU tensors are staged by the copy.
        shift = torch.arange(sizes.numel()) * self.batch - starts
        flat = torch.arange(rows) + shift.repeat_interleave(sizes, output_size=rows)
        where = torch.full((self.steps * self.batch,), rows, dtype=torch.int64)
        where[flat] = torch.arange(rows)
        self.flat = flat.to(device, non_blocking=True)
        self.where = where.to(device, non_blocking=True)

    def pad(self, data: Tensor) -> Tensor:
        """(N, *F) packed rows -> (T, B, *F), zero past each length; differentiable."""
        rows = _TakeRows.apply(data, self.where, self.flat, True)
        return rows.view(self.steps, self.batch, *data.shape[1:])

    def pack(self, padded: Tensor) -> Tensor:
        """(T, B, *F) -> (N, *F), the rows within each length in packed order; differentiable."""
        rows = padded.reshape(self.steps * self.batch, *padded.shape[2:])
        return _TakeRows.apply(rows, self.flat, self.where, False)
