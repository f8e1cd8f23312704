"""LSTM backward recurrence: a fused Triton kernel per time step, weight gradients as GEMMs.

Glossary: T time, B batch, H hidden units, P size of h (proj_size or H), G = 4 gates.

Going back in time, one launch of ``_lstm_bwd_step_kernel`` for step t and one (batch tile,
hidden tile) computes ``dh_t = dhs_t + dgates_{t+1} @ W_hh`` (one ``tl.dot`` over the 4H gate
rows, float32 accumulation), then the gate gradients from the saved activations, and carries
``dc`` to step t-1. Each program owns its hidden tile of the carried ``dh``/``dc`` and of
``dgates_t``, so nothing is accumulated across programs: no atomics, and the same inputs give
bitwise-identical gradients. ``dW_hh = sum_t dgates_t^T h_{t-1}`` and the projection's gradient
are single GEMMs over all steps after the loop; ``dgates`` is also the gradient of the input
projection, whose weight and bias gradients autograd computes as GEMMs too.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastpar.ops.lstm_common import (
    dot_acc,
    dot_precision,
    dot_upcast,
    load_gates,
    num_sms,
    step_config,
    store_gates,
    tanh,
)
from fastpar.ops.lstm_forward import choose_kernel


# Time indices change every launch: not specialising on them (== 1, % 16) keeps one binary.
@triton.jit(do_not_specialize=["t", "t_next", "t_prev"])
def _lstm_bwd_step_kernel(
    dgates_ptr,  # (T, B, 4H) out at t, input dtype; read at t_next when HAS_NEXT
    w_ptr,  # (4H, H) W_hh, contiguous; read only when HAS_REC
    dh_ptr,  # HAS_REC: (T, B, H) gradient of hs; else (B, H) float32 gradient of o*tanh(c_t)
    gates_ptr,  # (T, B, 4H) float32 saved activations
    c_ptr,  # (T, B, H) float32 saved cell states
    cprev_ptr,  # (T, B, H) float32 c at t_prev, or (B, H) c0 with stride_cprev_t = 0
    len_ptr,  # (B,) int32 valid lengths; read only when HAS_LENGTHS
    dh_carry_ptr,  # (B, H) float32 in/out: gradient reaching h_t through skipped steps (HAS_REC)
    dc_carry_ptr,  # (B, H) float32 in/out: gradient of c_t in, of c_{t-1} out
    t,
    t_next,
    t_prev,
    B,
    stride_cprev_t,
    H: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_REC: tl.constexpr,  # fuse dh_t = dhs_t + dgates_{t+1} @ W_hh (no projection)
    HAS_NEXT: tl.constexpr,  # a later step exists (false for the first step of backward)
    HAS_LENGTHS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    DG_CACHE: tl.constexpr,  # "" (step kernel) or ".cg" (persistent: dgates_{t+1} from L2)
):
    """One backward step for one (batch tile, hidden tile) = program (0, 1); launched once per
    step, or called in a loop by the persistent kernel."""
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_j = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_b = offs_b < B
    mask_j = offs_j < H
    mask = mask_b[:, None] & mask_j[None, :]
    t64 = t.to(tl.int64)
    row = t64 * B * H + offs_b * H
    row4 = t64 * B * 4 * H + offs_b * (4 * H)
    carry = offs_b[:, None] * H + offs_j[None, :]

    if HAS_REC:
        dh = tl.load(dh_ptr + row[:, None] + offs_j[None, :], mask=mask, other=0.0)
        dh = dh.to(tl.float32) + tl.load(dh_carry_ptr + carry, mask=mask, other=0.0)
        if HAS_NEXT:
            dg_next = dgates_ptr + t_next.to(tl.int64) * B * 4 * H + offs_b[:, None] * (4 * H)
            acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            for k0 in range(0, 4 * H, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < 4 * H
                dg = tl.load(
                    dg_next + offs_k[None, :],
                    mask=mask_b[:, None] & mask_k[None, :],
                    other=0.0,
                    cache_modifier=DG_CACHE,
                )
                # W_hh is the one operand reused every step: ask the caches to keep it.
                w = tl.load(
                    w_ptr + offs_k.to(tl.int64)[:, None] * H + offs_j[None, :],
                    mask=mask_k[:, None] & mask_j[None, :],
                    other=0.0,
                    eviction_policy="evict_last",
                )
                acc = dot_acc(dg, w, acc, DOT_PRECISION, DOT_UPCAST)
            dh += acc
    else:
        dh = tl.load(dh_ptr + carry, mask=mask, other=0.0)

    dc = tl.load(dc_carry_ptr + carry, mask=mask, other=0.0)
    i, f, g, o = load_gates(gates_ptr, row4, offs_j, mask, H)
    c = tl.load(c_ptr + row[:, None] + offs_j[None, :], mask=mask, other=0.0)
    cprev = tl.load(cprev_ptr + t_prev.to(tl.int64) * stride_cprev_t + carry, mask=mask, other=0.0)
    tc = tanh(c)
    dc_total = dc + dh * o * (1.0 - tc * tc)
    d_o = dh * tc * o * (1.0 - o)
    d_i = dc_total * g * i * (1.0 - i)
    d_f = dc_total * cprev * f * (1.0 - f)
    d_g = dc_total * i * (1.0 - g * g)
    dc_prev = dc_total * f
    if HAS_LENGTHS:
        # A skipped step passes h and c through unchanged: so do their gradients.
        valid = (t < tl.load(len_ptr + offs_b, mask=mask_b, other=0))[:, None]
        d_i = tl.where(valid, d_i, 0.0)
        d_f = tl.where(valid, d_f, 0.0)
        d_g = tl.where(valid, d_g, 0.0)
        d_o = tl.where(valid, d_o, 0.0)
        dc_prev = tl.where(valid, dc_prev, dc)
        if HAS_REC:
            tl.store(dh_carry_ptr + carry, tl.where(valid, 0.0, dh), mask=mask)
    elif HAS_REC:
        tl.store(dh_carry_ptr + carry, tl.zeros_like(dh), mask=mask)
    store_gates(dgates_ptr, row4, offs_j, mask, d_i, d_f, d_g, d_o, H)
    tl.store(dc_carry_ptr + carry, dc_prev, mask=mask)


class BackwardResult(NamedTuple):
    """Gradients of the recurrence's inputs."""

    dxg: Tensor  # (T, B, 4H) gradient of the input projection (= of the gate pre-activations)
    dh0: Tensor  # (B, P)
    dc0: Tensor  # (B, H) float32
    dw_hh: Tensor  # (4H, P)
    dw_hr: Tensor | None  # (P, H)


