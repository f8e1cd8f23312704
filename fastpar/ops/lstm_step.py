"""One LSTM time step for one (batch tile, hidden tile), forward and backward: the bodies that
both drivers run (the step kernels here, launched once per step, and the persistent kernels of
lstm_persistent.py, which loop over time), so the interpreter tests the body with many programs.

Glossary: T time, B batch, H hidden units, P size of h (proj_size or H), G = 4 gates, KP = P
rounded up to a power of two.

Forward, for step t: ``h_{t-1} @ W_hh^T`` as one ``tl.dot`` over the four gates with float32
accumulation (either one dot over all KP columns of h_{t-1} with the program's share of W_hh
held as one tile, or a loop over K tiles re-reading the share), the gate nonlinearities and the
cell update, then ``h_t``. What backward reads (gate activations and c_t) is stored separately,
by ``save_step``, so a persistent driver can store it after signalling that h_t is written.

Backward, going back in time: ``dh_t = dhs_t + dgates_{t+1} @ W_hh`` (one ``tl.dot`` over the
4H gate rows), the gate gradients from the saved activations, and ``dc`` carried to step t-1.
Each program owns its hidden tile of the carried ``dh``/``dc`` and of ``dgates_t``, so nothing is
accumulated across programs: no atomics, and the same inputs give bitwise-identical gradients.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastpar.ops.lstm_jit import (
    cell_forward,
    dot_acc,
    gate_columns,
    load_gates,
    split_gates,
    store_gates,
    tanh,
)


@triton.jit
def tile_offsets(pid_b, pid_h, B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """Batch rows, hidden units and their masks of program (pid_b, pid_h)."""
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_j = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_b = offs_b < B
    mask = mask_b[:, None] & (offs_j < H)[None, :]
    return offs_b, offs_j, mask_b, mask


@triton.jit
def load_w_share(w_ptr, pid_h, H, P, KP: tl.constexpr, BLOCK_H: tl.constexpr):
    """(KP, 4*BLOCK_H) tile of W_hh^T: the program's gate columns, zero past P and H."""
    cols, mask_n = gate_columns(pid_h * BLOCK_H, H, BLOCK_H)
    offs_k = tl.arange(0, KP)
    return tl.load(
        w_ptr + cols.to(tl.int64)[None, :] * P + offs_k[:, None],
        mask=(offs_k < P)[:, None] & mask_n[None, :],
        other=0.0,
    )


