"""LSTM forward recurrence: a fused Triton kernel per time step, and its launcher.

Glossary: T time, B batch, H hidden units, P size of h (proj_size or H), G = 4 gates.

The input half of the gates (``x @ W_ih^T + b``, all steps at once) is computed before this
recurrence as one GEMM. Each launch of ``_lstm_fwd_step_kernel`` then does, for one time step and
one (batch tile, hidden tile), ``h_{t-1} @ W_hh^T`` as one ``tl.dot`` over the four gates with
float32 accumulation, the gate nonlinearities and the cell update, and writes ``h_t``, ``c_t``
(float32) and the gate activations that backward reads instead of recomputing the GEMM.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastpar.ops import interpreter_active
from fastpar.ops.lstm_common import (
    cell_forward,
    dot_acc,
    dot_precision,
    dot_upcast,
    gate_columns,
    num_sms,
    persistent_config,
    split_gates,
    step_config,
    store_gates,
)

KernelChoice = Literal["auto", "step", "persistent"]


# Time indices change every launch: not specialising on them (== 1, % 16) keeps one binary.
@triton.jit(do_not_specialize=["t", "t_prev"])
def _lstm_fwd_step_kernel(
    xg_ptr,  # (T, B, 4H) input projection with biases, input dtype
    hprev_ptr,  # (T, B, P) hs at t_prev, or (B, P) h0 with stride_hprev_t = 0
    cprev_ptr,  # (T, B, H) float32 c at t_prev, or (B, H) c0 with stride_cprev_t = 0
    w_ptr,  # (4H, P) W_hh, contiguous
    len_ptr,  # (B,) int32 valid lengths; read only when HAS_LENGTHS
    gates_ptr,  # (T, B, 4H) float32 out: activations i, f, g, o
    c_ptr,  # (T, B, H) float32 out
    h_ptr,  # (T, B, H) out, input dtype: h_t, or o*tanh(c_t) before the projection
    t,
    t_prev,
    B,
    stride_hprev_t,
    stride_cprev_t,
    H: tl.constexpr,  # model sizes are compile-time: only B and T change between calls
    P: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    CARRY_H: tl.constexpr,  # keep h over invalid steps here (no projection: h_t has H units)
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    HPREV_CACHE: tl.constexpr,  # "" (step kernel) or ".cg" (persistent: h_{t-1} from L2)
):
    """One time step for one (batch tile, hidden tile) = program (0, 1); launched once per step,
    or called in a loop by the persistent kernel."""
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    j0 = pid_h * BLOCK_H
    offs_j = j0 + tl.arange(0, BLOCK_H)
    mask_b = offs_b < B
    mask = mask_b[:, None] & (offs_j < H)[None, :]
    cols, mask_n = gate_columns(j0, H, BLOCK_H)
    # Time offsets reach T*B*4H elements: 64-bit so long sequences do not wrap.
    t64 = t.to(tl.int64)
    tp64 = t_prev.to(tl.int64)
    hprev = hprev_ptr + tp64 * stride_hprev_t + offs_b[:, None] * P
    w_rows = w_ptr + cols.to(tl.int64)[None, :] * P

    acc = tl.zeros((BLOCK_B, 4 * BLOCK_H), dtype=tl.float32)
    for k0 in range(0, P, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < P
        h = tl.load(
            hprev + offs_k[None, :],
            mask=mask_b[:, None] & mask_k[None, :],
            other=0.0,
            cache_modifier=HPREV_CACHE,
        )
        # W_hh is the one operand reused every step: ask the caches to keep it.
        w = tl.load(
            w_rows + offs_k[:, None],
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
            eviction_policy="evict_last",
        )
        acc = dot_acc(h, w, acc, DOT_PRECISION, DOT_UPCAST)

    row4 = t64 * B * 4 * H + offs_b * (4 * H)
    xg = tl.load(
        xg_ptr + row4[:, None] + cols[None, :],
        mask=mask_b[:, None] & mask_n[None, :],
        other=0.0,
        eviction_policy="evict_first",
    )
    pre_i, pre_f, pre_g, pre_o = split_gates(acc + xg.to(tl.float32), BLOCK_B, BLOCK_H)
    cprev = tl.load(
        cprev_ptr + tp64 * stride_cprev_t + offs_b[:, None] * H + offs_j[None, :],
        mask=mask,
        other=0.0,
    )
    i, f, g, o, c, h_new = cell_forward(pre_i, pre_f, pre_g, pre_o, cprev)
    if HAS_LENGTHS:
        # Past its length a sequence keeps its state, so h_n/c_n are those of its last step.
        valid = (t < tl.load(len_ptr + offs_b, mask=mask_b, other=0))[:, None]
        c = tl.where(valid, c, cprev)
        if CARRY_H:
            h_old = tl.load(
                hprev + offs_j[None, :], mask=mask, other=0.0, cache_modifier=HPREV_CACHE
            )
            h_new = tl.where(valid, h_new, h_old.to(tl.float32))

    store_gates(gates_ptr, row4, offs_j, mask, i, f, g, o, H)
    row = t64 * B * H + offs_b * H
    tl.store(c_ptr + row[:, None] + offs_j[None, :], c, mask=mask)
    tl.store(h_ptr + row[:, None] + offs_j[None, :], h_new.to(h_ptr.dtype.element_ty), mask=mask)


class ForwardResult(NamedTuple):
    """What the forward recurrence returns; everything but hs and c_n is saved for backward."""

    hs: Tensor  # (T, B, P) h after each step, input dtype
    c_n: Tensor  # (B, H) float32 cell state after the last step processed
    gates: Tensor  # (T, B, 4H) float32 gate activations
    cs: Tensor  # (T, B, H) float32 cell states
    hraw: Tensor  # (T, B, H) o*tanh(c) before the projection; empty (0,) without one


def lstm_forward(
    xg: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None = None,
    lengths: Tensor | None = None,
    reverse: bool = False,
    kernel: KernelChoice = "auto",
) -> ForwardResult:
    """Run the recurrence of one layer and direction with the Triton kernels.

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

    Returns:
        ForwardResult.
    """
    T, B, G = xg.shape
    H = G // 4
    P = w_hh.shape[1]
    dev = xg.device
    w_hh = w_hh.contiguous()
    h0 = h0.contiguous()
    c0 = c0.to(torch.float32).contiguous()
    gates = torch.empty(T, B, G, device=dev, dtype=torch.float32)
    cs = torch.empty(T, B, H, device=dev, dtype=torch.float32)
    hs = torch.empty(T, B, P, device=dev, dtype=xg.dtype)
    hraw = hs if w_hr is None else torch.empty(T, B, H, device=dev, dtype=xg.dtype)
    order = range(T - 1, -1, -1) if reverse else range(T)
    if T == 0:
        return ForwardResult(hs, c0, gates, cs, hraw[:0] if w_hr is not None else hs.new_empty(0))

    if choose_kernel(B, H, P, xg.dtype, dev, kernel) == "persistent":
        from fastpar.ops.lstm_persistent import lstm_forward_persistent

        lstm_forward_persistent(xg, h0, c0, w_hh, lengths, reverse, gates, cs, hs)
        return ForwardResult(hs, cs[0 if reverse else T - 1], gates, cs, hs.new_empty(0))

    cfg = step_config(B, H, xg.dtype, num_sms(dev))
    grid = (triton.cdiv(B, cfg.block_b), triton.cdiv(H, cfg.block_h))
    lens = lengths if lengths is not None else xg  # any pointer: unread without HAS_LENGTHS
    w_hr_t = w_hr.t() if w_hr is not None else None
    prev = -1
    # Launch-invariant arguments, computed once: the loop runs T times from Python.
    consts = {
        "H": H, "P": P, "BLOCK_B": cfg.block_b, "BLOCK_H": cfg.block_h, "BLOCK_K": cfg.block_k,
        "HAS_LENGTHS": lengths is not None, "CARRY_H": w_hr is None,
        "DOT_PRECISION": dot_precision(xg.dtype), "DOT_UPCAST": dot_upcast(xg.dtype),
        "HPREV_CACHE": "", "num_warps": cfg.num_warps,
    }  # fmt: skip
    for t in order:
        first = prev < 0
        _lstm_fwd_step_kernel[grid](
            xg, h0 if first else hs, c0 if first else cs, w_hh, lens, gates, cs, hraw,
            t, 0 if first else prev, B, 0 if first else B * P, 0 if first else B * H, **consts,
        )  # fmt: skip
        if w_hr_t is not None:
            # The projection needs all H units of o*tanh(c_t): a GEMM between two launches.
            h_t = hraw[t] @ w_hr_t
            if lengths is not None:
                h_t = torch.where((lengths > t).unsqueeze(1), h_t, h0 if first else hs[prev])
            hs[t] = h_t
        prev = t
    c_n = cs[prev]
    return ForwardResult(hs, c_n, gates, cs, hraw if w_hr is not None else hs.new_empty(0))


def choose_kernel(
    batch: int,
    hidden: int,
    proj: int,
    dtype: torch.dtype,
    device: torch.device,
    kernel: KernelChoice = "auto",
    backward: bool = False,
) -> Literal["step", "persistent"]:
    """Step or persistent kernel for this shape, forward or backward.

    "auto" takes the persistent kernel wherever it applies on a GPU (its W_hh share fits in L1,
    the grid fits in the SMs, no projection): it saves T-1 launches and keeps W_hh on chip. In
    the interpreter "auto" keeps the step kernel, which is the one real GPUs also run for the
    shapes the persistent kernel rejects.
    """
    if kernel == "step":
        return "step"
    cfg = persistent_config(
        batch, hidden, proj, dtype, num_sms(device), interpreter_active(), backward
    )
    if kernel == "persistent":
        if cfg is None and backward:
            # Backward follows a persistent forward where it can; its hidden tile is 16 wide
            # (a tl.dot N), so its W_hh share is larger and fits on chip for fewer shapes.
            return "step"
        if cfg is None:
            raise ValueError(
                f"kernel='persistent' does not apply to batch {batch}, hidden_size {hidden}, "
                f"proj {proj}, {dtype}: needs no projection, the W_hh share on chip and a grid "
                "no larger than the number of SMs"
            )
        return "persistent"
    if kernel != "auto":
        raise ValueError(f"kernel must be 'auto', 'step' or 'persistent', got {kernel!r}")
    return "persistent" if cfg is not None and not interpreter_active() else "step"
