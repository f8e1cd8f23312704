"""The handles of `fastpar.comm.all_reduce(..., async_op=True)` against torch.distributed's own
(gloo's) Work: the same calls on both give the same `get_future()`, `result()` and `then()`
chains; a future completes without `wait()`, after a non-contiguous tensor got its result; a
failure is raised by `fut.wait()`. DDP's communication hooks take the future."""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import random
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future

import numpy as np
import pytest
import torch
import torch.distributed as dist

import fastpar.comm as comm
from fastpar.comm.errors import CallFailure
from fastpar.comm.hosts import HOST_ENV
from fastpar.comm.work import CudaRingWork, RingWork
from fastpar.testing.distributed import run_multiprocess
from tests.comm.util import integer_valued

R = dist.ReduceOp
SEED = random.randrange(2**31)
WAIT_S = 60.0  # bound on waiting for a future's callback (a failure, not a slow machine)

# (dtype, whether a view of every other column): float32 runs on fastpar's collective (the
# ring, or the hierarchical all-reduce), int8 on gloo, a view through a contiguous copy that is
# written back (CopyBackWork).
CASES = {
    "float32": (torch.float32, False),
    "float32 view": (torch.float32, True),
    "int8 view": (torch.int8, True),
}


def _input(generator: torch.Generator, dtype: torch.dtype, view: bool) -> torch.Tensor:
    base = integer_valued(60 * 50, dtype, R.SUM, generator).view(60, 50)
    return base[:, ::2] if view else base


def _completion(future: torch.futures.Future[list[torch.Tensor]]) -> threading.Event:
    """An event that a callback of `future` sets (whether it holds a value or an error)."""
    done = threading.Event()
    future.add_done_callback(lambda _: done.set())
    return done


class _Seen:
    """What a callback of `future` saw of its value: an event once it ran, the number of
    tensors, and a copy of the first as it was then (for a view: read from its base)."""

    def __init__(self, future: torch.futures.Future[list[torch.Tensor]]) -> None:
        self.done = threading.Event()
        self.count = 0
        self.value = torch.empty(0)
        future.add_done_callback(self._record)

    def _record(self, future: torch.futures.Future[list[torch.Tensor]]) -> None:
        value = future.value()
        self.count, self.value = len(value), value[0].clone()
        self.done.set()


def _against_gloo(rank: int, world_size: int, seed: int, hosts: list[int] | None) -> list[str]:
    """Every case through fastpar's all_reduce and, on a contiguous copy, gloo's: rank 0 starts
    both and looks at them before the other ranks call, so neither can have finished. `hosts`:
    the host of each rank (None: all on this one)."""
    if hosts is not None:  # this rank counts as running on host hosts[rank]
        os.environ[HOST_ENV] = f"simulated-{hosts[rank]}"
    store = dist.distributed_c10d._get_default_store()
    generator = torch.Generator().manual_seed(seed + rank)
    comm.all_reduce(torch.zeros(1))  # creating the all-reduce meets every rank
    handled = []
    for name, (dtype, view) in CASES.items():
        context = f"seed {seed}, {name}"
        tensor = _input(generator, dtype, view)
        # A contiguous copy: gloo reduces a view's storage as if it were contiguous.
        reference = tensor.clone(memory_format=torch.contiguous_format)
        # The ring meets the peers before it hands a call to gloo (to agree on the path), so
        # they cannot be held back there.
        held = not (hosts is None and dtype == torch.int8)
        if held and rank != 0:
            store.wait([f"work/{name}/looked"])
        ours = comm.all_reduce(tensor, async_op=True)
        theirs = dist.all_reduce(reference, async_op=True)
        assert ours is not None and theirs is not None
        future, reference_future = ours.get_future(), theirs.get_future()
        # torch's Work makes a Python object per call; fastpar's return the same one.
        assert isinstance(ours, dist.Work) or ours.get_future() is future, context
        if held and rank == 0:  # the peers have not called: both are running
            assert not future.done() and not reference_future.done(), context
            for work in (ours, theirs):
                with pytest.raises(RuntimeError, match="wait"):
                    work.result()
        seen, reference_seen = _Seen(future), _Seen(reference_future)
        doubled = future.then(lambda fut: fut.value()[0] * 2)
        reference_doubled = reference_future.then(lambda fut: fut.value()[0] * 2)
        if held and rank == 0:
            store.set(f"work/{name}/looked", "1")
        # Neither wait() nor fut.wait(): the futures complete by themselves.
        assert seen.done.wait(WAIT_S) and reference_seen.done.wait(WAIT_S), context
        assert seen.count == reference_seen.count == 1, context
        assert torch.equal(seen.value, reference_seen.value), context
        assert torch.equal(doubled.wait(), reference_doubled.wait()), context
        # The futures' values are the caller's tensors, as gloo's are.
        assert future.wait()[0] is tensor and reference_future.wait()[0] is reference, context
        assert ours.wait() and theirs.wait()
        assert ours.is_completed() and theirs.is_completed(), context
        (result,), (reference_result,) = ours.result(), theirs.result()
        assert result is tensor and torch.equal(result, reference_result), context
        handled.append(type(ours).__name__)
    comm.close_rings()
    return handled


