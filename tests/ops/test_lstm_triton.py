"""The Triton recurrence (step and persistent kernels, custom op, autograd) against the float64
reference, which test_reference.py checks against torch.nn.LSTM. Runs in the interpreter on CPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fastpar.ops.lstm_backward
from fastpar.nn.lstm import layer_weights
from fastpar.ops.lstm_backward import weight_grad_hh
from fastpar.ops.lstm_config import (
    TILES_ENV,
    choose_kernel,
    dot_precision,
    fp32_rnn_allows_tf32,
    persistent_config,
    step_config,
)
from fastpar.ops.lstm_forward import lstm_forward
from fastpar.ops.lstm_op import lstm_recurrence_op, lstm_recurrence_triton
from fastpar.ops.reference import lstm_recurrence_reference, lstm_stack
from tests.ops.lstm_helpers import (
    DTYPE_TOLERANCES,
    FP32_ATOL,
    FP32_RTOL,
    NAMES,
    assert_close,
    assert_within_torch_error,
    grads,
    randn,
    recurrence_inputs,
    run_recurrence,
    seeded_lstm,
)

B, H, PROJ = 3, 33, 5
LENGTHS = torch.tensor([7, 2, 5])  # unsorted, one full, one short


@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize("proj", [0, PROJ])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_step_kernels_match_reference(T: int, proj: int, packed: bool, reverse: bool) -> None:
    lengths = LENGTHS.clamp(max=T) if packed else None
    inputs = recurrence_inputs(T, proj, torch.float32)
    ours = run_recurrence(lstm_recurrence_triton, inputs, lengths, reverse, kernel="step")
    want = run_recurrence(
        lstm_recurrence_reference, recurrence_inputs(T, proj, torch.float64), lengths, reverse
    )
    for name, a, b in zip(NAMES, ours, want, strict=False):
        assert_close(a, b, FP32_ATOL, FP32_RTOL, name)


@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_persistent_kernel_matches_reference(T: int, packed: bool, reverse: bool) -> None:
    # The interpreter configuration: one program per batch block covers all hidden units, so
    # the grid barrier only ever waits for itself (the multi-program barrier needs a GPU).
    # The resident forward body; test_several_batch_blocks runs the K loop too.
    lengths = LENGTHS.clamp(max=T) if packed else None
    inputs = recurrence_inputs(T, 0, torch.float32)
    ours = run_recurrence(lstm_recurrence_triton, inputs, lengths, reverse, kernel="persistent")
    want = run_recurrence(
        lstm_recurrence_reference, recurrence_inputs(T, 0, torch.float64), lengths, reverse
    )
    for name, a, b in zip(NAMES, ours, want, strict=False):
        assert_close(a, b, FP32_ATOL, FP32_RTOL, name)


@pytest.mark.parametrize("kernel", ["step", "persistent"])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLERANCES)
def test_dtypes_match_reference(kernel: str, dtype: torch.dtype, atol: float, rtol: float) -> None:
    # float32 against float64 within atol/rtol. Half types: the kernels keep c and the gate
    # math in float32, so their error against float64 (on the same rounded inputs) must stay
    # within a small multiple of PyTorch's own error when it computes in that dtype.
    T = 7
    inputs = recurrence_inputs(T, 0, dtype)
    exact_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ours = run_recurrence(lstm_recurrence_triton, inputs, LENGTHS, False, kernel=kernel)
    want = run_recurrence(lstm_recurrence_reference, exact_inputs, LENGTHS, False)
    for a in ours:
        assert a.dtype == dtype
    if dtype == torch.float32:
        for name, a, b in zip(NAMES, ours, want, strict=False):
            assert_close(a, b, atol, rtol, name)
        return
    torch_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    torchs = run_recurrence(lstm_recurrence_reference, torch_inputs, LENGTHS, False)
    for name, a, t, b in zip(NAMES, ours, torchs, want, strict=False):
        assert_within_torch_error(a, t, b, atol, rtol, name)


@pytest.mark.parametrize(
    "kernel, reverse", [("step", True), ("persistent", False), ("persistent", True)]
)
def test_several_batch_blocks(kernel: str, reverse: bool, forward_body: str) -> None:
    # B=70 is two batch tiles of 64 (the second mostly masked); the persistent kernel keeps a
    # barrier counter per batch block. With T=6 and no length above 4 (the second block's
    # lengths stop at 2), both blocks skip the steps past their longest sequence.
    lengths = torch.arange(70) % 4 + 1  # unsorted, every length 1..4
    lengths[64:] = torch.tensor([1, 2, 1, 2, 1, 2])
    inputs = recurrence_inputs(6, 0, torch.float32, batch=70, hidden=20)
    exact = [t.detach().double().requires_grad_() for t in inputs]
    ours = run_recurrence(lstm_recurrence_triton, inputs, lengths, reverse, kernel=kernel)
    want = run_recurrence(lstm_recurrence_reference, exact, lengths, reverse)
    for name, a, b in zip(NAMES, ours, want, strict=False):
        assert_close(a, b, FP32_ATOL, FP32_RTOL, name)


def test_backward_is_deterministic() -> None:
    inputs = recurrence_inputs(7, 0, torch.float32)
    first = run_recurrence(lstm_recurrence_triton, inputs, LENGTHS, True)
    second = run_recurrence(lstm_recurrence_triton, inputs, LENGTHS, True)
    for name, a, b in zip(NAMES, first, second, strict=False):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_inputs_are_not_modified() -> None:
    inputs = recurrence_inputs(7, PROJ, torch.float32)
    before = [t.detach().clone() for t in inputs]
    run_recurrence(lstm_recurrence_triton, inputs, LENGTHS, False)
    for a, b in zip(inputs, before, strict=True):
        assert torch.equal(a.detach(), b)


def test_choose_kernel() -> None:
    cpu = torch.device("cpu")
    # The interpreter keeps "auto" on the step kernel; the persistent one runs when asked.
    assert choose_kernel(3, 33, 33, torch.float32, cpu) == "step"
    assert choose_kernel(3, 33, 33, torch.float32, cpu, "persistent") == "persistent"
    assert choose_kernel(3, 33, 33, torch.float32, cpu, "persistent", backward=True) == (
        "persistent"
    )
    with pytest.raises(ValueError, match="persistent"):
        choose_kernel(3, 33, 5, torch.float32, cpu, "persistent")  # a projection
    # Backward follows a persistent forward where it can, else runs the step kernels.
    assert choose_kernel(3, 33, 5, torch.float32, cpu, "persistent", backward=True) == "step"
    with pytest.raises(ValueError, match="kernel must be"):
        choose_kernel(3, 33, 33, torch.float32, cpu, "fast")  # type: ignore[arg-type]


def test_bad_inputs_name_the_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    xg, h0, c0, w_hh = recurrence_inputs(3, 0, torch.float32)
    with pytest.raises(ValueError, match=r"h0 must have shape \(3, 33\)"):
        lstm_recurrence_triton(xg, h0[:, :5], c0, w_hh)
    with pytest.raises(ValueError, match=r"w_hh must have shape \(132, 33\)"):
        lstm_recurrence_triton(xg, h0, c0, w_hh[:, :5])
    with pytest.raises(TypeError, match=r"w_hh dtype torch\.float64 does not match"):
        lstm_recurrence_triton(xg, h0, c0, w_hh.double())
    with pytest.raises(TypeError, match="xg must be one of"):
        lstm_recurrence_triton(xg.double(), h0.double(), c0, w_hh.double())
    with pytest.raises(ValueError, match=r"xg must have shape \(T, B, 4\*H\)"):
        lstm_recurrence_triton(xg[..., :-1], h0, c0, w_hh)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        lstm_recurrence_triton(xg, h0, c0, w_hh)


@pytest.mark.parametrize(
    "forward_body, reverse",
    [("resident", False), ("resident", True), ("k-loop", False)],
    indirect=["forward_body"],
)
def test_step_body_with_many_programs(forward_body: str, reverse: bool) -> None:
    # H=70 is three hidden tiles of 32 (the last mostly masked) and B=18 two batch tiles of 16
    # in the interpreter's step configuration: six programs run the body the persistent kernel
    # runs (all of h_{t-1} in one dot, or a loop over K tiles). T=12 with lengths.
    _check_step_kernels(12, 18, 70, torch.arange(18) % 4 * 3 + 3, reverse)  # lengths 3..12


def _check_step_kernels(T: int, batch: int, hidden: int, lengths: torch.Tensor, reverse: bool):
    """The step kernels against the float64 reference, float32, with lengths."""
    inputs = recurrence_inputs(T, 0, torch.float32, batch=batch, hidden=hidden)
    exact = [t.detach().double().requires_grad_() for t in inputs]
    ours = run_recurrence(lstm_recurrence_triton, inputs, lengths, reverse, kernel="step")
    want = run_recurrence(lstm_recurrence_reference, exact, lengths, reverse)
    for name, a, b in zip(NAMES, ours, want, strict=False):
        assert_close(a, b, FP32_ATOL, FP32_RTOL, name)


def test_step_body_with_the_wide_backward_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    # The persistent backward's GPU tiles (32 x 32, K tiles of 32, eight per batched dot; see
    # persistent_config) on many programs: the step kernels run the same body, here with those
    # tiles on B=40 (two batch tiles, the second mostly masked) and H=70 (three hidden tiles,
    # the last mostly masked), with lengths and in reverse.
    def wide(*args: object, **kwargs: object):
        cfg = step_config(*args, **kwargs)  # type: ignore[arg-type]
        return dataclasses.replace(cfg, block_b=32, block_h_bwd=32, block_k=32, k_split=8)

    monkeypatch.setattr(fastpar.ops.lstm_backward, "step_config", wide)
    _check_step_kernels(9, 40, 70, torch.arange(40) % 5 * 2 + 1, True)  # lengths 1..9


def _l2_elements(batch: int, hidden: int, block_b: int, block_h: int, backward: bool) -> int:
    """Elements the programs of a persistent kernel read per step that other SMs wrote (or that
    the barrier evicted from L1), counted program by program over the valid rows and units."""
    total = 0
    for b0 in range(0, batch, block_b):
        rows = min(block_b, batch - b0)
        for j0 in range(0, hidden, block_h):
            units = min(block_h, hidden - j0)
            # Forward: h_{t-1} of its rows; backward: dgates_{t+1} of its rows, W_hh's columns.
            total += rows * 4 * hidden + 4 * hidden * units if backward else rows * hidden
    return total


def test_min_traffic_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    bf16 = torch.bfloat16

    def tiles(batch: int, hidden: int, backward: bool) -> tuple[int, int]:
        cfg = persistent_config(batch, hidden, hidden, bf16, 132, False, backward)
        assert cfg is not None
        return cfg.block_b, cfg.block_h

    shapes = [(16, 768, True), (64, 512, True), (64, 1024, True), (256, 512, True)]
    shapes += [(64, 512, False), (256, 512, False)]
    monkeypatch.setenv(TILES_ENV, "min-traffic")
    chosen = {shape: tiles(*shape) for shape in shapes}
    monkeypatch.setenv(TILES_ENV, "v2")
    previous = {shape: tiles(*shape) for shape in shapes}
    # The previous choice: 64-row batch tiles (backward), the narrowest hidden tile that fits.
    assert previous[16, 768, True] == (16, 16) and previous[64, 512, True] == (64, 16)
    assert previous[64, 512, False] == (64, 4)
    # Backward: dgates (B x 4H) is read once per hidden tile and W_hh once per batch tile.
    assert chosen[16, 768, True] == (16, 32) and chosen[64, 512, True] == (32, 32)
    # Forward (the packed benchmark batch): 32 programs read h_{t-1}, not 128.
    assert chosen[64, 512, False] == (64, 16)
    for (batch, hidden, backward), (block_b, block_h) in chosen.items():
        programs = -(-batch // block_b) * -(-hidden // block_h)
        assert programs <= 132 and block_b >= 16 and block_h * (4 if backward else 1) >= 16
        new = _l2_elements(batch, hidden, block_b, block_h, backward)
        old = _l2_elements(batch, hidden, *previous[batch, hidden, backward], backward)
        assert new <= old, (batch, hidden, backward, new, old)
    assert _l2_elements(16, 768, 16, 32, True) < 0.8 * _l2_elements(16, 768, 16, 16, True)
    monkeypatch.setenv(TILES_ENV, "widest")
    with pytest.raises(ValueError, match=TILES_ENV):
        tiles(16, 768, True)


@pytest.mark.parametrize("kernel", ["step", "persistent"])
def test_inference_keeps_nothing_for_backward(kernel: str) -> None:
    xg, h0, c0, w_hh = (t.detach() for t in recurrence_inputs(7, 0, torch.float32))
    lengths = LENGTHS.to(torch.int32)
    hs, c_n, gates, cs, _ = lstm_recurrence_op(xg, h0, c0, w_hh, None, lengths, True, kernel, False)
    assert gates.numel() == 0 and cs.numel() == 0
    trained = lstm_recurrence_op(xg, h0, c0, w_hh, None, lengths, True, kernel, True)
    assert trained[2].shape == (7, B, 4 * H) and trained[3].shape == (7, B, H)
    assert torch.equal(hs, trained[0]) and torch.equal(c_n, trained[1])
    with torch.no_grad():
        hs_ng, _ = lstm_recurrence_triton(
            *(t.requires_grad_() for t in (xg, h0, c0, w_hh)), kernel=kernel
        )
    want, _ = lstm_recurrence_reference(*(t.double() for t in (xg, h0, c0, w_hh)))
    assert_close(hs_ng, want, FP32_ATOL, FP32_RTOL, "hs without grad")


def test_weight_grad_accumulates_in_fp32() -> None:
    # bfloat16 operands, exact products: only float32 summation error may remain, far below
    # one bfloat16 rounding of the result (2**-9 relative), which the sum once suffered.
    T, batch, G, P = 64, 16, 64, 48
    dg = randn(T, batch, G, seed=1).bfloat16()
    hs = randn(T, batch, P, seed=2).bfloat16()
    h0 = randn(batch, P, seed=3).bfloat16()
    for reverse in (False, True):
        got = weight_grad_hh(dg, hs, h0, reverse)
        assert got.dtype == torch.float32
        h_prev = torch.cat([hs[1:], h0[None]]) if reverse else torch.cat([h0[None], hs[:-1]])
        want = torch.einsum("tbg,tbp->gp", dg.double(), h_prev.double())
        assert_close(got, want, 1e-4, 1e-5, f"dW_hh reverse={reverse}")


def test_fp32_tf32_follows_cudnn_rnn_switch() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    rnn = torch.backends.cudnn.rnn
    saved = rnn.fp32_precision
    try:
        rnn.fp32_precision = "tf32"
        assert fp32_rnn_allows_tf32()
        assert dot_precision(torch.float32, cuda) == "tf32"
        assert dot_precision(torch.float32, cpu) == "ieee"  # no TF32 on the CPU
        rnn.fp32_precision = "ieee"
        assert not fp32_rnn_allows_tf32()
        assert dot_precision(torch.float32, cuda) == "ieee"
    finally:
        rnn.fp32_precision = saved


def test_tf32_dots_round_their_operands() -> None:
    # The interpreter ignores input_precision; the kernels round the operands to TF32 there
    # themselves, so the TF32 path is exercised: its error exceeds IEEE's, within TF32's bound.
    xg, h0, c0, w_hh = (t.detach() for t in recurrence_inputs(7, 0, torch.float32))
    want, _ = lstm_recurrence_reference(*(t.double() for t in (xg, h0, c0, w_hh)))
    errors = {}
    for precision in ("ieee", "tf32"):
        hs = lstm_forward(xg, h0, c0, w_hh, kernel="step", precision=precision).hs
        errors[precision] = (hs.double() - want).abs().max().item()
    assert errors["ieee"] <= FP32_ATOL
    assert 10 * errors["ieee"] < errors["tf32"] <= 5e-3


@pytest.mark.parametrize("packed", [False, True])
def test_stack_matches_torch_lstm(packed: bool) -> None:
    # The Triton recurrence in the multi-layer driver: bidirectional, a projection, two
    # layers, padded and packed (unsorted lengths), against torch.nn.LSTM in float64.
    T, batch, F_IN, hidden, proj = 5, 4, 6, 20, 7
    m = seeded_lstm(
        input_size=F_IN, hidden_size=hidden, num_layers=2, bidirectional=True, proj_size=proj
    )
    lengths = torch.tensor([5, 2, 4, 1]) if packed else None
    x = randn(T, batch, F_IN, seed=1).requires_grad_()
    h0 = randn(4, batch, proj, seed=2).requires_grad_()
    c0 = randn(4, batch, hidden, seed=3).requires_grad_()
    params = list(m.parameters())
    if packed:
        seq = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        out_p, (want_h, want_c) = m(seq, (h0, c0))
        want_out, _ = torch.nn.utils.rnn.pad_packed_sequence(out_p, total_length=T)
    else:
        want_out, (want_h, want_c) = m(x, (h0, c0))
    weights = [
        type(w)(*(None if p is None else p.float() for p in w)) for w in layer_weights(m, 2, 2)
    ]
    out, h_n, c_n = lstm_stack(
        x.float(), h0.float(), c0.float(), weights, num_layers=2, bidirectional=True,
        lengths=lengths, recurrence=lstm_recurrence_triton,
    )  # fmt: skip
    cot = [randn(*t.shape, seed=10 + k) for k, t in enumerate((out, h_n, c_n))]
    ours = grads((out, h_n, c_n), [c.float() for c in cot], [x, h0, c0, *params])
    theirs = grads((want_out, want_h, want_c), cot, [x, h0, c0, *params])
    outputs = zip(["out", "h_n", "c_n"], (out, h_n, c_n), (want_out, want_h, want_c), strict=True)
    for name, a, b in outputs:
        assert_close(a, b, FP32_ATOL, FP32_RTOL, name)
    for k, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert_close(a, b, 1e-4, 1e-4, f"gradient {k}")
