"""One time step of a recurrent cell for one (batch tile, hidden tile), forward and backward:
the bodies that both drivers run (the step kernels here, launched once per step, and the
persistent kernels of lstm_persistent.py, which loop over time), so the interpreter tests the
body with many programs.

Glossary: T time, B batch, H hidden units, P size of h (proj_size or H), KP = P rounded up to a
power of two; CELL the cell ("lstm", "gru", "rnn_tanh", "rnn_relu"), G its gates per unit (4, 3,
1) and GS the gate slots of a tile (4, 4, 1; see lstm_jit).

The cell is the only part that differs between cells; everything else (the recurrent dot, the
lengths, the drivers) is shared. Per cell, the float32 ``state`` a program carries for its tile
is c_t (LSTM) or h_t itself (GRU and RNN); the per-step tensors saved for backward are the gate
activations i, f, g, o and c_t (LSTM), r, z, n and ``h_{t-1} W_hn^T + b_hn`` (GRU), nothing but
hs (RNN). GRU's b_hn (H,) stays in the recurrence: the reset gate multiplies it.

Forward, for step t: ``h_{t-1} @ W_hh^T`` as one ``tl.dot`` over the four gates with float32
accumulation (either one dot over all KP columns of h_{t-1} with the program's share of W_hh
held as one tile, or a loop over K tiles re-reading the share), the gate nonlinearities and the
cell update, then ``h_t``. What backward reads (gate activations and c_t) is stored separately,
by ``save_step``, so a persistent driver can store it after signalling that h_t is written.

Backward, going back in time: ``dh_t = dhs_t + dh_carry + dgates_{t+1} @ W_hh`` (one ``tl.dot``
over the G*H gate rows), the gate gradients from the saved activations, and what reaches step
t-1 elementwise carried to it: ``dc`` (LSTM), ``dh_t * z_t`` in dh_carry (GRU), and dh_t itself
through steps past a sequence's length. dgates holds GS slots per unit: the GRU's are dr, dz,
d(hn) (the gradient of the recurrent GEMM's n rows, r times that of n's pre-activation) and
d(xn) (n's pre-activation, the input projection's). Each program owns its hidden tile of the
carried gradients and of ``dgates_t``, so nothing is accumulated across programs: no atomics,
and the same inputs give bitwise-identical gradients.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastpar.ops.lstm_jit import (
    cell_forward,
    dot_acc,
    gate_columns,
    gru_cell_backward,
    gru_cell_forward,
    load_gates,
    rnn_activation,
    rnn_activation_grad,
    split_gates,
    store_gates,
    store_slots,
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
def load_w_share(
    w_ptr, pid_h, H, P, KP: tl.constexpr, BLOCK_H: tl.constexpr, G: tl.constexpr, GS: tl.constexpr
):
    """(KP, GS*BLOCK_H) tile of W_hh^T: the program's gate columns, zero past P, H and G."""
    cols, mask_n = gate_columns(pid_h * BLOCK_H, H, BLOCK_H, G, GS)
    offs_k = tl.arange(0, KP)
    return tl.load(
        w_ptr + cols.to(tl.int64)[None, :] * P + offs_k[:, None],
        mask=(offs_k < P)[:, None] & mask_n[None, :],
        other=0.0,
    )


@triton.jit
def load_xg(
    xg_ptr,
    t,
    pid_b,
    pid_h,
    B,
    H,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    G: tl.constexpr,
    GS: tl.constexpr,
):
    """(BLOCK_B, GS*BLOCK_H) gate-major tile of the (T, B, G*H) input projection at step t."""
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols, mask_n = gate_columns(pid_h * BLOCK_H, H, BLOCK_H, G, GS)
    # Time offsets reach T*B*G*H elements: 64-bit so long sequences do not wrap.
    row4 = t.to(tl.int64) * B * G * H + offs_b * (G * H)
    return tl.load(
        xg_ptr + row4[:, None] + cols[None, :],
        mask=(offs_b < B)[:, None] & mask_n[None, :],
        other=0.0,
        eviction_policy="evict_first",
    )


@triton.jit
def load_b_hn(b_ptr, pid_h, H, BLOCK_H: tl.constexpr, CELL: tl.constexpr):
    """(BLOCK_H,) float32 tile of the GRU's b_hn; 0 for the other cells (b_ptr unread)."""
    b = 0.0
    if CELL == "gru":
        offs_j = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        b = tl.load(b_ptr + offs_j, mask=offs_j < H, other=0.0).to(tl.float32)
    return b


