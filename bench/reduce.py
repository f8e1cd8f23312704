"""Native CPU reduction of k buffers against torch, in GB/s (bytes read + written).

Baselines, measured in the same run: `torch.stack(inputs).sum(0)` (the obvious torch spelling)
and an in-place chain `out.copy_(x0).add_(x1)...` (torch's cheapest fixed-order sum).

    python bench/reduce.py [--sizes-mb 1 64] [--inputs 2 4] [--csv results/reduce.csv]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import device_name, format_table, time_cpu, write_csv
from shapes import REDUCE

from fastpar.comm.reduce import reduce_buffers

HEADERS = (
    "device", "dtype", "size_MB", "inputs", "fastpar_us", "fastpar_GBps",
    "stack_sum_GBps", "add_chain_GBps", "vs_stack_sum", "vs_add_chain",
)  # fmt: skip


def bench_one(size_mb: float, num_inputs: int, dtype: torch.dtype) -> list[object]:
    numel = int(size_mb * 2**20) // torch.tensor([], dtype=dtype).element_size()
    inputs = [torch.randn(numel).to(dtype) for _ in range(num_inputs)]
    out = torch.empty_like(inputs[0])
    moved = (num_inputs + 1) * numel * out.element_size()

    def add_chain() -> None:
        out.copy_(inputs[0])
        for x in inputs[1:]:
            out.add_(x)

    native = time_cpu(lambda: reduce_buffers(inputs, out=out))
    stack = time_cpu(lambda: torch.stack(inputs).sum(0))
    chain = time_cpu(add_chain)
    gbps = [moved / t.median_s / 1e9 for t in (native, stack, chain)]
    return [
        device_name(), str(dtype).removeprefix("torch."), size_mb, num_inputs,
        native.median_s * 1e6, *gbps, gbps[0] / gbps[1], gbps[0] / gbps[2],
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sizes, inputs, dtypes = REDUCE["cpu"]  # bench/shapes.py
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=list(sizes))
    parser.add_argument("--inputs", type=int, nargs="+", default=list(inputs))
    parser.add_argument("--dtypes", nargs="+", default=list(dtypes))
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the native kernel is single-threaded: compare like with like
    rows = [
        bench_one(size, k, getattr(torch, name))
        for name in args.dtypes
        for size in args.sizes_mb
        for k in args.inputs
    ]
    if args.csv is not None:
        write_csv(args.csv, HEADERS, rows)
    print(format_table(HEADERS, rows))


if __name__ == "__main__":
    main()