def test_ring_futures_and_results_match_gloos() -> None:
    results = run_multiprocess(_against_gloo, 2, args=(SEED, None), timeout=120)
    assert results == [["RingWork", "RingWork", "CopyBackWork"]] * 2


def test_hierarchical_futures_and_results_match_gloos() -> None:
    results = run_multiprocess(_against_gloo, 4, args=(SEED, [0, 0, 1, 1]), timeout=240)
    assert results == [["HierarchicalWork", "HierarchicalWork", "CopyBackWork"]] * 4


def test_futures_and_results_of_calls_handed_to_torch_match_gloos() -> None:
    # One rank per host: every call goes to torch.distributed (a view through a copy).
    results = run_multiprocess(_against_gloo, 2, args=(SEED, [0, 1]), timeout=120)
    assert results == [["Work", "CopyBackWork", "CopyBackWork"]] * 2


LATE_S = 1.0  # how late rank 0's peers call, while it waits


def _waits_with_late_peers(
    rank: int, world_size: int, hosts: list[int] | None
) -> tuple[list[tuple[str, torch.Tensor, float]], str]:
    """Rank 0 waits with torch's default timeout, timedelta(0), on gloo's call and on fastpar's
    while its peers call LATE_S late; then with 50 ms on a call of fastpar's the peers make only
    once told to. Returns on rank 0: (handle, result, seconds waited) per call, and the message
    of the wait that ran out."""
    if hosts is not None:  # this rank counts as running on host hosts[rank]
        os.environ[HOST_ENV] = f"simulated-{hosts[rank]}"
    store = dist.distributed_c10d._get_default_store()
    comm.all_reduce(torch.zeros(1))  # creating the all-reduce meets every rank
    starts = {
        "gloo": lambda tensor: dist.all_reduce(tensor, async_op=True),
        "fastpar": lambda tensor: comm.all_reduce(tensor, async_op=True),
    }
    waited = []
    for name, start in starts.items():
        tensor = torch.arange(1000, dtype=torch.float32) * (rank + 1)
        if rank == 0:
            work = start(tensor)
            store.set(f"late/{name}", "1")
            began = time.monotonic()
            assert work.wait(datetime.timedelta(0))
            waited.append((type(work).__name__, tensor, time.monotonic() - began))
            assert work.wait(5.0)  # seconds, as torch's pybind signature takes them
            with pytest.raises(TypeError, match="timeout" if name == "fastpar" else "wait"):
                work.wait("5")
        else:
            store.wait([f"late/{name}"])
            time.sleep(LATE_S)  # the lateness under test: rank 0 is in wait() by now
            start(tensor).wait()
    message = ""
    tensor = torch.ones(1000)
    if rank == 0:
        work = comm.all_reduce(tensor, async_op=True)
        with pytest.raises(TimeoutError) as error:
            work.wait(datetime.timedelta(milliseconds=50))
        message = str(error.value)
        store.set("late/ran-out", "1")
        work.wait()
    else:
        store.wait(["late/ran-out"])
        comm.all_reduce(tensor)
    assert torch.equal(tensor, torch.full((1000,), float(world_size)))
    comm.close_rings()
    return waited, message


