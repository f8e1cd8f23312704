"""Which reduce operations the ring all-reduce handles, as codes of the native ring.

The codes are those of `csrc/reduce.h` (SUM 0, PRODUCT 1, MIN 2, MAX 3) plus AVG 4 (`csrc/ring.h`:
summed natively, then divided by the world size). BAND/BOR/BXOR and PREMUL_SUM are not handled:
calls with them go to torch.distributed.
"""

from __future__ import annotations

import torch.distributed as dist

from fastpar.comm.reduce import SUPPORTED_DTYPES, op_code

AVG = 4
OP_NAMES = ("SUM", "PRODUCT", "MIN", "MAX", "AVG")


def _build_codes() -> dict[object, int]:
    codes: dict[object, int] = {}
    for name in ("SUM", "PRODUCT", "MIN", "MAX"):
        code = op_code(name.lower())
        codes[getattr(dist.ReduceOp, name)] = code
        codes[name.lower()] = code
    codes[dist.ReduceOp.AVG] = AVG
    codes["avg"] = AVG
    return codes


# torch.distributed.ReduceOp's enum values (and lower-case names) -> native code.
_CODES = _build_codes()


def ring_op_code(op: object) -> int | None:
    """The native code of `op`, or None when the ring does not handle it.

    Arguments:
        op: a `torch.distributed.ReduceOp` (SUM, AVG, PRODUCT, MIN, MAX handled) or its
            lower-case name.

    Returns:
        0..4, or None for any other op (BAND, BOR, BXOR, PREMUL_SUM, unknown values).
    """
    try:
        code = _CODES.get(op)
    except TypeError:  # an unhashable object is no op the ring knows
        return None
    inner = getattr(op, "op", None) if code is None else None
    if inner is not None:  # an instance, `ReduceOp(ReduceOp.MAX)`: look up its enum value
        code = _CODES.get(inner)
    return code


def unsupported_reason(tensor_dtype: object, code: int | None, op: object) -> str | None:
    """Why the ring cannot reduce tensors of `tensor_dtype` with `op`, or None when it can."""
    if code is None:
        return f"op {op} is not one of SUM, AVG, PRODUCT, MIN, MAX"
    if tensor_dtype not in SUPPORTED_DTYPES:
        return (
            f"dtype {tensor_dtype} is not one of float32, float64, float16, bfloat16, int32, int64"
        )
    return None