@triton.jit
def load_xg(xg_ptr, t, pid_b, pid_h, B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """(BLOCK_B, 4*BLOCK_H) gate-major tile of the input projection at step t."""
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols, mask_n = gate_columns(pid_h * BLOCK_H, H, BLOCK_H)
    # Time offsets reach T*B*4H elements: 64-bit so long sequences do not wrap.
    row4 = t.to(tl.int64) * B * 4 * H + offs_b * (4 * H)
    return tl.load(
        xg_ptr + row4[:, None] + cols[None, :],
        mask=(offs_b < B)[:, None] & mask_n[None, :],
        other=0.0,
        eviction_policy="evict_first",
    )


@triton.jit
def fwd_step(
    pid_b,
    pid_h,
    t,
    xg,  # (BLOCK_B, 4*BLOCK_H) this step's input projection tile (load_xg)
    c_prev,  # (BLOCK_B, BLOCK_H) float32 c_{t-1}
    hprev_ptr,  # (B, P) h_{t-1}: a step of hs, or h0
    w_ptr,  # (4H, P) W_hh, contiguous; read here unless W_RESIDENT
    w_share,  # W_RESIDENT: load_w_share's tile (else unused)
    len_ptr,  # (B,) int32 valid lengths; read only when HAS_LENGTHS
    h_ptr,  # (T, B, H) out, input dtype: h_t, or o*tanh(c_t) before the projection
    B,
    H: tl.constexpr,
    P: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    KP: tl.constexpr,
    W_RESIDENT: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    CARRY_H: tl.constexpr,  # keep h over invalid steps here (no projection: h_t has H units)
    HPREV_CACHE: tl.constexpr,  # "" or ".cg" (persistent: h_{t-1} written by other SMs)
    DOT_PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """Step t of the recurrence for one tile; stores h_t and returns (c_t, h_t, i, f, g, o)."""
    offs_b, offs_j, mask_b, mask = tile_offsets(pid_b, pid_h, B, H, BLOCK_B, BLOCK_H)
    h_rows = hprev_ptr + offs_b[:, None] * P
    acc = tl.zeros((BLOCK_B, 4 * BLOCK_H), dtype=tl.float32)
    if W_RESIDENT:
        offs_k = tl.arange(0, KP)
        h = tl.load(
            h_rows + offs_k[None, :],
            mask=mask_b[:, None] & (offs_k < P)[None, :],
            other=0.0,
            cache_modifier=HPREV_CACHE,
        )
        acc = dot_acc(h, w_share, acc, DOT_PRECISION=DOT_PRECISION, INTERPRETED=INTERPRETED)
    else:
        cols, mask_n = gate_columns(pid_h * BLOCK_H, H, BLOCK_H)
        w_rows = w_ptr + cols.to(tl.int64)[None, :] * P
        for k0 in range(0, P, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < P
            h = tl.load(
                h_rows + offs_k[None, :],
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
            acc = dot_acc(h, w, acc, DOT_PRECISION=DOT_PRECISION, INTERPRETED=INTERPRETED)

    pre_i, pre_f, pre_g, pre_o = split_gates(acc + xg.to(tl.float32), BLOCK_B, BLOCK_H)
    i, f, g, o, c, h_new = cell_forward(pre_i, pre_f, pre_g, pre_o, c_prev)
    if HAS_LENGTHS:
        # Past its length a sequence keeps its state, so h_n/c_n are those of its last step.
        valid = (t < tl.load(len_ptr + offs_b, mask=mask_b, other=0))[:, None]
        c = tl.where(valid, c, c_prev)
        if CARRY_H:
            h_old = tl.load(
                h_rows + offs_j[None, :], mask=mask, other=0.0, cache_modifier=HPREV_CACHE
            )
            h_new = tl.where(valid, h_new, h_old.to(tl.float32))
    row = t.to(tl.int64) * B * H + offs_b * H
    tl.store(h_ptr + row[:, None] + offs_j[None, :], h_new.to(h_ptr.dtype.element_ty), mask=mask)
    return c, h_new, i, f, g, o


@triton.jit
def save_step(
    pid_b,
    pid_h,
    t,
    c,
    i,
    f,
    g,
    o,
    gates_ptr,  # (T, B, 4H) out: activations i, f, g, o (saved_gates_dtype)
    cs_ptr,  # (T, B, H) float32 out: c_t
    B,
    H: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Store what backward reads of step t (fwd_step's results)."""
    offs_b, offs_j, _mask_b, mask = tile_offsets(pid_b, pid_h, B, H, BLOCK_B, BLOCK_H)
    t64 = t.to(tl.int64)
    store_gates(gates_ptr, t64 * B * 4 * H + offs_b * (4 * H), offs_j, mask, i, f, g, o, H)
    row = t64 * B * H + offs_b * H
    tl.store(cs_ptr + row[:, None] + offs_j[None, :], c, mask=mask)


# Time indices change every launch: not specialising on them (== 1, % 16) keeps one binary.
@triton.jit(do_not_specialize=["t", "t_prev"])
def _lstm_fwd_step_kernel(
    xg_ptr,  # (T, B, 4H) input projection with biases, input dtype
    hprev_ptr,  # (T, B, P) hs (read at t_prev), or (B, P) h0 with t_prev = 0
    c_state_ptr,  # (B, H) float32 in/out: c_{t-1} in, c_t out
    w_ptr,  # (4H, P) W_hh, contiguous
    len_ptr,  # (B,) int32 valid lengths; read only when HAS_LENGTHS
    gates_ptr,  # (T, B, 4H) out when SAVE: activations i, f, g, o (saved_gates_dtype)
    cs_ptr,  # (T, B, H) float32 out when SAVE: c_t
    h_ptr,  # (T, B, H) out, input dtype: h_t, or o*tanh(c_t) before the projection
    t,
    t_prev,
    B,
    H: tl.constexpr,  # model sizes are compile-time: only B and T change between calls
    P: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    KP: tl.constexpr,  # P rounded up to a power of two
    W_RESIDENT: tl.constexpr,  # one dot over all of h_{t-1} (the persistent v2 body)
    HAS_LENGTHS: tl.constexpr,
    CARRY_H: tl.constexpr,
    SAVE: tl.constexpr,  # store gates and c_t for backward
    DOT_PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """One forward step for one (batch tile, hidden tile) = program (0, 1)."""
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_b, offs_j, _mask_b, mask = tile_offsets(pid_b, pid_h, B, H, BLOCK_B, BLOCK_H)
    c_tile = c_state_ptr + offs_b[:, None] * H + offs_j[None, :]
    c_prev = tl.load(c_tile, mask=mask, other=0.0)
    w_share = 0
    if W_RESIDENT:
        w_share = load_w_share(w_ptr, pid_h, H, P, KP=KP, BLOCK_H=BLOCK_H)
    c, _h, i, f, g, o = fwd_step(
        pid_b, pid_h, t,
        xg=load_xg(xg_ptr, t, pid_b, pid_h, B, H, BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H),
        c_prev=c_prev, hprev_ptr=hprev_ptr + t_prev.to(tl.int64) * B * P, w_ptr=w_ptr,
        w_share=w_share, len_ptr=len_ptr, h_ptr=h_ptr, B=B, H=H, P=P, BLOCK_B=BLOCK_B,
        BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K, KP=KP, W_RESIDENT=W_RESIDENT, HAS_LENGTHS=HAS_LENGTHS,
        CARRY_H=CARRY_H, HPREV_CACHE="", DOT_PRECISION=DOT_PRECISION, INTERPRETED=INTERPRETED,
    )  # fmt: skip
    tl.store(c_tile, c, mask=mask)
    if SAVE:
        save_step(
            pid_b, pid_h, t, c, i, f, g, o, gates_ptr=gates_ptr, cs_ptr=cs_ptr, B=B, H=H,
            BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H,
        )  # fmt: skip


@triton.jit
def recurrent_grad(
    dg_next_ptr,  # (B, 4H) dgates of the forward's next step
    w_ptr,  # (4H, H) W_hh, contiguous
    offs_b,
    offs_j,
    mask_b,
    mask_j,
    H: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    K_SPLIT: tl.constexpr,
    DG_CACHE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """(BLOCK_B, BLOCK_H) float32 ``dgates_{t+1} @ W_hh`` for the tile's hidden units.

    The K loop over the 4H gate rows is serial. With K_SPLIT > 1 each iteration takes K_SPLIT
    tiles of BLOCK_K rows as one batched dot, (K_SPLIT, BLOCK_B, BLOCK_K) @ (K_SPLIT, BLOCK_K,
    BLOCK_H), whose batch dimension Triton spreads over the warps, then sums the K_SPLIT
    partial products in a fixed order: K_SPLIT times fewer serial iterations, same result on
    every run (no atomics).
    """
    if K_SPLIT == 1:
        acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        for k0 in range(0, 4 * H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < 4 * H
            dg = tl.load(
                dg_next_ptr + offs_b[:, None] * (4 * H) + offs_k[None, :],
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
            acc = dot_acc(dg, w, acc, DOT_PRECISION=DOT_PRECISION, INTERPRETED=INTERPRETED)
    else:
        acc3 = tl.zeros((K_SPLIT, BLOCK_B, BLOCK_H), dtype=tl.float32)
        split = tl.arange(0, K_SPLIT)[:, None, None] * BLOCK_K
        for k0 in range(0, 4 * H, K_SPLIT * BLOCK_K):
            k_dg = k0 + split + tl.arange(0, BLOCK_K)[None, None, :]  # (K_SPLIT, 1, BLOCK_K)
            dg = tl.load(
                dg_next_ptr + offs_b[None, :, None] * (4 * H) + k_dg,
                mask=mask_b[None, :, None] & (k_dg < 4 * H),
                other=0.0,
                cache_modifier=DG_CACHE,
            )
            k_w = k0 + split + tl.arange(0, BLOCK_K)[None, :, None]  # (K_SPLIT, BLOCK_K, 1)
            w = tl.load(
                w_ptr + k_w.to(tl.int64) * H + offs_j[None, None, :],
                mask=(k_w < 4 * H) & mask_j[None, None, :],
                other=0.0,
                eviction_policy="evict_last",
            )
            acc3 = dot_acc(dg, w, acc3, DOT_PRECISION=DOT_PRECISION, INTERPRETED=INTERPRETED)
        acc = tl.sum(acc3, axis=0)
    return acc


@triton.jit
def bwd_step(
    pid_b,
    pid_h,
    t,
    t_next,
    dgates_ptr,  # (T, B, 4H) out at t, input dtype; read at t_next when HAS_NEXT
    w_ptr,  # (4H, H) W_hh, contiguous; read only when HAS_REC
    dh_ptr,  # HAS_REC: (T, B, H) gradient of hs; else (B, H) float32 gradient of o*tanh(c_t)
    gates_ptr,  # (T, B, 4H) saved activations (saved_gates_dtype)
    c_ptr,  # (T, B, H) float32 saved cell states
    cprev_ptr,  # (B, H) float32 c_{t-1}: a step of the saved cell states, or c0
    len_ptr,  # (B,) int32 valid lengths; read only when HAS_LENGTHS
    dh_carry_ptr,  # (B, H) float32 in/out: gradient reaching h_t through skipped steps (HAS_REC)
    dc_carry_ptr,  # (B, H) float32 in/out: gradient of c_t in, of c_{t-1} out
    B,
    H: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_REC: tl.constexpr,  # fuse dh_t = dhs_t + dgates_{t+1} @ W_hh (no projection)
    HAS_NEXT: tl.constexpr,  # a later step exists (false for the first step of backward)
    HAS_LENGTHS: tl.constexpr,
    K_SPLIT: tl.constexpr,  # K tiles reduced at once, one batched dot (see recurrent_grad)
    DG_CACHE: tl.constexpr,  # "" or ".cg" (persistent: dgates_{t+1} written by other SMs)
    DOT_PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """One backward step (forward step t, reached from t_next) for one tile."""
    offs_b, offs_j, mask_b, mask = tile_offsets(pid_b, pid_h, B, H, BLOCK_B, BLOCK_H)
    mask_j = offs_j < H
    t64 = t.to(tl.int64)
    row = t64 * B * H + offs_b * H
    row4 = t64 * B * 4 * H + offs_b * (4 * H)
    carry = offs_b[:, None] * H + offs_j[None, :]

    if HAS_REC:
        dh = tl.load(dh_ptr + row[:, None] + offs_j[None, :], mask=mask, other=0.0)
        dh = dh.to(tl.float32) + tl.load(dh_carry_ptr + carry, mask=mask, other=0.0)
        if HAS_NEXT:
            dg_next = dgates_ptr + t_next.to(tl.int64) * B * 4 * H
            dh += recurrent_grad(
                dg_next, w_ptr, offs_b, offs_j, mask_b, mask_j, H=H, BLOCK_B=BLOCK_B,
                BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K, K_SPLIT=K_SPLIT, DG_CACHE=DG_CACHE,
                DOT_PRECISION=DOT_PRECISION, INTERPRETED=INTERPRETED,
            )  # fmt: skip
    else:
        dh = tl.load(dh_ptr + carry, mask=mask, other=0.0)

    dc = tl.load(dc_carry_ptr + carry, mask=mask, other=0.0)
    i, f, g, o = load_gates(gates_ptr, row4, offs_j, mask, H)
    c = tl.load(c_ptr + row[:, None] + offs_j[None, :], mask=mask, other=0.0)
    cprev = tl.load(cprev_ptr + carry, mask=mask, other=0.0)
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


# Time indices change every launch: not specialising on them (== 1, % 16) keeps one binary.
@triton.jit(do_not_specialize=["t", "t_next", "t_prev"])
def _lstm_bwd_step_kernel(
    dgates_ptr,  # (T, B, 4H) out at t, input dtype; read at t_next when HAS_NEXT
    w_ptr,  # (4H, H) W_hh, contiguous; read only when HAS_REC
    dh_ptr,  # HAS_REC: (T, B, H) gradient of hs; else (B, H) float32 gradient of o*tanh(c_t)
    gates_ptr,  # (T, B, 4H) saved activations (saved_gates_dtype)
    c_ptr,  # (T, B, H) float32 saved cell states
    cprev_ptr,  # (T, B, H) saved cell states (read at t_prev), or (B, H) c0 with t_prev = 0
    len_ptr,  # (B,) int32 valid lengths; read only when HAS_LENGTHS
    dh_carry_ptr,  # (B, H) float32 in/out (see bwd_step)
    dc_carry_ptr,  # (B, H) float32 in/out
    t,
    t_next,
    t_prev,
    B,
    H: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_REC: tl.constexpr,
    HAS_NEXT: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    K_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """One backward step for one (batch tile, hidden tile) = program (0, 1)."""
    bwd_step(
        tl.program_id(0), tl.program_id(1), t, t_next, dgates_ptr=dgates_ptr, w_ptr=w_ptr,
        dh_ptr=dh_ptr, gates_ptr=gates_ptr, c_ptr=c_ptr,
        cprev_ptr=cprev_ptr + t_prev.to(tl.int64) * B * H, len_ptr=len_ptr,
        dh_carry_ptr=dh_carry_ptr, dc_carry_ptr=dc_carry_ptr, B=B, H=H, BLOCK_B=BLOCK_B,
        BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K, HAS_REC=HAS_REC, HAS_NEXT=HAS_NEXT,
        HAS_LENGTHS=HAS_LENGTHS, K_SPLIT=K_SPLIT, DG_CACHE="", DOT_PRECISION=DOT_PRECISION,
        INTERPRETED=INTERPRETED,
    )  # fmt: skip
