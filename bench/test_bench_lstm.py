"""LSTM, GRU and RNN forward and forward+backward: torch's module of the cell (cuDNN on a GPU) and
each fastpar kernel variant, one benchmark group per cell, shape and pass. Every case first
checks its output and every gradient against torch's module in float64, within a per-dtype
multiple of the baseline's error."""

from __future__ import annotations

import pytest
import torch
from conftest import bench_scale, synchronize
from lstm import build_models, compare, make_inputs, run_once
from shapes import LSTMShape, lstm_shapes
from variants import baseline, kernel_name, variants

from fastpar.ops import interpreter_active


def _impls(shape: LSTMShape) -> tuple[str, ...]:
    # Without a GPU the kernel variants run in Triton's interpreter, as on a GPU.
    gpu_like = torch.cuda.is_available() or interpreter_active()
    return (baseline(shape.cell), *variants(torch.device("cuda" if gpu_like else "cpu")))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "shape" in metafunc.fixturenames:
        shapes = lstm_shapes(bench_scale(metafunc.config))
        cases = [(shape, impl) for shape in shapes for impl in _impls(shape)]
        ids = [f"{shape.name.replace(' ', '-')}-{impl}" for shape, impl in cases]
        metafunc.parametrize("shape, impl", cases, ids=ids)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_lstm(benchmark, shape: LSTMShape, impl: str, mode: str, device: torch.device) -> None:
    dtype = getattr(torch, shape.dtype)
    base_impl = baseline(shape.cell)
    kernel = (
        ""
        if impl == base_impl
        else kernel_name(impl, shape.batch, shape.hidden, shape.proj, dtype, device, shape.cell)
    )
    if kernel.startswith("n/a"):
        pytest.skip(kernel)  # a variant named where it does not apply (e.g. persistent + proj)
    models = build_models(shape, device, () if impl == base_impl else (impl,))
    if isinstance(models.get(impl), Exception):
        raise models[impl]
    model = models[impl]
    x, grad = make_inputs(shape, device)
    reference = run_once(models["reference"], x, grad, torch.float64)
    base = run_once(models[base_impl], x, grad)
    ours = base if impl == base_impl else run_once(model, x, grad)
    err, base_err, worst, ok = compare(ours, base, reference, shape.dtype)
    assert ok, f"{impl}: {worst} error {err:.3g} vs baseline {base_err:.3g} at {shape.name}"

    inp = x
    if mode == "fwdbwd":
        from lstm import _with_grad

        inp, _ = _with_grad(x)

    def step() -> None:
        if mode == "fwd":
            with torch.no_grad():
                model(inp)
        else:
            out = model(inp)[0]
            (out.data if hasattr(out, "batch_sizes") else out).backward(grad)
        synchronize(device)

    benchmark.group = f"{shape.cell} {mode} {shape.name}"
    benchmark.extra_info.update(kernel=kernel, rel_err=err, baseline_rel_err=base_err)
    benchmark(step)
