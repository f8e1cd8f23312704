"""The kernel configurations the LSTM launchers choose for given shapes, as compile cases.

``bench/kernel_report.py`` compiles each case for sm_90 (registers, spills) and the tests check
that every case compiles: the interpreter runs kernels on the CPU but enforces none of the GPU's
limits (tl.dot dimensions, registers), so this is how a CPU-only CI catches them.

Glossary: B batch, H hidden units, P size of h (proj_size or H).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fastpar.ops.lstm_common import dot_precision, persistent_config, step_config

_TRITON_TYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class CompileCase:
    """One kernel specialisation: what to hand to ``compile_for_sm90``."""

    label: str  # kernel and shape, for reports
    kernel: Any  # the @triton.jit function
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int


def compile_cases(
    batch: int, hidden: int, proj: int, dtype: torch.dtype, num_sms: int
) -> list[CompileCase]:
    """Every kernel specialisation a layer of this shape launches on a GPU with num_sms SMs.

    Arguments:
        batch: B; hidden: H; proj: P (= H without a projection); dtype: of input and weights;
        num_sms: streaming multiprocessors (132 on an H100 SXM).

    Returns:
        The forward step kernel (with and without lengths), the backward step kernel (first and
        later steps, with and without lengths) and, where the heuristic would pick them, the
        persistent forward and backward kernels (both directions, with and without lengths).
    """
    from fastpar.ops.lstm_backward import _lstm_bwd_step_kernel
    from fastpar.ops.lstm_forward import _lstm_fwd_step_kernel
    from fastpar.ops.lstm_persistent import (
        _lstm_bwd_persistent_kernel,
        _lstm_fwd_persistent_kernel,
    )

    dt = "*" + _TRITON_TYPE[dtype]
    f32, i32 = "*fp32", "*i32"
    shape = f"B={batch} H={hidden} P={proj} {_TRITON_TYPE[dtype]}"
    prec = dot_precision(dtype)
    cases: list[CompileCase] = []
    cfg = step_config(batch, hidden, dtype, num_sms)
    fwd_sig = {
        "xg_ptr": dt, "hprev_ptr": dt, "cprev_ptr": f32, "w_ptr": dt, "len_ptr": i32,
        "gates_ptr": f32, "c_ptr": f32, "h_ptr": dt, "t": "i32", "t_prev": "i32", "B": "i32",
        "stride_hprev_t": "i32", "stride_cprev_t": "i32",
    }  # fmt: skip
    for lengths in (False, True):
        consts = {
            "H": hidden, "P": proj, "BLOCK_B": cfg.block_b, "BLOCK_H": cfg.block_h,
            "BLOCK_K": cfg.block_k, "HAS_LENGTHS": lengths, "CARRY_H": proj == hidden,
            "DOT_PRECISION": prec, "DOT_UPCAST": False, "HPREV_CACHE": "",
        }  # fmt: skip
        cases.append(
            CompileCase(
                f"fwd_step {shape} BLOCK_B={cfg.block_b} BLOCK_H={cfg.block_h} "
                f"BLOCK_K={cfg.block_k} lengths={lengths}",
                _lstm_fwd_step_kernel,
                fwd_sig,
                consts,
                cfg.num_warps,
            )
        )
    has_rec = proj == hidden
    bwd_sig = {
        "dgates_ptr": dt, "w_ptr": dt, "dh_ptr": dt if has_rec else f32, "gates_ptr": f32,
        "c_ptr": f32, "cprev_ptr": f32, "len_ptr": i32, "dh_carry_ptr": f32,
        "dc_carry_ptr": f32, "t": "i32", "t_next": "i32", "t_prev": "i32", "B": "i32",
        "stride_cprev_t": "i32",
    }  # fmt: skip
    for has_next in (True, False):
        for lengths in (False, True):
            consts = {
                "H": hidden, "BLOCK_B": cfg.block_b, "BLOCK_H": cfg.block_h_bwd,
                "BLOCK_K": cfg.block_k, "HAS_REC": has_rec, "HAS_NEXT": has_next,
                "HAS_LENGTHS": lengths, "DOT_PRECISION": prec, "DOT_UPCAST": False, "DG_CACHE": "",
            }  # fmt: skip
            cases.append(
                CompileCase(
                    f"bwd_step {shape} BLOCK_B={cfg.block_b} BLOCK_H={cfg.block_h_bwd} "
                    f"BLOCK_K={cfg.block_k} next={has_next} lengths={lengths}",
                    _lstm_bwd_step_kernel,
                    bwd_sig,
                    consts,
                    cfg.num_warps,
                )
            )
    p_sigs = {
        "fwd_persistent": {
            "xg_ptr": dt, "h0_ptr": dt, "c0_ptr": f32, "w_ptr": dt, "len_ptr": i32,
            "gates_ptr": f32, "c_ptr": f32, "h_ptr": dt, "sync_ptr": i32, "T": "i32", "B": "i32",
        },
        "bwd_persistent": {
            "dgates_ptr": dt, "w_ptr": dt, "dh_ptr": dt, "gates_ptr": f32, "c_ptr": f32,
            "c0_ptr": f32, "len_ptr": i32, "dh_carry_ptr": f32, "dc_carry_ptr": f32,
            "sync_ptr": i32, "T": "i32", "B": "i32",
        },
    }  # fmt: skip
    p_kernels = {
        "fwd_persistent": _lstm_fwd_persistent_kernel,
        "bwd_persistent": _lstm_bwd_persistent_kernel,
    }
    for name, kernel in p_kernels.items():
        pcfg = persistent_config(
            batch, hidden, proj, dtype, num_sms, interpreter=False, backward=name[0] == "b"
        )
        if pcfg is None:
            continue
        for reverse in (False, True):
            for lengths in (False, True):
                consts = {
                    "H": hidden, "BLOCK_B": pcfg.block_b, "BLOCK_H": pcfg.block_h,
                    "BLOCK_K": pcfg.block_k, "REVERSE": reverse, "HAS_LENGTHS": lengths,
                    "DOT_PRECISION": prec, "DOT_UPCAST": False,
                }  # fmt: skip
                label = (
                    f"{name} {shape} BLOCK_B={pcfg.block_b} BLOCK_H={pcfg.block_h} "
                    f"BLOCK_K={pcfg.block_k} reverse={reverse} lengths={lengths}"
                )
                cases.append(CompileCase(label, kernel, p_sigs[name], consts, pcfg.num_warps))
    return cases
