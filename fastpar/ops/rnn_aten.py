"""The GRU and the Elman RNN on torch's native ATen kernels, as a ``torch.library`` custom op.

As ``lstm_aten`` does for the LSTM: outside torch.compile and without lengths (on CUDA with them
too), ``gru_stack_aten`` and ``rnn_stack_aten`` make torch.nn.GRU's / torch.nn.RNN's own call
(one ``torch._VF.gru``, ``rnn_tanh`` or ``rnn_relu`` for the whole stack, torch's autograd;
cuDNN on CUDA), so they cost what the module costs. Under torch.compile (which graph-breaks on
torch's RNN modules) and with lengths on CPU, every layer and direction runs through
``fastpar::rnn_aten_layer`` (a fake implementation and a registered autograd formula, so
``fullgraph=True`` holds):

* forward: the same ``torch._VF`` call on one layer and direction without autograd (packed
  through batch_sizes when there are lengths; lengths and reversal by
  ``aten_common.Arrangement``); for a GRU with large steps and no lengths, fastpar's own step
  loop, which keeps the gates for backward (see ``GRU_SAVED_GATES_MIN_MACS``);
* backward (``fastpar::rnn_aten_layer_backward``): every per-step factor from the saved input and
  outputs at once (for the GRU, from the kept gates or gates recomputed by two GEMMs over all
  steps), then two ops per step for the RNN and three for the GRU, and the weight gradients as
  single GEMMs after the loop, over the valid steps only. That backward has no derivative: a
  backward with create_graph=True (a double backward) recomputes the layer with the
  ``torch._VF`` call under autograd and differentiates it (``aten_common.double_backward_grads``).

torch has no oneDNN path for these cells (it runs them as aten ops under autograd on CPU), so
there is none here. The cells (``gru_cell_aten``, ``rnn_cell_aten``) are torch.nn.GRUCell's and
torch.nn.RNNCell's own ``torch._VF`` calls, which torch.compile traces without a break.

Glossary: T time, B batch, I input features, H hidden units, G gates (3 for the GRU in torch's
order r, z, n; 1 for the RNN).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from fastpar._checks import check_choice
from fastpar.ops import aten_common
from fastpar.ops.autocast_dtypes import autocast_carried_dtype
from fastpar.ops.func_transforms import ATEN_INSTEAD, check_not_differentiated
from fastpar.ops.reference import LayerWeights, stack_layers_h
from fastpar.ops.rnn_reference import Nonlinearity

Cell = Literal["gru", "rnn_tanh", "rnn_relu"]
CELLS: tuple[Cell, ...] = get_args(Cell)
NONLINEARITIES: tuple[Nonlinearity, ...] = get_args(Nonlinearity)

_VF_CALLS: dict[str, aten_common.VFCall] = {
    "gru": torch._VF.gru,
    "rnn_tanh": torch._VF.rnn_tanh,
    "rnn_relu": torch._VF.rnn_relu,
}


# The GRU's forward runs fastpar's own step loop, which keeps the gates for backward, where one
# step's recurrent and input GEMMs hold at least this many multiply-adds (B * 3H * (I + H)): there
# recomputing the gates (two GEMMs as large as the forward's) costs more than the loop's Python
# dispatch (eight ops a step). CPU, one thread, fwd+bwd against torch.nn.GRU: recomputing,
# 1.06-1.25x at B16 T64 I64 H256 L2, B32 T128 I128 H512 and B64 T32 I256 H1024; keeping the
# gates, 0.92-0.93x; below the bound (B8 T256 I32 H64, 0.15M) recomputing gives 0.47-0.50x.
# The crossing between those sizes was not measured.
GRU_SAVED_GATES_MIN_MACS = 1 << 20


def saves_gru_gates(cell: str, x: Tensor, w_hh: Tensor, lengths: Tensor | None) -> bool:
    """Whether the GRU layer's forward keeps its gates (see GRU_SAVED_GATES_MIN_MACS). Half types
    keep torch's loop, which rounds as torch.nn.GRU does (fastpar's is checked in float32/64)."""
    if cell != "gru" or lengths is not None or x.dtype not in (torch.float32, torch.float64):
        return False
    batch, hidden = x.shape[1], w_hh.shape[1]
    return batch * 3 * hidden * (x.shape[2] + hidden) >= GRU_SAVED_GATES_MIN_MACS


def _gru_forward_saving_gates(
    x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
    b_hh: Tensor | None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """torch.nn.GRU's forward over canonical (T, B, I) input, all rows running: out (T, B, H)
    and gates (T, B, 4, H) = (r, z, n, h W_hn^T + b_hn) of every step."""
    T, B, _ = x.shape
    H = w_hh.shape[1]
    xg = torch.nn.functional.linear(x, w_ih, b_ih).view(T, B, 3, H)
    gates = x.new_empty(T, B, 4, H)
    out = x.new_empty(T, B, H)
    hg = x.new_empty(B, 3 * H)
    w_hh_t = w_hh.t()
    h = h0
    for t in range(T):
        if b_hh is None:
            torch.mm(h, w_hh_t, out=hg)
        else:
            torch.addmm(b_hh, h, w_hh_t, out=hg)
        hg3, g = hg.view(B, 3, H), gates[t]
        torch.add(xg[t, :, :2], hg3[:, :2], out=g[:, :2]).sigmoid_()
        g[:, 3].copy_(hg3[:, 2])
        torch.addcmul(xg[t, :, 2], g[:, 0], hg3[:, 2], out=g[:, 2]).tanh_()
        # h_t = n + z * (h_{t-1} - n)
        h = torch.sub(h, g[:, 2], out=out[t]).mul_(g[:, 1]).add_(g[:, 2])
    return out, gates


@torch.library.custom_op("fastpar::rnn_aten_layer", mutates_args=())
def rnn_aten_layer_op(
    x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
    lengths: Tensor | None, reverse: bool, cell: str, save_gates: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """One layer and direction of a GRU (cell "gru") or RNN ("rnn_tanh", "rnn_relu").

    Returns out (T, B, H) (zeros past each length), h_n (B, H), and with save_gates (a GRU
    without lengths only) the gates for backward, (T, B, 4, H); otherwise (0,)."""
    check_choice("cell", cell, CELLS)
    aten_common.check_bias(b_ih, b_hh)
    arrange = aten_common.Arrangement(lengths, reverse, x.shape[0])
    if save_gates:
        if cell != "gru" or lengths is not None:
            raise ValueError(f"save_gates needs cell 'gru' without lengths, got cell {cell!r}")
        with torch.no_grad():
            out, gates = _gru_forward_saving_gates(arrange.apply(x), h0, w_ih, w_hh, b_ih, b_hh)
        return arrange.restore(out), out[-1].clone(), gates
    w = LayerWeights(w_ih, w_hh, b_ih, b_hh, None)
    out, (h_n,) = aten_common.vf_layer(_VF_CALLS[cell], x, (h0,), w, arrange)
    return out, h_n, x.new_empty(0)


@rnn_aten_layer_op.register_fake
def _(x: Tensor, h0: Tensor, *args: object) -> tuple[Tensor, Tensor, Tensor]:
    T, B, _ = x.shape
    H = h0.shape[1]
    gates_shape = (T, B, 4, H) if args[-1] else (0,)
    return x.new_empty(T, B, H), h0.new_empty(h0.shape), x.new_empty(gates_shape)


def _gru_gates(
    x: Tensor, h_prev: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
    b_hh: Tensor | None,
) -> Tensor:  # fmt: skip
    """The gates the forward computed, again, from the steps' x (N, I) and h_{t-1} (N, H):
    (N, 4, H) = (r, z, n, h W_hn^T + b_hn)."""
    N, H = h_prev.shape
    gates = x.new_empty(N, 4, H)
    xg = torch.nn.functional.linear(x, w_ih, b_ih).view(N, 3, H)
    hg = torch.nn.functional.linear(h_prev, w_hh, b_hh).view(N, 3, H)
    torch.add(xg[:, :2], hg[:, :2], out=gates[:, :2]).sigmoid_()
    gates[:, 3] = hg[:, 2]
    torch.addcmul(xg[:, 2], gates[:, 0], hg[:, 2], out=gates[:, 2]).tanh_()
    return gates


def _gru_factors(gates: Tensor, h_prev: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """From the gates (N, 4, H) (see ``_gru_gates``) and h_{t-1} (N, H): k (N, 3, H), the
    gradients of the recurrent pre-activations (h W_hh^T + b_hh, per gate) per unit of dh_t;
    z (N, H), dh_{t-1}'s direct share; and dn (N, H), the gradient of n's input pre-activation
    per unit of dh_t (k's n part is dn * r: the reset gate scales only the recurrent side)."""
    r, z, n, hn = gates.unbind(1)
    # In place where a buffer is free: these passes over (N, H) are memory-bound.
    k = torch.empty_like(gates[:, :3])
    one_minus_z = 1 - z
    dn = (n * n).neg_().add_(1).mul_(one_minus_z)  # (1 - n^2)(1 - z)
    torch.mul(hn, dn, out=k[:, 0]).mul_(r).mul_(1 - r)
    torch.sub(h_prev, n, out=k[:, 1]).mul_(z).mul_(one_minus_z)
    torch.mul(dn, r, out=k[:, 2])
    return k, z, dn


@aten_common.without_autocast
def _backward_recompute(
    dout: Tensor, dh_n: Tensor, x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor,
    b_ih: Tensor | None, b_hh: Tensor | None, lengths: Tensor | None, reverse: bool,
    out: Tensor, gates: Tensor, cell: str, need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """dx, dh0, dw_ih, dw_hh, db_ih, db_hh, in float32 for half types (torch's opmath); the
    GRU's gates are recomputed unless the forward kept them (``gates`` not empty).

    Works on the valid steps only (``Arrangement.pack``, N rows): with lengths, the GEMMs and
    elementwise passes skip the padding."""
    dtype = aten_common.opmath_dtype(x.dtype)
    arrange = aten_common.Arrangement(lengths, reverse, x.shape[0])
    T, B, _ = x.shape
    H = w_hh.shape[1]
    w_ih, w_hh = w_ih.to(dtype), w_hh.to(dtype)
    b_ih = b_ih.to(dtype) if b_ih is not None else None
    b_hh = b_hh.to(dtype) if b_hh is not None else None
    xc, hs, dhs = aten_common.backward_inputs(arrange, x, h0, out, dout, dh_n)
    x_p, h_prev = arrange.pack(xc), arrange.pack(hs[:-1])
    carry: Tensor | None = None  # the GRU's z: dh_{t-1} += dh_t * z_t
    if cell == "gru":
        if gates.numel():
            gates = gates.to(dtype).view(-1, 4, H)  # no lengths: the packed layout is a view
        else:
            gates = _gru_gates(x_p, h_prev, w_ih, w_hh, b_ih, b_hh)
        k, carry, dn = _gru_factors(gates, h_prev)
    else:
        h = arrange.pack(hs[1:])
        k = ((1 - h * h) if cell == "rnn_tanh" else (h > 0).to(dtype)).unsqueeze(1)
    G = k.shape[1]
    dg = torch.empty_like(k)  # (N, G, H): gradients of each step's recurrent pre-activations
    sizes = arrange.batch_sizes or [B] * T
    end = dg.shape[0]
    for t in range(T - 1, -1, -1):
        bs = sizes[t]
        if bs == 0:
            continue
        rows = slice(end - bs, end)  # step t's rows in the packed layout
        end -= bs
        dh, prev = dhs[t + 1], dhs[t]  # of h_t, and of h_{t-1}
        if bs < B:
            dh, prev = dh[:bs], prev[:bs]
        torch.mul(dh.unsqueeze(1), k[rows], out=dg[rows])
        prev.addmm_(dg[rows].view(bs, G * H), w_hh)
        if carry is not None:
            prev.addcmul_(dh, carry[rows])

    dgh = dg.view(-1, G * H)  # of h W_hh^T + b_hh
    dgx = dgh  # of x W_ih^T + b_ih
    if cell == "gru":  # the n part differs
        dgx = dg.clone()
        torch.mul(arrange.pack(dhs[1:]), dn, out=dgx[:, 2])
        dgx = dgx.view(-1, G * H)
    dw_ih = (dgx.t() @ x_p).to(x.dtype)
    dw_hh = (dgh.t() @ h_prev).to(x.dtype)
    db_ih, db_hh = x.new_empty(0), x.new_empty(0)
    if b_ih is not None:
        db_ih, db_hh = dgx.sum(0).to(x.dtype), dgh.sum(0).to(x.dtype)
        if cell != "gru":
            db_hh = db_hh.clone()  # outputs of a custom op may not alias each other
    dx = x.new_empty(0)
    if need_dx:
        dx = arrange.restore(arrange.unpack(dgx @ w_ih, T)).to(x.dtype)
    dh0 = arrange.unrows(dhs[0]).to(h0.dtype)
    return dx, dh0, dw_ih, dw_hh, db_ih, db_hh


@torch.library.custom_op("fastpar::rnn_aten_layer_backward", mutates_args=())
def rnn_aten_layer_backward_op(
    dout: Tensor, dh_n: Tensor, x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor,
    b_ih: Tensor | None, b_hh: Tensor | None, lengths: Tensor | None, reverse: bool, out: Tensor,
    gates: Tensor, cell: str, need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Returns dx ((0,) unless need_dx), dh0, dw_ih, dw_hh, db_ih, db_hh ((0,) without biases)."""
    return _backward_recompute(
        dout, dh_n, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, out, gates, cell, need_dx
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
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, cell, _save = inputs
    out, _, gates = output
    ctx.save_for_backward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, out, gates)
    ctx.reverse, ctx.cell = reverse, cell
    ctx.mark_non_differentiable(gates)  # without this autograd fills a zero "gradient" as large
    ctx.set_materialize_grads(False)


def _backward(ctx: Any, dout: Tensor | None, dh_n: Tensor | None,
              _dgates: Any) -> tuple[Tensor | None, ...]:  # fmt: skip
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, out, gates = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout
    dh_n = torch.zeros_like(h0) if dh_n is None else dh_n
    if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable
        arrange = aten_common.Arrangement(lengths, ctx.reverse, x.shape[0])
        grads = aten_common.double_backward_grads(
            _VF_CALLS[ctx.cell], (x, h0, w_ih, w_hh, b_ih, b_hh), 1, (dout, dh_n),
            ctx.needs_input_grad, arrange,
        )  # fmt: skip
        return (*grads, None, None, None, None)
    dx, dh0, dw_ih, dw_hh, db_ih, db_hh = rnn_aten_layer_backward_op(
        dout, dh_n, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, ctx.reverse, out, gates, ctx.cell,
        ctx.needs_input_grad[0],
    )  # fmt: skip
    has_bias = b_ih is not None
    return (
        dx if ctx.needs_input_grad[0] else None, dh0, dw_ih, dw_hh,
        db_ih if has_bias else None, db_hh if has_bias else None, None, None, None, None,
    )  # fmt: skip


rnn_aten_layer_op.register_autograd(_backward, setup_context=_setup_context)


def rnn_layer_aten(
    cell: Cell, x: Tensor, h0: Tensor, w: LayerWeights, lengths: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """One layer and direction of torch.nn.GRU (cell "gru") or torch.nn.RNN ("rnn_tanh",
    "rnn_relu") on torch's kernels, through the custom op.

    Arguments:
        x: (T, B, I) layer input; h0: (B, H); w: the layer's weights (w_hr None).
        lengths: (B,) valid lengths (>= 1), or None (all T valid).
        reverse: process each sequence from its last valid step down to 0.

    Returns:
        out: (T, B, H) hidden state after every step, zero past each length; h_n: (B, H), the
        state after each sequence's last step. Under autocast both in its dtype; the stacks
        give them torch's (``autocast_dtypes``).
    """
    x, (h0,), w = aten_common.autocast_layer(x, (h0,), w)
    differentiable = aten_common.needs_grad(x, h0, *w)
    check_not_differentiated(
        "fastpar::rnn_aten_layer", differentiable=differentiable,
        instead=ATEN_INSTEAD,
    )  # fmt: skip
    save = differentiable and saves_gru_gates(cell, x, w.w_hh, lengths)
    out, h_n, _ = rnn_aten_layer_op(
        x, h0, w.w_ih, w.w_hh, w.b_ih, w.b_hh, lengths, reverse, cell, save
    )
    return out, h_n


def _stack(
    cell: Cell, x: Tensor, h0: Tensor, weights: Sequence[LayerWeights], *, num_layers: int,
    bidirectional: bool, dropout: float, training: bool, lengths: Tensor | None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    if aten_common.eager_whole_stack(x, lengths):
        out, h_n = aten_common.vf_whole_stack(
            _VF_CALLS[cell], x, (h0,), weights, num_layers=num_layers, bidirectional=bidirectional,
            dropout=dropout, training=training, lengths=lengths,
        )  # fmt: skip
        return out, h_n

    def run_layer(
        layer_input: Tensor, h0: Tensor, w: LayerWeights, reverse: bool
    ) -> tuple[Tensor, Tensor]:
        return rnn_layer_aten(cell, layer_input, h0, w, lengths, reverse)

    return stack_layers_h(
        x, h0, weights, run_layer, num_layers=num_layers, bidirectional=bidirectional,
        dropout=dropout, training=training,
        carried=autocast_carried_dtype(x, h0 if cell == "gru" else None),
    )  # fmt: skip


def gru_stack_aten(
    x: Tensor, h0: Tensor, weights: Sequence[LayerWeights], *, num_layers: int,
    bidirectional: bool, dropout: float = 0.0, training: bool = False,
    lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
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
    x: Tensor, h0: Tensor, weights: Sequence[LayerWeights], *, nonlinearity: Nonlinearity,
    num_layers: int, bidirectional: bool, dropout: float = 0.0, training: bool = False,
    lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
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
