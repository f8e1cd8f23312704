"""fastpar::lstm_aten_layer (backend "torch") against torch.nn.LSTM in float64, on both of its
paths: oneDNN (CPU float32/bfloat16, the kernels torch.nn.LSTM runs, so results are bitwise
torch's) and torch's C++ forward with fastpar's recompute backward (float64, half types,
proj_size, lengths; forced for float32 by switching oneDNN off as torch.backends.mkldnn does)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fastpar.nn.lstm import layer_weights
from fastpar.ops import lstm_aten
from fastpar.ops.lstm_aten import lstm_aten_layer_op, lstm_stack_aten, uses_onednn
from tests.ops.lstm_helpers import FP32_ATOL, FP32_RTOL, assert_close, assert_within_torch_error

T, B, F_IN, H = 6, 4, 5, 7
LENGTHS = [3, 6, 1, 6]  # unsorted, with ties and a length-1 sequence

# num_layers, bidirectional, proj_size, bias, lengths
CONFIGS = [
    (1, False, 0, True, False),
    (2, True, 0, False, False),
    (2, True, 3, True, False),
    (1, True, 0, True, True),
    (2, True, 3, False, True),
]


def _run(model: torch.nn.Module, fastpar_path: bool, x, h0, c0, lengths, cot):
    """Outputs (padded) and the gradients of input, h0, c0 and every parameter."""
    num_dirs = 2 if model.bidirectional else 1
    if fastpar_path:
        weights = layer_weights(model, model.num_layers, num_dirs)
        out, h_n, c_n = lstm_stack_aten(
            x, h0, c0, weights, num_layers=model.num_layers, bidirectional=model.bidirectional,
            lengths=lengths,
        )  # fmt: skip
    elif lengths is not None:
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, (h_n, c_n) = model(packed, (h0, c0))
        out, _ = pad_packed_sequence(out, total_length=x.shape[0])
    else:
        out, (h_n, c_n) = model(x, (h0, c0))
    got = torch.autograd.grad(
        (out, h_n, c_n), [x, h0, c0, *model.parameters()], [c.to(out.dtype) for c in cot]
    )
    return [out, h_n, c_n, *got]


def _case(num_layers: int, bidirectional: bool, proj_size: int, bias: bool, with_lengths: bool):
    """A float64 torch.nn.LSTM, float64 leaves and cotangents (zero past each length)."""
    torch.manual_seed(0)
    model = torch.nn.LSTM(
        F_IN, H, num_layers=num_layers, bidirectional=bidirectional, proj_size=proj_size,
        bias=bias, dtype=torch.float64,
    )  # fmt: skip
    D, P = (2 if bidirectional else 1), proj_size or H
    gen = torch.Generator().manual_seed(1)
    x, h0, c0 = (
        torch.randn(*shape, generator=gen, dtype=torch.float64)
        for shape in ((T, B, F_IN), (num_layers * D, B, P), (num_layers * D, B, H))
    )
    lengths = torch.tensor(LENGTHS) if with_lengths else None
    cot = [
        torch.randn(*shape, generator=gen, dtype=torch.float64)
        for shape in ((T, B, D * P), (num_layers * D, B, P), (num_layers * D, B, H))
    ]
    if lengths is not None:  # torch's padded output is a constant zero there
        cot[0] *= (torch.arange(T).unsqueeze(1) < lengths).unsqueeze(2)
    return model, (x, h0, c0), lengths, cot


def _leaves(tensors, dtype):
    return [t.detach().to(dtype).requires_grad_() for t in tensors]


# "eager": lstm_stack_aten as called outside torch.compile (torch.nn.LSTM's own call without
# lengths, the op with them); "custom_op": every layer through fastpar::lstm_aten_layer (what
# torch.compile runs); "recompute": the op with oneDNN off, as with
# torch.backends.mkldnn.flags(enabled=False), so float32 takes the recompute backward too.
@pytest.mark.parametrize("path", ["eager", "custom_op", "recompute"])
@pytest.mark.parametrize("num_layers, bidirectional, proj_size, bias, with_lengths", CONFIGS)
def test_matches_torch_lstm_float64_and_float32(
    monkeypatch: pytest.MonkeyPatch, path: str, num_layers: int, bidirectional: bool,
    proj_size: int, bias: bool, with_lengths: bool,
) -> None:  # fmt: skip
    if path != "eager":
        monkeypatch.setattr(lstm_aten, "eager_whole_stack", lambda *_: False)
    onednn = path != "recompute"
    model, inputs, lengths, cot = _case(num_layers, bidirectional, proj_size, bias, with_lengths)
    names = ["output", "h_n", "c_n", "d input", "d h0", "d c0"]
    names += ["d " + n for n, _ in model.named_parameters()]
    want = _run(model, False, *_leaves(inputs, torch.float64), lengths, cot)
    with torch.backends.mkldnn.flags(enabled=onednn):
        got64 = _run(model, True, *_leaves(inputs, torch.float64), lengths, cot)
        model32 = model.float()
        got32 = _run(model32, True, *_leaves(inputs, torch.float32), lengths, cot)
        torch32 = _run(model32, False, *_leaves(inputs, torch.float32), lengths, cot)
    for name, a, b, w in zip(names, got64, got32, want, strict=True):
        assert_close(a, w, 1e-10, 1e-10, name + " (float64)")
        assert_close(b, w, FP32_ATOL, FP32_RTOL, name + " (float32)")
    onednn_path = uses_onednn(inputs[0].float(), model32.weight_hr_l0 if proj_size else None,
                              lengths) and onednn  # fmt: skip
    if onednn_path:  # the very kernels torch.nn.LSTM runs: the same bits
        for name, a, b in zip(names, got32, torch32, strict=True):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("proj_size, with_lengths", [(0, False), (3, True)])
def test_half_types_within_torch_own_error(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, proj_size: int, with_lengths: bool
) -> None:
    monkeypatch.setattr(lstm_aten, "eager_whole_stack", lambda *_: False)  # the op
    model, inputs, lengths, cot = _case(2, True, proj_size, True, with_lengths)
    model_h = model.to(dtype)  # the rounded weights are the problem both sides solve
    exact_model = torch.nn.LSTM(F_IN, H, num_layers=2, bidirectional=True, proj_size=proj_size)
    exact_model = exact_model.double()
    exact_model.load_state_dict(model_h.state_dict())
    rounded = [t.to(dtype).double() for t in inputs]
    exact = _run(exact_model, False, *_leaves(rounded, torch.float64), lengths, cot)
    ours = _run(model_h, True, *_leaves(rounded, dtype), lengths, cot)
    torchs = _run(model_h, False, *_leaves(rounded, dtype), lengths, cot)
    for k, (a, t, e) in enumerate(zip(ours, torchs, exact, strict=True)):
        assert a.dtype == dtype
        assert_within_torch_error(a, t, e, 1e-3, 1e-3, f"result {k}")


def test_path_choice_follows_torch() -> None:
    x = torch.randn(2, 3, 4)
    w_hr = torch.randn(3, 5)
    onednn = torch.backends.mkldnn.is_available()
    assert uses_onednn(x, None, None) == onednn
    assert not uses_onednn(x.double(), None, None)
    assert not uses_onednn(x.half(), None, None)
    assert not uses_onednn(x, w_hr, None)
    assert not uses_onednn(x, None, torch.tensor([2, 1, 2]))
    with torch.backends.mkldnn.flags(enabled=False):
        assert not uses_onednn(x, None, None)


def test_inference_keeps_no_workspace_and_unused_outputs_get_no_gradient() -> None:
    model, inputs, _, _ = _case(1, False, 0, True, False)
    model = model.float()
    x, h0, c0 = _leaves((inputs[0], inputs[1][0], inputs[2][0]), torch.float32)
    w = layer_weights(model, 1, 1)[0]
    args = (x, h0, c0, w.w_ih, w.w_hh, w.b_ih, w.b_hh, None, None, False)
    with torch.no_grad():
        out, h_n, c_n, ws = lstm_aten_layer_op(*args, False)
    assert ws.numel() == 0
    out2, h_n2, c_n2, ws2 = lstm_aten_layer_op(*args, True)
    assert torch.equal(out, out2) and torch.equal(h_n, h_n2) and torch.equal(c_n, c_n2)
    if uses_onednn(x, None, None):
        assert ws2.numel() > 0
    # Only c_n reaches the loss: the missing output gradients count as zeros.
    (dx,) = torch.autograd.grad(c_n2.sum(), [x])
    ref = torch.nn.LSTM(F_IN, H).float()
    ref.load_state_dict(model.state_dict())
    x_ref = x.detach().requires_grad_()
    _, (_, c_ref) = ref(x_ref, (h0.detach().unsqueeze(0), c0.detach().unsqueeze(0)))
    (dx_ref,) = torch.autograd.grad(c_ref.sum(), [x_ref])
    assert_close(dx, dx_ref, FP32_ATOL, FP32_RTOL, "d input from c_n alone")


def test_bad_lengths_and_biases_are_named() -> None:
    x, h0, c0 = torch.randn(3, 2, 4), torch.randn(2, 5), torch.randn(2, 5)
    w_ih, w_hh, b = torch.randn(20, 4), torch.randn(20, 5), torch.randn(20)
    with pytest.raises(ValueError, match="lengths must all be >= 1"):
        lstm_aten_layer_op(x, h0, c0, w_ih, w_hh, b, b, None, torch.tensor([0, 3]), False, False)
    with pytest.raises(ValueError, match=r"lengths must be <= T = 3"):
        lstm_aten_layer_op(x, h0, c0, w_ih, w_hh, b, b, None, torch.tensor([4, 3]), False, False)
    with pytest.raises(ValueError, match="b_ih and b_hh must both be given"):
        lstm_aten_layer_op(x, h0, c0, w_ih, w_hh, b, None, None, None, False, False)


@pytest.mark.parametrize(
    "dtype, proj_size, lengths, keep_workspace",
    [
        (torch.float64, 2, [2, 4, 1], True),  # the recompute path, reversed, with lengths
        # oneDNN's workspace holds padding bytes that differ between runs: opcheck compares
        # outputs bitwise, so it checks that path without one (compile tests cover the rest).
        (torch.float32, 0, None, False),
    ],
)
def test_opcheck(dtype: torch.dtype, proj_size: int, lengths: list[int] | None,
                 keep_workspace: bool) -> None:  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    P = proj_size or H

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()

    args = (
        r(4, 3, F_IN), r(3, P), r(3, H), r(4 * H, F_IN), r(4 * H, P), r(4 * H), r(4 * H),
        r(P, H) if proj_size else None, torch.tensor(lengths) if lengths else None, True,
        keep_workspace,
    )  # fmt: skip
    torch.library.opcheck(lstm_aten_layer_op, args)


@pytest.mark.parametrize("proj_size, lengths, reverse", [(0, [2, 4, 1], True), (2, None, False)])
def test_double_backward_passes_gradgradcheck(
    proj_size: int, lengths: list[int] | None, reverse: bool
) -> None:
    """A backward with create_graph=True (a gradient penalty, MAML) gives gradients that are
    differentiable again (it raised "no autograd formula" for lstm_aten_layer_backward)."""
    gen = torch.Generator().manual_seed(0)
    hidden, features = 3, 2
    P = proj_size or hidden

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    tensors = [r(4, 3, features), r(3, P), r(3, hidden), r(4 * hidden, features),
               r(4 * hidden, P), r(4 * hidden), r(4 * hidden)]  # fmt: skip
    if proj_size:
        tensors.append(r(P, hidden))
    given = torch.tensor(lengths) if lengths else None

    def layer(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        w_hr = args[7] if proj_size else None
        out, h_n, c_n, _ = lstm_aten_layer_op(*args[:7], w_hr, given, reverse, True)
        return out, h_n, c_n

    assert torch.autograd.gradgradcheck(layer, tensors)