@pytest.mark.parametrize(
    "world_size, hosts, handle",
    [(2, None, "RingWork"), (4, [0, 0, 1, 1], "HierarchicalWork")],
    ids=["ring", "hierarchical"],
)
def test_a_zero_timeout_waits_for_late_peers_as_torchs_does(
    world_size: int, hosts: list[int] | None, handle: str
) -> None:
    """wait(timedelta(0)), torch's default, raised TimeoutError at once from fastpar's handles
    where gloo's waits without bound; a hierarchical wait that ran out raised an empty
    TimeoutError where the ring's says the call goes on."""
    waited, message = run_multiprocess(
        _waits_with_late_peers, world_size, args=(hosts,), timeout=60 * world_size
    )[0]
    (gloo, reference, gloo_s), (name, result, fastpar_s) = waited
    assert (gloo, name) == ("Work", handle)
    assert torch.equal(result, reference)
    assert min(gloo_s, fastpar_s) > LATE_S / 2, waited  # both waited for the late peers
    assert message.startswith("the all-reduce was still running after wait(timeout=0.05 s)")
    assert message.endswith("wait() again before using the tensor"), message


def _read_once_completed(rank: int, world_size: int) -> list[list[int]]:
    """A non-contiguous int8 view (torch.distributed's path, through a copy) and torch's own
    handle on a contiguous tensor, each read as soon as is_completed() says so."""
    seen = []
    for reduce, tensor in (
        (comm.all_reduce, torch.full((4, 4), rank + 1, dtype=torch.int8)[:, ::2]),
        (dist.all_reduce, torch.full((8,), rank + 1, dtype=torch.int8)),
    ):
        work = reduce(tensor, async_op=True)
        assert work is not None
        while not work.is_completed():
            time.sleep(0.001)
        seen.append(tensor.unique().tolist())
        work.wait()
    return seen


def test_a_copied_calls_result_is_in_the_tensor_once_completed() -> None:
    """torch's CPU handles hold their output once is_completed() is True; a non-contiguous
    tensor handed to torch through a copy got the result only at wait()."""
    for seen in run_multiprocess(_read_once_completed, 2, timeout=120):
        fastpar_view, torch_contiguous = seen
        assert torch_contiguous == [3]
        assert fastpar_view == torch_contiguous


def _stderr_of_polling(rank: int, world_size: int) -> str:
    """What the process printed on its stderr (torch's C++ warnings go there) while a copied
    call was polled with is_completed() until done."""
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            work = comm.all_reduce(torch.ones(4, 4, dtype=torch.int8)[:, ::2], async_op=True)
            assert work is not None
            while not work.is_completed():
                time.sleep(0.001)
            work.wait()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        return captured.read().decode(errors="replace")


def test_polling_a_copied_call_prints_no_deprecation_warning() -> None:
    """is_completed() asked torch's Work.is_success(), which prints "Work::is_success API is
    being deprecated" at the first poll, though the user never called it."""
    for printed in run_multiprocess(_stderr_of_polling, 2, timeout=120):
        assert "deprecated" not in printed, printed


FAILING_GROUP_TIMEOUT_S = 2.0


def _failure(rank: int, world_size: int, hosts: list[int] | None) -> list[tuple[str, str, str]]:
    """Rank 0 reduces a view on gloo and through fastpar.comm over groups whose rank 1 never
    calls: (error type, message, the same from wait()) for each, as their futures carry it."""
    if hosts is not None:
        os.environ[HOST_ENV] = f"simulated-{hosts[rank]}"
    store = dist.distributed_c10d._get_default_store()
    timeout = datetime.timedelta(seconds=FAILING_GROUP_TIMEOUT_S)
    reference_group = dist.new_group([0, 1], timeout=timeout)
    group = dist.new_group([0, 1], timeout=timeout)  # the ring's bound too
    comm.all_reduce(torch.zeros(1), group=group)  # creating the all-reduce meets every rank
    outcomes = []
    if rank == 0:
        reference_work = dist.all_reduce(torch.ones(20), group=reference_group, async_op=True)
        for work in (
            reference_work,
            comm.all_reduce(torch.ones(10, 4)[:, ::2], group=group, async_op=True),
        ):
            assert work is not None
            future = work.get_future()
            # Without wait(): the future carries the failure by itself.
            assert _completion(future).wait(WAIT_S)
            with pytest.raises(Exception) as error:
                future.wait()
            if work is not reference_work:  # torch 2.11's Work.exception() cannot return it
                assert not work.is_success() and str(work.exception()) == str(error.value)
            with pytest.raises(Exception) as waited:
                work.wait()
            outcomes.append((type(error.value).__name__, str(error.value), str(waited.value)))
        store.set("work/failure/done", "1")
    else:
        store.wait(["work/failure/done"])
    comm.close_rings()
    return outcomes


