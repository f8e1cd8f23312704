"""LSTM, GRU and RNN benchmark: each fastpar kernel variant next to torch's module of the same
cell (torch.nn.LSTM, GRU, RNN; cuDNN on a GPU), same run.

For every shape of `bench/shapes.py` the baseline runs first, then each fastpar variant with the
same weights and inputs. Every case is first checked, output and every gradient, against
torch's module in float64: its error may be at most a per-dtype multiple of the baseline's own error
in that dtype (`shapes.TOLERANCES`), so a fast but wrong kernel posts no time. Then forward and
forward+backward are timed (median, p20, p80; `triton.testing.do_bench` on a GPU, the host clock
on a CPU) and divided by the baseline's. Each case is one row of the CSV, written as soon as it
finishes; a case that raises is a row with its error, and the next case runs.

    python3 bench/lstm.py                           # GPU table (or the CPU mode without a GPU)
    python3 bench/lstm.py --device cpu              # CPU mode: 1 thread, backend="auto"
    python3 bench/lstm.py --scale tiny              # every kind of case at interpreter sizes
    python3 bench/lstm.py --device cpu --cell gru rnn   # only the GRU and RNN shapes
    python3 bench/lstm.py --csv results/lstm.csv --profile-csv results/lstm_profile.csv

Exit status: 0 all checks passed, 4 a check failed or a case raised (see its row).
float32 runs without TF32 on both sides (torch.backends.cudnn.allow_tf32 follows
torch.backends.cuda.matmul.allow_tf32, which fastpar's kernels follow), so the two compute alike.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CHECK_FAILED = 4

HEADERS = (
    "case", "device", "shape", "impl", "kernel", "status", "fwd_ms", "fwd_p20", "fwd_p80",
    "fwdbwd_ms", "fwdbwd_p20", "fwdbwd_p80", "fwd_vs_base", "fwdbwd_vs_base", "fwdbwd_tflops",
    "max_rel_err", "base_rel_err", "worst", "error",
)  # fmt: skip
PROFILE_HEADERS = (
    "case", "device", "shape", "impl", "status", "kernels", "kernel_ms", "kernels_per_seq",
    "kernel_us_per_seq", "error",
)  # fmt: skip

Timer = Callable[[Callable[[], object], list], tuple[float, float, float]]


@dataclass
class Run:
    """One implementation's output and gradients, in float64, in a fixed order."""

    names: list[str]
    values: list


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def build_models(shape, device, variants_: tuple[str, ...]) -> dict[str, object]:
    """The baseline (under `baseline(shape.cell)`), each fastpar variant (or the exception
    building it raised) and the float64 reference, all with the baseline's weights."""
    import torch
    from variants import baseline, fastpar_module, torch_module

    torch.manual_seed(0)
    kwargs = dict(input_size=shape.input, hidden_size=shape.hidden, num_layers=shape.layers)
    if shape.cell == "lstm":
        kwargs["proj_size"] = shape.proj
    base = torch_module(shape.cell, **kwargs).to(device, _dtype(shape.dtype))
    models: dict[str, object] = {baseline(shape.cell): base}
    for variant in variants_:
        try:
            module = fastpar_module(variant, shape.cell, **kwargs).to(device, _dtype(shape.dtype))
            module.load_state_dict(base.state_dict())
            models[variant] = module
        except Exception as error:  # a variant that cannot be built is that case's row
            models[variant] = error
    reference = torch_module(shape.cell, **kwargs).to(device, torch.float64)
    reference.load_state_dict(base.state_dict())
    models["reference"] = reference
    return models


def make_inputs(shape, device):
    """(input, output gradient) as the models take them: (T, B, I) or a PackedSequence."""
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence

    generator = torch.Generator().manual_seed(1)
    dtype = _dtype(shape.dtype)
    x = torch.randn(shape.time, shape.batch, shape.input, generator=generator)
    grad = torch.randn(shape.time, shape.batch, shape.proj or shape.hidden, generator=generator)
    x, grad = x.to(device, dtype), grad.to(device, dtype)
    if shape.packed:
        lengths = torch.tensor(shape.lengths())
        x = pack_padded_sequence(x, lengths)
        grad = pack_padded_sequence(grad, lengths).data
    return x, grad


