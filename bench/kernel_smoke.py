"""Every kernel of fastpar once, at small shapes: what `compute-sanitizer` (memcheck, racecheck,
synccheck) watches in a GPU check. Each case is one CSV row written as it ends; a case that
raises is a row with its error and the next case runs.

Kernels: every body of the Triton recurrence a GPU can run, each case naming backend="triton"
and its kernel ("step" or "persistent") so that no dispatcher choice (backend="auto" takes
cuDNN for some of these) hides one: the LSTM in float32, bfloat16 and float16, with lengths,
a projection, both directions, two batch blocks; the GRU and both Elman RNN cells; the forward
that loops over K tiles of W_hh (the smallest shape that reaches it on a GPU); then the native
k-input reduction and the native ring all-reduce across 2 processes (CUDA IPC on a GPU, shared
memory on a CPU). tests/test_kernel_smoke.py checks which bodies the cases reach.

    compute-sanitizer --tool memcheck --target-processes all \\
        python3 bench/kernel_smoke.py --device cuda --tool memcheck --csv results/sanitizer.csv
    TRITON_INTERPRET=1 python3 bench/kernel_smoke.py --device cpu --csv ...   (the dry run)

Exit status: 0 every case passed, 4 one failed (see its row).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CHECK_FAILED = 4
HEADERS = ("case", "tool", "status", "seconds", "error")


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """float32 recurrences in IEEE precision, fastpar's and torch's alike: both follow cuDNN's
    TF32 switch (on by default), whose rounding differs between them by more than the
    float32 tolerance (and can flip a relu near 0)."""
    import torch

    rnn_switch = torch.backends.cudnn.rnn
    precision, rnn_switch.fp32_precision = rnn_switch.fp32_precision, "ieee"
    try:
        yield
    finally:
        rnn_switch.fp32_precision = precision


def lstm_case(
    kernel: str, dtype_name: str, device, batch: int = 3, packed: bool = False, **options
) -> Callable[[], None]:
    """Forward and backward of a small LSTM on the Triton `kernel` ("step" or "persistent"),
    checked loosely against torch.nn.LSTM; `options` are torch.nn.LSTM's (proj_size, ...)."""

    def run() -> None:
        import torch
        from torch.nn.utils.rnn import pack_padded_sequence

        import fastpar.nn

        dtype = getattr(torch, dtype_name)
        torch.manual_seed(0)
        T = 5
        kwargs = dict(input_size=8, hidden_size=32, **options)
        base = torch.nn.LSTM(**kwargs).to(device, dtype)
        ours = fastpar.nn.LSTM(**kwargs, backend="triton", kernel=kernel).to(device, dtype)
        ours.load_state_dict(base.state_dict())
        x = torch.randn(T, batch, 8, device=device, dtype=dtype)
        # Every length from T down to 1, longest first (as packing wants).
        lengths = T - torch.arange(batch) * (T - 1) // max(1, batch - 1)
        results = []
        for model in (ours, base):
            inp = x.detach().requires_grad_()
            feed = pack_padded_sequence(inp, lengths) if packed else inp
            with ieee_float32():
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


def _cell_results(cell: str, kernel: str, device, dtype, leaves, lengths) -> list[list]:
    """Output and every input's gradient, from fastpar's kernel ("ours") and the float64
    reference ("exact")."""
    from fastpar.ops.rnn_op import gru_recurrence_triton, rnn_recurrence_triton
    from fastpar.ops.rnn_reference import gru_recurrence_reference, rnn_recurrence_reference

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


def cell_case(
    cell: str, kernel: str, dtype_name: str, device, hidden: int = 32, steps: int = 5
) -> Callable[[], None]:
    """Forward and backward of one GRU or RNN recurrence (lengths, reversed), checked loosely
    against the float64 reference."""

    def run() -> None:
        import torch

        dtype = getattr(torch, dtype_name)
        gen = torch.Generator().manual_seed(0)
        T, B, H, G = steps, 3, hidden, 3 if cell == "gru" else 1
        lengths = torch.tensor([T, T - 1, max(1, T - 3)])
        shapes = [(T, B, G * H), (B, H), (G * H, H)] + ([(H,)] if cell == "gru" else [])
        leaves = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        leaves[2] *= H**-0.5
        with ieee_float32():  # the check is against float64
            results = _cell_results(cell, kernel, device, dtype, leaves, lengths)
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


# The smallest hidden size whose forward loops over K tiles of W_hh on a GPU (W_RESIDENT=False,
# step and persistent): a (1024, 16) float32 share of an RNN's W_hh and its 16 rows of h_{t-1}
# overflow the registers of its 4 warps (lstm_config.w_fits_registers); an LSTM or GRU needs
# H >= 1025 (float32), with 8x as much W_hh to sanitize. Two steps (a first and a later one) keep
# its K loops cheap in the interpreter.
K_LOOP_HIDDEN = 513
# Batch 65 takes two batch blocks of 64 rows (separate barrier counters in the persistent
# kernels) and, with 64-row blocks, the step backward's K_SPLIT=2.
TWO_BLOCKS_BATCH = 65


def cases(device) -> dict[str, Callable[[], None]]:
    from fastpar.ops import interpreter_active

    out: dict[str, Callable[[], None]] = {}
    if device.type == "cuda" or interpreter_active():
        # Shapes stay tiny: racecheck replays every shared-memory access.
        for kernel in ("step", "persistent"):
            out[f"lstm {kernel} bfloat16 bidirectional"] = lstm_case(
                kernel, "bfloat16", device, bidirectional=True
            )
            out[f"lstm {kernel} float32 packed batch {TWO_BLOCKS_BATCH}"] = lstm_case(
                kernel, "float32", device, batch=TWO_BLOCKS_BATCH, packed=True
            )
        # A projection runs only on the step kernels (h_t needs all hidden units).
        out["lstm step float16 proj"] = lstm_case("step", "float16", device, proj_size=16)
        for kernel in ("step", "persistent"):
            for cell in ("gru", "rnn_tanh"):
                out[f"{cell} {kernel} bfloat16"] = cell_case(cell, kernel, "bfloat16", device)
            # relu's derivative jumps at 0: bfloat16 rounding could flip one, float32 does not
            # (no pre-activation of this case is within 8e-4 of 0).
            out[f"rnn_relu {kernel} float32 hidden {K_LOOP_HIDDEN}"] = cell_case(
                "rnn_relu", kernel, "float32", device, hidden=K_LOOP_HIDDEN, steps=2
            )
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
