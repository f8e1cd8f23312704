"""Persistent LSTM forward and backward: one launch runs all T steps.

Glossary: T time, B batch, H hidden units (= P: the kernel does not run with a projection),
G = 4 gates.

Each program owns ``BLOCK_B`` batch rows and ``BLOCK_H`` hidden units for the whole sequence and
loops over time inside the kernel, running the same fused step as the step kernel
(the step kernels' functions; backward: whose share is W_hh's columns of its hidden units). Its
share of W_hh (``4*BLOCK_H`` rows, at most PERSISTENT_W_BYTES) is re-read
every step with an evict-last policy while every other load bypasses L1 (``.cg``) or is marked
evict-first, so the share stays in the SM's L1 rather than being fetched from L2 each step.
(Holding it in registers instead, as one (H, 4*BLOCK_H) tile, made ptxas spill kilobytes at the
benchmark shapes: see bench/kernel_report.py.)

The programs of one batch block need every hidden unit of ``h_{t-1}``, so after each step they
meet at a grid barrier: a counter per batch block that each program increments (release) and
then waits on (acquire) until all ``n_h`` programs have arrived. All programs must be resident
at once: the launcher keeps the grid within the number of SMs (see ``persistent_config``) and
launches cooperatively, so CUDA either makes every program resident or fails the launch
instead of letting the barrier wait forever.
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
from fastpar.ops.lstm_backward import _lstm_bwd_step_kernel as bwd_step
from fastpar.ops.lstm_common import dot_precision, dot_upcast, num_sms, persistent_config
from fastpar.ops.lstm_forward import _lstm_fwd_step_kernel as fwd_step


@triton.jit
def _grid_barrier(sync_ptr, arrivals):
    """Wait until ``arrivals`` programs have reached this point (counter at sync_ptr)."""
    tl.debug_barrier()  # every warp of this program has issued its stores
    tl.atomic_add(sync_ptr, 1, sem="release", scope="gpu")
    # Triton lowers this poll to ld.acquire.gpu (no read-modify-write), so waiting programs do
    # not serialise in L2 in front of the arrivals. Its result must be used: an atomic whose
    # result is unused is compiled away.
    while tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu") < arrivals:
        pass


@triton.jit(do_not_specialize=["T"])  # one binary for every sequence length
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
    n_h = tl.num_programs(1)
    sync = sync_ptr + pid_b
    zero = pid_b * 0  # a runtime 0: fwd_step casts its time indices to int64
    t = T - 1 + zero if REVERSE else zero
    fwd_step(
        xg_ptr, h0_ptr, c0_ptr, w_ptr, len_ptr, gates_ptr, c_ptr, h_ptr,
        t, zero, B, 0, 0,
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
            t, t_prev, B, B * H, B * H,
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
    cfg, grid, sync = _launch_geometry(B, H, xg, backward=False)
    _lstm_fwd_persistent_kernel[grid](
        xg, h0, c0, w_hh, lengths if lengths is not None else sync, gates, cs, hs, sync,
        T, B, H=H, BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k, REVERSE=reverse,
        HAS_LENGTHS=lengths is not None, DOT_PRECISION=dot_precision(xg.dtype),
        DOT_UPCAST=dot_upcast(xg.dtype),
        num_warps=cfg.num_warps, launch_cooperative_grid=True,
    )  # fmt: skip


def _launch_geometry(B: int, H: int, like: Tensor, backward: bool):
    """Config, grid and zeroed barrier counters of a persistent launch."""
    cfg = persistent_config(
        B, H, H, like.dtype, num_sms(like.device), interpreter_active(), backward
    )
    if cfg is None:
        raise ValueError(f"the persistent kernel does not apply to B={B}, H={H}, {like.dtype}")
    grid = (triton.cdiv(B, cfg.block_b), triton.cdiv(H, cfg.block_h))
    sync = torch.zeros(grid[0], device=like.device, dtype=torch.int32)
    return cfg, grid, sync


@triton.jit(do_not_specialize=["T"])  # one binary for every sequence length
def _lstm_bwd_persistent_kernel(
    dgates_ptr,  # (T, B, 4H) out, input dtype; dgates_{t+1} is read back by every program
    w_ptr,  # (4H, H) W_hh, contiguous
    dh_ptr,  # (T, B, H) gradient of hs
    gates_ptr,  # (T, B, 4H) float32 saved activations
    c_ptr,  # (T, B, H) float32 saved cell states
    c0_ptr,  # (B, H) float32 initial cell state
    len_ptr,  # (B,) int32 valid lengths; read only when HAS_LENGTHS
    dh_carry_ptr,  # (B, H) float32 in/out (see bwd_step)
    dc_carry_ptr,  # (B, H) float32 in/out
    sync_ptr,  # (cdiv(B, BLOCK_B),) int32 zeros: the barrier counter per batch block
    T,
    B,
    H: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    REVERSE: tl.constexpr,  # the forward pass ran from T-1 down to 0
    HAS_LENGTHS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    # Backward visits the forward's steps in reverse. Forward: t_prev = t - d; backward:
    # t_next = t + d, with d = +1 (or -1 when REVERSE). The last step visited is the forward's
    # first, which reads c0.
    pid_b = tl.program_id(0)
    n_h = tl.num_programs(1)
    sync = sync_ptr + pid_b
    zero = pid_b * 0  # a runtime 0: bwd_step casts its time indices to int64
    d = -1 if REVERSE else 1
    t_first = zero if REVERSE else T - 1 + zero
    t_last = T - 1 + zero if REVERSE else zero
    if T > 1:
        bwd_step(
            dgates_ptr, w_ptr, dh_ptr, gates_ptr, c_ptr, c_ptr, len_ptr, dh_carry_ptr,
            dc_carry_ptr, t_first, zero, t_first - d, B, B * H,
            H, BLOCK_B, BLOCK_H, BLOCK_K, True, False, HAS_LENGTHS, DOT_PRECISION, DOT_UPCAST,
            ".cg",
        )  # fmt: skip
        _grid_barrier(sync, n_h)
        n = 1
        while n < T - 1:
            t = n if REVERSE else T - 1 - n
            # .cg: dgates_{t+1} was written by other SMs; read it from L2, not a stale L1 line.
            bwd_step(
                dgates_ptr, w_ptr, dh_ptr, gates_ptr, c_ptr, c_ptr, len_ptr, dh_carry_ptr,
                dc_carry_ptr, t, t + d, t - d, B, B * H,
                H, BLOCK_B, BLOCK_H, BLOCK_K, True, True, HAS_LENGTHS, DOT_PRECISION,
                DOT_UPCAST, ".cg",
            )  # fmt: skip
            n += 1
            _grid_barrier(sync, n * n_h)
        bwd_step(
            dgates_ptr, w_ptr, dh_ptr, gates_ptr, c_ptr, c0_ptr, len_ptr, dh_carry_ptr,
            dc_carry_ptr, t_last, t_last + d, zero, B, 0,
            H, BLOCK_B, BLOCK_H, BLOCK_K, True, True, HAS_LENGTHS, DOT_PRECISION, DOT_UPCAST,
            ".cg",
        )  # fmt: skip
    else:
        bwd_step(
            dgates_ptr, w_ptr, dh_ptr, gates_ptr, c_ptr, c0_ptr, len_ptr, dh_carry_ptr,
            dc_carry_ptr, t_last, zero, zero, B, 0,
            H, BLOCK_B, BLOCK_H, BLOCK_K, True, False, HAS_LENGTHS, DOT_PRECISION, DOT_UPCAST,
            ".cg",
        )  # fmt: skip


def lstm_backward_persistent(
    dgates: Tensor,
    w_hh: Tensor,
    dhs: Tensor,
    gates: Tensor,
    cs: Tensor,
    c0: Tensor,
    lengths: Tensor | None,
    reverse: bool,
    dh_carry: Tensor,
    dc_carry: Tensor,
) -> None:
    """Run all backward steps of one layer and direction (no projection) in one launch.

    Arguments:
        dgates: (T, B, 4H) out, the gradient of the gate pre-activations, input dtype.
        w_hh: (4H, H) contiguous; dhs: (T, B, H) contiguous gradient of hs.
        gates, cs: the forward's saved (T, B, 4H) and (T, B, H) float32 tensors.
        c0: (B, H) float32 contiguous; lengths: (B,) int32 or None; reverse: of the forward.
        dh_carry: (B, H) float32 zeros in, the gradient reaching h0 past skipped steps out.
        dc_carry: (B, H) float32 gradient of c_n in, of c0 out.
    """
    T, B, H = cs.shape
    cfg, grid, sync = _launch_geometry(B, H, dgates, backward=True)
    _lstm_bwd_persistent_kernel[grid](
        dgates, w_hh, dhs, gates, cs, c0, lengths if lengths is not None else sync,
        dh_carry, dc_carry, sync, T, B,
        H=H, BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k, REVERSE=reverse,
        HAS_LENGTHS=lengths is not None, DOT_PRECISION=dot_precision(dgates.dtype),
        DOT_UPCAST=dot_upcast(dgates.dtype), num_warps=cfg.num_warps,
        launch_cooperative_grid=True,
    )  # fmt: skip