def _with_grad(x, dtype=None):
    """A leaf copy of the input (packed or not) that records its gradient."""
    from torch.nn.utils.rnn import PackedSequence

    if isinstance(x, PackedSequence):
        data = x.data.detach().to(dtype or x.data.dtype).requires_grad_()
        return PackedSequence(data, x.batch_sizes, x.sorted_indices, x.unsorted_indices), data
    leaf = x.detach().to(dtype or x.dtype).requires_grad_()
    return leaf, leaf


def _output(out):
    return out.data if hasattr(out, "batch_sizes") else out


def run_once(model, x, grad, dtype=None) -> Run:
    """Forward and backward once; the output and every gradient in float64."""
    import torch

    inp, leaf = _with_grad(x, dtype)
    model.zero_grad(set_to_none=True)
    out = _output(model(inp)[0])
    out.backward(grad.to(out.dtype))
    names = ["output", "grad input"] + [f"grad {n}" for n, _ in model.named_parameters()]
    tensors = [out, leaf.grad] + [p.grad for _, p in model.named_parameters()]
    return Run(names, [t.detach().to(torch.float64) for t in tensors])


def compare(run: Run, base: Run, reference: Run, dtype: str) -> tuple[float, float, str, bool]:
    """(relative error of `run`, the baseline's there, which tensor, whether all pass): the
    first failing tensor, or the one where `run` errs most when all pass."""
    from shapes import TOLERANCES

    tol = TOLERANCES[dtype]
    checks = []
    for name, value, base_value, ref in zip(
        reference.names, run.values, base.values, reference.values, strict=True
    ):
        scale = max(ref.abs().max().item(), 1e-30)
        err = (value - ref).abs().max().item() / scale
        base_err = (base_value - ref).abs().max().item() / scale
        ok = err <= tol.factor * base_err + tol.floor  # NaN fails
        checks.append((ok, -err if ok else 0.0, err, base_err, name))
    ok, _, err, base_err, name = min(checks, key=lambda c: (c[0], c[1]))
    return err, base_err, name, ok


def do_bench_timer(fn: Callable[[], object], grads: list) -> tuple[float, float, float]:
    from triton.testing import do_bench

    p50, p20, p80 = do_bench(fn, warmup=10, rep=80, grad_to_none=grads, quantiles=[0.5, 0.2, 0.8])
    return p50, p20, p80


def host_timer(repeats: int) -> Timer:
    def timer(fn: Callable[[], object], grads: list) -> tuple[float, float, float]:
        from common import time_cpu

        t = time_cpu(fn, repeats=repeats, min_time_s=0.0)
        return t.median_s * 1e3, t.p20_s * 1e3, t.p80_s * 1e3

    return timer


def one_call_timer(fn: Callable[[], object], grads: list) -> tuple[float, float, float]:
    """The tiny scale: one call, so the timing code runs without costing the interpreter more."""
    import time

    start = time.perf_counter()
    fn()
    ms = (time.perf_counter() - start) * 1e3
    return ms, ms, ms


def time_model(model, x, grad, device, timer: Timer) -> dict[str, float]:
    import torch

    inp, leaf = _with_grad(x)
    # do_bench times the device with CUDA events; a host clock needs the device to finish.
    host_clock = timer is not do_bench_timer

    def sync() -> None:
        if device.type == "cuda" and host_clock:
            torch.cuda.synchronize(device)

    def forward() -> None:
        with torch.no_grad():
            model(x)
        sync()

    def forward_backward() -> None:
        _output(model(inp)[0]).backward(grad)
        sync()

    params = [leaf, *model.parameters()]
    fwd = timer(forward, params)
    both = timer(forward_backward, params)
    return {"fwd_ms": fwd[0], "fwd_p20": fwd[1], "fwd_p80": fwd[2], "fwdbwd_ms": both[0],
            "fwdbwd_p20": both[1], "fwdbwd_p80": both[2]}  # fmt: skip


