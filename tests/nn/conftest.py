"""Fixtures of the module tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def cudnn_fp32_ieee() -> Iterator[None]:
    """cuDNN's RNNs in IEEE float32 (no TF32) for the test, so that float32 on a GPU is held to
    the float32 tolerances; fastpar's kernels follow the same switch. Restored afterwards."""
    rnn = torch.backends.cudnn.rnn
    saved = rnn.fp32_precision
    rnn.fp32_precision = "ieee"
    yield
    rnn.fp32_precision = saved
