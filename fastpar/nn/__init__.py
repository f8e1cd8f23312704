"""Modules: drop-in replacements for torch.nn recurrent layers backed by fastpar's kernels."""

from __future__ import annotations

from fastpar.nn.lstm import LSTM, LSTMCell

__all__ = ["LSTM", "LSTMCell"]
