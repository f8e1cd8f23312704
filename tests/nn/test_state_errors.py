"""A bad hidden state (or an input on the wrong device) raises, in fastpar.nn's modules and cells,
an exception that ``except <the type torch.nn raises for the same call>`` catches, and its message
names the state (``hx``, ``hx[0] (h_0)``, ``hx[1] (c_0)``). Each call runs through torch's module
first: the type it raises is the reference. A meta tensor stands in for another device."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import fastpar.nn
from fastpar.nn.inputs import StateCountError

F_IN, H, T, B = 5, 6, 4, 3
Call = Callable[[], tuple[tuple[object, ...], str]]  # -> (forward's arguments, the named argument)


def _randn(*shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, device=device)


def _packed(enforce_sorted: bool) -> torch.nn.utils.rnn.PackedSequence:
    """A packed batch of B sequences (lengths 4, 3, 2; unsorted when not enforce_sorted)."""
    lengths = [4, 3, 2] if enforce_sorted else [3, 4, 2]
    return pack_sequence([_randn(n, F_IN) for n in lengths], enforce_sorted=enforce_sorted)


def _both_states(name: str, *shape: int, **kwargs: object) -> object:
    """hx of module ``name`` with every state of ``shape`` (dtype, device from ``kwargs``): the
    pair (h_0, c_0) for the LSTM, h_0 alone for the GRU and the RNN."""
    if name == "LSTM" or name == "LSTMCell":
        return (_randn(*shape, **kwargs), _randn(*shape, **kwargs))  # type: ignore[arg-type]
    return _randn(*shape, **kwargs)  # type: ignore[arg-type]


def _first(name: str) -> str:
    """How messages name the first state of hx."""
    return "hx[0] (h_0)" if name.startswith("LSTM") else "hx (h_0)"


def _module_calls(name: str) -> dict[str, Call]:
    x, x1 = _randn(T, B, F_IN), _randn(T, F_IN)  # batched, unbatched
    h = _first(name)
    calls: dict[str, Call] = {
        "hx float64": lambda: ((x, _both_states(name, 1, B, H, dtype=torch.float64)), h),
        "hx float64, unbatched": lambda: ((x1, _both_states(name, 1, H, dtype=torch.float64)), h),
        "hx on meta": lambda: ((x, _both_states(name, 1, B, H, device="meta")), h),
        "hx on meta, unbatched": lambda: ((x1, _both_states(name, 1, H, device="meta")), h),
        "hx batch B+1": lambda: ((x, _both_states(name, 1, B + 1, H)), h),
        "hx 3-D, input unbatched": lambda: ((x1, _both_states(name, 1, B, H)), h),
        "hx 2-D, input batched": lambda: ((x, _both_states(name, 1, H)), h),
        "hx H+1, unbatched": lambda: ((x1, _both_states(name, 1, H + 1)), h),
        "input on meta": lambda: ((_randn(T, B, F_IN, device="meta"),), "input"),
        "packed, hx batch B-1": lambda: ((_packed(True), _both_states(name, 1, B - 1, H)), h),
        "packed, hx on meta":
            lambda: ((_packed(False), _both_states(name, 1, B, H, device="meta")), h),
    }  # fmt: skip
    if name == "LSTM":
        state = _randn(1, B, H)
        calls |= {
            "c_0 float64": lambda: ((x, (state, _randn(1, B, H, dtype=torch.float64))), "hx[1]"),
            "c_0 on meta": lambda: ((x, (state, _randn(1, B, H, device="meta"))), "hx[1]"),
            "c_0 batch B+1": lambda: ((x, (state, _randn(1, B + 1, H))), "hx[1]"),
            "c_0 not a tensor": lambda: ((x, (state, [0.0] * H)), "hx[1]"),
            "hx a tensor": lambda: ((x, state), "hx"),
            "hx a tensor, unbatched": lambda: ((x1, _randn(1, H)), "hx"),
            "hx a tensor of both states": lambda: ((x, torch.stack([state, state])), "hx"),
            "hx one state": lambda: ((x, (state,)), "hx"),
            "hx three states": lambda: ((x, (state, state, state)), "hx"),
            "hx an int": lambda: ((x, 0), "hx"),
            "packed, hx a tensor": lambda: ((_packed(True), state), "hx"),
            "packed unsorted, hx one state": lambda: ((_packed(False), (state,)), "hx"),
        }  # fmt: skip
    else:
        state = _randn(1, B, H)
        calls |= {
            "hx a tuple": lambda: ((x, (state,)), "hx"),
            "hx a pair": lambda: ((x, (state, state)), "hx"),
            "hx a tuple, unbatched": lambda: ((x1, (_randn(1, H),)), "hx"),
            "hx a list": lambda: ((x, [state]), "hx"),
            "packed, hx a tuple": lambda: ((_packed(True), (state,)), "hx"),
            "packed unsorted, hx a tuple": lambda: ((_packed(False), (state,)), "hx"),
        }  # fmt: skip
    return calls


def _cell_calls(name: str) -> dict[str, Call]:
    x, x1 = _randn(B, F_IN), _randn(F_IN)
    h = _first(name)
    calls: dict[str, Call] = {
        "hx float64": lambda: ((x, _both_states(name, B, H, dtype=torch.float64)), h),
        "hx float64, unbatched": lambda: ((x1, _both_states(name, H, dtype=torch.float64)), h),
        "hx on meta": lambda: ((x, _both_states(name, B, H, device="meta")), h),
        "hx on meta, unbatched": lambda: ((x1, _both_states(name, H, device="meta")), h),
        "hx batch B+1": lambda: ((x, _both_states(name, B + 1, H)), h),
        "hx 2-D, input unbatched": lambda: ((x1, _both_states(name, 1, H)), h),
        "hx 1-D, input batched": lambda: ((x, _both_states(name, H)), h),
        "input float64": lambda: ((_randn(B, F_IN, dtype=torch.float64),), "input"),
        "input on meta": lambda: ((_randn(B, F_IN, device="meta"),), "input"),
    }  # fmt: skip
    if name == "LSTMCell":
        state = _randn(B, H)
        calls |= {
            # (c_0 float64 is no case: torch's LSTMCell returns float64 states for it)
            "c_0 on meta": lambda: ((x, (state, _randn(B, H, device="meta"))), "hx[1]"),
            "c_0 not a tensor": lambda: ((x, (state, 0.0)), "hx[1]"),
            "hx a tensor": lambda: ((x, state), "hx"),
            "hx one state": lambda: ((x, (state,)), "hx"),
            "hx three states": lambda: ((x, (state, state, state)), "hx"),
            "hx an int": lambda: ((x, 0), "hx"),
        }  # fmt: skip
    else:
        calls |= {
            "hx a tuple": lambda: ((x, (_randn(B, H),)), "hx"),
            "hx a tuple, unbatched": lambda: ((x1, (_randn(H),)), "hx"),
        }
    return calls


def _cases(names: list[str], calls: Callable[[str], dict[str, Call]]) -> list[tuple[str, str]]:
    return [(name, case) for name in names for case in calls(name)]


def _check_catchable_as_torchs(name: str, call: Call) -> None:
    """Run the call through torch's module and fastpar's (same weights): fastpar's exception is
    an instance of the type torch's raised, and names the argument."""
    torch.manual_seed(0)
    theirs = getattr(torch.nn, name)(F_IN, H)
    ours = getattr(fastpar.nn, name)(F_IN, H, backend="torch")
    ours.load_state_dict(theirs.state_dict())
    args, argument = call()
    with pytest.raises(Exception) as torchs:
        theirs(*args)
    with pytest.raises(Exception) as fastpars:
        ours(*args)
    assert isinstance(fastpars.value, torchs.type), (torchs.value, fastpars.value)
    assert argument in str(fastpars.value), fastpars.value


@pytest.mark.parametrize("name, case", _cases(["LSTM", "GRU", "RNN"], _module_calls))
def test_module_state_error_is_torchs_type(name: str, case: str) -> None:
    _check_catchable_as_torchs(name, _module_calls(name)[case])


@pytest.mark.parametrize("name, case", _cases(["LSTMCell", "GRUCell", "RNNCell"], _cell_calls))
def test_cell_state_error_is_torchs_type(name: str, case: str) -> None:
    _check_catchable_as_torchs(name, _cell_calls(name)[case])


@pytest.mark.parametrize("name", ["LSTM", "LSTMCell"])
def test_lstm_refuses_three_states_unbatched(name: str) -> None:
    """Unbatched, torch's LSTM and LSTMCell read hx[0] and hx[1] and drop a third state without a
    word; fastpar's refuse hx that is not (h_0, c_0) there too, as they do batched."""
    x = _randn(T, F_IN) if name == "LSTM" else _randn(F_IN)
    state = _randn(1, H) if name == "LSTM" else _randn(H)
    with pytest.raises(StateCountError, match=r"hx must be a tuple \(h_0, c_0\)"):
        getattr(fastpar.nn, name)(F_IN, H)(x, (state, state, state))