def bench_shape(shape, device, timer: Timer, log, variants_: tuple[str, ...]) -> None:
    """Rows of one shape into `log`, unless it has them all already (a resumed run)."""
    import torch
    from common import error_text
    from variants import baseline, kernel_name

    base_impl = baseline(shape.cell)
    cases = [base_impl, *variants_]
    done = {r["case"]: r for r in log.rows()}
    if all(f"{shape.name} | {impl}" in done for impl in cases):
        return
    models = build_models(shape, device, variants_)
    x, grad = make_inputs(shape, device)
    reference = run_once(models["reference"], x, grad, torch.float64)
    base_run = run_once(models[base_impl], x, grad)
    base_row = done.get(f"{shape.name} | {base_impl}", {})
    base_times = {k: float(base_row[k]) for k in ("fwd_ms", "fwdbwd_ms") if base_row.get(k)}
    for impl in cases:
        case = f"{shape.name} | {impl}"
        if case in done:
            continue
        row: dict[str, object] = {"case": case, "device": str(device), "shape": shape.name,
                                  "impl": impl}  # fmt: skip
        if impl != base_impl:
            row["kernel"] = kernel_name(impl, shape.batch, shape.hidden, shape.proj,
                                        _dtype(shape.dtype), device, shape.cell)  # fmt: skip
        log.begin(case)
        try:
            model = models[impl]
            if isinstance(model, Exception):
                raise model
            if str(row.get("kernel", "")).startswith("n/a"):
                row.update(status="n/a", error=row.pop("kernel"))
                log.write(row)
                continue
            run = base_run if impl == base_impl else run_once(model, x, grad)
            err, base_err, worst, ok = compare(run, base_run, reference, shape.dtype)
            row.update(max_rel_err=err, base_rel_err=base_err, worst=worst)
            if not ok:
                row.update(status="FAIL", error=f"{worst}: error {err:.3g} vs baseline "
                           f"{base_err:.3g}, beyond the {shape.dtype} tolerance")  # fmt: skip
            else:
                row.update(status="ok", **time_model(model, x, grad, device, timer))
                if impl == base_impl:
                    base_times = {k: float(row[k]) for k in ("fwd_ms", "fwdbwd_ms")}
                if len(base_times) == 2:
                    row["fwd_vs_base"] = float(row["fwd_ms"]) / base_times["fwd_ms"]
                    row["fwdbwd_vs_base"] = float(row["fwdbwd_ms"]) / base_times["fwdbwd_ms"]
                row["fwdbwd_tflops"] = 3 * shape.gemm_flops() / float(row["fwdbwd_ms"]) / 1e9
        except Exception as error:
            row.update(status="ERROR", error=error_text(error))
        log.write(row)
        print(
            f"  {impl:20s} {row['status']:5s} {row.get('fwd_ms', ''):>10} ms fwd  "
            f"{row.get('fwdbwd_ms', ''):>10} ms fwd+bwd {row.get('error', '')}",
            flush=True,
        )


def profile_shape(shape, device, variants_: tuple[str, ...], log) -> None:
    """Kernel launches and kernel time per sequence of one forward+backward, from torch.profiler,
    for the baseline and the first fastpar variant."""
    import torch
    from common import error_text
    from torch.profiler import ProfilerActivity, profile
    from variants import baseline

    base_impl = baseline(shape.cell)
    models = build_models(shape, device, variants_[:1])
    x, grad = make_inputs(shape, device)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    for impl in (base_impl, variants_[0]):
        case = f"profile {shape.name} | {impl}"
        if case in log.done():
            continue
        row: dict[str, object] = {"case": case, "device": str(device), "shape": shape.name,
                                  "impl": impl}  # fmt: skip
        log.begin(case)
        try:
            model = models[impl]
            if isinstance(model, Exception):
                raise model
            run_once(model, x, grad)  # compiled and warm
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            with profile(activities=activities) as prof:
                run_once(model, x, grad)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            kernels = [e for e in prof.events() if _is_kernel(e, device)]
            kernel_us = sum(e.time_range.elapsed_us() for e in kernels)
            row.update(status="ok", kernels=len(kernels), kernel_ms=kernel_us / 1e3,
                       kernels_per_seq=len(kernels) / shape.batch,
                       kernel_us_per_seq=kernel_us / shape.batch)  # fmt: skip
        except Exception as error:
            row.update(status="ERROR", error=error_text(error))
        log.write(row)


def _is_kernel(event, device) -> bool:
    from torch.autograd import DeviceType

    if device.type != "cuda":  # the CPU mode counts top-level aten ops instead
        return event.device_type == DeviceType.CPU and event.cpu_parent is None
    name = event.name.lower()
    return event.device_type == DeviceType.CUDA and not name.startswith(("memcpy", "memset"))


