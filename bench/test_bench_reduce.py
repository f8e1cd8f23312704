"""The k-input reduction kernel (`fastpar.comm.reduce_buffers`) against torch's spellings of the
same sum: `torch.stack(inputs).sum(0)` and an in-place `add_` chain. Every case first checks its
result exactly on integer-valued inputs."""

from __future__ import annotations

import pytest
import torch
from conftest import bench_scale, synchronize
from shapes import REDUCE

from fastpar.comm import reduce_buffers

IMPLS = ("fastpar", "stack_sum", "add_chain")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "size_mb" in metafunc.fixturenames:
        sizes, inputs, dtypes = REDUCE[bench_scale(metafunc.config)]
        metafunc.parametrize("size_mb", sizes)
        metafunc.parametrize("num_inputs", inputs)
        metafunc.parametrize("dtype_name", dtypes)


def _reducer(impl: str, inputs: list[torch.Tensor], out: torch.Tensor):
    def add_chain() -> torch.Tensor:
        out.copy_(inputs[0])
        for x in inputs[1:]:
            out.add_(x)
        return out

    return {
        "fastpar": lambda: reduce_buffers(inputs, out=out),
        "stack_sum": lambda: torch.stack(inputs).sum(0),
        "add_chain": add_chain,
    }[impl]


@pytest.mark.parametrize("impl", IMPLS)
def test_reduce(
    benchmark, impl: str, size_mb: float, num_inputs: int, dtype_name: str, device: torch.device
) -> None:
    dtype = getattr(torch, dtype_name)
    numel = int(size_mb * 2**20) // torch.tensor([], dtype=dtype).element_size()
    inputs = [torch.randint(-8, 9, (numel,), device=device).to(dtype) for _ in range(num_inputs)]
    out = torch.empty_like(inputs[0])
    reduce = _reducer(impl, inputs, out)
    expected = torch.stack([x.double() for x in inputs]).sum(0)
    assert torch.equal(reduce().double(), expected), f"{impl}: not the exact sum"

    def step() -> None:
        reduce()
        synchronize(device)

    moved = (num_inputs + 1) * numel * out.element_size()
    benchmark.group = f"reduce {dtype_name} {size_mb} MB x{num_inputs}"
    benchmark.extra_info["bytes_moved"] = moved
    benchmark(step)
