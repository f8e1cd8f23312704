"""Launch configurations of the recurrent kernels (LSTM, GRU, Elman RNN) and the choice between
them.

Glossary: B batch, H hidden units, P size of h (proj_size or H), G gates per hidden unit (LSTM 4,
GRU 3, RNN 1: ``gate_count``), GS gate slots of a tile (``gate_slots``), KP = H rounded up to a
power of two (the K of a dot that takes all of h_{t-1} at once). Every function takes the cell
(``CellKind``, default "lstm"): the kernels are shared, only their gate count differs.

Which kernel runs (``choose_kernel``):
- "step": one launch per time step (and direction), any shape, with or without a projection.
- "persistent": one launch runs all T steps; needs no projection and a grid that fits in the
  SMs at once (the programs meet at a grid barrier after every step).

The kernels (the second generation, "v2") hold each program's share of W_hh on chip for the
whole sequence where its tiles fit (``w_resident``) and split the backward's K loop across warps
(``k_split``). The first generation, which re-read the share every step from L2, was retired
after an H200 run measured v2's forward+backward 1.7x faster (12.0 against 20.2 ms at B16 T1024
H768 bfloat16; the forwards took the same time).

Which tiles the persistent kernels take (``tile_choice``, environment variable
``FASTPAR_LSTM_TILES``): "v2" (default, the tiles the H200 measured) the narrowest hidden tile
whose grid fits in the SMs (backward: with 64-row batch tiles); "min-traffic" the tiles that read
the fewest bytes from L2 per step (``min_traffic_tiles``), a model's choice that becomes the
default only if a GPU run shows it faster (the GPU check times both).

float32 dots use TF32 exactly when cuDNN's LSTM would (``fp32_dot_precision``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast, get_args

import torch
import triton

from fastpar.ops import interpreter_active

KernelChoice = Literal["auto", "step", "persistent"]
# The cells the kernels run: "rnn_tanh" and "rnn_relu" are torch.nn.RNN's two nonlinearities.
CellKind = Literal["lstm", "gru", "rnn_tanh", "rnn_relu"]
_F = TypeVar("_F", bound=Callable[..., Any])
TileChoice = Literal["min-traffic", "v2"]
TILES_ENV = "FASTPAR_LSTM_TILES"

MIN_DOT = 16  # every tl.dot dimension must be >= 16 on NVIDIA GPUs (the interpreter accepts less)
# A persistent forward whose share of W_hh fits no tile's registers re-reads it every step: it
# must then fit in its SM's L1 (256 KiB of L1 + shared memory on an H100, of which the kernel's
# dot tiles take a few KiB).
PERSISTENT_W_BYTES = 128 * 1024
# The largest (batch x hidden) tile of the persistent backward, whose W_hh share is not
# bounded by L1: 64 x 32 spills (bench/kernel_report.py at B=256 H=1000).
PERSISTENT_BWD_MAX_TILE = 64 * 16
# The forward takes one dot over all of h_{t-1} with W_hh's share as one tile (Triton keeps the
# share in shared memory and streams both operands through registers): at most this many bytes
# of the two per thread (of 255 registers; the rest hold addresses, the gate math and the
# prefetched inputs). bench/kernel_report.py shows the registers and shared memory ptxas
# allocates.
RESIDENT_BYTES_PER_THREAD = 128 * 4
RESIDENT_WARPS = 8
# What one SM streams from L2 against what the whole L2 delivers to all SMs: an H100 SM takes
# about 64 B/clock (~110 GB/s); the first H200 run's persistent backward read about 2 TB/s in
# all (42 MB per step in ~20 us at B=64 H=1024 on 64 programs and at B=256 H=512 on 128: its
# step time followed the bytes all programs read, not the bytes of one program).
SM_SHARE_OF_L2 = 1 / 20


def gate_count(cell: CellKind) -> int:
    """G: gates per hidden unit (rows of W_hh per unit): LSTM 4, GRU 3, RNN 1."""
    if cell not in get_args(CellKind):
        raise ValueError(f"cell must be one of {get_args(CellKind)}, got {cell!r}")
    return {"lstm": 4, "gru": 3}.get(cell, 1)


def gate_slots(cell: CellKind) -> int:
    """GS: columns per hidden unit of a kernel tile, G rounded up to a power of two (tl.arange
    sizes are powers of two; the GRU's fourth slot is masked)."""
    return triton.next_power_of_2(gate_count(cell))


def tile_choice() -> TileChoice:
    """The persistent kernels' tile choice, from FASTPAR_LSTM_TILES (default "v2", the
    measured one; "min-traffic" the candidate)."""
    tiles = os.environ.get(TILES_ENV, "v2")
    if tiles not in get_args(TileChoice):
        raise ValueError(f"{TILES_ENV} must be one of {get_args(TileChoice)}, got {tiles!r}")
    return tiles  # type: ignore[return-value]


def fp32_rnn_allows_tf32() -> bool:
    """Whether torch lets cuDNN's RNNs (so torch.nn.LSTM on CUDA) compute float32 in TF32.

    That is ``torch.backends.cudnn.rnn.fp32_precision``; "none" inherits from
    ``torch.backends.cudnn.fp32_precision`` and then ``torch.backends.fp32_precision``. The
    legacy switch ``torch.backends.cudnn.allow_tf32`` (True by default) sets the same state.
    """
    cudnn = torch.backends.cudnn
    rnn = getattr(cudnn, "rnn", None)
    chain = (
        getattr(rnn, "fp32_precision", "none"),
        getattr(cudnn, "fp32_precision", "none"),
        getattr(torch.backends, "fp32_precision", "none"),
    )
    for precision in chain:
        if precision != "none":
            return precision == "tf32"
    if getattr(rnn, "fp32_precision", None) is None:  # a torch without the per-op API
        return bool(cudnn.allow_tf32)
    return False


def fp32_dot_precision(device: torch.device) -> Literal["ieee", "tf32"]:
    """input_precision of the float32 dots: TF32 on CUDA when cuDNN's LSTM would use it
    (``fp32_rnn_allows_tf32``), so fastpar.nn.LSTM and torch.nn.LSTM round alike; IEEE on
    the CPU, which has no TF32 (as torch's CPU LSTM)."""
    return "tf32" if device.type == "cuda" and fp32_rnn_allows_tf32() else "ieee"


def dot_precision(dtype: torch.dtype, device: torch.device) -> Literal["ieee", "tf32"]:
    """input_precision of every tl.dot of a layer (only float32 operands have a choice)."""
    return fp32_dot_precision(device) if dtype == torch.float32 else "tf32"


def saved_gates_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the gate activations kept for backward: float16 for half-type inputs, else
    float32.

    Activations lie in [0, 1] (i, f, o) or [-1, 1] (g), where float16 keeps 11 significant bits
    (bfloat16 only 8): rounded to bfloat16 they put bfloat16 gradients outside tests/ops' bound
    (twice PyTorch's own error), rounded to float16 the errors stay where float32 put them. c_t
    is saved in float32: it is unbounded and carries the recurrence. The GRU saves r, z, n and
    ``h_{t-1} W_hn^T + b_hn`` in the same dtype: the last is unbounded but only scales the reset
    gate's gradient (11 significant bits suffice), and carries nothing.
    """
    return torch.float16 if dtype in (torch.bfloat16, torch.float16) else torch.float32


def batch_block(batch: int) -> int:
    """Batch tile: a power of two >= 16 (the smallest tl.dot M), at most 64."""
    return min(64, max(MIN_DOT, triton.next_power_of_2(batch)))


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def padded_k(size: int) -> int:
    """KP: the K of a dot over all ``size`` units of h_{t-1}, a power of two >= MIN_DOT."""
    return max(MIN_DOT, triton.next_power_of_2(size))


def resident_warps(cell: CellKind = "lstm") -> int:
    """Warps of a program that holds W_hh's share: RESIDENT_WARPS, halved for the RNN, whose
    output tile is a quarter as wide (GS = 1): 8 warps over its 16 columns spill where the
    rows of h are not 16-byte aligned (bench/kernel_report.py, H=1001), 4 do not."""
    return RESIDENT_WARPS if gate_slots(cell) == 4 else RESIDENT_WARPS // 2


def w_fits_registers(
    block_b: int, hidden: int, block_h: int, dtype: torch.dtype, cell: CellKind = "lstm"
) -> bool:
    """Whether a (KP, GS*block_h) share of W_hh and a (block_b, KP) tile of h_{t-1} fit in the
    registers of ``resident_warps(cell)`` warps (RESIDENT_BYTES_PER_THREAD each)."""
    kp = padded_k(hidden)
    size = (block_b * kp + kp * gate_slots(cell) * block_h) * torch.finfo(dtype).bits // 8
    return size <= RESIDENT_BYTES_PER_THREAD * resident_warps(cell) * 32


def min_traffic_tiles(
    batch: int,
    hidden: int,
    dtype: torch.dtype,
    num_sms: int,
    backward: bool,
    cell: CellKind = "lstm",
) -> tuple[int, int] | None:
    """(block_b, block_h) of a persistent kernel that reads the fewest bytes from L2 per
    step, or None when no tile fits.

    Every step each program reads, from L2 (the barrier empties L1), what the other programs
    wrote for all units of its batch rows: forward h_{t-1} (H columns), backward dgates_{t+1}
    (G*H columns); backward also its G*H x block_h share of W_hh (forward holds it on chip). For
    n_b batch and n_h hidden tiles that is ``B*H*n_h`` elements in all forward and
    ``G*H*(B*n_h + H*n_b)`` backward: narrow tiles multiply the first term, short ones the
    second. A step takes the longer of that total through the whole L2 and one program's share
    through its SM (SM_SHARE_OF_L2), so a few very wide tiles lose to more, narrower ones.

    Forward keeps the batch tile of ``batch_block`` and takes only tiles whose W_hh share fits
    in registers (``w_fits_registers``; None if none does); backward tiles are at most
    PERSISTENT_BWD_MAX_TILE (registers) and at least 16 wide (a tl.dot N). The grid is at most
    num_sms (one program per SM).
    """
    width = gate_count(cell) * hidden if backward else hidden
    best = None
    for block_b in (16, 32, 64) if backward else (batch_block(batch),):
        if block_b > batch_block(batch):
            break
        n_b = triton.cdiv(batch, block_b)
        block_h = MIN_DOT if backward else MIN_DOT // gate_slots(cell)
        while block_h < 2 * hidden:
            if backward and block_b * block_h > PERSISTENT_BWD_MAX_TILE:
                break
            if not backward and not w_fits_registers(block_b, hidden, block_h, dtype, cell):
                break
            n_h = triton.cdiv(hidden, block_h)
            if n_b * n_h <= num_sms:
                per_program = width * min(block_b, batch)
                if backward:
                    per_program += width * min(block_h, hidden)
                cost = max(n_b * n_h * per_program, per_program / SM_SHARE_OF_L2)
                # On a tie (one program's share bounds the step) more programs share the math.
                key = (cost, -n_b * n_h)
                if best is None or key < best[0]:
                    best = (key, block_b, block_h)
            block_h *= 2
    return None if best is None else (best[1], best[2])


@dataclass(frozen=True)
class StepConfig:
    """Tiles of the per-step kernels (forward and backward)."""

    block_b: int  # batch rows per program (>= 16)
    block_h: int  # hidden units per forward program (GS*block_h >= 16)
    block_h_bwd: int  # hidden units per backward program (>= 16: it is a tl.dot N)
    block_k: int  # reduction tile of the recurrent GEMMs (>= 16)
    num_warps: int
    w_resident: bool  # forward: one dot over all of h_{t-1} with W's share as one tile
    k_split: int  # backward: K tiles per batched dot, spread over the warps


@dataclass(frozen=True)
class PersistentConfig:
    """Tiles of a persistent kernel; grid = (cdiv(B, block_b), cdiv(H, block_h))."""

    block_b: int
    block_h: int  # hidden units per program
    block_k: int  # reduction tile where W_hh's share is re-read every step
    num_warps: int
    w_resident: bool  # forward: W_hh's (KP, GS*block_h) share stays on chip
    k_split: int = 1  # backward: K tiles per batched dot, spread over the warps


def step_config(
    batch: int,
    hidden: int,
    dtype: torch.dtype,
    num_sms: int,
    interpreter: bool = False,
    cell: CellKind = "lstm",
) -> StepConfig:
    """Tiles for the per-step kernels: the widest hidden tile (fewer programs re-read h_{t-1})
    that still gives every SM a program, since one step is far too small to fill the GPU.

    The forward step runs as one dot over all of h_{t-1} (the body the persistent kernel runs)
    where its tiles fit in registers and, on a GPU, the grid in one wave (the resident
    tiles leave room for few programs per SM); else as a loop over K tiles. The interpreter
    takes the resident body wherever it fits, so that it is tested with many programs.
    """
    block_b = batch_block(batch)
    n_b = triton.cdiv(batch, block_b)
    block_h = 32
    min_h = MIN_DOT // gate_slots(cell)  # the dot's N is GS*block_h
    while block_h > min_h and n_b * triton.cdiv(hidden, block_h) < num_sms:
        block_h //= 2
    block_h_bwd = 32 if n_b * triton.cdiv(hidden, 32) >= num_sms else MIN_DOT
    block_k = 32 if dtype == torch.float32 else 64
    one_wave = n_b * triton.cdiv(hidden, block_h) <= num_sms
    resident = w_fits_registers(block_b, hidden, block_h, dtype, cell) and (interpreter or one_wave)
    num_warps = resident_warps(cell) if resident else 4
    # Backward splits its K loop over G*H across the warps (see recurrent_grad).
    k_split = 4 if block_b < 64 else 2
    return StepConfig(block_b, block_h, block_h_bwd, block_k, num_warps, resident, k_split)


def _cached_per_tile_choice(function: _F) -> _F:
    """`function` cached per arguments and FASTPAR_LSTM_TILES value: every layer's forward and
    backward asks for its tiles, and "auto" twice more, tens of microseconds each. Under
    torch.compile it runs uncached (dynamo traces functions, not caches)."""

    @functools.lru_cache(maxsize=1024)
    def cached(tiles: TileChoice, args: tuple, keywords: tuple) -> Any:
        return function(*args, **dict(keywords))

    @functools.wraps(function)
    def choose(*args: Any, **keywords: Any) -> Any:
        if torch.compiler.is_compiling():
            return function(*args, **keywords)
        return cached(tile_choice(), args, tuple(sorted(keywords.items())))

    return cast("_F", choose)


@_cached_per_tile_choice
def persistent_config(
    batch: int,
    hidden: int,
    proj: int,
    dtype: torch.dtype,
    num_sms: int,
    interpreter: bool,
    backward: bool = False,
    cell: CellKind = "lstm",
) -> PersistentConfig | None:
    """The persistent kernel's tiles, or None when it does not apply.

    Programs of one batch block meet at a barrier after every step, so all of them must be
    resident at once: on a GPU the whole grid fits in the SMs (one program each); in the
    interpreter, which runs programs one after another, a batch block is a single program that
    covers every hidden unit. It also returns None with a projection (h_t then needs all hidden
    units), when a forward program's share of W_hh fits neither in registers nor in L1, or
    when the backward's tile would exceed
    PERSISTENT_BWD_MAX_TILE. The backward kernel's hidden tile is the N of its tl.dot, so it
    is at least 16 wide.
    """
    if proj != hidden:
        return None
    block_b = batch_block(batch)
    n_b = triton.cdiv(batch, block_b)
    min_h = MIN_DOT if backward else MIN_DOT // gate_slots(cell)
    if interpreter:
        block_h = max(min_h, triton.next_power_of_2(hidden))
    else:
        tiles = None
        if tile_choice() == "min-traffic":
            tiles = min_traffic_tiles(batch, hidden, dtype, num_sms, backward, cell)
            if tiles is None and backward:
                return None
        if tiles is not None:
            block_b, block_h = tiles
        else:  # "v2", and a forward whose W_hh share fits in no tile's registers
            if n_b > num_sms:
                return None
            block_h = min_h
            while n_b * triton.cdiv(hidden, block_h) > num_sms:
                block_h *= 2
    resident = not backward and (
        interpreter or w_fits_registers(block_b, hidden, block_h, dtype, cell)
    )
    if resident:
        return PersistentConfig(block_b, block_h, MIN_DOT, resident_warps(cell), w_resident=True)
    w_bytes = gate_count(cell) * block_h * hidden * torch.finfo(dtype).bits // 8
    w_share_fits_l1 = w_bytes <= PERSISTENT_W_BYTES
    if backward:
        # Backward runs persistent even when its W_hh share spills from L1 to L2: the step
        # kernels read it from L2 as well, and pay a launch per step on top. Its tile must stay
        # small enough for its per-warp tiles to fit in registers.
        if not interpreter and block_b * block_h > PERSISTENT_BWD_MAX_TILE:
            return None
    elif not interpreter and not w_share_fits_l1:
        return None
    # A 64-row batch tile needs 8 warps to hold its tiles without spilling, and so does
    # backward with 16-byte aligned operands; backward tiles of 1024 units also need a
    # narrower K tile (bench/kernel_report.py shows the registers). One program per SM: the
    # extra warps cost no occupancy.
    block_k = 32 if dtype == torch.float32 or (backward and block_b * block_h >= 1024) else 64
    num_warps = 8 if block_b >= 64 or backward else 4
    # Backward takes num_warps K tiles per step of its K loop, one per warp: 8x fewer serial
    # iterations over G*H (see recurrent_grad).
    k_split = num_warps if backward else 1
    return PersistentConfig(block_b, block_h, block_k, num_warps, w_resident=False, k_split=k_split)


def choose_kernel(
    batch: int,
    hidden: int,
    proj: int,
    dtype: torch.dtype,
    device: torch.device,
    kernel: KernelChoice = "auto",
    backward: bool = False,
    cell: CellKind = "lstm",
) -> Literal["step", "persistent"]:
    """Step or persistent kernel for this shape, forward or backward.

    "auto" takes the persistent kernel wherever it applies on a GPU (its W_hh share fits on
    chip, the grid fits in the SMs, no projection): it saves T-1 launches and keeps W_hh on
    chip. In the interpreter "auto" keeps the step kernel, which is the one real GPUs also run
    for the shapes the persistent kernel rejects.
    """
    if kernel not in get_args(KernelChoice):
        raise ValueError(f"kernel must be 'auto', 'step' or 'persistent', got {kernel!r}")
    if kernel == "step":
        return "step"
    cfg = persistent_config(
        batch, hidden, proj, dtype, num_sms(device), interpreter_active(), backward, cell
    )  # fmt: skip
    if kernel == "persistent":
        if cfg is None and backward:
            # Backward follows a persistent forward where it can; its hidden tile is 16 wide
            # (a tl.dot N), so it applies to fewer shapes.
            return "step"
        if cfg is None:
            raise ValueError(
                f"kernel='persistent' does not apply to batch {batch}, hidden_size {hidden}, "
                f"proj {proj}, {dtype}: needs no projection, the W_hh share on chip and a grid "
                "no larger than the number of SMs"
            )
        return "persistent"
    return "persistent" if cfg is not None and not interpreter_active() else "step"