def warm(shapes, device, variants_: tuple[str, ...]) -> None:
    """Compile the kernels of every case (one forward+backward each), for Triton's disk cache:
    the GPU check runs this while the native extension builds, so the timed stage finds them."""
    for shape in shapes:
        models = build_models(shape, device, variants_)
        x, grad = make_inputs(shape, device)
        for variant in variants_:
            try:
                if not isinstance(models[variant], Exception):
                    run_once(models[variant], x, grad)
                print(f"warmed {shape.name} {variant}", flush=True)
            except Exception as error:  # the timed stage reports it as that case's row
                print(f"warming {shape.name} {variant}: {error}", flush=True)
        del models


def table(rows: list[dict[str, str]]) -> str:
    from common import format_table

    columns = [("shape", "shape"), ("impl", "impl"), ("status", "status"), ("fwd ms", "fwd_ms"),
               ("x base", "fwd_vs_base"), ("fwd+bwd ms", "fwdbwd_ms"),
               ("x base ", "fwdbwd_vs_base"), ("TFLOP/s", "fwdbwd_tflops"),
               ("rel err", "max_rel_err"), ("base err", "base_rel_err"), ("kernel", "kernel"),
               ("error", "error")]  # fmt: skip
    return format_table([h for h, _ in columns], [[r.get(k, "") for _, k in columns] for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda when available, else cpu")  # fmt: skip
    parser.add_argument(
        "--scale",
        choices=("gpu", "cpu", "tiny"),
        default=None,
        help="shapes of bench/shapes.py (default: gpu on cuda, cpu on cpu)",
    )
    parser.add_argument("--quick", action="store_true", help="the first shape only")
    cells = ("lstm", "gru", "rnn")
    parser.add_argument(
        "--cell", nargs="+", choices=cells, default=cells, help="only the shapes of these cells"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads in CPU mode")
    parser.add_argument("--csv", type=Path, default=Path("results/lstm.csv"))
    parser.add_argument(
        "--profile-csv",
        type=Path,
        default=None,
        help="also profile one forward+backward per implementation",
    )
    parser.add_argument("--table", type=Path, default=None, help="also write the table here")
    parser.add_argument(
        "--warm-only", action="store_true", help="compile every case's kernels and stop"
    )
    parser.add_argument(
        "--resume", action="store_true", help="keep the CSV's rows and run only the cases it lacks"
    )
    args = parser.parse_args(argv)

    import torch
    from common import RowLog, device_name
    from shapes import PROFILE_SHAPES, lstm_shapes
    from variants import variants

    from fastpar.ops import interpreter_active

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/lstm.py --device cuda: torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    scale = args.scale or ("gpu" if device.type == "cuda" else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    # On a CPU the kernel variants run only in Triton's interpreter (the dry run).
    cases = variants(torch.device("cuda") if interpreter_active() else device)
    if scale == "tiny":
        timer: Timer = one_call_timer
    elif device.type == "cuda":
        timer = do_bench_timer
    else:
        timer = host_timer(repeats=5)
    shapes = tuple(s for s in lstm_shapes(scale) if s.cell in args.cell)
    shapes = shapes[:1] if args.quick else shapes
    if args.warm_only:
        warm(shapes, device, cases)
        return 0
    if not args.resume:
        for path in (args.csv, args.profile_csv):
            if path is not None:
                path.unlink(missing_ok=True)
    log = RowLog(args.csv, HEADERS)
    print(
        f"device: {device_name(device)}, torch {torch.__version__}, cases: baseline + "
        f"{', '.join(cases)}, interpreter: {interpreter_active()}",
        flush=True,
    )
    profile_log = None if args.profile_csv is None else RowLog(args.profile_csv, PROFILE_HEADERS)
    for shape in shapes:
        print(f"shape {shape.name}", flush=True)
        bench_shape(shape, device, timer, log, cases)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # Right after the shape's own timing: its kernels are compiled, and a timeout later
        # keeps the rows.
        if profile_log is not None and shape in PROFILE_SHAPES[scale]:
            profile_shape(shape, device, cases, profile_log)
    import csv

    with open(args.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    text = table(rows)
    passed = all(r["status"] in ("ok", "n/a") for r in rows)
    if args.table is not None:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(text + "\n")
    print(text)
    return 0 if passed else CHECK_FAILED


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
