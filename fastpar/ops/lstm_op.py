"""The Triton LSTM recurrence as a ``torch.library`` custom op with autograd.

``fastpar::lstm_recurrence`` (forward) and ``fastpar::lstm_recurrence_backward`` are opaque to
``torch.compile``: their fake implementations give the output shapes, so a model that calls them
compiles with ``fullgraph=True`` and no graph break, and Inductor calls the Triton launchers at
run time. The autograd formula only saves and restores; the work is in lstm_forward and
lstm_backward. When no input requires a gradient the forward is told so (``need_backward``)
and keeps nothing for backward.

Glossary: T time, B batch, H hidden units, P size of h (proj_size or H), G = 4 gates.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fastpar.ops import interpreter_active
from fastpar.ops.func_transforms import TRITON_INSTEAD, check_not_differentiated
from fastpar.ops.lstm_backward import lstm_backward, weight_grad_hh, weight_grad_hr
from fastpar.ops.lstm_config import KernelChoice, saved_gates_dtype
from fastpar.ops.lstm_forward import lstm_forward
from fastpar.profiling import record_range

SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


def _check_inputs(xg: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, w_hr: Tensor | None) -> None:
    """Shapes, dtypes and devices the kernels need, with errors naming the argument."""
    if xg.device.type != "cuda" and not interpreter_active():
        raise RuntimeError(
            f"the Triton LSTM kernels need CUDA tensors, got xg on {xg.device} "
            "(TRITON_INTERPRET=1 runs them in Triton's CPU interpreter)"
        )
    if xg.dim() != 3 or xg.shape[2] % 4:
        raise ValueError(f"xg must have shape (T, B, 4*H), got {tuple(xg.shape)}")
    if xg.dtype not in SUPPORTED:
        raise TypeError(f"xg must be one of {SUPPORTED}, got {xg.dtype}")
    _, B, G = xg.shape
    H = G // 4
    P = w_hr.shape[0] if w_hr is not None else H
    expected = {"h0": (B, P), "c0": (B, H), "w_hh": (G, P), "w_hr": (P, H)}
    for name, t in (("h0", h0), ("c0", c0), ("w_hh", w_hh), ("w_hr", w_hr)):
        if t is None:
            continue
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]}, got {tuple(t.shape)}")
        if t.device != xg.device:
            raise ValueError(f"{name} is on {t.device} but xg is on {xg.device}")
        if t.dtype != xg.dtype and name != "c0":
            raise TypeError(f"{name} dtype {t.dtype} does not match xg dtype {xg.dtype}")


def _hraw_shape(xg: Tensor, w_hr: Tensor | None) -> tuple[int, ...]:
    return (0,) if w_hr is None else (xg.shape[0], xg.shape[1], xg.shape[2] // 4)


@torch.library.custom_op("fastpar::lstm_recurrence", mutates_args=())
def lstm_recurrence_op(
    xg: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
    kernel: str,
    need_backward: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward recurrence; returns hs (T, B, P), c_n (B, H) in c0's dtype, and what backward
    needs: gates (T, B, 4H), cs (T, B, H) float32 (both (0, 0, .) without need_backward), hraw
    (T, B, H) or (0,)."""
    with record_range("fastpar.lstm.forward"):
        r = lstm_forward(
            xg, h0, c0, w_hh, w_hr, lengths, reverse, kernel,  # type: ignore[arg-type]
            need_backward=need_backward,
        )  # fmt: skip
    # c_n is a view of cs; outputs of a custom op may not alias each other.
    return r.hs, r.c_n.to(c0.dtype, copy=True), r.gates, r.cs, r.hraw


