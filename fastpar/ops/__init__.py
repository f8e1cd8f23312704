"""Recurrent operators (LSTM, GRU, Elman RNN): the pure-PyTorch references (``reference``,
``rnn_reference``), torch's native LSTM kernels in a custom op (``lstm_aten``, no Triton), and
the Triton kernels.

The Triton modules serve every cell: the cell ("lstm", "gru", "rnn_tanh", "rnn_relu") is a
compile-time parameter of one shared step body, so the GRU and RNN run the LSTM's drivers and
launchers. They import one way, each only from those above it:

    lstm_jit         the cells' math, tile layout, dot, grid barrier (@triton.jit helpers)
    lstm_config      tiles, kernel choice, dot precision, gates per cell (no kernels)
    lstm_step        the per-step bodies and the step kernels
    lstm_persistent  the persistent kernels (the same bodies in a loop over time)
    lstm_forward, lstm_backward   launchers: shapes, allocation, grid
    lstm_op          the LSTM's custom ops with autograd: ``lstm_recurrence_triton``
    rnn_op           the GRU's and RNN's: ``gru_recurrence_triton``, ``rnn_recurrence_triton``
    lstm_compile_cases            the configurations the launchers choose, for sm_90 reports

They import Triton and are imported by their callers when needed, so ``import fastpar.ops``
works where Triton does not.
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
