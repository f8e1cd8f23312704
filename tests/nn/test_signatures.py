"""fastpar.nn's constructors as torch.nn's: every positional form torch's modules take builds the
same module in fastpar, what torch refuses fastpar refuses with the same exception type, and
fastpar's own arguments (backend, kernel) are keyword-only, after torch's."""

from __future__ import annotations

import inspect
import typing

import numpy as np
import pytest
import torch

import fastpar.nn

F_IN, H = 10, 8
NAMES = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"]
FASTPAR_ONLY = {"backend", "kernel"}

# Every argument positionally, in the order torch's modules take them at run time. torch's LSTM,
# GRU and RNN take *args and pass them to RNNBase: the RNN's 4th is its nonlinearity, and the
# GRU's and the RNN's proj_size comes before device (its documented signature omits it).
# device "meta" shows the argument landed in device's slot.
FULL_POSITIONAL: dict[str, tuple[object, ...]] = {
    "LSTM": (F_IN, H, 2, False, True, 0.25, True, 4, "meta", torch.float64),
    "GRU": (F_IN, H, 2, False, True, 0.25, True, 0, "meta", torch.float64),
    "RNN": (F_IN, H, 2, "relu", False, True, 0.25, True, 0, "meta", torch.float64),
    "LSTMCell": (F_IN, H, False, "meta", torch.float64),
    "GRUCell": (F_IN, H, False, "meta", torch.float64),
    "RNNCell": (F_IN, H, False, "relu", "meta", torch.float64),
}
ATTRIBUTES = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
              "bidirectional", "proj_size", "nonlinearity")  # fmt: skip


def _describe(module: torch.nn.Module) -> tuple[object, ...]:
    """What a constructor decided: parameters (name, shape, dtype, device) and options."""
    params = [(n, tuple(p.shape), p.dtype, p.device.type) for n, p in module.named_parameters()]
    options = {name: getattr(module, name) for name in ATTRIBUTES if hasattr(module, name)}
    return params, options


def _positional_prefixes() -> list[tuple[str, int]]:
    return [(name, n) for name, args in FULL_POSITIONAL.items() for n in range(2, len(args) + 1)]


@pytest.mark.filterwarnings("ignore:dropout")  # dropout with 2 layers only; torch's own warning
@pytest.mark.parametrize("name, count", _positional_prefixes())
def test_positional_construction_as_torch(name: str, count: int) -> None:
    """Every prefix of the full positional form (``GRU(10, 8, 2)``, ...) builds the module
    torch's builds: same parameters, dtypes, devices and options."""
    args = FULL_POSITIONAL[name][:count]
    ours = getattr(fastpar.nn, name)(*args)
    theirs = getattr(torch.nn, name)(*args)
    assert _describe(ours) == _describe(theirs)


@pytest.mark.parametrize("name", NAMES)
def test_positional_argument_past_torchs_last_raises_as_torch(name: str) -> None:
    """A positional argument after dtype is a TypeError for torch's modules; fastpar's take
    backend only by keyword, so it is one for theirs too."""
    args = (*FULL_POSITIONAL[name], "torch")
    with pytest.raises(TypeError, match="positional"):
        getattr(torch.nn, name)(*args)
    with pytest.raises(TypeError, match="positional"):
        getattr(fastpar.nn, name)(*args)


def _torchs_parameters(name: str) -> list[inspect.Parameter]:
    """torch's documented constructor parameters (its modules' first overload, the cells'
    signature), without self."""
    init = getattr(torch.nn, name).__init__
    overloads = typing.get_overloads(init)
    signature = inspect.signature(overloads[0] if overloads else init)
    return list(signature.parameters.values())[1:]


@pytest.mark.parametrize("name", NAMES)
def test_signature_is_torchs_then_keyword_only_options(name: str) -> None:
    """Names, order, defaults and kinds of torch's parameters, then fastpar's own, keyword-only.
    The GRU and the RNN also name proj_size where torch's take it positionally (see
    FULL_POSITIONAL), which their documented signature leaves out."""
    ours = list(inspect.signature(getattr(fastpar.nn, name).__init__).parameters.values())[1:]
    torchs = [(p.name, p.default, p.kind) for p in _torchs_parameters(name)]
    if name in ("GRU", "RNN"):
        at = [p[0] for p in torchs].index("device")
        torchs.insert(at, ("proj_size", 0, inspect.Parameter.POSITIONAL_OR_KEYWORD))
    own = [p for p in ours if p.name in FASTPAR_ONLY]
    assert [(p.name, p.default, p.kind) for p in ours[: len(torchs)]] == torchs
    assert ours[len(torchs) :] == own
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in own)


