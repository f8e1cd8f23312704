"""Triton building blocks of the recurrent kernels (LSTM, GRU, Elman RNN): the cells' math, the
gate-major tile layout, the dot with float32 accumulation, and the grid barrier of the
persistent kernels.

Glossary: B batch, H hidden units, G gates per hidden unit (LSTM 4: i, f, g, o; GRU 3: r, z, n;
RNN 1, in torch's order), GS gate slots of a tile (G rounded up to a power of two: 4, 4, 1).
``BLOCK_B`` rows of the batch and ``BLOCK_H`` hidden units are one program's tile; a tile of
the gates is ``GS * BLOCK_H`` columns ordered gate-major (column n holds gate ``n // BLOCK_H``
of hidden unit ``n % BLOCK_H``; the GRU's fourth slot is masked), so the recurrent GEMM of all
gates is one ``tl.dot`` whose N dimension is 16 or more even when ``BLOCK_H`` is only 4.

Nothing here imports another fastpar module: every kernel file imports this one.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    # 2*sigmoid(2x) - 1 saturates correctly at both ends (exp overflow gives inf -> 0, not NaN).
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def split_gates(acc, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """(BLOCK_B, 4*BLOCK_H) gate-major tile -> four (BLOCK_B, BLOCK_H) tiles i, f, g, o."""
    a = tl.reshape(acc, (BLOCK_B, 2, 2, BLOCK_H))  # [b, gate // 2, gate % 2, j]
    a = tl.permute(a, (0, 3, 1, 2))  # [b, j, gate // 2, gate % 2]
    even, odd = tl.split(a)  # gate % 2 == 0 (i, g) and == 1 (f, o), each [b, j, gate // 2]
    pre_i, pre_g = tl.split(even)
    pre_f, pre_o = tl.split(odd)
    return pre_i, pre_f, pre_g, pre_o


@triton.jit
def cell_forward(pre_i, pre_f, pre_g, pre_o, c_prev):
    """Gate nonlinearities and cell update in float32; returns activations, c_t and h_t."""
    i = sigmoid(pre_i)
    f = sigmoid(pre_f)
    g = tanh(pre_g)
    o = sigmoid(pre_o)
    c = f * c_prev + i * g
    h = o * tanh(c)
    return i, f, g, o, c, h


@triton.jit
def gru_cell_forward(hr, hz, hn, xr, xz, xn, h_prev):
    """GRU gates and update in float32, as torch.nn.GRU: hr, hz, hn are ``h_{t-1} @ W_h*^T``
    (hn with b_hn added), xr, xz, xn the input projection. Returns r, z, n and h_t."""
    r = sigmoid(xr + hr)
    z = sigmoid(xz + hz)
    n = tanh(xn + r * hn)
    return r, z, n, n + z * (h_prev - n)


@triton.jit
def gru_cell_backward(dh, r, z, n, hn, h_prev):
    """Gradients of one GRU step from dh = dL/dh_t and the saved r, z, n, hn (= h W_hn^T +
    b_hn): of the pre-activations of r and z, of hn (the n rows of the recurrent GEMM), of the
    input part of n, and the part of dL/dh_{t-1} that does not pass through W_hh (dh * z)."""
    d_pre_n = dh * (1.0 - z) * (1.0 - n * n)
    d_r = d_pre_n * hn * r * (1.0 - r)
    d_z = dh * (h_prev - n) * z * (1.0 - z)
    return d_r, d_z, d_pre_n * r, d_pre_n, dh * z


@triton.jit
def rnn_activation(pre, CELL: tl.constexpr):
    """The Elman RNN's nonlinearity: tanh ("rnn_tanh") or relu ("rnn_relu")."""
    if CELL == "rnn_relu":
        h = tl.maximum(pre, 0.0)
    else:
        h = tanh(pre)
    return h


