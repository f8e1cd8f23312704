"""Launcher of the forward recurrence of every cell (LSTM, GRU, Elman RNN): shapes, allocation,
grid, and the step or persistent kernels (lstm_step.py, lstm_persistent.py).

Glossary: T time, B batch, H hidden units, P size of h (proj_size or H, which only the LSTM
has), G gates per unit (LSTM 4, GRU 3, RNN 1).

The input half of the gates (``x @ W_ih^T + b``, all steps at once) is computed before this
recurrence as one GEMM. What backward needs (LSTM: gate activations and cell states; GRU: r, z,
n and ``h W_hn^T + b_hn``; RNN: nothing but hs) is written only when asked for
(``need_backward``): inference allocates none of it.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import triton
from torch import Tensor

from fastpar.ops import interpreter_active
from fastpar.ops.lstm_config import (
    CellKind,
    KernelChoice,
    choose_kernel,
    dot_precision,
    gate_count,
    gate_slots,
    num_sms,
    padded_k,
    persistent_config,
    saved_gates_dtype,
    step_config,
)
from fastpar.ops.lstm_persistent import _lstm_fwd_persistent_kernel
from fastpar.ops.lstm_step import _lstm_fwd_step_kernel

Precision = Literal["ieee", "tf32"]


class ForwardResult(NamedTuple):
    """What the forward recurrence returns; gates, cs and hraw are saved for backward."""

    hs: Tensor  # (T, B, P) h after each step, input dtype
    c_n: Tensor  # (B, H) float32 state after the last step processed (c, or h for GRU/RNN)
    gates: Tensor  # (T, B, 4H) LSTM, GRU (saved_gates_dtype); (0, 0, 4H) when nothing is saved
    cs: Tensor  # (T, B, H) float32 cell states (LSTM); (0, 0, H) when nothing is saved
    hraw: Tensor  # (T, B, H) o*tanh(c) before the projection; (0,) without one


def lstm_forward(
    xg: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None = None,
    lengths: Tensor | None = None,
    reverse: bool = False,
    kernel: KernelChoice = "auto",
    need_backward: bool = True,
    precision: Precision | None = None,
) -> ForwardResult:
    """Run the LSTM recurrence of one layer and direction with the Triton kernels.

    Arguments:
        xg: (T, B, 4H) input projection including both biases, contiguous.
        h0: (B, P) initial hidden state, xg's dtype.
        c0: (B, H) initial cell state (any float dtype; the recurrence keeps it in float32).
        w_hh: (4H, P) recurrent weights, xg's dtype.
        w_hr: (P, H) projection weights, or None.
        lengths: (B,) int32 valid lengths on xg's device, or None.
        reverse: process time from T-1 down to 0.
        kernel: "step" (one launch per step), "persistent" (one launch in all; raises where it
            does not apply) or "auto" (the shape heuristic of ``choose_kernel``). Backward takes
            the same choice, except that "persistent" runs the step kernels where the
            persistent backward does not apply.
        need_backward: also return the gate activations and cell states backward reads.
        precision: input_precision of float32 dots; None follows torch (see dot_precision).

    Returns:
        ForwardResult.
    """
    return recurrence_forward(
        "lstm", xg, h0, c0, w_hh, None, w_hr, lengths, reverse, kernel, need_backward, precision
    )


def recurrence_forward(
    cell: CellKind,
    xg: Tensor,
    h0: Tensor,
    state0: Tensor,
    w_hh: Tensor,
    b_hn: Tensor | None = None,
    w_hr: Tensor | None = None,
    lengths: Tensor | None = None,
    reverse: bool = False,
    kernel: KernelChoice = "auto",
    need_backward: bool = True,
    precision: Precision | None = None,
) -> ForwardResult:
    """The forward recurrence of one layer and direction of any cell (see lstm_forward).

    Arguments:
        cell: "lstm", "gru", "rnn_tanh" or "rnn_relu".
        xg: (T, B, G*H) input projection (GRU: every bias but b_hn folded in), contiguous.
        h0: (B, P) initial hidden state, xg's dtype.
        state0: (B, H) the initial float32 state the kernels carry: c0 (LSTM) or h0 (GRU, RNN).
        w_hh: (G*H, P) recurrent weights, xg's dtype.
        b_hn: (H,) GRU: the candidate gate's recurrent bias, or None (zero).
        w_hr: (P, H) LSTM projection weights, or None.
        lengths, reverse, kernel, need_backward, precision: as lstm_forward.

    Returns:
        ForwardResult (gates and cs empty where the cell saves none).
    """
    T, B, GH = xg.shape
    H = GH // gate_count(cell)
    P = w_hh.shape[1]
    dev = xg.device
    w_hh = w_hh.contiguous()
    h0 = h0.contiguous()
    c0 = state0.to(torch.float32).contiguous()
    saved = (T, B) if need_backward else (0, 0)
    gates_dtype = saved_gates_dtype(xg.dtype)
    gates = torch.empty(
        *(saved if cell in ("lstm", "gru") else (0, 0)), 4 * H, device=dev, dtype=gates_dtype
    )
    cs = torch.empty(*(saved if cell == "lstm" else (0, 0)), H, device=dev, dtype=torch.float32)
    hs = torch.empty(T, B, P, device=dev, dtype=xg.dtype)
    hraw = hs if w_hr is None else torch.empty(T, B, H, device=dev, dtype=xg.dtype)
    no_hraw = hs.new_empty(0)
    if T == 0:
        return ForwardResult(hs, c0.clone(), gates, cs, hraw if w_hr is not None else no_hraw)
    lens = lengths if lengths is not None else c0  # any pointer: unread without HAS_LENGTHS
    if cell == "gru":
        b = torch.zeros(H, device=dev) if b_hn is None else b_hn.float().contiguous()
    else:
        b = c0  # any pointer: only the GRU reads b_hn
    consts = {
        "CELL": cell, "G": gate_count(cell), "GS": gate_slots(cell),
        "HAS_LENGTHS": lengths is not None, "SAVE": need_backward,
        "DOT_PRECISION": precision or dot_precision(xg.dtype, dev),
        "INTERPRETED": interpreter_active(),
    }  # fmt: skip

    if choose_kernel(B, H, P, xg.dtype, dev, kernel, cell=cell) == "persistent":
        cfg = persistent_config(B, H, P, xg.dtype, num_sms(dev), interpreter_active(), False, cell)
        assert cfg is not None  # choose_kernel said it applies
        grid = (triton.cdiv(B, cfg.block_b), triton.cdiv(H, cfg.block_h))
        sync = torch.zeros(grid[0], device=dev, dtype=torch.int32)
        c_n = torch.empty_like(c0)
        _lstm_fwd_persistent_kernel[grid](
            xg, h0, c0, w_hh, b, lens, gates, cs, hs, c_n, sync, T, B,
            H=H, BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k,
            KP=padded_k(H), W_RESIDENT=cfg.w_resident, REVERSE=reverse,
            num_warps=cfg.num_warps, launch_cooperative_grid=True, **consts,
        )  # fmt: skip
        return ForwardResult(hs, c_n, gates, cs, no_hraw)

    cfg = step_config(B, H, xg.dtype, num_sms(dev), interpreter_active(), cell)
    grid = (triton.cdiv(B, cfg.block_b), triton.cdiv(H, cfg.block_h))
    c_state = c0.clone()  # state_{t-1} in, state_t out: each program reads and writes its tile
    w_hr_t = w_hr.t() if w_hr is not None else None
    consts |= {
        "H": H, "P": P, "BLOCK_B": cfg.block_b, "BLOCK_H": cfg.block_h, "BLOCK_K": cfg.block_k,
        "KP": padded_k(P), "W_RESIDENT": cfg.w_resident, "CARRY_H": w_hr is None,
        "num_warps": cfg.num_warps,
    }  # fmt: skip
    prev = -1
    # Launch-invariant arguments are computed once above: the loop runs T times from Python.
    for t in range(T - 1, -1, -1) if reverse else range(T):
        first = prev < 0
        _lstm_fwd_step_kernel[grid](
            xg, h0 if first else hs, c_state, w_hh, b, lens, gates, cs, hraw,
            t, 0 if first else prev, B, **consts,
        )  # fmt: skip
        if w_hr_t is not None:
            # The projection needs all H units of o*tanh(c_t): a GEMM between two launches.
            h_t = hraw[t] @ w_hr_t
            if lengths is not None:
                h_t = torch.where((lengths > t).unsqueeze(1), h_t, h0 if first else hs[prev])
            hs[t] = h_t
        prev = t
    return ForwardResult(hs, c_state, gates, cs, hraw if w_hr is not None else no_hraw)
