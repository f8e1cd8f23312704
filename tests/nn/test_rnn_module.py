"""fastpar.nn.GRU, RNN, GRUCell and RNNCell against torch's modules (float64): parameters,
results, gradients of every parameter, input and initial state, packed batches, errors, saving.
The triton backend runs in the interpreter on CPU."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastpar.nn
import fastpar.nn.recurrent
from fastpar.ops.aten_common import per_layer_ops
from tests.nn.recurrent_helpers import (
    check_autocast_dtypes_match_torch,
    check_autocast_matches_torch_with_grads,
    check_autocast_takes_states_and_half_input,
    compare_with_torch,
    spy_triton,
)
from tests.ops.lstm_helpers import (
    FP32_ATOL,
    FP32_RTOL,
    assert_close,
    assert_within_torch_error,
    grads,
    randn,
)

F_IN, H, B = 10, 33, 3
BACKENDS = ["triton", "torch", "reference"]
# kind: (fastpar's module, torch's module, fastpar's cell, torch's cell, constructor options)
KINDS = {
    "gru": (fastpar.nn.GRU, torch.nn.GRU, fastpar.nn.GRUCell, torch.nn.GRUCell, {}),
    "rnn_tanh": (fastpar.nn.RNN, torch.nn.RNN, fastpar.nn.RNNCell, torch.nn.RNNCell,
                 {"nonlinearity": "tanh"}),
    "rnn_relu": (fastpar.nn.RNN, torch.nn.RNN, fastpar.nn.RNNCell, torch.nn.RNNCell,
                 {"nonlinearity": "relu"}),
}  # fmt: skip


def _pair(kind: str, backend: str = "reference", dtype: torch.dtype = torch.float32, **kwargs):
    """A fastpar module and a float64 torch module with the same weights."""
    ours_cls, theirs_cls, _, _, options = KINDS[kind]
    torch.manual_seed(0)
    ours = ours_cls(F_IN, H, backend=backend, **options, **kwargs)
    theirs = theirs_cls(F_IN, H, **options, **kwargs).double()
    theirs.load_state_dict(ours.state_dict())
    return ours.to(dtype), theirs


def _compare(ours, theirs, x, h0, dtype=torch.float32, atol=FP32_ATOL, rtol=FP32_RTOL, check=True):
    """Output, h_n and the gradients of input, h_0 and every parameter, ours vs float64."""
    return compare_with_torch(ours, theirs, x, (h0,), dtype, atol, rtol, check)


CONFIGS = [
    # num_layers, bidirectional, batch_first, bias, T
    (1, False, False, True, 1),
    (1, False, True, False, 7),
    (2, True, False, True, 7),
    (3, False, True, True, 5),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_layers, bidirectional, batch_first, bias, T", CONFIGS)
def test_matches_torch(
    kind: str, backend: str, num_layers: int, bidirectional: bool, batch_first: bool, bias: bool,
    T: int,
) -> None:  # fmt: skip
    ours, theirs = _pair(
        kind, backend, num_layers=num_layers, bidirectional=bidirectional,
        batch_first=batch_first, bias=bias,
    )  # fmt: skip
    D = 2 if bidirectional else 1
    x = randn(B, T, F_IN, seed=1) if batch_first else randn(T, B, F_IN, seed=1)
    _compare(ours, theirs, x, randn(num_layers * D, B, H, seed=2))


# Half types: the floor of the bound is one rounding of the largest result to the dtype (results
# and gradients are returned in it, and bias gradients sum over every step and row), as in
# tests/ops/test_rnn_aten.py; torch's own error is that of a different algorithm (oneDNN keeps
# float32 inside a layer), so single gradients land either side of 2x it.
HALF_TOLERANCES = [(torch.bfloat16, 1e-3, 2.0**-8), (torch.float16, 1e-4, 2.0**-11)]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype, atol, rtol", HALF_TOLERANCES)
def test_half_types_against_torch_own_error(
    kind: str, backend: str, dtype: torch.dtype, atol: float, rtol: float
) -> None:
    # fastpar's error against float64 within a small multiple of torch's own module's error in
    # that dtype, on the same rounded weights and inputs.
    ours, theirs = _pair(kind, backend, num_layers=2, bidirectional=True)
    ours = ours.to(dtype)
    theirs.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    x = randn(5, B, F_IN, seed=1).to(dtype).double()
    h0 = randn(4, B, H, seed=2).to(dtype).double()
    torch_own = type(theirs)(F_IN, H, num_layers=2, bidirectional=True, **KINDS[kind][4])
    torch_own = torch_own.to(dtype)
    torch_own.load_state_dict(ours.state_dict())
    got, exp, names = _compare(ours, theirs, x, h0, dtype, check=False)
    own, _, _ = _compare(torch_own, theirs, x, h0, dtype, check=False)
    for name, a, t, e in zip(names, got, own, exp, strict=True):
        assert_within_torch_error(a, t, e, atol, rtol, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed(kind: str, backend: str, enforce_sorted: bool) -> None:
    ours, theirs = _pair(kind, backend, num_layers=2, bidirectional=True)
    T = 6
    lengths = torch.tensor([6, 3, 1] if enforce_sorted else [3, 6, 1])
    x, h0 = randn(T, B, F_IN, seed=1), randn(4, B, H, seed=2)
    xs, hs = x.float().requires_grad_(), h0.float().requires_grad_()
    xd, hd = x.clone().requires_grad_(), h0.clone().requires_grad_()
    out, h_n = ours(pack_padded_sequence(xs, lengths, enforce_sorted=enforce_sorted), hs)
    want, want_h = theirs(pack_padded_sequence(xd, lengths, enforce_sorted=enforce_sorted), hd)
    assert torch.equal(out.batch_sizes, want.batch_sizes)
    for field in ("sorted_indices", "unsorted_indices"):
        a, b = getattr(out, field), getattr(want, field)
        assert (a is None and b is None) or torch.equal(a, b), field
    assert_close(out.data, want.data, FP32_ATOL, FP32_RTOL, "output")
    assert_close(h_n, want_h, FP32_ATOL, FP32_RTOL, "h_n")
    cot = [randn(*t.shape, seed=40 + k) for k, t in enumerate((want.data, want_h))]
    got = grads((out.data, h_n), [c.float() for c in cot], [xs, hs, *ours.parameters()])
    exp = grads((want.data, want_h), cot, [xd, hd, *theirs.parameters()])
    for k, (a, b) in enumerate(zip(got, exp, strict=True)):
        assert_close(a, b, FP32_ATOL, FP32_RTOL, f"gradient {k}")
    # Inputs past each length get no gradient, as in torch.
    short = int(lengths.argmin())
    assert got[0][1:, short].abs().max() == 0


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("kind", ["gru", "rnn_tanh"])
@pytest.mark.parametrize("training", [True, False])
def test_dropout_train_and_eval(kind: str, backend: str, training: bool) -> None:
    # torch draws one dropout mask per layer output, as the stacks do: with the same seed the
    # masks, and so the results, are the same.
    ours, theirs = _pair(kind, backend, num_layers=3, dropout=0.5)
    ours.train(training)
    theirs.train(training)
    x, h0 = randn(7, B, F_IN, seed=1), randn(3, B, H, seed=2)
    torch.manual_seed(123)
    out, _ = ours(x.float(), h0.float())
    torch.manual_seed(123)
    want, _ = theirs(x, h0)
    assert_close(out, want, FP32_ATOL, FP32_RTOL, "output")
    torch.manual_seed(7)  # and dropout really acted in training (and not in eval)
    other, _ = ours(x.float(), h0.float())
    assert torch.equal(other, out) != training


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("kind", KINDS)
def test_unbatched_input(kind: str, backend: str) -> None:
    ours, theirs = _pair(kind, backend, num_layers=2, bidirectional=True)
    x, h0 = randn(5, F_IN, seed=1), randn(4, H, seed=2)
    out, h_n = ours(x.float(), h0.float())
    want, want_h = theirs(x, h0)
    assert out.shape == want.shape == (5, 2 * H) and h_n.shape == want_h.shape == (4, H)
    assert_close(out, want, FP32_ATOL, FP32_RTOL, "output")
    assert_close(h_n, want_h, FP32_ATOL, FP32_RTOL, "h_n")
    out0, h0_n = ours(x.float())  # no hx: zeros
    want0, want0_h = theirs(x)
    assert_close(out0, want0, FP32_ATOL, FP32_RTOL, "output without hx")
    assert_close(h0_n, want0_h, FP32_ATOL, FP32_RTOL, "h_n without hx")


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("kind", KINDS)
def test_autocast_takes_the_previous_calls_state_and_a_half_input(kind: str, backend: str) -> None:
    ours, theirs = _pair(kind, backend, num_layers=2)
    half_module, rounded = _pair(kind, backend, dtype=torch.bfloat16, num_layers=2)
    rounded.load_state_dict(half_module.state_dict())  # float64, the bfloat16 weights
    x1, x2 = randn(6, B, F_IN, seed=1), randn(6, B, F_IN, seed=2)
    check_autocast_takes_states_and_half_input(ours, theirs, half_module, rounded, x1, x2)
    _, _, cell_cls, theirs_cell_cls, options = KINDS[kind]
    cell = cell_cls(F_IN, H, backend=backend, **options)
    theirs_cell = theirs_cell_cls(F_IN, H, **options).double()
    theirs_cell.load_state_dict(cell.state_dict())
    exact_cell = theirs_cell(x2[0], theirs_cell(x1[0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_cell = cell(x2[0].bfloat16(), cell(x1[0].float()))
    assert_close(got_cell, exact_cell, 2e-2, 2e-2, "cell from the previous step under autocast")


@pytest.mark.parametrize("kind", KINDS)
def test_float64_packed_input_under_autocast_stays_float64(kind: str) -> None:
    """Autocast leaves float64 alone: a float64 module on torch's kernels gives torch's float64
    results under it (packed input on CPU runs the per-layer op, which takes autocast's dtype
    for other dtypes)."""
    ours, theirs = _pair(kind, "torch", dtype=torch.float64)
    x = pack_padded_sequence(randn(6, B, F_IN, seed=1), torch.tensor([6, 4, 2]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (out, h_n), (want_out, want_h_n) = ours(x), theirs(x)
    assert out.data.dtype == h_n.dtype == torch.float64
    assert_close(out.data, want_out.data, 1e-12, 1e-12, "output")
    assert_close(h_n, want_h_n, 1e-12, 1e-12, "h_n")


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_reference_backend_under_autocast_returns_torchs_dtypes(kind: str, packed: bool) -> None:
    """Under autocast torch.nn.GRU's output stays float32 and torch.nn.RNN's is bfloat16 (op
    by op in torch's loop); the reference backend follows."""
    ours, theirs = _pair(kind, "reference", num_layers=2, bidirectional=True)
    theirs.float()
    x = randn(6, B, F_IN, seed=1).float()
    check_autocast_dtypes_match_torch(
        ours, theirs, pack_padded_sequence(x, torch.tensor([6, 4, 2])) if packed else x
    )


@pytest.mark.parametrize("half", ["input", "h0"])
@pytest.mark.parametrize("kind", KINDS)
def test_reference_backend_under_autocast_with_half_data_returns_torchs_dtypes(
    kind: str, half: str
) -> None:
    """With a bfloat16 input and no h_0, or a bfloat16 h_0, torch's modules keep h in
    bfloat16 under autocast (the GRU adds b_hh inside its linear, in autocast's dtype); the
    reference backend follows."""
    ours, theirs = _pair(kind, "reference", num_layers=2, bidirectional=True)
    theirs.float()
    x = randn(6, B, F_IN, seed=1).float()
    h0 = randn(4, B, H, seed=2).bfloat16() if half == "h0" else None
    if half == "input":
        x = x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = ours(x, h0), theirs(x, h0)
    for name, a, b in zip(["output", "h_n"], got, want, strict=True):
        assert a.dtype == b.dtype, f"{name}: {a.dtype}, torch's {b.dtype}"
        assert_close(a.float(), b.float(), 2e-2, 2e-2, f"{name} under bfloat16 autocast")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_per_layer_ops_under_autocast_return_torchs_dtypes(
    kind: str, packed: bool, training: bool, dtype: torch.dtype
) -> None:
    """The per-layer op (compiled graphs, vmap, split pipeline stages, packed input on CPU)
    returns torch's dtypes under CPU autocast: the GRU's state update promotes to h_0's dtype
    (float32), the RNN's h (tanh or relu of matmuls) stays in autocast's."""
    ours, theirs = _pair(kind, "torch", num_layers=2, bidirectional=True)
    theirs.float()
    ours.train(training), theirs.train(training)
    x = randn(6, B, F_IN, seed=1).float()
    with per_layer_ops():
        check_autocast_dtypes_match_torch(
            ours, theirs, pack_padded_sequence(x, torch.tensor([6, 4, 2])) if packed else x, dtype
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("packed, with_h0", [(False, True), (False, False), (True, True)])
# Not relu: its derivative jumps at 0, where each side's own roundings put some pre-activations
# either side of it (its dtypes are tanh's).
@pytest.mark.parametrize("kind", ["gru", "rnn_tanh"])
def test_triton_backend_under_cpu_autocast_matches_torch(
    kind: str, packed: bool, with_h0: bool, dtype: torch.dtype
) -> None:
    """The kernels run in autocast's dtype; on CPU the results take torch's dtypes: the GRU's
    h in h_0's float32 (zeros when omitted; it returned autocast's dtype), the RNN's in
    autocast's."""
    ours, theirs = _pair(kind, "triton", num_layers=2, bidirectional=True)
    theirs.float()
    x = randn(6, B, F_IN, seed=31).float()
    states = (randn(4, B, H, seed=32).float(),) if with_h0 else ()
    lengths = torch.tensor([6, 4, 2]) if packed else None
    check_autocast_matches_torch_with_grads(ours, theirs, x, states, lengths, dtype)


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_triton_cells_under_cpu_autocast_return_torchs_dtypes(name: str) -> None:
    """A Triton cell is one step of the stack: torch's cells keep a float32 c (LSTMCell) or
    h (GRUCell) float32 under autocast (the Triton cells returned bfloat16)."""
    torch.manual_seed(3)
    ours = getattr(fastpar.nn, name)(F_IN, H, backend="triton")
    theirs = getattr(torch.nn, name)(F_IN, H)
    theirs.load_state_dict(ours.state_dict())
    x, h, c = (randn(B, n, seed=s).float() for s, n in ((41, F_IN), (42, H), (43, H)))
    hx = (h, c) if name == "LSTMCell" else h
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = ours(x, hx), theirs(x, hx)
    got, want = (r if isinstance(r, tuple) else (r,) for r in (got, want))
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == b.dtype, f"result {k}: {a.dtype}, torch's {b.dtype}"
        assert_close(a, b, 2e-2, 2e-2, f"result {k} under autocast")  # bfloat16 roundings


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [True, False])
def test_parameters_init_and_state_dicts_match_torch(kind: str, bias: bool) -> None:
    ours_cls, theirs_cls, ours_cell, theirs_cell, options = KINDS[kind]
    kwargs = {"num_layers": 2, "bidirectional": True, "bias": bias, **options}
    for ours_type, theirs_type, kw in (
        (ours_cls, theirs_cls, kwargs),
        (ours_cell, theirs_cell, {"bias": bias, **options}),
    ):
        torch.manual_seed(5)
        ours = ours_type(F_IN, H, **kw)
        torch.manual_seed(5)
        theirs = theirs_type(F_IN, H, **kw)
        a, b = ours.state_dict(), theirs.state_dict()
        assert list(a) == list(b), ours_type.__name__
        for k in a:
            assert torch.equal(a[k], b[k]), k  # same names, shapes, order and initialisation
        # Both directions, strict: the results agree after each load.
        theirs.load_state_dict({k: torch.randn_like(v) for k, v in a.items()})
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(4, B, F_IN) if ours_type is ours_cls else torch.randn(B, F_IN)
        assert_close(_first(ours(x)), _first(theirs(x)), FP32_ATOL, FP32_RTOL, "torch -> ours")
        ours.reset_parameters()
        theirs.load_state_dict(ours.state_dict())
        assert_close(_first(ours(x)), _first(theirs(x)), FP32_ATOL, FP32_RTOL, "ours -> torch")


def _first(result):
    return result[0] if isinstance(result, tuple) else result


@pytest.mark.parametrize("kind", KINDS)
def test_torch_compatibility_helpers(kind: str) -> None:
    ours, theirs = _pair(kind, num_layers=2, bidirectional=True)
    ours.flatten_parameters()  # a no-op, as code written for torch calls it
    assert [[p.shape for p in w] for w in ours.all_weights] == [
        [p.shape for p in w] for w in theirs.all_weights
    ]
    assert ours.mode == theirs.mode
    for name in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                 "bidirectional", "proj_size"):  # fmt: skip
        assert getattr(ours, name) == getattr(theirs, name), name
    assert repr(ours).startswith(repr(theirs)[:-1])  # torch's repr, then fastpar's backend
    assert "backend='reference'" in repr(ours)


