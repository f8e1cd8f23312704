"""The split backward of fastpar.nn.LSTM (backend="triton", in the interpreter on CPU): the
input pass gives the gradients of the input and the states and leaves W_hh's for the deferred
weight pass; after it every gradient equals the whole backward's, and the float64 reference's.
With a projection W_hr waits too; the ATen layer declines a projection (its whole backward runs
in the input pass, said once). The same for the Triton GRU and Elman RNN
(fastpar::cell_recurrence), and for backend="torch" (the ATen layer, CPU's default).
"""

from __future__ import annotations

import contextlib
import functools
import logging

import pytest
import torch
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fastpar.nn import LSTM
from fastpar.ops.lstm_op import (
    lstm_recurrence_backward_op,
    lstm_recurrence_op,
    lstm_recurrence_weight_grad,
)
from fastpar.ops.reference import lstm_recurrence_reference
from fastpar.ops.rnn_op import (
    cell_recurrence_backward_op,
    cell_recurrence_op,
    cell_recurrence_weight_grad,
    gru_recurrence_triton,
    rnn_recurrence_triton,
)
from fastpar.ops.rnn_reference import gru_stack, rnn_stack
from fastpar.parallel.pipeline.split_backward import DeferredWeights, weight_split
from tests.ops.lstm_helpers import FP32_ATOL, FP32_RTOL
from tests.ops.test_rnn_reference import _module as _rnn_module
from tests.ops.test_rnn_reference import _weights as _rnn_weights

T, B, IN, H = 5, 3, 4, 6
LENGTHS = torch.tensor([5, 2, 4])  # unsorted, one full, one short
# Split and whole run the same kernels and GEMMs: only the order of a few float32 sums differs.
SPLIT_ATOL, SPLIT_RTOL = 1e-6, 1e-5


def _model(dtype: torch.dtype, backend: str, **kwargs: object) -> LSTM:
    torch.manual_seed(3)
    model = LSTM(IN, H, dtype=torch.float64, backend=backend, **kwargs)  # type: ignore[arg-type]
    return model.to(dtype)


def _gradients(
    model: LSTM, data: dict[str, Tensor], lengths: Tensor | None, split: bool
) -> dict[str, Tensor]:
    """Every gradient of the loss sum(out * g_out) + sum(h_n * g_h) + sum(c_n * g_c), two
    steps accumulated; with `split`, the weights' deferred to the weight passes."""
    dtype = model.weight_hh_l0.dtype
    x, h0, c0 = (data[n].to(dtype, copy=True).requires_grad_() for n in ("x", "h0", "c0"))
    stage = f"stage {model.extra_repr()}"  # the report of unsplit parameters: once per name
    for step in range(2):  # gradients accumulate over two, as over a pipeline's micro-batches
        deferred = DeferredWeights()
        mode = weight_split(model, deferred, stage) if split else contextlib.nullcontext()
        with mode:
            inp = x if lengths is None else pack_padded_sequence(x, lengths, enforce_sorted=False)
            out, (h_n, c_n) = model(inp, (h0, c0))
        if lengths is not None:
            out = pad_packed_sequence(out, total_length=T)[0]
        cotangents = ((out, "g_out"), (h_n, "g_h"), (c_n, "g_c"))
        sum((t * data[g].to(dtype)).sum() for t, g in cotangents).backward()
        if split and step == 0:
            _check_input_pass(model, x, h0, c0)
        deferred.run()
    found = {"x": x.grad, "h0": h0.grad, "c0": c0.grad}
    return found | {n: p.grad for n, p in model.named_parameters()}


def _check_input_pass(model: LSTM, x: Tensor, h0: Tensor, c0: Tensor) -> None:
    """After the input pass: the input and state gradients are there, W_hh's waits (all the
    weights' on the ATen path; the Triton path's biases are summed first, not leaves)."""
    assert x.grad is not None and h0.grad is not None and c0.grad is not None
    if model.proj_size and model.backend == "torch":  # declined: the whole backward ran
        assert all(p.grad is not None for p in model.parameters())
        return
    waiting = [p for n, p in model.named_parameters() if model.backend == "torch" or "weight" in n]
    assert all(p.grad is None for p in waiting)


