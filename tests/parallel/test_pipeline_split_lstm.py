"""A zero-bubble pipeline of fastpar LSTMs (backend="triton", in the interpreter on CPU) against
single-process training: with the recurrences' W_hh gradients deferred to the weight passes,
every parameter's gradient and the loss equal those of the whole model on the whole batch,
and no stage reports W_hh as computed in its input pass."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from torch import nn

from fastpar.nn import LSTM
from fastpar.parallel.pipeline import OutputOnly, Pipeline, split_sequential
from fastpar.testing.distributed import run_multiprocess

T, B, IN, H, OUT = 4, 6, 3, 5, 2
MICROBATCHES = 3
CUTS = [2]  # stage 0: Linear, LSTM; stage 1: bidirectional LSTM, Linear
RTOL, ATOL = 1e-5, 1e-6  # float32; micro-batching changes only the order of summation


def _model() -> nn.Sequential:
    torch.manual_seed(7)
    return nn.Sequential(
        nn.Linear(IN, H),
        OutputOnly(LSTM(H, H, num_layers=2, backend="triton")),
        OutputOnly(LSTM(H, H, bidirectional=True, backend="triton")),
        nn.Linear(2 * H, OUT),
    )


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return torch.randn(T, B, IN, generator=generator), torch.randn(T, B, OUT, generator=generator)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _run(rank: int, world_size: int) -> dict[str, Any]:
    said = _Collect()
    split_logger = logging.getLogger("fastpar.parallel.pipeline.split_backward")
    split_logger.addHandler(said)
    split_logger.setLevel(logging.INFO)
    stage = split_sequential(_model(), CUTS)[rank]
    pipe = Pipeline(
        stage, stage_index=rank, num_stages=world_size, loss_fn=nn.MSELoss(),
        schedule="zero-bubble", num_microbatches=MICROBATCHES, batch_dim=1, timeout_s=120,
    )  # fmt: skip
    inputs, targets = _data()
    loss = pipe.step(inputs, targets)
    grads = {n: p.grad.numpy() for n, p in stage.named_parameters()}
    return {"loss": None if loss is None else loss.item(), "grads": grads, "said": said.messages}


def test_zero_bubble_lstm_pipeline_matches_single_process() -> None:
    model = _model()
    inputs, targets = _data()
    loss = nn.MSELoss()(model(inputs), targets)
    loss.backward()
    stages = split_sequential(model, CUTS)
    results = run_multiprocess(_run, 2, timeout=300)
    for rank, result in enumerate(results):
        want = dict(stages[rank].named_parameters())
        assert result["grads"].keys() == want.keys()
        for name, got in result["grads"].items():
            torch.testing.assert_close(
                torch.from_numpy(got), want[name].grad, rtol=RTOL, atol=ATOL, msg=name
            )
        # The stage's one report lists what its input pass computed: the LSTMs' summed
        # biases (b_ih + b_hh is not a leaf), never W_hh.
        said = [m for m in result["said"] if "no weight-gradient split" in m]
        assert len(said) == 1 and "bias_hh" in said[0] and "weight_hh" not in said[0], said
    assert results[0]["loss"] is None
    assert results[1]["loss"] == pytest.approx(loss.item(), rel=RTOL)
