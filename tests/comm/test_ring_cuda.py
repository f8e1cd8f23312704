"""The CUDA IPC all-reduce on one GPU: processes sharing it (2, 3, 4 and 8 ranks) against gloo
on host copies of integer-valued inputs, bitwise-equal ranks, a late rank, a misaligned view, a
captured CUDA graph replayed, the device-side mismatch check, failures (a killed rank named
within 2 s, a rank arriving after its peer gave up, ranks on different paths, each asynchronous
call's own verdict after a later call failed), and endpoints of
one process on concurrent streams (processes on one GPU time-slice; streams of one process run
at once, so only this exercises the barriers' memory ordering for real), and an asynchronous
call's future read on another stream than the caller's. Ranks sharing a GPU get
the ring on request only (serve_shared_gpu=True, as comm="ring" asks): by default they are left
to gloo, which is faster there. A tensor that outlives its ring is freed without error.

Results are read with `.cpu()` on the caller's stream, never after a device-wide synchronize, so
a missing stream dependency shows as a wrong result.
"""

from __future__ import annotations

import random
import re

import pytest
import torch
import torch.distributed as dist

from fastpar.comm import CommClosedError, CommMismatchError, CommTimeoutError, RingAllReduce
from fastpar.testing.distributed import run_multiprocess
from tests.comm.killed import KILLED, check_killed_rank_named, killed_mid_call
from tests.comm.util import every_call, expect_gloo, fold_in_rank_order, integer_valued

pytestmark = pytest.mark.gpu

R = dist.ReduceOp
SEED = random.randrange(2**31)
CHUNK_BYTES = 1 << 20  # calls of more than 1 MiB cross chunks
# One-shot (<= 256 KiB), two-shot, and several chunks of float32.
SIZES = [0, 1, 7, 1009, 65537, 300001]


def _device(rank: int) -> torch.device:
    device = torch.device("cuda", 0)  # every rank on one GPU
    torch.cuda.set_device(device)
    return device


def _sharing_one_gpu(rank: int, world_size: int, seed: int, full: bool) -> list[bytes]:
    device = _device(rank)
    generator = torch.Generator().manual_seed(seed + rank)
    with RingAllReduce(device=device, timeout=60, chunk_bytes=CHUNK_BYTES,
                       serve_shared_gpu=True) as ring:  # fmt: skip
        assert ring.should_use(torch.ones(1, device=device)), ring.fallback_reason(
            torch.ones(1, device=device)
        )
        calls = (
            every_call(SIZES)
            if full
            else [(d, R.SUM, n) for d in (torch.int32, torch.bfloat16) for n in SIZES]
        )
        for dtype, op, size in calls:
            host = integer_valued(size, dtype, op, generator)
            expected = expect_gloo(host, op, world_size)
            tensor = host.to(device)
            ring.all_reduce(tensor, op)
            assert torch.equal(tensor.cpu(), expected), f"seed {seed}: {size} {dtype} {op}"
        # Random floats: the rank-order fold, bit for bit, on every rank.
        out = []
        for dtype in (torch.float32, torch.float16):
            host = torch.randn(100003, generator=generator).to(dtype)
            gathered = [torch.empty_like(host) for _ in range(world_size)]
            dist.all_gather(gathered, host)
            tensor = host.to(device)
            ring.all_reduce(tensor)
            assert torch.equal(tensor.cpu(), fold_in_rank_order(gathered, R.SUM)), dtype
            out.append(tensor.cpu().view(torch.uint8).numpy().tobytes())
    return out


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
def test_processes_sharing_one_gpu_equal_gloo_bitwise(world_size: int) -> None:
    results = run_multiprocess(
        _sharing_one_gpu, world_size, args=(SEED, world_size == 2), timeout=240
    )
    assert all(r == results[0] for r in results)


