"""Triton building blocks shared by the LSTM kernels, and the kernels' launch configurations.

Glossary: B batch, T time, H hidden units, P size of h (proj_size or H), G = 4 gates (i, f, g, o
in torch's order). ``BLOCK_B`` rows of the batch and ``BLOCK_H`` hidden units are one program's
tile; a tile of the four gates is ``4 * BLOCK_H`` columns ordered gate-major (column n holds
gate ``n // BLOCK_H`` of hidden unit ``n % BLOCK_H``), so the recurrent GEMM of all four gates
is one ``tl.dot`` whose N dimension is 16 or more even when ``BLOCK_H`` is only 4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MIN_DOT = 16  # every tl.dot dimension must be >= 16 on NVIDIA GPUs (the interpreter accepts less)


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
def dot_acc(a, b, acc, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """acc + a @ b with float32 accumulation.

    DOT_UPCAST (interpreter only): Triton 3.6's interpreter multiplies bfloat16 operands as raw
    16-bit integers, so there they are widened to float32 first. A product of two bfloat16
    values is exact in float32, so this gives the numbers of the GPU's bfloat16 MMA with float32
    accumulation (up to summation order).
    """
    if DOT_UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def gate_columns(j0, H, BLOCK_H: tl.constexpr):
    """Column of the (., 4H) gate layout for each of the tile's 4*BLOCK_H gate-major columns."""
    n = tl.arange(0, 4 * BLOCK_H)
    j = j0 + n % BLOCK_H
    col = (n // BLOCK_H) * H + j
    return col, j < H


@triton.jit
def store_gates(ptr, row_off, offs_j, mask, i, f, g, o, H):
    """Store four (BLOCK_B, BLOCK_H) tiles into a (., B, 4H) row block in gate-block layout."""
    p = ptr + row_off[:, None] + offs_j[None, :]
    tl.store(p, i.to(ptr.dtype.element_ty), mask=mask)
    tl.store(p + H, f.to(ptr.dtype.element_ty), mask=mask)
    tl.store(p + 2 * H, g.to(ptr.dtype.element_ty), mask=mask)
    tl.store(p + 3 * H, o.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_gates(ptr, row_off, offs_j, mask, H):
    """Load four (BLOCK_B, BLOCK_H) float32 tiles from a (., B, 4H) row block."""
    p = ptr + row_off[:, None] + offs_j[None, :]
    i = tl.load(p, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(p + H, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(p + 2 * H, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(p + 3 * H, mask=mask, other=0.0).to(tl.float32)
    return i, f, g, o


def dot_precision(dtype: torch.dtype) -> str:
    """float32 GEMMs follow torch's TF32 switch so the Triton path rounds like torch.matmul."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def dot_upcast(dtype: torch.dtype) -> bool:
    """Widen bfloat16 tl.dot operands: only in the interpreter (see dot_acc)."""
    from fastpar.ops import interpreter_active

    return dtype == torch.bfloat16 and interpreter_active()


def batch_block(batch: int) -> int:
    """Batch tile: a power of two >= 16 (the smallest tl.dot M), at most 64."""
    return min(64, max(MIN_DOT, triton.next_power_of_2(batch)))


@dataclass(frozen=True)
class StepConfig:
    """Tiles of the per-step kernels (forward and backward)."""

    block_b: int  # batch rows per program (>= 16)
    block_h: int  # hidden units per forward program (4*block_h >= 16)
    block_h_bwd: int  # hidden units per backward program (>= 16: it is a tl.dot N)
    block_k: int  # reduction tile of the recurrent GEMMs (>= 16)
    num_warps: int


@dataclass(frozen=True)
class PersistentConfig:
    """Tiles of the persistent forward kernel; grid = (cdiv(B, block_b), cdiv(H, block_h))."""

    block_b: int
    block_h: int  # hidden units per program; its 4*block_h rows of W_hh stay in L1
    block_k: int
    num_warps: int


def step_config(batch: int, hidden: int, dtype: torch.dtype, num_sms: int) -> StepConfig:
    """Tiles for the per-step kernels: the widest hidden tile (fewer programs re-read h_{t-1})
    that still gives every SM a program, since one step is far too small to fill the GPU."""
    block_b = batch_block(batch)
    n_b = triton.cdiv(batch, block_b)
    block_h = 32
    while block_h > 4 and n_b * triton.cdiv(hidden, block_h) < num_sms:
        block_h //= 2
    block_h_bwd = 32 if n_b * triton.cdiv(hidden, 32) >= num_sms else MIN_DOT
    block_k = 32 if dtype == torch.float32 else 64
    return StepConfig(block_b, block_h, block_h_bwd, block_k, num_warps=4)


# A program's share of W_hh must fit in its SM's L1 (256 KiB of L1 + shared memory on an H100,
# of which the kernel's dot tiles take a few KiB) to stay on chip between steps.
PERSISTENT_W_BYTES = 128 * 1024


def persistent_config(
    batch: int,
    hidden: int,
    proj: int,
    dtype: torch.dtype,
    num_sms: int,
    interpreter: bool,
    backward: bool = False,
) -> PersistentConfig | None:
    """The persistent kernel's tiles, or None when it does not apply.

    Programs of one batch block meet at a barrier after every step, so all of them must be
    resident at once: on a GPU the whole grid fits in the SMs (one program each); in the
    interpreter, which runs programs one after another, a batch block is a single program that
    covers every hidden unit. It also returns None when a program's share of W_hh would not fit
    in L1, or with a projection (h_t then needs all hidden units). The backward kernel's hidden
    tile is the N of its tl.dot, so it is at least 16 wide.
    """
    if proj != hidden:
        return None
    block_b = batch_block(batch)
    n_b = triton.cdiv(batch, block_b)
    min_h = MIN_DOT if backward else 4
    if interpreter:
        block_h = max(min_h, triton.next_power_of_2(hidden))
    else:
        if n_b > num_sms:
            return None
        block_h = min_h
        while n_b * triton.cdiv(hidden, block_h) > num_sms:
            block_h *= 2
        if 4 * block_h * hidden * torch.finfo(dtype).bits // 8 > PERSISTENT_W_BYTES:
            return None
    # A 64-row batch tile needs 8 warps (and, backward, a narrower K tile) to hold its tiles
    # without spilling (bench/kernel_report.py shows the registers).
    block_k = 32 if dtype == torch.float32 or (backward and block_b >= 64) else 64
    return PersistentConfig(block_b, block_h, block_k, num_warps=8 if block_b >= 64 else 4)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1
