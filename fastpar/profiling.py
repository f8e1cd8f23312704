"""Profiling ranges shared by every layer of fastpar.

`record_range(name)` opens a `torch.profiler.record_function` range (seen in torch.profiler
and Chrome traces) and, when CUDA is initialised, an NVTX range of the same name (seen in Nsight
Systems with `nsys profile -t cuda,nvtx`). Both cost next to nothing when no profiler listens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def _cuda_ready() -> bool:
    # Never initialise CUDA just to name a range: ranges must be free on CPU-only runs.
    return torch.cuda.is_available() and torch.cuda.is_initialized()


@contextlib.contextmanager
def record_range(name: str) -> Iterator[None]:
    """Mark a named range for torch.profiler and, on CUDA, for NVTX."""
    nvtx = _cuda_ready()
    if nvtx:
        torch.cuda.nvtx.range_push(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if nvtx:
            torch.cuda.nvtx.range_pop()
