"""The checks of what a recurrent module or cell is called with (its input and states), and
the dtype its recurrence runs in. Sizes and dtypes torch's modules refuse raise errors that are
also torch's types (`ShapeMismatchError`, `DtypeMismatchError`), so code written for torch.nn
catches them."""

from __future__ import annotations

import torch
from torch import Tensor

from fastpar.ops.aten_common import autocast_available

__all__ = [
    "DtypeMismatchError",
    "ShapeMismatchError",
    "accepted_dtypes",
    "check_input",
    "check_state",
    "compute_dtype",
    "join_states",
    "split_hx",
]

# What autocast casts to its dtype (float64 it leaves alone).
AUTOCAST_ELIGIBLE = (torch.float32, torch.bfloat16, torch.float16)


def _autocast_on(device: torch.device) -> bool:
    # is_autocast_enabled raises for devices autocast does not know (meta: shape inference).
    kind = device.type
    return autocast_available(kind) and torch.is_autocast_enabled(kind)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the recurrence of ``x`` runs in: autocast's where autocast casts ``x`` (both
    backends then run in it: "auto" must compare them there), else ``x``'s."""
    if x.dtype in AUTOCAST_ELIGIBLE and _autocast_on(x.device):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def accepted_dtypes(weight: Tensor) -> tuple[torch.dtype, ...]:
    """The dtypes the input and states may have: the parameters', and under autocast any that
    autocast casts (the output of a layer before, the states of the previous call, float32 data
    for a bfloat16 module), as torch's modules take them; the backends run in autocast's dtype."""
    if _autocast_on(weight.device):
        return (weight.dtype, *AUTOCAST_ELIGIBLE)
    return (weight.dtype,)


class ShapeMismatchError(ValueError, RuntimeError):
    """An input or state of the wrong size: a ValueError by fastpar's rule, and the RuntimeError
    torch's modules raise for it, so code written for either catches it (numpy's AxisError is
    both a ValueError and an IndexError for the same reason)."""


class DtypeMismatchError(TypeError, ValueError):
    """An input whose dtype the parameters do not take: a TypeError by fastpar's rule, and the
    ValueError torch's modules raise for it."""


def check_input(x: Tensor, input_size: int, weight: Tensor, batched_dims: int) -> bool:
    """Validate the input tensor; returns whether it is batched."""
    if not isinstance(x, Tensor):
        raise TypeError(f"input must be a Tensor or PackedSequence, got {type(x).__name__}")
    if x.dim() not in (batched_dims - 1, batched_dims):
        raise ValueError(
            f"input must have {batched_dims - 1} (unbatched) or {batched_dims} (batched) "
            f"dimensions, got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise DtypeMismatchError(f"input must be a floating-point tensor, got {x.dtype}")
    if x.shape[-1] != input_size:
        raise ShapeMismatchError(
            f"input.size(-1) must be equal to input_size {input_size}, got shape {tuple(x.shape)}"
        )
    if x.dtype not in accepted_dtypes(weight):
        raise DtypeMismatchError(
            f"input dtype {x.dtype} does not match the parameters' dtype {weight.dtype}; "
            "convert the module with .to(dtype)"
        )
    if x.device != weight.device:
        raise ValueError(
            f"input is on {x.device} but the parameters are on {weight.device}; "
            "move the module with .to(device)"
        )
    return x.dim() == batched_dims


def check_state(
    name: str, state: object, expected: tuple[int, ...], x: Tensor, weight: Tensor
) -> Tensor:
    if not isinstance(state, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(state).__name__}")
    if tuple(state.shape) != expected:
        raise ShapeMismatchError(f"{name} must have shape {expected}, got {tuple(state.shape)}")
    if state.dtype not in accepted_dtypes(weight):
        raise TypeError(f"{name} dtype {state.dtype} does not match input dtype {x.dtype}")
    if state.device != x.device:
        raise ValueError(f"{name} is on {state.device} but input is on {x.device}")
    return state


def split_hx(hx: object, names: tuple[str, ...]) -> tuple[object, ...]:
    """The states in ``hx``: the tensor itself for one state (GRU, RNN), a tuple of them for
    more (the LSTM's (h_0, c_0))."""
    if len(names) == 1:
        return (hx,)
    if not isinstance(hx, (tuple, list)) or len(hx) != len(names):  # only the LSTM has two
        raise TypeError(f"hx must be a tuple (h_0, c_0) of two Tensors, got {type(hx)}")
    return tuple(hx)


def join_states(states: tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
    """The inverse of ``split_hx``: one tensor, or a tuple of them."""
    return states[0] if len(states) == 1 else states
