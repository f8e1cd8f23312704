"""The split backward of fastpar's recurrences: the LSTM (``fastpar::lstm_recurrence``) and the
GRU / Elman RNN (``fastpar::cell_recurrence``), run by the Triton kernels, and the LSTM layer on
torch's kernels (``fastpar::lstm_aten_layer``, the CPU default).

A recurrence's backward produces dgates, the gradient of the gate pre-activations, which is
also the gradient of its input xg; from it follow dh0 (and the LSTM's dc0). The recurrent
weight's gradient ``dW_hh = sum_t dgates_t^T h_{t-1}`` is one GEMM over saved tensors that
nothing else waits for. So the input pass runs the backward op with ``need_weight_grads=False``
and hands back the input and state gradients at once, and the GEMM
(``lstm_recurrence_weight_grad``, ``cell_recurrence_weight_grad``) is deferred to the weight
pass. With a projection the Triton LSTM's input pass also keeps dhp, the gradient reaching each
h_t, for the deferred ``dW_hr = sum_t dhp_t^T hraw_t``. The input projection's weights go
through F.linear, split on its own (split_backward.py); the GRU's b_hn (a slice of b_hh, not a
leaf) gets its gradient in the input pass.

``fastpar::lstm_aten_layer`` holds the whole layer: its input pass is the recomputing backward
(``lstm_aten_layer_input_pass``) up to dgates and dx, dh0, dc0, also where a whole backward
would run oneDNN's (which computes everything at once); its weight pass the GEMMs for W_ih,
W_hh and the biases. Stacks without lengths, which outside torch.compile call torch's
whole-stack kernel, run layer by layer in a split stage (``aten_common.per_layer_ops``).

Declined (the recurrence keeps its whole backward, said once): weights that are not leaves
(e.g. cast by autocast: their gradient must flow through the cast) or that have gradient hooks
when the forward runs (autograd's accumulation must run them on the gradient; see
`grad_accumulate.deferrable`; a hook registered between the forward and the backward makes the
input pass compute the weight gradients too, and hand them on through autograd), and a
projection on the ATen layer (its input pass does not keep dhp).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fastpar._logging import get_logger, log_once
from fastpar.ops.lstm_aten import (
    lstm_aten_layer_input_pass,
    lstm_aten_layer_op,
    lstm_aten_layer_weight_grads,
)
from fastpar.ops.lstm_op import (
    lstm_recurrence_backward_op,
    lstm_recurrence_op,
    lstm_recurrence_weight_grad,
)
from fastpar.ops.rnn_op import (
    cell_recurrence_backward_op,
    cell_recurrence_op,
    cell_recurrence_weight_grad,
)
from fastpar.parallel.pipeline.grad_accumulate import accumulate, deferrable

__all__ = [
    "CELL_RECURRENCE",
    "LSTM_ATEN_LAYER",
    "LSTM_RECURRENCE",
    "split_cell_recurrence",
    "split_lstm_aten_layer",
    "split_lstm_recurrence",
]

logger = get_logger(__name__)

Defer = Callable[[Callable[[], None]], None]

LSTM_RECURRENCE = torch.ops.fastpar.lstm_recurrence.default
"""What the pipeline's function mode sees when ``lstm_recurrence_op`` is called."""
CELL_RECURRENCE = torch.ops.fastpar.cell_recurrence.default
"""What the pipeline's function mode sees when ``cell_recurrence_op`` is called."""
LSTM_ATEN_LAYER = torch.ops.fastpar.lstm_aten_layer.default
"""What the pipeline's function mode sees when ``lstm_aten_layer_op`` is called."""


