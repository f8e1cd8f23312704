"""fastpar.nn.LSTM against torch.nn.LSTM (float64): parameters, results, gradients, errors,
saving. The triton backend runs in the interpreter on CPU."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastpar.nn
from fastpar.ops.aten_common import per_layer_ops
from tests.nn.recurrent_helpers import (
    check_autocast_dtypes_match_torch,
    check_autocast_matches_torch_with_grads,
    check_autocast_takes_states_and_half_input,
    compare_with_torch,
    spy_triton,
)
from tests.ops.lstm_helpers import (
    DTYPE_TOLERANCES,
    FP32_ATOL,
    FP32_RTOL,
    assert_close,
    assert_within_torch_error,
    grads,
    randn,
)

F_IN, H, B = 10, 33, 3


def _pair(backend: str = "triton", dtype: torch.dtype = torch.float32, **kwargs: object):
    """A fastpar LSTM and a float64 torch.nn.LSTM with the same weights."""
    torch.manual_seed(0)
    ours = fastpar.nn.LSTM(F_IN, H, backend=backend, **kwargs)  # type: ignore[arg-type]
    theirs = torch.nn.LSTM(F_IN, H, **kwargs).double()  # type: ignore[arg-type]
    theirs.load_state_dict(ours.state_dict())
    return ours.to(dtype), theirs


# Outputs and the gradients of input, h0, c0 and every parameter, ours vs float64 (asserted
# within atol/rtol when check, else only returned); hx = (h_0, c_0).
_compare = compare_with_torch


CONFIGS = [
    # num_layers, bidirectional, proj_size, batch_first, bias, T
    (1, False, 0, False, True, 1),
    (1, False, 0, True, True, 7),
    (2, True, 0, False, True, 7),
    (3, False, 5, False, False, 7),
    (2, True, 4, True, True, 7),
]


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("num_layers, bidirectional, proj_size, batch_first, bias, T", CONFIGS)
def test_matches_torch_lstm(
    backend: str,
    num_layers: int,
    bidirectional: bool,
    proj_size: int,
    batch_first: bool,
    bias: bool,
    T: int,
) -> None:
    ours, theirs = _pair(
        backend, num_layers=num_layers, bidirectional=bidirectional, proj_size=proj_size,
        batch_first=batch_first, bias=bias,
    )  # fmt: skip
    D = 2 if bidirectional else 1
    x = randn(B, T, F_IN, seed=1) if batch_first else randn(T, B, F_IN, seed=1)
    hx = (randn(num_layers * D, B, proj_size or H, seed=2), randn(num_layers * D, B, H, seed=3))
    _compare(ours, theirs, x, hx)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLERANCES)
def test_dtypes_against_torch_own_error(
    backend: str, dtype: torch.dtype, atol: float, rtol: float
) -> None:
    # Half types: fastpar's error against float64 within a small multiple of torch.nn.LSTM's
    # own error when it runs in that dtype, on the same rounded weights and inputs.
    ours, theirs = _pair(backend, num_layers=2, bidirectional=True)
    ours = ours.to(dtype)
    theirs.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    x = randn(5, B, F_IN, seed=1).to(dtype).double()
    hx = tuple(randn(4, B, H, seed=s).to(dtype).double() for s in (2, 3))
    if dtype == torch.float32:
        _compare(ours, theirs, x, hx)
        return
    torch_own = torch.nn.LSTM(F_IN, H, num_layers=2, bidirectional=True).to(dtype)
    torch_own.load_state_dict(ours.state_dict())
    got, exp, names = _compare(ours, theirs, x, hx, dtype, check=False)
    own, _, _ = _compare(torch_own, theirs, x, hx, dtype, check=False)
    for name, a, t, e in zip(names, got, own, exp, strict=True):
        assert_within_torch_error(a, t, e, atol, rtol, name)


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_packed_unsorted_lengths(backend: str) -> None:
    ours, theirs = _pair(backend, num_layers=2, bidirectional=True)
    T = 6
    lengths = torch.tensor([3, 6, 1])  # unsorted
    x = randn(T, B, F_IN, seed=1)
    hx = (randn(4, B, H, seed=2), randn(4, B, H, seed=3))
    xs = x.float().requires_grad_()
    xd = x.clone().requires_grad_()
    hs = tuple(h.float().requires_grad_() for h in hx)
    hd = tuple(h.clone().requires_grad_() for h in hx)
    out, (h_n, c_n) = ours(pack_padded_sequence(xs, lengths, enforce_sorted=False), hs)
    want, (want_h, want_c) = theirs(pack_padded_sequence(xd, lengths, enforce_sorted=False), hd)
    assert torch.equal(out.batch_sizes, want.batch_sizes)
    assert torch.equal(out.sorted_indices, want.sorted_indices)
    assert torch.equal(out.unsorted_indices, want.unsorted_indices)
    for name, a, b in (("output", out.data, want.data), ("h_n", h_n, want_h), ("c_n", c_n, want_c)):
        assert_close(a, b, FP32_ATOL, FP32_RTOL, name)
    cot = [randn(*t.shape, seed=40 + k) for k, t in enumerate((want.data, want_h, want_c))]
    got = grads((out.data, h_n, c_n), [c.float() for c in cot], [xs, *hs, *ours.parameters()])
    exp = grads((want.data, want_h, want_c), cot, [xd, *hd, *theirs.parameters()])
    for k, (a, b) in enumerate(zip(got, exp, strict=True)):
        assert_close(a, b, FP32_ATOL, FP32_RTOL, f"gradient {k}")
    # Inputs past each length get no gradient, as in torch.
    assert got[0][3:, 0].abs().max() == 0


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("training", [True, False])
def test_dropout_train_and_eval(backend: str, training: bool) -> None:
    # torch.nn.LSTM draws one dropout mask per layer output, as lstm_stack does: with the same
    # seed the masks, and so the results, are the same.
    ours, theirs = _pair(backend, num_layers=3, dropout=0.5)
    ours.train(training)
    theirs.train(training)
    x = randn(7, B, F_IN, seed=1)
    hx = (randn(3, B, H, seed=2), randn(3, B, H, seed=3))
    torch.manual_seed(123)
    out, _ = ours(x.float(), tuple(h.float() for h in hx))
    torch.manual_seed(123)
    want, _ = theirs(x, hx)
    assert_close(out, want, FP32_ATOL, FP32_RTOL, "output")
    # And dropout really acted in training (and not in eval).
    torch.manual_seed(7)
    other, _ = ours(x.float(), tuple(h.float() for h in hx))
    assert torch.equal(other, out) != training


def test_unbatched_input() -> None:
    ours, theirs = _pair(num_layers=2, bidirectional=True, proj_size=4)
    x = randn(5, F_IN, seed=1)
    hx = (randn(4, 4, seed=2), randn(4, H, seed=3))
    out, (h_n, c_n) = ours(x.float(), tuple(h.float() for h in hx))
    want, (want_h, want_c) = theirs(x, hx)
    assert out.shape == want.shape == (5, 8)
    for name, a, b in (("output", out, want), ("h_n", h_n, want_h), ("c_n", c_n, want_c)):
        assert_close(a, b, FP32_ATOL, FP32_RTOL, name)
    out0, (h0, _) = ours(x.float())  # no hx: zeros
    want0, (wh0, _) = theirs(x)
    assert_close(out0, want0, FP32_ATOL, FP32_RTOL, "output without hx")
    assert h0.shape == wh0.shape


@pytest.mark.parametrize("proj_size, bias", [(0, True), (5, False)])
def test_parameters_and_init_match_torch(proj_size: int, bias: bool) -> None:
    kwargs = {"num_layers": 2, "bidirectional": True, "proj_size": proj_size, "bias": bias}
    torch.manual_seed(5)
    ours = fastpar.nn.LSTM(F_IN, H, **kwargs)
    torch.manual_seed(5)
    theirs = torch.nn.LSTM(F_IN, H, **kwargs)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # same names, shapes, order and initialisation
    theirs.load_state_dict(ours.state_dict())  # both directions, strict
    ours.load_state_dict(theirs.state_dict())


def test_bad_input_names_the_argument() -> None:
    m = fastpar.nn.LSTM(F_IN, H, num_layers=2)
    x = torch.randn(4, B, F_IN)
    with pytest.raises(ValueError, match="input_size 10"):
        m(torch.randn(4, B, F_IN + 1))
    with pytest.raises(ValueError, match=r"hx\[0\] \(h_0\) must have shape \(2, 3, 33\)"):
        m(x, (torch.randn(1, B, H), torch.randn(2, B, H)))
    with pytest.raises(ValueError, match=r"hx\[1\] \(c_0\) must have shape"):
        m(x, (torch.randn(2, B, H), torch.randn(2, B, H + 1)))
    with pytest.raises(TypeError, match=r"input dtype torch\.float64 does not match"):
        m(x.double())
    with pytest.raises(TypeError, match=r"hx\[0\] \(h_0\) dtype torch.float64"):
        m(x, (torch.randn(2, B, H, dtype=torch.float64), torch.randn(2, B, H)))
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.ones(4, B, F_IN, dtype=torch.int64))
    with pytest.raises(ValueError, match="dimensions"):
        m(torch.randn(B, F_IN, 4, 2))
    for backend in ("triton", "torch", "reference"):  # torch.nn.LSTM refuses T=0 too
        no_steps = fastpar.nn.LSTM(F_IN, H, batch_first=True, backend=backend)
        with pytest.raises(ValueError, match=r"no time steps \(shape \(3, 0, 10\)"):
            no_steps(torch.randn(B, 0, F_IN))
    with pytest.raises(ValueError, match="is on meta"):
        m(x, (torch.randn(2, B, H, device="meta"), torch.randn(2, B, H)))
    with pytest.raises(TypeError, match=r"hx must be a tuple \(h_0, c_0\)"):
        m(x, torch.randn(2, B, H))
    with pytest.raises(ValueError, match="backend must be one of"):
        fastpar.nn.LSTM(F_IN, H, backend="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="proj_size must be smaller than hidden_size"):
        fastpar.nn.LSTM(F_IN, H, proj_size=H)
    with pytest.raises(ValueError, match="dropout must be in"):
        fastpar.nn.LSTM(F_IN, H, num_layers=2, dropout=1.5)
    with pytest.raises(ValueError, match="hidden_size must be an integer >= 1"):
        fastpar.nn.LSTM(F_IN, 0)


def test_kernel_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"kernel must be one of \('auto', 'step', 'persistent'\)"):
        fastpar.nn.LSTM(F_IN, H, kernel="fast")  # type: ignore[arg-type]
    for backend in ("torch", "reference"):
        with pytest.raises(ValueError, match=f"backend='{backend}' runs no Triton kernel"):
            fastpar.nn.LSTM(F_IN, H, backend=backend, kernel="step")  # type: ignore[arg-type]
    x = torch.randn(4, B, F_IN)
    torch.manual_seed(0)
    step = fastpar.nn.LSTM(F_IN, H, backend="triton", kernel="step")
    assert "kernel='step'" in repr(step)
    torch.manual_seed(0)
    ref = fastpar.nn.LSTM(F_IN, H, backend="torch")
    # The variant reaches the Triton recurrence (interpreter on CPU) ...
    seen = spy_triton(monkeypatch, "LSTM")
    assert_close(step(x)[0], ref(x)[0], FP32_ATOL, FP32_RTOL, "kernel='step'")
    assert seen == ["step"]
    # ... and "auto" ignores it where it takes torch's kernels (CPU), so one script runs on both.
    torch.manual_seed(0)
    auto = fastpar.nn.LSTM(F_IN, H, kernel="persistent")
    assert torch.equal(auto(x)[0], ref(x)[0]) and seen == ["step"]


class _Model(torch.nn.Module):
    """A user model holding a fastpar LSTM (module-level, so it can be pickled and loaded)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = fastpar.nn.LSTM(F_IN, H, num_layers=2, bidirectional=True)
        self.cell = fastpar.nn.LSTMCell(F_IN, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0].sum() + self.cell(x[0])[0].sum()


