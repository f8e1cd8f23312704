"""A bad call of fastpar.nn's modules raises an exception of the type torch.nn's raises for the
same call (code written for torch's modules catches it), besides fastpar's own type (a wrong
size is a ValueError, a wrong dtype a TypeError: fastpar's rule, which its other tests check)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import fastpar.nn

F_IN, H, T, B = 5, 6, 4, 3
MODULES = ["LSTM", "GRU", "RNN"]
CELLS = ["LSTMCell", "GRUCell", "RNNCell"]


def _state(name: str, shape: tuple[int, ...]) -> object:
    """hx of ``name`` with every state of ``shape``."""
    return (
        (torch.randn(shape), torch.randn(shape)) if name.startswith("LSTM") else torch.randn(shape)
    )


# call name: (module name -> the arguments of a call torch's module refuses)
MODULE_CALLS: dict[str, Callable[[str], tuple[object, ...]]] = {
    "input_size": lambda name: (torch.randn(T, B, F_IN + 1),),
    "input float64": lambda name: (torch.randn(T, B, F_IN, dtype=torch.float64),),
    "input int64": lambda name: (torch.ones(T, B, F_IN, dtype=torch.int64),),
    "input 4-D": lambda name: (torch.randn(1, T, B, F_IN),),
    "no time steps": lambda name: (torch.randn(0, B, F_IN),),
    "hx batch": lambda name: (torch.randn(T, B, F_IN), _state(name, (1, B + 1, H))),
    "hx 2-D, input 3-D": lambda name: (torch.randn(T, B, F_IN), _state(name, (B, H))),
}
CELL_CALLS: dict[str, Callable[[str], tuple[object, ...]]] = {
    "input_size": lambda name: (torch.randn(B, F_IN + 1),),
    "input 3-D": lambda name: (torch.randn(1, B, F_IN),),
    "hx batch": lambda name: (torch.randn(B, F_IN), _state(name, (B + 1, H))),
}


def _check_raises_as_torch(name: str, args: tuple[object, ...]) -> None:
    torch.manual_seed(0)
    theirs = getattr(torch.nn, name)(F_IN, H)
    ours = getattr(fastpar.nn, name)(F_IN, H, backend="torch")
    with pytest.raises(Exception) as torchs:
        theirs(*args)
    with pytest.raises(torchs.type):
        ours(*args)


@pytest.mark.parametrize("call", MODULE_CALLS)
@pytest.mark.parametrize("name", MODULES)
def test_module_raises_torchs_exception_type(name: str, call: str) -> None:
    _check_raises_as_torch(name, MODULE_CALLS[call](name))


@pytest.mark.parametrize("call", CELL_CALLS)
@pytest.mark.parametrize("name", CELLS)
def test_cell_raises_torchs_exception_type(name: str, call: str) -> None:
    _check_raises_as_torch(name, CELL_CALLS[call](name))
