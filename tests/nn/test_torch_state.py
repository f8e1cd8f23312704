"""fastpar.nn's modules built from a torch.nn module's pickled state: ``__setstate__`` with torch's
``__getstate__``, and a whole pickled torch model unpickled into fastpar's classes, give
torch's results; an older state without proj_size loads as torch's own ``__setstate__`` loads
it."""

from __future__ import annotations

import io
import pickle

import pytest
import torch

import fastpar.nn

F_IN, H, T, B = 5, 6, 4, 3
CASES = [
    ("LSTM", {"num_layers": 2, "bidirectional": True, "proj_size": 3}),
    ("LSTM", {"bias": False, "batch_first": True}),
    ("GRU", {"num_layers": 2}),
    ("RNN", {"nonlinearity": "relu", "bidirectional": True}),
    ("LSTMCell", {}),
    ("GRUCell", {"bias": False}),
    ("RNNCell", {"nonlinearity": "relu"}),
]


class _ToFastpar(pickle.Unpickler):
    """Unpickles torch.nn's recurrent modules as fastpar.nn's (a user's loader for a model
    saved whole with torch.save)."""

    def find_class(self, module: str, name: str) -> object:
        if module == "torch.nn.modules.rnn" and hasattr(fastpar.nn, name):
            return getattr(fastpar.nn, name)
        return super().find_class(module, name)


def _torchs(name: str, options: dict[str, object]) -> torch.nn.Module:
    torch.manual_seed(0)
    return getattr(torch.nn, name)(F_IN, H, **options).double()


def _results(module: torch.nn.Module) -> list[torch.Tensor]:
    """Every result of one call, also with an explicit zero state for the modules."""
    is_cell = type(module).__name__.endswith("Cell")
    x = torch.randn(B, F_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    if not is_cell:
        x = x.expand(T, B, F_IN) * torch.arange(1, T + 1, dtype=torch.float64)[:, None, None]
    out = module(x)
    flat: list[torch.Tensor] = []
    stack = [out]
    while stack:
        item = stack.pop(0)
        if isinstance(item, tuple):
            stack.extend(item)
        else:
            flat.append(item)
    return flat


def _assert_same_module(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    assert type(ours) is getattr(fastpar.nn, type(theirs).__name__)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for got, want in zip(_results(ours), _results(theirs), strict=True):
        torch.testing.assert_close(got, want)
    assert repr(ours).startswith(repr(theirs)[:-1])


@pytest.mark.parametrize("name, options", CASES)
def test_setstate_from_torchs_getstate(name: str, options: dict[str, object]) -> None:
    theirs = _torchs(name, options)
    cls = getattr(fastpar.nn, name)
    ours = cls.__new__(cls)
    ours.__setstate__(theirs.__getstate__())
    assert ours.backend == "auto"
    _assert_same_module(ours, theirs)


@pytest.mark.parametrize("name, options", CASES)
def test_whole_torch_model_unpickles_into_fastpar(name: str, options: dict[str, object]) -> None:
    theirs = _torchs(name, options)
    model = torch.nn.Sequential(theirs)
    ours = _ToFastpar(io.BytesIO(pickle.dumps(model))).load()[0]
    _assert_same_module(ours, theirs)
    state = ours.state_dict()
    ours.load_state_dict(theirs.state_dict())  # strict, both directions
    theirs.load_state_dict(state)


def test_state_without_proj_size_loads_as_torchs() -> None:
    """A torch state from before proj_size existed (torch < 1.8) gets proj_size 0, as torch's
    own ``__setstate__`` gives it."""
    state = {k: v for k, v in _torchs("LSTM", {}).__getstate__().items() if k != "proj_size"}
    torchs = torch.nn.LSTM.__new__(torch.nn.LSTM)
    torchs.__setstate__(dict(state))
    ours = fastpar.nn.LSTM.__new__(fastpar.nn.LSTM)
    ours.__setstate__(dict(state))
    assert ours.proj_size == torchs.proj_size == 0
    _assert_same_module(ours, torchs)


@pytest.mark.parametrize("name, options", CASES)
def test_older_fastpar_state_takes_default_options(name: str, options: dict[str, object]) -> None:
    """A fastpar state without backend and kernel (options added later) gets "auto", their
    defaults, and the same results."""
    torch.manual_seed(0)
    saved = getattr(fastpar.nn, name)(F_IN, H, backend="torch", **options).double()
    state = {k: v for k, v in saved.__getstate__().items() if k not in ("backend", "kernel")}
    ours = type(saved).__new__(type(saved))
    ours.__setstate__(state)
    assert ours.backend == getattr(ours, "kernel", "auto") == "auto"
    for got, want in zip(_results(ours), _results(saved), strict=True):
        torch.testing.assert_close(got, want)
