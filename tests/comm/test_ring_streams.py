"""The CUDA ring's host-side logic that needs no GPU, with fakes for torch.cuda and the native
transport (the GPU itself: tests/comm/test_ring_cuda.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from fastpar import _native
from fastpar.comm import CommTimeoutError, RingAllReduce
from fastpar.comm.errors import CallFailure, FirstFailure, native_error_types
from tests.cuda_fakes import ring_on_fakes


def _ring_on_cuda1_capturing(
    monkeypatch: pytest.MonkeyPatch, current: dict[str, int], entered: list[int]
) -> RingAllReduce:
    """A ring of cuda:1 with fakes: torch.cuda's current device is current["index"] (each
    torch.cuda.device entered is appended to `entered`), and only cuda:1's stream captures."""

    @contextlib.contextmanager
    def device(where: torch.device) -> Iterator[None]:
        entered.append(torch.device(where).index)
        before, current["index"] = current["index"], torch.device(where).index
        try:
            yield
        finally:
            current["index"] = before

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["index"])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: current["index"] == 1)

    class Transport:
        def all_reduce(self, tensor: torch.Tensor, code: int, block_current_stream: bool) -> int:
            return 1

    ring = object.__new__(RingAllReduce)
    ring.device = torch.device("cuda", 1)
    ring._transport, ring._native_errors, ring._stream = Transport(), (), object()
    ring._device_failure = FirstFailure(lambda: None, ())
    return ring


def test_a_capture_is_looked_for_on_the_rings_device(monkeypatch: pytest.MonkeyPatch) -> None:
    # cuda:1 captures a graph while cuda:0 is the current device: the native call captures the
    # kernel (it looks at cuda:1's current stream), so no event may be recorded or waited for.
    current, entered = {"index": 0}, []
    ring = _ring_on_cuda1_capturing(monkeypatch, current, entered)
    work = ring._run_cuda(torch.ones(4), 0, async_op=True)
    assert work is not None and work._event is None
    assert work.is_completed() and entered == [1] and current["index"] == 0


def test_a_call_on_the_current_device_does_not_switch_devices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Entering torch.cuda.device costs microseconds of host time on every call: a ring whose
    # device is already the current one must not enter it.
    current, entered = {"index": 1}, []
    ring = _ring_on_cuda1_capturing(monkeypatch, current, entered)
    work = ring._run_cuda(torch.ones(4), 0, async_op=True)
    assert entered == [] and work is not None and work._event is None  # captured on cuda:1


def _capturing_ring(
    monkeypatch: pytest.MonkeyPatch,
    steps: list[str],
    check: Callable[[], None],
    store: dist.Store | None = None,
    rank: int = 0,
) -> RingAllReduce:
    """Rank `rank` of a CUDA ring of 2 ranks whose calls are all captured in a graph, with fakes
    for torch.cuda and the native transport (`check` its check), and for the store unless one is
    given (then its waits are the store's); each fake appends what it did to `steps`."""
    monkeypatch.setattr(torch.cuda, "device", lambda where: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: steps.append("sync"))

    class Transport:
        calls = 0

        def all_reduce(self, tensor: torch.Tensor, code: int, block_current_stream: bool) -> int:
            steps.append("captured")
            self.calls += 1
            return self.calls

        def stop(self) -> None:
            steps.append("stop")

        def free(self) -> None:
            steps.append("free")

    class Stream:
        def synchronize(self) -> None:
            steps.append("ring stream done")

    class Store:
        def set(self, key: str, value: str) -> None:
            pass

        def add(self, key: str, value: int) -> int:
            return value  # the first of two ranks: the peer deletes

    ring = object.__new__(RingAllReduce)
    ring.device, ring.rank, ring.world_size = torch.device("cuda", 0), rank, 2
    native_errors = native_error_types(_native.load())
    ring._transport, ring._native_errors, ring._stream = Transport(), native_errors, Stream()
    ring._device_failure = FirstFailure(check, native_errors)
    ring._closed, ring._captured, ring._executor = False, False, None
    ring._store, ring._prefix = store or Store(), "test"
    # A live group, registered by torch (a destroyed group's close waits for no peer)
    ring.group = object()
    monkeypatch.setitem(dist.distributed_c10d._world.pg_map, ring.group, ("gloo", None))

    def store_wait(store: dist.Store, keys: dict[int, str], what: str, during: str = "") -> None:
        if isinstance(store, dist.Store):
            store.wait(list(keys.values()), timedelta(seconds=30))

    ring._store_wait = store_wait  # type: ignore[method-assign]
    return ring