@lstm_recurrence_op.register_fake
def _(
    xg: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, w_hr: Tensor | None,
    lengths: Tensor | None, reverse: bool, kernel: str, need_backward: bool,
) -> tuple:  # fmt: skip
    T, B, G = xg.shape
    saved = (T, B) if need_backward else (0, 0)
    return (
        xg.new_empty(T, B, w_hh.shape[1]),
        c0.new_empty(c0.shape),
        xg.new_empty(*saved, G, dtype=saved_gates_dtype(xg.dtype)),
        xg.new_empty(*saved, G // 4, dtype=torch.float32),
        xg.new_empty(_hraw_shape(xg, w_hr)),
    )


@torch.library.custom_op("fastpar::lstm_recurrence_backward", mutates_args=())
def lstm_recurrence_backward_op(
    dhs: Tensor,
    dc_n: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
    hs: Tensor,
    gates: Tensor,
    cs: Tensor,
    hraw: Tensor,
    kernel: str,
    need_weight_grads: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward recurrence; returns dxg, dh0, dc0 (c0's dtype), dw_hh, dw_hr ((0,) without
    a projection: a custom op cannot return None).

    need_weight_grads=False skips the weight-gradient GEMMs, the input pass of a split backward
    whose weight pass is ``lstm_recurrence_weight_grad``: dw_hh is then (0,), and in place of
    dw_hr comes what its GEMM needs, dhp (T, B, P) float32, the gradient reaching each h_t
    ((0,) without a projection).
    """
    with record_range("fastpar.lstm.backward"):
        g = lstm_backward(
            dhs, dc_n, h0, c0, w_hh, w_hr, lengths, reverse, hs, gates, cs, hraw, kernel,
            need_weight_grads=need_weight_grads,
        )  # fmt: skip
    dw_hh = g.dw_hh if g.dw_hh is not None else w_hh.new_empty(0)
    dw_hr = g.dw_hr if need_weight_grads else g.dhp
    dw_hr = dw_hr if dw_hr is not None else w_hh.new_empty(0)
    return g.dxg, g.dh0, g.dc0.to(c0.dtype), dw_hh, dw_hr


@lstm_recurrence_backward_op.register_fake
def _(
    dhs: Tensor, dc_n: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, w_hr: Tensor | None,
    lengths: Tensor | None, reverse: bool, hs: Tensor, gates: Tensor, cs: Tensor, hraw: Tensor,
    kernel: str, need_weight_grads: bool = True,
) -> tuple:  # fmt: skip
    return (
        gates.new_empty(gates.shape, dtype=hs.dtype),
        h0.new_empty(h0.shape),
        c0.new_empty(c0.shape),
        w_hh.new_empty(w_hh.shape if need_weight_grads else (0,)),
        _fake_dw_hr(hs, w_hh, w_hr, need_weight_grads),
    )


def _fake_dw_hr(hs: Tensor, w_hh: Tensor, w_hr: Tensor | None, need_weight_grads: bool) -> Tensor:
    if w_hr is None:
        return w_hh.new_empty(0)
    if need_weight_grads:
        return w_hh.new_empty(w_hr.shape)
    return hs.new_empty(hs.shape, dtype=torch.float32)  # dhp


def lstm_recurrence_weight_grad(
    dxg: Tensor,
    h0: Tensor,
    hs: Tensor,
    reverse: bool,
    dtype: torch.dtype,
    dhp: Tensor | None = None,
    hraw: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The weight pass of a split backward: dW_hh (and dW_hr) from what the input pass produced.

    Arguments:
        dxg: (T, B, 4H) the input pass's dxg (``lstm_recurrence_backward_op`` with
            need_weight_grads=False), the gradient of the gate pre-activations.
        h0: (B, P) and hs: (T, B, P) the forward's initial state and output; reverse its direction.
        dtype: the weights' dtype.
        dhp: (T, B, P) with a projection, the input pass's last output; hraw: (T, B, H) the
            forward's.

    Returns:
        (4H, P) dW_hh and (P, H) dW_hr (None without dhp) in ``dtype``, as the whole backward
        computes them (accumulated in float32).
    """
    dw_hh = weight_grad_hh(dxg, hs, h0, reverse).to(dtype)
    if dhp is None or hraw is None:
        return dw_hh, None
    return dw_hh, weight_grad_hr(dhp, hraw).to(dtype)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    _xg, h0, c0, w_hh, w_hr, lengths, reverse, kernel, need_backward = inputs
    hs, _c_n, gates, cs, hraw = output
    ctx.need_backward = need_backward
    ctx.save_for_backward(h0, c0, w_hh, w_hr, lengths, hs, gates, cs, hraw)
    ctx.reverse = reverse
    ctx.kernel = kernel


def _backward(ctx: Any, dhs: Tensor | None, dc_n: Tensor | None, *_saved: Any) -> tuple:
    if not ctx.need_backward:
        raise RuntimeError(
            "fastpar::lstm_recurrence ran with need_backward=False, so it kept nothing to "
            "differentiate; call it with need_backward=True when a gradient is needed"
        )
    h0, c0, w_hh, w_hr, lengths, hs, gates, cs, hraw = ctx.saved_tensors
    dhs = torch.zeros_like(hs) if dhs is None else dhs
    dc_n = torch.zeros_like(c0) if dc_n is None else dc_n
    dxg, dh0, dc0, dw_hh, dw_hr = lstm_recurrence_backward_op(
        dhs, dc_n, h0, c0, w_hh, w_hr, lengths, ctx.reverse, hs, gates, cs, hraw, ctx.kernel
    )
    return dxg, dh0, dc0, dw_hh, (dw_hr if w_hr is not None else None), None, None, None, None


lstm_recurrence_op.register_autograd(_backward, setup_context=_setup_context)


def lstm_recurrence_triton(
    xg: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None = None,
    lengths: Tensor | None = None,
    reverse: bool = False,
    kernel: KernelChoice = "auto",
) -> tuple[Tensor, Tensor]:
    """The Triton recurrence with the signature of ``lstm_recurrence_reference``.

    Arguments:
        xg: (T, B, 4H) input projection including both biases.
        h0: (B, P); c0: (B, H); w_hh: (4H, P); w_hr: (P, H) or None, all of xg's dtype and device.
        lengths: (B,) valid lengths, or None.
        reverse: process time from T-1 down to 0.
        kernel: "auto", "step" or "persistent" (see ``lstm_forward``).

    Returns:
        hs: (T, B, P) hidden state after every step; c_n: (B, H).
    """
    if torch.is_autocast_enabled(xg.device.type):
        # Custom ops are outside autocast's lists: take its dtype here, as cuDNN's LSTM does
        # for all its results; on CPU the stacks give them torch's loop's (autocast_dtypes).
        dtype = torch.get_autocast_dtype(xg.device.type)
        xg, h0, c0, w_hh = xg.to(dtype), h0.to(dtype), c0.to(dtype), w_hh.to(dtype)
        w_hr = w_hr.to(dtype) if w_hr is not None else None
    _check_inputs(xg, h0, c0, w_hh, w_hr)
    if lengths is not None:
        lengths = lengths.to(device=xg.device, dtype=torch.int32)
    need_backward = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (xg, h0, c0, w_hh, w_hr)
    )
    check_not_differentiated(
        "fastpar::lstm_recurrence", differentiable=need_backward, instead=TRITON_INSTEAD
    )
    hs, c_n, _gates, _cs, _hraw = lstm_recurrence_op(
        xg.contiguous(), h0, c0, w_hh, w_hr, lengths, reverse, kernel, need_backward
    )
    return hs, c_n
