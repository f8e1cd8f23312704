"""Persistent LSTM forward and backward kernels: one launch runs all T steps.

Glossary: T time, B batch, H hidden units (= P: these kernels do not run with a projection),
G = 4 gates, KP = H rounded up to a power of two.

Each program owns ``BLOCK_B`` batch rows and ``BLOCK_H`` hidden units for the whole sequence and
loops over time inside the kernel, running the step bodies of lstm_step.py.

Forward. v2 (``W_RESIDENT``) loads the program's share of W_hh, a (KP, 4*BLOCK_H) tile, once per
launch and keeps it in registers (Triton hoists the tile, in its dot-operand layout, out of the
time loop), so the barrier's acquire load cannot evict it; c_t stays in registers too. After
storing h_t a program arrives at the barrier, then stores what backward saves and loads the
next step's xg tile, and only then waits. v1 re-reads the share from L1 every step, with every
other load bypassing L1 (``.cg``) or marked evict-first.

The programs of one batch block need every hidden unit of ``h_{t-1}``, so after each step they
meet at a grid barrier: a counter per batch block that each program increments (release) and
then waits on (acquire) until all ``n_h`` programs have arrived. All programs must be resident
at once: the launcher keeps the grid within the number of SMs (see ``persistent_config``) and
launches cooperatively, so CUDA either makes every program resident or fails the launch
instead of letting the barrier wait forever.
Triton's interpreter runs programs one after another, so there a batch block is one program
covering every hidden unit and the barrier only counts that program; that the barrier holds
across programs is something only a GPU run can show (tests marked gpu). The step kernels run
the same bodies with many programs in the interpreter.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastpar.ops.lstm_jit import grid_arrive, grid_wait
from fastpar.ops.lstm_step import (
    bwd_step,
    fwd_step,
    load_w_share,
    load_xg,
    save_step,
    tile_offsets,
)


@triton.jit(do_not_specialize=["T"])  # one binary for every sequence length
def _lstm_fwd_persistent_kernel(
    xg_ptr,  # (T, B, 4H) input projection with biases, input dtype
    h0_ptr,  # (B, H) initial hidden state, input dtype
    c0_ptr,  # (B, H) float32 initial cell state
    w_ptr,  # (4H, H) W_hh, contiguous
    len_ptr,  # (B,) int32 valid lengths; read only when HAS_LENGTHS
    gates_ptr,  # (T, B, 4H) out when SAVE: activations i, f, g, o (saved_gates_dtype)
    cs_ptr,  # (T, B, H) float32 out when SAVE: c_t
    h_ptr,  # (T, B, H) out, input dtype; also read back as h_{t-1} by every program
    c_n_ptr,  # (B, H) float32 out: c after the last step processed
    sync_ptr,  # (cdiv(B, BLOCK_B),) int32 zeros: the barrier counter per batch block
    T,
    B,
    H: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    KP: tl.constexpr,
    W_RESIDENT: tl.constexpr,
    REVERSE: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    SAVE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    n_h = tl.num_programs(1)
    sync = sync_ptr + pid_b
    offs_b, offs_j, _mask_b, mask = tile_offsets(pid_b, pid_h, B, H, BLOCK_B, BLOCK_H)
    tile = offs_b[:, None] * H + offs_j[None, :]
    c = tl.load(c0_ptr + tile, mask=mask, other=0.0)
    w_share = 0
    if W_RESIDENT:
        w_share = load_w_share(w_ptr, pid_h, H, H, KP=KP, BLOCK_H=BLOCK_H)
    zero = pid_b * 0  # a runtime 0: time indices are cast to int64 in the step body
    t = T - 1 + zero if REVERSE else zero
    xg = load_xg(xg_ptr, t, pid_b, pid_h, B, H, BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H)
    hprev = h0_ptr
    s = 0
    # A while loop: T is a runtime value (no recompilation per sequence length).
    while s < T:
        t = T - 1 - s if REVERSE else s
        c_prev = c
        c, i, f, g, o = fwd_step(
            pid_b, pid_h, t, xg=xg, c_prev=c_prev, hprev_ptr=hprev, w_ptr=w_ptr,
            w_share=w_share, len_ptr=len_ptr, h_ptr=h_ptr, B=B, H=H, P=H, BLOCK_B=BLOCK_B,
            BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K, KP=KP, W_RESIDENT=W_RESIDENT,
            HAS_LENGTHS=HAS_LENGTHS, CARRY_H=True, HPREV_CACHE=".cg",
            DOT_PRECISION=DOT_PRECISION, INTERPRETED=INTERPRETED,
        )  # fmt: skip
        grid_arrive(sync)
        # Off the critical path: nothing below needs the other programs' h_t.
        if SAVE:
            save_step(
                pid_b, pid_h, t, c, i, f, g, o, gates_ptr=gates_ptr, cs_ptr=cs_ptr, B=B, H=H,
                BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H,
            )  # fmt: skip
        s += 1
        # The next step's input tile (clamped: the last iteration reloads its own).
        t_next = tl.maximum(T - 1 - s, 0) if REVERSE else tl.minimum(s, T - 1)
        xg = load_xg(xg_ptr, t_next, pid_b, pid_h, B, H, BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H)
        hprev = h_ptr + t.to(tl.int64) * B * H
        # .cg in the step body: h_{t-1} was written by other SMs; read it from L2.
        grid_wait(sync, s * n_h)
    tl.store(c_n_ptr + tile, c, mask=mask)


@triton.jit(do_not_specialize=["T"])  # one binary for every sequence length
def _lstm_bwd_persistent_kernel(
    dgates_ptr,  # (T, B, 4H) out, input dtype; dgates_{t+1} is read back by every program
    w_ptr,  # (4H, H) W_hh, contiguous
    dh_ptr,  # (T, B, H) gradient of hs
    gates_ptr,  # (T, B, 4H) saved activations (saved_gates_dtype)
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
    INTERPRETED: tl.constexpr,
):
    # Backward visits the forward's steps in reverse. Forward: t_prev = t - d; backward:
    # t_next = t + d, with d = +1 (or -1 when REVERSE). The last step visited is the forward's
    # first, which reads c0.
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    n_h = tl.num_programs(1)
    sync = sync_ptr + pid_b
    d = -1 if REVERSE else 1
    zero = pid_b * 0  # a runtime 0: time indices are cast to int64 in the step body
    t = zero if REVERSE else T - 1 + zero
    cprev = c_ptr + (t - d).to(tl.int64) * B * H
    if T == 1:
        cprev = c0_ptr
    bwd_step(
        pid_b, pid_h, t, t, dgates_ptr=dgates_ptr, w_ptr=w_ptr, dh_ptr=dh_ptr,
        gates_ptr=gates_ptr, c_ptr=c_ptr, cprev_ptr=cprev, len_ptr=len_ptr,
        dh_carry_ptr=dh_carry_ptr, dc_carry_ptr=dc_carry_ptr, B=B, H=H, BLOCK_B=BLOCK_B,
        BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K, HAS_REC=True, HAS_NEXT=False,
        HAS_LENGTHS=HAS_LENGTHS, DG_CACHE=".cg", DOT_PRECISION=DOT_PRECISION,
        INTERPRETED=INTERPRETED,
    )  # fmt: skip
    grid_arrive(sync)
    n = 1
    grid_wait(sync, n * n_h)
    while n < T:
        t = n if REVERSE else T - 1 - n
        cprev = c_ptr + (t - d).to(tl.int64) * B * H
        if n == T - 1:
            cprev = c0_ptr
        # .cg: dgates_{t+1} was written by other SMs; read it from L2, not a stale L1 line.
        bwd_step(
            pid_b, pid_h, t, t + d, dgates_ptr=dgates_ptr, w_ptr=w_ptr, dh_ptr=dh_ptr,
            gates_ptr=gates_ptr, c_ptr=c_ptr, cprev_ptr=cprev, len_ptr=len_ptr,
            dh_carry_ptr=dh_carry_ptr, dc_carry_ptr=dc_carry_ptr, B=B, H=H, BLOCK_B=BLOCK_B,
            BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K, HAS_REC=True, HAS_NEXT=True,
            HAS_LENGTHS=HAS_LENGTHS, DG_CACHE=".cg", DOT_PRECISION=DOT_PRECISION,
            INTERPRETED=INTERPRETED,
        )  # fmt: skip
        n += 1
        grid_arrive(sync)
        grid_wait(sync, n * n_h)
