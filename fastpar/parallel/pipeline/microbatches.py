"""Cutting a batch into micro-batches, and weighting their losses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["carries_grad", "input_grad", "loss_weights", "split_batch"]

_NO_GRADIENT = torch.empty(0)  # sent back for an activation that carries no gradient


def carries_grad(tensor: Tensor) -> bool:
    """Whether a gradient travels back for this activation. Both sides decide from its dtype
    alone, so they agree without a message."""
    return tensor.is_floating_point() or tensor.is_complex()


def input_grad(leaf: Tensor) -> Tensor:
    """What a stage sends back for its input `leaf` after its backward: the leaf's gradient,
    zeros where it got none, an empty tensor where it carries none (does not require grad)."""
    if not leaf.requires_grad:
        return _NO_GRADIENT
    grad = leaf.grad
    return torch.zeros_like(leaf) if grad is None else grad


def _size_along(name: str, tensor: Tensor, dim: int) -> int:
    if tensor.dim() <= dim:
        raise ValueError(
            f"{name} of shape {tuple(tensor.shape)} has no batch_dim {dim} to cut along"
        )
    return tensor.shape[dim]


def split_batch(
    name: str, value: Tensor | Sequence[Tensor] | None, num_microbatches: int, dim: int
) -> list[Tensor]:
    """Cut a batch into micro-batches along `dim`, or check a list of given micro-batches.

    Arguments:
        name: "inputs" or "targets", for errors.
        value: a tensor (cut into pieces of N // m or N // m + 1) or m tensors.
        num_microbatches: m.
        dim: the batch dimension.
    """
    if value is None:
        raise ValueError(f"{name} are needed on this stage, got None")
    if isinstance(value, Tensor):
        size = _size_along(name, value, dim)
        if size < num_microbatches:
            raise ValueError(
                f"{name} batch size {size} (dim {dim}) < num_microbatches {num_microbatches}"
            )
        return list(torch.tensor_split(value, num_microbatches, dim=dim))
    pieces = list(value)
    if len(pieces) != num_microbatches:
        raise ValueError(
            f"{name}: {len(pieces)} micro-batches given, num_microbatches is {num_microbatches}"
        )
    for index, piece in enumerate(pieces):
        if not isinstance(piece, Tensor):
            raise TypeError(f"{name}[{index}] must be a Tensor, got {type(piece).__name__}")
    return pieces


def loss_weights(
    targets: Tensor | Sequence[Tensor], num_microbatches: int, dim: int, reduction: str
) -> list[float]:
    """Each micro-batch's loss weight: its share of the batch along `dim` for "mean" (so the
    weighted sum is the whole batch's mean loss), 1 for "sum".

    Arguments:
        targets: as given to `split_batch` (and accepted by it): a tensor, whose pieces' sizes
            are then known without touching them (each shape read costs microseconds on the
            step's cold start), or the micro-batches.
    """
    if reduction == "sum":
        return [1.0] * num_microbatches
    if isinstance(targets, Tensor):
        total = targets.shape[dim]
        base, extra = divmod(total, num_microbatches)  # tensor_split's sizes
        return [(base + (k < extra)) / total for k in range(num_microbatches)]
    sizes = [_size_along("targets", t, dim) for t in targets]
    total = sum(sizes)
    return [size / total for size in sizes]