def test_save_and_load_whole_model_weights_only() -> None:
    model = _Model()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    # The user allowlists their own class, as torch documents; fastpar's need nothing.
    with torch.serialization.safe_globals([_Model]):
        loaded = torch.load(buf)  # default weights_only=True
    x = torch.randn(4, B, F_IN)
    assert type(loaded.rnn) is fastpar.nn.LSTM
    assert torch.equal(loaded(x), model(x))
    buf = io.BytesIO()
    torch.save(model.rnn, buf)
    buf.seek(0)
    alone = torch.load(buf)  # no allowlist at all
    assert torch.equal(alone(x)[0], model.rnn(x)[0])


def _forward_in_child(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).detach()


def test_pickle_and_multiprocessing() -> None:
    model = _Model()
    x = torch.randn(4, B, F_IN)
    clone = pickle.loads(pickle.dumps(model))
    assert torch.equal(clone(x), model(x))
    ctx = torch.multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        got = pool.apply(_forward_in_child, (model, x))
    assert torch.equal(got, model(x).detach())


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("batched", [True, False])
def test_lstm_cell_matches_torch(backend: str, batched: bool) -> None:
    torch.manual_seed(0)
    ours = fastpar.nn.LSTMCell(F_IN, H, backend=backend)  # type: ignore[arg-type]
    torch.manual_seed(0)
    theirs = torch.nn.LSTMCell(F_IN, H).double()
    pairs = zip(ours.parameters(), theirs.parameters(), strict=True)
    assert all(torch.equal(a, b.float()) for a, b in pairs)  # same init from the same seed
    shape = (B,) if batched else ()
    x = randn(*shape, F_IN, seed=1)
    h, c = randn(*shape, H, seed=2), randn(*shape, H, seed=3)
    leaves_s = [t.float().requires_grad_() for t in (x, h, c)]
    leaves_d = [t.clone().requires_grad_() for t in (x, h, c)]
    got = ours(leaves_s[0], (leaves_s[1], leaves_s[2]))
    want = theirs(leaves_d[0], (leaves_d[1], leaves_d[2]))
    cot = [randn(*t.shape, seed=50 + k) for k, t in enumerate(want)]
    g = grads(got, [c.float() for c in cot], [*leaves_s, *ours.parameters()])
    w = grads(want, cot, [*leaves_d, *theirs.parameters()])
    for k, (a, b) in enumerate(zip([*got, *g], [*want, *w], strict=True)):
        assert_close(a, b, FP32_ATOL, FP32_RTOL, f"result {k}")
    with pytest.raises(ValueError, match="input_size 10"):
        ours(torch.randn(B, F_IN + 2))


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("autocast", [False, True])
def test_lstm_cell_on_torchs_kernels_is_torchs_cell(backend: str, autocast: bool) -> None:
    # torch.nn.LSTMCell's results bit for bit, and its dtypes under autocast: there its float32
    # c_0 keeps the new state in float32 (a one-step LSTM stack gave bfloat16).
    torch.manual_seed(0)
    ours = fastpar.nn.LSTMCell(F_IN, H, backend=backend)  # type: ignore[arg-type]
    theirs = torch.nn.LSTMCell(F_IN, H)
    theirs.load_state_dict(ours.state_dict())
    x = randn(B, F_IN, seed=1).float()
    hx = (randn(B, H, seed=2).float(), randn(B, H, seed=3).float())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got, want = ours(x, hx), theirs(x, hx)
    for a, b, name in zip(got, want, ("h_1", "c_1"), strict=True):
        assert a.dtype == b.dtype, f"{name}: {a.dtype} != torch's {b.dtype}"
        assert torch.equal(a, b), name


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("num_layers, bidirectional, proj_size, batch_first, bias, T", CONFIGS)
def test_backend_on_cuda_matches_torch(
    backend: str, num_layers: int, bidirectional: bool, proj_size: int, batch_first: bool,
    bias: bool, T: int, cudnn_fp32_ieee: None,
) -> None:  # fmt: skip
    # float32 on CUDA: "auto" takes cuDNN (fastpar.ops.auto_backend), "triton" the kernels; the
    # float64 oracle runs on the GPU too.
    ours, theirs = _pair(
        backend, num_layers=num_layers, bidirectional=bidirectional, proj_size=proj_size,
        batch_first=batch_first, bias=bias,
    )  # fmt: skip
    ours, theirs = ours.cuda(), theirs.cuda()
    D = 2 if bidirectional else 1
    shape = (B, T, F_IN) if batch_first else (T, B, F_IN)
    x = randn(*shape, seed=1).cuda()
    hx = tuple(randn(num_layers * D, B, n, seed=s).cuda() for s, n in ((2, proj_size or H), (3, H)))
    _compare(ours, theirs, x, hx)


