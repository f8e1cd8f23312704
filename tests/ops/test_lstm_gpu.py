"""What only a GPU can show: the kernels compiled by Triton (not interpreted), and the persistent
kernel's grid barrier across many programs (the interpreter runs programs one after another, so
on CPU a batch block is a single program). Shapes are those where the persistent kernel splits
the hidden units over tens of programs and, for B=200, over several batch blocks."""

from __future__ import annotations

import pytest
import torch

from fastpar.ops.lstm_config import choose_kernel
from fastpar.ops.lstm_op import lstm_recurrence_triton
from fastpar.ops.reference import lstm_recurrence_reference
from tests.ops.lstm_helpers import (
    NAMES,
    assert_close,
    assert_within_torch_error,
    recurrence_inputs,
    run_recurrence,
)

pytestmark = pytest.mark.gpu

SHAPES = [  # B, H, dtype, atol, rtol
    (16, 768, torch.bfloat16, 1e-3, 1e-3),
    (16, 768, torch.float32, 1e-4, 1e-3),  # torch's default: no TF32, so IEEE float32 dots
    (200, 256, torch.float16, 1e-4, 1e-4),
    (8, 256, torch.bfloat16, 1e-3, 1e-3),
]


@pytest.mark.parametrize("kernel", ["step", "persistent"])
@pytest.mark.parametrize("batch, hidden, dtype, atol, rtol", SHAPES)
def test_kernels_match_reference_on_gpu(
    kernel: str, batch: int, hidden: int, dtype: torch.dtype, atol: float, rtol: float
) -> None:
    T = 37
    lengths = torch.randint(1, T + 1, (batch,), generator=torch.Generator().manual_seed(0))
    inputs = recurrence_inputs(T, 0, dtype, batch, hidden, device="cuda")
    exact = [t.detach().double().requires_grad_() for t in inputs]
    # Forward direction over full sequences, and the reversed direction with lengths.
    for lens, reverse in ((None, False), (lengths.cuda(), True)):
        what = f"(lengths={lens is not None}, reverse={reverse})"
        ours = run_recurrence(lstm_recurrence_triton, inputs, lens, reverse, kernel=kernel)
        want = run_recurrence(lstm_recurrence_reference, exact, lens, reverse)
        if dtype == torch.float32:
            for name, a, b in zip(NAMES, ours, want, strict=False):
                assert_close(a, b, atol, rtol, f"{name} {what}")
            continue
        own_inputs = [t.detach().clone().requires_grad_() for t in inputs]
        own = run_recurrence(lstm_recurrence_reference, own_inputs, lens, reverse)
        for name, a, t, b in zip(NAMES, ours, own, want, strict=False):
            assert_within_torch_error(a, t, b, atol, rtol, f"{name} {what}")


@pytest.mark.parametrize("kernel", ["step", "persistent"])
def test_gpu_results_are_bitwise_reproducible(kernel: str) -> None:
    inputs = recurrence_inputs(64, 0, torch.bfloat16, 16, 768, device="cuda")
    first = run_recurrence(lstm_recurrence_triton, inputs, None, False, kernel=kernel)
    second = run_recurrence(lstm_recurrence_triton, inputs, None, False, kernel=kernel)
    for name, a, b in zip(NAMES, first, second, strict=False):
        assert torch.equal(a, b), name


def test_heuristic_takes_persistent_where_it_applies() -> None:
    dev = torch.device("cuda")
    assert choose_kernel(16, 768, 768, torch.bfloat16, dev) == "persistent"
    assert choose_kernel(16, 768, 768, torch.bfloat16, dev, backward=True) == "persistent"
    # float32: the backward's W_hh share (16 columns x 4H rows) would not fit in L1.
    assert choose_kernel(16, 768, 768, torch.float32, dev, backward=True) == "step"
    assert choose_kernel(16, 768, 384, torch.bfloat16, dev) == "step"  # a projection
    # 64 batch blocks leave each program 384+ hidden units: its W_hh share exceeds L1.
    assert choose_kernel(4096, 768, 768, torch.bfloat16, dev) == "step"
