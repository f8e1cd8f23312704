"""The CUDA IPC all-reduce: two processes sharing one GPU (or one GPU each) against gloo on host
copies of the same integer-valued inputs, plus the device-side mismatch check."""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist

from fastpar.comm import CommClosedError, CommMismatchError, RingAllReduce
from fastpar.testing.distributed import run_multiprocess
from tests.comm.util import every_call, expect_gloo, fold_in_rank_order, integer_valued

pytestmark = pytest.mark.gpu

R = dist.ReduceOp
SEED = random.randrange(2**31)
CHUNK_BYTES = 1 << 20  # calls of more than 1 MiB cross chunks


def _cuda_ranks(rank: int, world_size: int, seed: int) -> list[bytes]:
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    generator = torch.Generator().manual_seed(seed + rank)
    sizes = [0, 1, 7, 1009, 65537, 300001]  # 300001 x 8 bytes spans 3 chunks
    with RingAllReduce(device=device, timeout=60, chunk_bytes=CHUNK_BYTES) as ring:
        assert ring.should_use(torch.ones(1, device=device))
        for dtype, op, size in every_call(sizes):
            host = integer_valued(size, dtype, op, generator)
            expected = expect_gloo(host, op, world_size)
            tensor = host.to(device)
            ring.all_reduce(tensor, op)
            assert torch.equal(tensor.cpu(), expected), f"seed {seed}: {size} {dtype} {op}"
        # Async, and a non-contiguous view (reduced through a copy).
        host = integer_valued(64 * 33, torch.float32, R.SUM, generator).view(64, 33)
        expected = expect_gloo(host.t(), R.SUM, world_size)
        tensor = host.to(device)
        work = ring.all_reduce(tensor.t(), async_op=True)
        work.wait()
        torch.cuda.synchronize(device)
        assert work.is_completed() and torch.equal(tensor.t().cpu(), expected)
        # Random floats: the rank-order fold, bit for bit, on every rank.
        out = []
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            host = torch.randn(100003, generator=generator).to(dtype)
            gathered = [torch.empty_like(host) for _ in range(world_size)]
            dist.all_gather(gathered, host)
            tensor = host.to(device)
            ring.all_reduce(tensor)
            assert torch.equal(tensor.cpu(), fold_in_rank_order(gathered, R.SUM)), dtype
            out.append(tensor.cpu().view(torch.uint8).numpy().tobytes())
        ring.check()
        # A size mismatch is found on the device: the call's tensor stays as it was, the next
        # call raises it, and the ring is unusable afterwards.
        tensor = torch.full((1000 + rank,), 3.0, device=device)
        ring.all_reduce(tensor)
        torch.cuda.synchronize(device)
        assert torch.equal(tensor.cpu(), torch.full((1000 + rank,), 3.0))
        with pytest.raises(CommMismatchError, match=r"rank 0: 1000 x float32 SUM; rank 1: 1001"):
            ring.all_reduce(torch.ones(4, device=device))
        with pytest.raises(CommClosedError, match="unusable"):
            ring.all_reduce(torch.ones(4, device=device))
    return out


def test_two_processes_on_one_gpu_equal_gloo() -> None:
    results = run_multiprocess(_cuda_ranks, 2, args=(SEED,), timeout=300)
    assert results[0] == results[1]