def _late_misaligned_graph_mismatch(rank: int, world_size: int, seed: int) -> None:
    device = _device(rank)
    generator = torch.Generator().manual_seed(seed + rank)
    with RingAllReduce(device=device, timeout=60, chunk_bytes=CHUNK_BYTES,
                       serve_shared_gpu=True) as ring:  # fmt: skip
        # One rank is late: its stream sleeps before the call; the others' kernels wait in the
        # barrier, and every result is read on the caller's stream.
        for size in (1000, 200003):
            host = integer_valued(size, torch.float32, R.SUM, generator)
            expected = expect_gloo(host, R.SUM, world_size)
            tensor = host.to(device)
            if rank == 1:
                torch.cuda._sleep(50_000_000)
            work = ring.all_reduce(tensor, async_op=True)
            work.wait()
            assert torch.equal(tensor.cpu(), expected), size
        # Views at every offset a dtype allows (2, 4, 8 bytes from 16-byte alignment).
        for dtype, offset in ((torch.float16, 1), (torch.float32, 1), (torch.float64, 1),
                              (torch.float16, 3), (torch.int64, 1)):  # fmt: skip
            host = integer_valued(70001 + offset, dtype, R.SUM, generator)
            expected = expect_gloo(host[offset:], R.SUM, world_size)
            storage = host.to(device)
            ring.all_reduce(storage[offset:])
            result = storage.cpu()
            assert torch.equal(result[offset:], expected), (dtype, offset)
            assert torch.equal(result[:offset], host[:offset]), "bytes before the view changed"
        # Captured in a CUDA graph, replayed three times with new inputs.
        static = torch.zeros(4099, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            ring.all_reduce(static)  # warm-up outside the graph
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ring.all_reduce(static)
        for replay in range(3):
            host = integer_valued(4099, torch.float32, R.SUM, generator)
            expected = expect_gloo(host, R.SUM, world_size)
            static.copy_(host.to(device))
            graph.replay()
            assert torch.equal(static.cpu(), expected), f"replay {replay}"
        ring.check()
        # A size mismatch is found on the device: the call raises it on every rank, its tensor
        # is left as it was, and the ring is unusable afterwards.
        tensor = torch.full((1000 + rank,), 3.0, device=device)
        with pytest.raises(CommMismatchError, match=r"rank 0: 1000 x float32 SUM; rank 1: 1001"):
            ring.all_reduce(tensor)
        assert torch.equal(tensor.cpu(), torch.full((1000 + rank,), 3.0))
        with pytest.raises(CommClosedError, match="unusable"):
            ring.all_reduce(torch.ones(4, device=device))


def test_late_rank_misaligned_views_graph_replays_and_mismatch() -> None:
    run_multiprocess(_late_misaligned_graph_mismatch, 2, args=(SEED,), timeout=240)


def test_a_killed_rank_is_named_within_two_seconds_whatever_the_timeout() -> None:
    results = run_multiprocess(killed_mid_call, 3, args=("cuda:0",), timeout=90, may_die=(KILLED,))
    check_killed_rank_named(results)
    assert any("(pid " in message for _, message in results[:KILLED]), results


def _late_rank(rank: int, world_size: int, size: int) -> tuple[str, str]:
    device = _device(rank)
    torch.ones(1, device=device)  # CUDA is up on every rank before rank 0's short setup waits
    dist.barrier()
    # Rank 0 gives up on rank 1 after 3 s; rank 1 would wait a minute, but arrives only after
    # rank 0 has raised (the gloo barrier), and finds rank 0's barrier flag already stored.
    with RingAllReduce(device=device, timeout=3 if rank == 0 else 60,
                       chunk_bytes=CHUNK_BYTES, serve_shared_gpu=True) as ring:  # fmt: skip
        tensor = torch.full((size,), float(rank + 1), device=device)
        if rank == 0:
            with pytest.raises(CommTimeoutError) as error:
                ring.all_reduce(tensor)
            dist.barrier()
        else:
            dist.barrier()
            with pytest.raises(CommTimeoutError) as error:
                ring.all_reduce(tensor)
        with pytest.raises(CommClosedError) as closed:
            ring.all_reduce(torch.ones(4, device=device))
        if rank == 1:  # found at the call's first barrier: the tensor was never written
            assert torch.equal(tensor.cpu(), torch.full((size,), 2.0))
    return str(error.value), str(closed.value)


@pytest.mark.parametrize("size", [1000, 300001])  # one-shot, two-shot over several chunks
def test_a_rank_arriving_after_its_peer_gave_up_raises_too(size: int) -> None:
    results = run_multiprocess(_late_rank, 2, args=(size,), timeout=120)
    (timed_out, closed0), (late, closed1) = results
    assert "rank 0 (GPU) timed out waiting for rank 1" in timed_out, timed_out
    assert "rank 1 (GPU) arrived late: rank 0 had given up waiting for it" in late, late
    assert "unusable" in closed0 and "unusable" in closed1


def _verdicts_after_a_failure(rank: int, world_size: int) -> tuple[bool, str, str]:
    """Rank 0: a call both ranks make, then one rank 1 never makes (it times out), then one that
    finds the ring aborted; asked about last first, so the first call is first asked after the
    second failed: (whether it succeeded, the third's error, the second's)."""
    device = _device(rank)
    torch.ones(1, device=device)
    dist.barrier()
    with RingAllReduce(device=device, timeout=3 if rank == 0 else 60,
                       chunk_bytes=CHUNK_BYTES, serve_shared_gpu=True) as ring:  # fmt: skip
        tensor = torch.full((1000,), float(rank + 1), device=device)
        first = ring.all_reduce(tensor, async_op=True)
        assert first is not None
        if rank == 1:
            first.wait()
            dist.barrier()
            return True, "", ""
        timed_out = ring.all_reduce(torch.ones(1000, device=device), async_op=True)
        not_run = ring.all_reduce(torch.ones(1000, device=device), async_op=True)
        assert timed_out is not None and not_run is not None
        with pytest.raises(CommTimeoutError) as did_not_run:
            not_run.wait()
        with pytest.raises(CommTimeoutError) as failed:
            timed_out.wait()
        succeeded = first.is_success() and first.exception() is None and first.wait()
        assert torch.equal(tensor.cpu(), torch.full((1000,), 3.0))
        dist.barrier()
    return succeeded, str(did_not_run.value), str(failed.value)


def test_each_call_gets_its_own_verdict_after_a_later_call_failed() -> None:
    (succeeded, did_not_run, failed), _ = run_multiprocess(
        _verdicts_after_a_failure, 2, timeout=120
    )
    assert succeeded  # it had ended before the second call failed
    assert "rank 0 (GPU) timed out waiting for rank 1" in failed, failed
    found = re.search(
        r"call (\d+) of the ring\) did not run: call (\d+) failed before it: ", did_not_run
    )
    assert found is not None, did_not_run
    assert int(found[1]) == int(found[2]) + 1 and did_not_run.endswith(failed), did_not_run


def _different_paths(rank: int, world_size: int) -> str:
    device = _device(rank)
    with RingAllReduce(device=device, timeout=60, chunk_bytes=CHUNK_BYTES,
                       serve_shared_gpu=True) as ring:  # fmt: skip
        # Every rank's call goes to torch.distributed (host tensors): announced, agreed, reduced.
        host = torch.full((1000,), float(rank + 1))
        ring.all_reduce(host)
        assert torch.equal(host, torch.full((1000,), float(sum(range(1, world_size + 1)))))
        # rank 0 goes to torch.distributed (int8), the others to the ring (float32)
        tensor = torch.ones(100, dtype=torch.int8 if rank == 0 else torch.float32, device=device)
        with pytest.raises(CommMismatchError) as error:
            ring.all_reduce(tensor)
        return str(error.value)


def test_ranks_taking_different_paths_all_say_so() -> None:
    messages = run_multiprocess(_different_paths, 3, timeout=120)
    for rank, message in enumerate(messages):
        assert "would take different paths" in message, message
        assert "rank 0: 100 x int8 SUM via torch.distributed; rank 1: 100 x float32 SUM" in message
        if rank == 0:
            assert "on rank 0: dtype torch.int8 is not one of" in message, message


def _different_chunk_bytes(rank: int, world_size: int) -> str:
    device = _device(rank)
    with pytest.raises(ValueError) as error:  # each would read past the end of the other's areas
        RingAllReduce(device=device, timeout=60, chunk_bytes=CHUNK_BYTES << rank,
                      serve_shared_gpu=True)  # fmt: skip
    # Every rank gave up that ring alike: the next one works.
    with RingAllReduce(device=device, timeout=60, chunk_bytes=CHUNK_BYTES,
                       serve_shared_gpu=True) as ring:  # fmt: skip
        tensor = torch.full((1000,), float(rank + 1), device=device)
        ring.all_reduce(tensor)
        assert torch.equal(tensor.cpu(), torch.full((1000,), 3.0))
    return str(error.value)


def test_ranks_with_different_chunk_bytes_all_raise() -> None:
    for message in run_multiprocess(_different_chunk_bytes, 2, timeout=120):
        assert "chunk_bytes must be the same on every rank, got [1048576, 2097152]" in message


@pytest.mark.parametrize("endpoints", [2, 4, 8])
def test_endpoints_on_concurrent_streams_of_one_process(endpoints: int) -> None:
    from fastpar import _native

    native = _native.load()
    device = torch.device("cuda", 0)
    # Block b of every endpoint waits for block b of the others: all endpoints' 24 blocks must
    # be resident at once (2 per SM: 512 threads of 64 registers), else the barriers time out.
    resident = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    if resident < 24 * endpoints:
        pytest.skip(f"{endpoints} endpoints need {24 * endpoints} resident blocks; this GPU "
                    f"holds {resident}")  # fmt: skip
    rings = [
        native.IpcAllReduce(rank=r, world=endpoints, device=0, chunk_bytes=CHUNK_BYTES,
                            timeout_s=60.0)
        for r in range(endpoints)
    ]  # fmt: skip
    addresses = [ring.buffer_address for ring in rings]
    for ring in rings:
        ring.connect_local(addresses)
    streams = [torch.cuda.ExternalStream(ring.stream_handle, device=device) for ring in rings]
    generator = torch.Generator().manual_seed(SEED)
    try:
        for call in range(60):
            size = [1, 4097, 100003, 300001][call % 4]  # one-shot, two-shot, several chunks
            dtype = [torch.int32, torch.int64, torch.float32][call % 3]
            hosts = [integer_valued(size, dtype, R.SUM, generator) for _ in range(endpoints)]
            expected = torch.stack(hosts).sum(0).to(dtype)
            tensors = [h.to(device) for h in hosts]
            # Each endpoint's kernel waits for the others' in its barriers, so none may be
            # queued behind another: the current stream waits for all of them only afterwards.
            for ring, tensor in zip(rings, tensors, strict=True):
                ring.all_reduce(tensor, 0, block_current_stream=False)
            for stream in streams:
                torch.cuda.current_stream(device).wait_stream(stream)
            for r, tensor in enumerate(tensors):
                assert torch.equal(tensor.cpu(), expected), f"call {call}, endpoint {r}"
        for ring in rings:
            ring.check()
    finally:
        for ring in rings:
            ring.stop()
        for ring in rings:
            ring.free()


def _auto_on_one_gpu(rank: int, world_size: int) -> str:
    device = _device(rank)
    # Rank 0 asks for the ring; rank 1 does not, and its "no" decides for both.
    with RingAllReduce(device=device, timeout=60, serve_shared_gpu=rank == 0) as ring:
        tensor = torch.full((1000,), float(rank + 1), device=device)
        assert not ring.should_use(tensor)
        ring.all_reduce(tensor)  # gloo, on the CUDA tensor
        assert torch.equal(tensor.cpu(), torch.full((1000,), 3.0))
        return ring.fallback_reason(tensor)


def test_ranks_sharing_one_gpu_are_left_to_gloo_unless_the_ring_is_asked_for() -> None:
    reasons = run_multiprocess(_auto_on_one_gpu, 2, timeout=120)
    assert reasons[0] == reasons[1]
    assert reasons[0].startswith("rank 1: ranks share one GPU: processes time-slice it"), reasons


def _tensor_outliving_its_ring(rank: int, world_size: int) -> None:
    from fastpar import _native

    native = _native.load()
    device = _device(rank)

    def one_ring() -> tuple[torch.Tensor, int]:
        ring = native.IpcAllReduce(rank=0, world=1, device=0, chunk_bytes=CHUNK_BYTES,
                                   timeout_s=60.0)  # fmt: skip
        ring.connect_local([ring.buffer_address])
        tensor = torch.ones(4099, device=device)  # tied to the ring's stream by the call
        ring.all_reduce(tensor, 0, block_current_stream=True)
        assert torch.equal(tensor.cpu(), torch.ones(4099))
        ring.close()
        return tensor, ring.stream_handle  # the ring object is destroyed on return

    tensor, stream = one_ring()
    # The allocator records an event on the ring's stream when it frees the tensor: that stream
    # must still exist (a destroyed one made this abort the process).
    del tensor
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # frees the block once the event has passed
    # The next ring of the device takes the idle stream back.
    tensor, again = one_ring()
    assert again == stream
    del tensor
    torch.cuda.synchronize()


def test_a_tensor_outliving_its_ring_is_freed_without_error() -> None:
    # In a child process: were it to abort, that is a RankFailure here, not a dead pytest.
    run_multiprocess(_tensor_outliving_its_ring, 1, timeout=120)


def _ring_dropped_without_close(rank: int, world_size: int) -> None:
    from fastpar import _native

    native = _native.load()
    device = _device(rank)

    def one_call(close: bool) -> int:
        ring = native.IpcAllReduce(rank=0, world=1, device=0, chunk_bytes=CHUNK_BYTES,
                                   timeout_s=60.0)  # fmt: skip
        ring.connect_local([ring.buffer_address])
        tensor = torch.ones(4099, device=device)
        ring.all_reduce(tensor, 0, block_current_stream=False)
        if close:
            ring.close()
        return ring.stream_handle  # destroyed on return; without close() its call may still run

    dropped = one_call(close=False)
    torch.cuda.synchronize()  # that call has ended
    # The next ring takes the drained stream back instead of creating another one each time.
    assert one_call(close=True) == dropped
    torch.cuda.synchronize()


def test_a_ring_dropped_without_close_gives_its_stream_back_once_drained() -> None:
    run_multiprocess(_ring_dropped_without_close, 1, timeout=120)


def _future_read_on_another_stream(rank: int, world_size: int, seed: int) -> None:
    device = _device(rank)
    generator = torch.Generator().manual_seed(seed + rank)
    host = integer_valued(2 * 40009, torch.float32, R.SUM, generator).view(40009, 2)
    expected = expect_gloo(host[:, 0].contiguous(), R.SUM, world_size)
    ring = RingAllReduce(device=device, timeout=60, chunk_bytes=CHUNK_BYTES,
                         serve_shared_gpu=True)  # fmt: skip
    caller, reader = torch.cuda.Stream(device), torch.cuda.Stream(device)
    with torch.cuda.stream(caller):
        storage = host.to(device)
        view = storage[:, 0]  # not contiguous: the ring reduces a copy, written back at the end
        work = ring.all_reduce(view, async_op=True)
        torch.cuda._sleep(100_000_000)  # the write-back queues behind this on the caller's stream
        future = work.get_future()
    with torch.cuda.stream(reader):
        # The future orders its waiter's stream after the caller's, write-back included.
        result = future.wait()[0].clone()
        assert torch.equal(result.cpu(), expected), f"seed {seed}"
    # A call first asked about after close() (which the native ring answers "closed") gets its
    # own outcome.
    tensor = host[:, 1].contiguous().to(device)
    unasked = ring.all_reduce(tensor, async_op=True)
    ring.close()
    assert unasked.is_success() and unasked.exception() is None
    assert unasked.wait() and unasked.result()[0] is tensor
    assert torch.equal(tensor.cpu(), expect_gloo(host[:, 1].contiguous(), R.SUM, world_size))
    assert work.is_success() and work.result()[0] is view


def test_a_future_read_on_another_stream_sees_the_written_back_view() -> None:
    run_multiprocess(_future_read_on_another_stream, 2, args=(SEED,), timeout=120)


def _data_parallel_on_one_gpu(rank: int, world_size: int) -> dict[str, list[torch.Tensor]]:
    from torch import nn

    from fastpar.parallel import DataParallel

    device = _device(rank)
    out = {}
    # "on": buckets launched asynchronously from autograd's hooks; "off": run synchronously at
    # the end of backward.
    for overlap in ("on", "off"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 4)).to(device)
        reference = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 4)).to(device)
        reference.load_state_dict(model.state_dict())
        dp = DataParallel(model, comm="ring", bucket_cap_mb=0.01, first_bucket_mb=0.004,
                          overlap=overlap)  # fmt: skip
        ours = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        theirs = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
        for step in range(3):
            batches = [
                torch.randn(16, 8, generator=torch.Generator().manual_seed(100 * step + r))
                for r in range(world_size)
            ]
            ours.zero_grad()
            dp(batches[rank].to(device)).square().mean().backward()
            ours.step()
            # The single-process reference: every rank's batch at once (equal sizes: the mean
            # of the ranks' means).
            theirs.zero_grad()
            reference(torch.cat(batches).to(device)).square().mean().backward()
            theirs.step()
        for a, b in zip(model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        dp.close()
        out[overlap] = [p.detach().cpu() for p in model.parameters()]
    return out


def test_data_parallel_two_processes_on_one_gpu_equal_one_process() -> None:
    results = run_multiprocess(_data_parallel_on_one_gpu, 2, timeout=240)
    # The same bits on both ranks, with and without overlap (the same sums, in the same order).
    for overlap in ("on", "off"):
        for a, b in zip(results[0][overlap], results[1][overlap], strict=True):
            assert torch.equal(a, b)
        for a, b in zip(results[0]["on"], results[0][overlap], strict=True):
            assert torch.equal(a, b), overlap
