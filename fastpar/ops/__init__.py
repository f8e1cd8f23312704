"""LSTM operators: the pure-PyTorch reference and the Triton kernels behind it.

Kernel modules (lstm_forward, lstm_backward, lstm_persistent, lstm_function) import Triton and
are imported lazily by their callers, so ``import fastpar.ops`` works where Triton does not.
"""

from __future__ import annotations

import os

from fastpar.ops.reference import (
    LayerWeights,
    input_projection,
    lstm_cell_reference,
    lstm_recurrence_reference,
    lstm_stack,
)


def interpreter_active() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


__all__ = [
    "LayerWeights",
    "input_projection",
    "interpreter_active",
    "lstm_cell_reference",
    "lstm_recurrence_reference",
    "lstm_stack",
]