def test_autocast_runs_the_kernels_in_the_autocast_dtype() -> None:
    model = fastpar.nn.LSTM(F_IN, H, num_layers=2, proj_size=5, backend="triton")
    ref = fastpar.nn.LSTM(F_IN, H, num_layers=2, proj_size=5, backend="torch").double()
    ref.load_state_dict(model.state_dict())
    x = randn(6, B, F_IN, seed=1).float()
    exact, _ = ref(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h_n, c_n) = model(x)
    # h goes through the projection (a matmul); c_n keeps c_0's float32, as in torch's loop.
    assert out.dtype == h_n.dtype == torch.bfloat16 and c_n.dtype == torch.float32
    assert_close(out, exact, 2e-2, 2e-2, "output under autocast")  # one bfloat16 rounding
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_autocast_takes_the_previous_calls_states_and_a_half_input(backend: str) -> None:
    ours, theirs = _pair(backend, num_layers=2, proj_size=5)
    half_module, rounded = _pair(backend, dtype=torch.bfloat16, num_layers=2, proj_size=5)
    rounded.load_state_dict(half_module.state_dict())  # float64, the bfloat16 weights
    x1, x2 = randn(6, B, F_IN, seed=1), randn(6, B, F_IN, seed=2)
    check_autocast_takes_states_and_half_input(ours, theirs, half_module, rounded, x1, x2)
    cell = fastpar.nn.LSTMCell(F_IN, H, backend=backend)
    torch.manual_seed(0)
    theirs_cell = torch.nn.LSTMCell(F_IN, H).double()
    theirs_cell.load_state_dict(cell.state_dict())
    exact_cell = theirs_cell(x2[0], theirs_cell(x1[0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_cell = cell(x2[0].float(), cell(x1[0].float()))
    for a, b, name in zip(got_cell, exact_cell, ("h_1", "c_1"), strict=True):
        assert_close(a, b, 2e-2, 2e-2, f"LSTMCell {name} from the previous step under autocast")


@pytest.mark.parametrize(
    "options, packed",
    [({}, False), ({"num_layers": 2, "bidirectional": True}, False), ({"proj_size": 5}, False),
     ({}, True), ({"num_layers": 2, "proj_size": 5}, True)],
)  # fmt: skip
def test_reference_backend_under_autocast_returns_torchs_dtypes(
    options: dict[str, object], packed: bool
) -> None:
    """torch.nn.LSTM returns everything in autocast's dtype where oneDNN runs it, and c_n in
    float32 elsewhere (a projection, packed input); the reference backend follows."""
    torch.manual_seed(0)
    ours = fastpar.nn.LSTM(F_IN, H, backend="reference", **options)  # type: ignore[arg-type]
    theirs = torch.nn.LSTM(F_IN, H, **options)  # type: ignore[arg-type]
    theirs.load_state_dict(ours.state_dict())
    x = randn(6, B, F_IN, seed=1).float()
    check_autocast_dtypes_match_torch(
        ours, theirs, pack_padded_sequence(x, torch.tensor([6, 4, 2])) if packed else x
    )


@pytest.mark.parametrize(
    "options", [{}, {"num_layers": 2, "bidirectional": True}, {"proj_size": 5}]
)
def test_torch_backend_on_packed_input_under_autocast_returns_torchs_dtypes(
    options: dict[str, object],
) -> None:
    """Packed input on CPU runs fastpar's per-layer op (in autocast's dtype), where torch's
    packed loop casts op by op: c_n, and h without a projection, stay float32."""
    torch.manual_seed(0)
    ours = fastpar.nn.LSTM(F_IN, H, backend="torch", **options)  # type: ignore[arg-type]
    theirs = torch.nn.LSTM(F_IN, H, **options)  # type: ignore[arg-type]
    theirs.load_state_dict(ours.state_dict())
    x = pack_padded_sequence(randn(6, B, F_IN, seed=1).float(), torch.tensor([6, 4, 2]))
    check_autocast_dtypes_match_torch(ours, theirs, x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize(
    "options, packed",
    [({"num_layers": 2, "bidirectional": True}, False), ({"num_layers": 2, "proj_size": 5}, False),
     ({"num_layers": 2, "bidirectional": True}, True), ({"num_layers": 2, "proj_size": 5}, True)],
)  # fmt: skip
def test_per_layer_ops_under_autocast_return_torchs_dtypes(
    options: dict[str, object], packed: bool, training: bool, dtype: torch.dtype
) -> None:
    """The per-layer op (compiled graphs, vmap, split pipeline stages) returns torch.nn.LSTM's
    dtypes under autocast. torch decides once for the stack, from its input, whether oneDNN
    casts it whole; the second layer's input (the first's output, in autocast's dtype) must not
    decide again (it did, returning float32 where oneDNN lacks bfloat16)."""
    torch.manual_seed(0)
    ours = fastpar.nn.LSTM(F_IN, H, backend="torch", **options)  # type: ignore[arg-type]
    theirs = torch.nn.LSTM(F_IN, H, **options)  # type: ignore[arg-type]
    theirs.load_state_dict(ours.state_dict())
    ours.train(training), theirs.train(training)
    x = randn(6, B, F_IN, seed=1).float()
    with per_layer_ops():
        check_autocast_dtypes_match_torch(
            ours, theirs, pack_padded_sequence(x, torch.tensor([6, 4, 2])) if packed else x, dtype
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize(
    "options", [{}, {"num_layers": 2, "bidirectional": True}, {"proj_size": 5}]
)
def test_triton_backend_under_cpu_autocast_matches_torch(
    options: dict[str, object], packed: bool, dtype: torch.dtype
) -> None:
    """The kernels run in autocast's dtype; on CPU the results take torch.nn.LSTM's dtypes:
    all autocast's on oneDNN, c_n (and h without a projection) in c_0's float32 where torch's
    loop runs (projection, packed input; it returned them all in autocast's dtype)."""
    torch.manual_seed(11)
    ours = fastpar.nn.LSTM(F_IN, H, backend="triton", **options)  # type: ignore[arg-type]
    theirs = torch.nn.LSTM(F_IN, H, **options)  # type: ignore[arg-type]
    theirs.load_state_dict(ours.state_dict())
    D = 2 if options.get("bidirectional") else 1
    L = D * int(options.get("num_layers", 1))  # type: ignore[call-overload]
    P = int(options.get("proj_size", 0)) or H  # type: ignore[call-overload]
    x = randn(6, B, F_IN, seed=21).float()
    states = (randn(L, B, P, seed=22).float(), randn(L, B, H, seed=23).float())
    lengths = torch.tensor([6, 4, 2]) if packed else None
    check_autocast_matches_torch_with_grads(ours, theirs, x, states, lengths, dtype)


def test_float64_packed_input_under_autocast_stays_float64() -> None:
    """Autocast leaves float64 alone (see the GRU's and RNN's test)."""
    ours, theirs = _pair("torch", dtype=torch.float64)
    x = pack_padded_sequence(randn(6, B, F_IN, seed=1), torch.tensor([6, 4, 2]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (out, finals), (want_out, want_finals) = ours(x), theirs(x)
    assert_close(out.data, want_out.data, 1e-12, 1e-12, "output")
    for a, b, name in zip(finals, want_finals, ("h_n", "c_n"), strict=True):
        assert a.dtype == torch.float64, name
        assert_close(a, b, 1e-12, 1e-12, name)


def test_torch_compatibility_helpers() -> None:
    ours, theirs = _pair(num_layers=2, bidirectional=True, proj_size=4)
    ours.flatten_parameters()  # a no-op, as code written for torch.nn.LSTM calls it
    assert [[p.shape for p in w] for w in ours.all_weights] == [
        [p.shape for p in w] for w in theirs.all_weights
    ]
    assert "proj_size=4" in repr(ours) and "backend='triton'" in repr(ours)
