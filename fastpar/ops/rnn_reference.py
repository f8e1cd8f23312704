"""Pure-PyTorch GRU and Elman RNN recurrences: the test oracle for their kernels.

Gate order and equations follow ``torch.nn.GRU`` (r, z, n) and ``torch.nn.RNN``::

    GRU  r   = sigmoid(x_t W_ir^T + b_ir + h_{t-1} W_hr^T + b_hr)
         z   = sigmoid(x_t W_iz^T + b_iz + h_{t-1} W_hz^T + b_hz)
         n   = tanh(x_t W_in^T + b_in + r * (h_{t-1} W_hn^T + b_hn))
         h_t = (1 - z) * n + z * h_{t-1}
    RNN  h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh),  act = tanh or relu

Only b_hn must stay inside the recurrence (the reset gate multiplies it); every other bias folds
into the input projection, computed for all steps at once. Letters as in ``reference``: T time,
B batch, I input features, H hidden units; G = 3 gates for the GRU, 1 for the RNN.

Like ``lstm_recurrence_reference``, steps at or past a sequence's length leave the state
unchanged, so ``hs[-1]`` (``hs[0]`` when reversed) is the state after its last valid step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fastpar.ops.autocast_dtypes import autocast_carried_dtype
from fastpar.ops.reference import (
    LayerWeights,
    input_projection,
    masked,
    stack_layers_h,
    step_mask,
    time_steps,
    valid_steps_mask,
)

Nonlinearity = Literal["tanh", "relu"]
# (xg, h0, w_hh, b_hn, lengths, reverse) -> hs; see gru_recurrence_reference.
GRURecurrence = Callable[[Tensor, Tensor, Tensor, "Tensor | None", "Tensor | None", bool], Tensor]
# (xg, h0, w_hh, lengths, reverse, nonlinearity) -> hs; see rnn_recurrence_reference.
RNNRecurrence = Callable[[Tensor, Tensor, Tensor, "Tensor | None", bool, Nonlinearity], Tensor]


def gru_input_projection(x: Tensor, w: LayerWeights) -> tuple[Tensor, Tensor | None]:
    """The input half of the GRU gates for all steps, and the bias the recurrence keeps.

    Arguments:
        x: (T, B, I) layer input.
        w: the layer's weights with torch.nn.GRU's shapes (w_ih (3H, I), w_hh (3H, H), biases
            (3H,), w_hr None).

    Returns:
        xg: (T, B, 3H) ``x @ W_ih^T + b_ih + (b_hr, b_hz, 0)``; b_hn: (H,) or None without bias.
    """
    if w.b_hh is None:
        return F.linear(x, w.w_ih, w.b_ih), None
    hidden = w.w_hh.shape[1]
    folded = torch.cat([w.b_hh[: 2 * hidden], torch.zeros_like(w.b_hh[2 * hidden :])])
    bias = folded if w.b_ih is None else w.b_ih + folded
    return F.linear(x, w.w_ih, bias), w.b_hh[2 * hidden :]


def gru_recurrence_reference(
    xg: Tensor,
    h0: Tensor,
    w_hh: Tensor,
    b_hn: Tensor | None = None,
    lengths: Tensor | None = None,
    reverse: bool = False,
) -> Tensor:
    """One layer and direction of the GRU recurrence, given ``gru_input_projection``.

    Arguments:
        xg: (T, B, 3H) input projection (b_ih and b_hr, b_hz folded in).
        h0: (B, H) initial hidden state.
        w_hh: (3H, H) recurrent weights.
        b_hn: (H,) the recurrent bias of the candidate gate, or None.
        lengths: (B,) int64 valid lengths on xg's device, or None (all T valid).
        reverse: process time from T-1 down to 0.

    Returns:
        hs: (T, B, H) the hidden state after each step (carried through invalid steps).
    """
    h = h0
    hs: list[Tensor] = [h0] * xg.shape[0]
    for t in time_steps(xg.shape[0], reverse):
        hg = h @ w_hh.t()
        xr, xz, xn = xg[t].chunk(3, dim=1)
        hr, hz, hn = hg.chunk(3, dim=1)
        if b_hn is not None:
            # In hn's dtype, as torch's cell adds b_hh inside its linear: a float32 bias must
            # not promote a half h (autocast) to float32.
            hn = hn + b_hn.to(hn.dtype)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        h_new = (1 - z) * n + z * h
        h = h_new if lengths is None else torch.where(step_mask(lengths, t), h_new, h)
        hs[t] = h
    return torch.stack(hs)


def rnn_recurrence_reference(
    xg: Tensor,
    h0: Tensor,
    w_hh: Tensor,
    lengths: Tensor | None = None,
    reverse: bool = False,
    nonlinearity: Nonlinearity = "tanh",
) -> Tensor:
    """One layer and direction of the Elman RNN recurrence, given ``reference.input_projection``.

    Arguments:
        xg: (T, B, H) input projection including both biases.
        h0: (B, H) initial hidden state.
        w_hh: (H, H) recurrent weights.
        lengths: (B,) int64 valid lengths, or None; reverse: as ``gru_recurrence_reference``.
        nonlinearity: "tanh" or "relu", as torch.nn.RNN.

    Returns:
        hs: (T, B, H) the hidden state after each step (carried through invalid steps).
    """
    act = torch.tanh if nonlinearity == "tanh" else torch.relu
    h = h0
    hs: list[Tensor] = [h0] * xg.shape[0]
    for t in time_steps(xg.shape[0], reverse):
        h_new = act(xg[t] + h @ w_hh.t())
        if lengths is not None:
            # A state carried past a length takes the step's dtype (autocast's), as torch's
            # packed loop keeps one; its matmul above rounds it to that dtype anyway.
            h_new = torch.where(step_mask(lengths, t), h_new, h.to(h_new.dtype))
        h = h_new
        hs[t] = h
    return torch.stack(hs)


def gru_stack(
    x: Tensor,
    h0: Tensor,
    weights: Sequence[LayerWeights],
    *,
    num_layers: int,
    bidirectional: bool,
    dropout: float = 0.0,
    training: bool = False,
    lengths: Tensor | None = None,
    recurrence: GRURecurrence = gru_recurrence_reference,
) -> tuple[Tensor, Tensor]:
    """A multi-layer, optionally bidirectional GRU over padded, time-major input.

    Arguments:
        x: (T, B, I) input; h0: (L*D, B, H) initial states, layer-major then direction.
        weights: L*D LayerWeights in the same order; the rest as ``reference.lstm_stack``.
        recurrence: the single-direction recurrence (see gru_recurrence_reference).

    Returns:
        output: (T, B, D*H) of the last layer (zero past each length); h_n: (L*D, B, H).
    """
    mask = valid_steps_mask(lengths, x.shape[0])

    def run_layer(
        layer_input: Tensor, h0: Tensor, w: LayerWeights, reverse: bool
    ) -> tuple[Tensor, Tensor]:
        xg, b_hn = gru_input_projection(layer_input, w)
        hs = recurrence(xg, h0, w.w_hh, b_hn, lengths, reverse)
        return masked(hs, mask), hs[0] if reverse else hs[-1]

    # The Triton recurrence runs in autocast's dtype; this loop's own ops already promote.
    return stack_layers_h(
        x, h0, weights, run_layer, num_layers=num_layers, bidirectional=bidirectional,
        dropout=dropout, training=training, carried=autocast_carried_dtype(x, h0),
    )  # fmt: skip


def rnn_stack(
    x: Tensor,
    h0: Tensor,
    weights: Sequence[LayerWeights],
    *,
    nonlinearity: Nonlinearity,
    num_layers: int,
    bidirectional: bool,
    dropout: float = 0.0,
    training: bool = False,
    lengths: Tensor | None = None,
    recurrence: RNNRecurrence = rnn_recurrence_reference,
) -> tuple[Tensor, Tensor]:
    """A multi-layer, optionally bidirectional Elman RNN: arguments and results as
    ``gru_stack``, with torch.nn.RNN's ``nonlinearity``."""
    mask = valid_steps_mask(lengths, x.shape[0])

    def run_layer(
        layer_input: Tensor, h0: Tensor, w: LayerWeights, reverse: bool
    ) -> tuple[Tensor, Tensor]:
        hs = recurrence(input_projection(layer_input, w), h0, w.w_hh, lengths, reverse,
                        nonlinearity)  # fmt: skip
        return masked(hs, mask), hs[0] if reverse else hs[-1]

    return stack_layers_h(
        x, h0, weights, run_layer, num_layers=num_layers, bidirectional=bidirectional,
        dropout=dropout, training=training,
    )  # fmt: skip


def gru_cell_reference(x: Tensor, h: Tensor, w: LayerWeights) -> Tensor:
    """One GRU step, as torch.nn.GRUCell.

    Arguments:
        x: (B, I) input; h: (B, H) hidden state; w: the cell's weights (``w_hr`` None).

    Returns:
        h_next: (B, H).
    """
    xg, b_hn = gru_input_projection(x.unsqueeze(0), w)
    return gru_recurrence_reference(xg, h, w.w_hh, b_hn)[0]


def rnn_cell_reference(x: Tensor, h: Tensor, w: LayerWeights, nonlinearity: Nonlinearity) -> Tensor:
    """One Elman RNN step, as torch.nn.RNNCell: arguments and result as ``gru_cell_reference``,
    with its ``nonlinearity`` ("tanh" or "relu")."""
    xg = input_projection(x.unsqueeze(0), w)
    return rnn_recurrence_reference(xg, h, w.w_hh, nonlinearity=nonlinearity)[0]