def _data(model: LSTM) -> dict[str, Tensor]:
    states = model.num_layers * (2 if model.bidirectional else 1)
    out = H * (2 if model.bidirectional else 1)
    shapes = {"x": (T, B, IN), "h0": (states, B, H), "c0": (states, B, H),
              "g_out": (T, B, out), "g_h": (states, B, H), "g_c": (states, B, H)}  # fmt: skip
    return {name: torch.randn(*shape, dtype=torch.float64) for name, shape in shapes.items()}


@pytest.mark.parametrize(
    "num_layers, bidirectional, packed", [(1, False, False), (2, True, False), (1, True, True)]
)
def test_split_backward_equals_whole_backward(
    num_layers: int, bidirectional: bool, packed: bool
) -> None:
    kwargs = {"num_layers": num_layers, "bidirectional": bidirectional}
    lengths = LENGTHS if packed else None
    data = _data(_model(torch.float64, "reference", **kwargs))
    want = _gradients(_model(torch.float64, "reference", **kwargs), data, lengths, split=False)
    whole = _gradients(_model(torch.float32, "triton", **kwargs), data, lengths, split=False)
    split = _gradients(_model(torch.float32, "triton", **kwargs), data, lengths, split=True)
    assert split.keys() == want.keys()
    for name, got in split.items():
        torch.testing.assert_close(got, whole[name], atol=SPLIT_ATOL, rtol=SPLIT_RTOL, msg=name)
        torch.testing.assert_close(
            got.double(), want[name], atol=FP32_ATOL, rtol=FP32_RTOL, msg=name
        )


