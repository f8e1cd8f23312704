"""Shared by the module tests: a fastpar recurrent module against torch's in float64, results and
every gradient."""

from __future__ import annotations

import copy
import importlib
from collections.abc import Sequence

import pytest
import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from tests.ops.lstm_helpers import FP32_ATOL, FP32_RTOL, assert_close, grads, max_err, randn

# A module's class name -> (module of fastpar.ops, name) of its Triton recurrence.
TRITON_RECURRENCES = {
    "LSTM": ("fastpar.ops.lstm_op", "lstm_recurrence_triton"),
    "GRU": ("fastpar.ops.rnn_op", "gru_recurrence_triton"),
    "RNN": ("fastpar.ops.rnn_op", "rnn_recurrence_triton"),
}


def spy_triton(monkeypatch: pytest.MonkeyPatch, cell: str, fail: bool = False) -> list[str]:
    """Record the ``kernel`` of every call of the Triton recurrence of ``cell`` ("LSTM", "GRU",
    "RNN") into the returned list; with ``fail``, a call raises instead."""
    module_name, name = TRITON_RECURRENCES[cell]
    module = importlib.import_module(module_name)
    real = getattr(module, name)
    seen: list[str] = []

    def spy(*args: object, kernel: str, **kwargs: object):
        if fail:
            raise AssertionError(f"a Triton recurrence ran ({name})")
        seen.append(kernel)
        return real(*args, kernel=kernel, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen


def _hx(states: Sequence[Tensor]) -> Tensor | tuple[Tensor, ...]:
    """hx as the modules take it: (h_0, c_0) for the LSTM, h_0 alone for the GRU and RNN."""
    return tuple(states) if len(states) > 1 else states[0]


def _flat(result: tuple) -> list[Tensor]:
    """[output, *final states] of a module's result."""
    out, final = result
    return [out, *(final if isinstance(final, tuple) else (final,))]


def compare_with_torch(
    ours: torch.nn.Module,
    theirs: torch.nn.Module,
    x: Tensor,
    states: Sequence[Tensor],
    dtype: torch.dtype = torch.float32,
    atol: float = FP32_ATOL,
    rtol: float = FP32_RTOL,
    check: bool = True,
) -> tuple[list[Tensor], list[Tensor], list[str]]:
    """Output, final states and the gradients of input, initial states and every parameter, ours
    (in `dtype`) vs `theirs` (float64), for random cotangents; asserted within atol/rtol when
    `check`, else only returned.

    Arguments:
        states: the initial states, (h_0, c_0) for the LSTM, (h_0,) for the GRU and RNN.

    Returns:
        (ours, theirs, names), in the same order.
    """
    xs = x.detach().to(dtype).requires_grad_()
    ss = [s.detach().to(dtype).requires_grad_() for s in states]
    xd = x.detach().double().requires_grad_()
    sd = [s.detach().double().requires_grad_() for s in states]
    got_out = _flat(ours(xs, _hx(ss)))
    want_out = _flat(theirs(xd, _hx(sd)))
    # On the outputs' device: autograd takes no cotangent from another device.
    cot = [randn(*t.shape, seed=30 + k).to(t.device) for k, t in enumerate(want_out)]
    got = got_out + list(grads(got_out, [c.to(dtype) for c in cot], [xs, *ss, *ours.parameters()]))
    exp = want_out + list(grads(want_out, cot, [xd, *sd, *theirs.parameters()]))
    letters = "hc"[: len(states)]
    names = ["output", *(f"{s}_n" for s in letters), "d input", *(f"d {s}0" for s in letters)]
    names += ["d " + n for n, _ in ours.named_parameters()]
    assert len(got) == len(exp) == len(names)
    for name, a, b in zip(names, got, exp, strict=True):
        assert a.shape == b.shape, name
        if check:
            assert_close(a, b, atol, rtol, name)
    return got, exp, names


def check_autocast_takes_states_and_half_input(
    ours: torch.nn.Module,
    theirs: torch.nn.Module,
    half_module: torch.nn.Module,
    rounded: torch.nn.Module,
    x1: Tensor,
    x2: Tensor,
) -> None:
    """Under autocast the states a call returns are in autocast's dtype, and so is the output of
    a layer before the module: torch's modules take both with float32 parameters, and float32
    data with bfloat16 parameters. `ours` (float32) against `theirs` (float64, same weights);
    `half_module` (bfloat16) against `rounded` (float64 holding its weights); x1, x2 float64."""
    _, exact_states = theirs(x1)
    exact, _ = theirs(x2, exact_states)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, states = ours(x1.float())
        out, _ = ours(x2.float(), states)
        out_half_input, _ = ours(x2.bfloat16(), states)
        out_half_module, _ = half_module(x2.float())
    assert_close(out, exact, 2e-2, 2e-2, "output from the previous call's states")
    assert_close(out_half_input, exact, 2e-2, 2e-2, "output from bfloat16 input")
    assert_close(out_half_module, rounded(x2)[0], 2e-2, 2e-2, "bfloat16 module, float32 input")


# Whether this CPU's oneDNN runs each half type (torch.nn.LSTM's oneDNN call fails without).
_ONEDNN_SUPPORTS = {
    torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
    torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported,
}


def _onednn_lacks(theirs: torch.nn.Module, packed: bool, dtype: torch.dtype) -> bool:
    """Whether torch's module runs on oneDNN (its LSTM without projection or packing), whose
    layer autocast casts whole (module, input and states), on a CPU whose oneDNN lacks
    ``dtype``: that call fails, so the tests make the same cast themselves."""
    onednn = isinstance(theirs, torch.nn.LSTM) and not theirs.proj_size and not packed
    return onednn and not _ONEDNN_SUPPORTS[dtype]()


def _torch_under_autocast(
    theirs: torch.nn.Module, x: Tensor | PackedSequence, dtype: torch.dtype
) -> list[Tensor]:
    """torch's module (float32) under CPU autocast to ``dtype``: output and final states."""
    if _onednn_lacks(theirs, isinstance(x, PackedSequence), dtype):
        assert isinstance(x, Tensor)
        return _flat(copy.deepcopy(theirs).to(dtype)(x.to(dtype)))
    with torch.autocast("cpu", dtype=dtype):
        return _flat(theirs(x))


def check_autocast_dtypes_match_torch(
    ours: torch.nn.Module,
    theirs: torch.nn.Module,
    x: Tensor | PackedSequence,
    dtype: torch.dtype = torch.bfloat16,
) -> None:
    """Under CPU autocast to ``dtype`` (bfloat16 or float16), ``ours`` (float32) returns the
    dtypes of ``theirs`` (torch's module, float32, same weights), and values within a rounding
    to ``dtype`` of its."""
    want = _torch_under_autocast(theirs, x, dtype)
    with torch.autocast("cpu", dtype=dtype):
        got = _flat(ours(x))
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        a, b = (t.data if isinstance(t, PackedSequence) else t for t in (a, b))
        assert a.dtype == b.dtype, f"result {k}: {a.dtype}, torch's {b.dtype}"
        assert_close(a, b, 2e-2, 2e-2, f"result {k} under {dtype} autocast")


# Results and gradients under autocast against torch's module under it: each side rounds to
# the half type in its own places (the kernels keep a layer's output in it, torch's loop
# promotes some of it), and weight gradients sum over every step and row, so the bound is a
# few roundings of each tensor's largest value (bfloat16's unit roundoff 2^-8, float16's 2^-11).
AUTOCAST_TOLERANCES = {torch.bfloat16: 8 * 2.0**-8, torch.float16: 8 * 2.0**-11}


def assert_within_roundings(actual: Tensor, expected: Tensor, tol: float, what: str) -> None:
    """max |actual - expected| <= tol * max(|expected|, 1)."""
    err, scale = max_err(actual, expected), max(expected.abs().max().item(), 1.0)
    assert err <= tol * scale, f"{what}: error {err:.3g} > {tol:.3g} * {scale:.3g}"


def check_autocast_matches_torch_with_grads(
    ours: torch.nn.Module,
    theirs: torch.nn.Module,
    x: Tensor,
    states: Sequence[Tensor],
    lengths: Tensor | None,
    dtype: torch.dtype,
) -> None:
    """Under CPU autocast to ``dtype``, ``ours`` (float32) returns the dtypes of ``theirs``
    (torch's module, float32, same weights), and within ``AUTOCAST_TOLERANCES`` its output,
    final states and the gradients of input, initial states (none: hx omitted) and every
    parameter. x: (T, B, I) float32, packed with ``lengths`` when given."""

    def run(module: torch.nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        leaves = [t.detach().clone().requires_grad_() for t in (x, *states)]
        inputs, params = leaves, list(module.parameters())
        if _onednn_lacks(module, lengths is not None, dtype):
            module = copy.deepcopy(module).to(dtype)
            inputs, params = [t.to(dtype) for t in leaves], list(module.parameters())
        xs, *ss = inputs
        packed = xs if lengths is None else pack_padded_sequence(xs, lengths)
        with torch.autocast("cpu", dtype=dtype):
            results = _flat(module(packed, _hx(ss) if ss else None))
        return [r.data if isinstance(r, PackedSequence) else r for r in results], leaves + params

    got, got_leaves = run(ours)
    want, want_leaves = run(theirs)
    tol = AUTOCAST_TOLERANCES[dtype]
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == b.dtype, f"result {k}: {a.dtype}, torch's {b.dtype}"
        assert_within_roundings(a, b, tol, f"result {k} under {dtype} autocast")
    cot = [randn(*t.shape, seed=50 + k).to(t.dtype) for k, t in enumerate(want)]
    names = ["d input", *(f"d state {k}" for k in range(len(states)))]
    names += ["d " + n for n, _ in ours.named_parameters()]
    got_grads, want_grads = grads(got, cot, got_leaves), grads(want, cot, want_leaves)
    for name, a, b in zip(names, got_grads, want_grads, strict=True):
        assert_within_roundings(a, b, tol, f"{name} under {dtype} autocast")
