"""Which reduce operations the ring all-reduce handles, as codes of the native ring.

The codes are those of `csrc/reduce.h` (SUM 0, PRODUCT 1, MIN 2, MAX 3) plus AVG 4 (`csrc/ring.h`:
summed natively, then divided by the world size). BAND/BOR/BXOR and PREMUL_SUM are not handled:
calls with them go to torch.distributed.
"""

from __future__ import annotations

from fastpar.comm.reduce import _OP_CODES as _REDUCE_CODES
from fastpar.comm.reduce import SUPPORTED_DTYPES, lookup_op, op_table

AVG = 4
OP_NAMES = ("SUM", "PRODUCT", "MIN", "MAX", "AVG")


# Lower-case op names -> native code: the reduction kernel's ops, and AVG.
_CODES = op_table({**_REDUCE_CODES, "avg": AVG})


def ring_op_code(op: object) -> int | None:
    """The native code of `op`, or None when the ring does not handle it.

    Arguments:
        op: a `torch.distributed.ReduceOp` (SUM, AVG, PRODUCT, MIN, MAX handled), an instance
            of it, or its name.

    Returns:
        0..4, or None for any other op (BAND, BOR, BXOR, PREMUL_SUM, unknown values).
    """
    return lookup_op(op, _CODES)


def torch_op_code(op: object) -> int:
    """`op`'s value in torch.distributed's own numbering (`ReduceOp.RedOpType`: SUM 0, AVG 1,
    PRODUCT 2, MIN 3, MAX 4, BAND 5, BOR 6, BXOR 7, PREMUL_SUM 8), or 15 for anything else;
    names the op of a call that goes to torch.distributed when ranks compare calls."""
    try:
        return int(getattr(op, "op", op))
    except (TypeError, ValueError):
        return 15


def unsupported_reason(tensor_dtype: object, code: int | None, op: object) -> str | None:
    """Why the ring cannot reduce tensors of `tensor_dtype` with `op`, or None when it can."""
    if code is None:
        return f"op {op} is not one of SUM, AVG, PRODUCT, MIN, MAX"
    if tensor_dtype not in SUPPORTED_DTYPES:
        return (
            f"dtype {tensor_dtype} is not one of float32, float64, float16, bfloat16, int32, int64"
        )
    return None
