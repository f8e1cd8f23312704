"""The GRU and RNN references against torch.nn.GRU / torch.nn.RNN in float64: the oracles the
GRU and RNN kernels are checked against, checked themselves first."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fastpar.ops.reference import LayerWeights
from fastpar.ops.rnn_reference import gru_stack, rnn_stack
from tests.ops.lstm_helpers import grads, randn

T, B, IN, H, L = 6, 4, 5, 7, 2


def _module(cell: str, bias: bool) -> torch.nn.RNNBase:
    torch.manual_seed(0)
    kwargs = dict(input_size=IN, hidden_size=H, num_layers=L, bias=bias, bidirectional=True,
                  dtype=torch.float64)  # fmt: skip
    if cell == "gru":
        return torch.nn.GRU(**kwargs)
    return torch.nn.RNN(nonlinearity=cell.removeprefix("rnn_"), **kwargs)


def _weights(module: torch.nn.RNNBase) -> list[LayerWeights]:
    names = [f"l{layer}{suffix}" for layer in range(L) for suffix in ("", "_reverse")]
    return [
        LayerWeights(
            getattr(module, f"weight_ih_{n}"),
            getattr(module, f"weight_hh_{n}"),
            getattr(module, f"bias_ih_{n}", None),
            getattr(module, f"bias_hh_{n}", None),
            None,
        )
        for n in names
    ]


@pytest.mark.parametrize("cell", ["gru", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("packed", [False, True])
def test_reference_matches_torch(cell: str, bias: bool, packed: bool) -> None:
    module = _module(cell, bias)
    x = randn(T, B, IN, seed=1).requires_grad_()
    h0 = randn(L * 2, B, H, seed=2).requires_grad_()
    lengths = torch.tensor([6, 3, 5, 1]) if packed else None
    if packed:
        out, want_h = module(pack_padded_sequence(x, lengths, enforce_sorted=False), h0)
        want_out = pad_packed_sequence(out, total_length=T)[0]
    else:
        want_out, want_h = module(x, h0)
    options = dict(num_layers=L, bidirectional=True, lengths=lengths)
    if cell == "gru":
        out, h_n = gru_stack(x, h0, _weights(module), **options)
    else:
        nonlinearity = cell.removeprefix("rnn_")
        out, h_n = rnn_stack(x, h0, _weights(module), nonlinearity=nonlinearity, **options)
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(h_n, want_h, atol=1e-12, rtol=1e-10)
    cot = [randn(*t.shape, seed=10 + k) for k, t in enumerate((out, h_n))]
    inputs = [x, h0, *module.parameters()]
    for a, b in zip(grads((out, h_n), cot, inputs), grads((want_out, want_h), cot, inputs),
                    strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
