"""Launcher of the backward recurrence of every cell (step or persistent kernels), and the weight
gradients as GEMMs over all steps.

Glossary: T time, B batch, H hidden units, P size of h (proj_size or H), G gates per unit (LSTM
4, GRU 3, RNN 1), GS gate slots (4, 4, 1).

The kernels (lstm_step.py, lstm_persistent.py) produce ``dgates`` (T, B, GS*H), the gradient
of the gate pre-activations. For the LSTM and the RNN it is also the gradient of the input
projection (whose weight and bias gradients autograd computes as GEMMs); the GRU's holds d(hn),
the gradient of ``h_{t-1} W_hn^T + b_hn``, in its third slot and that of the input part of n in
its fourth. ``dW_hh = sum_t dgates_t[:, :G*H]^T h_{t-1}`` is then one GEMM over all steps,
accumulated and returned in float32 before the cast to W_hh's dtype, the GRU's ``db_hn`` the
sum of d(hn), and the projection's gradient another GEMM.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
from torch import Tensor

from fastpar.ops import interpreter_active
from fastpar.ops.lstm_config import (
    CellKind,
    choose_kernel,
    dot_precision,
    gate_count,
    gate_slots,
    num_sms,
    persistent_config,
    step_config,
)
from fastpar.ops.lstm_forward import Precision
from fastpar.ops.lstm_persistent import _lstm_bwd_persistent_kernel
from fastpar.ops.lstm_step import _lstm_bwd_step_kernel


class BackwardResult(NamedTuple):
    """Gradients of the recurrence's inputs."""

    dxg: Tensor  # (T, B, G*H) gradient of the input projection
    dh0: Tensor  # (B, P)
    dc0: Tensor  # (B, H) float32 (LSTM; zeros for the other cells)
    dw_hh: Tensor | None  # (G*H, P); None when the weight gradients were not asked for
    dw_hr: Tensor | None  # (P, H)
    db_hn: Tensor | None = None  # (H,) float32, GRU
    dhn: Tensor | None = None  # (T, B, H) GRU: gradient of h_{t-1} W_hn^T + b_hn (a view)
    dhp: Tensor | None = None  # (T, B, P) float32, projection: the gradient reaching each h_t


def _grad_wrt_prev(dgates: Tensor, w_hh: Tensor, t: int) -> Tensor:
    """(B, P) float32 ``dgates_t[:, :G*H] @ W_hh``: the gradient reaching h_{t-1} through the
    gates."""
    return dgates[t, :, : w_hh.shape[0]].float() @ w_hh.float()


