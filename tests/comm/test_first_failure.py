"""A CUDA ring call that fails on the host once it has its number (its kernel launch): the
ring's first failure names that call, so the calls before it still succeed, and none after it
runs. With fakes for torch.cuda and the native transport, which keeps the native ring's
contract (csrc/ipc_ring_glue.cpp: the launch raises RuntimeError, and from then on `check`
raises "unusable after an earlier failure" and `failed_call` names the call, unless the device
had failed an earlier call first); the GPU itself: tests/comm/test_ring_cuda.py."""

from __future__ import annotations

import pytest
import torch

from fastpar import _native
from fastpar.comm import CommClosedError, CommTimeoutError, RingAllReduce
from fastpar.comm.errors import native_error_types
from tests.cuda_fakes import ring_on_fakes

LAUNCH_ERROR = "CUDA IPC all-reduce: the all-reduce kernel launch failed: invalid argument"
TIMEOUT = "rank 0 (GPU) timed out waiting for rank 1"


class _Transport:
    """The native CUDA ring as the host sees it: call `launch_fails` takes its number and then
    fails to launch; `device_fails` (0: none) is an earlier call that the device fails, its
    report written once the ring's stream is drained after the failed launch."""

    def __init__(self, launch_fails: int, device_fails: int = 0) -> None:
        self.native = _native.load()
        self.launch_fails, self.device_fails = launch_fails, device_fails
        self.calls = 0
        self.reported = 0  # the call the device's report names (0: none yet)
        self.failed_call = -1
        self.failure = ""

    def all_reduce(self, tensor: torch.Tensor, code: int, block_current_stream: bool) -> int:
        self.check()
        self.calls += 1
        if self.calls == self.launch_fails:
            self.reported = self.device_fails  # the stream drained: the device's report stands
            if not self.reported:
                self.failed_call = self.calls
                self.failure = f"call {self.calls} of the ring failed on rank 0's host"
            raise RuntimeError(LAUNCH_ERROR)
        return self.calls

    def check(self) -> None:
        if self.failure:
            raise self.native.RingClosedError(
                f"this ring all-reduce is unusable after an earlier failure: {self.failure}"
            )
        if self.reported:
            self.failed_call, self.failure = self.reported, TIMEOUT
            raise self.native.RingTimeoutError(TIMEOUT)


def _ring(monkeypatch: pytest.MonkeyPatch, transport: _Transport) -> RingAllReduce:
    return ring_on_fakes(monkeypatch, transport, native_error_types(transport.native))


def test_calls_before_a_failed_launch_succeed_and_none_after_it_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ring = _ring(monkeypatch, _Transport(launch_fails=3))
    first, second = (ring._run_cuda(torch.ones(4), 0, async_op=True) for _ in range(2))
    with pytest.raises(RuntimeError, match="kernel launch failed"):
        ring._run_cuda(torch.ones(4), 0, async_op=True)
    assert first is not None and second is not None
    assert first.wait() and second.wait()  # waited after the failure: they had ended before
    assert first.is_success() and second.exception() is None
    failure = ring._device_failure.read_call_failure() if ring._device_failure else None
    assert failure is not None and failure.call == 3
    with pytest.raises(CommClosedError, match="call 3 of the ring failed on rank 0's host"):
        ring.check()
    with pytest.raises(CommClosedError, match="unusable after an earlier failure"):
        ring._run_cuda(torch.ones(4), 0, async_op=True)


def test_a_device_failure_before_a_failed_launch_stays_the_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The device failed call 2 (a timeout) while the host enqueued call 3, whose launch failed:
    # call 2 is the failure, call 1 succeeded.
    ring = _ring(monkeypatch, _Transport(launch_fails=3, device_fails=2))
    first = ring._run_cuda(torch.ones(4), 0, async_op=True)
    failed = ring._run_cuda(torch.ones(4), 0, async_op=True)
    with pytest.raises(RuntimeError, match="kernel launch failed"):
        ring._run_cuda(torch.ones(4), 0, async_op=True)
    assert first is not None and failed is not None
    with pytest.raises(CommTimeoutError) as error:
        failed.wait()
    assert str(error.value) == TIMEOUT
    assert first.wait() and first.is_success()