@triton.jit
def fwd_step(
    pid_b,
    pid_h,
    t,
    xg,  # (BLOCK_B, GS*BLOCK_H) this step's input projection tile (load_xg)
    c_prev,  # (BLOCK_B, BLOCK_H) float32 state_{t-1}: c_{t-1} (LSTM) or h_{t-1}
    b_hn,  # (BLOCK_H,) float32 GRU: the tile's b_hn (else unused)
    hprev_ptr,  # (B, P) h_{t-1}: a step of hs, or h0
    w_ptr,  # (G*H, P) W_hh, contiguous; read here unless W_RESIDENT
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
    CELL: tl.constexpr,
    G: tl.constexpr,
    GS: tl.constexpr,
    W_RESIDENT: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    CARRY_H: tl.constexpr,  # LSTM: keep h over invalid steps here (no projection: h_t has H units)
    HPREV_CACHE: tl.constexpr,  # "" or ".cg" (persistent: h_{t-1} written by other SMs)
    DOT_PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """Step t of the recurrence for one tile; stores h_t and returns (state_t, h_t, and the four
    tiles save_step keeps: i, f, g, o for the LSTM, r, z, n, hn for the GRU)."""
    offs_b, offs_j, mask_b, mask = tile_offsets(pid_b, pid_h, B, H, BLOCK_B, BLOCK_H)
    h_rows = hprev_ptr + offs_b[:, None] * P
    # The lengths and the carried h load before the dot, so their latency hides behind it.
    valid = True
    h_old = 0.0
    if HAS_LENGTHS:
        valid = (t < tl.load(len_ptr + offs_b, mask=mask_b, other=0))[:, None]
        if CELL == "lstm" and CARRY_H:
            h_old = tl.load(
                h_rows + offs_j[None, :], mask=mask, other=0.0, cache_modifier=HPREV_CACHE
            )
    acc = tl.zeros((BLOCK_B, GS * BLOCK_H), dtype=tl.float32)
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
        cols, mask_n = gate_columns(pid_h * BLOCK_H, H, BLOCK_H, G, GS)
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

    if CELL == "lstm":
        pre_i, pre_f, pre_g, pre_o = split_gates(acc + xg.to(tl.float32), BLOCK_B, BLOCK_H)
        a0, a1, a2, a3, c, h_new = cell_forward(pre_i, pre_f, pre_g, pre_o, c_prev)
    elif CELL == "gru":
        # The reset gate multiplies the recurrent half of n only: split both halves.
        h_r, h_z, h_n, _ = split_gates(acc, BLOCK_B, BLOCK_H)
        x_r, x_z, x_n, _ = split_gates(xg.to(tl.float32), BLOCK_B, BLOCK_H)
        a3 = h_n + b_hn[None, :]
        a0, a1, a2, h_new = gru_cell_forward(h_r, h_z, a3, x_r, x_z, x_n, c_prev)
        c = h_new
    else:
        h_new = rnn_activation(acc + xg.to(tl.float32), CELL)
        c = h_new
        a0, a1, a2, a3 = h_new, h_new, h_new, h_new  # nothing to save
    if HAS_LENGTHS:
        # Past its length a sequence keeps its state, so h_n/c_n are those of its last step.
        c = tl.where(valid, c, c_prev)
        if CELL != "lstm":
            h_new = c  # the state is h_{t-1} in float32
        elif CARRY_H:
            h_new = tl.where(valid, h_new, h_old.to(tl.float32))
    row = t.to(tl.int64) * B * H + offs_b * H
    tl.store(h_ptr + row[:, None] + offs_j[None, :], h_new.to(h_ptr.dtype.element_ty), mask=mask)
    return c, h_new, a0, a1, a2, a3


@triton.jit
def save_step(
    pid_b,
    pid_h,
    t,
    c,
    a0,
    a1,
    a2,
    a3,
    gates_ptr,  # (T, B, 4H) out: i, f, g, o (LSTM) or r, z, n, hn (GRU) (saved_gates_dtype)
    cs_ptr,  # (T, B, H) float32 out: c_t (LSTM)
    B,
    H: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    CELL: tl.constexpr,
):
    """Store what backward reads of step t (fwd_step's results); the RNN reads only hs."""
    offs_b, offs_j, _mask_b, mask = tile_offsets(pid_b, pid_h, B, H, BLOCK_B, BLOCK_H)
    t64 = t.to(tl.int64)
    if CELL == "lstm" or CELL == "gru":
        row4 = t64 * B * 4 * H + offs_b * (4 * H)
        store_gates(gates_ptr, row4, offs_j, mask, a0, a1, a2, a3, H)
    if CELL == "lstm":
        row = t64 * B * H + offs_b * H
        tl.store(cs_ptr + row[:, None] + offs_j[None, :], c, mask=mask)


# Time indices change every launch: not specialising on them (== 1, % 16) keeps one binary.
@triton.jit(do_not_specialize=["t", "t_prev"])
def _lstm_fwd_step_kernel(
    xg_ptr,  # (T, B, G*H) input projection with biases (GRU: but b_hn), input dtype
    hprev_ptr,  # (T, B, P) hs (read at t_prev), or (B, P) h0 with t_prev = 0
    c_state_ptr,  # (B, H) float32 in/out: state_{t-1} in, state_t out (c, or h: see fwd_step)
    w_ptr,  # (G*H, P) W_hh, contiguous
    b_ptr,  # (H,) float32 GRU: b_hn; read only when CELL == "gru"
    len_ptr,  # (B,) int32 valid lengths; read only when HAS_LENGTHS
    gates_ptr,  # (T, B, 4H) out when SAVE (LSTM, GRU): see save_step
    cs_ptr,  # (T, B, H) float32 out when SAVE (LSTM): c_t
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
    CELL: tl.constexpr,  # "lstm", "gru", "rnn_tanh" or "rnn_relu"
    G: tl.constexpr,  # gates per hidden unit (4, 3, 1)
    GS: tl.constexpr,  # gate slots of a tile (4, 4, 1)
    W_RESIDENT: tl.constexpr,  # one dot over all of h_{t-1} (else a loop over K tiles)
    HAS_LENGTHS: tl.constexpr,
    CARRY_H: tl.constexpr,
    SAVE: tl.constexpr,  # store what backward reads (save_step)
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
        w_share = load_w_share(w_ptr, pid_h, H, P, KP=KP, BLOCK_H=BLOCK_H, G=G, GS=GS)
    c, _h, a0, a1, a2, a3 = fwd_step(
        pid_b, pid_h, t,
        xg=load_xg(xg_ptr, t, pid_b, pid_h, B, H, BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H, G=G, GS=GS),
        c_prev=c_prev, b_hn=load_b_hn(b_ptr, pid_h, H, BLOCK_H=BLOCK_H, CELL=CELL),
        hprev_ptr=hprev_ptr + t_prev.to(tl.int64) * B * P, w_ptr=w_ptr, w_share=w_share,
        len_ptr=len_ptr, h_ptr=h_ptr, B=B, H=H, P=P, BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H,
        BLOCK_K=BLOCK_K, KP=KP, CELL=CELL, G=G, GS=GS, W_RESIDENT=W_RESIDENT,
        HAS_LENGTHS=HAS_LENGTHS, CARRY_H=CARRY_H, HPREV_CACHE="", DOT_PRECISION=DOT_PRECISION,
        INTERPRETED=INTERPRETED,
    )  # fmt: skip
    tl.store(c_tile, c, mask=mask)
    if SAVE:
        save_step(
            pid_b, pid_h, t, c, a0, a1, a2, a3, gates_ptr=gates_ptr, cs_ptr=cs_ptr, B=B, H=H,
            BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H, CELL=CELL,
        )  # fmt: skip


@triton.jit
def recurrent_grad(
    dg_next_ptr,  # (B, GS*H) dgates of the forward's next step (its first G*H columns)
    w_ptr,  # (G*H, H) W_hh, contiguous
    offs_b,
    offs_j,
    mask_b,
    mask_j,
    H: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    G: tl.constexpr,
    GS: tl.constexpr,
    K_SPLIT: tl.constexpr,
    DG_CACHE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """(BLOCK_B, BLOCK_H) float32 ``dgates_{t+1} @ W_hh`` for the tile's hidden units.

    The K loop over the G*H gate rows is serial. With K_SPLIT > 1 each iteration takes K_SPLIT
    tiles of BLOCK_K rows as one batched dot, (K_SPLIT, BLOCK_B, BLOCK_K) @ (K_SPLIT, BLOCK_K,
    BLOCK_H), whose batch dimension Triton spreads over the warps, then sums the K_SPLIT
    partial products in a fixed order: K_SPLIT times fewer serial iterations, same result on
    every run (no atomics).
    """
    if K_SPLIT == 1:
        acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        for k0 in range(0, G * H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < G * H
            dg = tl.load(
                dg_next_ptr + offs_b[:, None] * (GS * H) + offs_k[None, :],
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
        for k0 in range(0, G * H, K_SPLIT * BLOCK_K):
            k_dg = k0 + split + tl.arange(0, BLOCK_K)[None, None, :]  # (K_SPLIT, 1, BLOCK_K)
            dg = tl.load(
                dg_next_ptr + offs_b[None, :, None] * (GS * H) + k_dg,
                mask=mask_b[None, :, None] & (k_dg < G * H),
                other=0.0,
                cache_modifier=DG_CACHE,
            )
            k_w = k0 + split + tl.arange(0, BLOCK_K)[None, :, None]  # (K_SPLIT, BLOCK_K, 1)
            w = tl.load(
                w_ptr + k_w.to(tl.int64) * H + offs_j[None, None, :],
                mask=(k_w < G * H) & mask_j[None, None, :],
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
    dgates_ptr,  # (T, B, GS*H) out at t, input dtype; read at t_next when HAS_NEXT
    w_ptr,  # (G*H, H) W_hh, contiguous; read only when HAS_REC
    dh_ptr,  # HAS_REC: (T, B, H) gradient of hs; else (B, H) float32 gradient of o*tanh(c_t)
    gates_ptr,  # (T, B, 4H) saved by save_step (LSTM, GRU)
    state_ptr,  # (T, B, H) LSTM: float32 saved c_t; RNN: hs (h_t); GRU: unread
    prev_ptr,  # (B, H) LSTM: float32 c_{t-1} (a step of cs, or c0); GRU: h_{t-1} (of hs, or h0)
    len_ptr,  # (B,) int32 valid lengths; read only when HAS_LENGTHS
    dh_carry_ptr,  # (B, H) float32 in/out: gradient reaching h_t elementwise (HAS_REC)
    dc_carry_ptr,  # (B, H) float32 in/out, LSTM: gradient of c_t in, of c_{t-1} out
    B,
    H: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CELL: tl.constexpr,
    G: tl.constexpr,
    GS: tl.constexpr,
    HAS_REC: tl.constexpr,  # fuse dh_t = dhs_t + dgates_{t+1} @ W_hh (no projection)
    HAS_NEXT: tl.constexpr,  # a later step exists (false for the first step of backward)
    HAS_LENGTHS: tl.constexpr,
    K_SPLIT: tl.constexpr,  # K tiles reduced at once, one batched dot (see recurrent_grad)
    DG_CACHE: tl.constexpr,  # "" or ".cg" (persistent: dgates_{t+1} written by other SMs)
    DOT_PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """One backward step (forward step t, reached from t_next) for one tile.

    dh_carry holds what reaches h_t without passing through W_hh: dhs summed over the steps past
    a sequence's length (which pass h through) and, for the GRU, dh_{t+1} * z_{t+1}.
    """
    offs_b, offs_j, mask_b, mask = tile_offsets(pid_b, pid_h, B, H, BLOCK_B, BLOCK_H)
    t64 = t.to(tl.int64)
    row = t64 * B * H + offs_b * H
    row_dg = t64 * B * GS * H + offs_b * (GS * H)
    row4 = t64 * B * 4 * H + offs_b * (4 * H)
    carry = offs_b[:, None] * H + offs_j[None, :]

    # Every load of the tile first, so that they are in flight during the recurrent GEMM's K
    # loop rather than one more memory round trip after it.
    if HAS_REC:
        dh = tl.load(dh_ptr + row[:, None] + offs_j[None, :], mask=mask, other=0.0)
        dh = dh.to(tl.float32) + tl.load(dh_carry_ptr + carry, mask=mask, other=0.0)
    else:
        dh = tl.load(dh_ptr + carry, mask=mask, other=0.0)
    # What each cell reads: gates (LSTM, GRU), state_t (LSTM: c_t, RNN: h_t), prev (LSTM:
    # c_{t-1}, GRU: h_{t-1}), dc (LSTM).
    a0, a1, a2, a3, state, prev, dc = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    if CELL == "lstm" or CELL == "gru":
        a0, a1, a2, a3 = load_gates(gates_ptr, row4, offs_j, mask, H)
        prev = tl.load(prev_ptr + carry, mask=mask, other=0.0).to(tl.float32)
    if CELL != "gru":
        state = tl.load(state_ptr + row[:, None] + offs_j[None, :], mask=mask, other=0.0)
    if HAS_REC and HAS_NEXT:
        dg_next = dgates_ptr + t_next.to(tl.int64) * B * GS * H
        dh += recurrent_grad(
            dg_next, w_ptr, offs_b, offs_j, mask_b, offs_j < H, H=H, BLOCK_B=BLOCK_B,
            BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K, G=G, GS=GS, K_SPLIT=K_SPLIT,
            DG_CACHE=DG_CACHE, DOT_PRECISION=DOT_PRECISION, INTERPRETED=INTERPRETED,
        )  # fmt: skip

    # dc and the lengths after: this program wrote dc itself (an L2 hit), and fewer tiles stay
    # live across the K loop (registers).
    if CELL == "lstm":
        dc = tl.load(dc_carry_ptr + carry, mask=mask, other=0.0)
    valid = True
    if HAS_LENGTHS:
        valid = (t < tl.load(len_ptr + offs_b, mask=mask_b, other=0))[:, None]
    if CELL == "lstm":
        i, f, g, o = a0, a1, a2, a3
        tc = tanh(state)
        dc_total = dc + dh * o * (1.0 - tc * tc)
        d0 = dc_total * g * i * (1.0 - i)
        d1 = dc_total * prev * f * (1.0 - f)
        d2 = dc_total * i * (1.0 - g * g)
        d3 = dh * tc * o * (1.0 - o)
        dc_prev = dc_total * f
        dh_keep = tl.zeros_like(dh)
    elif CELL == "gru":
        d0, d1, d2, d3, dh_keep = gru_cell_backward(dh, a0, a1, a2, a3, prev)
    else:
        d0 = rnn_activation_grad(dh, state.to(tl.float32), CELL)
        d1, d2, d3 = d0, d0, d0  # a single gate
        dh_keep = tl.zeros_like(dh)
    if HAS_LENGTHS:
        # A skipped step passes h (and c) through unchanged: so do their gradients.
        d0 = tl.where(valid, d0, 0.0)
        d1 = tl.where(valid, d1, 0.0)
        d2 = tl.where(valid, d2, 0.0)
        d3 = tl.where(valid, d3, 0.0)
        if CELL == "lstm":
            dc_prev = tl.where(valid, dc_prev, dc)
        dh_keep = tl.where(valid, dh_keep, dh)
    if HAS_REC:
        tl.store(dh_carry_ptr + carry, dh_keep, mask=mask)
    store_slots(dgates_ptr, row_dg, offs_j, mask, d0, d1, d2, d3, H, GS=GS)
    if CELL == "lstm":
        tl.store(dc_carry_ptr + carry, dc_prev, mask=mask)


# Time indices change every launch: not specialising on them (== 1, % 16) keeps one binary.
@triton.jit(do_not_specialize=["t", "t_next", "t_prev"])
def _lstm_bwd_step_kernel(
    dgates_ptr,  # (T, B, GS*H) out at t, input dtype; read at t_next when HAS_NEXT
    w_ptr,  # (G*H, H) W_hh, contiguous; read only when HAS_REC
    dh_ptr,  # HAS_REC: (T, B, H) gradient of hs; else (B, H) float32 gradient of o*tanh(c_t)
    gates_ptr,  # (T, B, 4H) saved by save_step (LSTM, GRU)
    state_ptr,  # (T, B, H) LSTM: float32 saved cell states; RNN: hs; GRU: unread
    prev_ptr,  # (T, B, H) read at t_prev: cs (LSTM) or hs (GRU); or (B, H) c0/h0, t_prev = 0
    len_ptr,  # (B,) int32 valid lengths; read only when HAS_LENGTHS
    dh_carry_ptr,  # (B, H) float32 in/out (see bwd_step)
    dc_carry_ptr,  # (B, H) float32 in/out (LSTM)
    t,
    t_next,
    t_prev,
    B,
    H: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CELL: tl.constexpr,
    G: tl.constexpr,
    GS: tl.constexpr,
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
        dh_ptr=dh_ptr, gates_ptr=gates_ptr, state_ptr=state_ptr,
        prev_ptr=prev_ptr + t_prev.to(tl.int64) * B * H, len_ptr=len_ptr,
        dh_carry_ptr=dh_carry_ptr, dc_carry_ptr=dc_carry_ptr, B=B, H=H, BLOCK_B=BLOCK_B,
        BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K, CELL=CELL, G=G, GS=GS, HAS_REC=HAS_REC,
        HAS_NEXT=HAS_NEXT, HAS_LENGTHS=HAS_LENGTHS, K_SPLIT=K_SPLIT, DG_CACHE="",
        DOT_PRECISION=DOT_PRECISION, INTERPRETED=INTERPRETED,
    )  # fmt: skip