def _grad_wrt_prev(dgates: Tensor, w_hh: Tensor, t: int) -> Tensor:
    """(B, P) float32 ``dgates_t @ W_hh``: the gradient reaching h_{t-1} through the gates."""
    return dgates[t].float() @ w_hh.float()


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
) -> BackwardResult:
    """Gradients of one layer and direction of the recurrence (see lstm_forward).

    Arguments:
        dhs: (T, B, P) gradient of hs (it includes the gradient of h_n, which is an element of hs).
        dc_n: (B, H) gradient of c_n, or None.
        h0, c0, w_hh, w_hr, lengths, reverse: the forward's arguments.
        hs, gates, cs, hraw: the forward's outputs (ForwardResult).
        kernel: "auto", "step" or "persistent", as for lstm_forward.

    Returns:
        BackwardResult; dh0 and the weight gradients in the dtype of their forward tensor.
    """
    T, B, P = dhs.shape
    H = cs.shape[2]
    dev = dhs.device
    w_hh = w_hh.contiguous()
    dhs = dhs.contiguous()
    c0 = c0.to(torch.float32).contiguous()
    dgates = torch.empty(T, B, 4 * H, device=dev, dtype=hs.dtype)
    dc_carry = (
        dc_n.to(torch.float32).clone()
        if dc_n is not None
        else torch.zeros(B, H, device=dev, dtype=torch.float32)
    )
    order = list(range(T)) if reverse else list(range(T - 1, -1, -1))
    if T == 0:
        return BackwardResult(
            dgates, torch.zeros_like(h0), dc_carry, torch.zeros_like(w_hh),
            None if w_hr is None else torch.zeros_like(w_hr),
        )  # fmt: skip

    has_rec = w_hr is None
    dh_carry = torch.zeros(B, P, device=dev, dtype=torch.float32)
    dhp = None if has_rec else torch.empty(T, B, P, device=dev, dtype=torch.float32)
    persistent = choose_kernel(B, H, P, hs.dtype, dev, kernel, backward=True) == "persistent"
    if persistent:
        from fastpar.ops.lstm_persistent import lstm_backward_persistent

        lstm_backward_persistent(
            dgates, w_hh, dhs, gates, cs, c0, lengths, reverse, dh_carry, dc_carry
        )
    cfg = step_config(B, H, hs.dtype, num_sms(dev))
    grid = (triton.cdiv(B, cfg.block_b), triton.cdiv(H, cfg.block_h_bwd))
    lens = lengths if lengths is not None else dgates
    step = -1 if reverse else 1  # the forward pass went t_prev -> t = t_prev + step
    w_hr_f = None if w_hr is None else w_hr.float()
    # Launch-invariant arguments, computed once: the loop runs T times from Python.
    consts = {
        "H": H, "BLOCK_B": cfg.block_b, "BLOCK_H": cfg.block_h_bwd, "BLOCK_K": cfg.block_k,
        "HAS_REC": has_rec, "HAS_LENGTHS": lengths is not None,
        "DOT_PRECISION": dot_precision(hs.dtype), "DOT_UPCAST": dot_upcast(hs.dtype),
        "DG_CACHE": "", "num_warps": cfg.num_warps,
    }  # fmt: skip
    for n, t in enumerate([] if persistent else order):
        first_fwd = n == T - 1  # the first step of the forward pass reads h0 and c0
        t_prev = 0 if first_fwd else t - step
        dh_in = dhs
        if not has_rec:
            # With a projection the gradient of h_t needs all P units: GEMMs between launches.
            dh_state = dhs[t].float() + dh_carry
            if n > 0:
                dh_state += _grad_wrt_prev(dgates, w_hh, order[n - 1])
            if lengths is not None:
                valid = (lengths > t).unsqueeze(1)
                dh_carry = torch.where(valid, 0.0, dh_state)
                dh_state = torch.where(valid, dh_state, 0.0)
            dhp[t] = dh_state
            dh_in = dh_state @ w_hr_f
        _lstm_bwd_step_kernel[grid](
            dgates, w_hh, dh_in, gates, cs, c0 if first_fwd else cs, lens, dh_carry, dc_carry,
            t, order[n - 1] if n > 0 else 0, t_prev, B, 0 if first_fwd else B * H,
            HAS_NEXT=n > 0, **consts,
        )  # fmt: skip

    t_first = order[-1]
    dh0 = (dh_carry + _grad_wrt_prev(dgates, w_hh, t_first)).to(h0.dtype)
    # h_{t-1} of every step but the first forward one is hs shifted by one step.
    if reverse:
        dg_rest, h_rest = dgates[:-1], hs[1:]
    else:
        dg_rest, h_rest = dgates[1:], hs[:-1]
    dw_hh = dgates[t_first].float().t() @ h0.float()
    if T > 1:
        dw_hh += (dg_rest.reshape(-1, 4 * H).t() @ h_rest.reshape(-1, P)).float()
    dw_hr = None
    if dhp is not None:
        dw_hr = (dhp.reshape(-1, P).t() @ hraw.reshape(-1, H).float()).to(w_hr.dtype)
    return BackwardResult(dgates, dh0, dc_carry, dw_hh.to(w_hh.dtype), dw_hr)
