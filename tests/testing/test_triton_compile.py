"""The sm_90 compile helper: a valid kernel reports registers, an invalid one fails to compile
(as it would on the GPU, although the interpreter runs it)."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed")
tl = triton.language

from fastpar.testing.triton_compile import compile_for_sm90, parse_ptxas_verbose  # noqa: E402


@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) * 2.0, mask=mask)


@triton.jit
def _small_dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr):
    # An 8x8 tl.dot: the interpreter computes it; the GPU compiler requires dimensions >= 16.
    rows = tl.arange(0, M)
    a = tl.load(a_ptr + rows[:, None] * M + rows[None, :])
    b = tl.load(b_ptr + rows[:, None] * M + rows[None, :])
    tl.store(c_ptr + rows[:, None] * M + rows[None, :], tl.dot(a, b))


def test_reports_registers_for_a_valid_kernel() -> None:
    report = compile_for_sm90(
        _scale_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32"}, {"BLOCK": 1024}
    )
    assert report.name == "_scale_kernel"
    assert 0 < report.registers <= 255
    assert report.spills == 0


def test_a_dot_below_16_fails_to_compile_for_the_gpu() -> None:
    signature = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32"}
    with pytest.raises(Exception, match=r"(?i)dot|16"):
        compile_for_sm90(_small_dot_kernel, signature, {"M": 8})


def test_parses_ptxas_output() -> None:
    text = (
        "ptxas info    : Function properties for _scale_kernel\n"
        "    8 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 40 registers, used 1 barriers\n"
    )
    assert parse_ptxas_verbose(text) == (40, 20)
