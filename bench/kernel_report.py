"""Registers, spills and shared memory of every recurrent kernel configuration (LSTM, GRU, Elman
RNN), compiled for sm_90.

Runs on a machine without a GPU: each configuration the launchers would choose on an H100
(132 SMs) is compiled by Triton for sm_90, with the specialization a launch gets (constexprs,
16-divisible pointers and sizes), and measured by Triton's bundled ``ptxas -v``. Programs/SM is
the occupancy those registers and that shared memory allow; a persistent kernel needs >= 1 with
its whole grid resident at once.

    python bench/kernel_report.py                 # benchmark and test shapes, as a table
    python bench/kernel_report.py --json out.json # also write the rows as JSON
    python bench/kernel_report.py --tiles v2      # the previous persistent kernels' tiles

Exits non-zero if a configuration fails to compile or spills.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Compile for the GPU even when the shell asks for the interpreter (where @triton.jit yields
# interpreted functions that cannot be compiled). Must happen before triton is imported.
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from fastpar.ops.lstm_compile_cases import compile_cases
from fastpar.ops.lstm_config import CellKind
from fastpar.testing.triton_compile import compile_for_sm90

H100_SMS = 132
Shape = tuple[CellKind, int, int, int, torch.dtype]  # cell, B, H, P, dtype
# The LSTM benchmark shapes (B=16 T=1024 H=768 bf16/fp16/fp32; B=64 T=256 H=1024; B=256 T=100
# H=512; a projection; the packed batch B=64 T=512 H=512 takes the lengths variants),
# bench/lstm.py's others; the GRU and RNN at the benchmark shape (B=16 T=1024 H=768) and
# H=1001 (no multiple of any tile); then the shapes of the interpreter tests.
BENCH_SHAPES: list[Shape] = [
    ("lstm", 16, 768, 768, torch.bfloat16),
    ("lstm", 16, 768, 768, torch.float16),
    ("lstm", 16, 768, 768, torch.float32),
    ("lstm", 64, 1024, 1024, torch.bfloat16),
    ("lstm", 256, 512, 512, torch.bfloat16),
    ("lstm", 16, 768, 256, torch.bfloat16),
    ("lstm", 64, 512, 512, torch.bfloat16),
    ("lstm", 256, 1000, 1000, torch.bfloat16),
    ("lstm", 8, 256, 256, torch.bfloat16),
    ("gru", 16, 768, 768, torch.bfloat16),
    ("gru", 16, 768, 768, torch.float16),
    ("gru", 16, 768, 768, torch.float32),
    ("gru", 16, 1001, 1001, torch.bfloat16),
    ("rnn_tanh", 16, 768, 768, torch.bfloat16),
    ("rnn_tanh", 16, 768, 768, torch.float32),
    ("rnn_relu", 16, 768, 768, torch.bfloat16),
    ("rnn_tanh", 16, 1001, 1001, torch.bfloat16),
]
TEST_SHAPES: list[Shape] = [
    ("lstm", 3, 33, 33, torch.float32),
    ("lstm", 3, 33, 5, torch.float32),
    ("lstm", 3, 33, 33, torch.bfloat16),
    ("lstm", 3, 33, 33, torch.float16),
    ("gru", 3, 33, 33, torch.float32),
    ("gru", 3, 33, 33, torch.bfloat16),
    ("rnn_tanh", 3, 33, 33, torch.float32),
    ("rnn_relu", 3, 33, 33, torch.bfloat16),
]


def report(shapes: list[Shape], num_sms: int) -> list[dict]:
    """Compile every distinct configuration for the shapes; one row per configuration."""
    rows: list[dict] = []
    seen: set[str] = set()
    for cell, batch, hidden, proj, dtype in shapes:
        for case in compile_cases(batch, hidden, proj, dtype, num_sms, cell):
            key = f"{case.kernel.__name__}{case.signature}{sorted(case.constexprs.items())}"
            key += f"{case.num_warps}{case.divisible_by_16}"
            if key in seen:
                continue
            seen.add(key)
            rows.append(_compile_row(case))
    return rows


def _compile_row(case) -> dict:
    row = {"label": case.label, "num_warps": case.num_warps, "programs": case.programs}
    try:
        r = compile_for_sm90(
            case.kernel, case.signature, case.constexprs, num_warps=case.num_warps,
            divisible_by_16=case.divisible_by_16,
        )  # fmt: skip
        row.update(
            registers=r.registers, spills=r.spills, shared=r.shared_bytes,
            programs_per_sm=r.programs_per_sm,
        )  # fmt: skip
    except Exception as e:  # reported in the table and in the exit status
        row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=["bench", "test", "all"], default="all")
    parser.add_argument("--sms", type=int, default=H100_SMS, help="SMs of the target GPU")
    parser.add_argument(
        "--tiles", choices=["min-traffic", "v2"],
        help="the persistent kernels' tile choice (sets FASTPAR_LSTM_TILES)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if args.tiles:
        os.environ["FASTPAR_LSTM_TILES"] = args.tiles
    shapes = {"bench": BENCH_SHAPES, "test": TEST_SHAPES, "all": BENCH_SHAPES + TEST_SHAPES}
    rows = report(shapes[args.shapes], args.sms)
    width = max(len(r["label"]) for r in rows)
    print(f"{'kernel / configuration (sm_90)':{width}}  warps  grid  regs  spills   smem  prog/SM")
    for r in rows:
        head = f"{r['label']:{width}}  {r['num_warps']:5}  {r['programs']:4}"
        if "error" in r:
            print(f"{head}  FAILED: {r['error']}")
        else:
            print(
                f"{head}  {r['registers']:4}  {r['spills']:6}  {r['shared']:6}  "
                f"{r['programs_per_sm']:7}"
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    bad = [
        r for r in rows
        if "error" in r or r["spills"] > 0 or r["programs_per_sm"] < 1
        or (r["label"].split()[0].endswith("persistent") and r["programs"] > args.sms)
    ]  # fmt: skip
    if bad:
        print(
            f"{len(bad)} configuration(s) failed to compile, spill, or do not fit the SMs",
            file=sys.stderr,
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
