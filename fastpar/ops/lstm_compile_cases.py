"""The kernel configurations the recurrent launchers (LSTM, GRU, Elman RNN) choose for given
shapes, as compile cases.

``bench/kernel_report.py`` compiles each case for sm_90 (registers, spills, shared memory) and
the tests check that every case compiles: the interpreter runs kernels on the CPU but enforces
none of the GPU's limits (tl.dot dimensions, registers), so this is how a CPU-only CI catches
them. Each case carries the specialization a real launch gets: the constexprs the launchers
pass, and 16-divisibility of every pointer (torch's allocations are aligned) and of every
integer argument that is a multiple of 16 and not excluded by ``do_not_specialize``.

Glossary: B batch, H hidden units, P size of h (proj_size or H), G gates per unit, GS gate slots
of a tile (lstm_config.gate_count, gate_slots).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton

from fastpar.ops.lstm_config import (
    CellKind,
    dot_precision,
    gate_count,
    gate_slots,
    padded_k,
    persistent_config,
    saved_gates_dtype,
    step_config,
)
from fastpar.ops.lstm_persistent import _lstm_bwd_persistent_kernel, _lstm_fwd_persistent_kernel
from fastpar.ops.lstm_step import _lstm_bwd_step_kernel, _lstm_fwd_step_kernel

_TRITON_TYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_CUDA = torch.device("cuda")  # precision as on a GPU (TF32 follows torch's switch)


@dataclass(frozen=True)
class CompileCase:
    """One kernel specialisation: what to hand to ``compile_for_sm90``."""

    label: str  # kernel and shape, for reports
    kernel: Any  # the @triton.jit function
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    divisible_by_16: tuple[str, ...] = ()  # arguments a launch specialises as multiples of 16
    programs: int = 0  # grid size (persistent kernels: programs that must be resident at once)


def _divisible(signature: dict[str, str], ints: dict[str, int]) -> tuple[str, ...]:
    """Pointers (aligned allocations) and integer values that are multiples of 16."""
    pointers = [name for name, ty in signature.items() if ty.startswith("*")]
    return tuple(pointers + [name for name, value in ints.items() if value % 16 == 0])


def compile_cases(
    batch: int,
    hidden: int,
    proj: int,
    dtype: torch.dtype,
    num_sms: int,
    cell: CellKind = "lstm",
) -> list[CompileCase]:
    """Every kernel specialisation a layer of this shape launches on a GPU with num_sms SMs.

    Arguments:
        batch: B; hidden: H; proj: P (= H without a projection, the only choice but for the
        LSTM); dtype: of input and weights; num_sms: streaming multiprocessors (132 on an H100
        SXM); cell: "lstm", "gru", "rnn_tanh" or "rnn_relu".

    Returns:
        For the forward step kernel, the backward step kernel and, where the heuristic would
        pick them, the persistent forward and backward kernels: the lightest specialisation
        (no lengths, inference, first backward step) and the heaviest (lengths, reverse,
        training, a later backward step).
    """
    dt = "*" + _TRITON_TYPE[dtype]
    f32, i32 = "*fp32", "*i32"
    gates = "*" + _TRITON_TYPE[saved_gates_dtype(dtype)]
    shape = f"{cell} B={batch} H={hidden} P={proj} {_TRITON_TYPE[dtype]}"
    prec = dot_precision(dtype, _CUDA)
    kp = padded_k(proj)
    cell_consts = {"CELL": cell, "G": gate_count(cell), "GS": gate_slots(cell)}
    cases: list[CompileCase] = []
    cfg = step_config(batch, hidden, dtype, num_sms, cell=cell)
    step_grid = triton.cdiv(batch, cfg.block_b) * triton.cdiv(hidden, cfg.block_h)
    fwd_sig = {
        "xg_ptr": dt, "hprev_ptr": dt, "c_state_ptr": f32, "w_ptr": dt, "b_ptr": f32,
        "len_ptr": i32, "gates_ptr": gates, "cs_ptr": f32, "h_ptr": dt, "t": "i32",
        "t_prev": "i32", "B": "i32",
    }  # fmt: skip
    # Per kernel the lightest and the heaviest specialisation a launch takes: the ones between
    # hold a subset of the heaviest one's live values (fewer cases keep the CPU report short).
    for lengths, save in ((False, False), (True, True)):
        consts = {
            "H": hidden, "P": proj, "BLOCK_B": cfg.block_b, "BLOCK_H": cfg.block_h,
            "BLOCK_K": cfg.block_k, "KP": kp, "W_RESIDENT": cfg.w_resident,
            "HAS_LENGTHS": lengths, "CARRY_H": proj == hidden, "SAVE": save,
            "DOT_PRECISION": prec, "INTERPRETED": False, **cell_consts,
        }  # fmt: skip
        label = (
            f"fwd_step {shape} BLOCK_B={cfg.block_b} BLOCK_H={cfg.block_h} "
            f"resident={cfg.w_resident} lengths={lengths} save={save}"
        )
        div = _divisible(fwd_sig, {"B": batch})
        cases.append(
            CompileCase(
                label, _lstm_fwd_step_kernel, fwd_sig, consts, cfg.num_warps, div, step_grid
            )
        )
    has_rec = proj == hidden
    state = f32 if cell == "lstm" else dt  # c (LSTM) or h (GRU, RNN)
    bwd_sig = {
        "dgates_ptr": dt, "w_ptr": dt, "dh_ptr": dt if has_rec else f32, "gates_ptr": gates,
        "state_ptr": state, "prev_ptr": state, "len_ptr": i32, "dh_carry_ptr": f32,
        "dc_carry_ptr": f32, "t": "i32", "t_next": "i32", "t_prev": "i32", "B": "i32",
    }  # fmt: skip
    bwd_grid = triton.cdiv(batch, cfg.block_b) * triton.cdiv(hidden, cfg.block_h_bwd)
    for has_next, lengths in ((False, False), (True, True)):
        consts = {
            "H": hidden, "BLOCK_B": cfg.block_b, "BLOCK_H": cfg.block_h_bwd,
            "BLOCK_K": cfg.block_k, "HAS_REC": has_rec, "HAS_NEXT": has_next,
            "HAS_LENGTHS": lengths, "K_SPLIT": cfg.k_split, "DOT_PRECISION": prec,
            "INTERPRETED": False, **cell_consts,
        }  # fmt: skip
        label = (
            f"bwd_step {shape} BLOCK_B={cfg.block_b} BLOCK_H={cfg.block_h_bwd} "
            f"BLOCK_K={cfg.block_k} k_split={cfg.k_split} next={has_next} lengths={lengths}"
        )
        div = _divisible(bwd_sig, {"B": batch})
        cases.append(
            CompileCase(label, _lstm_bwd_step_kernel, bwd_sig, consts, cfg.num_warps, div, bwd_grid)
        )
    p_sigs = {
        "fwd_persistent": {
            "xg_ptr": dt, "h0_ptr": dt, "c0_ptr": f32, "w_ptr": dt, "b_ptr": f32,
            "len_ptr": i32, "gates_ptr": gates, "cs_ptr": f32, "h_ptr": dt, "c_n_ptr": f32,
            "sync_ptr": i32, "T": "i32", "B": "i32",
        },
        "bwd_persistent": {
            "dgates_ptr": dt, "w_ptr": dt, "dh_ptr": dt, "gates_ptr": gates,
            "state_ptr": state, "state0_ptr": state, "len_ptr": i32, "dh_carry_ptr": f32,
            "dc_carry_ptr": f32, "sync_ptr": i32, "T": "i32", "B": "i32",
        },
    }  # fmt: skip
    p_kernels = {
        "fwd_persistent": _lstm_fwd_persistent_kernel,
        "bwd_persistent": _lstm_bwd_persistent_kernel,
    }
    for name, kernel in p_kernels.items():
        backward = name[0] == "b"
        pcfg = persistent_config(
            batch, hidden, proj, dtype, num_sms, interpreter=False, backward=backward, cell=cell
        )  # fmt: skip
        if pcfg is None:
            continue
        programs = triton.cdiv(batch, pcfg.block_b) * triton.cdiv(hidden, pcfg.block_h)
        # (reverse, lengths, save): the lightest and the heaviest, as for the step kernels.
        for reverse, lengths, save in ((False, False, False), (True, True, True)):
            consts = {
                "H": hidden, "BLOCK_B": pcfg.block_b, "BLOCK_H": pcfg.block_h,
                "BLOCK_K": pcfg.block_k, "REVERSE": reverse, "HAS_LENGTHS": lengths,
                "DOT_PRECISION": prec, "INTERPRETED": False, **cell_consts,
            }  # fmt: skip
            label = (
                f"{name} {shape} BLOCK_B={pcfg.block_b} BLOCK_H={pcfg.block_h} "
                f"reverse={reverse} lengths={lengths}"
            )
            if not backward:
                consts |= {"KP": padded_k(hidden), "W_RESIDENT": pcfg.w_resident}
                consts["SAVE"] = save
                label += f" resident={pcfg.w_resident} save={save}"
            else:
                consts["K_SPLIT"] = pcfg.k_split
                label += f" k_split={pcfg.k_split}"
            div = _divisible(p_sigs[name], {"B": batch})
            cases.append(
                CompileCase(label, kernel, p_sigs[name], consts, pcfg.num_warps, div, programs)
            )
    return cases
