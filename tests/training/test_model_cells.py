"""build_model for each recurrent cell: the layout pipelines cut, torch's results with the same
weights, seeded initial weights and gradients through every layer."""

from __future__ import annotations

import pytest
import torch

import fastpar.nn
from fastpar.parallel import OutputOnly, split_sequential
from fastpar.training.model import build_model
from fastpar.training.state import seed_rank_streams
from tests.ops.lstm_helpers import FP32_ATOL, FP32_RTOL, assert_close

VOCAB, EMBED, HIDDEN, LAYERS = 23, 8, 12, 2
# cell: (fastpar's module, torch's module with the same parameters)
CELLS = {
    "lstm": (fastpar.nn.LSTM, torch.nn.LSTM),
    "gru": (fastpar.nn.GRU, torch.nn.GRU),
    "rnn": (fastpar.nn.RNN, torch.nn.RNN),
}


def _build(cell: str, seed: int = 3) -> torch.nn.Sequential:
    return build_model(vocab=VOCAB, embed=EMBED, hidden=HIDDEN, layers=LAYERS, backend="torch",
                       seed=seed, cell=cell)  # type: ignore[arg-type]  # fmt: skip


@pytest.mark.parametrize("cell", CELLS)
def test_build_model_matches_torch_layers(cell: str) -> None:
    ours_type, torch_type = CELLS[cell]
    model = _build(cell)
    assert len(model) == LAYERS + 2
    recurrent = [m.module for m in model[1:-1]]
    assert all(isinstance(m, OutputOnly) for m in model[1:-1])
    assert all(type(m) is ours_type and m.batch_first and m.num_layers == 1 for m in recurrent)
    if cell == "rnn":
        assert all(m.nonlinearity == "tanh" for m in recurrent)
    # The same model from torch's modules, with our weights.
    layers: list[torch.nn.Module] = [torch.nn.Embedding(VOCAB, EMBED)]
    for k, ours in enumerate(recurrent):
        theirs = torch_type(EMBED if k == 0 else HIDDEN, HIDDEN, batch_first=True)
        theirs.load_state_dict(ours.state_dict())
        layers.append(OutputOnly(theirs))
    layers.append(torch.nn.Linear(HIDDEN, VOCAB))
    reference = torch.nn.Sequential(*layers)
    reference.load_state_dict(model.state_dict())
    tokens = torch.randint(0, VOCAB, (4, 9))
    logits = model(tokens)
    assert logits.shape == (4, 9, VOCAB)
    assert_close(logits, reference(tokens), FP32_ATOL, FP32_RTOL, "logits")
    logits.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # A pipeline cuts it between any two layers; each stage maps a tensor to a tensor.
    first, second = split_sequential(model, [2])
    assert_close(second(first(tokens)), logits, FP32_ATOL, FP32_RTOL, "split")


@pytest.mark.parametrize("cell", CELLS)
def test_build_model_is_seeded(cell: str) -> None:
    a, b, c = _build(cell, seed=3), _build(cell, seed=3), _build(cell, seed=4)
    state_a, state_b, state_c = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not all(torch.equal(state_a[k], state_c[k]) for k in state_a)


def test_build_model_rejects_an_unknown_cell() -> None:
    with pytest.raises(ValueError, match=r"cell must be one of \('lstm', 'gru', 'rnn'\)"):
        _build("transformer")


def test_build_model_leaves_the_rank_streams_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building seeds no generator but the CPU one it gives back: a rank's CUDA stream, seeded
    before the model is built, stays the rank's (torch.manual_seed would seed every device's)."""
    seed_rank_streams(seed=3, rank=1)
    rank_stream = torch.random.get_rng_state()
    seeded: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", seeded.append)
    _build("lstm")
    assert seeded == []
    assert torch.equal(torch.random.get_rng_state(), rank_stream)
