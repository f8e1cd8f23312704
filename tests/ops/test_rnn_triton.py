"""The Triton GRU and Elman RNN recurrences (the LSTM's step and persistent kernels with another
cell, custom ops, autograd) against the float64 references of rnn_reference.py, which
test_rnn_reference.py checks against torch.nn.GRU / torch.nn.RNN. Runs in the interpreter on
CPU; the tests marked gpu run the compiled kernels (many programs meeting at the barrier)."""

from __future__ import annotations

import functools

import pytest
import torch

from fastpar.ops.lstm_config import (
    choose_kernel,
    persistent_config,
    step_config,
)
from fastpar.ops.lstm_forward import recurrence_forward
from fastpar.ops.reference import step_mask, time_steps
from fastpar.ops.rnn_op import cell_recurrence_op, gru_recurrence_triton, rnn_recurrence_triton
from fastpar.ops.rnn_reference import (
    gru_recurrence_reference,
    gru_stack,
    rnn_recurrence_reference,
    rnn_stack,
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
from tests.ops.test_rnn_reference import _module, _weights

CELLS = ["gru", "rnn_tanh", "rnn_relu"]
B, H = 3, 33
LENGTHS = torch.tensor([7, 2, 5])  # unsorted, one full, one short
NAMES = ["hs", "d xg", "d h0", "d w_hh", "d b_hn"]


def cell_inputs(
    cell: str,
    T: int,
    dtype: torch.dtype,
    batch: int = B,
    hidden: int = H,
    bias: bool = True,
    device: str = "cpu",
) -> list[torch.Tensor]:
    """Random [xg, h0, w_hh(, b_hn)] leaves: b_hn for the GRU with a bias."""
    G = 3 if cell == "gru" else 1
    # Pre-activations O(1) at any hidden size; W_hh's spectral radius about 2 for the gated
    # GRU, 1 for the RNN, whose relu would otherwise grow without bound over long sequences.
    scale = (2.0 if cell == "gru" else 1.0) * hidden**-0.5
    tensors = [
        randn(T, batch, G * hidden, seed=1),  # xg
        randn(batch, hidden, seed=2),  # h0
        randn(G * hidden, hidden, seed=4) * scale,  # w_hh
    ]
    if cell == "gru" and bias:
        tensors.append(randn(hidden, seed=5))  # b_hn
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in tensors]


def _relu_rnn_along(xg, h0, w_hh, lengths, reverse, active):
    """The relu RNN's recurrence with relu's 0/1 derivative pattern fixed to ``active`` (T, B,
    H): equal to rnn_recurrence_reference wherever its own pattern is the same."""
    h = h0
    hs = [h0] * xg.shape[0]
    for t in time_steps(xg.shape[0], reverse):
        h_new = torch.where(active[t], xg[t] + h @ w_hh.t(), 0.0)
        h = h_new if lengths is None else torch.where(step_mask(lengths, t), h_new, h)
        hs[t] = h
    return torch.stack(hs)


def run_cell(
    cell, inputs, lengths, reverse, kernel: str | None = None, active=None
) -> list[torch.Tensor]:
    """[hs and the gradient of every input] for a random cotangent; kernel None: the float64
    reference (in the inputs' dtype), else the Triton op with that kernel. active: for
    "rnn_relu", the reference follows this activation pattern (see _half_type_references)."""
    xg, h0, w_hh = inputs[:3]
    if active is not None:
        hs = _relu_rnn_along(xg, h0, w_hh, lengths, reverse, active)
    elif cell == "gru":
        b_hn = inputs[3] if len(inputs) > 3 else None
        if kernel is None:
            hs = gru_recurrence_reference(xg, h0, w_hh, b_hn, lengths, reverse)
        else:
            hs = gru_recurrence_triton(xg, h0, w_hh, b_hn, lengths, reverse, kernel=kernel)
    else:
        nl = cell.removeprefix("rnn_")
        if kernel is None:
            hs = rnn_recurrence_reference(xg, h0, w_hh, lengths, reverse, nl)
        else:
            hs = rnn_recurrence_triton(xg, h0, w_hh, lengths, reverse, nl, kernel=kernel)
    cot = randn(*hs.shape, seed=20).to(hs)
    return [hs, *grads((hs,), (cot,), inputs)]


