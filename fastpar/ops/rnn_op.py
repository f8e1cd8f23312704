"""The Triton GRU and Elman RNN recurrences as ``torch.library`` custom ops with autograd.

They run the LSTM's kernels and launchers (lstm_step, lstm_persistent, lstm_forward,
lstm_backward) with another cell: ``gru_recurrence_triton`` and ``rnn_recurrence_triton`` take
the arguments of ``rnn_reference.gru_recurrence_reference`` and ``rnn_recurrence_reference``
(plus ``kernel``), so they plug into ``gru_stack`` / ``rnn_stack`` as
``functools.partial(gru_recurrence_triton, kernel=...)``.

``fastpar::cell_recurrence`` (forward) and ``fastpar::cell_recurrence_backward`` serve both
cells; their fake implementations give the output shapes, so a model that calls them compiles
with ``torch.compile(fullgraph=True)`` and no graph break. The autograd formula only saves and
restores: h0, W_hh, lengths, hs and, for the GRU, the gates (T, B, 4H) r, z, n and
``h_{t-1} W_hn^T + b_hn`` in ``saved_gates_dtype``; the RNN's backward needs nothing but hs.
When no input requires a gradient the forward is told so (``need_backward``) and keeps nothing.

Glossary: T time, B batch, H hidden units, G gates per unit (GRU 3: r, z, n; RNN 1).
"""

from __future__ import annotations

from typing import Any, get_args

import torch
from torch import Tensor

from fastpar._checks import check_bool, check_choice
from fastpar.ops import interpreter_active
from fastpar.ops.func_transforms import TRITON_INSTEAD, check_not_differentiated
from fastpar.ops.lstm_backward import recurrence_backward, weight_grad_hh
from fastpar.ops.lstm_config import KernelChoice, gate_count, saved_gates_dtype
from fastpar.ops.lstm_forward import recurrence_forward
from fastpar.ops.rnn_reference import Nonlinearity
from fastpar.profiling import record_range

SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


def _check_inputs(cell: str, xg: Tensor, h0: Tensor, w_hh: Tensor, b_hn: Tensor | None) -> None:
    """Shapes, dtypes and devices the kernels need, with errors naming the argument."""
    G = gate_count(cell)  # type: ignore[arg-type]
    if xg.device.type != "cuda" and not interpreter_active():
        raise RuntimeError(
            f"the Triton {cell} kernels need CUDA tensors, got xg on {xg.device} "
            "(TRITON_INTERPRET=1 runs them in Triton's CPU interpreter)"
        )
    if xg.dim() != 3 or xg.shape[2] % G:
        raise ValueError(f"xg must have shape (T, B, {G}*H), got {tuple(xg.shape)}")
    if xg.dtype not in SUPPORTED:
        raise TypeError(f"xg must be one of {SUPPORTED}, got {xg.dtype}")
    _, B, GH = xg.shape
    H = GH // G
    expected = {"h0": (B, H), "w_hh": (GH, H), "b_hn": (H,)}
    for name, t in (("h0", h0), ("w_hh", w_hh), ("b_hn", b_hn)):
        if t is None:
            continue
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]}, got {tuple(t.shape)}")
        if t.device != xg.device:
            raise ValueError(f"{name} is on {t.device} but xg is on {xg.device}")
        if t.dtype != xg.dtype:
            raise TypeError(f"{name} dtype {t.dtype} does not match xg dtype {xg.dtype}")


def _saved_gates_shape(xg: Tensor, cell: str, need_backward: bool) -> tuple[int, int, int]:
    T, B, GH = xg.shape
    H = GH // gate_count(cell)  # type: ignore[arg-type]
    return (T, B, 4 * H) if need_backward and cell == "gru" else (0, 0, 4 * H)


@torch.library.custom_op("fastpar::cell_recurrence", mutates_args=())
def cell_recurrence_op(
    xg: Tensor,
    h0: Tensor,
    w_hh: Tensor,
    b_hn: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
    cell: str,
    kernel: str,
    need_backward: bool,
) -> tuple[Tensor, Tensor]:
    """Forward recurrence of a GRU or RNN cell; returns hs (T, B, H) and what backward needs
    besides hs: the GRU's gates (T, B, 4H), else (0, 0, 4H)."""
    with record_range(f"fastpar.{cell}.forward"):
        r = recurrence_forward(
            cell, xg, h0, h0, w_hh, b_hn, None, lengths, reverse,  # type: ignore[arg-type]
            kernel, need_backward,  # type: ignore[arg-type]
        )  # fmt: skip
    return r.hs, r.gates