def test_a_failed_ring_call_is_raised_by_its_future() -> None:
    outcomes = run_multiprocess(_failure, 2, args=(None,), timeout=120)[0]
    (reference_type, reference, _), (kind, message, waited) = outcomes
    assert reference_type == "RuntimeError" and "Timed out" in reference
    assert kind == "CommTimeoutError" and "waiting for rank 1" in message
    assert message == waited  # the error wait() raises


class _EndsAsTheWaitRunsOut(Future):  # type: ignore[type-arg]
    """A call that succeeds just as a bounded wait for it runs out."""

    def result(self, timeout: float | None = None) -> object:
        if timeout is not None and not self.done():
            self.set_result(None)
            raise TimeoutError
        return super().result(timeout)


def test_a_ring_call_that_ends_as_the_wait_runs_out_succeeds() -> None:
    """The wait took its own TimeoutError for the call's error once the call was done, and a
    successful all-reduce failed."""
    call = _EndsAsTheWaitRunsOut()
    work = RingWork(call, torch.zeros(3))
    work.wait(timeout=datetime.timedelta(seconds=10))  # raised on the old code
    assert work.is_success()


def test_a_failed_call_handed_to_torch_is_raised_by_its_future() -> None:
    # One rank per host: the view goes to gloo through a copy (CopyBackWork).
    outcomes = run_multiprocess(_failure, 2, args=([0, 1],), timeout=120)[0]
    (reference_type, reference, _), (kind, message, waited) = outcomes
    assert kind == reference_type == "RuntimeError"
    assert "Timed out" in reference and "Timed out" in message and message == waited


