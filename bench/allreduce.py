"""All-reduce in the style of nccl-tests: fastpar's ring against torch.distributed, same run.

For each size (float32, SUM) and each world size, both collectives run in the same processes,
interleaved size by size: one correctness call each on integer-valued data (the results must be
equal), then `--samples` timed samples of back-to-back calls. Reported per size: the median time
per call (and p20/p80), algbw = bytes / time and busbw = algbw * 2(n-1)/n (the bytes each link
carries in a ring), and the ratio of torch's time to the ring's.

    python bench/allreduce.py [--ranks 2 4] [--min-bytes 1024] [--max-bytes 67108864]
                              [--device cpu|cuda] [--csv results/allreduce.csv]
                              [--table results/allreduce.txt]

On CPU the baseline is gloo. With --device cuda it is NCCL, which needs one GPU per rank: when
ranks share a GPU the ring is timed alone and the baseline columns stay empty.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from common import device_name, format_table, write_csv

import fastpar.comm as comm
from fastpar.testing.distributed import run_multiprocess

HEADERS = (
    "device", "ranks", "bytes", "ring_us", "ring_p20_us", "ring_p80_us", "ring_algbw_GBps",
    "ring_busbw_GBps", "torch_us", "torch_algbw_GBps", "torch_busbw_GBps", "speedup",
)  # fmt: skip


def _samples(fn: Callable[[], object], calls: int, samples: int) -> list[float]:
    """Seconds per call of `samples` groups of `calls` back-to-back calls. Every rank makes the
    same number of calls (a collective cannot be timed adaptively per rank)."""
    fn()  # warm-up
    out = []
    for _ in range(samples):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - start) / calls)
    return out


def _calls(nbytes: int, budget_bytes: int, most: int) -> int:
    return max(1, min(most, budget_bytes // max(nbytes, 1)))


def _device_for(rank: int, device_type: str) -> torch.device:
    if device_type == "cpu":
        return torch.device("cpu")
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def _synchronized(fn: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """`fn`, then a wait for the device (the time of a GPU collective is its completion)."""
    if device.type == "cpu":
        return fn

    def run() -> None:
        fn()
        torch.cuda.synchronize(device)

    return run


def _rank(
    rank: int, world_size: int, sizes: list[int], samples: int, max_calls: int, device_type: str
) -> list[tuple[int, list[float], list[float] | None]]:
    device = _device_for(rank, device_type)
    # NCCL needs a GPU per rank; ranks sharing a GPU time the ring alone.
    baseline = device.type == "cpu" or torch.cuda.device_count() >= world_size
    results = []
    for nbytes in sizes:
        count = nbytes // 4
        check = torch.randint(-50, 51, (count,), device=device).float()
        # The reference runs where the process group's backend can: on the device, or (ranks
        # sharing a GPU, gloo) on a host copy.
        expected = check.clone() if baseline else check.cpu()
        dist.all_reduce(expected)
        comm.all_reduce(check)
        if not torch.equal(check.cpu(), expected.cpu()):
            raise AssertionError(f"ring and torch.distributed differ at {nbytes} bytes")
        tensor = torch.randn(count, device=device)
        ring = _synchronized(lambda tensor=tensor: comm.all_reduce(tensor), device)
        ring_times = _samples(ring, _calls(nbytes, 8 << 20, max_calls), samples)
        torch_times = None
        if baseline:
            base = _synchronized(lambda tensor=tensor: dist.all_reduce(tensor), device)
            torch_times = _samples(base, _calls(nbytes, 1 << 20, min(20, max_calls)), samples)
        results.append((nbytes, ring_times, torch_times))
    comm.close_rings()
    return results


def _quantiles(times: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return statistics.median(times), q[1], q[7]


def _row(
    device: str, ranks: int, nbytes: int, ring: list[float], base: list[float] | None
) -> list[object]:
    bus = 2 * (ranks - 1) / ranks
    median, p20, p80 = _quantiles(ring)
    row: list[object] = [device, ranks, nbytes, median * 1e6, p20 * 1e6, p80 * 1e6,
                         nbytes / median / 1e9, nbytes / median / 1e9 * bus]  # fmt: skip
    if base is None:
        return row + ["", "", "", ""]
    base_median = _quantiles(base)[0]
    return row + [base_median * 1e6, nbytes / base_median / 1e9,
                  nbytes / base_median / 1e9 * bus, base_median / median]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--min-bytes", type=int, default=1024)
    parser.add_argument("--max-bytes", type=int, default=64 << 20)
    parser.add_argument("--samples", type=int, default=15)
    parser.add_argument("--max-calls", type=int, default=500, help="calls per sample, at most")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument("--table", type=Path, default=None, help="also write the tables here")
    args = parser.parse_args()
    sizes = []
    size = args.min_bytes
    while size <= args.max_bytes:
        sizes.append(size)
        size *= 2
    device = device_name(args.device if args.device == "cpu" else "cuda:0")
    rows = []
    tables = []
    for ranks in args.ranks:
        # NCCL needs a GPU per rank; ranks sharing a GPU meet through gloo (barriers only).
        nccl = args.device == "cuda" and torch.cuda.device_count() >= ranks
        backend = "nccl" if nccl else "gloo"
        load = os.getloadavg()[0]
        results = run_multiprocess(
            _rank,
            ranks,
            args=(sizes, args.samples, args.max_calls, args.device),
            timeout=1800,
            backend=backend,
        )
        table = [_row(device, ranks, nbytes, ring, base) for nbytes, ring, base in results[0]]
        rows += table
        tables.append(
            f"{ranks} ranks on {device}, fastpar ring vs torch.distributed ({backend}), float32 "
            f"SUM; load average before the run {load:.2f} on {os.cpu_count()} cores\n"
            + format_table(HEADERS[1:], [r[1:] for r in table])
        )
        print("\n" + tables[-1], flush=True)
    if args.csv is not None:
        write_csv(args.csv, HEADERS, rows)
    if args.table is not None:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text("\n\n".join(tables) + "\n")


if __name__ == "__main__":
    main()
