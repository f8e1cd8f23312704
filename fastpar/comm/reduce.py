"""Typed wrapper over the native elementwise reduction of k buffers (`csrc/reduce.h`).

This is the building block of the ring all-reduce: the result of every element is combined in
input order 0, 1, ..., k-1, so it is the same bit for bit wherever it is computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from fastpar import _native

ReduceOpName = Literal["sum", "product", "min", "max"]
# Codes of csrc/reduce.h's ReduceOp.
_OP_CODES: dict[str, int] = {"sum": 0, "product": 1, "min": 2, "max": 3}
SUPPORTED_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int32,
    torch.int64,
)


def op_table(names: dict[str, int]) -> dict[object, int]:
    """Lookup table for `lookup_op`: lower-case op names -> code, extended with the matching
    `torch.distributed.ReduceOp` values (a dictionary hit keeps the per-call cost low)."""
    table: dict[object, int] = dict(names)
    if torch.distributed.is_available():
        from torch.distributed import ReduceOp

        for name, code in names.items():
            table[getattr(ReduceOp, name.upper())] = code
    return table


def lookup_op(op: object, table: dict[object, int]) -> int | None:
    """The code of `op` in `table` (from `op_table`), or None.

    Arguments:
        op: a lower-case name ("sum", ...), a `torch.distributed.ReduceOp` value
            (`ReduceOp.MAX`), or a `ReduceOp` instance (`ReduceOp(ReduceOp.MAX)`, which keeps
            its value in `.op`).
        table: the ops the caller handles.
    """
    try:
        code = table.get(op)
    except TypeError:  # unhashable: no op
        return None
    if code is None and hasattr(op, "op"):
        code = table.get(op.op)
    return code


_OP_TABLE = op_table(_OP_CODES)


def op_code(op: object) -> int:
    """Native code of `op`: a name ("sum", ...) or a `torch.distributed.ReduceOp` SUM/PRODUCT/
    MIN/MAX."""
    code = lookup_op(op.lower() if isinstance(op, str) else op, _OP_TABLE)
    if code is None:
        raise ValueError(f"op must be one of sum, product, min, max; got {op!r}")
    return code


def reduce_buffers(
    inputs: Sequence[torch.Tensor], out: torch.Tensor | None = None, op: object = "sum"
) -> torch.Tensor:
    """Elementwise `out = inputs[0] op inputs[1] op ... op inputs[k-1]`, in that order.

    Arguments:
        inputs: k >= 1 contiguous tensors of one dtype (float32, float64, float16, bfloat16,
            int32, int64), one device and one number of elements (shapes may differ).
        out: where to write, same dtype, device and number of elements; may be one of `inputs`.
            A new tensor shaped like `inputs[0]` when None.
        op: "sum", "product", "min" or "max" (or the torch.distributed.ReduceOp of that name).
            float16/bfloat16 accumulate in float32 and round once.

    Returns:
        `out`.
    """
    if len(inputs) == 0:
        raise ValueError("inputs must hold at least one tensor")
    code = op_code(op)
    if out is None:
        out = torch.empty_like(inputs[0], memory_format=torch.contiguous_format)
    native = _native.load()
    tensors = list(inputs)
    if out.is_cuda:
        if not getattr(native, "with_cuda", False):
            raise RuntimeError("fastpar's native extension was built without CUDA")
        native.reduce_buffers_cuda(tensors, out, code)
    else:
        native.reduce_buffers_cpu(tensors, out, code)
    return out
