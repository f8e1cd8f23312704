"""Pure-PyTorch LSTM: the test oracle, the ``"reference"`` backend and the benchmark baseline.

Gate order and equations follow ``torch.nn.LSTM`` (i, f, g, o)::

    gates = x_t @ W_ih^T + b_ih + b_hh + h_{t-1} @ W_hh^T        (B, 4H)
    c_t   = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
    h_t   = (sigmoid(o) * tanh(c_t)) @ W_hr^T                   (W_hr only when proj_size > 0)

Dimension letters: T time, B batch, I input features, H hidden units, P = proj_size or H (the size
of h), L layers, D directions (1 or 2), G = 4 gates.

The multi-layer driver ``lstm_stack`` takes the single-direction recurrence as an argument, so the
Triton backend reuses the same layer, direction, dropout and packing logic and only swaps the
recurrence: the two backends cannot drift apart in anything but the kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastpar.ops.autocast_dtypes import autocast_carried_dtype, carried_dtype_results


class LayerWeights(NamedTuple):
    """The parameters of one layer and direction, with torch.nn.LSTM's shapes."""

    w_ih: Tensor  # (4H, I) or (4H, D*P) above the first layer
    w_hh: Tensor  # (4H, P)
    b_ih: Tensor | None  # (4H,)
    b_hh: Tensor | None  # (4H,)
    w_hr: Tensor | None  # (P, H) when proj_size > 0


# (xg, h0, c0, w_hh, w_hr, lengths, reverse) -> (hs, c_n); see lstm_recurrence_reference.
Recurrence = Callable[
    [Tensor, Tensor, Tensor, Tensor, "Tensor | None", "Tensor | None", bool], tuple[Tensor, Tensor]
]


def input_projection(x: Tensor, w: LayerWeights) -> Tensor:
    """The input half of every gate for all time steps at once, as one GEMM.

    Arguments:
        x: (T, B, I) layer input.
        w: the layer's weights.

    Returns:
        (T, B, 4H) ``x @ W_ih^T + b_ih + b_hh``.
    """
    bias = None
    if w.b_ih is not None and w.b_hh is not None:
        bias = w.b_ih + w.b_hh
    elif w.b_ih is not None or w.b_hh is not None:
        bias = w.b_ih if w.b_ih is not None else w.b_hh
    return F.linear(x, w.w_ih, bias)


def time_steps(steps: int, reverse: bool) -> range:
    """The order a recurrence visits time: 0..T-1, or T-1..0 when reversed."""
    return range(steps - 1, -1, -1) if reverse else range(steps)


def step_mask(lengths: Tensor, t: int) -> Tensor:
    """(B, 1) bool: which sequences have a valid step at time ``t``."""
    return (lengths > t).unsqueeze(1)


