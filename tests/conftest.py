"""Test-wide setup: the Triton interpreter on machines without a GPU, and the gpu/slow markers.

TRITON_INTERPRET must be set before triton is first imported, which is why it happens here, at
conftest import time, before any test module (and so fastpar.ops) is collected.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A fresh Inductor cache per run: a graph cached on disk by an earlier version of a custom op
# must not be replayed against the current one.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fastpar-inductor-"))


def pytest_sessionstart(session: pytest.Session) -> None:
    # Build the native extension once, before any test spawns ranks: a first build inside a
    # multi-process test would count against that test's time bound. A build error is left
    # for the tests that use the extension to report.
    from fastpar import _native

    with contextlib.suppress(_native.NativeBuildError):
        _native.build()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is visible to torch")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
