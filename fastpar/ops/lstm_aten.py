"""One LSTM layer and direction on torch's native ATen kernels, as a ``torch.library`` custom op.

torch.compile graph-breaks on torch's RNN modules; wrapped in ``fastpar::lstm_aten_layer`` (with
a fake implementation and a registered autograd formula) the same kernels compile with
``fullgraph=True``. Two paths, chosen exactly where ``torch.nn.LSTM`` chooses them:

* oneDNN (CPU float32, bfloat16 where the CPU supports it; no projection, no lengths):
  ``aten.mkldnn_rnn_layer`` and ``aten.mkldnn_rnn_layer_backward``, the kernels torch.nn.LSTM runs
  on CPU, so results and speed are torch's. The custom op keeps oneDNN's workspace for backward.
* everything else (float64, float16, proj_size, lengths, other devices): the forward is torch's
  fused C++ loop (``torch._VF.lstm`` on one layer and direction, packed through batch_sizes when
  there are lengths); the backward recomputes what it needs from the saved inputs and outputs
  (all gate pre-activations in one GEMM over the saved h_{t-1}, c_t by one addcmul per step),
  runs four or five ops per step, and takes the weight gradients as single GEMMs after the loop.

Neither backward has a derivative: a backward with create_graph=True (a double backward)
recomputes the layer with ``torch._VF.lstm`` under autograd and differentiates it
(``aten_common.double_backward_grads``), as torch.nn.LSTM's own double backward does.

Outside torch.compile, ``lstm_stack_aten`` without lengths (and, on CUDA, with them) makes
torch.nn.LSTM's own call (one ``torch._VF.lstm`` for the whole stack, torch's autograd; cuDNN on
CUDA): no op is needed there, and it costs nothing more than torch.nn.LSTM. The op serves
compiled graphs, and packed input on CPU (``aten_common.eager_whole_stack``).

Lengths and reversal are handled by ``aten_common.Arrangement`` (the batch sorted by length,
each sequence's valid steps reversed for the reverse direction), shared with ``rnn_aten``.

Glossary: T time, B batch, I input features, H hidden units, P size of h (proj_size or H),
G = 4 gates in torch's order (i, f, g, o).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastpar.ops.aten_common import (
    Arrangement,
    autocast_layer,
    backward_inputs,
    check_bias,
    double_backward_grads,
    eager_whole_stack,
    needs_grad,
    opmath_dtype,
    vf_layer,
    vf_whole_stack,
    without_autocast,
)
from fastpar.ops.autocast_dtypes import autocast_carried_dtype
from fastpar.ops.func_transforms import ATEN_INSTEAD, check_not_differentiated
from fastpar.ops.reference import LayerWeights, stack_layers

_ONEDNN_LSTM_MODE = 2  # ideep::rnn_kind::LSTM, the `mode` argument of aten.mkldnn_rnn_layer


def uses_onednn(x: Tensor, w_hr: Tensor | None, lengths: Tensor | None) -> bool:
    """Whether torch.nn.LSTM would run this layer on oneDNN (aten's ``use_mkldnn``)."""
    if x.device.type != "cpu" or w_hr is not None or lengths is not None or x.numel() == 0:
        return False
    if not (torch.backends.mkldnn.is_available() and torch._C._get_mkldnn_enabled()):
        return False
    if x.dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return x.dtype == torch.float32


def autocast_runs_onednn(x: Tensor, w_hr: Tensor | None, lengths: Tensor | None) -> bool:
    """Whether torch.nn.LSTM under autocast runs this stack on oneDNN, whose layer autocast
    casts whole (input, states and weights): it then returns output, h_n and c_n in autocast's
    dtype, where its other paths cast op by op (c_n stays in the state's dtype there)."""
    return torch.is_autocast_enabled(x.device.type) and uses_onednn(x, w_hr, lengths)


def _onednn_forward(
    x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
    b_hh: Tensor | None, reverse: bool, keep_workspace: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """aten.mkldnn_rnn_layer: out (T, B, H), h_n and c_n (1, B, H), workspace (uint8)."""
    has_bias = b_ih is not None and b_hh is not None
    zero = w_ih.new_zeros(w_ih.shape[0])
    # oneDNN keeps its workspace only while grad mode is on (off inside compiled graphs).
    with torch.set_grad_enabled(keep_workspace):
        out, h_n, c_n, ws = torch.ops.aten.mkldnn_rnn_layer(
            x.detach().contiguous(), w_ih.detach(), w_hh.detach(),
            b_ih.detach() if has_bias else zero, b_hh.detach() if has_bias else zero,
            h0.detach().unsqueeze(0).contiguous(), c0.detach().unsqueeze(0).contiguous(),
            reverse, [], _ONEDNN_LSTM_MODE, w_hh.shape[1], 1, has_bias, False, False,
            keep_workspace,
        )  # fmt: skip
    return out, h_n, c_n, ws if ws is not None else x.new_empty(0, dtype=torch.uint8)


@torch.library.custom_op("fastpar::lstm_aten_layer", mutates_args=())
def lstm_aten_layer_op(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    w_hr: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
    keep_workspace: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns out (T, B, P) (zeros past each length), h_n (B, P), c_n (B, H), and oneDNN's
    workspace for backward (uint8; empty on the other path or without keep_workspace)."""
    check_bias(b_ih, b_hh)
    if uses_onednn(x, w_hr, lengths):
        out, h_n, c_n, ws = _onednn_forward(
            x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, keep_workspace
        )
        return out, h_n[0], c_n[0], ws
    arrange = Arrangement(lengths, reverse, x.shape[0])
    w = LayerWeights(w_ih, w_hh, b_ih, b_hh, w_hr)
    out, (h_n, c_n) = vf_layer(torch._VF.lstm, x, (h0, c0), w, arrange)
    return out, h_n, c_n, x.new_empty(0, dtype=torch.uint8)


@lstm_aten_layer_op.register_fake
def _(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
      b_hh: Tensor | None, w_hr: Tensor | None, lengths: Tensor | None, reverse: bool,
      keep_workspace: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    ws_size = 0
    if keep_workspace and uses_onednn(x, w_hr, lengths):
        ws_size = torch.library.get_ctx().new_dynamic_size()  # oneDNN decides its size
    T, B, _ = x.shape
    return (
        x.new_empty(T, B, h0.shape[1]),
        h0.new_empty(h0.shape),
        c0.new_empty(c0.shape),
        x.new_empty(ws_size, dtype=torch.uint8),
    )


class _Grads(NamedTuple):
    dx: Tensor  # (T, B, I), or (0,) when not asked for
    dh0: Tensor  # (B, P)
    dc0: Tensor  # (B, H)
    dw_ih: Tensor  # (4H, I)
    dw_hh: Tensor  # (4H, P)
    db: Tensor  # (4H,): the gradient of b_ih and of b_hh; (0,) without biases
    dw_hr: Tensor  # (P, H); (0,) without a projection


class InputPass(NamedTuple):
    """The gradients of a layer's inputs and states, and what its weight gradients need."""

    dx: Tensor  # (T, B, I), or (0,) when not asked for
    dh0: Tensor  # (B, P)
    dc0: Tensor  # (B, H)
    dw_hr: Tensor  # (P, H); (0,) without a projection
    dgates: Tensor  # (N, 4H) opmath: gate pre-activation gradients, rows in x_rows' order
    x_rows: Tensor  # (N, I) opmath: the layer input (N: the valid rows; T*B without lengths)
    h_prev: Tensor  # (N, P) opmath: h_{t-1} of each row


@without_autocast
def lstm_aten_layer_weight_grads(
    grads: InputPass, has_bias: bool, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """The weight pass of a split backward: dW_ih (4H, I), dW_hh (4H, P) and db (4H,) (the
    gradient of b_ih and of b_hh; (0,) without biases) in ``dtype``, as GEMMs over all rows."""
    dg = grads.dgates
    dw_ih = (dg.t() @ grads.x_rows).to(dtype)
    dw_hh = (dg.t() @ grads.h_prev).to(dtype)
    db = dg.sum(0).to(dtype) if has_bias else dg.new_empty(0, dtype=dtype)
    return dw_ih, dw_hh, db


def _backward_recompute(
    dout: Tensor, dh_n: Tensor, dc_n: Tensor, x: Tensor, h0: Tensor, c0: Tensor,
    w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None, w_hr: Tensor | None,
    lengths: Tensor | None, reverse: bool, out: Tensor, need_dx: bool,
) -> _Grads:  # fmt: skip
    """The backward of the non-oneDNN path, in float32 for half types (torch's opmath)."""
    grads = lstm_aten_layer_input_pass(
        dout, dh_n, dc_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, out,
        need_dx,
    )  # fmt: skip
    dw_ih, dw_hh, db = lstm_aten_layer_weight_grads(grads, b_ih is not None, x.dtype)
    return _Grads(grads.dx, grads.dh0, grads.dc0, dw_ih, dw_hh, db, grads.dw_hr)


@without_autocast
def lstm_aten_layer_input_pass(
    dout: Tensor, dh_n: Tensor, dc_n: Tensor, x: Tensor, h0: Tensor, c0: Tensor,
    w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None, w_hr: Tensor | None,
    lengths: Tensor | None, reverse: bool, out: Tensor, need_dx: bool,
) -> InputPass:  # fmt: skip
    """The input pass of the recomputing backward (the non-oneDNN path; any dtype and device):
    arguments as ``lstm_aten_layer_backward_op``; ``lstm_aten_layer_weight_grads`` completes it
    (the projection's gradient is computed here)."""
    dtype = opmath_dtype(x.dtype)
    arrange = Arrangement(lengths, reverse, x.shape[0])
    T, B, _ = x.shape
    H, P = w_hh.shape[0] // 4, w_hh.shape[1]
    w_ih, w_hh = w_ih.to(dtype), w_hh.to(dtype)
    w_hr = w_hr.to(dtype) if w_hr is not None else None
    xc, hs, dhs = backward_inputs(arrange, x, h0, out, dout, dh_n)
    dhs = dhs[1:]  # dhs[t]: of h_t, dh_n included
    c0c, dc_n = arrange.rows(c0).to(dtype), arrange.rows(dc_n).to(dtype)
    sizes = arrange.batch_sizes or [B] * T

    # Gate activations for every step at once, from the saved h_{t-1}: the GEMMs (here and in
    # the weight pass) over the valid rows only (N of T * B with lengths; zeros past them).
    h_prev, x_rows = arrange.pack(hs[:-1]), arrange.pack(xc)
    bias = (b_ih.to(dtype) + b_hh.to(dtype)) if b_ih is not None else None
    gate_rows = F.linear(x_rows, w_ih, bias).addmm_(h_prev, w_hh.t())
    gates = arrange.unpack(gate_rows, T).view(T, B, 4, H)
    del gate_rows
    gates[:, :, 0:2].sigmoid_()
    gates[:, :, 2].tanh_()
    gates[:, :, 3].sigmoid_()
    i, f, g, o = gates.unbind(2)
    ig = i * g
    # c[t + 1] = c_t, c[0] = c_0; zeros where a finished row is never written (lengths).
    c = (
        x.new_zeros(T + 1, B, H, dtype=dtype)
        if lengths is not None
        else x.new_empty(T + 1, B, H, dtype=dtype)
    )
    c[0] = c0c
    c_steps, f_steps, ig_steps = c.unbind(0), f.unbind(0), ig.unbind(0)
    for t, bs in enumerate(sizes):
        if bs == B:
            torch.addcmul(ig_steps[t], f_steps[t], c_steps[t], out=c_steps[t + 1])
        else:
            torch.addcmul(
                ig_steps[t][:bs], f_steps[t][:bs], c_steps[t][:bs], out=c_steps[t + 1][:bs]
            )
    tanh_c = c[1:].tanh()
    dc_from_dh = o * (1 - tanh_c * tanh_c)  # dc_t += dh_t * this       (T, B, H)
    do_from_dh = tanh_c * o * (1 - o)  # d(o pre-activation) = dh_t * this
    # dc_t times these gives [dc_{t-1}, di, df, dg] (pre-activation gradients of i, f, g).
    from_dc = x.new_empty(T, B, 4, H, dtype=dtype)
    from_dc[:, :, 0] = f
    torch.mul(g * i, 1 - i, out=from_dc[:, :, 1])
    torch.mul(c[:-1] * f, 1 - f, out=from_dc[:, :, 2])
    torch.mul(i, 1 - g * g, out=from_dc[:, :, 3])
    del gates, ig, tanh_c

    # work[t] = [dc_{t-1} (carried into step t-1), di, df, dg, do] of step t; work[T] holds
    # dc_n, and for a sequence of length L, its dc_n enters at work[L].
    if lengths is None:  # every step writes all of work[t]
        work = x.new_empty(T + 1, B, 5, H, dtype=dtype)
        work[T].zero_()
    else:  # finished rows must hold zero gate gradients
        work = x.new_zeros(T + 1, B, 5, H, dtype=dtype)
    dgates = work[:, :, 1:].flatten(2)  # (T + 1, B, 4H) view, row stride 5H
    if lengths is None:
        work[T, :, 0] = dc_n
    else:
        last = arrange.sorted_lengths.to(x.device)
        work[last, torch.arange(B, device=x.device), 0] = dc_n
    dh_all = x.new_zeros(T, B, P, dtype=dtype) if w_hr is not None else None
    work_t, dgates_t, dhs_t = work.unbind(0), dgates.unbind(0), dhs.unbind(0)
    a_t, b_t, k_t = dc_from_dh.unbind(0), do_from_dh.unbind(0), from_dc.unbind(0)
    for t in range(T - 1, -1, -1):
        bs = sizes[t]
        full = bs == B
        dh_in, dg_next = (
            (dhs_t[t], dgates_t[t + 1]) if full else (dhs_t[t][:bs], dgates_t[t + 1][:bs])
        )
        if dh_all is None:
            dh = torch.addmm(dh_in, dg_next, w_hh)
        else:
            dh = torch.addmm(dh_in, dg_next, w_hh, out=dh_all[t] if full else dh_all[t][:bs])
            dh = dh @ w_hr  # into o * tanh(c), before the projection
        cur = work_t[t] if full else work_t[t][:bs]
        nxt = work_t[t + 1] if full else work_t[t + 1][:bs]
        a, b_, k = (a_t[t], b_t[t], k_t[t]) if full else (a_t[t][:bs], b_t[t][:bs], k_t[t][:bs])
        dc = torch.addcmul(nxt[:, 0], dh, a)
        torch.mul(dc.unsqueeze(1), k, out=cur[:, 0:4])
        torch.mul(dh, b_, out=cur[:, 4])

    dg_all = arrange.pack(dgates[:T])
    dh0 = arrange.unrows(dgates[0] @ w_hh).to(h0.dtype)
    dc0 = arrange.unrows(work[0, :, 0]).to(c0.dtype)
    dw_hr = x.new_empty(0)
    if w_hr is not None and dh_all is not None:
        hraw = (o * c[1:].tanh()).reshape(T * B, H)
        dw_hr = (dh_all.reshape(T * B, P).t() @ hraw).to(x.dtype)
    dx = x.new_empty(0)
    if need_dx:
        dx = arrange.restore(arrange.unpack(dg_all @ w_ih, T)).to(x.dtype)
    return InputPass(dx, dh0, dc0, dw_hr, dg_all, x_rows, h_prev)


@torch.library.custom_op("fastpar::lstm_aten_layer_backward", mutates_args=())
def lstm_aten_layer_backward_op(
    dout: Tensor,
    dh_n: Tensor,
    dc_n: Tensor,
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    w_hr: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
    out: Tensor,
    h_n: Tensor,
    c_n: Tensor,
    workspace: Tensor,
    need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns dx ((0,) unless need_dx), dh0, dc0, dw_ih, dw_hh, db (of b_ih and of b_hh; (0,)
    without biases), dw_hr ((0,) without a projection)."""
    if not uses_onednn(x, w_hr, lengths):
        return tuple(_backward_recompute(
            dout, dh_n, dc_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, out,
            need_dx,
        ))  # type: ignore[return-value]  # fmt: skip
    if workspace.numel() == 0:
        # Called without keep_workspace (e.g. opcheck, or a forward traced without grad):
        # run the forward again to get one; oneDNN's backward reads it.
        workspace = _onednn_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, True)[3]
    has_bias = b_ih is not None
    zero = w_ih.new_zeros(w_ih.shape[0])
    dx, dw_ih, dw_hh, db, _, dh0, dc0 = torch.ops.aten.mkldnn_rnn_layer_backward(
        x.contiguous(), w_ih, w_hh, b_ih if has_bias else zero, b_hh if has_bias else zero,
        h0.unsqueeze(0).contiguous(), c0.unsqueeze(0).contiguous(), out,
        h_n.unsqueeze(0), c_n.unsqueeze(0), dout.contiguous(), dh_n.unsqueeze(0).contiguous(),
        dc_n.unsqueeze(0).contiguous(), reverse, _ONEDNN_LSTM_MODE, w_hh.shape[1], 1, has_bias,
        True, False, [], False, workspace,
    )  # fmt: skip
    dt = x.dtype
    return (
        dx.to(dt) if need_dx else x.new_empty(0),
        dh0[0].to(dt),
        dc0[0].to(dt),
        dw_ih.to(dt),
        dw_hh.to(dt),
        db.to(dt) if has_bias else x.new_empty(0),
        x.new_empty(0),
    )


@lstm_aten_layer_backward_op.register_fake
def _(dout: Tensor, dh_n: Tensor, dc_n: Tensor, x: Tensor, h0: Tensor, c0: Tensor,
      w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None, w_hr: Tensor | None,
      *args: object) -> tuple[Tensor, ...]:  # fmt: skip
    need_dx = args[-1]
    return (
        x.new_empty(x.shape if need_dx else (0,)),
        h0.new_empty(h0.shape),
        c0.new_empty(c0.shape),
        w_ih.new_empty(w_ih.shape),
        w_hh.new_empty(w_hh.shape),
        w_ih.new_empty((w_ih.shape[0],) if b_ih is not None else (0,)),
        w_ih.new_empty(w_hr.shape if w_hr is not None else (0,)),
    )


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, _keep = inputs
    out, h_n, c_n, workspace = output
    ctx.save_for_backward(
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, out, h_n, c_n, workspace
    )
    ctx.reverse = reverse
    # The workspace has no gradient; without this autograd fills a zero "gradient" as large.
    ctx.mark_non_differentiable(workspace)
    ctx.set_materialize_grads(False)


def _backward(ctx: Any, dout: Tensor | None, dh_n: Tensor | None, dc_n: Tensor | None,
              _dws: Any) -> tuple[Tensor | None, ...]:  # fmt: skip
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, out, h_n, c_n, workspace = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout
    dh_n = torch.zeros_like(h_n) if dh_n is None else dh_n
    dc_n = torch.zeros_like(c_n) if dc_n is None else dc_n
    if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable
        arrange = Arrangement(lengths, ctx.reverse, x.shape[0])
        grads = double_backward_grads(
            torch._VF.lstm, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr), 2, (dout, dh_n, dc_n),
            ctx.needs_input_grad, arrange,
        )  # fmt: skip
        return (*grads, None, None, None)
    dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = lstm_aten_layer_backward_op(
        dout, dh_n, dc_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, ctx.reverse,
        out, h_n, c_n, workspace, ctx.needs_input_grad[0],
    )  # fmt: skip
    has_bias = b_ih is not None
    return (
        dx if ctx.needs_input_grad[0] else None, dh0, dc0, dw_ih, dw_hh,
        db if has_bias else None, db if has_bias else None,
        dw_hr if w_hr is not None else None, None, None, None,
    )  # fmt: skip


lstm_aten_layer_op.register_autograd(_backward, setup_context=_setup_context)


def lstm_layer_aten(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    w: LayerWeights,
    lengths: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer and direction of torch.nn.LSTM on torch's kernels (see the module docstring).

    Arguments:
        x: (T, B, I) layer input.
        h0: (B, P); c0: (B, H) initial states; w: the layer's weights, all of x's dtype.
        lengths: (B,) valid lengths (>= 1), or None (all T valid).
        reverse: process each sequence from its last valid step down to 0.

    Returns:
        out: (T, B, P) hidden state after every step, zero past each length; h_n: (B, P);
        c_n: (B, H): the states after each sequence's last step. Under autocast all in its
        dtype; ``lstm_stack_aten`` gives them torch.nn.LSTM's (``autocast_dtypes``).
    """
    x, (h0, c0), w = autocast_layer(x, (h0, c0), w)
    differentiable = needs_grad(x, h0, c0, *w)
    check_not_differentiated(
        "fastpar::lstm_aten_layer", differentiable=differentiable, instead=ATEN_INSTEAD
    )
    # A compiled vmap calls the op once per example (torch's batching fallback) and stacks the
    # results, which needs the workspaces' sizes (each its own unbacked symbol) to be equal:
    # there the backward runs the forward again for its workspace instead.
    batched = torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()
    keep = differentiable and not batched
    out, h_n, c_n, _ = lstm_aten_layer_op(
        x, h0, c0, w.w_ih, w.w_hh, w.b_ih, w.b_hh, w.w_hr, lengths, reverse, keep
    )
    return out, h_n, c_n


def lstm_stack_aten(
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
) -> tuple[Tensor, Tensor, Tensor]:
    """``reference.lstm_stack`` on torch's kernels: same arguments and results (dropout draws
    one mask per layer output, as torch.nn.LSTM)."""
    if eager_whole_stack(x, lengths):
        out, h_n, c_n = vf_whole_stack(
            torch._VF.lstm, x, (h0, c0), weights, num_layers=num_layers,
            bidirectional=bidirectional, dropout=dropout, training=training, lengths=lengths,
        )  # fmt: skip
        return out, h_n, c_n

    onednn = autocast_runs_onednn(x, weights[0].w_hr, lengths)

    def run_layer(
        layer_input: Tensor, states: tuple[Tensor, ...], w: LayerWeights, reverse: bool
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        out, h_n, c_n = lstm_layer_aten(layer_input, *states, w, lengths, reverse)
        return out, (h_n, c_n)

    out, (h_n, c_n) = stack_layers(
        x, (h0, c0), weights, run_layer, num_layers=num_layers, bidirectional=bidirectional,
        dropout=dropout, training=training,
        carried=autocast_carried_dtype(x, c0, onednn=onednn),
    )  # fmt: skip
    return out, h_n, c_n