def _ddp_hook(rank: int, world_size: int, seed: int) -> int:
    """DDP with a communication hook on fastpar's all_reduce, and with torch's allreduce_hook
    (the same division, then gloo): bitwise the same gradients."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    # Unannotated: DDP checks a hook's annotations, which are strings here (annotations future).
    def fastpar_hook(state, bucket):  # type: ignore[no-untyped-def]
        tensor = bucket.buffer().div_(world_size)
        work = comm.all_reduce(tensor, async_op=True)
        assert work is not None
        return work.get_future().then(lambda fut: fut.value()[0])

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 33), torch.nn.ReLU(), torch.nn.Linear(33, 3))
    # Small buckets: several all-reduces in flight per backward.
    theirs = DistributedDataParallel(copy.deepcopy(model), bucket_cap_mb=0.001)
    theirs.register_comm_hook(None, allreduce_hook)
    ours = DistributedDataParallel(model, bucket_cap_mb=0.001)
    ours.register_comm_hook(None, fastpar_hook)
    generator = torch.Generator().manual_seed(seed + rank)
    for step in range(3):
        inputs = torch.randn(5, 8, generator=generator)
        for ddp in (ours, theirs):
            ddp.zero_grad()
            ddp(inputs).square().sum().backward()
        for mine, reference in zip(ours.parameters(), theirs.parameters(), strict=True):
            assert torch.equal(mine.grad, reference.grad), (seed, step)
    comm.close_rings()
    return step + 1


def test_ddp_communication_hook_on_the_future() -> None:
    assert run_multiprocess(_ddp_hook, 2, args=(SEED,), timeout=120) == [3, 3]


class _FakeEvent:
    """A CUDA event that the test completes (`finished`)."""

    def __init__(self) -> None:
        self.finished = threading.Event()

    def query(self) -> bool:
        return self.finished.is_set()

    def synchronize(self) -> None:
        assert self.finished.wait(WAIT_S)


class _FakeStream:
    def __init__(self) -> None:
        self.waited_for: list[_FakeEvent] = []

    def wait_event(self, event: _FakeEvent) -> None:
        self.waited_for.append(event)


def test_cuda_ring_work_futures_complete_after_the_event(monkeypatch: pytest.MonkeyPatch) -> None:
    """CudaRingWork on CPU tensors, with the CUDA calls it makes faked: the future completes
    once the event has, without wait(), with the view written back; or with the failure the
    ring reported, which stays the call's verdict whatever the ring reports later."""
    stream = _FakeStream()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    generator = torch.Generator().manual_seed(SEED)
    base = torch.randn(6, 10, generator=generator)
    before = base.clone()
    view = base[:, ::2]
    reduced = torch.randn(6, 5, generator=generator)  # what the ring wrote into the copy
    event = _FakeEvent()
    ring_failure: list[CallFailure | None] = [None]  # what the ring reports when asked
    work = CudaRingWork(event, torch.device("cpu"), view, reduced, 1, lambda: ring_failure[0])  # type: ignore[arg-type]
    future = work.get_future()
    seen = _Seen(future)
    assert not future.done() and not work.is_completed()  # synchronize() waits for the event
    assert not work.is_success() and work.exception() is None
    with pytest.raises(RuntimeError, match="wait"):
        work.result()
    event.finished.set()
    assert seen.done.wait(WAIT_S)
    assert seen.count == 1 and torch.equal(seen.value, reduced)
    assert future.wait()[0] is view and stream.waited_for == [event]
    before[:, ::2] = reduced
    assert torch.equal(base, before)
    assert work.wait() and work.result()[0] is view
    assert work.is_success() and work.exception() is None

    # The ring reports a failure later, of a call of unknown number (which could be this one):
    # this call's verdict, read when it finished, stands.
    ring_failure[0] = CallFailure(comm.CommTimeoutError("a later call timed out"), None)
    assert work.wait() and work.is_success() and work.exception() is None

    timeout = comm.CommTimeoutError("rank 0 (GPU) stopped waiting for rank 1")
    ring_failure[0] = CallFailure(timeout, 2)
    failing = _FakeEvent()
    work = CudaRingWork(failing, torch.device("cpu"), view, view, 2, lambda: ring_failure[0])  # type: ignore[arg-type]
    future = work.get_future()
    assert work.exception() is None and not work.is_success()  # still running
    failing.finished.set()
    with pytest.raises(comm.CommTimeoutError, match="waiting for rank 1"):
        future.wait()
    # The same error whoever asks first and whatever the ring says afterwards (the native ring
    # answers "unusable after an earlier failure" when asked again).
    ring_failure[0] = CallFailure(comm.CommClosedError("this ring all-reduce was closed"), None)
    assert work.exception() is timeout and not work.is_success()
    with pytest.raises(comm.CommTimeoutError, match="waiting for rank 1"):
        work.wait()


def test_a_cuda_future_is_completed_on_the_callers_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """Completing a future of CUDA tensors records the event its waiters' streams wait for, on
    the current stream: on the pool's thread that must be the caller's stream (where a view's
    result is written back), not the thread's default one."""
    current = ["the thread's default stream"]

    @contextlib.contextmanager
    def stream(chosen: str) -> Iterator[None]:
        before, current[0] = current[0], chosen
        try:
            yield
        finally:
            current[0] = before

    completed_on: list[str] = []

    class Future(torch.futures.Future):  # type: ignore[type-arg]
        def set_result(self, result: object) -> None:
            completed_on.append(current[0])
            super().set_result(result)

    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStream())
    monkeypatch.setattr(torch.futures, "Future", Future)
    tensor = torch.zeros(3)
    event = _FakeEvent()
    work = CudaRingWork(event, torch.device("cpu"), tensor, tensor, 1, lambda: None)  # type: ignore[arg-type]
    work._call_stream = "the caller's stream"  # type: ignore[assignment]  # a CUDA tensor's
    future = work.get_future()
    event.finished.set()
    assert future.wait()[0] is tensor
    assert completed_on == ["the caller's stream"]


# A timeout as the native ring words it; in these tests, call 5's unless they say otherwise.
_TIMEOUT = "rank 0 (GPU) timed out waiting for rank 1; rank 1 is dead, hung, or not calling"


