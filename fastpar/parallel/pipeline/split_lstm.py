"""The split backward of fastpar's LSTM recurrence (``fastpar::lstm_recurrence``).

The recurrence's backward produces dgates, the gradient of the gate pre-activations, which is
also the gradient of its input xg; from it follow dh0 and dc0. The recurrent weight's gradient
``dW_hh = sum_t dgates_t^T h_{t-1}`` is one GEMM over saved tensors that nothing else waits for.
So the input pass runs the backward op with ``need_weight_grads=False`` and hands back dxg, dh0
and dc0 at once, and the GEMM (``lstm_recurrence_weight_grad``) is deferred to the weight pass.
The input projection's weights go through F.linear, split on its own (split_backward.py).

Declined (the recurrence keeps its whole backward, said once): a projection (proj_size > 0:
dW_hr needs the gradient reaching each h_t, which the input pass does not keep), and a W_hh
that is not a leaf (e.g. cast by autocast: its gradient must flow through the cast).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fastpar._logging import get_logger, log_once
from fastpar.ops.lstm_op import (
    lstm_recurrence_backward_op,
    lstm_recurrence_op,
    lstm_recurrence_weight_grad,
)
from fastpar.parallel.pipeline.grad_accumulate import accumulate

__all__ = ["LSTM_RECURRENCE", "split_lstm_recurrence"]

logger = get_logger(__name__)

LSTM_RECURRENCE = torch.ops.fastpar.lstm_recurrence.default
"""What the pipeline's function mode sees when ``lstm_recurrence_op`` is called."""


class _LSTMRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, xg: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, lengths: Tensor | None,
        reverse: bool, kernel: str, defer: Callable[[Callable[[], None]], None],
    ) -> tuple[Tensor, ...]:  # fmt: skip
        hs, c_n, gates, cs, hraw = lstm_recurrence_op(
            xg, h0, c0, w_hh, None, lengths, reverse, kernel, True
        )
        ctx.save_for_backward(h0, c0, w_hh, lengths, hs, gates, cs, hraw)
        ctx.reverse, ctx.kernel, ctx.defer = reverse, kernel, defer
        ctx.mark_non_differentiable(gates, cs, hraw)
        return hs, c_n, gates, cs, hraw

    @staticmethod
    def backward(ctx: Any, dhs: Tensor | None, dc_n: Tensor | None, *_saved: Any) -> tuple:
        h0, c0, w_hh, lengths, hs, gates, cs, hraw = ctx.saved_tensors
        dhs = torch.zeros_like(hs) if dhs is None else dhs
        dc_n = torch.zeros_like(c0) if dc_n is None else dc_n
        dxg, dh0, dc0, _, _ = lstm_recurrence_backward_op(
            dhs, dc_n, h0, c0, w_hh, None, lengths, ctx.reverse, hs, gates, cs, hraw,
            ctx.kernel, need_weight_grads=False,
        )  # fmt: skip
        reverse = ctx.reverse

        def job() -> None:
            accumulate(w_hh, lstm_recurrence_weight_grad(dxg, h0, hs, reverse, w_hh.dtype))

        ctx.defer(job)
        return dxg, dh0, dc0, None, None, None, None, None


def split_lstm_recurrence(
    defer: Callable[[Callable[[], None]], None],
    xg: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
    kernel: str,
    need_backward: bool,
) -> Any:
    """``lstm_recurrence_op`` with W_hh's gradient deferred (a ``WeightSplit``); NotImplemented
    where it cannot split (see the module docstring)."""
    if not (need_backward and w_hh.requires_grad):
        return NotImplemented
    if w_hr is not None or not w_hh.is_leaf:
        why = "a projection (proj_size > 0)" if w_hr is not None else "a W_hh that is not a leaf"
        log_once(
            logger,
            f"fastpar::lstm_recurrence with {why}: no weight-gradient split, its whole "
            "backward runs in the input pass",
        )
        return NotImplemented
    return _LSTMRecurrence.apply(xg, h0, c0, w_hh, lengths, reverse, kernel, defer)