def test_bad_input_names_the_argument() -> None:
    m = fastpar.nn.GRU(F_IN, H, num_layers=2)
    x = torch.randn(4, B, F_IN)
    with pytest.raises(ValueError, match="input_size 10"):
        m(torch.randn(4, B, F_IN + 1))
    with pytest.raises(ValueError, match=r"hx \(h_0\) must have shape \(2, 3, 33\)"):
        m(x, torch.randn(1, B, H))
    with pytest.raises(ValueError, match=r"hx \(h_0\) must have shape \(2, 33\)"):
        m(x[:, 0], torch.randn(2, B, H))  # unbatched input, batched state
    with pytest.raises(TypeError, match=r"hx \(h_0\) must be a Tensor, got tuple"):
        m(x, (torch.randn(2, B, H),))
    with pytest.raises(TypeError, match=r"input dtype torch\.float64 does not match"):
        m(x.double())
    with pytest.raises(TypeError, match=r"hx \(h_0\) dtype torch.float64"):
        m(x, torch.randn(2, B, H, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.ones(4, B, F_IN, dtype=torch.int64))
    with pytest.raises(ValueError, match="dimensions"):
        m(torch.randn(B, F_IN, 4, 2))
    for backend in BACKENDS:  # torch's modules refuse T=0 too
        for no_steps in (fastpar.nn.GRU(F_IN, H, backend=backend),
                         fastpar.nn.RNN(F_IN, H, backend=backend)):  # fmt: skip
            with pytest.raises(ValueError, match=r"no time steps \(shape \(0, 10\)"):
                no_steps(torch.randn(0, F_IN))  # unbatched
    with pytest.raises(ValueError, match="is on meta"):
        m(x, torch.randn(2, B, H, device="meta"))
    with pytest.raises(ValueError, match="backend must be one of"):
        fastpar.nn.RNN(F_IN, H, backend="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"nonlinearity must be one of \('tanh', 'relu'\)"):
        fastpar.nn.RNN(F_IN, H, nonlinearity="sigmoid")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"nonlinearity must be one of"):
        fastpar.nn.RNNCell(F_IN, H, nonlinearity="gelu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dropout must be in"):
        fastpar.nn.GRU(F_IN, H, num_layers=2, dropout=1.5)
    with pytest.warns(UserWarning, match="dropout acts between layers"):
        fastpar.nn.GRU(F_IN, H, dropout=0.5)
    with pytest.raises(ValueError, match="hidden_size must be an integer >= 1"):
        fastpar.nn.GRU(F_IN, 0)
    with pytest.raises(TypeError, match="num_layers must be an integer"):
        fastpar.nn.RNN(F_IN, H, num_layers=True)
    with pytest.raises(ValueError, match=r"kernel must be one of"):
        fastpar.nn.GRU(F_IN, H, kernel="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend='torch' runs no Triton kernel"):
        fastpar.nn.RNN(F_IN, H, backend="torch", kernel="step")
    cell = fastpar.nn.GRUCell(F_IN, H)
    with pytest.raises(ValueError, match=r"hx \(h_0\) must have shape \(3, 33\)"):
        cell(torch.randn(B, F_IN), torch.randn(B + 1, H))
    with pytest.raises(ValueError, match="input must have 1 \\(unbatched\\) or 2"):
        cell(x)


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
def test_meta_device_forward_gives_torchs_shapes(name: str) -> None:
    # Shape inference on the meta device (no data), as torch's modules allow it.
    ours = getattr(fastpar.nn, name)(F_IN, H, device="meta")
    theirs = getattr(torch.nn, name)(F_IN, H, device="meta")
    x = torch.randn(4, B, F_IN, device="meta")[0 if name.endswith("Cell") else slice(None)]
    got, want = _tensors(ours(x)), _tensors(theirs(x))
    assert [t.shape for t in got] == [t.shape for t in want]
    assert all(t.device.type == "meta" for t in got)


def _tensors(result: object) -> list[torch.Tensor]:
    """The tensors of a module's result, nested tuples flattened in order."""
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for part in result for t in _tensors(part)]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "cls", [fastpar.nn.LSTM, fastpar.nn.GRU, fastpar.nn.RNN, fastpar.nn.GRUCell]
)
def test_backend_selection(cls: type, monkeypatch: pytest.MonkeyPatch) -> None:
    # The backend choice is fastpar.nn.recurrent's, shared by every module (the LSTM's too).
    cell = cls is fastpar.nn.GRUCell
    x = torch.randn(B, F_IN) if cell else torch.randn(3, B, F_IN)
    named = cls(F_IN, H, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='triton' needs CUDA tensors"):
        named(x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="backend='triton' supports"):
        named.double()(x.double())
    # auto on CPU: torch's kernels (bitwise the torch backend), said through log_once.
    said: list[str] = []
    monkeypatch.setattr(fastpar.nn.recurrent, "log_once", lambda _logger, msg: said.append(msg))
    torch.manual_seed(0)
    auto = cls(F_IN, H, backend="auto")
    torch.manual_seed(0)
    ref = cls(F_IN, H, backend="torch")
    assert torch.equal(_first(auto(x)), _first(ref(x)))
    assert len(said) == 1 and f"torch's native {auto.cell} kernels" in said[0]
    # ... and bitwise torch's own module; float64 too; the reference loop only when named.
    theirs = getattr(torch.nn, cls.__name__)(F_IN, H)
    theirs.load_state_dict(auto.state_dict())
    assert torch.equal(_first(auto(x)), _first(theirs(x)))
    assert torch.equal(_first(auto.double()(x.double())), _first(ref.double()(x.double())))
    torch.manual_seed(0)
    oracle = cls(F_IN, H, backend="reference")
    assert_close(_first(oracle(x)), _first(ref.float()(x)), FP32_ATOL, FP32_RTOL, "reference")


@pytest.mark.parametrize("kind", ["gru", "rnn_relu"])
def test_kernel_argument_reaches_the_triton_recurrence(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = spy_triton(monkeypatch, KINDS[kind][0].__name__)
    module_type, _, _, _, options = KINDS[kind]
    _, theirs = _pair(kind)
    step = module_type(F_IN, H, backend="triton", kernel="step", **options)
    step.load_state_dict(theirs.state_dict())
    assert "kernel='step'" in repr(step)
    x = randn(4, B, F_IN, seed=1)
    assert_close(step(x.float())[0], theirs(x)[0], FP32_ATOL, FP32_RTOL, "kernel='step'")
    assert seen == ["step"]
    # "auto" ignores it where it takes torch's kernels (CPU), so one script runs on both.
    auto = module_type(F_IN, H, kernel="persistent", **options)
    auto.load_state_dict(theirs.state_dict())
    assert_close(auto(x.float())[0], theirs(x)[0], FP32_ATOL, FP32_RTOL, "auto")
    assert seen == ["step"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batched", [True, False])
def test_cell_matches_torch(kind: str, backend: str, batched: bool) -> None:
    _, _, ours_cls, theirs_cls, options = KINDS[kind]
    torch.manual_seed(0)
    ours = ours_cls(F_IN, H, backend=backend, **options)
    torch.manual_seed(0)
    theirs = theirs_cls(F_IN, H, **options).double()
    pairs = zip(ours.parameters(), theirs.parameters(), strict=True)
    assert all(torch.equal(a, b.float()) for a, b in pairs)  # same init from the same seed
    shape = (B,) if batched else ()
    x, h = randn(*shape, F_IN, seed=1), randn(*shape, H, seed=2)
    xs, hs = x.float().requires_grad_(), h.float().requires_grad_()
    xd, hd = x.clone().requires_grad_(), h.clone().requires_grad_()
    got, want = ours(xs, hs), theirs(xd, hd)
    assert_close(got, want, FP32_ATOL, FP32_RTOL, "h_1")
    cot = randn(*want.shape, seed=50)
    g = grads([got], [cot.float()], [xs, hs, *ours.parameters()])
    w = grads([want], [cot], [xd, hd, *theirs.parameters()])
    for k, (a, b) in enumerate(zip(g, w, strict=True)):
        assert_close(a, b, FP32_ATOL, FP32_RTOL, f"gradient {k}")
    assert_close(ours(xs), theirs(xd), FP32_ATOL, FP32_RTOL, "h_1 without hx")


class _Model(torch.nn.Module):
    """A user model holding fastpar's GRU and RNN modules (module-level, so it pickles)."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = fastpar.nn.GRU(F_IN, H, num_layers=2, bidirectional=True)
        self.rnn = fastpar.nn.RNN(2 * H, H, nonlinearity="relu", batch_first=False)
        self.gru_cell = fastpar.nn.GRUCell(F_IN, H)
        self.rnn_cell = fastpar.nn.RNNCell(F_IN, H, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, h_n = self.rnn(self.gru(x)[0])
        return out.sum() + h_n.sum() + self.gru_cell(x[0]).sum() + self.rnn_cell(x[0]).sum()


def test_save_and_load_whole_model_weights_only() -> None:
    model = _Model()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    with torch.serialization.safe_globals([_Model]):  # the user allowlists their own class
        loaded = torch.load(buf)  # default weights_only=True
    x = torch.randn(4, B, F_IN)
    assert type(loaded.gru) is fastpar.nn.GRU and loaded.rnn.nonlinearity == "relu"
    assert torch.equal(loaded(x), model(x))
    for module in (model.gru, model.rnn_cell):
        buf = io.BytesIO()
        torch.save(module, buf)
        buf.seek(0)
        alone = torch.load(buf)  # no allowlist at all
        inp = x if module is model.gru else x[0]
        assert torch.equal(_first(alone(inp)), _first(module(inp)))
    clone = pickle.loads(pickle.dumps(model))
    assert torch.equal(clone(x), model(x))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_layers, bidirectional, batch_first, bias, T", CONFIGS)
def test_backend_on_cuda_matches_torch(
    backend: str, kind: str, num_layers: int, bidirectional: bool, batch_first: bool, bias: bool,
    T: int, cudnn_fp32_ieee: None,
) -> None:  # fmt: skip
    # float32 on CUDA: "auto" takes cuDNN (fastpar.ops.auto_backend), "triton" the kernels; the
    # float64 oracle runs on the GPU too.
    ours, theirs = _pair(
        kind, backend, num_layers=num_layers, bidirectional=bidirectional,
        batch_first=batch_first, bias=bias,
    )  # fmt: skip
    ours, theirs = ours.cuda(), theirs.cuda()
    D = 2 if bidirectional else 1
    shape = (B, T, F_IN) if batch_first else (T, B, F_IN)
    x = randn(*shape, seed=1).cuda()
    _compare(ours, theirs, x, randn(num_layers * D, B, H, seed=2).cuda())