def _exact(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().double().requires_grad_() for t in inputs]


def _assert_all_close(ours, want, atol=FP32_ATOL, rtol=FP32_RTOL, what="") -> None:
    assert len(ours) == len(want)
    for name, a, b in zip(NAMES, ours, want, strict=False):
        assert a.shape == b.shape, f"{name}: {a.shape} != {b.shape}"
        assert_close(a, b, atol, rtol, f"{name} {what}")


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("kernel", ["step", "persistent"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_kernels_match_reference(cell: str, kernel: str, packed: bool, reverse: bool) -> None:
    # H=33 is no multiple of any tile; lengths stop rows at different steps.
    T = 7
    lengths = LENGTHS if packed else None
    inputs = cell_inputs(cell, T, torch.float32)
    ours = run_cell(cell, inputs, lengths, reverse, kernel)
    want = run_cell(cell, _exact(inputs), lengths, reverse)
    _assert_all_close(ours, want)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("kernel", ["step", "persistent"])
def test_single_step_and_gru_without_bias(cell: str, kernel: str) -> None:
    inputs = cell_inputs(cell, 1, torch.float32, bias=False)
    _assert_all_close(
        run_cell(cell, inputs, None, False, kernel), run_cell(cell, _exact(inputs), None, False)
    )


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("kernel", ["step", "persistent"])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLERANCES)
def test_dtypes_match_reference(
    cell: str, kernel: str, dtype: torch.dtype, atol: float, rtol: float
) -> None:
    # float32 against float64 within atol/rtol. Half types: the kernels keep the state and the
    # gate math in float32, so their error against float64 (on the same rounded inputs) must
    # stay within a small multiple of PyTorch's own error when it computes in that dtype.
    inputs = cell_inputs(cell, 7, dtype)
    ours = run_cell(cell, inputs, LENGTHS, False, kernel)
    want = run_cell(cell, _exact(inputs), LENGTHS, False)
    for a in ours:
        assert a.dtype == dtype
    if dtype == torch.float32:
        _assert_all_close(ours, want, atol, rtol)
        return
    torchs, want = _half_type_references(cell, inputs, LENGTHS, False, ours[0])
    for name, a, t, b in zip(NAMES, ours, torchs, want, strict=False):
        assert_within_torch_error(a, t, b, atol, rtol, name)


def _half_type_references(cell, inputs, lengths, reverse, hs):
    """PyTorch's own results in the inputs' (half) dtype and the float64 ones, for the bound of
    assert_within_torch_error. relu's derivative jumps at 0, so a pre-activation within
    rounding of 0 may take either side in a half type, and the gradient with it: for the relu
    RNN both references follow the kernel's activation pattern (hs > 0), whose gradients are
    then continuous in the rounding."""
    active = hs.detach() > 0 if cell == "rnn_relu" else None
    torch_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    torchs = run_cell(cell, torch_inputs, lengths, reverse, active=active)
    return torchs, run_cell(cell, _exact(inputs), lengths, reverse, active=active)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("hidden, reverse", [(70, False), (70, True), (130, True)])
def test_step_body_with_many_programs(cell: str, hidden: int, reverse: bool) -> None:
    # B=70 is two batch tiles of 64 (the second mostly masked) and H=70 three hidden tiles of
    # 32 (the last mostly masked) in the interpreter's step configuration: six programs run
    # the body the persistent kernel runs, with all of h_{t-1} in one dot. At H=130 W_hh's
    # share no longer fits in registers (w_fits_registers), so the body loops over K tiles
    # (the GPU's step path for wide layers). T=6 with every length 1..6: the tiling is the
    # subject, and each further step is one more launch of the same programs.
    T, batch = 6, 70
    resident = step_config(batch, hidden, torch.float32, 1, interpreter=True, cell=cell).w_resident
    assert resident == (hidden == 70)
    lengths = torch.arange(batch) * 5 % T + 1  # unsorted
    inputs = cell_inputs(cell, T, torch.float32, batch=batch, hidden=hidden)
    ours = run_cell(cell, inputs, lengths, reverse, "step")
    _assert_all_close(ours, run_cell(cell, _exact(inputs), lengths, reverse))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("reverse", [False, True])
def test_persistent_with_several_batch_blocks(cell: str, reverse: bool) -> None:
    # Two batch blocks of 64, each with its barrier counter. With T=6 and no length above 4
    # (the second block's stop at 2), both blocks skip the steps past their longest sequence.
    lengths = torch.arange(70) % 4 + 1
    lengths[64:] = torch.tensor([1, 2, 1, 2, 1, 2])
    inputs = cell_inputs(cell, 6, torch.float32, batch=70, hidden=20)
    ours = run_cell(cell, inputs, lengths, reverse, "persistent")
    _assert_all_close(ours, run_cell(cell, _exact(inputs), lengths, reverse))


@pytest.mark.parametrize("kernel", ["step", "persistent"])
def test_backward_is_deterministic(kernel: str) -> None:
    for cell in CELLS:
        inputs = cell_inputs(cell, 7, torch.float32)
        first = run_cell(cell, inputs, LENGTHS, True, kernel)
        second = run_cell(cell, inputs, LENGTHS, True, kernel)
        for name, a, b in zip(NAMES, first, second, strict=False):
            assert torch.equal(a, b), f"{cell} {name} differs between two identical runs"


@pytest.mark.parametrize("cell", CELLS)
def test_inference_keeps_nothing_for_backward(cell: str) -> None:
    xg, h0, w_hh, *b = (t.detach() for t in cell_inputs(cell, 7, torch.float32))
    b_hn = b[0] if b else None
    lengths = LENGTHS.to(torch.int32)
    hs, gates = cell_recurrence_op(xg, h0, w_hh, b_hn, lengths, True, cell, "step", False)
    assert gates.numel() == 0
    trained = cell_recurrence_op(xg, h0, w_hh, b_hn, lengths, True, cell, "step", True)
    # Only the GRU saves anything besides hs: r, z, n and h W_hn^T + b_hn, (T, B, 4H).
    assert trained[1].shape == ((7, B, 4 * H) if cell == "gru" else (0, 0, 4 * H))
    assert torch.equal(hs, trained[0])
    with torch.no_grad():
        inputs = [t.requires_grad_() for t in (xg, h0, w_hh, *b)]
        if cell == "gru":
            got = gru_recurrence_triton(*inputs, lengths, True)
        else:
            got = rnn_recurrence_triton(*inputs, lengths, True, cell.removeprefix("rnn_"))
    assert not got.requires_grad
    assert torch.equal(got, hs)


@pytest.mark.parametrize("cell", CELLS)
def test_tf32_dots_round_their_operands(cell: str) -> None:
    # float32 dots take the LSTM's precision switch (lstm_config.dot_precision); the interpreter
    # rounds TF32 operands itself, so the TF32 path runs here: its error exceeds IEEE's.
    xg, h0, w_hh, *b = (t.detach() for t in cell_inputs(cell, 7, torch.float32))
    state = h0.float()
    want = run_cell(cell, _exact([xg, h0, w_hh, *b]), None, False)[0]
    errors = {}
    for precision in ("ieee", "tf32"):
        hs = recurrence_forward(
            cell, xg, h0, state, w_hh, b[0] if b else None, kernel="step", precision=precision
        ).hs  # fmt: skip
        errors[precision] = (hs.double() - want).abs().max().item()
    assert errors["ieee"] <= FP32_ATOL
    assert 10 * errors["ieee"] < errors["tf32"] <= 5e-3, errors


def test_bad_inputs_name_the_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    xg, h0, w_hh, b_hn = cell_inputs("gru", 3, torch.float32)
    with pytest.raises(ValueError, match=r"h0 must have shape \(3, 33\)"):
        gru_recurrence_triton(xg, h0[:, :5], w_hh, b_hn)
    with pytest.raises(ValueError, match=r"w_hh must have shape \(99, 33\)"):
        gru_recurrence_triton(xg, h0, w_hh[:, :5], b_hn)
    with pytest.raises(ValueError, match=r"b_hn must have shape \(33,\)"):
        gru_recurrence_triton(xg, h0, w_hh, b_hn[:5])
    with pytest.raises(TypeError, match=r"b_hn dtype torch\.float64 does not match"):
        gru_recurrence_triton(xg, h0, w_hh, b_hn.double())
    with pytest.raises(ValueError, match=r"xg must have shape \(T, B, 3\*H\)"):
        gru_recurrence_triton(xg[..., :-1], h0, w_hh, b_hn)
    with pytest.raises(TypeError, match="xg must be one of"):
        rnn_recurrence_triton(xg.double(), h0.double(), w_hh.double())
    with pytest.raises(ValueError, match="nonlinearity must be one of"):
        rnn_recurrence_triton(xg, h0, w_hh, nonlinearity="sigmoid")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kernel must be one of"):
        gru_recurrence_triton(xg, h0, w_hh, b_hn, kernel="fast")  # type: ignore[arg-type]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        gru_recurrence_triton(xg, h0, w_hh, b_hn)


def test_configs_keep_every_dot_at_least_16_wide() -> None:
    # The forward dot's N is GS*block_h: 4 gate slots for the LSTM and GRU, 1 for the RNN.
    bf16 = torch.bfloat16
    for cell, slots in (("lstm", 4), ("gru", 4), ("rnn_tanh", 1), ("rnn_relu", 1)):
        step = step_config(16, 768, bf16, 132, cell=cell)  # type: ignore[arg-type]
        assert slots * step.block_h >= 16 and step.block_h_bwd >= 16, (cell, step)
        pers = persistent_config(16, 768, 768, bf16, 132, False, cell=cell)  # type: ignore[arg-type]
        assert pers is not None and slots * pers.block_h >= 16, (cell, pers)
    cpu = torch.device("cpu")
    assert choose_kernel(3, 33, 33, bf16, cpu, "persistent", cell="gru") == "persistent"
    assert choose_kernel(3, 33, 33, bf16, cpu, cell="rnn_relu") == "step"


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("packed", [False, True])
def test_stack_matches_torch_module(cell: str, packed: bool) -> None:
    # The Triton recurrence in the multi-layer driver (two layers, bidirectional, padded and
    # packed with unsorted lengths) against torch.nn.GRU / torch.nn.RNN in float64.
    module = _module(cell, bias=True)
    T, batch, F_IN, hidden = 6, 4, 5, 7  # test_rnn_reference's module
    lengths = torch.tensor([6, 3, 5, 1]) if packed else None
    x = randn(T, batch, F_IN, seed=1).requires_grad_()
    h0 = randn(4, batch, hidden, seed=2).requires_grad_()
    params = list(module.parameters())
    if packed:
        seq = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        out_p, want_h = module(seq, h0)
        want_out, _ = torch.nn.utils.rnn.pad_packed_sequence(out_p, total_length=T)
    else:
        want_out, want_h = module(x, h0)
    weights = [type(w)(*(None if p is None else p.float() for p in w)) for w in _weights(module)]
    options = dict(num_layers=2, bidirectional=True, lengths=lengths)
    if cell == "gru":
        recurrence = functools.partial(gru_recurrence_triton, kernel="step")
        out, h_n = gru_stack(x.float(), h0.float(), weights, recurrence=recurrence, **options)
    else:
        recurrence = functools.partial(rnn_recurrence_triton, kernel="persistent")
        out, h_n = rnn_stack(
            x.float(), h0.float(), weights, nonlinearity=cell.removeprefix("rnn_"),
            recurrence=recurrence, **options,
        )  # fmt: skip
    assert_close(out, want_out, FP32_ATOL, FP32_RTOL, "out")
    assert_close(h_n, want_h, FP32_ATOL, FP32_RTOL, "h_n")
    cot = [randn(*t.shape, seed=10 + k) for k, t in enumerate((out, h_n))]
    ours = grads((out, h_n), [c.float() for c in cot], [x, h0, *params])
    theirs = grads((want_out, want_h), cot, [x, h0, *params])
    for k, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert_close(a, b, 1e-4, 1e-4, f"gradient {k}")


@pytest.mark.parametrize("cell, packed", [("gru", True), ("rnn_relu", False)])
def test_opcheck(cell: str, packed: bool) -> None:
    # torch.library's own checks of the op: schema, fake implementations against the real
    # outputs, autograd registration, and forward+backward traced by AOTAutograd.
    inputs = cell_inputs(cell, 4, torch.float32, hidden=5)
    b_hn = inputs[3] if cell == "gru" else None
    lengths = torch.tensor([4, 1, 3], dtype=torch.int32) if packed else None
    args = (*inputs[:3], b_hn, lengths, True, cell, "step", True)
    torch.library.opcheck(cell_recurrence_op, args)


def test_torch_compile_fullgraph_forward_backward() -> None:
    # Both ops in one compiled function: fullgraph=True raises on a graph break; the fake
    # implementations must give the shapes and the registered autograd the eager gradients.
    torch._dynamo.reset()
    gru = cell_inputs("gru", 5, torch.float32)
    rnn = cell_inputs("rnn_tanh", 5, torch.float32)[::2]  # xg, w_hh
    lengths = torch.tensor([5, 3, 4])

    def loss(xg3, h0, w3, b_hn, xg1, w1):
        hs = gru_recurrence_triton(xg3, h0, w3, b_hn, lengths, False, kernel="step")
        hr = rnn_recurrence_triton(xg1 + hs, hs[-1], w1, None, True, "relu", kernel="persistent")
        return hs.square().sum() + hr.tanh().sum()

    leaves = [*gru, *rnn]
    eager = loss(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    compiled = torch.compile(loss, fullgraph=True)
    got = compiled(*leaves)
    got_grads = torch.autograd.grad(got, leaves)
    assert_close(got, eager, FP32_ATOL, FP32_RTOL, "loss")
    for k, (a, b) in enumerate(zip(got_grads, eager_grads, strict=True)):
        assert_close(a, b, FP32_ATOL, FP32_RTOL, f"gradient {k}")
    with torch.no_grad():
        assert_close(compiled(*leaves), eager, FP32_ATOL, FP32_RTOL, "loss without grad")


# What only a GPU shows: the compiled kernels, the barrier across tens of programs, H=1001 (no
# multiple of any tile) and long sequences.
@pytest.mark.gpu
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("kernel", ["step", "persistent"])
@pytest.mark.parametrize("batch, hidden, T", [(16, 1001, 512), (16, 768, 600)])
def test_long_sequences_match_reference_on_gpu(
    cell: str, kernel: str, batch: int, hidden: int, T: int
) -> None:
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(T // 4, T + 1, (batch,), generator=gen).cuda()
    inputs = cell_inputs(cell, T, torch.bfloat16, batch, hidden, device="cuda")
    for reverse in (False, True):
        ours = run_cell(cell, inputs, lengths, reverse, kernel)
        own, want = _half_type_references(cell, inputs, lengths, reverse, ours[0])
        for name, a, t, b in zip(NAMES, ours, own, want, strict=False):
            assert_within_torch_error(a, t, b, 1e-3, 1e-3, f"{name} reverse={reverse}")


@pytest.mark.gpu
@pytest.mark.parametrize("cell", CELLS)
def test_gpu_results_are_bitwise_reproducible(cell: str) -> None:
    inputs = cell_inputs(cell, 64, torch.bfloat16, 16, 768, device="cuda")
    for kernel in ("step", "persistent"):
        first = run_cell(cell, inputs, None, False, kernel)
        second = run_cell(cell, inputs, None, False, kernel)
        for name, a, b in zip(NAMES, first, second, strict=False):
            assert torch.equal(a, b), f"{kernel} {name}"
