"""fastpar: fused Triton LSTM kernels, a native ring all-reduce, and data- and model-parallel
executors for training recurrent models with PyTorch.

Importing fastpar needs only torch: Triton, CUDA and the C++ compiler are used (and their
absence reported) by the features that need them, when they are first used.
"""

from __future__ import annotations

__version__ = "0.1.0"