@pytest.mark.parametrize(
    "dtype, atol, rtol", [(torch.float64, 1e-12, 1e-10), (torch.float32, FP32_ATOL, FP32_RTOL)]
)
@pytest.mark.parametrize("bidirectional, packed", [(False, False), (True, True), (True, False)])
def test_aten_split_backward_equals_whole_backward(
    dtype: torch.dtype, atol: float, rtol: float, bidirectional: bool, packed: bool
) -> None:
    # backend="torch" (CPU's "auto"): a whole backward is torch's (oneDNN's in float32 without
    # lengths), the split one the recomputing backward of fastpar::lstm_aten_layer.
    kwargs = {"num_layers": 2, "bidirectional": bidirectional}
    lengths = LENGTHS if packed else None
    data = _data(_model(torch.float64, "reference", **kwargs))
    want = _gradients(_model(torch.float64, "reference", **kwargs), data, lengths, split=False)
    whole = _gradients(_model(dtype, "torch", **kwargs), data, lengths, split=False)
    split = _gradients(_model(dtype, "torch", **kwargs), data, lengths, split=True)
    for name, got in split.items():
        torch.testing.assert_close(got, whole[name], atol=atol, rtol=rtol, msg=name)
        torch.testing.assert_close(got.double(), want[name], atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("packed", [False, True])
def test_projection_splits_too(packed: bool) -> None:
    kwargs = {"proj_size": 2, "bidirectional": packed}
    lengths = LENGTHS if packed else None
    data = _data(_model(torch.float64, "reference", **kwargs))
    data |= {n: data[n][..., :2].clone() for n in ("h0", "g_h")}  # h has proj_size units
    data["g_out"] = data["g_out"][..., : 2 * (1 + packed)].clone()
    want = _gradients(_model(torch.float64, "reference", **kwargs), data, lengths, split=False)
    whole = _gradients(_model(torch.float32, "triton", **kwargs), data, lengths, split=False)
    split = _gradients(_model(torch.float32, "triton", **kwargs), data, lengths, split=True)
    for name, got in split.items():
        torch.testing.assert_close(got, whole[name], atol=SPLIT_ATOL, rtol=SPLIT_RTOL, msg=name)
        torch.testing.assert_close(
            got.double(), want[name], atol=FP32_ATOL, rtol=FP32_RTOL, msg=name
        )


def test_aten_projection_declines_to_the_whole_backward(caplog: pytest.LogCaptureFixture) -> None:
    kwargs = {"proj_size": 2}
    data = _data(_model(torch.float64, "reference", **kwargs))
    data |= {n: data[n][..., :2].clone() for n in ("h0", "g_out", "g_h")}  # h: proj_size units
    whole = _gradients(_model(torch.float32, "torch", **kwargs), data, None, split=False)
    with caplog.at_level(logging.INFO):
        split = _gradients(_model(torch.float32, "torch", **kwargs), data, None, split=True)
    for name, got in split.items():
        torch.testing.assert_close(got, whole[name], atol=SPLIT_ATOL, rtol=SPLIT_RTOL, msg=name)
    said = [r.message for r in caplog.records if "no weight-gradient split for" in r.message]
    assert len(said) == 1 and "weight_hh_l0" in said[0] and "weight_hr_l0" in said[0], said


def test_backward_op_without_weight_grads_then_weight_pass() -> None:
    torch.manual_seed(1)
    xg, h0, c0 = torch.randn(T, B, 4 * H), torch.randn(B, H), torch.randn(B, H)
    w_hh = torch.randn(4 * H, H) / H
    for reverse in (False, True):
        hs, c_n, gates, cs, hraw = lstm_recurrence_op(
            xg, h0, c0, w_hh, None, LENGTHS, reverse, "step", True
        )
        dhs, dc_n = torch.randn_like(hs), torch.randn_like(c_n)
        args = (dhs, dc_n, h0, c0, w_hh, None, LENGTHS, reverse, hs, gates, cs, hraw, "step")
        whole = lstm_recurrence_backward_op(*args)
        split = lstm_recurrence_backward_op(*args, need_weight_grads=False)
        assert split[3].numel() == 0 and split[4].numel() == 0  # no GEMMs ran
        torch.library.opcheck(  # the fake implementation gives the same shapes
            lstm_recurrence_backward_op, args, {"need_weight_grads": False},
            test_utils=("test_schema", "test_faketensor"),
        )  # fmt: skip
        for name, got, want in zip(("dxg", "dh0", "dc0"), split[:3], whole[:3], strict=True):
            torch.testing.assert_close(got, want, atol=0, rtol=0, msg=name)
        later, no_projection = lstm_recurrence_weight_grad(split[0], h0, hs, reverse, w_hh.dtype)
        assert no_projection is None
        torch.testing.assert_close(later, whole[3], atol=0, rtol=0)
        # Against autograd through the float64 reference recurrence.
        leaves = [t.double().requires_grad_() for t in (xg, h0, c0, w_hh)]
        ref_hs, ref_c = lstm_recurrence_reference(*leaves, None, LENGTHS, reverse)
        want = torch.autograd.grad([ref_hs, ref_c], leaves[3], [dhs.double(), dc_n.double()])
        torch.testing.assert_close(later.double(), want[0], atol=FP32_ATOL, rtol=FP32_RTOL)


@pytest.mark.parametrize("cell, packed", [("gru", True), ("gru", False), ("rnn_tanh", True)])
def test_gru_and_rnn_split_backward_equals_whole_backward(cell: str, packed: bool) -> None:
    # The Triton GRU / RNN in the multi-layer driver (two layers, bidirectional); the whole
    # backward is checked against torch.nn.GRU / torch.nn.RNN in test_rnn_triton.py.
    lengths = torch.tensor([6, 3, 5, 1]) if packed else None
    x, h0 = torch.randn(6, 4, 5), torch.randn(4, 4, 7)  # test_rnn_reference's module
    cot = [torch.randn(6, 4, 14), torch.randn(4, 4, 7)]
    found = []
    for split in (False, True):
        module = _rnn_module(cell, bias=True).float()
        leaves = [x.clone().requires_grad_(), h0.clone().requires_grad_()]
        deferred = DeferredWeights()
        stage = f"{cell} stage"
        with weight_split(module, deferred, stage) if split else contextlib.nullcontext():
            out, h_n = _rnn_stack(cell, *leaves, _rnn_weights(module), lengths)
        torch.autograd.backward([out, h_n], cot)
        w_hh = [p for n, p in module.named_parameters() if n.startswith("weight_hh")]
        assert all((p.grad is None) == split for p in w_hh)  # deferred to the weight pass
        deferred.run()
        found.append([t.grad for t in leaves] + [p.grad for p in module.parameters()])
    for k, (got, want) in enumerate(zip(*found, strict=True)):
        torch.testing.assert_close(got, want, atol=SPLIT_ATOL, rtol=SPLIT_RTOL, msg=str(k))


def _rnn_stack(
    cell: str, x: Tensor, h0: Tensor, weights: list, lengths: Tensor | None
) -> tuple[Tensor, Tensor]:
    options = {"num_layers": 2, "bidirectional": True, "lengths": lengths}
    if cell == "gru":
        recurrence = functools.partial(gru_recurrence_triton, kernel="step")
        return gru_stack(x, h0, weights, recurrence=recurrence, **options)
    recurrence = functools.partial(rnn_recurrence_triton, kernel="step")
    return rnn_stack(
        x, h0, weights, nonlinearity=cell.removeprefix("rnn_"), recurrence=recurrence, **options
    )


@pytest.mark.parametrize("cell", ["gru", "rnn_relu"])
def test_cell_backward_op_without_weight_grads_then_weight_pass(cell: str) -> None:
    torch.manual_seed(2)
    G = 3 if cell == "gru" else 1
    xg, h0, w_hh = torch.randn(T, B, G * H), torch.randn(B, H), torch.randn(G * H, H) / H
    b_hn = torch.randn(H) if cell == "gru" else None
    hs, gates = cell_recurrence_op(xg, h0, w_hh, b_hn, LENGTHS, True, cell, "step", True)
    args = (torch.randn_like(hs), h0, w_hh, LENGTHS, True, hs, gates, cell, "step")
    whole = cell_recurrence_backward_op(*args)
    split = cell_recurrence_backward_op(*args, need_weight_grads=False)
    torch.library.opcheck(  # the fake implementation gives the same shapes
        cell_recurrence_backward_op, args, {"need_weight_grads": False},
        test_utils=("test_schema", "test_faketensor"),
    )  # fmt: skip
    for name, k in (("dxg", 0), ("dh0", 1), ("db_hn", 3)):
        torch.testing.assert_close(split[k], whole[k], atol=0, rtol=0, msg=name)
    later = cell_recurrence_weight_grad(split[0], split[2], h0, hs, True, w_hh.dtype)
    torch.testing.assert_close(later, whole[2], atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_first_layer_without_input_gradients(backend: str) -> None:
    # A stage that starts with the LSTM: nothing but the weights wants a gradient.
    x, cot = torch.randn(T, B, IN), torch.randn(T, B, H)
    found = []
    for split in (False, True):
        model = _model(torch.float32, backend)
        deferred = DeferredWeights()
        with weight_split(model, deferred, "first") if split else contextlib.nullcontext():
            out, _ = model(x)
        out.backward(cot)
        assert (model.weight_hh_l0.grad is None) == split
        deferred.run()
        found.append({n: p.grad for n, p in model.named_parameters()})
    for name, got in found[1].items():
        torch.testing.assert_close(got, found[0][name], atol=FP32_ATOL, rtol=FP32_RTOL, msg=name)
