"""fastpar: fused Triton LSTM kernels, a native ring all-reduce, and data- and model-parallel
executors for training recurrent models with PyTorch.

Importing fastpar needs only torch: Triton, CUDA and the C++ compiler are used (and their
absence reported) by the features that need them, when they are first used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = ("comm", "data", "nn", "ops", "parallel", "profiling", "training")


def __getattr__(name: str) -> Any:
    # `import fastpar; fastpar.nn.LSTM(...)` works without importing every submodule (and
    # their dependencies) up front.
    if name in _SUBMODULES:
        return importlib.import_module(f"fastpar.{name}")
    raise AttributeError(f"module 'fastpar' has no attribute {name!r}")