def _arguments(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The op's arguments by their schema's names, however the mode received them."""
    return dict(zip((a.name for a in op._schema.arguments), args, strict=False)) | kwargs


def _deferrable(*weights: Tensor | None) -> bool:
    return all(w is None or deferrable(w) for w in weights)


def _splits(op: str, need_backward: bool, *weights: Tensor | None) -> bool:
    """Whether a recurrence can split its backward (deferrable weights, W_hh's gradient wanted);
    says once why not where it matters."""
    w_hh = weights[0]
    if not (need_backward and w_hh is not None and w_hh.requires_grad):
        return False  # no W_hh gradient to defer
    if _deferrable(*weights):
        return True
    log_once(
        logger,
        f"fastpar::{op} with weights that are not leaves (e.g. cast by autocast) or that have "
        "gradient hooks: no weight-gradient split, its whole backward runs in the input pass",
    )
    return False


# Each Function's forward takes the op's arguments by name (`a`, its tensors the same objects
# as the positional ones, which autograd differentiates) and runs the op itself.


class _LSTMRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, defer: Defer, a: dict[str, Any], *_diff: Tensor) -> tuple[Tensor, ...]:
        hs, c_n, gates, cs, hraw = lstm_recurrence_op(**a)
        saved = (a["h0"], a["c0"], a["w_hh"], a["w_hr"], a["lengths"], hs, gates, cs, hraw)
        ctx.save_for_backward(*saved)
        ctx.reverse, ctx.kernel, ctx.defer = a["reverse"], a["kernel"], defer
        ctx.mark_non_differentiable(gates, cs, hraw)
        return hs, c_n, gates, cs, hraw

    @staticmethod
    def backward(ctx: Any, dhs: Tensor | None, dc_n: Tensor | None, *_saved: Any) -> tuple:
        h0, c0, w_hh, w_hr, lengths, hs, gates, cs, hraw = ctx.saved_tensors
        dhs = torch.zeros_like(hs) if dhs is None else dhs
        dc_n = torch.zeros_like(c0) if dc_n is None else dc_n
        dxg, dh0, dc0, _, dhp = lstm_recurrence_backward_op(
            dhs, dc_n, h0, c0, w_hh, w_hr, lengths, ctx.reverse, hs, gates, cs, hraw,
            ctx.kernel, need_weight_grads=False,
        )  # fmt: skip
        reverse = ctx.reverse
        projection = (dhp, hraw) if w_hr is not None else (None, None)

        def weight_grads() -> tuple[Tensor, Tensor | None]:
            return lstm_recurrence_weight_grad(dxg, h0, hs, reverse, w_hh.dtype, *projection)

        if not _deferrable(w_hh, w_hr):  # a hook registered since the forward: now, via autograd
            return None, None, dxg, dh0, dc0, *weight_grads()

        def job() -> None:
            dw_hh, dw_hr = weight_grads()
            if w_hh.requires_grad:
                accumulate(w_hh, dw_hh)
            if w_hr is not None and dw_hr is not None and w_hr.requires_grad:
                accumulate(w_hr, dw_hr)

        ctx.defer(job)
        return None, None, dxg, dh0, dc0, None, None


def split_lstm_recurrence(defer: Defer, *args: Any, **kwargs: Any) -> Any:
    """``lstm_recurrence_op`` with the W_hh and W_hr gradients deferred (a ``WeightSplit``);
    NotImplemented where it cannot split (see the module docstring)."""
    a = _arguments(LSTM_RECURRENCE, args, kwargs)
    if not _splits("lstm_recurrence", a["need_backward"], a["w_hh"], a["w_hr"]):
        return NotImplemented
    return _LSTMRecurrence.apply(defer, a, a["xg"], a["h0"], a["c0"], a["w_hh"], a["w_hr"])


class _CellRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, defer: Defer, a: dict[str, Any], *_diff: Tensor) -> tuple[Tensor, ...]:
        hs, gates = cell_recurrence_op(**a)
        ctx.save_for_backward(a["h0"], a["w_hh"], a["lengths"], hs, gates)
        ctx.b_hn_dtype = None if a["b_hn"] is None else a["b_hn"].dtype
        ctx.reverse, ctx.cell, ctx.kernel, ctx.defer = a["reverse"], a["cell"], a["kernel"], defer
        ctx.mark_non_differentiable(gates)
        return hs, gates

    @staticmethod
    def backward(ctx: Any, dhs: Tensor | None, _dgates: Tensor | None) -> tuple:
        h0, w_hh, lengths, hs, gates = ctx.saved_tensors
        dhs = torch.zeros_like(hs) if dhs is None else dhs
        dxg, dh0, dhn, db_hn = cell_recurrence_backward_op(
            dhs, h0, w_hh, lengths, ctx.reverse, hs, gates, ctx.cell, ctx.kernel,
            need_weight_grads=False,
        )  # fmt: skip
        reverse = ctx.reverse
        db = None if ctx.b_hn_dtype is None else db_hn.to(ctx.b_hn_dtype)

        def weight_grad() -> Tensor:
            return cell_recurrence_weight_grad(dxg, dhn, h0, hs, reverse, w_hh.dtype)

        if not _deferrable(w_hh):  # a hook registered since the forward: now, via autograd
            return None, None, dxg, dh0, weight_grad(), db
        ctx.defer(lambda: accumulate(w_hh, weight_grad()))
        return None, None, dxg, dh0, None, db


def split_cell_recurrence(defer: Defer, *args: Any, **kwargs: Any) -> Any:
    """``cell_recurrence_op`` with W_hh's gradient deferred (a ``WeightSplit``); NotImplemented
    where it cannot split (see the module docstring)."""
    a = _arguments(CELL_RECURRENCE, args, kwargs)
    if not _splits("cell_recurrence", a["need_backward"], a["w_hh"]):
        return NotImplemented
    # b_hn last: None (no bias) ends the differentiable arguments.
    return _CellRecurrence.apply(defer, a, a["xg"], a["h0"], a["w_hh"], a["b_hn"])


_ATEN_WEIGHTS = ("w_ih", "w_hh", "b_ih", "b_hh")


class _LSTMAtenLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, defer: Defer, a: dict[str, Any], *_diff: Tensor) -> tuple[Tensor, ...]:
        # No workspace: the recomputing backward reads only the inputs and out.
        out, h_n, c_n, ws = lstm_aten_layer_op(**(a | {"keep_workspace": False}))
        ctx.a = {k: v for k, v in a.items() if k not in ("x", "h0", "c0", *_ATEN_WEIGHTS)}
        ctx.save_for_backward(*(a[k] for k in ("x", "h0", "c0", *_ATEN_WEIGHTS)), out)
        ctx.defer = defer
        ctx.mark_non_differentiable(ws)
        return out, h_n, c_n, ws

    @staticmethod
    def backward(
        ctx: Any, dout: Tensor | None, dh_n: Tensor | None, dc_n: Tensor | None, _dws: Any
    ) -> tuple:
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, out = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout
        dh_n = torch.zeros_like(h0) if dh_n is None else dh_n
        dc_n = torch.zeros_like(c0) if dc_n is None else dc_n
        grads = lstm_aten_layer_input_pass(
            dout, dh_n, dc_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, ctx.a["lengths"],
            ctx.a["reverse"], out, ctx.needs_input_grad[2],
        )  # fmt: skip
        dx, dh0, dc0 = grads.dx, grads.dh0, grads.dc0
        grads = grads._replace(dx=dx[:0], dh0=dh0[:0], dc0=dc0[:0])  # the job keeps the rest

        def weight_grads() -> tuple[Tensor, ...]:
            dw_ih, dw_hh, db = lstm_aten_layer_weight_grads(grads, b_ih is not None, x.dtype)
            # b_hh gets its own copy: a first gradient becomes `.grad` itself (accumulate).
            return dw_ih, dw_hh, db, db.clone() if db.numel() else db

        dx = dx if ctx.needs_input_grad[2] else None
        if not _deferrable(w_ih, w_hh, b_ih, b_hh):  # a hook registered since the forward
            dw_ih, dw_hh, db_ih, db_hh = weight_grads()  # now, via autograd
            biases = (None, None) if b_ih is None else (db_ih, db_hh)
            return None, None, dx, dh0, dc0, dw_ih, dw_hh, *biases

        def job() -> None:
            params = (w_ih, w_hh, b_ih, b_hh)
            for param, grad in zip(params, weight_grads(), strict=True):
                if param is not None and param.requires_grad:
                    accumulate(param, grad)

        ctx.defer(job)
        return None, None, dx, dh0, dc0, None, None, None, None


def split_lstm_aten_layer(defer: Defer, *args: Any, **kwargs: Any) -> Any:
    """``lstm_aten_layer_op`` with its weight gradients deferred (a ``WeightSplit``): the input
    pass is the recomputing backward up to dgates (also where torch's would run oneDNN's), the
    weight pass its three GEMMs. NotImplemented where it cannot split (module docstring)."""
    a = _arguments(LSTM_ATEN_LAYER, args, kwargs)
    weights = [a[k] for k in _ATEN_WEIGHTS if a[k] is not None]
    if not (a["keep_workspace"] and any(t.requires_grad for t in weights)):
        return NotImplemented  # keep_workspace: whether a gradient is wanted at all
    if a["w_hr"] is not None:
        log_once(
            logger,
            "fastpar::lstm_aten_layer with a projection (proj_size > 0): no weight-gradient "
            "split, its whole backward runs in the input pass",
        )
        return NotImplemented
    if not _splits("lstm_aten_layer", True, a["w_hh"], *weights):
        return NotImplemented
    # The weights too: a stage's first layer may have no input that requires a gradient.
    return _LSTMAtenLayer.apply(defer, a, a["x"], a["h0"], a["c0"], *(a[k] for k in _ATEN_WEIGHTS))
