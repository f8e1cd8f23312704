"""Every kernel of fastpar once, at small shapes: what `compute-sanitizer` (memcheck, racecheck,
synccheck) watches in a GPU check. Each case is one CSV row written as it ends; a case that
raises is a row with its error and the next case runs.

Kernels: the Triton LSTM forward and backward of every fastpar variant (float32 and bfloat16,
with a projection, a packed batch and a reversed direction), the same kernels with the GRU and
Elman RNN cells (step and persistent, lengths, reversed), the native k-input reduction and the
native ring all-reduce across 2 processes (CUDA IPC on a GPU, shared memory on a CPU).

    compute-sanitizer --tool memcheck --target-processes all \\
        python3 bench/kernel_smoke.py --device cuda --tool memcheck --csv results/sanitizer.csv
    TRITON_INTERPRET=1 python3 bench/kernel_smoke.py --device cpu --csv ...   (the dry run)

Exit status: 0 every case passed, 4 one failed (see its row).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CHECK_FAILED = 4
HEADERS = ("case", "tool", "status", "seconds", "error")


def lstm_case(variant: str, dtype_name: str, device, **options) -> Callable[[], None]:
    """Forward and backward of a small LSTM, checked loosely against torch.nn.LSTM."""
    packed = options.pop("packed", False)

    def run() -> None:
        import torch
        from torch.nn.utils.rnn import pack_padded_sequence
        from variants import fastpar_lstm

        dtype = getattr(torch, dtype_name)
        torch.manual_seed(0)
        kwargs = dict(input_size=8, hidden_size=32, **options)
        base = torch.nn.LSTM(**kwargs).to(device, dtype)
        ours = fastpar_lstm(variant, **kwargs).to(device, dtype)
        ours.load_state_dict(base.state_dict())
        x = torch.randn(5, 3, 8, device=device, dtype=dtype)
        results = []
        for model in (ours, base):
            inp = x.detach().requires_grad_()
            feed = pack_padded_sequence(inp, torch.tensor([5, 4, 2])) if packed else inp
            out = model(feed)[0]
            out = out.data if packed else out
            out.float().square().sum().backward()
            results.append((out.float(), inp.grad.float()))
        tol = 5e-2 if dtype != torch.float32 else 1e-3
        for name, a, b in zip(("output", "grad input"), *results, strict=True):
            err = (a - b).abs().max().item()
            if not err <= tol * max(1.0, b.abs().max().item()):
                raise AssertionError(f"{name} differs from torch.nn.LSTM by {err:.3g}")

    return run


def _cell_results(cell: str, kernel: str, device, dtype, leaves) -> list[list]:
    """Output and every input's gradient, from fastpar's kernel ("ours") and the float64
    reference ("exact")."""
    import torch

    from fastpar.ops.rnn_op import gru_recurrence_triton, rnn_recurrence_triton
    from fastpar.ops.rnn_reference import gru_recurrence_reference, rnn_recurrence_reference

    lengths = torch.tensor([5, 4, 2])
    results = []
    for kind, ts in (("ours", [t.to(device, dtype) for t in leaves]), ("exact", leaves)):
        inputs = [t.detach().requires_grad_() for t in ts]
        if cell == "gru":
            args = (*inputs[:3], inputs[3], lengths, True)
            out = (
                gru_recurrence_triton(*args, kernel=kernel)
                if kind == "ours"
                else gru_recurrence_reference(*args)
            )
        else:
            args = (*inputs, lengths, True, cell.removeprefix("rnn_"))
            out = (
                rnn_recurrence_triton(*args, kernel=kernel)
                if kind == "ours"
                else rnn_recurrence_reference(*args)
            )
        out.double().square().sum().backward()
        results.append([out.double().cpu()] + [t.grad.double().cpu() for t in inputs])
    return results


def cell_case(cell: str, kernel: str, dtype_name: str, device) -> Callable[[], None]:
    """Forward and backward of one GRU or RNN recurrence (lengths, reversed), checked loosely
    against the float64 reference."""

    def run() -> None:
        import torch

        dtype = getattr(torch, dtype_name)
        gen = torch.Generator().manual_seed(0)
        T, B, H, G = 5, 3, 32, 3 if cell == "gru" else 1
        shapes = [(T, B, G * H), (B, H), (G * H, H)] + ([(H,)] if cell == "gru" else [])
        leaves = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        leaves[2] *= H**-0.5
        # float32 follows cuDNN's TF32 switch (on by default), whose rounding can flip a relu
        # near 0; the check is against float64, so it runs IEEE float32.
        rnn_switch = torch.backends.cudnn.rnn
        precision, rnn_switch.fp32_precision = rnn_switch.fp32_precision, "ieee"
        try:
            results = _cell_results(cell, kernel, device, dtype, leaves)
        finally:
            rnn_switch.fp32_precision = precision
        tol = 5e-2 if dtype != torch.float32 else 1e-3
        for k, (a, b) in enumerate(zip(*results, strict=True)):
            err = (a - b).abs().max().item()
            if not err <= tol * max(1.0, b.abs().max().item()):
                raise AssertionError(f"{cell} output/gradient {k} differs by {err:.3g}")

    return run


def reduce_case(dtype_name: str, op: str, device) -> Callable[[], None]:
    def run() -> None:
        import torch

        from fastpar.comm import reduce_buffers

        dtype = getattr(torch, dtype_name)
        for numel in (1, 1000, 4099):
            inputs = [torch.randint(-8, 9, (numel,), device=device).to(dtype) for _ in range(3)]
            out = reduce_buffers(inputs, op=op)
            stacked = torch.stack([t.double() for t in inputs])
            expected = stacked.sum(0) if op == "sum" else stacked.amax(0)
            if not torch.equal(out.double(), expected):
                raise AssertionError(f"{numel} elements: not the exact {op}")

    return run


def _ring_rank(rank: int, world: int, device_type: str) -> None:
    import torch

    from fastpar.comm import RingAllReduce

    device = torch.device(device_type, 0) if device_type == "cuda" else torch.device("cpu")
    with RingAllReduce(
        device=device, timeout=60, chunk_bytes=1 << 16, serve_shared_gpu=True
    ) as ring:
        for numel in (1, 1009, 70001):  # the last spans several chunks
            tensor = torch.full((numel,), float(rank + 1), device=device)
            if not ring.should_use(tensor):
                raise RuntimeError(f"the ring does not take a {device_type} tensor")
            ring.all_reduce(tensor)
            expected = world * (world + 1) / 2
            if not bool((tensor == expected).all()):
                raise AssertionError(f"{numel} elements: not {expected}")


def ring_case(device) -> Callable[[], None]:
    def run() -> None:
        from fastpar.testing.distributed import run_multiprocess

        run_multiprocess(_ring_rank, 2, args=(device.type,), timeout=120)

    return run


def cases(device) -> dict[str, Callable[[], None]]:
    import torch
    from variants import variants

    from fastpar.ops import interpreter_active

    kernels = variants(torch.device("cuda") if interpreter_active() else device)
    out: dict[str, Callable[[], None]] = {}
    # Every variant once; the first ("auto") through each path, which compiles fewer kernels
    # than every path of every variant (the first sanitizer tool pays for the compilation).
    for variant in kernels:
        out[f"lstm {variant} bfloat16"] = lstm_case(variant, "bfloat16", device)
    auto = kernels[0]
    out[f"lstm {auto} float32"] = lstm_case(auto, "float32", device)
    out[f"lstm {auto} proj"] = lstm_case(auto, "float32", device, proj_size=16)
    out[f"lstm {auto} packed"] = lstm_case(auto, "float32", device, packed=True)
    out[f"lstm {auto} bidirectional"] = lstm_case(auto, "bfloat16", device, bidirectional=True)
    triton_runs = device.type == "cuda" or interpreter_active()
    for cell in ("gru", "rnn_tanh", "rnn_relu") if triton_runs else ():
        for kernel in ("step", "persistent"):
            # relu's derivative jumps at 0: bfloat16 rounding could flip one, float32 will not.
            dtype = "float32" if cell == "rnn_relu" else "bfloat16"
            out[f"{cell} {kernel} {dtype}"] = cell_case(cell, kernel, dtype, device)
    for dtype in ("float32", "bfloat16", "int64"):
        for op in ("sum", "max"):
            out[f"reduce {dtype} {op}"] = reduce_case(dtype, op, device)
    out["ring all-reduce 2 ranks"] = ring_case(device)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tool", default="none", help="the sanitizer tool watching (a label)")
    parser.add_argument("--csv", type=Path, default=Path("results/sanitizer.csv"))
    args = parser.parse_args(argv)
    import torch
    from common import RowLog, error_text

    device = torch.device(args.device)
    log = RowLog(args.csv, HEADERS)
    done = log.done()
    failed = False
    for name, run in cases(device).items():
        case = f"{args.tool} | {name}"
        if case in done:
            continue
        log.begin(case)
        start = time.perf_counter()
        row: dict[str, object] = {"case": case, "tool": args.tool, "status": "ok"}
        try:
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as error:
            row.update(status="ERROR", error=error_text(error))
            failed = True
        row["seconds"] = round(time.perf_counter() - start, 2)
        log.write(row)
        print(f"  {case}: {row['status']} {row.get('error', '')}", flush=True)
    return CHECK_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
