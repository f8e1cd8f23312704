"""The checks of what a recurrent module or cell is called with (its input and states), and
the dtype its recurrence runs in. What torch's modules refuse raises an error that is fastpar's
type by its rule (a wrong value a ValueError, a wrong type a TypeError) and also every type torch's
modules raise for the same call (``ShapeMismatchError``, ``DtypeMismatchError``,
``DeviceMismatchError``, ``StateTypeError``, ``StateCountError``), so code written for torch.nn
catches it."""

from __future__ import annotations

import torch
from torch import Tensor

from fastpar.ops.aten_common import autocast_available

__all__ = [
    "DeviceMismatchError",
    "DtypeMismatchError",
    "ShapeMismatchError",
    "StateCountError",
    "StateTypeError",
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


class DtypeMismatchError(TypeError, ValueError, RuntimeError):
    """An input or state whose dtype the parameters do not take: a TypeError by fastpar's rule,
    the ValueError torch's LSTM, GRU and RNN raise for their input, and the RuntimeError torch's
    kernels raise for a state's (and a cell's input's), which torch's modules do not check."""


class DeviceMismatchError(ValueError, RuntimeError):
    """An input on another device than the parameters, or a state on another device than the
    input: a ValueError by fastpar's rule, and the RuntimeError torch's kernels raise for it."""


class StateTypeError(TypeError, AttributeError):
    """A state that is not a Tensor (a GRU's hx given as a tuple): a TypeError by fastpar's rule,
    and the AttributeError torch's modules raise when they call the state's Tensor methods."""


class StateCountError(TypeError, IndexError, RuntimeError):
    """An LSTM's hx that is not a pair (h_0, c_0) (a Tensor, a tuple of one or three): a
    TypeError by fastpar's rule; torch's modules index hx[0] and hx[1], an IndexError where
    there are fewer, a RuntimeError (from their kernels or shape checks) for the rest."""


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
        raise DeviceMismatchError(
            f"input is on {x.device} but the parameters are on {weight.device}; "
            "move the module with .to(device)"
        )
    return x.dim() == batched_dims


def check_state(
    name: str, state: object, expected: tuple[int, ...], x: Tensor, weight: Tensor
) -> Tensor:
    """Validate one state of hx (``name`` as messages call it, e.g. "hx[1] (c_0)") against its
    ``expected`` shape, the dtypes the parameters take and the input's device."""
    if not isinstance(state, Tensor):
        raise StateTypeError(f"{name} must be a Tensor, got {type(state).__name__}")
    if tuple(state.shape) != expected:
        raise ShapeMismatchError(f"{name} must have shape {expected}, got {tuple(state.shape)}")
    accepted = accepted_dtypes(weight)
    if state.dtype not in accepted:
        raise DtypeMismatchError(
            f"{name} dtype {state.dtype} does not match the parameters' dtype {weight.dtype}"
            + (f" (or, under autocast, one of {AUTOCAST_ELIGIBLE})" if len(accepted) > 1 else "")
        )
    if state.device != x.device:
        raise DeviceMismatchError(
            f"{name} is on {state.device} but must be on the input's device {x.device}"
        )
    return state


def split_hx(hx: object, names: tuple[str, ...]) -> tuple[object, ...]:
    """The states in ``hx``: the tensor itself for one state (GRU, RNN), a tuple of them for
    more (the LSTM's (h_0, c_0))."""
    if len(names) == 1:
        return (hx,)
    if not isinstance(hx, (tuple, list)) or len(hx) != len(names):  # only the LSTM has two
        got = type(hx).__name__ + (f" of {len(hx)}" if isinstance(hx, (tuple, list)) else "")
        raise StateCountError(f"hx must be a tuple (h_0, c_0) of two Tensors, got {got}")
    return tuple(hx)


def join_states(states: tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
    """The inverse of ``split_hx``: one tensor, or a tuple of them."""
    return states[0] if len(states) == 1 else states
