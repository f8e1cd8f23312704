"""The typed surface of fastpar's native extension (`csrc/bindings.cpp`), as `_native.load()`
returns it: what Python may call, with the argument names the bindings declare.

Booleans and configuration are keyword-only in the bindings where this package is the only
caller; exception types are attributes, matched by type (`fastpar.comm.errors`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch


class ShmAllReduce(Protocol):
    """All-reduce of CPU tensors through one POSIX shared-memory segment (`csrc/shm_ring.h`).

    Constructed as `ShmAllReduce(name=..., create=..., rank=..., world=..., slots=...,
    chunk_bytes=..., timeout_s=...)`: rank 0 creates the segment `name`, the others open it.
    """

    @property
    def closed(self) -> bool: ...
    @property
    def failure(self) -> str: ...
    def unlink(self) -> None: ...
    def all_reduce(self, tensor: torch.Tensor, op: int) -> None: ...
    def register_area(self, areas: list[torch.Tensor]) -> int: ...
    def agree_torch_path(self, tensor: torch.Tensor, op: int) -> None: ...
    def close(self) -> None: ...


class IpcAllReduce(Protocol):
    """All-reduce of CUDA tensors through CUDA IPC (`csrc/ipc_ring.cu`), one kernel per call
    on its own stream.

    Constructed as `IpcAllReduce(rank=..., world=..., device=..., chunk_bytes=...,
    timeout_s=...)`.
    """

    @property
    def buffer_address(self) -> int: ...
    @property
    def stream_handle(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    @property
    def failure(self) -> str: ...
    def handle(self) -> torch.Tensor: ...
    def connect(self, handles: list[torch.Tensor]) -> None: ...
    def connect_local(self, addresses: list[int]) -> None: ...
    def all_reduce(self, tensor: torch.Tensor, op: int, *, block_current_stream: bool) -> None: ...
    def agree_torch_path(self, tensor: torch.Tensor, op: int) -> None: ...
    def watch_peers(self, pids: list[int]) -> None: ...
    def check(self) -> None: ...
    def stop(self) -> None: ...
    def free(self) -> None: ...
    def close(self) -> None: ...


class PeerWatchdog(Protocol):
    """A thread that checks the pids of `pids` (rank -> pid; <= 0: not watched) every
    `period_s` and keeps the first rank found gone (`csrc/process.h`); constructed as
    `PeerWatchdog(pids=..., period_s=...)`. The CUDA ring runs one per endpoint."""

    @property
    def culprit(self) -> int: ...


class ShmTensorPipe(Protocol):
    """One endpoint of a shared-memory pipe of CPU tensors between two processes
    (`csrc/shm_pipe.h`); constructed as `ShmTensorPipe(name, create, capacity, timeout_s, *,
    max_dims=64, dtypes=[])` (send refuses more dimensions or another dtype; `[]`: any)."""

    @property
    def closed(self) -> bool: ...
    @property
    def failure(self) -> str: ...
    @property
    def deferred_sends(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    def unlink(self) -> None: ...
    def connect(self) -> None: ...
    def send(self, tensor: torch.Tensor) -> None: ...
    def flush(self) -> int: ...  # the sends still deferred (deferred_sends)
    def recv(self, what: str, leaf: bool = False) -> torch.Tensor: ...
    def abort(self, text: str) -> None: ...
    def close(self) -> None: ...
    def calls(
        self, on_error: Callable[[Exception, str, object], BaseException]
    ) -> tuple[Callable[..., None], Callable[..., torch.Tensor], Callable[..., None]]: ...


class NativeModule(Protocol):
    """The extension module."""

    __file__: str
    with_cuda: bool
    PIPE_ABORT_TEXT_BYTES: int
    RingTimeoutError: type[Exception]
    RingMismatchError: type[Exception]
    RingClosedError: type[Exception]
    PipeAbortedError: type[Exception]
    PipeBrokenError: type[Exception]
    ShmAllReduce: type[ShmAllReduce]
    IpcAllReduce: type[IpcAllReduce]  # only where with_cuda
    ShmTensorPipe: type[ShmTensorPipe]
    PeerWatchdog: type[PeerWatchdog]

    def reduce_buffers_cpu(
        self, inputs: list[torch.Tensor], out: torch.Tensor, op: int
    ) -> None: ...

    def reduce_buffers_cuda(
        self, inputs: list[torch.Tensor], out: torch.Tensor, op: int
    ) -> None: ...

    def remove_shared_segment(self, name: str) -> None: ...
