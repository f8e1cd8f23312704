"""Persistent forward and backward kernels of the recurrent cells (LSTM, GRU, Elman RNN): one
launch runs all T steps.

Glossary: T time, B batch, H hidden units (= P: these kernels do not run with a projection),
CELL, G gates per unit and GS gate slots of a tile as in lstm_step.py, KP = H rounded up to a
power of two.

Each program owns ``BLOCK_B`` batch rows and ``BLOCK_H`` hidden units for the whole sequence and
loops over time inside the kernel, running the step bodies of lstm_step.py.

Forward. With ``W_RESIDENT`` a program loads its share of W_hh, a (KP, GS*BLOCK_H) tile, once per
launch: Triton stages it in shared memory outside the time loop (ttgir: its local_alloc is
hoisted) and reads it from there with ldmatrix every step, so the barrier's acquire load,
which invalidates L1 (CCTL.IVALL in the SASS), cannot evict it; c_t stays in registers. After
storing h_t a program arrives at the barrier, then stores what backward saves and loads the
next step's xg tile, and only then waits. Where the share fits no tile's registers, the body
loads it a K tile at a time every step with an evict-last hint, but that invalidation sends
every such load to L2. The float32 state (c for the LSTM, h for the GRU and RNN) stays in
registers.

Backward. Each step's ``dgates_{t+1} @ W_hh`` runs over the G*H gate rows in num_warps K tiles
per iteration as one batched dot whose batch dimension Triton gives one warp each, then
sums them in a fixed order (``recurrent_grad``): 8x fewer serial iterations, still no atomics.

Variable lengths: the programs of a batch block run only the steps before the longest of its
rows (``n_valid``); the steps past it change no state, so forward writes their outputs (the
carried h, c, zero gates) without a barrier, and backward turns them into zero dgates and a sum
of dhs into the carried gradient of h. Sorting a batch by length (as packing does) lets whole
batch blocks stop early.

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

from fastpar.ops.lstm_jit import grid_arrive, grid_wait, store_gates, store_slots
from fastpar.ops.lstm_step import (
    bwd_step,
    fwd_step,
    load_b_hn,
    load_w_share,
    load_xg,
    save_step,
    tile_offsets,
)


@triton.jit(do_not_specialize=["T"])  # one binary for every sequence length
def _lstm_fwd_persistent_kernel(
    xg_ptr,  # (T, B, G*H) input projection with biases (GRU: but b_hn), input dtype
    h0_ptr,  # (B, H) initial hidden state, input dtype
    c0_ptr,  # (B, H) float32 initial state: c0 (LSTM) or h0 (GRU, RNN)
    w_ptr,  # (G*H, H) W_hh, contiguous
    b_ptr,  # (H,) float32 GRU: b_hn; read only when CELL == "gru"
    len_ptr,  # (B,) int32 valid lengths; read only when HAS_LENGTHS
    gates_ptr,  # (T, B, 4H) out when SAVE (LSTM, GRU): see save_step
    cs_ptr,  # (T, B, H) float32 out when SAVE (LSTM): c_t
    h_ptr,  # (T, B, H) out, input dtype; also read back as h_{t-1} by every program
    c_n_ptr,  # (B, H) float32 out: the state after the last step processed
    sync_ptr,  # (cdiv(B, BLOCK_B),) int32 zeros: the barrier counter per batch block
    T,
    B,
    H: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    KP: tl.constexpr,
    CELL: tl.constexpr,
    G: tl.constexpr,
    GS: tl.constexpr,
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
    offs_b, offs_j, mask_b, mask = tile_offsets(pid_b, pid_h, B, H, BLOCK_B, BLOCK_H)
    tile = offs_b[:, None] * H + offs_j[None, :]
    c = tl.load(c0_ptr + tile, mask=mask, other=0.0)
    h = tl.load(h0_ptr + tile, mask=mask, other=0.0).to(tl.float32)
    w_share = 0
    if W_RESIDENT:
        w_share = load_w_share(w_ptr, pid_h, H, H, KP=KP, BLOCK_H=BLOCK_H, G=G, GS=GS)
    b_hn = load_b_hn(b_ptr, pid_h, H, BLOCK_H=BLOCK_H, CELL=CELL)
    # Steps at or past every length of the batch block change nothing: run only the first
    # n_valid steps of time (the last n_valid in reverse) and fill in the rest below.
    n_valid = T
    if HAS_LENGTHS:
        n_valid = tl.minimum(tl.max(tl.load(len_ptr + offs_b, mask=mask_b, other=0), axis=0), T)
    t = n_valid - 1 if REVERSE else n_valid * 0
    xg = load_xg(xg_ptr, t, pid_b, pid_h, B, H, BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H, G=G, GS=GS)
    hprev = h0_ptr
    s = 0
    # A while loop: T is a runtime value (no recompilation per sequence length).
    while s < n_valid:
        t = n_valid - 1 - s if REVERSE else s
        c_prev = c
        c, h, a0, a1, a2, a3 = fwd_step(
            pid_b, pid_h, t, xg=xg, c_prev=c_prev, b_hn=b_hn, hprev_ptr=hprev, w_ptr=w_ptr,
            w_share=w_share, len_ptr=len_ptr, h_ptr=h_ptr, B=B, H=H, P=H, BLOCK_B=BLOCK_B,
            BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K, KP=KP, CELL=CELL, G=G, GS=GS,
            W_RESIDENT=W_RESIDENT, HAS_LENGTHS=HAS_LENGTHS, CARRY_H=True, HPREV_CACHE=".cg",
            DOT_PRECISION=DOT_PRECISION, INTERPRETED=INTERPRETED,
        )  # fmt: skip
        grid_arrive(sync)
        # Off the critical path: nothing below needs the other programs' h_t.
        if SAVE:
            save_step(
                pid_b, pid_h, t, c, a0, a1, a2, a3, gates_ptr=gates_ptr, cs_ptr=cs_ptr, B=B,
                H=H, BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H, CELL=CELL,
            )  # fmt: skip
        s += 1
        # The next step's input tile (clamped: the last iteration reloads its own).
        t_next = tl.maximum(n_valid - 1 - s, 0) if REVERSE else tl.minimum(s, n_valid - 1)
        xg = load_xg(
            xg_ptr, t_next, pid_b, pid_h, B, H, BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H, G=G, GS=GS
        )
        hprev = h_ptr + t.to(tl.int64) * B * H
        # .cg in the step body: h_{t-1} was written by other SMs; read it from L2.
        grid_wait(sync, s * n_h)
    tl.store(c_n_ptr + tile, c, mask=mask)
    # The skipped steps [n_valid, T) hold the state unchanged: the last one computed (the
    # initial one in reverse, where they come first). Backward reads c_{t-1} from cs there.
    if REVERSE:
        h = tl.load(h0_ptr + tile, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(c0_ptr + tile, mask=mask, other=0.0)
    # Their gates are stored as zeros: backward reads them under a mask, never uninitialised.
    zero = tl.zeros_like(c)
    t = n_valid
    while t < T:
        row = t.to(tl.int64) * B * H
        tl.store(h_ptr + row + tile, h.to(h_ptr.dtype.element_ty), mask=mask)
        if SAVE and CELL == "lstm":
            tl.store(cs_ptr + row + tile, c, mask=mask)
        if SAVE and GS == 4:
            row4 = t.to(tl.int64) * B * 4 * H + offs_b * (4 * H)
            store_gates(gates_ptr, row4, offs_j, mask, zero, zero, zero, zero, H)
        t += 1


@triton.jit
def _pass_through(
    dgates_ptr,
    dh_ptr,
    dh_carry_ptr,
    t_begin,
    T,
    B,
    offs_b,
    offs_j,
    mask,
    H: tl.constexpr,
    GS: tl.constexpr,
):
    """Backward of steps [t_begin, T) where every row of the tile is past its length: zero
    dgates, and dhs_t added to the carried gradient of h (dc passes through untouched)."""
    tile = offs_b[:, None] * H + offs_j[None, :]
    dh = tl.load(dh_carry_ptr + tile, mask=mask, other=0.0)
    zero = tl.zeros_like(dh)
    t = t_begin
    while t < T:
        t64 = t.to(tl.int64)
        dh += tl.load(dh_ptr + t64 * B * H + tile, mask=mask, other=0.0).to(tl.float32)
        row_dg = t64 * B * GS * H + offs_b * (GS * H)
        store_slots(dgates_ptr, row_dg, offs_j, mask, zero, zero, zero, zero, H, GS=GS)
        t += 1
    tl.store(dh_carry_ptr + tile, dh, mask=mask)
    tl.debug_barrier()  # the next step reads dh_carry back, possibly in other threads


@triton.jit(do_not_specialize=["T"])  # one binary for every sequence length
def _lstm_bwd_persistent_kernel(
    dgates_ptr,  # (T, B, GS*H) out, input dtype; dgates_{t+1} is read back by every program
    w_ptr,  # (G*H, H) W_hh, contiguous
    dh_ptr,  # (T, B, H) gradient of hs
    gates_ptr,  # (T, B, 4H) saved by save_step (LSTM, GRU)
    state_ptr,  # (T, B, H) float32 saved cell states (LSTM), or hs (GRU, RNN)
    state0_ptr,  # (B, H) the forward's first state_{t-1}: float32 c0 (LSTM) or h0 (GRU)
    len_ptr,  # (B,) int32 valid lengths; read only when HAS_LENGTHS
    dh_carry_ptr,  # (B, H) float32 in/out (see bwd_step)
    dc_carry_ptr,  # (B, H) float32 in/out (LSTM)
    sync_ptr,  # (cdiv(B, BLOCK_B),) int32 zeros: the barrier counter per batch block
    T,
    B,
    H: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CELL: tl.constexpr,
    G: tl.constexpr,
    GS: tl.constexpr,
    K_SPLIT: tl.constexpr,
    REVERSE: tl.constexpr,  # the forward pass ran from T-1 down to 0
    HAS_LENGTHS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    # Backward visits the forward's steps in reverse. Forward: t_prev = t - d; backward:
    # t_next = t + d, with d = +1 (or -1 when REVERSE). The forward's first step reads state0.
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    n_h = tl.num_programs(1)
    sync = sync_ptr + pid_b
    d = -1 if REVERSE else 1
    offs_b, offs_j, mask_b, mask = tile_offsets(pid_b, pid_h, B, H, BLOCK_B, BLOCK_H)
    # Steps at or past every length of the batch block (t >= n_valid) pass h and c through:
    # their dgates are 0 and dhs_t goes straight into the carried dh. Forward they come last,
    # so backward does them first; in reverse they come first in forward time, so backward
    # does them last, after the step t = n_valid whose dh still takes dgates_{t-1} @ W_hh
    # (the steps after it take zeros).
    n_valid = T
    if HAS_LENGTHS:
        n_valid = tl.minimum(tl.max(tl.load(len_ptr + offs_b, mask=mask_b, other=0), axis=0), T)
    t_fwd_first = T - 1 if REVERSE else 0  # the forward's first step: state_{t-1} is state0
    if not REVERSE:
        _pass_through(
            dgates_ptr, dh_ptr, dh_carry_ptr, n_valid, T, B, offs_b, offs_j, mask, H, GS=GS
        )
    n_steps = tl.minimum(n_valid + 1, T) if REVERSE else n_valid
    if n_steps > 0:
        t = n_valid * 0 if REVERSE else n_valid - 1
        cprev = state_ptr + (t - d).to(tl.int64) * B * H
        if t == t_fwd_first:
            cprev = state0_ptr
        bwd_step(
            pid_b, pid_h, t, t, dgates_ptr=dgates_ptr, w_ptr=w_ptr, dh_ptr=dh_ptr,
            gates_ptr=gates_ptr, state_ptr=state_ptr, prev_ptr=cprev, len_ptr=len_ptr,
            dh_carry_ptr=dh_carry_ptr, dc_carry_ptr=dc_carry_ptr, B=B, H=H, BLOCK_B=BLOCK_B,
            BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K, CELL=CELL, G=G, GS=GS, HAS_REC=True, HAS_NEXT=False,
            HAS_LENGTHS=HAS_LENGTHS, K_SPLIT=K_SPLIT, DG_CACHE=".cg",
            DOT_PRECISION=DOT_PRECISION, INTERPRETED=INTERPRETED,
        )  # fmt: skip
        grid_arrive(sync)
        n = 1
        grid_wait(sync, n * n_h)
        while n < n_steps:
            t = n if REVERSE else n_valid - 1 - n
            cprev = state_ptr + (t - d).to(tl.int64) * B * H
            if t == t_fwd_first:
                cprev = state0_ptr
            # .cg: dgates_{t+1} was written by other SMs; read it from L2, not a stale L1 line.
            bwd_step(
                pid_b, pid_h, t, t + d, dgates_ptr=dgates_ptr, w_ptr=w_ptr, dh_ptr=dh_ptr,
                gates_ptr=gates_ptr, state_ptr=state_ptr, prev_ptr=cprev, len_ptr=len_ptr,
                dh_carry_ptr=dh_carry_ptr, dc_carry_ptr=dc_carry_ptr, B=B, H=H, BLOCK_B=BLOCK_B,
                BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K, CELL=CELL, G=G, GS=GS, HAS_REC=True,
                HAS_NEXT=True,
                HAS_LENGTHS=HAS_LENGTHS, K_SPLIT=K_SPLIT, DG_CACHE=".cg",
                DOT_PRECISION=DOT_PRECISION, INTERPRETED=INTERPRETED,
            )  # fmt: skip
            n += 1
            grid_arrive(sync)
            grid_wait(sync, n * n_h)
    if REVERSE:
        _pass_through(
            dgates_ptr, dh_ptr, dh_carry_ptr, n_valid + 1, T, B, offs_b, offs_j, mask, H, GS=GS
        )