@cell_recurrence_op.register_fake
def _(
    xg: Tensor, h0: Tensor, w_hh: Tensor, b_hn: Tensor | None, lengths: Tensor | None,
    reverse: bool, cell: str, kernel: str, need_backward: bool,
) -> tuple:  # fmt: skip
    T, B, _ = xg.shape
    gates = _saved_gates_shape(xg, cell, need_backward)
    return (
        xg.new_empty(T, B, h0.shape[1]),
        xg.new_empty(gates, dtype=saved_gates_dtype(xg.dtype)),
    )


@torch.library.custom_op("fastpar::cell_recurrence_backward", mutates_args=())
def cell_recurrence_backward_op(
    dhs: Tensor,
    h0: Tensor,
    w_hh: Tensor,
    lengths: Tensor | None,
    reverse: bool,
    hs: Tensor,
    gates: Tensor,
    cell: str,
    kernel: str,
    need_weight_grads: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward recurrence; returns dxg (T, B, G*H), dh0, dw_hh (h0's and w_hh's dtype) and
    the GRU's db_hn (H,) float32 ((0,) for the RNN: a custom op cannot return None).

    need_weight_grads=False skips the dW_hh GEMM, the input pass of a split backward: the third
    output is then what the weight pass (``cell_recurrence_weight_grad``) needs besides dxg,
    the GRU's d(hn) (T, B, H), the gradient of ``h_{t-1} W_hn^T + b_hn`` ((0,) for the RNN).
    """
    with record_range(f"fastpar.{cell}.backward"):
        g = recurrence_backward(
            cell, dhs, None, h0, h0, w_hh, None, lengths, reverse, hs,  # type: ignore[arg-type]
            gates, gates, hs, kernel, need_weight_grads=need_weight_grads,
        )  # fmt: skip
    db_hn = g.db_hn if g.db_hn is not None else w_hh.new_empty(0, dtype=torch.float32)
    if g.dw_hh is not None:
        return g.dxg, g.dh0, g.dw_hh, db_hn
    dhn = g.dhn.contiguous() if g.dhn is not None else w_hh.new_empty(0)
    return g.dxg, g.dh0, dhn, db_hn


@cell_recurrence_backward_op.register_fake
def _(
    dhs: Tensor, h0: Tensor, w_hh: Tensor, lengths: Tensor | None, reverse: bool, hs: Tensor,
    gates: Tensor, cell: str, kernel: str, need_weight_grads: bool = True,
) -> tuple:  # fmt: skip
    T, B, H = hs.shape
    if need_weight_grads:
        third = w_hh.shape
    else:
        third = (T, B, H) if cell == "gru" else (0,)
    return (
        hs.new_empty(T, B, w_hh.shape[0]),
        h0.new_empty(h0.shape),
        w_hh.new_empty(third),
        w_hh.new_empty(H if cell == "gru" else 0, dtype=torch.float32),
    )


def cell_recurrence_weight_grad(
    dxg: Tensor, dhn: Tensor, h0: Tensor, hs: Tensor, reverse: bool, dtype: torch.dtype
) -> Tensor:
    """The weight pass of a split backward: dW_hh from what the input pass produced.

    Arguments:
        dxg: (T, B, G*H) and dhn: the first and third outputs of ``cell_recurrence_backward_op``
            with need_weight_grads=False (dhn: the GRU's (T, B, H) d(hn), the RNN's (0,)).
        h0: (B, H) and hs: (T, B, H) the forward's initial state and output; reverse its direction.
        dtype: W_hh's dtype.

    Returns:
        (G*H, H) dW_hh in ``dtype``, as the whole backward computes it (accumulated in float32).
    """
    if dhn.numel():  # GRU: the gradient of h_{t-1} W_hh^T is r and z's slots, then d(hn)
        H = dhn.shape[2]
        dxg = torch.cat([dxg[..., : 2 * H], dhn], dim=2)
    return weight_grad_hh(dxg, hs, h0, reverse).to(dtype)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    _xg, h0, w_hh, b_hn, lengths, reverse, cell, kernel, need_backward = inputs
    hs, gates = output
    ctx.need_backward = need_backward
    ctx.b_hn_dtype = None if b_hn is None else b_hn.dtype
    ctx.reverse, ctx.cell, ctx.kernel = reverse, cell, kernel
    if need_backward:
        ctx.save_for_backward(h0, w_hh, lengths, hs, gates)


def _backward(ctx: Any, dhs: Tensor | None, _dgates: Tensor | None) -> tuple:
    if not ctx.need_backward:
        raise RuntimeError(
            "fastpar::cell_recurrence ran with need_backward=False, so it kept nothing to "
            "differentiate; call it with need_backward=True when a gradient is needed"
        )
    h0, w_hh, lengths, hs, gates = ctx.saved_tensors
    dhs = torch.zeros_like(hs) if dhs is None else dhs
    dxg, dh0, dw_hh, db_hn = cell_recurrence_backward_op(
        dhs, h0, w_hh, lengths, ctx.reverse, hs, gates, ctx.cell, ctx.kernel
    )
    db = None if ctx.b_hn_dtype is None else db_hn.to(ctx.b_hn_dtype)
    return dxg, dh0, dw_hh, db, None, None, None, None, None


cell_recurrence_op.register_autograd(_backward, setup_context=_setup_context)


def _run(
    cell: str,
    xg: Tensor,
    h0: Tensor,
    w_hh: Tensor,
    b_hn: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
    kernel: KernelChoice,
) -> Tensor:
    check_bool("reverse", reverse)
    check_choice("kernel", kernel, get_args(KernelChoice))
    if torch.is_autocast_enabled(xg.device.type):
        # Custom ops are outside autocast's lists: take its dtype here, as cuDNN's RNNs do
        # for all their results; on CPU the stacks give them torch's loop's (autocast_dtypes).
        dtype = torch.get_autocast_dtype(xg.device.type)
        xg, h0, w_hh = xg.to(dtype), h0.to(dtype), w_hh.to(dtype)
        b_hn = b_hn.to(dtype) if b_hn is not None else None
    _check_inputs(cell, xg, h0, w_hh, b_hn)
    if lengths is not None:
        lengths = lengths.to(device=xg.device, dtype=torch.int32)
    need_backward = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (xg, h0, w_hh, b_hn)
    )
    check_not_differentiated(
        "fastpar::cell_recurrence", differentiable=need_backward, instead=TRITON_INSTEAD
    )
    hs, _gates = cell_recurrence_op(
        xg.contiguous(), h0, w_hh, b_hn, lengths, reverse, cell, kernel, need_backward
    )
    return hs


def gru_recurrence_triton(
    xg: Tensor,
    h0: Tensor,
    w_hh: Tensor,
    b_hn: Tensor | None = None,
    lengths: Tensor | None = None,
    reverse: bool = False,
    *,
    kernel: KernelChoice = "auto",
) -> Tensor:
    """The Triton GRU recurrence with the signature of ``gru_recurrence_reference``.

    Arguments:
        xg: (T, B, 3H) input projection, gates r, z, n, with b_ih and b_hr, b_hz folded in
            (``gru_input_projection``); float32, bfloat16 or float16.
        h0: (B, H) initial hidden state; w_hh: (3H, H); b_hn: (H,) or None, all of xg's dtype
            and device.
        lengths: (B,) valid lengths, or None; steps at or past a row's length keep its state.
        reverse: process time from T-1 down to 0.
        kernel: "auto", "step" or "persistent" (see ``lstm_forward``).

    Returns:
        hs: (T, B, H) hidden state after every step.
    """
    return _run("gru", xg, h0, w_hh, b_hn, lengths, reverse, kernel)


def rnn_recurrence_triton(
    xg: Tensor,
    h0: Tensor,
    w_hh: Tensor,
    lengths: Tensor | None = None,
    reverse: bool = False,
    nonlinearity: Nonlinearity = "tanh",
    *,
    kernel: KernelChoice = "auto",
) -> Tensor:
    """The Triton Elman RNN recurrence with the signature of ``rnn_recurrence_reference``.

    Arguments:
        xg: (T, B, H) input projection including both biases; float32, bfloat16 or float16.
        h0: (B, H) initial hidden state; w_hh: (H, H); both of xg's dtype and device.
        lengths, reverse, kernel: as ``gru_recurrence_triton``.
        nonlinearity: "tanh" or "relu", as torch.nn.RNN.

    Returns:
        hs: (T, B, H) hidden state after every step.
    """
    check_choice("nonlinearity", nonlinearity, get_args(Nonlinearity))
    return _run(f"rnn_{nonlinearity}", xg, h0, w_hh, None, lengths, reverse, kernel)
