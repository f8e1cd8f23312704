"""The pure-PyTorch reference against torch.nn.LSTM in float64: the oracle checked first."""

from __future__ import annotations

import pytest
import torch

from fastpar.nn.lstm import layer_weights
from fastpar.ops.reference import lstm_cell_reference, lstm_stack
from tests.ops.lstm_helpers import grads, randn, seeded_lstm

CONFIGS = [
    # num_layers, bidirectional, proj_size, bias
    (1, False, 0, True),
    (2, True, 0, True),
    (3, False, 5, False),
    (2, True, 4, True),
]


@pytest.mark.parametrize("num_layers, bidirectional, proj_size, bias", CONFIGS)
@pytest.mark.parametrize("T", [1, 7])
def test_reference_matches_torch_lstm(
    num_layers: int, bidirectional: bool, proj_size: int, bias: bool, T: int
) -> None:
    B, F_IN, H = 3, 6, 9
    D = 2 if bidirectional else 1
    P = proj_size or H
    m = seeded_lstm(
        input_size=F_IN, hidden_size=H, num_layers=num_layers, bias=bias,
        bidirectional=bidirectional, proj_size=proj_size,
    )  # fmt: skip
    x = randn(T, B, F_IN, seed=1).requires_grad_()
    h0 = randn(num_layers * D, B, P, seed=2).requires_grad_()
    c0 = randn(num_layers * D, B, H, seed=3).requires_grad_()
    params = list(m.parameters())
    want_out, (want_h, want_c) = m(x, (h0, c0))
    out, h_n, c_n = lstm_stack(
        x, h0, c0, layer_weights(m, num_layers, D), num_layers=num_layers,
        bidirectional=bidirectional,
    )  # fmt: skip
    for got, want in ((out, want_out), (h_n, want_h), (c_n, want_c)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    cot = [randn(*t.shape, seed=10 + k) for k, t in enumerate((out, h_n, c_n))]
    ours = grads((out, h_n, c_n), cot, [x, h0, c0, *params])
    theirs = grads((want_out, want_h, want_c), cot, [x, h0, c0, *params])
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_reference_packed_matches_torch_lstm() -> None:
    # Unsorted lengths, both directions: outputs past a length are zero, h_n/c_n at the last
    # valid step, exactly as torch's packed path.
    T, B, F_IN, H = 6, 4, 5, 7
    lengths = torch.tensor([3, 6, 1, 4])
    m = seeded_lstm(input_size=F_IN, hidden_size=H, bidirectional=True)
    x = randn(T, B, F_IN, seed=1)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    want_packed, (want_h, want_c) = m(packed)
    want_out, _ = torch.nn.utils.rnn.pad_packed_sequence(want_packed, total_length=T)
    h0 = torch.zeros(2, B, H, dtype=torch.float64)
    out, h_n, c_n = lstm_stack(
        x, h0, torch.zeros_like(h0), layer_weights(m, 1, 2), num_layers=1, bidirectional=True,
        lengths=lengths,
    )  # fmt: skip
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(h_n, want_h, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(c_n, want_c, atol=1e-12, rtol=1e-10)


def test_cell_reference_matches_torch_lstm_cell() -> None:
    torch.manual_seed(0)
    cell = torch.nn.LSTMCell(5, 9, dtype=torch.float64)
    x, h, c = randn(3, 5, seed=1), randn(3, 9, seed=2), randn(3, 9, seed=3)
    want_h, want_c = cell(x, (h, c))
    w = layer_weights_of_cell(cell)
    got_h, got_c = lstm_cell_reference(x, h, c, w)
    torch.testing.assert_close(got_h, want_h, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got_c, want_c, atol=1e-12, rtol=1e-10)


def layer_weights_of_cell(cell: torch.nn.LSTMCell):
    from fastpar.ops.reference import LayerWeights

    return LayerWeights(cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, None)
