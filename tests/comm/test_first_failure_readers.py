"""A CUDA ring's first failure keeps its type when another thread asks about it while a call
is being told it: the native ring tells a failure once, to whichever asks first, and says only
"unusable after an earlier failure" (RingClosedError) from then on. With fakes for torch.cuda
and the native transport, which keeps that contract (csrc/ipc_ring_glue.cpp's `check`); a
reader asks in the window where the call's native `check` has been told but its error has not
reached Python yet (a real one: `agree_torch_path` releases the GIL, and threads switch between
bytecodes)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from fastpar import _native
from fastpar.comm import CommError, CommTimeoutError, RingAllReduce
from fastpar.comm.errors import native_error_types
from fastpar.comm.work import CudaRingWork
from tests.cuda_fakes import ring_on_fakes

TIMEOUT = "rank 0 (GPU) timed out waiting for rank 1; rank 1 is dead, hung, or not calling"
WAIT_S = 60.0  # bound on a thread's wait (a failure, not a slow machine)


class _Transport:
    """The native CUDA ring whose device failed call 2 (a timeout); `during_report` runs on
    the thread of the native call that is told the failure, once it has been told and before
    its error leaves the native call."""

    def __init__(self, during_report: Any) -> None:
        self.native = _native.load()
        self.during_report = during_report
        self.calls = 0
        self.failed_call = -1
        self.failure = ""

    def all_reduce(self, tensor: torch.Tensor, code: int, block_current_stream: bool) -> int:
        self.check()
        self.calls += 1
        return self.calls

    def agree_torch_path(self, tensor: torch.Tensor, op: int) -> None:
        self.check()

    def check(self) -> None:
        if self.failure:
            raise self.native.RingClosedError(
                f"this ring all-reduce is unusable after an earlier failure: {self.failure}"
            )
        if self.calls >= 2:  # the device has failed call 2: told once
            self.failed_call, self.failure = 2, TIMEOUT
            self.during_report()
            raise self.native.RingTimeoutError(TIMEOUT)


def _ask_while_told(
    monkeypatch: pytest.MonkeyPatch, ring_call: Any
) -> tuple[BaseException | None, BaseException, RingAllReduce, CudaRingWork]:
    """Make calls 1 and 2, then `ring_call(ring)`, which is told the device's failure; while
    it is, another thread asks `ring.check()`. Returns what the other thread's check raised,
    what `ring_call` raised, the ring and call 2's handle."""
    asked = threading.Event()
    answers: list[BaseException | None] = []

    def ask() -> None:
        try:
            ring.check()
            answers.append(None)
        except CommError as error:
            answers.append(error)

    reader = threading.Thread(target=ask)

    def during_report() -> None:
        reader.start()
        asked.wait(WAIT_S)  # until the reader has asked the native ring

    transport = _Transport(during_report)
    native_check = transport.check

    def check() -> None:
        if threading.current_thread() is reader:
            asked.set()
        native_check()

    transport.check = check  # type: ignore[method-assign]
    ring = ring_on_fakes(monkeypatch, transport, native_error_types(transport.native))
    ring._last = None  # no CPU call queued
    works = [ring._run_cuda(torch.ones(4), 0, async_op=True) for _ in range(2)]
    with pytest.raises(CommError) as raised:
        ring_call(ring)
    reader.join(WAIT_S)
    assert not reader.is_alive() and asked.is_set()
    assert works[1] is not None
    return answers[0], raised.value, ring, works[1]


CALLS = {
    "all_reduce": lambda ring: ring._run_cuda(torch.ones(4), 0, async_op=True),
    "torch path": lambda ring: ring._announce_torch_path(torch.ones(4), 0, "an int8 tensor"),
}


@pytest.mark.parametrize("told", CALLS)
def test_a_timeout_stays_the_first_failure_for_a_reader_asking_meanwhile(
    monkeypatch: pytest.MonkeyPatch, told: str
) -> None:
    """The reader was answered "unusable after an earlier failure" and kept that
    CommClosedError as the ring's first failure; the call's own timeout, kept after it, was
    dropped, so every later check() and call 2's handle raised CommClosedError, which an
    `except TimeoutError` misses."""
    answer, raised, ring, failed = _ask_while_told(monkeypatch, CALLS[told])
    assert isinstance(raised, CommTimeoutError) and str(raised) == TIMEOUT
    assert isinstance(answer, CommTimeoutError) and str(answer) == TIMEOUT
    for _ in range(2):
        with pytest.raises(CommTimeoutError, match="timed out waiting for rank 1"):
            ring.check()
    failure = ring._device_failure.read_call_failure() if ring._device_failure else None
    assert failure is not None and failure.call == 2
    assert isinstance(failed.exception(), CommTimeoutError)
    with pytest.raises(CommTimeoutError, match="timed out waiting for rank 1"):
        failed.wait()
