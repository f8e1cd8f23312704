"""torch.compile(fullgraph=True) of models containing fastpar.nn.LSTM (and GRU and RNN), forward
and backward.

On CPU this runs Inductor (C++ codegen for the surrounding ops) with the fastpar custom ops as
opaque calls (into the Triton interpreter, or torch's own LSTM kernels for backend "torch",
which dynamo would graph-break on as torch.nn.LSTM): it proves the graph has no break
(fullgraph=True raises on one), that the fake implementations give the right shapes, and that
the registered autograd formula gives the eager gradients. Inductor's CUDA code generation
around the ops is exercised only on a GPU (the gpu-marked test below).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastpar.nn
from tests.ops.lstm_helpers import FP32_ATOL, FP32_RTOL, assert_close, randn


class _Tagger(torch.nn.Module):
    def __init__(self, backend: str) -> None:
        super().__init__()
        self.rnn = fastpar.nn.LSTM(6, 17, num_layers=2, bidirectional=True, backend=backend)
        self.rnn2: torch.nn.Module | None = None
        if backend == "torch":
            # The first LSTM runs oneDNN (whose workspace has a size known only at run time),
            # this one, with a projection, the recompute path.
            self.rnn2 = fastpar.nn.LSTM(34, 9, bidirectional=True, proj_size=4, backend=backend)
        self.head = torch.nn.Linear(8 if self.rnn2 is not None else 34, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, (h_n, c_n) = self.rnn(x)
        if self.rnn2 is not None:
            out, _ = self.rnn2(out)
        return self.head(torch.tanh(out)).sum() + h_n.square().sum() + c_n.sum()


class _GRUTagger(torch.nn.Module):
    """A GRU (bidirectional, two layers) feeding a relu RNN and a GRU cell."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.gru = fastpar.nn.GRU(6, 17, num_layers=2, bidirectional=True, backend=backend)
        self.rnn = fastpar.nn.RNN(34, 9, nonlinearity="relu", backend=backend)
        self.cell = fastpar.nn.GRUCell(9, 5, backend=backend)
        self.head = torch.nn.Linear(9, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, h_n = self.gru(x)
        out, h_rnn = self.rnn(out)
        h = self.cell(out[-1])
        return self.head(torch.tanh(out)).sum() + h_n.square().sum() + h_rnn.sum() + h.sum()


def _check_compiled_matches_eager(
    device: str, backend: str = "triton", model_type: type[torch.nn.Module] = _Tagger
) -> None:
    torch.manual_seed(0)
    model = model_type(backend).to(device)
    x = randn(5, 3, 6, seed=1).float().to(device)
    eager_loss = model(x)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)
    loss = compiled(x)
    got_grads = torch.autograd.grad(loss, list(model.parameters()))
    assert_close(loss, eager_loss, FP32_ATOL, FP32_RTOL, "loss")
    for (name, _), a, b in zip(model.named_parameters(), got_grads, eager_grads, strict=True):
        assert_close(a, b, FP32_ATOL, FP32_RTOL, "d " + name)
    with torch.no_grad():  # inference: no oneDNN workspace kept, same result
        assert_close(compiled(x), eager_loss, FP32_ATOL, FP32_RTOL, "loss without grad")


def test_torch_compile_fullgraph_forward_backward_cpu() -> None:
    torch._dynamo.reset()
    _check_compiled_matches_eager("cpu")


def test_torch_compile_fullgraph_torch_backend_cpu() -> None:
    torch._dynamo.reset()
    _check_compiled_matches_eager("cpu", "torch")


@pytest.mark.gpu
def test_torch_compile_fullgraph_forward_backward_cuda(cudnn_fp32_ieee: None) -> None:
    torch._dynamo.reset()
    _check_compiled_matches_eager("cuda")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph_gru_and_rnn_cpu(backend: str) -> None:
    torch._dynamo.reset()
    _check_compiled_matches_eager("cpu", backend, _GRUTagger)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_torch_compile_fullgraph_gru_and_rnn_cuda(backend: str, cudnn_fp32_ieee: None) -> None:
    # float32: "auto" compiles torch's kernels (cuDNN) inside fastpar's ops, "triton" the kernels;
    # without TF32 in cuDNN, so eager (cuDNN's backward) and compiled (the ops') agree closely.
    torch._dynamo.reset()
    _check_compiled_matches_eager("cuda", backend, _GRUTagger)


@pytest.mark.gpu
def test_torch_compile_fullgraph_lstm_auto_cuda(cudnn_fp32_ieee: None) -> None:
    # auto on float32 CUDA: torch's LSTM kernels (cuDNN) inside fastpar's op, no graph break.
    torch._dynamo.reset()
    _check_compiled_matches_eager("cuda", "auto")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph_packed_input_cpu(backend: str) -> None:
    # torch's pad_packed_sequence is skipped by dynamo (a graph break); the modules' own
    # conversion of a PackedSequence compiles.
    torch._dynamo.reset()
    torch.manual_seed(0)
    lstm = fastpar.nn.LSTM(6, 5, num_layers=2, bidirectional=True, backend=backend)
    lengths = torch.tensor([3, 7, 1, 5])
    packed = pack_padded_sequence(randn(7, 4, 6, seed=2).float(), lengths, enforce_sorted=False)

    def loss(model: torch.nn.Module) -> torch.Tensor:
        out, (h_n, c_n) = model(packed)
        return out.data.square().sum() + h_n.square().sum() + c_n.sum()

    eager_loss = loss(lstm)
    eager_grads = torch.autograd.grad(eager_loss, list(lstm.parameters()))
    compiled_loss = loss(torch.compile(lstm, fullgraph=True))
    got_grads = torch.autograd.grad(compiled_loss, list(lstm.parameters()))
    assert_close(compiled_loss, eager_loss, FP32_ATOL, FP32_RTOL, "loss")
    for (name, _), a, b in zip(lstm.named_parameters(), got_grads, eager_grads, strict=True):
        assert_close(a, b, FP32_ATOL, FP32_RTOL, "d " + name)