def matmul_fp32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` accumulated and returned in float32, whatever the operands' dtype.

    On CUDA, half-type operands go through cuBLAS with a float32 output (``out_dtype``), so no
    partial sum is rounded to the half type; elsewhere the operands are widened first.
    """
    if a.dtype != torch.float32 and a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def weight_grad_hh(dgates: Tensor, hs: Tensor, h0: Tensor, reverse: bool) -> Tensor:
    """(4H, P) float32 ``sum_t dgates_t^T h_{t-1}`` as one GEMM over all T*B rows.

    h_{t-1} is hs shifted by one step with h0 in front (at the end when reverse).
    """
    T, B, G = dgates.shape
    P = hs.shape[2]
    if reverse:
        h_prev = torch.cat([hs[1:], h0.unsqueeze(0)])
    else:
        h_prev = torch.cat([h0.unsqueeze(0), hs[:-1]])
    return matmul_fp32(dgates.reshape(T * B, G).t(), h_prev.reshape(T * B, P))


def weight_grad_hr(dhp: Tensor, hraw: Tensor) -> Tensor:
    """(P, H) float32 ``sum_t dhp_t^T hraw_t``, the projection's weight gradient, as one GEMM.

    dhp: (T, B, P) the gradient reaching each h_t; hraw: (T, B, H) o*tanh(c_t) before the
    projection.
    """
    return matmul_fp32(dhp.reshape(-1, dhp.shape[2]).t(), hraw.reshape(-1, hraw.shape[2]))


def _backward_steps(
    grid: tuple[int, int],
    consts: dict,
    dgates: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None,
    dhs: Tensor,
    gates: Tensor,
    state: Tensor,
    state0: Tensor,
    lens: Tensor,
    lengths: Tensor | None,
    dh_carry: Tensor,
    dc_carry: Tensor,
    order: list[int],
    reverse: bool,
) -> Tensor | None:
    """Launch the backward step kernel for every step (in backward order), writing dgates.

    Returns, with a projection, (T, B, P) float32: the gradient reaching each h_t, whose product
    with o*tanh(c_t) over all steps is the projection's weight gradient; else None.
    """
    T, B, P = dhs.shape
    step = -1 if reverse else 1  # the forward pass went t_prev -> t = t_prev + step
    dhp = None if w_hr is None else torch.empty(T, B, P, device=dhs.device, dtype=torch.float32)
    w_hr_f = None if w_hr is None else w_hr.float()
    for n, t in enumerate(order):
        first_fwd = n == T - 1  # the first step of the forward pass reads h0 and c0
        dh_in = dhs
        if dhp is not None:
            # With a projection the gradient of h_t needs all P units: GEMMs between launches.
            dh_state = dhs[t].float() + dh_carry
            if n > 0:
                dh_state += _grad_wrt_prev(dgates, w_hh, order[n - 1])
            if lengths is not None:
                valid = (lengths > t).unsqueeze(1)
                dh_carry.copy_(torch.where(valid, 0.0, dh_state))
                dh_state = torch.where(valid, dh_state, 0.0)
            dhp[t] = dh_state
            dh_in = dh_state @ w_hr_f
        _lstm_bwd_step_kernel[grid](
            dgates, w_hh, dh_in, gates, state, state0 if first_fwd else state, lens, dh_carry,
            dc_carry,
            t, order[n - 1] if n > 0 else 0, 0 if first_fwd else t - step, B,
            HAS_NEXT=n > 0, **consts,
        )  # fmt: skip
    return dhp


def lstm_backward(
    dhs: Tensor,
    dc_n: Tensor | None,
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
    kernel: str = "auto",
    precision: Precision | None = None,
    *,
    need_weight_grads: bool = True,
) -> BackwardResult:
    """Gradients of one layer and direction of the LSTM recurrence (see lstm_forward).

    Arguments:
        dhs: (T, B, P) gradient of hs (it includes the gradient of h_n, which is an element of hs).
        dc_n: (B, H) gradient of c_n, or None.
        h0, c0, w_hh, w_hr, lengths, reverse: the forward's arguments.
        hs, gates, cs, hraw: the forward's outputs (ForwardResult, run with need_backward).
        kernel: "auto", "step" or "persistent", as for lstm_forward.
        precision: input_precision of float32 dots; None follows torch (see dot_precision).
        need_weight_grads: False skips the dW_hh / dW_hr GEMMs (both None in the result), for
            a backward split into an input pass and a deferred weight pass (weight_grad_hh).

    Returns:
        BackwardResult; dh0 and the weight gradients in the dtype of their forward tensor.
    """
    return recurrence_backward(
        "lstm", dhs, dc_n, h0, c0.to(torch.float32).contiguous(), w_hh, w_hr, lengths, reverse,
        hs, gates, cs, hraw, kernel, precision, need_weight_grads=need_weight_grads,
    )  # fmt: skip


def recurrence_backward(
    cell: CellKind,
    dhs: Tensor,
    dc_n: Tensor | None,
    h0: Tensor,
    state0: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
    hs: Tensor,
    gates: Tensor,
    cs: Tensor,
    hraw: Tensor,
    kernel: str = "auto",
    precision: Precision | None = None,
    *,
    need_weight_grads: bool = True,
) -> BackwardResult:
    """Gradients of one layer and direction of any cell's recurrence (see recurrence_forward).

    Arguments:
        cell: "lstm", "gru", "rnn_tanh" or "rnn_relu".
        dhs: (T, B, P) gradient of hs.
        dc_n: (B, H) LSTM: gradient of c_n, or None.
        h0: (B, P) the forward's h0.
        state0: (B, H) LSTM: float32 c0 (contiguous); other cells: unread (h0 serves).
        w_hh, w_hr, lengths, reverse: the forward's arguments.
        hs, gates, cs, hraw: the forward's outputs (ForwardResult, run with need_backward).
        kernel, precision, need_weight_grads: as lstm_backward.

    Returns:
        BackwardResult; db_hn for the GRU.
    """
    T, B, P = dhs.shape
    G, GS = gate_count(cell), gate_slots(cell)
    H = w_hh.shape[0] // G
    dev = dhs.device
    dtype = hs.dtype
    w_hh = w_hh.contiguous()
    dhs = dhs.contiguous()
    dgates = torch.empty(T, B, GS * H, device=dev, dtype=dtype)
    dc_carry = (
        dc_n.to(torch.float32).clone()
        if dc_n is not None
        else torch.zeros(B, H, device=dev, dtype=torch.float32)
    )
    # What bwd_step reads as state_t and state_{t-1}: c (LSTM) or h (GRU: h_{t-1}; RNN: h_t).
    state, state0 = (cs, state0) if cell == "lstm" else (hs, h0.contiguous())
    if T == 0:
        db_hn = torch.zeros(H, device=dev) if cell == "gru" else None
        dhn = dgates[..., 2 * H : 3 * H] if cell == "gru" else None
        weights = need_weight_grads
        return BackwardResult(
            dgates[..., : G * H], torch.zeros_like(h0), dc_carry,
            torch.zeros_like(w_hh) if weights else None,
            torch.zeros_like(w_hr) if weights and w_hr is not None else None, db_hn, dhn,
        )  # fmt: skip

    has_rec = w_hr is None
    dh_carry = torch.zeros(B, P, device=dev, dtype=torch.float32)
    lens = lengths if lengths is not None else dh_carry  # any pointer: unread without lengths
    consts = {
        "CELL": cell, "G": G, "GS": GS, "HAS_LENGTHS": lengths is not None,
        "DOT_PRECISION": precision or dot_precision(dtype, dev),
        "INTERPRETED": interpreter_active(),
    }  # fmt: skip
    order = list(range(T)) if reverse else list(range(T - 1, -1, -1))
    if choose_kernel(B, H, P, dtype, dev, kernel, backward=True, cell=cell) == "persistent":
        cfg = persistent_config(B, H, H, dtype, num_sms(dev), interpreter_active(), True, cell)
        assert cfg is not None  # choose_kernel said it applies
        grid = (triton.cdiv(B, cfg.block_b), triton.cdiv(H, cfg.block_h))
        sync = torch.zeros(grid[0], device=dev, dtype=torch.int32)
        _lstm_bwd_persistent_kernel[grid](
            dgates, w_hh, dhs, gates, state, state0, lens, dh_carry, dc_carry, sync, T, B,
            H=H, BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k,
            K_SPLIT=cfg.k_split, REVERSE=reverse, num_warps=cfg.num_warps,
            launch_cooperative_grid=True, **consts,
        )  # fmt: skip
        dhp = None
    else:
        cfg = step_config(B, H, dtype, num_sms(dev), interpreter_active(), cell)
        consts |= {
            "H": H, "BLOCK_B": cfg.block_b, "BLOCK_H": cfg.block_h_bwd, "BLOCK_K": cfg.block_k,
            "HAS_REC": has_rec, "K_SPLIT": cfg.k_split, "num_warps": cfg.num_warps,
        }  # fmt: skip
        grid = (triton.cdiv(B, cfg.block_b), triton.cdiv(H, cfg.block_h_bwd))
        dhp = _backward_steps(
            grid, consts, dgates, w_hh, w_hr, dhs, gates, state, state0, lens, lengths,
            dh_carry, dc_carry, order, reverse,
        )  # fmt: skip

    dh0 = (dh_carry + _grad_wrt_prev(dgates, w_hh, order[-1])).to(h0.dtype)
    # The gradient of h_{t-1} @ W_hh^T: all of dgates but the GRU's fourth slot.
    dw_hh = dw_hr = None
    if need_weight_grads:
        dw_hh = weight_grad_hh(dgates[..., : G * H], hs, h0, reverse).to(w_hh.dtype)
    if need_weight_grads and w_hr is not None and dhp is not None:
        dw_hr = weight_grad_hr(dhp, hraw).to(w_hr.dtype)
    dxg, db_hn, dhn = dgates, None, None
    if cell == "gru":
        dxg = torch.cat([dgates[..., : 2 * H], dgates[..., 3 * H :]], dim=2)
        dhn = dgates[..., 2 * H : 3 * H]
        db_hn = dhn.sum(dim=(0, 1), dtype=torch.float32)
    return BackwardResult(dxg, dh0, dc_carry, dw_hh, dw_hr, db_hn, dhn, dhp)
