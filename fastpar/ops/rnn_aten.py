"""The GRU and the Elman RNN on torch's native ATen kernels, as a ``torch.library`` custom op.

As ``lstm_aten`` does for the LSTM: outside torch.compile and without lengths, ``gru_stack_aten``
and ``rnn_stack_aten`` make torch.nn.GRU's / torch.nn.RNN's own call (one ``torch._VF.gru``,
``rnn_tanh`` or ``rnn_relu`` for the whole stack, torch's autograd), so they cost what the
module costs. Under torch.compile (which graph-breaks on torch's RNN modules) and with lengths,
every layer and direction runs through ``fastpar::rnn_aten_layer`` (a fake implementation and a
registered autograd formula, so ``fullgraph=True`` holds):

* forward: the same ``torch._VF`` call on one layer and direction without autograd (packed
  through batch_sizes when there are lengths; lengths and reversal by
  ``aten_common.Arrangement``);
* backward (``fastpar::rnn_aten_layer_backward``): every per-step factor from the saved input and
  outputs at once (for the GRU, the gates from two GEMMs over all steps), then two ops per step
  for the RNN and three for the GRU, and the weight gradients as single GEMMs after the loop.

torch has no oneDNN path for these cells (it runs them as aten ops under autograd on CPU), so
there is none here. The cells (``gru_cell_aten``, ``rnn_cell_aten``) are torch's fused
``torch._VF`` cell calls, which torch.compile traces without a break.

Glossary: T time, B batch, I input features, H hidden units, G gates (3 for the GRU in torch's
order r, z, n; 1 for the RNN).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from fastpar._checks import check_choice
from fastpar.ops.aten_common import (
    Arrangement,
    VFCall,
    autocast_layer,
    backward_inputs,
    check_bias,
    eager_whole_stack,
    opmath_dtype,
    vf_layer,
    vf_whole_stack,
)
from fastpar.ops.reference import LayerWeights, stack_layers
from fastpar.ops.rnn_reference import Nonlinearity

Cell = Literal["gru", "rnn_tanh", "rnn_relu"]
NONLINEARITIES: tuple[Nonlinearity, ...] = ("tanh", "relu")


_VF_CALLS: dict[str, VFCall] = {
    "gru": torch._VF.gru,
    "rnn_tanh": torch._VF.rnn_tanh,
    "rnn_relu": torch._VF.rnn_relu,
}


@torch.library.custom_op("fastpar::rnn_aten_layer", mutates_args=())
def rnn_aten_layer_op(
    x: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
    cell: str,
) -> tuple[Tensor, Tensor]:
    """One layer and direction of a GRU (cell "gru") or RNN ("rnn_tanh", "rnn_relu").

    Returns out (T, B, H) (zeros past each length) and h_n (B, H)."""
    check_bias(b_ih, b_hh)
    arrange = Arrangement(lengths, reverse, x.shape[0])
    w = LayerWeights(w_ih, w_hh, b_ih, b_hh, None)
    out, (h_n,) = vf_layer(_VF_CALLS[cell], x, (h0,), w, arrange)
    return out, h_n


@rnn_aten_layer_op.register_fake
def _(x: Tensor, h0: Tensor, *args: object) -> tuple[Tensor, Tensor]:
    T, B, _ = x.shape
    return x.new_empty(T, B, h0.shape[1]), h0.new_empty(h0.shape)


def _gru_factors(
    x: Tensor, h_prev: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
    b_hh: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """From x (T, B, I) and h_prev (T, B, H): k (T, B, 3, H), the gradients of the recurrent
    pre-activations (h W_hh^T + b_hh, per gate) per unit of dh_t; z (T, B, H), dh_{t-1}'s direct
    share; and dn (T, B, H), the input pre-activation gradient of n per unit of dh_t (k's n part
    is dn * r)."""
    T, B, H = h_prev.shape
    xg = torch.nn.functional.linear(x, w_ih, b_ih).view(T, B, 3, H)
    hg = torch.nn.functional.linear(h_prev, w_hh, b_hh).view(T, B, 3, H)
    rz = (xg[:, :, :2] + hg[:, :, :2]).sigmoid_()
    r, z = rz.unbind(2)
    hn = hg[:, :, 2]
    n = torch.addcmul(xg[:, :, 2], r, hn).tanh_()
    dn = (1 - z) * (1 - n * n)
    k = torch.empty_like(hg)
    torch.mul(dn * hn, r * (1 - r), out=k[:, :, 0])
    torch.mul((h_prev - n) * z, 1 - z, out=k[:, :, 1])
    torch.mul(dn, r, out=k[:, :, 2])
    return k, z, dn


def _backward_recompute(
    dout: Tensor, dh_n: Tensor, x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor,
    b_ih: Tensor | None, b_hh: Tensor | None, lengths: Tensor | None, reverse: bool,
    out: Tensor, cell: str, need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """dx, dh0, dw_ih, dw_hh, db_ih, db_hh, in float32 for half types (torch's opmath)."""
    dtype = opmath_dtype(x.dtype)
    arrange = Arrangement(lengths, reverse, x.shape[0])
    T, B, _ = x.shape
    H = w_hh.shape[1]
    w_ih, w_hh = w_ih.to(dtype), w_hh.to(dtype)
    b_ih = b_ih.to(dtype) if b_ih is not None else None
    b_hh = b_hh.to(dtype) if b_hh is not None else None
    xc, hs, dhs = backward_inputs(arrange, x, h0, out, dout, dh_n)
    h_prev = hs[:-1]
    carry: Tensor | None = None  # the GRU's z: dh_{t-1} += dh_t * z_t
    if cell == "gru":
        k, carry, dn = _gru_factors(xc, h_prev, w_ih, w_hh, b_ih, b_hh)
    elif cell == "rnn_tanh":
        k = (1 - hs[1:] * hs[1:]).unsqueeze(2)
    else:
        k = (hs[1:] > 0).to(dtype).unsqueeze(2)
    G = k.shape[2]
    # dg[t]: gradients of step t's recurrent pre-activations; rows a step does not run stay 0.
    dg = x.new_zeros(T, B, G, H, dtype=dtype) if lengths is not None else torch.empty_like(k)
    sizes = arrange.batch_sizes or [B] * T
    for t in range(T - 1, -1, -1):
        bs = sizes[t]
        dh, dg_t, k_t, prev = dhs[t + 1], dg[t], k[t], dhs[t]  # prev: gradient of h_{t-1}
        if bs < B:
            dh, dg_t, k_t, prev = dh[:bs], dg_t[:bs], k_t[:bs], prev[:bs]
        torch.mul(dh.unsqueeze(1), k_t, out=dg_t)
        prev.addmm_(dg_t.view(bs, G * H), w_hh)
        if carry is not None:
            prev.addcmul_(dh, carry[t][:bs] if bs < B else carry[t])

    dgh = dg.view(T * B, G * H)  # of h W_hh^T + b_hh
    if cell == "gru":  # of x W_ih^T + b_ih: the n part differs (r scales only the h side)
        dgx4 = dg.clone()
        torch.mul(dhs[1:], dn, out=dgx4[:, :, 2])
        dgx = dgx4.view(T * B, G * H)
    else:
        dgx = dgh
    dw_ih = (dgx.t() @ xc.reshape(T * B, -1)).to(x.dtype)
    dw_hh = (dgh.t() @ h_prev.reshape(T * B, H)).to(x.dtype)
    db_ih, db_hh = x.new_empty(0), x.new_empty(0)
    if b_ih is not None:
        db_ih, db_hh = dgx.sum(0).to(x.dtype), dgh.sum(0).to(x.dtype)
        if cell != "gru":
            db_hh = db_hh.clone()  # outputs of a custom op may not alias each other
    dx = x.new_empty(0)
    if need_dx:
        dx = arrange.restore((dgx @ w_ih).view(T, B, -1)).to(x.dtype)
    dh0 = arrange.unrows(dhs[0]).to(h0.dtype)
    return dx, dh0, dw_ih, dw_hh, db_ih, db_hh


@torch.library.custom_op("fastpar::rnn_aten_layer_backward", mutates_args=())
def rnn_aten_layer_backward_op(
    dout: Tensor,
    dh_n: Tensor,
    x: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
    out: Tensor,
    cell: str,
    need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns dx ((0,) unless need_dx), dh0, dw_ih, dw_hh, db_ih, db_hh ((0,) without biases)."""
    return _backward_recompute(
        dout, dh_n, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, out, cell, need_dx
    )


@rnn_aten_layer_backward_op.register_fake
def _(dout: Tensor, dh_n: Tensor, x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor,
      b_ih: Tensor | None, b_hh: Tensor | None, *args: object) -> tuple[Tensor, ...]:  # fmt: skip
    need_dx = args[-1]
    bias_shape = (w_ih.shape[0],) if b_ih is not None else (0,)
    return (
        x.new_empty(x.shape if need_dx else (0,)),
        h0.new_empty(h0.shape),
        w_ih.new_empty(w_ih.shape),
        w_hh.new_empty(w_hh.shape),
        w_ih.new_empty(bias_shape),
        w_ih.new_empty(bias_shape),
    )


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, cell = inputs
    ctx.save_for_backward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, output[0])
    ctx.reverse, ctx.cell = reverse, cell
    ctx.set_materialize_grads(False)


def _backward(ctx: Any, dout: Tensor | None, dh_n: Tensor | None) -> tuple[Tensor | None, ...]:
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, out = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout
    dh_n = torch.zeros_like(h0) if dh_n is None else dh_n
    dx, dh0, dw_ih, dw_hh, db_ih, db_hh = rnn_aten_layer_backward_op(
        dout, dh_n, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, ctx.reverse, out, ctx.cell,
        ctx.needs_input_grad[0],
    )  # fmt: skip
    has_bias = b_ih is not None
    return (
        dx if ctx.needs_input_grad[0] else None, dh0, dw_ih, dw_hh,
        db_ih if has_bias else None, db_hh if has_bias else None, None, None, None,
    )  # fmt: skip


rnn_aten_layer_op.register_autograd(_backward, setup_context=_setup_context)


def rnn_layer_aten(
    cell: Cell,
    x: Tensor,
    h0: Tensor,
    w: LayerWeights,
    lengths: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """One layer and direction of torch.nn.GRU (cell "gru") or torch.nn.RNN ("rnn_tanh",
    "rnn_relu") on torch's kernels, through the custom op.

    Arguments:
        x: (T, B, I) layer input; h0: (B, H); w: the layer's weights (w_hr None).
        lengths: (B,) valid lengths (>= 1), or None (all T valid).
        reverse: process each sequence from its last valid step down to 0.

    Returns:
        out: (T, B, H) hidden state after every step, zero past each length; h_n: (B, H), the
        state after each sequence's last step.
    """
    x, (h0,), w = autocast_layer(x, (h0,), w)
    return rnn_aten_layer_op(x, h0, w.w_ih, w.w_hh, w.b_ih, w.b_hh, lengths, reverse, cell)


def _stack(
    cell: Cell, x: Tensor, h0: Tensor, weights: Sequence[LayerWeights], *, num_layers: int,
    bidirectional: bool, dropout: float, training: bool, lengths: Tensor | None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    if eager_whole_stack(lengths):
        out, h_n = vf_whole_stack(
            _VF_CALLS[cell], x, (h0,), weights, num_layers=num_layers, bidirectional=bidirectional,
            dropout=dropout, training=training,
        )  # fmt: skip
        return out, h_n

    def run_layer(
        layer_input: Tensor, states: tuple[Tensor, ...], w: LayerWeights, reverse: bool
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        out, h_n = rnn_layer_aten(cell, layer_input, states[0], w, lengths, reverse)
        return out, (h_n,)

    out, (h_n,) = stack_layers(
        x, (h0,), weights, run_layer, num_layers=num_layers, bidirectional=bidirectional,
        dropout=dropout, training=training,
    )  # fmt: skip
    return out, h_n


def gru_stack_aten(
    x: Tensor,
    h0: Tensor,
    weights: Sequence[LayerWeights],
    *,
    num_layers: int,
    bidirectional: bool,
    dropout: float = 0.0,
    training: bool = False,
    lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``rnn_reference.gru_stack`` on torch's kernels: same arguments and results.

    Arguments:
        x: (T, B, I) input; h0: (L*D, B, H); weights: L*D LayerWeights with torch.nn.GRU's
            shapes, layer-major then direction; dropout, training: as torch.nn.GRU (one mask per
            layer output but the last); lengths: (B,) valid lengths, or None.

    Returns:
        output: (T, B, D*H) of the last layer (zero past each length); h_n: (L*D, B, H).
    """
    return _stack(
        "gru", x, h0, weights, num_layers=num_layers, bidirectional=bidirectional,
        dropout=dropout, training=training, lengths=lengths,
    )  # fmt: skip


def rnn_stack_aten(
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
) -> tuple[Tensor, Tensor]:
    """``rnn_reference.rnn_stack`` on torch's kernels: arguments and results as
    ``gru_stack_aten``, with torch.nn.RNN's ``nonlinearity`` ("tanh" or "relu")."""
    check_choice("nonlinearity", nonlinearity, NONLINEARITIES)
    cell: Cell = "rnn_tanh" if nonlinearity == "tanh" else "rnn_relu"
    return _stack(
        cell, x, h0, weights, num_layers=num_layers, bidirectional=bidirectional,
        dropout=dropout, training=training, lengths=lengths,
    )  # fmt: skip


def gru_cell_aten(x: Tensor, h: Tensor, w: LayerWeights) -> Tensor:
    """One GRU step, torch.nn.GRUCell's own call (``torch._VF.gru_cell``).

    Arguments:
        x: (B, I) input; h: (B, H) hidden state; w: the cell's weights (w_hr None).

    Returns:
        h_next: (B, H).
    """
    return torch._VF.gru_cell(x, h, w.w_ih, w.w_hh, w.b_ih, w.b_hh)


def rnn_cell_aten(x: Tensor, h: Tensor, w: LayerWeights, nonlinearity: Nonlinearity) -> Tensor:
    """One Elman RNN step, torch.nn.RNNCell's own call (``torch._VF.rnn_tanh_cell`` or
    ``rnn_relu_cell``); arguments and result as ``gru_cell_aten``."""
    check_choice("nonlinearity", nonlinearity, NONLINEARITIES)
    vf = torch._VF.rnn_tanh_cell if nonlinearity == "tanh" else torch._VF.rnn_relu_cell
    return vf(x, h, w.w_ih, w.w_hh, w.b_ih, w.b_hh)
