"""The character language model: embedding, a stack of single-layer recurrent modules
(`fastpar.nn.LSTM`, `GRU` or tanh `RNN`) and a linear head, as an `nn.Sequential` so a pipeline
can cut it between any two layers."""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

from fastpar._checks import check_choice
from fastpar.nn import GRU, LSTM, RNN
from fastpar.parallel import OutputOnly

CellName = Literal["lstm", "gru", "rnn"]
CELLS: tuple[str, ...] = get_args(CellName)


def _recurrent_layer(cell: str, size_in: int, hidden: int, backend: str) -> nn.Module:
    """One single-layer, batch-first recurrent module of `cell`'s kind (rnn: tanh)."""
    module_type = {"lstm": LSTM, "gru": GRU, "rnn": RNN}[cell]
    return module_type(size_in, hidden, num_layers=1, batch_first=True, backend=backend)


def build_model(
    *, vocab: int, embed: int, hidden: int, layers: int, backend: str, seed: int,
    cell: CellName = "lstm",
) -> nn.Sequential:  # fmt: skip
    """The same initial weights on every rank (seeded), batch-first.

    Arguments:
        vocab, embed, hidden: sizes of the vocabulary, the embedding and each hidden state.
        layers: recurrent layers, each its own module (so a pipeline can cut between them).
        backend: the recurrent modules' backend ("auto", "triton", "torch", "reference").
        seed: of the initial weights.
        cell: "lstm", "gru" or "rnn" (Elman, tanh).

    Returns:
        nn.Sequential(Embedding, OutputOnly(recurrent module) x layers, Linear): (B, T) int64 ->
        (B, T, vocab) logits.
    """
    check_choice("cell", cell, CELLS)
    # The weights are made on the CPU, from its generator alone: it is seeded for them and given
    # back its state afterwards, and no other generator is touched (torch.manual_seed would
    # also seed every CUDA device's, which holds the rank's own stream).
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        modules: list[nn.Module] = [nn.Embedding(vocab, embed)]
        for layer in range(layers):
            size_in = embed if layer == 0 else hidden
            modules.append(OutputOnly(_recurrent_layer(cell, size_in, hidden, backend)))
        modules.append(nn.Linear(hidden, vocab))
    return nn.Sequential(*modules)


def stage_bounds(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) module ranges of an nn.Sequential of `num_layers` modules, as even
    as possible, one per stage."""
    if num_stages > num_layers:
        raise ValueError(
            f"{num_stages} pipeline stages need a model of at least {num_stages} layers; this "
            f"one has {num_layers} (embedding + recurrent layers + head): add --layers"
        )
    base, extra = divmod(num_layers, num_stages)
    bounds, start = [], 0
    for stage in range(num_stages):
        end = start + base + (1 if stage < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


@torch.no_grad()
def generate(model: nn.Module, prompt: bytes, length: int, context: int, seed: int) -> bytes:
    """Samples `length` bytes after `prompt`, feeding the last `context` bytes each step."""
    generator = torch.Generator().manual_seed(seed)
    data = list(prompt)
    was_training = model.training
    model.eval()
    try:
        for _ in range(length):
            window = torch.tensor([data[-context:]], dtype=torch.int64)
            logits = model(window)[0, -1].float()
            probabilities = torch.softmax(logits / 0.8, dim=-1)
            data.append(int(torch.multinomial(probabilities, 1, generator=generator)))
    finally:
        model.train(was_training)
    return bytes(data[len(prompt) :])
