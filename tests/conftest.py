"""Test-wide setup: the Triton interpreter on machines without a GPU, and the gpu/slow markers.

TRITON_INTERPRET must be set before triton is first imported, which is why it happens here, at
conftest import time, before any test module (and so fastpar.ops) is collected.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is visible to torch")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
