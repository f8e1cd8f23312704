"""Persistent LSTM forward: one launch runs all T steps.

Glossary: T time, B batch, H hidden units (= P: the kernel does not run with a projection),
G = 4 gates.

Each program owns ``BLOCK_B`` batch rows and ``BLOCK_H`` hidden units for the whole sequence and
loops over time inside the kernel, running the same fused step as the step kernel
(``fwd_step``). Its share of W_hh (``4*BLOCK_H`` rows, at most PERSISTENT_W_BYTES) is re-read
every step with an evict-last policy while every other load bypasses L1 (``.cg``) or is marked
evict-first, so the share stays in the SM's L1 rather than being fetched from L2 each step.
(Holding it in registers instead, as one (H, 4*BLOCK_H) tile, made ptxas spill kilobytes at the
benchmark shapes: see bench/kernel_report.py.)

The programs of one batch block need every hidden unit of ``h_{t-1}``, so after each step they
meet at a grid barrier: a counter per batch block that each program increments (release) and
then waits on (acquire) until all ``n_h`` programs have arrived. All programs must be resident
at once: the launcher keeps the grid within the number of SMs (see ``persistent_config``).
Triton's interpreter runs programs one after another, so there a batch block is one program
covering every hidden unit and the barrier only counts that program; that the barrier holds
across programs is something only a GPU run can show (tests marked gpu).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastpar.ops import interpreter_active
from fastpar.ops.lstm_common import dot_precision, dot_upcast, num_sms, persistent_config
from fastpar.ops.lstm_forward import fwd_step


@triton.jit
def _grid_barrier(sync_ptr, arrivals):
    """Wait until ``arrivals`` programs have reached this point (counter at sync_ptr)."""
    tl.debug_barrier()  # every warp of this program has issued its stores
    tl.atomic_add(sync_ptr, 1, sem="release", scope="gpu")
    while tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu") < arrivals:
        pass


@triton.jit
def _lstm_fwd_persistent_kernel(
    xg_ptr,  # (T, B, 4H) input projection with biases, input dtype
    h0_ptr,  # (B, H) initial hidden state, input dtype
    c0_ptr,  # (B, H) float32 initial cell state
    w_ptr,  # (4H, H) W_hh, contiguous
    len_ptr,  # (B,) int32 valid lengths; read only when HAS_LENGTHS
    gates_ptr,  # (T, B, 4H) float32 out: activations i, f, g, o
    c_ptr,  # (T, B, H) float32 out
    h_ptr,  # (T, B, H) out, input dtype; also read back as h_{t-1} by every program
    sync_ptr,  # (cdiv(B, BLOCK_B),) int32 zeros: the barrier counter per batch block
    T,
    B,
    H: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    REVERSE: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    n_h = tl.num_programs(1)
    sync = sync_ptr + pid_b
    zero = pid_b * 0  # a runtime 0: fwd_step casts its time indices to int64
    t = T - 1 + zero if REVERSE else zero
    fwd_step(
        xg_ptr, h0_ptr, c0_ptr, w_ptr, len_ptr, gates_ptr, c_ptr, h_ptr,
        t, zero, B, 0, 0, pid_b, pid_h,
        H, H, BLOCK_B, BLOCK_H, BLOCK_K, HAS_LENGTHS, True, DOT_PRECISION, DOT_UPCAST, ".cg",
    )  # fmt: skip
    _grid_barrier(sync, n_h)
    s = 1
    # A while loop: T is a runtime value (no recompilation per sequence length).
    while s < T:
        if REVERSE:
            t = T - 1 - s
            t_prev = t + 1
        else:
            t = s
            t_prev = s - 1
        # .cg: h_{t-1} was written by other SMs; read it from L2, not a stale L1 line.
        fwd_step(
            xg_ptr, h_ptr, c_ptr, w_ptr, len_ptr, gates_ptr, c_ptr, h_ptr,
            t, t_prev, B, B * H, B * H, pid_b, pid_h,
            H, H, BLOCK_B, BLOCK_H, BLOCK_K, HAS_LENGTHS, True, DOT_PRECISION, DOT_UPCAST, ".cg",
        )  # fmt: skip
        s += 1
        _grid_barrier(sync, s * n_h)


def lstm_forward_persistent(
    xg: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    lengths: Tensor | None,
    reverse: bool,
    gates: Tensor,
    cs: Tensor,
    hs: Tensor,
) -> None:
    """Run all steps of one layer and direction in one launch, writing into the given outputs.

    Arguments:
        xg: (T, B, 4H) contiguous input projection with biases.
        h0: (B, H) contiguous, xg's dtype; c0: (B, H) contiguous float32.
        w_hh: (4H, H) contiguous; lengths: (B,) int32 or None; reverse: time from T-1 down.
        gates: (T, B, 4H) float32 out; cs: (T, B, H) float32 out; hs: (T, B, H) out.
    """
    T, B, G = xg.shape
    H = G // 4
    cfg = persistent_config(B, H, H, xg.dtype, num_sms(xg.device), interpreter_active())
    if cfg is None:
        raise ValueError(f"the persistent kernel does not apply to B={B}, H={H}, {xg.dtype}")
    grid = (triton.cdiv(B, cfg.block_b), triton.cdiv(H, cfg.block_h))
    sync = torch.zeros(grid[0], device=xg.device, dtype=torch.int32)
    _lstm_fwd_persistent_kernel[grid](
        xg, h0, c0, w_hh, lengths if lengths is not None else sync, gates, cs, hs, sync,
        T, B, H=H, BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k, REVERSE=reverse,
        HAS_LENGTHS=lengths is not None, DOT_PRECISION=dot_precision(xg.dtype),
        DOT_UPCAST=dot_upcast(xg.dtype),
        num_warps=cfg.num_warps,
    )  # fmt: skip
