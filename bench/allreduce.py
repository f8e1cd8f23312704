"""All-reduce in the style of nccl-tests: fastpar's ring against torch.distributed, same run.

For each world size and each size (float32, SUM), both collectives run in the same processes,
size by size. First the checks: integer-valued inputs whose sum every rank can compute alone
must come back exactly, and every rank's result must be bitwise equal to rank 0's. Then
`--samples` timed samples of back-to-back calls, fastpar's and torch's taken in turn, each
after as many untimed calls of the same collective (its steady state, not the wake of the
other's). Reported per size: the median time per call (p20/p80), algbw = bytes / time and
busbw = algbw * 2(n-1)/n (the bytes each link carries in a ring), and the ratio of torch's time
to the ring's.
On CPU, a tensor in the all-reduce's shared memory (`RingAllReduce.empty_shared`: from 2 MiB on
reduced without copies in or out; `HierarchicalAllReduce.empty_shared`: the passes inside a host
read the peers' tensors in place) is checked and timed the same way, its samples taken in turn
with the ordinary tensor's: the shared_* columns, shared_speedup = ring_us / shared_us and
shared_vs_torch = torch_us / shared_us.
With --hosts, the floor_* columns time what the hierarchical all-reduce's step between hosts
alone runs (each rank's shard all-reduced through torch.distributed with the same-index ranks of
the other hosts, nothing inside a host), sampled in turn too: floor_vs_torch = torch_us /
floor_us bounds what any hierarchical all-reduce over torch.distributed can gain here.
Rank 0 writes each size's row to the CSV as soon as it is measured; a size that fails is a row
with its error.

    python bench/allreduce.py [--ranks 2 4] [--scale cpu|gpu|tiny] [--device cpu|cuda]
                              [--hosts 2] [--sizes 65536 16777216]
                              [--csv results/allreduce.csv]
                              [--table results/allreduce.txt]

--hosts H simulates H hosts on this machine (FASTPAR_HOST_ID: ranks 0..n/H-1 on the first, and
so on), so fastpar's side is the hierarchical all-reduce (`fastpar.comm.create_all_reduce`)
and busbw counts 2(n-1)/n of the bytes as for a flat ring, the same factor on both sides.

On CPU the baseline is gloo. With --device cuda and one GPU per rank it is NCCL; ranks that
share one GPU (NCCL refuses that) are compared with gloo on the same CUDA tensors, and their
bandwidth is that of one GPU's memory, not NVLink's, which needs two GPUs.
Exit status: 0 every check passed, 4 a check failed or a size raised (see its row).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RowLog, device_name, error_text, format_table
from shapes import ALLREDUCE

from fastpar.comm import HOST_ENV, HierarchicalAllReduce, RingAllReduce, create_all_reduce
from fastpar.testing.distributed import run_multiprocess

CHECK_FAILED = 4
HEADERS = (
    "case", "device", "ranks", "gpus", "bytes", "status", "exact", "bitwise_equal", "ring_us",
    "ring_p20_us", "ring_p80_us", "ring_algbw_GBps", "ring_busbw_GBps", "torch_backend",
    "torch_us", "torch_algbw_GBps", "torch_busbw_GBps", "speedup", "shared_exact",
    "shared_bitwise_equal", "shared_us", "shared_p20_us", "shared_p80_us", "shared_busbw_GBps",
    "shared_speedup", "shared_vs_torch", "floor_us", "floor_vs_torch", "error",
)  # fmt: skip


def _interleaved_samples(
    fns: list[Callable[[], object]], calls: int, samples: int
) -> list[list[float]]:
    """Seconds per call of `samples` groups of `calls` back-to-back calls of each of `fns`,
    taken in turn sample by sample, so that a disturbance of the machine falls on all of them
    alike. Every rank makes the same number of calls (a collective cannot be timed adaptively
    per rank).

    Each group follows as many untimed calls of the same collective, so that each is timed in
    the steady state of back-to-back calls, not in the wake of the one before it: on the 2-core
    machine, 64 KiB ring calls took 13.3 us each right after 128 gloo calls (which mostly
    wait), 11.3 us when 512 ring calls came between, and 10.2 us with no gloo call before them
    (same run, medians of 20 rounds).
    """
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(samples):
        for fn, times in zip(fns, out, strict=True):
            dist.barrier()
            for _ in range(calls):
                fn()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - start) / calls)
    return out


def _calls(nbytes: int, budget_bytes: int, most: int) -> int:
    return max(1, min(most, budget_bytes // max(nbytes, 1)))


def _device_for(rank: int, device_type: str) -> torch.device:
    if device_type == "cpu":
        return torch.device("cpu")
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def _synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """`fn`, then a wait for the device (the time of a GPU collective is its completion)."""

    def run() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


def _integers(rank: int, count: int, seed: int) -> torch.Tensor:
    """Rank `rank`'s integer-valued input: any rank can rebuild every rank's, so the exact sum
    needs no communication."""
    generator = torch.Generator().manual_seed(seed * 1009 + rank)
    return torch.randint(-1000, 1001, (count,), generator=generator).float()


def _quantiles(times: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return statistics.median(times), q[1], q[7]


def _check(
    ring: RingAllReduce | HierarchicalAllReduce, rank: int, world: int, nbytes: int,
    device: torch.device, shared: torch.Tensor | None = None,
) -> tuple[bool, bool]:  # fmt: skip
    """(exact sum, bitwise equal on all ranks) of one call on integer-valued data (in `shared`,
    a tensor of the ring's shared area, when given)."""
    count = nbytes // 4
    tensor = _integers(rank, count, nbytes).to(device)
    if shared is not None:
        tensor = shared[:count].copy_(tensor)
    if not ring.should_use(tensor):
        raise RuntimeError(f"the ring does not take a {nbytes}-byte {device.type} tensor")
    ring.all_reduce(tensor)
    result = tensor.cpu()
    expected = sum(_integers(r, count, nbytes) for r in range(world))
    digest = hashlib.sha256(result.numpy().tobytes()).hexdigest()
    digests: list[str] = [""] * world
    dist.all_gather_object(digests, digest)
    return bool(torch.equal(result, expected)), len(set(digests)) == 1


def _groups_across_hosts(rank: int, world: int, hosts: int) -> dist.ProcessGroup:
    """This rank's group with the same-index ranks of the other simulated hosts (ranks
    0..world/hosts-1 on the first host, and so on), as the hierarchical all-reduce's step 2
    uses; every rank creates every such group, in the same order."""
    local = world // hosts
    groups = [dist.new_group([h * local + index for h in range(hosts)]) for index in range(local)]
    return groups[rank % local]


def _case(world: int, hosts: int, nbytes: int) -> str:
    return f"{world} ranks{f' on {hosts} hosts' if hosts > 1 else ''} {nbytes} B"


def _rank(
    rank: int, world: int, sizes: list[int], samples: int, max_calls: int, device_type: str,
    csv_path: str, label: str, hosts: int = 1,
) -> None:  # fmt: skip
    if hosts > 1:  # before anything learns this process's host
        os.environ[HOST_ENV] = f"bench-host-{rank * hosts // world}"
    device = _device_for(rank, device_type)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    backend = dist.get_backend()
    log = RowLog(Path(csv_path), HEADERS) if rank == 0 else None
    baseline = True
    across = _groups_across_hosts(rank, world, hosts) if hosts > 1 else None
    with create_all_reduce(device=device, timeout=120, serve_shared_gpu=True) as ring:
        # One area for every size: each size reduces its first bytes.
        area = None
        if isinstance(ring, (RingAllReduce, HierarchicalAllReduce)) and device.type == "cpu":
            area = ring.empty_shared(max(sizes) // 4)
        for nbytes in sizes:
            case = _case(world, hosts, nbytes)
            row: dict[str, object] = {"case": case, "device": label, "ranks": world,
                                      "gpus": gpus, "bytes": nbytes}  # fmt: skip
            if log is not None:
                log.begin(case)
            try:
                exact, equal = _check(ring, rank, world, nbytes, device)
                row.update(exact=exact, bitwise_equal=equal)
                tensor = torch.randn(nbytes // 4, device=device)
                fns = [_synchronized(lambda t=tensor: ring.all_reduce(t), device)]
                if area is not None:  # the same calls on a tensor in the shared area
                    shared_exact, shared_equal = _check(ring, rank, world, nbytes, device, area)
                    shared = area[: nbytes // 4].copy_(tensor)
                    fns.append(lambda t=shared: ring.all_reduce(t))
                if baseline:
                    base_fn = _synchronized(lambda t=tensor: dist.all_reduce(t), device)
                    try:
                        base_fn()
                    except RuntimeError as error:  # e.g. a backend without CUDA tensors
                        baseline = False
                        row["torch_backend"] = f"{backend}: {error_text(error, 80)}"
                if across is not None:  # step 2 alone, on this rank's shard
                    shard = tensor[: -(-tensor.numel() // (world // hosts))].clone()
                    fns.append(_synchronized(
                        lambda t=shard: dist.all_reduce(t, group=across), device))  # fmt: skip
                if baseline:  # sampled in turn with fastpar's calls
                    fns.append(base_fn)
                times = _interleaved_samples(fns, _calls(nbytes, 8 << 20, max_calls), samples)
                median, p20, p80 = _quantiles(times[0])
                bus = 2 * (world - 1) / world
                row.update(ring_us=median * 1e6, ring_p20_us=p20 * 1e6, ring_p80_us=p80 * 1e6,
                           ring_algbw_GBps=nbytes / median / 1e9,
                           ring_busbw_GBps=nbytes / median / 1e9 * bus)  # fmt: skip
                if baseline:
                    base = _quantiles(times[-1])[0]
                    row.update(torch_backend=backend, torch_us=base * 1e6,
                               torch_algbw_GBps=nbytes / base / 1e9,
                               torch_busbw_GBps=nbytes / base / 1e9 * bus,
                               speedup=base / median)  # fmt: skip
                if area is not None:
                    median_shared, p20, p80 = _quantiles(times[1])
                    row.update(shared_exact=shared_exact, shared_bitwise_equal=shared_equal,
                               shared_us=median_shared * 1e6, shared_p20_us=p20 * 1e6,
                               shared_p80_us=p80 * 1e6,
                               shared_busbw_GBps=nbytes / median_shared / 1e9 * bus,
                               shared_speedup=median / median_shared)  # fmt: skip
                    if baseline:
                        row["shared_vs_torch"] = base / median_shared
                if across is not None:
                    floor = _quantiles(times[-2 if baseline else -1])[0]
                    row["floor_us"] = floor * 1e6
                    if baseline:
                        row["floor_vs_torch"] = base / floor
                    exact, equal = exact and shared_exact, equal and shared_equal
                row["status"] = "ok" if exact and equal else "FAIL"
                if not exact or not equal:
                    row["error"] = ("sum not exact; " if not exact else "") + (
                        "ranks differ bitwise" if not equal else "")  # fmt: skip
            except Exception as error:
                row.update(status="ERROR", error=error_text(error))
                if log is not None:
                    log.write(row)
                raise  # a collective that failed on one rank cannot go on in step
            if log is not None:
                log.write(row)
                print(f"  {case}: {row['status']} ring {row['ring_us']:.1f} us", flush=True)


# Jobs that rank 0 broadcasts to the peer ranks of bench/test_bench_allreduce.py, which live in
# the pytest process: (kind, bytes, calls).
JOB_STOP, JOB_CHECK, JOB_RING, JOB_TORCH = 0, 1, 2, 3


def run_job(job: list[int], rank: int, world: int, ring: RingAllReduce, device: torch.device):
    """One job on this rank: the exactness check (its (exact, bitwise equal)) or `calls` timed
    calls of the ring or of torch.distributed on a `bytes`-byte float32 tensor."""
    kind, nbytes, calls = job
    if kind == JOB_CHECK:
        return _check(ring, rank, world, nbytes, device)
    tensor = torch.randn(nbytes // 4, device=device)
    collective = ring.all_reduce if kind == JOB_RING else dist.all_reduce
    run = _synchronized(lambda: collective(tensor), device)
    for _ in range(calls):
        run()
    return None


def serve_peer(rank: int, world: int, port: int, device_type: str) -> None:
    """A peer rank of a pytest-benchmark group: runs the jobs rank 0 broadcasts until JOB_STOP."""
    timeout = timedelta(seconds=120)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    device = _device_for(rank, device_type)
    with RingAllReduce(device=device, timeout=120, serve_shared_gpu=True) as ring:
        while True:
            job = torch.zeros(3, dtype=torch.int64)
            dist.broadcast(job, 0)
            if int(job[0]) == JOB_STOP:
                break
            run_job(job.tolist(), rank, world, ring, device)
    dist.destroy_process_group()


def _table(rows: list[dict[str, str]]) -> str:
    columns = ("ranks", "bytes", "status", "ring_us", "ring_p20_us", "ring_p80_us",
               "ring_busbw_GBps", "torch_backend", "torch_us", "torch_busbw_GBps", "speedup",
               "shared_us", "shared_busbw_GBps", "shared_speedup", "shared_vs_torch",
               "floor_us", "floor_vs_torch", "error")  # fmt: skip
    return format_table(columns, [[r.get(c, "") for c in columns] for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scale",
        choices=("gpu", "cpu", "tiny"),
        default=None,
        help="sizes of bench/shapes.py (default: gpu with cuda, else cpu)",
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=None)
    parser.add_argument("--min-bytes", type=int, default=None)
    parser.add_argument("--max-bytes", type=int, default=None)
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=None, help="bytes (default: the scale's sizes)"
    )
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--max-calls", type=int, default=None, help="calls per sample, at most")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--hosts", type=int, default=1, help="simulated hosts (see above)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per world size")
    parser.add_argument("--csv", type=Path, default=Path("results/allreduce.csv"))
    parser.add_argument("--table", type=Path, default=None, help="also write the table here")
    parser.add_argument(
        "--resume", action="store_true", help="keep the CSV's rows and run only the sizes it lacks"
    )
    args = parser.parse_args(argv)
    plan = ALLREDUCE[args.scale or ("gpu" if args.device == "cuda" else "cpu")]
    low = args.min_bytes or 0
    high = args.max_bytes or 1 << 62
    sizes = [s for s in args.sizes or plan.sizes if low <= s <= high]
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/allreduce.py --device cuda: no CUDA device", file=sys.stderr)
        return 2
    if not args.resume:
        args.csv.unlink(missing_ok=True)
    log = RowLog(args.csv, HEADERS)
    label = device_name(args.device if args.device == "cpu" else "cuda:0")
    for ranks in args.ranks or plan.ranks:
        if ranks % args.hosts:
            parser.error(f"--hosts {args.hosts} must divide every --ranks, got {ranks}")
        todo = [s for s in sizes if _case(ranks, args.hosts, s) not in log.done()]
        if not todo:
            continue
        # NCCL needs a GPU per rank; ranks sharing a GPU meet through gloo.
        nccl = args.device == "cuda" and torch.cuda.device_count() >= ranks
        load = os.getloadavg()[0]
        print(f"{ranks} ranks on {label} ({'nccl' if nccl else 'gloo'} baseline), load "
              f"average {load:.2f} on {os.cpu_count()} cores", flush=True)  # fmt: skip
        try:
            run_multiprocess(
                _rank, ranks,
                args=(todo, args.samples or plan.samples, args.max_calls or plan.max_calls,
                      args.device, str(args.csv), label, args.hosts),
                timeout=args.timeout, backend="nccl" if nccl else "gloo",
            )  # fmt: skip
        except Exception as error:  # the failing size has its row; the next world size runs
            print(f"{ranks} ranks: {error_text(error, 2000)}", file=sys.stderr, flush=True)
            if log.running.exists():  # the size that was running when the ranks died
                log.write(
                    {
                        "case": log.running.read_text().strip(),
                        "device": label,
                        "ranks": ranks,
                        "status": "ERROR",
                        "error": error_text(error),
                    }
                )
    rows = log.rows()
    text = _table(rows)
    if args.device == "cuda" and torch.cuda.device_count() < max(args.ranks or plan.ranks):
        text += ("\nRanks share one GPU: bandwidth here is one GPU's memory; NVLink bandwidth "
                 "needs two GPUs and is not measured.")  # fmt: skip
    print(text)
    if args.table is not None:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(text + "\n")
    return 0 if rows and all(r["status"] == "ok" for r in rows) else CHECK_FAILED


if __name__ == "__main__":
    sys.exit(main())
