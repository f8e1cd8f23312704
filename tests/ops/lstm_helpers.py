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
# (dtype, atol, rtol): float32 against float64 directly; half types as the floor of the bound.
DTYPE_TOLERANCES = [
    (torch.float32, FP32_ATOL, FP32_RTOL),
    (torch.bfloat16, 1e-3, 1e-3),
    (torch.float16, 1e-4, 1e-4),
]


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


def recurrence_inputs(
    T: int, proj: int, dtype: torch.dtype, batch: int = 3, hidden: int = 33, device: str = "cpu"
) -> list[Tensor]:
    """Random [xg, h0, c0, w_hh(, w_hr)] leaves for a recurrence of T steps."""
    P = proj or hidden
    scale = hidden**-0.5  # keeps the pre-activations O(1) at any hidden size
    tensors = [
        randn(T, batch, 4 * hidden, seed=1),  # xg
        randn(batch, P, seed=2),  # h0
        randn(batch, hidden, seed=3),  # c0
        randn(4 * hidden, P, seed=4) * (2 * scale),  # w_hh
    ]
    if proj:
        tensors.append(randn(P, hidden, seed=5) * (2 * scale))  # w_hr
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in tensors]


def run_recurrence(recurrence, inputs, lengths, reverse, **kw) -> list[Tensor]:
    """[hs, c_n, and the gradient of every input] for random cotangents."""
    w_hr = inputs[4] if len(inputs) > 4 else None
    hs, c_n = recurrence(*inputs[:4], w_hr, lengths, reverse, **kw)
    cot = [randn(*t.shape, seed=20 + k).to(t) for k, t in enumerate((hs, c_n))]
    return [hs, c_n, *grads((hs, c_n), cot, inputs)]


NAMES = ["hs", "c_n", "d xg", "d h0", "d c0", "d w_hh", "d w_hr"]
