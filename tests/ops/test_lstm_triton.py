"""The Triton recurrence (step and persistent kernels, custom op, autograd) against the float64
reference, which test_reference.py checks against torch.nn.LSTM. Runs in the interpreter on CPU.
"""

from __future__ import annotations

import pytest
import torch

from fastpar.ops.lstm_forward import choose_kernel
from fastpar.ops.lstm_function import lstm_recurrence_triton
from fastpar.ops.reference import lstm_recurrence_reference
from tests.ops.lstm_helpers import (
    DTYPE_TOLERANCES,
    FP32_ATOL,
    FP32_RTOL,
    NAMES,
    assert_close,
    assert_within_torch_error,
    recurrence_inputs,
    run_recurrence,
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


@pytest.mark.parametrize("kernel", ["step", "persistent"])
def test_several_batch_blocks(kernel: str) -> None:
    # B=70 is two batch tiles of 64 (the second mostly masked); the persistent kernel keeps a
    # barrier counter per batch block.
    lengths = torch.arange(70) % 4 + 1  # unsorted, every length 1..4
    inputs = recurrence_inputs(4, 0, torch.float32, batch=70, hidden=20)
    exact = [t.detach().double().requires_grad_() for t in inputs]
    ours = run_recurrence(lstm_recurrence_triton, inputs, lengths, True, kernel=kernel)
    want = run_recurrence(lstm_recurrence_reference, exact, lengths, True)
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
