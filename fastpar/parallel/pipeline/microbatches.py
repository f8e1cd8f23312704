"""Cutting a batch into micro-batches, and weighting their losses."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["carries_grad", "first_microbatch", "input_grad", "loss_weights", "split_batch"]

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
    if isinstance(value, Tensor):
        _check_batch(name, value, num_microbatches, dim)
        return list(torch.tensor_split(value, num_microbatches, dim=dim))
    return _given_microbatches(name, value, num_microbatches)


def first_microbatch(
    name: str, value: Tensor | Sequence[Tensor] | None, num_microbatches: int, dim: int
) -> Tensor:
    """`split_batch(name, value, num_microbatches, dim)[0]` (and its errors), without cutting
    the other pieces: one view where `split_batch` makes m."""
    if isinstance(value, Tensor):
        size = _check_batch(name, value, num_microbatches, dim)
        return value[_first_piece(size, num_microbatches, dim)]
    return _given_microbatches(name, value, num_microbatches)[0]


def _check_batch(name: str, value: Tensor, num_microbatches: int, dim: int) -> int:
    """The batch size of `value` along `dim`, checked against m."""
    size = _size_along(name, value, dim)
    if size < num_microbatches:
        raise ValueError(
            f"{name} batch size {size} (dim {dim}) < num_microbatches {num_microbatches}"
        )
    return size


def _given_microbatches(
    name: str, value: Sequence[Tensor] | None, num_microbatches: int
) -> list[Tensor]:
    if value is None:
        raise ValueError(f"{name} are needed on this stage, got None")
    pieces = list(value)
    if len(pieces) != num_microbatches:
        raise ValueError(
            f"{name}: {len(pieces)} micro-batches given, num_microbatches is {num_microbatches}"
        )
    for index, piece in enumerate(pieces):
        if not isinstance(piece, Tensor):
            raise TypeError(f"{name}[{index}] must be a Tensor, got {type(piece).__name__}")
    return pieces


@functools.lru_cache(maxsize=64)
def _first_piece(size: int, num_microbatches: int, dim: int) -> Any:
    """The index of torch.tensor_split's first piece of a batch of `size` along `dim`."""
    piece = slice(0, -(-size // num_microbatches))
    return piece if dim == 0 else (*[slice(None)] * dim, piece)


def loss_weights(
    targets: Tensor | Sequence[Tensor], num_microbatches: int, dim: int, reduction: str
) -> Sequence[float]:
    """Each micro-batch's loss weight: its share of the batch along `dim` for "mean" (so the
    weighted sum is the whole batch's mean loss), 1 for "sum".

    Arguments:
        targets: as given to `split_batch` (and accepted by it): a tensor, whose pieces' sizes
            are then known without touching them (kept per batch size), or the micro-batches.
    """
    if reduction == "sum":
        return _ones(num_microbatches)
    if isinstance(targets, Tensor):
        return _shares(targets.shape[dim], num_microbatches)
    sizes = [_size_along("targets", t, dim) for t in targets]
    total = sum(sizes)
    return [size / total for size in sizes]


@functools.lru_cache(maxsize=64)
def _ones(num_microbatches: int) -> tuple[float, ...]:
    return (1.0,) * num_microbatches


@functools.lru_cache(maxsize=64)
def _shares(total: int, num_microbatches: int) -> tuple[float, ...]:
    """The pieces' shares of a batch of `total` cut like `torch.tensor_split`."""
    base, extra = divmod(total, num_microbatches)
    return tuple((base + (k < extra)) / total for k in range(num_microbatches))
