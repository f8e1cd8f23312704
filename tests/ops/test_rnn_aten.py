"""fastpar.ops.rnn_aten (the GRU's and Elman RNN's CPU path) against torch.nn.GRU / torch.nn.RNN
in float64 and float32 and against the float64 references of rnn_reference: the eager whole-stack
call, the per-layer custom op fastpar::rnn_aten_layer (what torch.compile and packed input run),
its recompute backward, dropout, autocast, half types, torch.compile(fullgraph=True), the cells."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fastpar.nn.lstm import layer_weights
from fastpar.ops import aten_common, rnn_aten
from fastpar.ops.reference import LayerWeights
from fastpar.ops.rnn_aten import (
    gru_cell_aten,
    gru_stack_aten,
    rnn_aten_layer_op,
    rnn_cell_aten,
    rnn_stack_aten,
)
from fastpar.ops.rnn_reference import (
    gru_cell_reference,
    gru_stack,
    rnn_cell_reference,
    rnn_stack,
)
from tests.ops.lstm_helpers import (
    FP32_ATOL,
    FP32_RTOL,
    assert_close,
    assert_within_torch_error,
    randn,
)

T, B, F_IN, H = 6, 4, 5, 7
LENGTHS = [3, 5, 1, 5]  # unsorted, with ties, a length-1 sequence, none reaching T
CELLS = ["gru", "rnn_tanh", "rnn_relu"]

# num_layers, bidirectional, bias, lengths
CONFIGS = [
    (1, False, True, False),
    (2, True, False, False),
    (3, False, True, True),
    (2, True, True, True),
    (1, True, False, True),
]


def _module(cell: str, num_layers: int, bidirectional: bool, bias: bool, dropout: float = 0.0):
    """A float64 torch.nn.GRU / torch.nn.RNN with seeded weights."""
    torch.manual_seed(0)
    kwargs = dict(num_layers=num_layers, bidirectional=bidirectional, bias=bias, dropout=dropout,
                  dtype=torch.float64)  # fmt: skip
    if cell == "gru":
        return torch.nn.GRU(F_IN, H, **kwargs)
    return torch.nn.RNN(F_IN, H, nonlinearity=cell.removeprefix("rnn_"), **kwargs)


def _stack(cell: str, model: torch.nn.RNNBase, x, h0, lengths, reference: bool = False):
    """gru_stack_aten / rnn_stack_aten (or the float64 references) with the module's weights."""
    weights = layer_weights(model, model.num_layers, 2 if model.bidirectional else 1)
    options = dict(num_layers=model.num_layers, bidirectional=model.bidirectional,
                   dropout=model.dropout, training=model.training, lengths=lengths)  # fmt: skip
    if cell == "gru":
        return (gru_stack if reference else gru_stack_aten)(x, h0, weights, **options)
    nonlinearity = cell.removeprefix("rnn_")
    stack = rnn_stack if reference else rnn_stack_aten
    return stack(x, h0, weights, nonlinearity=nonlinearity, **options)


def _torch(model: torch.nn.RNNBase, x, h0, lengths):
    if lengths is None:
        return model(x, h0)
    out, h_n = model(pack_padded_sequence(x, lengths, enforce_sorted=False), h0)
    return pad_packed_sequence(out, total_length=x.shape[0])[0], h_n


def _run(cell: str, model, who: str, x, h0, lengths, cot):
    """Outputs (padded) and the gradients of input, h0 and every parameter."""
    if who == "torch":
        out, h_n = _torch(model, x, h0, lengths)
    else:
        out, h_n = _stack(cell, model, x, h0, lengths, reference=who == "reference")
    got = torch.autograd.grad((out, h_n), [x, h0, *model.parameters()],
                              [c.to(out.dtype) for c in cot])  # fmt: skip
    return [out, h_n, *got]


def _case(cell: str, num_layers: int, bidirectional: bool, bias: bool, with_lengths: bool,
          dropout: float = 0.0):  # fmt: skip
    """A float64 module, float64 x and h0, cotangents (zero past each length)."""
    model = _module(cell, num_layers, bidirectional, bias, dropout)
    D = 2 if bidirectional else 1
    x, h0 = randn(T, B, F_IN, seed=1), randn(num_layers * D, B, H, seed=2)
    lengths = torch.tensor(LENGTHS) if with_lengths else None
    cot = [randn(T, B, D * H, seed=3), randn(num_layers * D, B, H, seed=4)]
    if lengths is not None:  # torch's padded output is a constant zero there
        cot[0] *= (torch.arange(T).unsqueeze(1) < lengths).unsqueeze(2)
    return model, (x, h0), lengths, cot


def _leaves(tensors, dtype):
    return [t.detach().to(dtype).requires_grad_() for t in tensors]


