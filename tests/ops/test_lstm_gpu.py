"""What only a GPU can show: the kernels compiled by Triton (not interpreted), and the persistent
kernel's grid barrier across many programs (the interpreter runs programs one after another, so
on CPU a batch block is a single program). Shapes are those where the persistent kernel splits
the hidden units over tens of programs and, for B=200, over several batch blocks; H=1001 is no
multiple of any tile, T=512 runs long sequences, and B=64 T=512 H=512 with lengths is the
packed benchmark batch. The forward runs both of its bodies (W_hh's share held whole, or read a
K tile at a time), and the long sequences both choices of persistent tiles (FASTPAR_LSTM_TILES)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from fastpar.ops.lstm_config import TILES_ENV, choose_kernel, dot_precision
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
    (16, 768, torch.float32, 1e-4, 1e-3),  # IEEE float32 dots (see the fixture)
    (200, 256, torch.float16, 1e-4, 1e-4),
    (8, 256, torch.bfloat16, 1e-3, 1e-3),
    (16, 1001, torch.bfloat16, 1e-3, 1e-3),
]


@pytest.fixture(params=["min-traffic", "v2"])
def tiles(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(TILES_ENV, request.param)
    return request.param


@pytest.fixture
def fp32_precision() -> Iterator[None]:
    """Restore cuDNN's RNN float32 precision (the kernels follow it) after the test."""
    saved = torch.backends.cudnn.rnn.fp32_precision
    yield
    torch.backends.cudnn.rnn.fp32_precision = saved


def _check(ours, inputs, lens, reverse, dtype, atol, rtol, what) -> None:
    exact = [t.detach().double().requires_grad_() for t in inputs]
    want = run_recurrence(lstm_recurrence_reference, exact, lens, reverse)
    if dtype == torch.float32:
        for name, a, b in zip(NAMES, ours, want, strict=False):
            assert_close(a, b, atol, rtol, f"{name} {what}")
        return
    own_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    own = run_recurrence(lstm_recurrence_reference, own_inputs, lens, reverse)
    for name, a, t, b in zip(NAMES, ours, own, want, strict=False):
        assert_within_torch_error(a, t, b, atol, rtol, f"{name} {what}")


@pytest.mark.parametrize("kernel", ["step", "persistent"])
@pytest.mark.parametrize("batch, hidden, dtype, atol, rtol", SHAPES)
def test_kernels_match_reference_on_gpu(
    kernel: str,
    batch: int,
    hidden: int,
    dtype: torch.dtype,
    atol: float,
    rtol: float,
    forward_body: str,
    fp32_precision: None,
) -> None:
    torch.backends.cudnn.rnn.fp32_precision = "ieee"
    T = 37
    lengths = torch.randint(1, T + 1, (batch,), generator=torch.Generator().manual_seed(0))
    inputs = recurrence_inputs(T, 0, dtype, batch, hidden, device="cuda")
    # Forward direction over full sequences, and the reversed direction with lengths.
    for lens, reverse in ((None, False), (lengths.cuda(), True)):
        what = f"(lengths={lens is not None}, reverse={reverse})"
        ours = run_recurrence(lstm_recurrence_triton, inputs, lens, reverse, kernel=kernel)
        _check(ours, inputs, lens, reverse, dtype, atol, rtol, what)


@pytest.mark.parametrize(
    "batch, hidden, T, packed",
    [(16, 768, 512, False), (64, 512, 512, True), (16, 1001, 600, True)],
)
def test_long_sequences_match_reference_on_gpu(
    batch: int, hidden: int, T: int, packed: bool, tiles: str
) -> None:
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(T // 4, T + 1, (batch,), generator=gen).cuda() if packed else None
    inputs = recurrence_inputs(T, 0, torch.bfloat16, batch, hidden, device="cuda")
    ours = run_recurrence(lstm_recurrence_triton, inputs, lengths, False, kernel="persistent")
    _check(ours, inputs, lengths, False, torch.bfloat16, 1e-3, 1e-3, f"T={T}")


def test_fp32_follows_cudnn_tf32_switch(fp32_precision: None) -> None:
    # TF32 (cuDNN's default for RNNs) rounds the dot operands to 10 mantissa bits: its error
    # against float64 exceeds IEEE's and stays within TF32's.
    inputs = recurrence_inputs(64, 0, torch.float32, 16, 768, device="cuda")
    exact = [t.detach().double() for t in inputs]
    want, _ = lstm_recurrence_reference(*exact)
    errors = {}
    for precision in ("ieee", "tf32"):
        torch.backends.cudnn.rnn.fp32_precision = precision
        assert dot_precision(torch.float32, torch.device("cuda")) == precision
        with torch.no_grad():
            hs, _ = lstm_recurrence_triton(*inputs)
        errors[precision] = (hs.double() - want).abs().max().item()
    assert errors["ieee"] < errors["tf32"] <= 2e-2, errors


@pytest.mark.parametrize("kernel", ["step", "persistent"])
def test_gpu_results_are_bitwise_reproducible(kernel: str, tiles: str) -> None:
    inputs = recurrence_inputs(64, 0, torch.bfloat16, 16, 768, device="cuda")
    first = run_recurrence(lstm_recurrence_triton, inputs, None, False, kernel=kernel)
    second = run_recurrence(lstm_recurrence_triton, inputs, None, False, kernel=kernel)
    for name, a, b in zip(NAMES, first, second, strict=False):
        assert torch.equal(a, b), name


def test_heuristic_takes_persistent_where_it_applies() -> None:
    dev = torch.device("cuda")
    assert choose_kernel(16, 768, 768, torch.bfloat16, dev) == "persistent"
    assert choose_kernel(16, 768, 768, torch.bfloat16, dev, backward=True) == "persistent"
    # float32: the backward's W_hh share (16 columns x 4H rows) does not fit in L1, which the
    # backward does not need (it reads the share from L2, as the step kernels would).
    assert choose_kernel(16, 768, 768, torch.float32, dev, backward=True) == "persistent"
    assert choose_kernel(16, 768, 384, torch.bfloat16, dev) == "step"  # a projection
    # 64 batch blocks leave each program 384+ hidden units: its W_hh share exceeds L1.
    assert choose_kernel(4096, 768, 768, torch.bfloat16, dev) == "step"
