"""Shared by the LSTM tests: seeded modules and inputs, gradients, and error bounds."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# Tolerances against a float64 oracle. float32 only rounds (no TF32 on CPU, and the kernels
# follow torch's TF32 switch on GPU); half types are bounded relative to PyTorch's own error.
FP32_ATOL, FP32_RTOL = 2e-5, 1e-4
# Half types: fastpar's error may be at most this multiple of PyTorch's own error in the same
# dtype (both against float64), plus the per-dtype atol + rtol * max|exact| of the test.
HALF_MULTIPLE = 2.0


def seeded_lstm(seed: int = 0, **kwargs: object) -> torch.nn.LSTM:
    """A float64 torch.nn.LSTM with seeded weights."""
    torch.manual_seed(seed)
    return torch.nn.LSTM(**kwargs, dtype=torch.float64)  # type: ignore[arg-type]


def randn(*shape: int, dtype: torch.dtype = torch.float64, seed: int | None = None) -> Tensor:
    """Fresh standard-normal data (never zeros), optionally from its own seed."""
    gen = None
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def grads(outputs: Sequence[Tensor], cotangents: Sequence[Tensor], inputs: Sequence[Tensor]):
    """Gradients of sum(<output, cotangent>) w.r.t. inputs (an error if one is unreachable)."""
    return torch.autograd.grad(list(outputs), list(inputs), list(cotangents))


def assert_close(actual: Tensor, expected: Tensor, atol: float, rtol: float, what: str) -> None:
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}"
    )


def max_err(actual: Tensor, expected: Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()


def assert_within_torch_error(
    ours: Tensor, torchs: Tensor, exact: Tensor, atol: float, rtol: float, what: str
) -> None:
    """|ours - exact| <= HALF_MULTIPLE * |torch's - exact| + atol + rtol * |exact| (max norms)."""
    own = max_err(torchs, exact)
    bound = HALF_MULTIPLE * own + atol + rtol * exact.abs().max().item()
    err = max_err(ours, exact)
    assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g} (PyTorch's own: {own:.3g})"
