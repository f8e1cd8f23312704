"""The CUDA ring's host-side logic that needs no GPU, with fakes for torch.cuda and the native
transport (the GPU itself: tests/comm/test_ring_cuda.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from fastpar.comm import RingAllReduce


def test_a_capture_is_looked_for_on_the_rings_device(monkeypatch: pytest.MonkeyPatch) -> None:
    # cuda:1 captures a graph while cuda:0 is the current device: the native call captures the
    # kernel (it looks at cuda:1's current stream), so no event may be recorded or waited for.
    current = {"index": 0}

    @contextlib.contextmanager
    def device(where: torch.device) -> Iterator[None]:
        before, current["index"] = current["index"], torch.device(where).index
        try:
            yield
        finally:
            current["index"] = before

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: current["index"] == 1)

    class Transport:
        def all_reduce(self, tensor: torch.Tensor, code: int, block_current_stream: bool) -> None:
            pass

    ring = object.__new__(RingAllReduce)
    ring.device = torch.device("cuda", 1)
    ring._transport, ring._native_errors, ring._stream = Transport(), (), object()
    work = ring._run_cuda(torch.ones(4), 0, async_op=True)
    assert work is not None and work._event is None
    assert work.is_completed()


def test_close_waits_for_replays_of_captured_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    # A captured call replays on the caller's stream, not the ring's: close() must wait for the
    # device before the peers' buffers are unmapped (stop) and its own freed.
    steps: list[str] = []
    monkeypatch.setattr(torch.cuda, "device", lambda where: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: steps.append("sync"))

    class Transport:
        def all_reduce(self, tensor: torch.Tensor, code: int, block_current_stream: bool) -> None:
            steps.append("captured")

        def stop(self) -> None:
            steps.append("stop")

        def free(self) -> None:
            steps.append("free")

    class Store:
        def set(self, key: str, value: str) -> None:
            pass

    ring = object.__new__(RingAllReduce)
    ring.device, ring.rank, ring.world_size = torch.device("cuda", 0), 0, 2
    ring._transport, ring._native_errors, ring._stream = Transport(), (), object()
    ring._closed, ring._captured, ring._executor = False, False, None
    ring._store, ring._prefix = Store(), "test"
    ring._store_wait = lambda store, keys, what: None  # type: ignore[method-assign]
    ring._run_cuda(torch.ones(4), 0, async_op=False)
    ring.close()
    assert steps == ["captured", "sync", "stop", "free"]