def lstm_recurrence_reference(
    xg: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None = None,
    lengths: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """One layer and direction of the recurrence, given the input projection.

    Steps at or past a sequence's length leave its state unchanged, so the state at the last
    step processed is the state at the last valid step (``h_n``/``c_n`` of a packed sequence).

    Arguments:
        xg: (T, B, 4H) input projection including both biases.
        h0: (B, P) initial hidden state.
        c0: (B, H) initial cell state.
        w_hh: (4H, P) recurrent weights.
        w_hr: (P, H) projection weights, or None.
        lengths: (B,) int64 valid lengths on xg's device, or None (all T valid).
        reverse: process time from T-1 down to 0.

    Returns:
        hs: (T, B, P) the hidden state after each step (carried through invalid steps);
        c_n: (B, H) the cell state after the last step processed.
    """
    h, c = h0, c0
    hs: list[Tensor] = [h0] * xg.shape[0]
    for t in time_steps(xg.shape[0], reverse):
        gates = xg[t] + h @ w_hh.t()
        i, f, g, o = gates.chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        if w_hr is not None:
            h_new = h_new @ w_hr.t()
        if lengths is not None:
            valid = step_mask(lengths, t)
            # A state carried past a length takes the step's dtype (autocast's after a
            # projection), as torch's packed loop keeps one; the matmuls round it to it anyway.
            h_new = torch.where(valid, h_new, h.to(h_new.dtype))
            c_new = torch.where(valid, c_new, c)
        h, c = h_new, c_new
        hs[t] = h
    return torch.stack(hs), c


def lstm_stack(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weights: Sequence[LayerWeights],
    *,
    num_layers: int,
    bidirectional: bool,
    dropout: float = 0.0,
    training: bool = False,
    lengths: Tensor | None = None,
    recurrence: Recurrence = lstm_recurrence_reference,
) -> tuple[Tensor, Tensor, Tensor]:
    """A multi-layer, optionally bidirectional LSTM over padded, time-major input.

    Arguments:
        x: (T, B, I) input.
        h0: (L*D, B, P) initial hidden states, layer-major then direction, as torch.
        c0: (L*D, B, H) initial cell states.
        weights: L*D LayerWeights in the same order as h0.
        num_layers: L.
        bidirectional: D = 2 if True else 1.
        dropout: probability of zeroing each output of every layer but the last (training only).
        training: apply dropout.
        lengths: (B,) valid lengths (packed input), or None. Outputs past a length are zero.
        recurrence: the single-direction recurrence (see lstm_recurrence_reference).

    Returns:
        output: (T, B, D*P) outputs of the last layer; h_n: (L*D, B, P); c_n: (L*D, B, H).
    """
    mask = valid_steps_mask(lengths, x.shape[0])

    def run_layer(
        layer_input: Tensor, states: tuple[Tensor, ...], w: LayerWeights, reverse: bool
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        h0, c0 = states
        hs, c_last = recurrence(input_projection(layer_input, w), h0, c0, w.w_hh, w.w_hr,
                                lengths, reverse)  # fmt: skip
        return masked(hs, mask), (hs[0] if reverse else hs[-1], c_last)

    # The Triton recurrence runs in autocast's dtype; this loop's own ops already promote.
    out, (h_n, c_n) = stack_layers(
        x, (h0, c0), weights, run_layer, num_layers=num_layers, bidirectional=bidirectional,
        dropout=dropout, training=training, carried=autocast_carried_dtype(x, c0),
    )  # fmt: skip
    return out, h_n, c_n


def valid_steps_mask(lengths: Tensor | None, steps: int) -> Tensor | None:
    """(T, B, 1) bool: True where a step is within its sequence's length; None without lengths."""
    if lengths is None:
        return None
    positions = torch.arange(steps, device=lengths.device)
    return (positions.unsqueeze(1) < lengths.unsqueeze(0)).unsqueeze(2)


def masked(hs: Tensor, mask: Tensor | None) -> Tensor:
    """A layer's output with the steps past each length zeroed, as torch's packed output, in
    the output's dtype (under autocast the input's may differ)."""
    return hs if mask is None else hs.masked_fill(~mask, 0.0)


# (layer_input, initial states, weights, reverse) -> (output, final states); see stack_layers.
LayerFn = Callable[
    [Tensor, tuple[Tensor, ...], LayerWeights, bool], tuple[Tensor, tuple[Tensor, ...]]
]


def stack_layers(
    x: Tensor,
    states: tuple[Tensor, ...],
    weights: Sequence[LayerWeights],
    run_layer: LayerFn,
    *,
    num_layers: int,
    bidirectional: bool,
    dropout: float,
    training: bool,
    carried: torch.dtype | None = None,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The layer and direction loop of a stacked recurrent network, shared by every cell's and
    every backend's stack.

    Arguments:
        x: (T, B, I) input.
        states: the initial states, each (L*D, B, .), layer-major then direction, as torch:
            (h0, c0) for the LSTM, (h0,) for the GRU and RNN.
        weights: L*D LayerWeights in the same order.
        run_layer: ``run_layer(layer_input, states_k, weights_k, reverse)`` runs one layer in one
            direction and returns its output (T, B, size of h) (zero past each length) and its
            final states (each (B, .)).
        num_layers: L; bidirectional: D = 2 if True else 1.
        dropout: probability of zeroing each output of every layer but the last (training only).
        training: apply dropout.
        carried: under autocast, the dtype torch's loop returns the carried state in
            (``autocast_dtypes.autocast_carried_dtype``), which each layer's results take
            (``carried_dtype_results``); None: as run_layer returns them.

    Returns:
        output: (T, B, D * size of h) of the last layer; the final states, each (L*D, B, .).
    """
    num_dirs = 2 if bidirectional else 1
    finals: list[tuple[Tensor, ...]] = []
    layer_input = x
    for layer in range(num_layers):
        outs: list[Tensor] = []
        for direction in range(num_dirs):
            k = layer * num_dirs + direction
            initial = tuple(state[k] for state in states)
            out, final = run_layer(layer_input, initial, weights[k], direction == 1)
            projected = weights[k].w_hr is not None
            out, final = carried_dtype_results(out, final, carried, projected=projected)
            outs.append(out)
            finals.append(final)
        layer_input = outs[0] if num_dirs == 1 else torch.cat(outs, dim=2)
        if dropout > 0.0 and training and layer < num_layers - 1:
            layer_input = F.dropout(layer_input, p=dropout, training=True)
    return layer_input, tuple(torch.stack(list(column)) for column in zip(*finals, strict=True))


# (layer_input, h0, weights, reverse) -> (output, h_n); see stack_layers_h.
HLayerFn = Callable[[Tensor, Tensor, LayerWeights, bool], tuple[Tensor, Tensor]]


def stack_layers_h(
    x: Tensor, h0: Tensor, weights: Sequence[LayerWeights], run_layer: HLayerFn, *,
    num_layers: int, bidirectional: bool, dropout: float, training: bool,
    carried: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``stack_layers`` for the cells whose only state is h (GRU, RNN): ``run_layer(layer_input,
    h0_k, weights_k, reverse)`` returns the layer's output and its h_n (B, H); returns the last
    layer's output (T, B, D*H) and h_n (L*D, B, H)."""

    def run(
        layer_input: Tensor, states: tuple[Tensor, ...], w: LayerWeights, reverse: bool
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        out, h_n = run_layer(layer_input, states[0], w, reverse)
        return out, (h_n,)

    out, (h_n,) = stack_layers(
        x, (h0,), weights, run, num_layers=num_layers, bidirectional=bidirectional,
        dropout=dropout, training=training, carried=carried,
    )  # fmt: skip
    return out, h_n


def lstm_cell_reference(x: Tensor, h: Tensor, c: Tensor, w: LayerWeights) -> tuple[Tensor, Tensor]:
    """One LSTM cell step, as torch.nn.LSTMCell.

    Arguments:
        x: (B, I) input; h: (B, H) hidden state; c: (B, H) cell state; w: the cell's weights
        (``w_hr`` must be None).

    Returns:
        h_next: (B, H); c_next: (B, H).
    """
    hs, c_next = lstm_recurrence_reference(input_projection(x.unsqueeze(0), w), h, c, w.w_hh)
    return hs[0], c_next
