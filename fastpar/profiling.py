"""Profiling ranges shared by every layer of fastpar.

`record_range(name)` opens a `torch.profiler.record_function` range (seen in torch.profiler
and Chrome traces) while a torch profiler runs, and, when CUDA is initialised and an NVTX tool
is attached, an NVTX range of the same name (seen in Nsight Systems with
`nsys profile -t cuda,nvtx`). With neither, it costs well under a microsecond: ranges sit on
per-micro-batch paths, where `record_function`'s own ~6 us (it enters a torch op even when
nobody listens) would show, and callers that ask `ranges_recorded()` take faster paths that
open no ranges at all. `range_name(...)` builds a range's name once, for paths that name their
ranges per call.
"""

from __future__ import annotations

import ctypes
import functools
import os
from types import TracebackType

import torch


@functools.cache  # NVTX itself decides once, at its first call
def nvtx_tool_attached() -> bool:
    """Whether an NVTX tool (Nsight Systems, Nsight Compute, a CUPTI-based profiler) receives
    this process's NVTX ranges. NVTX asks the same two questions and, with no to both, makes
    every call a no-op: does NVTX_INJECTION64_PATH name a tool library (nsys and ncu set it in
    the processes they launch), or does a library already loaded export the tool entry point?"""
    if os.environ.get("NVTX_INJECTION64_PATH"):
        return True
    try:
        loaded = ctypes.CDLL(None)  # the process's global symbols, as NVTX's dlsym sees them
    except (OSError, TypeError):  # no such handle on this platform (Windows)
        return False
    return hasattr(loaded, "InitializeInjectionNvtx2")


def _nvtx_recorded() -> bool:
    # Never initialise CUDA just to name a range: ranges must be free on CPU-only runs (and
    # is_initialized is False wherever CUDA is unavailable).
    return nvtx_tool_attached() and torch.cuda.is_initialized()


def ranges_recorded() -> bool:
    """Whether `record_range` records anything now (a torch profiler runs, or CUDA is
    initialised and an NVTX tool attached): a caller that opens many ranges can ask once and
    skip them all."""
    return _nvtx_recorded() or torch._C._autograd._profiler_enabled()


@functools.cache  # a run's names are few; one lookup per call, not a replace and a format
def range_name(*parts: str) -> str:
    """The range named `fastpar.<part>.<part>...`, without spaces: `range_name("pp", "send",
    "activation 3")` is "fastpar.pp.send.activation3"."""
    return ".".join(("fastpar", *parts)).replace(" ", "")


class record_range:  # lower case, like torch.profiler.record_function
    """Mark a named range for torch.profiler and, on CUDA with an NVTX tool attached, for NVTX:
    `with record_range(name):`."""

    __slots__ = ("_function", "_nvtx", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._function: torch.profiler.record_function | None = None
        self._nvtx = False

    def __enter__(self) -> record_range:
        self._nvtx = _nvtx_recorded()
        if self._nvtx:
            torch.cuda.nvtx.range_push(self.name)
        # The profiler's own switch (what record_function consults), read without entering an op.
        if torch._C._autograd._profiler_enabled():
            self._function = torch.profiler.record_function(self.name)
            self._function.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._function is not None:
            self._function.__exit__(kind, error, traceback)
            self._function = None
        if self._nvtx:
            torch.cuda.nvtx.range_pop()