def test_the_last_rank_to_close_deletes_the_unmapped_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every CUDA ring's close left each rank's "unmapped" key in the store."""
    store = dist.HashStore()
    steps: list[str] = []
    rings = [_capturing_ring(monkeypatch, steps, lambda: None, store, rank) for rank in (0, 1)]
    with ThreadPoolExecutor(2) as ranks:  # each waits for the other's key: both at once
        list(ranks.map(RingAllReduce.close, rings))
    assert steps.count("free") == 2, steps  # every peer unmapped: each freed its buffer
    assert store.num_keys() == 0


def test_close_waits_for_replays_of_captured_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    # A captured call replays on the caller's stream, not the ring's: close() must wait for the
    # device before the peers' buffers are unmapped (stop) and its own freed.
    steps: list[str] = []
    ring = _capturing_ring(monkeypatch, steps, check=lambda: steps.append("check"))
    ring._run_cuda(torch.ones(4), 0, async_op=False)
    ring.close()
    # The device's verdict is read once every call has finished and before stop().
    assert steps == ["captured", "sync", "ring stream done", "check", "stop", "free"]


def test_every_question_after_a_device_failure_gets_that_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The native ring reports a failure once, then says "unusable after an earlier failure",
    # and "closed" once stopped; fastpar's answers stay the failure itself.
    native = _native.load()
    answers = iter([None, native.RingTimeoutError("rank 0 (GPU) timed out waiting for rank 1")])
    later = native.RingClosedError("this ring all-reduce is unusable after an earlier failure")
    checks: list[str] = []

    def check() -> None:
        checks.append("check")
        answer = next(answers, later)
        if answer is not None:
            raise answer

    ring = _capturing_ring(monkeypatch, [], check)
    before = ring._run_cuda(torch.ones(4), 0, async_op=True)
    assert before is not None and before.exception() is None  # asked before the failure
    failed = ring._run_cuda(torch.ones(4), 0, async_op=True)
    assert failed is not None
    for _ in range(2):
        with pytest.raises(CommTimeoutError, match="waiting for rank 1"):
            ring.check()
    assert isinstance(failed.exception(), CommTimeoutError)
    ring.close()
    with pytest.raises(CommTimeoutError, match="waiting for rank 1"):
        ring.check()
    assert before.exception() is None and before.is_success()
    assert checks == ["check", "check"]  # nothing is asked once a failure is known


def test_a_failure_is_kept_with_the_number_of_the_call_that_met_it() -> None:
    # The native ring names the failing call once check() has raised its failure (-1 before):
    # read with it, or kept with it when a call raised it; not known where it says -1.
    native = _native.load()
    native_errors = native_error_types(native)
    failed_call = [-1]

    def check() -> None:
        failed_call[0] = 7
        raise native.RingTimeoutError("rank 0 (GPU) timed out waiting for rank 1")

    read = FirstFailure(check, native_errors, lambda: failed_call[0]).read_call_failure()
    assert read is not None and read.call == 7 and isinstance(read.error, CommTimeoutError)
    kept = FirstFailure(lambda: None, native_errors, lambda: failed_call[0])
    kept.keep(CommTimeoutError("rank 0 (GPU) timed out waiting for rank 1"))
    assert kept.read_call_failure() == CallFailure(kept.read(), 7)  # type: ignore[arg-type]
    unknown = FirstFailure(check, native_errors).read_call_failure()
    assert unknown is not None and unknown.call is None


def test_each_cuda_call_gets_its_own_verdict_from_the_failing_calls_number(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Three asynchronous calls on the ring's stream; the device fails the second (a timeout)
    # and the third returns at once. Asked only afterwards, last first: the third did not run,
    # the second failed, the first succeeded.
    native = _native.load()
    native_errors = native_error_types(native)
    timeout = "rank 0 (GPU) timed out waiting for rank 1"

    class Transport:
        calls = 0
        failed_call = -1  # the native ring's property: set once check() has raised

        def all_reduce(self, tensor: torch.Tensor, code: int, block_current_stream: bool) -> int:
            self.calls += 1
            return self.calls

        def check(self) -> None:
            if self.calls >= 2:  # the device has run them all by now
                self.failed_call = 2
                raise native.RingTimeoutError(timeout)

    ring = ring_on_fakes(monkeypatch, Transport(), native_errors)
    works = [ring._run_cuda(torch.ones(4), 0, async_op=True) for _ in range(3)]
    first, failed, did_not_run = works
    assert first is not None and failed is not None and did_not_run is not None
    with pytest.raises(CommTimeoutError) as error:
        did_not_run.wait()
    assert f"(call 3 of the ring) did not run: call 2 failed before it: {timeout}" in str(
        error.value
    )
    with pytest.raises(CommTimeoutError) as error:
        failed.wait()
    assert str(error.value) == timeout
    assert first.wait() and first.is_success() and first.exception() is None
    with pytest.raises(CommTimeoutError) as error:
        ring.check()  # the ring as a whole has failed
    assert str(error.value) == timeout


@pytest.mark.parametrize("peer_chunk_bytes", [1 << 20, 2 << 20])
def test_ranks_agree_on_chunk_bytes_before_mapping(
    monkeypatch: pytest.MonkeyPatch, peer_chunk_bytes: int
) -> None:
    # Rank 0's setup with a fake transport and exchange, rank 1 having published its handle
    # and chunk_bytes: different ones raise before any buffer is mapped, equal ones map.
    handle = bytes(range(64))
    peer = {"device": b"gpu", "ipc": handle + peer_chunk_bytes.to_bytes(8, "little")}
    steps: list[str] = []

    class Transport:
        stream_handle = 0

        def __init__(self, **kwargs: object) -> None:
            steps.append(f"created with {kwargs['chunk_bytes']}")

        def handle(self) -> torch.Tensor:
            return torch.zeros(64, dtype=torch.uint8)

        def connect(self, handles: list[torch.Tensor]) -> None:
            assert bytes(handles[1].tolist()) == handle
            steps.append("connected")

        def watch_peers(self, pids: list[int]) -> None:
            pass

        def check(self) -> None:
            pass

        def close(self) -> None:
            steps.append("closed")

    class Native:
        with_cuda = True
        IpcAllReduce = Transport

    class Setup:  # StoreExchange's stages, rank 1's records already posted
        def gather(self, name: str, mine: str | bytes, what: str) -> list[bytes]:
            return [mine.encode() if isinstance(mine, str) else mine, peer[name]]

    monkeypatch.setattr("fastpar.comm.ring.local_device_ids", lambda: ["gpu"])
    monkeypatch.setattr(torch.cuda, "ExternalStream", lambda handle, device: object())
    ring = object.__new__(RingAllReduce)
    ring.device, ring.rank, ring.world_size = torch.device("cuda", 0), 0, 2
    ring.group, ring._serve_shared_gpu, ring._peer_pids = None, True, {}
    ring.timeout, ring._native_errors = timedelta(seconds=60), ()
    ring._agree = lambda setup, question, problem, what: not problem  # type: ignore[method-assign]
    if peer_chunk_bytes != 1 << 20:
        with pytest.raises(ValueError, match=r"same on every rank, got \[1048576, 2097152\]"):
            ring._connect_cuda_ipc(Native(), Setup(), 1 << 20)
        assert steps == ["created with 1048576", "closed"]
    else:
        ring._connect_cuda_ipc(Native(), Setup(), 1 << 20)
        assert steps == ["created with 1048576", "connected"]
