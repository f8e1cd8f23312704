"""The hierarchical all-reduce on simulated hosts (FASTPAR_HOST_ID per rank), against gloo.

Integer-valued inputs must give gloo's result exactly; random floats must give every rank the
same bits, which are the fold in rank order inside each host, then in host order. Tensors in a
host's shared areas (`empty_shared`) must give the same bits as ordinary ones. The layouts it
does not serve (one rank per host, uneven hosts) must go to torch.distributed saying why.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import threading
import time
from concurrent.futures import Future
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fastpar import comm
from fastpar.comm import HierarchicalAllReduce
from fastpar.comm.host_passes import CHUNK_BYTES
from fastpar.comm.hosts import HOST_ENV, HostLayout
from fastpar.comm.reduce import SUPPORTED_DTYPES as SUPPORTED
from fastpar.testing.distributed import run_multiprocess
from tests.comm.util import every_call, expect_gloo, fold_in_rank_order, integer_valued, places
from tests.parallel.test_data_parallel import _train_against_ddp

R = dist.ReduceOp
SEED = random.randrange(2**31)
SIZES = (0, 1, 3, 1009, 65539)  # primes: shards of uneven length


def simulate_hosts(rank: int, hosts: list[int]) -> None:
    """Make this rank count as running on host `hosts[rank]` (before anything is created)."""
    os.environ[HOST_ENV] = f"simulated-{hosts[rank]}"


def _every_dtype_and_op(rank: int, world_size: int, hosts: list[int], seed: int) -> int:
    simulate_hosts(rank, hosts)
    generator = torch.Generator().manual_seed(seed + rank)
    calls = list(every_call(SIZES))
    # Small chunks: calls of a few thousand elements cross several.
    with HierarchicalAllReduce(chunk_bytes=4096) as reducer:
        differ = []
        for dtype, op, size in calls:
            tensor = integer_valued(size, dtype, op, generator)
            assert reducer.should_use(tensor, op), reducer.fallback_reason(tensor, op)
            expected = expect_gloo(tensor, op, world_size)
            reducer.all_reduce(tensor, op)
            if not torch.equal(tensor, expected):
                differ.append(f"{size} x {dtype} {op}")
        assert not differ, f"seed {seed}: these differ from gloo: {differ}"
        # Asynchronous calls in flight together, and a view inside a larger buffer.
        buffer = integer_valued(3000, torch.float32, R.SUM, generator)
        before = buffer.clone()
        view = buffer[5:2995:2]
        tensors = [integer_valued(1000 + i, torch.int64, R.SUM, generator) for i in range(3)]
        expected = [expect_gloo(t, R.SUM, world_size) for t in [view, *tensors]]
        works = [reducer.all_reduce(t, async_op=True) for t in [view, *tensors]]
        for work, tensor, want in zip(works, [view, *tensors], expected, strict=True):
            assert work is not None and work.wait()
            assert torch.equal(tensor, want)
        outside = torch.ones(3000, dtype=torch.bool)
        outside[5:2995:2] = False
        assert torch.equal(buffer[outside], before[outside]), "elements outside the view changed"
    return len(calls)


def _host_order_fold(tensor: torch.Tensor, op: R, layout: HostLayout) -> torch.Tensor:
    """Every rank's `tensor` folded in rank order inside each host, then in host order (AVG:
    the sum, divided by the ranks)."""
    world_size = dist.get_world_size()
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor)
    inner = R.SUM if op == R.AVG else op
    per_host = [fold_in_rank_order([gathered[r] for r in ranks], inner) for ranks in layout.hosts]
    expected = fold_in_rank_order(per_host, inner)
    return expected.div_(world_size) if op == R.AVG else expected


def _random_floats(rank: int, world_size: int, hosts: list[int], seed: int) -> list[bytes]:
    simulate_hosts(rank, hosts)
    generator = torch.Generator().manual_seed(seed + rank)
    out = []
    with comm.create_all_reduce() as reducer:
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            for op in (R.SUM, R.AVG, R.PRODUCT, R.MAX):
                tensor = torch.randn(4099, generator=generator).to(dtype)
                expected = _host_order_fold(tensor, op, HostLayout.from_identities(hosts, rank))
                reducer.all_reduce(tensor, op)
                assert torch.equal(tensor, expected), f"seed {seed}: {dtype} {op}"
                out.append(tensor.view(torch.uint8).numpy().tobytes())
        # The default chunks: more than one.
        tensor = torch.randn(CHUNK_BYTES // 4 + 5, generator=generator)
        gathered = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(gathered, tensor)
        reducer.all_reduce(tensor)
        expected = fold_in_rank_order(
            [fold_in_rank_order(gathered[:2], R.SUM), fold_in_rank_order(gathered[2:], R.SUM)],
            R.SUM,
        )
        assert torch.equal(tensor, expected), f"seed {seed}: {tensor.numel()} elements"
    return out


def _two_hosts_of_two(rank: int, world_size: int, seed: int) -> tuple[int, list[bytes], list, int]:
    """One run of 2 simulated hosts x 2 ranks for the three checks below (each run costs
    seconds of process start-up)."""
    hosts = [0, 0, 1, 1]
    checked = _every_dtype_and_op(rank, world_size, hosts, seed)
    floats = _random_floats(rank, world_size, hosts, seed)
    ddp = _train_against_ddp(rank, world_size, [("lm", "auto", 0.01, 0.004)])
    return checked, floats, ddp, os.getpid()


def test_two_hosts_of_two_ranks() -> None:
    """Every dtype and op equals gloo; random floats give every rank the same bits, the fixed
    fold; DataParallel(comm="auto") trains as DDP does for 10 steps; nothing is left in
    /dev/shm."""
    results = run_multiprocess(_two_hosts_of_two, 4, args=(SEED,), timeout=240)
    checked, floats, ddp, pids = zip(*results, strict=True)
    for pid in pids:
        assert not list(Path("/dev/shm").glob(f"fastpar-hier-{pid}-*"))
    assert checked == (checked[0],) * 4 and checked[0] > 0
    assert all(result == floats[0] for result in floats)
    assert ddp == ([],) * 4


def _layouts(rank: int, world_size: int, seed: int) -> dict[str, str | None]:
    """Six ranks on three hosts of two: the world (3 x 2) and a subgroup (2 x 2) run
    hierarchically; a group with one rank per host, one with uneven hosts (2 + 1) and one
    inside a host do not. The world also reduces random floats, a small call and one of
    several chunks: their bits (a digest) must be the same on every rank."""
    hosts = [0, 0, 1, 1, 2, 2]
    simulate_hosts(rank, hosts)
    generator = torch.Generator().manual_seed(seed + rank)
    groups = {
        "world": dist.group.WORLD,
        "two hosts": dist.new_group([0, 1, 2, 3]),
        "one rank per host": dist.new_group([1, 3, 5]),
        "one host": dist.new_group([4, 5]),
        "uneven": dist.new_group([3, 4, 5]),
    }
    reasons: dict[str, str | None] = {}
    for name, group in groups.items():
        if dist.get_rank(group) < 0:
            continue
        with comm.create_all_reduce(group) as reducer:
            tensor = integer_valued(1009, torch.float32, R.SUM, generator)
            expected = tensor.clone()
            dist.all_reduce(expected, group=group)
            reducer.all_reduce(tensor)
            assert torch.equal(tensor, expected), f"seed {seed}: {name}"
            kind = type(reducer).__name__
            reasons[name] = f"{kind}: {reducer.fallback_reason(tensor)}"
            if name == "world":
                digest = hashlib.sha256()
                for count in (1009, CHUNK_BYTES // 2 + 17):
                    floats = torch.randn(count, generator=generator)
                    reducer.all_reduce(floats)
                    digest.update(floats.numpy().tobytes())
                reasons["world bits"] = digest.hexdigest()
    return reasons


def test_three_hosts_subgroups_and_layouts_it_does_not_serve() -> None:
    results = run_multiprocess(_layouts, 6, args=(SEED,), timeout=240)
    assert all(r["world"] == "HierarchicalAllReduce: None" for r in results)
    assert len({r["world bits"] for r in results}) == 1, [r["world bits"] for r in results]
    assert all(r["two hosts"] == "HierarchicalAllReduce: None" for r in results[:4])
    for rank in (1, 3, 5):
        reason = results[rank]["one rank per host"]
        assert reason.startswith("HierarchicalAllReduce: 3 ranks on 3 hosts"), reason
        assert "each host holds one rank" in reason
    assert results[4]["one host"] == results[5]["one host"] == "RingAllReduce: None"
    for rank in (3, 4, 5):
        reason = results[rank]["uneven"]
        assert "3 ranks on 2 hosts ([0], [1, 2])" in reason, reason
        assert "same number of ranks on every host, these hold 1, 2" in reason, reason


def test_host_layouts_and_their_paths() -> None:
    layout = HostLayout.from_identities(["a", "b", "a", "b"], rank=2)
    assert layout.hosts == ((0, 2), (1, 3)) and layout.host == 0 and layout.local_rank == 1
    assert layout.path()[0] == "hierarchical"
    assert HostLayout.from_identities(["a", "a"], rank=0).path()[0] == "ring"


KILLED = 3


def _failures(rank: int, world_size: int, timeout_s: float) -> tuple[str, str, float, str] | None:
    """Rank 1 passes a larger tensor than the others (every rank raises CommMismatchError,
    host 1's through the failure host 0 posted), then, on a new object, another dtype of the
    same size; then, on a third, rank KILLED dies."""
    simulate_hosts(rank, [0, 0, 1, 1])
    # A short timeout: host 1's shards wait for host 0's, which never come, that long.
    with comm.create_all_reduce(timeout=3) as reducer:
        with pytest.raises(comm.CommMismatchError) as mismatch:
            reducer.all_reduce(torch.ones(100 + (rank == 1)))
        with pytest.raises(comm.CommClosedError):
            reducer.all_reduce(torch.ones(100))
    dtype = torch.int32 if rank == 1 else torch.float32
    with (
        comm.create_all_reduce(timeout=3) as reducer,
        pytest.raises(comm.CommMismatchError) as dtypes,
    ):
        reducer.all_reduce(torch.ones(100, dtype=dtype))
    with comm.create_all_reduce(timeout=timeout_s) as reducer:
        after, error = _killed_after_a_call(reducer, torch.ones(1 << 18), rank)
        return str(mismatch.value), str(dtypes.value), after, error


def _killed_after_a_call(
    reducer: comm.HierarchicalAllReduce, tensor: torch.Tensor, rank: int
) -> tuple[float, str]:
    """One call, then rank KILLED dies; the others' next call must raise CommTimeoutError:
    (seconds from the death to that error, its message)."""
    store = dist.distributed_c10d._get_default_store()
    reducer.all_reduce(tensor)
    if rank == KILLED:
        store.set("killed/at", repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
    with pytest.raises(comm.CommTimeoutError) as error:
        reducer.all_reduce(tensor)
    return time.time() - float(store.get("killed/at").decode()), str(error.value)


def test_mismatched_and_killed_ranks_are_named_on_every_rank() -> None:
    timeout_s = 20.0
    results = run_multiprocess(_failures, 4, args=(timeout_s,), timeout=120, may_die=(KILLED,))
    assert results[KILLED] is None
    survivors = [r for r in results if r is not None]
    assert len(survivors) == 3
    called = "inside host 0: ranks [0, 1] called all_reduce with different"
    for mismatch, dtypes, _, _ in survivors:
        assert f"{called} sizes" in mismatch and f"{called} dtypes or ops" in dtypes
    for _, _, after_kill, message in survivors:
        assert f"rank {KILLED}" in message, message
        assert after_kill < timeout_s, (after_kill, message)
    assert any("exited" in message for *_, message in survivors), survivors


def test_a_calls_own_timeout_ends_a_wait_when_no_failure_note_can_be_read() -> None:
    """The call's own CommTimeoutError (a TimeoutError) was taken for a wait that ran out: with
    no failure note to read (an unreachable store) a wait without timeout spun forever."""
    reducer = object.__new__(HierarchicalAllReduce)  # only its failure notes are used
    reducer._read_note = lambda wait_s=0.0: None  # type: ignore[method-assign]
    call: Future[None] = Future()
    call.set_exception(comm.CommTimeoutError("rank 0 timed out waiting for rank 1"))
    raised: list[BaseException] = []

    def wait() -> None:
        try:
            reducer._result(call, None)
        except BaseException as error:
            raised.append(error)

    waiter = threading.Thread(target=wait, daemon=True)  # a spinning one must not hold pytest
    waiter.start()
    waiter.join(timeout=10)
    assert not waiter.is_alive(), "the wait did not end"
    assert raised and raised[0] is call.exception()


@pytest.mark.parametrize("timeout", [None, timedelta(seconds=10)])
def test_a_call_that_ends_while_the_wait_reads_the_notes_succeeds(
    timeout: timedelta | None,
) -> None:
    """A call that ended between a wait step running out and the failure note's read was
    taken for one that had raised: the wait re-raised its own step's TimeoutError, and a
    successful all-reduce failed (about once per store round trip / 0.2 s of a long call)."""
    reducer = object.__new__(HierarchicalAllReduce)  # only its failure notes are used
    call: Future[None] = Future()

    def ends_the_call_meanwhile(wait_s: float = 0.0) -> None:
        call.set_result(None)

    reducer._read_note = ends_the_call_meanwhile  # type: ignore[method-assign]
    reducer._result(call, timeout)  # raises on the old code
    assert call.done() and call.exception() is None


AREA_ELEMENTS = 70_001


def _places(generator: torch.Generator) -> list[tuple[int, int]]:
    """(offset, size) in elements: none, a few (one barrier: the whole-tensor path), odd offsets
    and prime sizes (shards of uneven length, an empty last one), the whole area, and drawn."""
    fixed = [(0, 0), (0, 3), (3, 1009), (0, 4099), (1, 65537), (0, AREA_ELEMENTS)]
    return places(generator, fixed, area=AREA_ELEMENTS, drawn=2, smallest=1100)


def _in_area(rank: int, world_size: int, seed: int) -> tuple[list[bytes], int]:
    """Tensors of `empty_shared` against gloo (integers, exact) and against the same call on
    ordinary memory (bitwise), every dtype and op and place; random floats are the fold in rank
    order inside each host, then in host order; each call's inputs are rewritten the moment
    the previous call returns (a rank that returned while a peer still read its area would
    corrupt that peer's result)."""
    hosts = [0, 0, 1, 1]
    simulate_hosts(rank, hosts)
    generator = torch.Generator().manual_seed(seed + rank)
    places = _places(torch.Generator().manual_seed(seed))  # the same on every rank
    floats = []
    with HierarchicalAllReduce(chunk_bytes=4096) as reducer:
        areas = {dtype: reducer.empty_shared(AREA_ELEMENTS, dtype=dtype) for dtype in SUPPORTED}
        differ = []
        for dtype, op, (offset, size) in every_call(places):
            area = areas[dtype]
            area.copy_(integer_valued(AREA_ELEMENTS, dtype, op, generator))
            before = area.clone()
            buffered = area[offset : offset + size].clone()  # ordinary memory: the host buffer
            reducer.all_reduce(area[offset : offset + size], op)
            reducer.all_reduce(buffered, op)
            gloo = expect_gloo(before[offset : offset + size], op, world_size)
            before[offset : offset + size] = buffered  # and nothing outside the slice changes
            same_bits = torch.equal(area.view(torch.uint8), before.view(torch.uint8))
            if not (same_bits and torch.equal(buffered, gloo)):
                differ.append(f"{size} x {dtype} {op} at {offset}")
        assert not differ, f"seed {seed}: these differ from gloo or the buffered path: {differ}"
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            for op in (R.SUM, R.AVG, R.PRODUCT, R.MAX):
                tensor = areas[dtype][7:]
                tensor.copy_(torch.randn(tensor.numel(), generator=generator).to(dtype))
                expected = _host_order_fold(tensor, op, HostLayout.from_identities(hosts, rank))
                reducer.all_reduce(tensor, op)
                assert torch.equal(tensor, expected), f"seed {seed}: {dtype} {op}"
                floats.append(tensor.view(torch.uint8).numpy().tobytes())
        sizes = torch.Generator().manual_seed(seed)
        calls = []
        for _ in range(30):
            size = int(torch.randint(2000, AREA_ELEMENTS, (1,), generator=sizes))
            tensor = integer_valued(size, torch.int64, R.SUM, generator)
            calls.append((tensor, expect_gloo(tensor, R.SUM, world_size)))
        area = areas[torch.int64]
        for index, (tensor, expected) in enumerate(calls):
            target = area[: tensor.numel()]
            target.copy_(tensor)
            reducer.all_reduce(target)
            assert torch.equal(target, expected), f"seed {seed}: call {index}"
    return floats, os.getpid()


def test_tensors_in_shared_areas_equal_gloo_and_the_buffered_path() -> None:
    results = run_multiprocess(_in_area, 4, args=(SEED,), timeout=240)
    floats, pids = zip(*results, strict=True)
    assert all(result == floats[0] for result in floats)
    for pid in pids:
        assert not list(Path("/dev/shm").glob(f"fastpar-area-{pid}-*"))


def _area_failures(rank: int, world_size: int, timeout_s: float) -> tuple[str, ...] | None:
    """Allocations that differ inside a host, and between hosts, raise on every rank and leave
    the object usable; a group with one rank per host has no shared areas; tensors at
    different places raise on every rank; then rank KILLED dies after a call in an area."""
    simulate_hosts(rank, [0, 0, 1, 1])
    one_per_host = dist.new_group([0, 2])
    with HierarchicalAllReduce(timeout=3) as reducer:
        with pytest.raises(comm.CommMismatchError) as inside:
            reducer.empty_shared(1000 + rank)
        with pytest.raises(comm.CommMismatchError) as between:
            reducer.empty_shared(1000 + 1000 * (rank // 2))
        area = reducer.empty_shared(200_000)  # halves too large for the whole-tensor path
        area.fill_(1)
        reducer.all_reduce(area)
        assert torch.equal(area, torch.full((200_000,), 4.0))
        with pytest.raises(comm.CommMismatchError) as place:
            reducer.all_reduce(area[1:100_001] if rank == 1 else area[:100_000])
    off = ""
    if rank in (0, 2):
        with HierarchicalAllReduce(one_per_host) as reducer:
            with pytest.raises(comm.SharedMemoryUnavailableError) as unavailable:
                reducer.empty_shared(100)
            off = str(unavailable.value)
    with HierarchicalAllReduce(timeout=timeout_s) as reducer:
        after, killed = _killed_after_a_call(reducer, reducer.empty_shared(1 << 18), rank)
    messages = inside.value, between.value, place.value, off, after, killed
    return tuple(map(str, messages))


def test_shared_area_mismatches_and_a_killed_rank_are_named_on_every_rank() -> None:
    timeout_s = 20.0
    results = run_multiprocess(_area_failures, 4, args=(timeout_s,), timeout=120,
                               may_die=(KILLED,))  # fmt: skip
    assert results[KILLED] is None
    survivors = [r for r in results if r is not None]
    for inside, between, place, _, after, killed in survivors:
        assert "rank 0 could not allocate: inside host 0:" in inside, inside
        assert "rank 0: 1000 x float32; rank 1: 1000 x float32; rank 2: 2000 x float32" in between
        assert "ranks [0, 1] called all_reduce with tensors in different places" in place, place
        assert f"rank {KILLED}" in killed and float(after) < timeout_s, (after, killed)
    assert "the hierarchical all-reduce is off: 2 ranks on 2 hosts" in survivors[0][3]


def _cuda_on_the_callers_stream(rank: int, world_size: int, seed: int) -> None:
    simulate_hosts(rank, [0, 0, 1, 1])
    device = torch.device("cuda", 0)  # every rank on one GPU
    torch.cuda.set_device(device)
    generator = torch.Generator().manual_seed(seed + rank)
    with HierarchicalAllReduce(device=device, serve_shared_gpu=True) as reducer:
        for size, asynchronous in ((1009, False), (65539, True)):
            host = integer_valued(size, torch.float32, R.SUM, generator)
            expected = expect_gloo(host, R.SUM, world_size)
            staged, tensor = host.to(device), torch.zeros(size, device=device)
            producer = torch.cuda.Stream(device)
            producer.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(producer):
                # The input lands late on the caller's stream: a call not ordered after it
                # reduces zeros.
                torch.cuda._sleep(50_000_000)
                tensor.copy_(staged)
                work = reducer.all_reduce(tensor, async_op=asynchronous)
                if not asynchronous:
                    assert torch.equal(tensor.cpu(), expected), f"seed {seed}: {size}"
            if asynchronous:
                # Waited for on another stream: that stream runs its reads after the call.
                assert work is not None and work.wait()
                assert torch.equal(tensor.cpu(), expected), f"seed {seed}: {size}, async"


@pytest.mark.gpu
def test_cuda_calls_run_on_the_callers_stream() -> None:
    run_multiprocess(_cuda_on_the_callers_stream, 4, args=(SEED,), timeout=240)
