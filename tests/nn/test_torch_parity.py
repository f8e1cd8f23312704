"""fastpar.nn.LSTM, GRU and RNN as drop-ins for torch.nn's: where code written for torch's
modules relies on their behaviour beyond results (backward under autocast, torch's private
weight lists, argument checks, repr), fastpar's modules behave the same."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence

import fastpar.nn
from tests.nn.recurrent_helpers import AUTOCAST_TOLERANCES, assert_within_roundings
from tests.ops.lstm_helpers import randn

F_IN, H, B, T = 10, 8, 3, 6
CELLS = [("LSTM", {}), ("LSTM", {"proj_size": 4}), ("GRU", {}), ("RNN", {})]


def _pair(cell: str, backend: str = "torch", **options: object):
    """A fastpar module and torch's (float32), same weights."""
    torch.manual_seed(0)
    ours = getattr(fastpar.nn, cell)(F_IN, H, backend=backend, **options)
    theirs = getattr(torch.nn, cell)(F_IN, H, **options)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _grads_under_autocast(
    module: torch.nn.Module, packed: bool, backward_inside: bool
) -> list[Tensor]:
    """Gradients of the input and every parameter for fixed cotangents, the forward under CPU
    bfloat16 autocast and the backward inside its region or after it."""
    x = randn(T, B, F_IN, seed=1).float().requires_grad_()
    params = list(module.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, finals = module(pack_padded_sequence(x, torch.tensor([6, 4, 2])) if packed else x)
        finals = finals if isinstance(finals, tuple) else (finals,)
        results = [out.data if packed else out, *finals]
        loss = sum((r.float() * randn(*r.shape, seed=10 + k).float()).sum()
                   for k, r in enumerate(results))  # fmt: skip
        if backward_inside:
            return list(torch.autograd.grad(loss, [x, *params]))
    return list(torch.autograd.grad(loss, [x, *params]))


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("cell, options", CELLS)
def test_backward_inside_autocast_region_as_torch(
    cell: str, options: dict[str, object], packed: bool
) -> None:
    """torch's modules give the same gradients whether ``backward()`` runs inside the autocast
    region or after it; so do fastpar's (on packed input, the backward of fastpar's per-layer
    op raised a dtype error for the LSTM, and ran the GRU's and RNN's GEMMs in bfloat16)."""
    ours, theirs = _pair(cell, num_layers=2, **options)
    want = _grads_under_autocast(theirs, packed, backward_inside=False)
    torchs_inside = _grads_under_autocast(theirs, packed, backward_inside=True)
    assert all(torch.equal(a, b) for a, b in zip(torchs_inside, want, strict=True)), (
        "torch's own gradients depend on where backward runs"
    )
    got_outside = _grads_under_autocast(ours, packed, backward_inside=False)
    got_inside = _grads_under_autocast(ours, packed, backward_inside=True)
    names = ["d input"] + ["d " + n for n, _ in ours.named_parameters()]
    for name, inside, outside, torchs in zip(names, got_inside, got_outside, want, strict=True):
        assert torch.equal(inside, outside), f"{name}: backward inside autocast differs"
        assert_within_roundings(inside, torchs, AUTOCAST_TOLERANCES[torch.bfloat16], name)


WEIGHT_LAYOUTS = [
    ("LSTM", {}),
    ("LSTM", {"num_layers": 2, "bidirectional": True, "proj_size": 4}),
    ("GRU", {"num_layers": 2, "bias": False}),
    ("RNN", {"bidirectional": True, "nonlinearity": "relu"}),
]


@pytest.mark.parametrize("cell, options", WEIGHT_LAYOUTS)
def test_private_weight_lists_as_torch(cell: str, options: dict[str, object]) -> None:
    """``_all_weights``, ``_flat_weights_names`` and ``_flat_weights`` (read by code written for
    torch's modules) name and hold the same parameters as torch's, also after ``.double()``."""
    ours, theirs = _pair(cell, **options)
    assert ours._all_weights == theirs._all_weights
    assert ours._flat_weights_names == theirs._flat_weights_names
    for a, b in zip(ours._flat_weights, theirs._flat_weights, strict=True):
        assert torch.equal(a, b)
    ours.double(), theirs.double()
    assert [w.dtype for w in ours._flat_weights] == [w.dtype for w in theirs._flat_weights]
    assert all(a is b for a, b in zip(ours._flat_weights, ours.parameters(), strict=True))


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("flag", ["bias", "batch_first"])
@pytest.mark.parametrize("value", [0, 1, None, "yes"])
def test_non_bool_flags_raise_as_torch(cell: str, flag: str, value: object) -> None:
    """torch's modules take only a bool for bias and batch_first (bias=0 is a TypeError, not
    bias=False); fastpar's raise the same error type, naming the argument."""
    with pytest.raises(TypeError, match=flag):
        getattr(torch.nn, cell)(F_IN, H, **{flag: value})
    with pytest.raises(TypeError, match=flag):
        getattr(fastpar.nn, cell)(F_IN, H, **{flag: value})


REPR_OPTIONS = [
    {},
    {"num_layers": 2, "dropout": 0.5, "bidirectional": True},
    {"num_layers": 3, "bias": False, "batch_first": True, "dropout": 0.25, "bidirectional": True},
]


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("options", REPR_OPTIONS)
def test_repr_begins_with_torchs(cell: str, options: dict[str, object]) -> None:
    """fastpar's repr is torch's, then fastpar's own options (backend, kernel)."""
    ours, theirs = _pair(cell, **options)
    assert repr(ours).startswith(repr(theirs)[:-1] + ", backend='torch'"), (ours, theirs)
    if cell == "LSTM":
        ours, theirs = _pair(cell, proj_size=4, **options)
        assert repr(ours).startswith(repr(theirs)[:-1] + ", backend='torch'"), (ours, theirs)


@pytest.mark.parametrize(
    "cell, options",
    [("LSTMCell", {}), ("GRUCell", {"bias": False}), ("RNNCell", {"nonlinearity": "relu"}),
     ("RNNCell", {"bias": False, "nonlinearity": "relu"})],
)  # fmt: skip
def test_cell_repr_begins_with_torchs(cell: str, options: dict[str, object]) -> None:
    ours, theirs = _pair(cell, **options)
    assert repr(ours) == repr(theirs)[:-1] + ", backend='torch')"


# torch's modules check that bias and batch_first are bools but take any value for bidirectional
# (truthy: two directions) and show it as given, "bidirectional=0" too: its repr reads `is not
# False`. dropout they keep as a float ("dropout=1.0").
ODD_OPTIONS = [
    {"bidirectional": 1},
    {"bidirectional": 0},
    {"bidirectional": None},
    {"bidirectional": "yes", "batch_first": True},
    {"bidirectional": 2, "num_layers": 2, "dropout": 1},
    {"bidirectional": 1, "bias": False, "proj_size": 4},
]


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("options", ODD_OPTIONS, ids=lambda o: ",".join(f"{k}={o[k]!r}" for k in o))
def test_repr_of_odd_options_is_torchs(cell: str, options: dict[str, object]) -> None:
    """The same constructor call gives torch's repr, then fastpar's backend, and the same
    layers and directions (parameter names)."""
    if "proj_size" in options and cell != "LSTM":
        pytest.skip("proj_size is the LSTM's")
    ours, theirs = _pair(cell, **options)
    assert repr(ours) == repr(theirs)[:-1] + ", backend='torch')"
    assert ours.bidirectional == theirs.bidirectional
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("bidirectional, directions", [(1, True), ("yes", True), (None, False)])
def test_odd_bidirectional_runs_its_directions(
    cell: str, backend: str, bidirectional: object, directions: bool
) -> None:
    """A module built with bidirectional=1 runs as torch's with bidirectional=True (torch's own
    forward passes the 1 to its kernels, which refuse it)."""
    ours, _ = _pair(cell, backend, bidirectional=bidirectional)
    theirs = getattr(torch.nn, cell)(F_IN, H, bidirectional=directions)
    theirs.load_state_dict(ours.state_dict())
    x = randn(T, B, F_IN, seed=1).float()
    (out, finals), (expected, expected_finals) = ours(x), theirs(x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(finals, expected_finals)


@pytest.mark.parametrize("cell", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("bias", [1, 0, None, "yes"])
def test_cell_repr_of_odd_bias_is_torchs(cell: str, bias: object) -> None:
    """torch's cells take any value for bias (truthy: biases) and show it as given ("bias=1");
    fastpar's repr is the same, then its backend, with the same parameters and results."""
    ours, theirs = _pair(cell, bias=bias)
    assert repr(ours) == repr(theirs)[:-1] + ", backend='torch')"
    assert ours.bias == theirs.bias
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    x = randn(B, F_IN, seed=1).float()
    torch.testing.assert_close(ours(x), theirs(x))
