"""The shared-memory ring all-reduce on CPU processes, against torch.distributed (gloo).

Inputs are integer-valued wherever the result must equal gloo's exactly (every dtype represents
them and every partial result exactly); random floats check that all ranks get the same bits and
that those bits are the rank-order fold of the inputs. Every run is bounded by the helper's
timeout; the seed is fresh per run and shown on failure.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from fastpar.comm import CommClosedError, RingAllReduce
from fastpar.comm.reduce import SUPPORTED_DTYPES
from fastpar.testing.distributed import run_multiprocess
from tests.comm.util import (
    SEED,
    SMALL_RING,
    every_call,
    expect_gloo,
    fold_in_rank_order,
    integer_valued,
)

R = dist.ReduceOp


def _sizes(generator: torch.Generator) -> list[int]:
    fixed = [0, 1, 2, 3, 7, 31, 1009, 4099, 65537, 1 << 20]  # primes: uneven parts everywhere
    drawn = torch.randint(1, 1 << 20, (3,), generator=generator).tolist()
    return fixed + drawn


def _every_dtype_and_op(rank: int, world_size: int, seed: int, ring_kwargs: dict) -> int:
    generator = torch.Generator().manual_seed(seed + rank)
    sizes = _sizes(torch.Generator().manual_seed(seed))  # the same on every rank
    checked = 0
    with RingAllReduce(**ring_kwargs) as ring:
        for dtype, op, size in every_call(sizes):
            tensor = integer_valued(size, dtype, op, generator)
            expected = expect_gloo(tensor, op, world_size)
            ring.all_reduce(tensor, op)
            assert torch.equal(tensor, expected), (
                f"seed {seed}: {size} x {dtype} {op} differs from gloo at "
                f"{(tensor != expected).nonzero()[:5].flatten().tolist()}"
            )
            checked += 1
    return checked


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_dtype_and_op_equals_gloo(world_size: int) -> None:
    results = run_multiprocess(
        _every_dtype_and_op, world_size, args=(SEED, SMALL_RING), timeout=240
    )
    assert results == [results[0]] * world_size and results[0] > 0


def test_default_ring_four_ranks_equals_gloo() -> None:
    # The default chunking (larger chunks, 4 slots) with more ranks than cores.
    results = run_multiprocess(_every_dtype_and_op, 4, args=(SEED + 1, {}), timeout=240)
    assert results == [results[0]] * 4


def _random_floats(rank: int, world_size: int, seed: int) -> list[tuple[str, str, bytes]]:
    generator = torch.Generator().manual_seed(seed + rank)
    out = []
    with RingAllReduce(**SMALL_RING) as ring:
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            for op in (R.SUM, R.AVG, R.PRODUCT):
                tensor = torch.randn(5003, generator=generator).to(dtype)
                gathered = [torch.empty_like(tensor) for _ in range(world_size)]
                dist.all_gather(gathered, tensor)
                expected = fold_in_rank_order(gathered, op)
                ring.all_reduce(tensor, op)
                assert torch.equal(tensor, expected), f"seed {seed}: {dtype} {op}"
                out.append((str(dtype), str(op), tensor.view(torch.uint8).numpy().tobytes()))
    return out


def test_random_floats_are_bitwise_identical_on_every_rank() -> None:
    results = run_multiprocess(_random_floats, 3, args=(SEED,), timeout=120)
    assert results[1] == results[0] and results[2] == results[0]


def _layouts(rank: int, world_size: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed + rank)
    with RingAllReduce(**SMALL_RING) as ring:
        # A view in the middle of a buffer: only the view changes.
        buffer = integer_valued(3000, torch.float32, R.SUM, generator)
        original = buffer.clone()
        view = buffer[1001:2500]
        expected = expect_gloo(view, R.SUM, world_size)
        ring.all_reduce(view)
        assert torch.equal(view, expected)
        assert torch.equal(buffer[:1001], original[:1001])
        assert torch.equal(buffer[2500:], original[2500:])
        # Non-contiguous views (a transpose, a strided slice) are reduced through a copy.
        matrix = integer_valued(37 * 53, torch.int64, R.SUM, generator).view(37, 53)
        for tensor in (matrix.t(), matrix[:, ::3], matrix[::2]):
            kept = matrix.clone()
            expected = expect_gloo(tensor, R.MAX, world_size)
            ring.all_reduce(tensor, R.MAX)
            assert torch.equal(tensor, expected)
            untouched = torch.ones_like(matrix, dtype=torch.bool)
            untouched.as_strided(tensor.shape, tensor.stride(), tensor.storage_offset()).fill_(
                False
            )
            assert torch.equal(matrix[untouched], kept[untouched])
        # Shapes do not matter, only the number of elements.
        cube = integer_valued(4 * 5 * 6, torch.int32, R.SUM, generator).view(4, 5, 6)
        expected = expect_gloo(cube, R.SUM, world_size)
        ring.all_reduce(cube)
        assert torch.equal(cube, expected)
        # Parameters (leaves that require grad) are updated outside autograd, as torch does.
        weight = integer_valued(6 * 7, torch.float32, R.SUM, generator).view(6, 7)
        weight.requires_grad_(True)
        expected = expect_gloo(weight, R.AVG, world_size)
        ring.all_reduce(weight, R.AVG)
        assert torch.equal(weight.detach(), expected)
        expected = expect_gloo(weight.t(), R.SUM, world_size)
        ring.all_reduce(weight.t())  # through a contiguous copy
        assert torch.equal(weight.detach().t(), expected)
        assert weight.requires_grad and weight.grad_fn is None
        # Elements sharing memory cannot be reduced in place: refused, nothing written.
        expanded = torch.ones(3).expand(4, 3)
        with pytest.raises(ValueError, match="share memory"):
            ring.all_reduce(expanded)
        assert torch.equal(expanded, torch.ones(4, 3))


def test_views_non_contiguous_and_overlapping_tensors() -> None:
    run_multiprocess(_layouts, 2, args=(SEED,), timeout=120)


def _back_to_back(rank: int, world_size: int, seed: int, ring_kwargs: dict) -> int:
    generator = torch.Generator().manual_seed(seed + rank)
    sizes = torch.Generator().manual_seed(seed)
    with RingAllReduce(**ring_kwargs) as ring:
        tensors, expected = [], []
        for _ in range(150):
            size = int(torch.randint(0, 20000, (1,), generator=sizes))
            dtype = SUPPORTED_DTYPES[int(torch.randint(0, 6, (1,), generator=sizes))]
            tensor = integer_valued(size, dtype, R.SUM, generator)
            expected.append(expect_gloo(tensor, R.SUM, world_size))
            tensors.append(tensor)
        for tensor in tensors:  # back to back, no collective of another kind in between
            ring.all_reduce(tensor)
        for i, (tensor, want) in enumerate(zip(tensors, expected, strict=True)):
            assert torch.equal(tensor, want), f"seed {seed}: call {i} ({tensor.numel()})"
    return len(tensors)


# Small chunks: slots wrap. The default ring of 2 ranks: calls up to 128 KiB use the one-shot
# windows (32 per rank), which wrap several times in 150 calls.
@pytest.mark.parametrize(("world_size", "ring_kwargs"), [(3, SMALL_RING), (2, {})])
def test_many_back_to_back_calls_reuse_slots_correctly(world_size: int, ring_kwargs: dict) -> None:
    results = run_multiprocess(_back_to_back, world_size, args=(SEED, ring_kwargs), timeout=120)
    assert results == [150] * world_size


def _async(rank: int, world_size: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed + rank)
    with RingAllReduce(**SMALL_RING) as ring:
        tensors = [integer_valued(n, torch.float32, R.SUM, generator) for n in (5, 9000, 0, 70001)]
        expected = [expect_gloo(t, R.SUM, world_size) for t in tensors]
        works = [ring.all_reduce(t, async_op=True) for t in tensors]
        # A synchronous call after queued async ones runs after them, in order.
        last = integer_valued(1234, torch.int64, R.MIN, generator)
        last_expected = expect_gloo(last, R.MIN, world_size)
        assert ring.all_reduce(last, R.MIN) is None
        assert all(work.is_completed() for work in works)
        assert torch.equal(last, last_expected)
        for work, tensor, want in zip(works, tensors, expected, strict=True):
            assert work.wait() is True and work.is_success() and work.exception() is None
            assert torch.equal(tensor, want)


def test_async_calls_complete_in_order() -> None:
    run_multiprocess(_async, 2, args=(SEED,), timeout=120)


def _world_of_one(rank: int, world_size: int) -> None:
    with RingAllReduce() as ring:
        tensor = torch.arange(10, dtype=torch.float32)
        ring.all_reduce(tensor, R.AVG)
        assert torch.equal(tensor, torch.arange(10, dtype=torch.float32))


def test_world_of_one_is_the_identity() -> None:
    run_multiprocess(_world_of_one, 1, timeout=60)


def test_common_calls_go_straight_to_the_transport_and_others_through_the_checks() -> None:
    # A fake transport records what reaches it: a contiguous tensor with SUM arrives as itself;
    # AVG, a non-contiguous view and a Parameter take the general path (AVG divides afterwards,
    # the view is reduced through a contiguous copy); after close() every call raises.
    calls: list[tuple[int, int]] = []

    class Transport:
        def all_reduce(self, tensor: torch.Tensor, op: int) -> None:
            calls.append((tensor.data_ptr(), op))
            tensor.mul_(2)  # two ranks of equal tensors

        def close(self) -> None:
            pass

    ring = object.__new__(RingAllReduce)
    ring.device, ring.world_size, ring.group = torch.device("cpu"), 2, None
    ring._transport = ring._cpu_transport = Transport()
    ring._native_errors, ring._stream, ring._disabled = (), None, None
    ring._closed, ring._last, ring._executor = False, None, None
    plain = torch.arange(6.0)
    ring.all_reduce(plain)
    assert calls == [(plain.data_ptr(), 0)] and plain.tolist() == [0, 2, 4, 6, 8, 10]
    ring.all_reduce(plain, R.AVG)
    assert calls[-1] == (plain.data_ptr(), 4) and plain.tolist() == [0, 2, 4, 6, 8, 10]
    view = plain.view(2, 3).t()
    ring.all_reduce(view)
    assert calls[-1][1] == 0 and calls[-1][0] != plain.data_ptr()
    assert plain.tolist() == [0, 4, 8, 12, 16, 20]
    param = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    ring.all_reduce(param)
    assert param.tolist() == [2, 2, 2] and len(calls) == 4
    ring.close()
    with pytest.raises(CommClosedError, match="closed"):
        ring.all_reduce(plain)
    assert len(calls) == 4
