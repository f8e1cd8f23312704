"""The native CPU reduction of k buffers against torch, combined in the same fixed order."""

from __future__ import annotations

import pytest
import torch

from fastpar.comm.reduce import SUPPORTED_DTYPES, reduce_buffers

OPS = ("sum", "product", "min", "max")
LENGTHS = (1, 7, 1023, 1024, 1025, 4099)  # whole vector steps of the kernel, and tails


def _random(length: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    if dtype.is_floating_point:
        # Near 1 so that products of several inputs stay finite in float16.
        values = 0.5 + torch.rand(length, generator=generator, dtype=torch.float64)
        signs = torch.randint(0, 2, (length,), generator=generator) * 2 - 1
        return (values * signs).to(dtype)
    return torch.randint(-9, 10, (length,), generator=generator, dtype=dtype)


def _expected(inputs: list[torch.Tensor], op: str) -> torch.Tensor:
    """Left-to-right fold in float32 for 16-bit floats, in the input dtype otherwise."""
    low_precision = inputs[0].dtype in (torch.float16, torch.bfloat16)
    acc = inputs[0].float() if low_precision else inputs[0].clone()
    for x in inputs[1:]:
        x = x.float() if low_precision else x
        if op == "sum":
            acc = acc + x
        elif op == "product":
            acc = acc * x
        elif op == "min":
            acc = torch.minimum(acc, x)
        else:
            acc = torch.maximum(acc, x)
    return acc.to(inputs[0].dtype)


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("num_inputs", [1, 2, 3, 5])
def test_matches_fixed_order_fold(dtype: torch.dtype, op: str, num_inputs: int) -> None:
    generator = torch.Generator().manual_seed(hash((str(dtype), op, num_inputs)) % 2**31)
    for length in LENGTHS:
        inputs = [_random(length, dtype, generator) for _ in range(num_inputs)]
        originals = [x.clone() for x in inputs]
        out = reduce_buffers(inputs, op=op)
        assert torch.equal(out, _expected(inputs, op)), (length, dtype, op)
        assert all(torch.equal(a, b) for a, b in zip(inputs, originals, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64], ids=str)
def test_unaligned_views_and_in_place_output(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(7)
    length = 2051
    buffers = [_random(length + 3, dtype, generator) for _ in range(3)]
    # Offsets 1, 2, 3 elements into their storage: no input starts on a vector boundary.
    inputs = [b[k + 1 : k + 1 + length] for k, b in enumerate(buffers)]
    expected = _expected(inputs, "sum")
    storage_before = buffers[1].clone()
    reduce_buffers(inputs, out=inputs[1], op="sum")
    assert torch.equal(inputs[1], expected)
    # Elements of the storage outside the output view are untouched.
    assert torch.equal(buffers[1][:2], storage_before[:2])
    assert torch.equal(buffers[1][2 + length :], storage_before[2 + length :])


def test_nan_propagates_through_min_and_max() -> None:
    a = torch.tensor([1.0, float("nan"), 3.0])
    b = torch.tensor([float("nan"), 2.0, 0.5])
    assert torch.equal(reduce_buffers([a, b], op="max").isnan(), torch.tensor([True, True, False]))
    assert reduce_buffers([a, b], op="min")[2].item() == 0.5


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str
)
@pytest.mark.parametrize("op", ["min", "max"])
def test_nan_propagates_in_vector_steps(dtype: torch.dtype, op: str) -> None:
    generator = torch.Generator().manual_seed(hash((str(dtype), op)) % 2**31)
    inputs = [_random(1030, dtype, generator) for _ in range(3)]
    for x in inputs:  # NaNs in every input, inside whole steps and in the tail
        x[torch.randperm(1030, generator=generator)[:50]] = float("nan")
    out = reduce_buffers(inputs, op=op)
    expected = _expected(inputs, op)
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.nan_to_num(0.0), expected.nan_to_num(0.0))


def test_accepts_torch_distributed_reduce_op() -> None:
    from torch.distributed import ReduceOp

    a, b = torch.randn(33), torch.randn(33)
    assert torch.equal(reduce_buffers([a, b], op=ReduceOp.MAX), torch.maximum(a, b))


def test_zero_length_is_a_no_op() -> None:
    out = reduce_buffers([torch.empty(0), torch.empty(0)])
    assert out.numel() == 0


@pytest.mark.parametrize(
    ("inputs", "out", "message"),
    [
        ([torch.ones(4), torch.ones(5)], None, r"inputs\[1\] has 5 elements; expected 4"),
        ([torch.ones(4), torch.ones(4, dtype=torch.float64)], None, r"inputs\[1\] has dtype"),
        ([torch.ones(4, 2).t()], torch.empty(8), r"inputs\[0\] must be contiguous"),
        ([torch.ones(4, dtype=torch.uint8)], None, r"out has dtype Byte; expected one of"),
    ],
)
def test_bad_arguments_are_named(
    inputs: list[torch.Tensor], out: torch.Tensor | None, message: str
) -> None:
    with pytest.raises(RuntimeError, match=message):
        reduce_buffers(inputs, out=out)


def test_unknown_op_is_rejected() -> None:
    with pytest.raises(ValueError, match="op must be one of sum, product, min, max; got 'avg'"):
        reduce_buffers([torch.ones(2)], op="avg")