def _names(model: torch.nn.Module) -> list[str]:
    return ["output", "h_n", "d input", "d h0"] + ["d " + n for n, _ in model.named_parameters()]


def _force(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """ "eager": as called outside torch.compile (torch's own whole-stack call without lengths, the
    op with them); "custom_op": every layer through fastpar::rnn_aten_layer, as torch.compile runs
    it; "saved_gates": the op, and the GRU's own forward loop keeping its gates at every size."""
    if path != "eager":
        monkeypatch.setattr(aten_common, "eager_whole_stack", lambda *_: False)
    if path == "saved_gates":
        monkeypatch.setattr(rnn_aten, "GRU_SAVED_GATES_MIN_MACS", 0)


@pytest.mark.parametrize("path", ["eager", "custom_op", "saved_gates"])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("num_layers, bidirectional, bias, with_lengths", CONFIGS)
def test_matches_torch_and_reference_float64_and_float32(
    monkeypatch: pytest.MonkeyPatch, path: str, cell: str, num_layers: int, bidirectional: bool,
    bias: bool, with_lengths: bool,
) -> None:  # fmt: skip
    _force(monkeypatch, path)
    model, inputs, lengths, cot = _case(cell, num_layers, bidirectional, bias, with_lengths)
    want = _run(cell, model, "torch", *_leaves(inputs, torch.float64), lengths, cot)
    reference = _run(cell, model, "reference", *_leaves(inputs, torch.float64), lengths, cot)
    got64 = _run(cell, model, "aten", *_leaves(inputs, torch.float64), lengths, cot)
    got32 = _run(cell, model.float(), "aten", *_leaves(inputs, torch.float32), lengths, cot)
    for name, a, b, r, w in zip(_names(model), got64, got32, reference, want, strict=True):
        assert a.dtype == torch.float64 and b.dtype == torch.float32, name
        assert_close(r, w, 1e-10, 1e-10, name + " (the reference against torch)")
        assert_close(a, w, 1e-10, 1e-10, name + " (float64)")
        assert_close(b, w, FP32_ATOL, FP32_RTOL, name + " (float32)")


@pytest.mark.parametrize("path", ["eager", "custom_op", "saved_gates"])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("training", [True, False])
def test_dropout_draws_torch_masks(
    monkeypatch: pytest.MonkeyPatch, path: str, cell: str, training: bool
) -> None:
    # torch's modules draw one dropout mask per layer output but the last, as stack_layers
    # does: with the same seed the masks, and so the results and gradients, are the same.
    _force(monkeypatch, path)
    model, inputs, _, cot = _case(cell, 3, True, True, False, dropout=0.5)
    model.train(training)
    torch.manual_seed(123)
    want = _run(cell, model, "torch", *_leaves(inputs, torch.float64), None, cot)
    torch.manual_seed(123)
    got = _run(cell, model, "aten", *_leaves(inputs, torch.float64), None, cot)
    for name, a, w in zip(_names(model), got, want, strict=True):
        assert_close(a, w, 1e-10, 1e-10, name)
    torch.manual_seed(7)  # and dropout acted in training only
    other = _stack(cell, model, *_leaves(inputs, torch.float64), None)[0]
    assert torch.equal(other, got[0]) != training


# The floor of the bound: one rounding of the largest result to the dtype (results and
# gradients are returned in it; bias gradients sum over every step and row).
@pytest.mark.parametrize("dtype, rtol", [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("with_lengths", [True, False])
def test_half_types_within_torch_own_error(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, rtol: float, cell: str,
    with_lengths: bool,
) -> None:  # fmt: skip
    _force(monkeypatch, "saved_gates")  # the op (the GRU keeps no gates in half types)
    model, inputs, lengths, cot = _case(cell, 2, True, True, with_lengths)
    model_h = model.to(dtype)  # the rounded weights are the problem both sides solve
    exact_model = _module(cell, 2, True, True)
    exact_model.load_state_dict(model_h.state_dict())
    rounded = [t.to(dtype).double() for t in inputs]
    exact = _run(cell, exact_model, "torch", *_leaves(rounded, torch.float64), lengths, cot)
    ours = _run(cell, model_h, "aten", *_leaves(rounded, dtype), lengths, cot)
    torchs = _run(cell, model_h, "torch", *_leaves(rounded, dtype), lengths, cot)
    for name, a, t, e in zip(_names(model), ours, torchs, exact, strict=True):
        assert a.dtype == dtype, name
        assert_within_torch_error(a, t, e, 1e-3, rtol, name)


@pytest.mark.parametrize("cell", CELLS)
def test_autocast_gives_torch_dtypes_on_both_paths(
    monkeypatch: pytest.MonkeyPatch, cell: str
) -> None:
    model, inputs, lengths, _ = _case(cell, 2, True, True, True)
    exact = _stack(cell, model, *inputs, lengths)[0]
    model = model.float()
    x, h0 = (t.float() for t in inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_h = _torch(model, x, h0, None)
        eager, eager_h = _stack(cell, model, x, h0, None)
        monkeypatch.setattr(aten_common, "eager_whole_stack", lambda *_: False)
        op, op_h = _stack(cell, model, x, h0, None)
        packed, _ = _stack(cell, model, x, h0, lengths)
    for out, h_n in ((eager, eager_h), (op, op_h)):
        assert out.dtype == want.dtype and h_n.dtype == want_h.dtype
    assert_close(op, want, 3e-2, 3e-2, "op against torch under autocast")  # bfloat16 roundings
    assert_close(packed, exact, 3e-2, 3e-2, "packed under autocast")
    (op.float().sum() + packed.float().sum()).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def _cell_weights(cell: torch.nn.RNNCellBase) -> LayerWeights:
    return LayerWeights(cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, None)


def _plain(module: torch.nn.Module) -> torch.nn.Module:
    """The same parameters in a plain module (dynamo refuses to trace torch's RNN modules)."""
    holder = torch.nn.Module()
    for name, param in module.named_parameters():
        holder.register_parameter(name, param)
    return holder


class _Tagger(torch.nn.Module):
    """A GRU, a tanh RNN with lengths and a relu RNN, then the cells."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gru = _plain(torch.nn.GRU(F_IN, H, num_layers=2, bidirectional=True))
        self.tanh = _plain(torch.nn.RNN(2 * H, H, bidirectional=True, bias=False))
        self.relu = _plain(torch.nn.RNN(2 * H, H, nonlinearity="relu"))
        self.gru_cell = torch.nn.GRUCell(H, H)
        self.rnn_cell = torch.nn.RNNCell(H, H, nonlinearity="relu")

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h0 = x.new_zeros(4, B, H)
        out, h_n = gru_stack_aten(x, h0, layer_weights(self.gru, 2, 2), num_layers=2,
                                  bidirectional=True)  # fmt: skip
        out, _ = rnn_stack_aten(out, h0[:2], layer_weights(self.tanh, 1, 2), nonlinearity="tanh",
                                num_layers=1, bidirectional=True, lengths=lengths)  # fmt: skip
        out, h1 = rnn_stack_aten(out, h0[:1], layer_weights(self.relu, 1, 1), nonlinearity="relu",
                                 num_layers=1, bidirectional=False)  # fmt: skip
        h = gru_cell_aten(out[-1], h1[0], _cell_weights(self.gru_cell))
        h = rnn_cell_aten(out[0], h, _cell_weights(self.rnn_cell), "relu")
        return out.tanh().sum() + h_n.square().sum() + h.sum()


@pytest.mark.parametrize("path", ["custom_op", "saved_gates"])
def test_torch_compile_fullgraph_no_graph_break(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    _force(monkeypatch, path)  # "custom_op" for the eager run; compiled code runs the op anyway
    torch._dynamo.reset()
    model = _Tagger()
    x, lengths = randn(T, B, F_IN, seed=1).float(), torch.tensor(LENGTHS)
    eager_loss = model(x, lengths)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)  # raises on a graph break
    loss = compiled(x, lengths)
    got_grads = torch.autograd.grad(loss, list(model.parameters()))
    assert_close(loss, eager_loss, FP32_ATOL, FP32_RTOL, "loss")
    for (name, _), a, b in zip(model.named_parameters(), got_grads, eager_grads, strict=True):
        assert_close(a, b, FP32_ATOL, FP32_RTOL, "d " + name)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_cells_match_torch_and_reference(cell: str, dtype: torch.dtype, bias: bool) -> None:
    torch.manual_seed(0)
    if cell == "gru":
        module = torch.nn.GRUCell(F_IN, H, bias=bias, dtype=torch.float64)
    else:
        nonlinearity = cell.removeprefix("rnn_")
        module = torch.nn.RNNCell(F_IN, H, bias=bias, nonlinearity=nonlinearity,
                                  dtype=torch.float64)  # fmt: skip
    params = list(module.parameters())
    x, h = randn(B, F_IN, seed=1).requires_grad_(), randn(B, H, seed=2).requires_grad_()
    cot = randn(B, H, seed=3)
    want = module(x, h)
    w64 = _cell_weights(module)
    x_d, h_d = _leaves((x, h), dtype)
    w_d = LayerWeights(*(t.to(dtype) if t is not None else None for t in w64))
    if cell == "gru":
        got, ref = gru_cell_aten(x_d, h_d, w_d), gru_cell_reference(x, h, w64)
    else:
        nonlinearity = cell.removeprefix("rnn_")
        got = rnn_cell_aten(x_d, h_d, w_d, nonlinearity)
        ref = rnn_cell_reference(x, h, w64, nonlinearity)
    atol, rtol = (1e-12, 1e-10) if dtype == torch.float64 else (FP32_ATOL, FP32_RTOL)
    assert got.dtype == dtype
    assert_close(got, want, atol, rtol, "h_next")
    assert_close(ref, want, 1e-12, 1e-10, "h_next of the reference")
    for a, b in zip(torch.autograd.grad(got, [x_d, h_d, *params], cot.to(dtype)),
                    torch.autograd.grad(want, [x, h, *params], cot), strict=True):  # fmt: skip
        assert_close(a, b, atol, rtol, "gradient")


def test_bad_arguments_are_named() -> None:
    x, h0 = torch.randn(3, 2, 4), torch.randn(2, 5)
    w_ih, w_hh, b = torch.randn(15, 4), torch.randn(15, 5), torch.randn(15)
    with pytest.raises(ValueError, match="lengths must all be >= 1"):
        rnn_aten_layer_op(x, h0, w_ih, w_hh, b, b, torch.tensor([0, 3]), False, "gru", False)
    with pytest.raises(ValueError, match=r"lengths must be <= T = 3"):
        rnn_aten_layer_op(x, h0, w_ih, w_hh, b, b, torch.tensor([4, 3]), False, "gru", False)
    with pytest.raises(ValueError, match="b_ih and b_hh must both be given"):
        rnn_aten_layer_op(x, h0, w_ih, w_hh, b, None, None, False, "gru", False)
    with pytest.raises(ValueError, match="cell must be one of"):
        rnn_aten_layer_op(x, h0, w_ih, w_hh, b, b, None, False, "lstm", False)
    with pytest.raises(ValueError, match="save_gates needs cell 'gru' without lengths"):
        rnn_aten_layer_op(x, h0, w_ih, w_hh, b, b, torch.tensor([3, 3]), False, "gru", True)
    w = LayerWeights(w_ih[:5], w_hh[:5], None, None, None)
    with pytest.raises(ValueError, match="nonlinearity must be one of"):
        rnn_stack_aten(x, h0.unsqueeze(0), [w], nonlinearity="sigmoid",  # type: ignore[arg-type]
                       num_layers=1, bidirectional=False)  # fmt: skip
    with pytest.raises(ValueError, match="nonlinearity must be one of"):
        rnn_cell_aten(x[0], h0, w, "gelu")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "cell, dtype, bias, lengths, reverse, save_gates",
    [
        ("gru", torch.float64, True, [2, 4, 1], True, False),
        ("gru", torch.float32, False, None, False, False),
        ("gru", torch.float64, True, None, True, True),
        ("rnn_tanh", torch.float64, True, [1, 3, 3], False, False),
        ("rnn_relu", torch.float32, True, None, True, False),
    ],
)
def test_opcheck(cell: str, dtype: torch.dtype, bias: bool, lengths: list[int] | None,
                 reverse: bool, save_gates: bool) -> None:  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    G = 3 if cell == "gru" else 1

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()

    args = (
        r(4, 3, F_IN), r(3, H), r(G * H, F_IN), r(G * H, H), r(G * H) if bias else None,
        r(G * H) if bias else None, torch.tensor(lengths) if lengths else None, reverse, cell,
        save_gates,
    )  # fmt: skip
    torch.library.opcheck(rnn_aten_layer_op, args)


@pytest.mark.parametrize(
    "cell, lengths, reverse, save_gates",
    [("gru", [2, 4, 1], True, False), ("gru", None, False, True), ("rnn_tanh", None, True, False),
     ("rnn_relu", [1, 3, 4], False, False)],
)  # fmt: skip
def test_double_backward_passes_gradgradcheck(
    cell: str, lengths: list[int] | None, reverse: bool, save_gates: bool
) -> None:
    """A backward with create_graph=True (a gradient penalty, MAML) gives gradients that are
    differentiable again (it raised "no autograd formula" for rnn_aten_layer_backward)."""
    gen = torch.Generator().manual_seed(0)
    hidden, features, G = 3, 2, 3 if cell == "gru" else 1

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    tensors = [r(4, 3, features), r(3, hidden), r(G * hidden, features), r(G * hidden, hidden),
               r(G * hidden), r(G * hidden)]  # fmt: skip
    given = torch.tensor(lengths) if lengths else None

    def layer(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out, h_n, _ = rnn_aten_layer_op(*args, given, reverse, cell, save_gates)
        return out, h_n

    assert torch.autograd.gradgradcheck(layer, tensors)
