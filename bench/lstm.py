"""LSTM benchmark: fastpar (Triton) vs torch.nn.LSTM (cuDNN) vs a torch.nn.LSTMCell loop.

Times forward and forward+backward (median, p20 and p80 of ``triton.testing.do_bench``) of one
layer at each shape, all three implementations in the same run on the same weights, and prints
milliseconds and the ratio to cuDNN (below 1: fastpar is faster). Each shape first checks that
fastpar's output agrees with cuDNN's, so a fast but wrong kernel cannot post a number.

    python3 bench/lstm.py                      # all shapes
    python3 bench/lstm.py --quick              # the standard shape only
    python3 bench/lstm.py --csv results/lstm.csv --table results/lstm.txt

Needs a CUDA device; exits with a message (status 2) without one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from common import device_name, format_table, write_csv

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass(frozen=True)
class Shape:
    batch: int
    time: int
    hidden: int
    input: int
    dtype: torch.dtype

    def __str__(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return f"B={self.batch} T={self.time} H={self.hidden} I={self.input} {dt}"


SHAPES = [
    Shape(16, 1024, 768, 768, torch.bfloat16),  # the standard shape
    Shape(16, 1024, 768, 768, torch.float16),
    Shape(64, 512, 1024, 1024, torch.bfloat16),
    Shape(256, 256, 1000, 1000, torch.bfloat16),  # H not a multiple of 128, B > 128
    Shape(8, 2048, 256, 256, torch.bfloat16),
]
IMPLS = ("fastpar", "cudnn", "cell_loop")


def _cell_loop(cell: torch.nn.LSTMCell, x: torch.Tensor) -> torch.Tensor:
    h = c = x.new_zeros(x.shape[1], cell.hidden_size)
    outs = []
    for t in range(x.shape[0]):
        h, c = cell(x[t], (h, c))
        outs.append(h)
    return torch.stack(outs)


def _models(shape: Shape, dev: torch.device) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    import fastpar.nn

    torch.manual_seed(0)
    ours = fastpar.nn.LSTM(shape.input, shape.hidden, backend="triton").to(dev, shape.dtype)
    cudnn = torch.nn.LSTM(shape.input, shape.hidden).to(dev, shape.dtype)
    cudnn.load_state_dict(ours.state_dict())
    cell = torch.nn.LSTMCell(shape.input, shape.hidden).to(dev, shape.dtype)
    cell.load_state_dict({k.removesuffix("_l0"): v for k, v in ours.state_dict().items()})
    return {
        "fastpar": lambda x: ours(x)[0],
        "cudnn": lambda x: cudnn(x)[0],
        "cell_loop": lambda x: _cell_loop(cell, x),
    }


def _time(fn: Callable[[], object]) -> tuple[float, float, float]:
    from triton.testing import do_bench

    p50, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=200)
    return p50, p20, p80


def bench_shape(
    shape: Shape,
    dev: torch.device | None = None,
    timer: Callable[[Callable[[], object]], tuple[float, float, float]] = _time,
) -> list[dict]:
    """Rows (one per implementation) of forward and forward+backward times for one shape.

    ``dev`` (default CUDA) and ``timer`` (median, p20, p80 in ms) exist so the logic can be
    dry-run on a CPU.
    """
    dev = dev or torch.device("cuda")
    from fastpar.ops.lstm_forward import choose_kernel

    models = _models(shape, dev)
    x = torch.randn(shape.time, shape.batch, shape.input, device=dev, dtype=shape.dtype)
    grad = torch.randn(shape.time, shape.batch, shape.hidden, device=dev, dtype=shape.dtype)
    with torch.no_grad():
        diff = (models["fastpar"](x).float() - models["cudnn"](x).float()).abs().max().item()
    tol = 5e-2 if shape.dtype != torch.float32 else 1e-3
    if not diff <= tol:
        raise RuntimeError(f"{shape}: fastpar differs from cuDNN by {diff:.3g} (> {tol})")
    kernel = choose_kernel(shape.batch, shape.hidden, shape.hidden, shape.dtype, dev)
    xg = x.detach().requires_grad_()
    rows = []
    for name in IMPLS:
        model = models[name]

        def forward(model: Callable = model) -> object:
            with torch.no_grad():
                return model(x)

        def train_step(model: Callable = model) -> None:
            model(xg).backward(grad)

        fwd = timer(forward)
        both = timer(train_step)
        rows.append(
            {"shape": str(shape), "impl": name, "fwd_ms": fwd[0], "fwd_p20": fwd[1],
             "fwd_p80": fwd[2], "fwdbwd_ms": both[0], "fwdbwd_p20": both[1],
             "fwdbwd_p80": both[2], "max_abs_diff_vs_cudnn": diff,
             "kernel": kernel if name == "fastpar" else ""}
        )  # fmt: skip
    # The GEMM work of one layer: input and recurrent projections, 2 flops per multiply-add;
    # backward does twice the forward's (input and weight gradients).
    fwd_flops = 2 * shape.time * shape.batch * 4 * shape.hidden * (shape.input + shape.hidden)
    for r in rows:
        r["fwd_tflops"] = fwd_flops / r["fwd_ms"] / 1e9
        r["fwdbwd_tflops"] = 3 * fwd_flops / r["fwdbwd_ms"] / 1e9
    base = next(r for r in rows if r["impl"] == "cudnn")
    for r in rows:
        r["fwd_vs_cudnn"] = r["fwd_ms"] / base["fwd_ms"]
        r["fwdbwd_vs_cudnn"] = r["fwdbwd_ms"] / base["fwdbwd_ms"]
    return rows


COLUMNS = [
    ("shape", "shape"), ("impl", "impl"), ("fwd ms", "fwd_ms"), ("x cuDNN", "fwd_vs_cudnn"),
    ("fwd+bwd ms", "fwdbwd_ms"), ("x cuDNN ", "fwdbwd_vs_cudnn"),
    ("fwd+bwd TFLOP/s", "fwdbwd_tflops"), ("kernel", "kernel"),
]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the standard shape only")
    parser.add_argument("--csv", type=Path, help="write all rows as CSV")
    parser.add_argument("--table", type=Path, help="also write the table here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/lstm.py needs a CUDA GPU: torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    print(f"device: {device_name('cuda')}, torch {torch.__version__}", flush=True)
    rows: list[dict] = []
    for shape in SHAPES[:1] if args.quick else SHAPES:
        print(f"timing {shape} ...", flush=True)
        rows += bench_shape(shape)
        torch.cuda.empty_cache()
    table = format_table([h for h, _ in COLUMNS], [[r[k] for _, k in COLUMNS] for r in rows])
    if args.csv:
        write_csv(args.csv, list(rows[0]), [list(r.values()) for r in rows])
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
