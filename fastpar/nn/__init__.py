"""Modules: drop-in replacements for torch.nn recurrent layers backed by fastpar's kernels."""

from __future__ import annotations

from fastpar.nn.lstm import LSTM, LSTMCell
from fastpar.nn.rnn import GRU, RNN, GRUCell, RNNCell

__all__ = ["GRU", "LSTM", "RNN", "GRUCell", "LSTMCell", "RNNCell"]