@triton.jit
def rnn_activation_grad(dh, h, CELL: tl.constexpr):
    """dL/d(pre-activation) from dL/dh_t and h_t = act(pre-activation)."""
    if CELL == "rnn_relu":
        d = tl.where(h > 0.0, dh, 0.0)
    else:
        d = dh * (1.0 - h * h)
    return d


@triton.jit
def _round_to_tf32(x):
    # Round to nearest (ties away from zero, as cvt.rna.tf32.f32) at TF32's 10 mantissa bits.
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x1000) & 0xFFFFE000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def dot_acc(a, b, acc, DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """acc + a @ b with float32 accumulation.

    INTERPRETED: Triton 3.6's interpreter multiplies bfloat16 operands as raw 16-bit integers and
    ignores ``input_precision``, so there operands are widened to float32 first (a product of two
    bfloat16 or float16 values is exact in float32) and, for "tf32", rounded to TF32 as the
    tensor cores do. That gives the GPU's numbers up to summation order.
    """
    if INTERPRETED:
        a32 = a.to(tl.float32)
        b32 = b.to(tl.float32)
        if DOT_PRECISION == "tf32":
            a32 = _round_to_tf32(a32)
            b32 = _round_to_tf32(b32)
        acc = tl.dot(a32, b32, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def gate_columns(j0, H, BLOCK_H: tl.constexpr, G: tl.constexpr, GS: tl.constexpr):
    """Column of the (., G*H) gate layout for each of the tile's GS*BLOCK_H gate-major columns,
    and whether it exists (its unit is < H and its gate < G)."""
    n = tl.arange(0, GS * BLOCK_H)
    gate = n // BLOCK_H
    j = j0 + n % BLOCK_H
    valid = j < H
    if G < GS:
        valid = valid & (gate < G)
    return gate * H + j, valid


@triton.jit
def store_gates(ptr, row_off, offs_j, mask, i, f, g, o, H):
    """Store four (BLOCK_B, BLOCK_H) tiles into a (., B, 4H) row block in gate-block layout."""
    p = ptr + row_off[:, None] + offs_j[None, :]
    tl.store(p, i.to(ptr.dtype.element_ty), mask=mask)
    tl.store(p + H, f.to(ptr.dtype.element_ty), mask=mask)
    tl.store(p + 2 * H, g.to(ptr.dtype.element_ty), mask=mask)
    tl.store(p + 3 * H, o.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_slots(ptr, row_off, offs_j, mask, a0, a1, a2, a3, H, GS: tl.constexpr):
    """store_gates for GS slots per row: four, or only a0 when GS == 1."""
    if GS == 1:
        p = ptr + row_off[:, None] + offs_j[None, :]
        tl.store(p, a0.to(ptr.dtype.element_ty), mask=mask)
    else:
        store_gates(ptr, row_off, offs_j, mask, a0, a1, a2, a3, H)


@triton.jit
def load_gates(ptr, row_off, offs_j, mask, H):
    """Load four (BLOCK_B, BLOCK_H) float32 tiles from a (., B, 4H) row block."""
    p = ptr + row_off[:, None] + offs_j[None, :]
    i = tl.load(p, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(p + H, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(p + 2 * H, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(p + 3 * H, mask=mask, other=0.0).to(tl.float32)
    return i, f, g, o


@triton.jit
def grid_arrive(sync_ptr):
    """Count this program in at the barrier whose counter is sync_ptr (after all its stores)."""
    tl.debug_barrier()  # every warp of this program has issued its stores
    tl.atomic_add(sync_ptr, 1, sem="release", scope="gpu")


@triton.jit
def grid_wait(sync_ptr, arrivals):
    """Wait until the counter at sync_ptr reaches ``arrivals``.

    Work that does not depend on the other programs (prefetching the next step's inputs, storing
    what backward saves) belongs between grid_arrive and grid_wait, off the critical path.
    """
    # Triton lowers this poll to an acquire load at GPU scope (no read-modify-write of the
    # counter), so waiting programs do not serialise in L2 in front of the arrivals. Its result
    # must be used: an atomic whose result is unused is compiled away.
    while tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu") < arrivals:
        pass
