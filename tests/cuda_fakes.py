"""Stand-ins for CUDA objects that let CPU tests drive the CUDA ring's host-side logic."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fastpar.comm.errors import FirstFailure
from fastpar.comm.ring import RingAllReduce


class DoneEvent:
    """A CUDA event recorded behind a call that has finished."""

    def record(self, stream: object) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


class _Stream:
    def wait_event(self, event: DoneEvent) -> None:
        pass


def ring_on_fakes(
    monkeypatch: pytest.MonkeyPatch, transport: Any, native_errors: tuple[type[BaseException], ...]
) -> RingAllReduce:
    """A CUDA RingAllReduce on cuda:0 whose native ring is `transport` (its `all_reduce`,
    `check` and `failed_call` as the native IpcAllReduce's), with CUDA's events and streams
    faked: every call has finished by the time it is waited for."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "Event", DoneEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    ring = object.__new__(RingAllReduce)
    ring.device = torch.device("cuda", 0)
    ring._transport, ring._native_errors, ring._stream = transport, native_errors, object()
    ring._device_failure = FirstFailure(
        transport.check, native_errors, lambda: transport.failed_call
    )
    return ring