def _finished_cuda_work(
    monkeypatch: pytest.MonkeyPatch, call: int, failure: CallFailure, captured: bool = False
) -> CudaRingWork:
    """A CudaRingWork of the ring's call number `call`, finished (or captured in a CUDA graph)
    before anyone asks about it; the ring reports `failure` when asked."""
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStream())
    event = None if captured else _FakeEvent()
    if event is not None:
        event.finished.set()
    tensor = torch.zeros(3)
    return CudaRingWork(event, torch.device("cpu"), tensor, tensor, call, lambda: failure)  # type: ignore[arg-type]


def test_a_cuda_ring_call_asked_after_a_later_call_failed_succeeded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Call 4 had ended when call 5 failed; it is first asked about afterwards.
    failure = CallFailure(comm.CommTimeoutError(_TIMEOUT), 5)
    work = _finished_cuda_work(monkeypatch, 4, failure)
    assert work.is_success() and work.exception() is None
    assert work.wait() and work.get_future().wait()[0] is work.result()[0]


def test_the_failing_cuda_ring_call_reports_the_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    failure = CallFailure(comm.CommTimeoutError(_TIMEOUT), 5)
    work = _finished_cuda_work(monkeypatch, 5, failure)
    assert work.exception() is failure.error and not work.is_success()
    with pytest.raises(comm.CommTimeoutError) as error:
        work.wait()
    assert str(error.value) == _TIMEOUT


def test_a_cuda_ring_call_after_the_failing_one_did_not_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Call 6 found the ring aborted by call 5 and returned at once: an error, never success.
    failure = CallFailure(comm.CommTimeoutError(_TIMEOUT), 5)
    work = _finished_cuda_work(monkeypatch, 6, failure)
    expected = f"call 6 of the ring) did not run: call 5 failed before it: {_TIMEOUT}"
    assert not work.is_success()
    assert isinstance(work.exception(), comm.CommTimeoutError)
    assert expected in str(work.exception())
    for wait in (work.wait, work.get_future().wait):
        with pytest.raises(comm.CommTimeoutError) as error:
            wait()
        assert expected in str(error.value)


@pytest.mark.parametrize("failed", [3, 5, 7])
def test_a_captured_cuda_ring_call_is_an_error_after_any_failure(
    monkeypatch: pytest.MonkeyPatch, failed: int
) -> None:
    # Captured as call 5: its replays run before and after any other call, so a failure of
    # another call, earlier or later, may have kept a replay from running.
    failure = CallFailure(comm.CommTimeoutError(_TIMEOUT), failed)
    work = _finished_cuda_work(monkeypatch, 5, failure, captured=True)
    assert work.is_completed() and not work.is_success()
    error = work.exception()
    assert isinstance(error, comm.CommTimeoutError)
    if failed == 5:
        assert error is failure.error
    else:
        assert f"replays after call {failed} failed: {_TIMEOUT}" in str(error)


@pytest.mark.parametrize(
    "timeout, error, message",
    [(-1.0, ValueError, r"^timeout must be a finite number > 0, got -1.0"),
     (float("nan"), ValueError, r"^timeout must be a finite number > 0, got nan"),
     (1e20, ValueError, r"^timeout must be at most 4.61e\+09 s \(torch.distributed keeps"),
     (datetime.timedelta(seconds=-1), ValueError, r"^timeout must be a finite number > 0"),
     (True, TypeError, r"^timeout must be a datetime.timedelta or a number of seconds")],
)  # fmt: skip
def test_a_wait_refuses_a_timeout_that_is_no_duration_by_name(
    timeout: object, error: type[Exception], message: str
) -> None:
    """wait() took a negative timeout as one that had run out, and raised Python's own
    ValueError (nan) or OverflowError (past a timedelta's range), naming nothing."""
    done: Future[None] = Future()
    done.set_result(None)
    work = RingWork(done, torch.ones(2))
    with pytest.raises(error, match=message):
        work.wait(timeout)  # type: ignore[arg-type]
    # No bound (None, zero as torch's default), or any real number of seconds, numpy's too.
    for fine in (None, 0, datetime.timedelta(0), 5, np.float32(0.5), np.int64(2)):
        assert work.wait(fine)  # type: ignore[arg-type]