@pytest.mark.parametrize("name", ["GRU", "RNN"])
@pytest.mark.parametrize("proj_size", [0, 0.0, None, 4, -1, 2.0, True])
def test_gru_and_rnn_refuse_proj_size_as_torch(name: str, proj_size: object) -> None:
    """torch's GRU and RNN refuse proj_size by keyword, at any value (0 too), with a ValueError
    and this message; fastpar's raise the same. Positionally they take 0 (FULL_POSITIONAL)."""
    message = "proj_size argument is only supported for LSTM, not RNN or GRU"
    with pytest.raises(ValueError, match=message):
        getattr(torch.nn, name)(F_IN, H, proj_size=proj_size)
    with pytest.raises(ValueError, match=message):
        getattr(fastpar.nn, name)(F_IN, H, proj_size=proj_size)


@pytest.mark.parametrize("name", ["GRU", "RNN"])
def test_gru_and_rnn_refuse_a_positional_projection(name: str) -> None:
    """Positionally (the GRU's 8th argument, the RNN's 9th) torch builds a GRU with W_hr whose
    forward then fails ("Expected hidden size"); fastpar's refuse it at construction."""
    args = (*FULL_POSITIONAL[name][:-3], 4)
    module = getattr(torch.nn, name)(*args)
    with pytest.raises(RuntimeError, match="Expected hidden size"):
        module(torch.randn(3, 2, F_IN))
    with pytest.raises(ValueError, match="only supported for LSTM, not RNN or GRU, got 4"):
        getattr(fastpar.nn, name)(*args)


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("dropout", [-0.1, 1.5, float("nan"), True, "0.5", torch.tensor(0.5)])
def test_bad_dropout_raises_as_torch(name: str, dropout: object) -> None:
    """torch's modules raise ValueError for a dropout that is not a real number in [0, 1] (a
    bool, a string, a tensor too); fastpar's raise the same type, naming dropout."""
    with pytest.raises(ValueError):
        getattr(torch.nn, name)(F_IN, H, 2, dropout=dropout)
    with pytest.raises(ValueError, match="dropout must be in"):
        getattr(fastpar.nn, name)(F_IN, H, 2, dropout=dropout)


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("dropout", [1, np.float32(0.25), np.float64(0.5)])
def test_real_dropout_taken_as_torch(name: str, dropout: object) -> None:
    """Any real number in [0, 1] (an int, numpy's floats) is a dropout for torch and fastpar."""
    ours = getattr(fastpar.nn, name)(F_IN, H, 2, dropout=dropout)
    theirs = getattr(torch.nn, name)(F_IN, H, 2, dropout=dropout)
    assert (type(ours.dropout), ours.dropout) == (type(theirs.dropout), theirs.dropout)


@pytest.mark.parametrize("name", NAMES)
def test_forward_signature_as_torch(name: str) -> None:
    ours = inspect.signature(getattr(fastpar.nn, name).forward).parameters.values()
    theirs = inspect.signature(getattr(torch.nn, name).forward).parameters.values()
    assert [(p.name, p.default, p.kind) for p in ours] == [
        (p.name, p.default, p.kind) for p in theirs
    ]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bias", [True, False])
def test_same_seed_same_parameters_as_torch(name: str, bias: bool) -> None:
    """torch's draws in torch's order: the same seed gives the same parameters, at construction
    and from reset_parameters(), with the same ``_parameters`` entries (None for no bias)."""
    options = {"num_layers": 2, "bidirectional": True} if "Cell" not in name else {}
    modules = []
    for library in (torch.nn, fastpar.nn):
        torch.manual_seed(7)
        modules.append(getattr(library, name)(F_IN, H, bias=bias, **options))
    ours, theirs = modules
    assert list(ours._parameters) == list(theirs._parameters)
    _assert_same_parameters(ours, theirs)
    for module in modules:
        torch.manual_seed(8)
        module.reset_parameters()
    _assert_same_parameters(ours, theirs)


def _assert_same_parameters(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    pairs = zip(ours.named_parameters(), theirs.named_parameters(), strict=True)
    for (name_a, a), (name_b, b) in pairs:
        assert name_a == name_b and torch.equal(a, b), name_a
