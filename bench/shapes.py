"""The shapes every benchmark runs, in one place: `bench/lstm.py` (so `fastpar bench lstm`),
`bench/gpu_check.sh` and the pytest-benchmark modules (`bench/test_bench_*.py`) read them here.

Three scales: "gpu" (the table of a GPU run), "cpu" (the CPU mode of the LSTM benchmark, one
thread) and "tiny" (the dry run and CI: the same code paths at sizes Triton's interpreter and
two CPU cores get through in seconds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Scale = Literal["gpu", "cpu", "tiny"]
SCALES: tuple[Scale, ...] = ("gpu", "cpu", "tiny")
Cell = Literal["lstm", "gru", "rnn"]
# Gates per hidden unit: rows of W_ih and W_hh are GATES[cell] * H.
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


@dataclass(frozen=True)
class LSTMShape:
    """One recurrent benchmark case: batch B, time T, input I, hidden H, layers L, proj P (0:
    none; LSTM only), of an LSTM, a GRU or a (tanh) RNN.

    `packed`: the batch is a PackedSequence whose lengths spread evenly from T/8 to T.
    """

    batch: int
    time: int
    input: int
    hidden: int
    dtype: str  # a torch dtype's name: "float32", "bfloat16", "float16"
    layers: int = 1
    proj: int = 0
    packed: bool = False
    cell: Cell = "lstm"

    @property
    def name(self) -> str:
        parts = [] if self.cell == "lstm" else [self.cell.upper()]
        parts += [f"B{self.batch}", f"T{self.time}", f"I{self.input}", f"H{self.hidden}"]
        if self.layers != 1:
            parts.append(f"L{self.layers}")
        if self.proj:
            parts.append(f"P{self.proj}")
        if self.packed:
            parts.append("packed")
        return " ".join([*parts, self.dtype])

    def lengths(self) -> list[int]:
        """Per-sequence lengths, longest first (what pack_padded_sequence wants by default)."""
        if not self.packed:
            return [self.time] * self.batch
        low = max(1, self.time // 8)
        if self.batch == 1:
            return [self.time]
        step = (self.time - low) / (self.batch - 1)
        return [round(self.time - i * step) for i in range(self.batch)]

    def gemm_flops(self) -> float:
        """Forward GEMM flops of the layers (input and recurrent projections, 2 per multiply-add,
        over the valid steps only); backward does twice as many."""
        steps = sum(self.lengths())
        out = self.proj or self.hidden
        flops = 0.0
        for layer in range(self.layers):
            width = self.input if layer == 0 else out
            flops += 2 * steps * GATES[self.cell] * self.hidden * (width + out)
            if self.proj:
                flops += 2 * steps * self.hidden * self.proj
        return flops


# The table of a GPU run, most important first: a stage that runs out of time keeps the rows
# it finished. The first is the public reference point (cuDNN on an H100: 2.01 ms forward,
# 5.19 ms forward+backward in bfloat16); the GRU and the RNN follow at the same shape.
GPU_LSTM_SHAPES = (
    LSTMShape(16, 1024, 768, 768, "bfloat16"),
    LSTMShape(16, 1024, 768, 768, "bfloat16", cell="gru"),
    LSTMShape(16, 1024, 768, 768, "bfloat16", cell="rnn"),
    LSTMShape(16, 1024, 768, 768, "float16"),
    LSTMShape(16, 1024, 768, 768, "float16", cell="gru"),
    LSTMShape(16, 1024, 768, 768, "float16", cell="rnn"),
    LSTMShape(64, 256, 1024, 1024, "bfloat16"),
    LSTMShape(256, 100, 512, 512, "bfloat16"),
    LSTMShape(64, 512, 512, 512, "bfloat16", packed=True),
    LSTMShape(16, 1024, 768, 768, "float32"),
    LSTMShape(16, 512, 768, 768, "bfloat16", proj=384),
)
# The CPU mode (`bench/lstm.py --device cpu`, one thread): fastpar backend="auto" against
# torch.nn.LSTM, forward+backward, same weights.
CPU_LSTM_SHAPES = (
    LSTMShape(16, 64, 64, 256, "float32", layers=2),
    LSTMShape(32, 128, 128, 512, "float32"),
    LSTMShape(8, 256, 32, 64, "float32"),
    LSTMShape(64, 32, 256, 1024, "float32"),
    LSTMShape(16, 64, 64, 256, "float32", layers=2, cell="gru"),
    LSTMShape(32, 128, 128, 512, "float32", cell="gru"),
    LSTMShape(16, 64, 64, 256, "float32", layers=2, cell="rnn"),
    LSTMShape(32, 128, 128, 512, "float32", cell="rnn"),
)
# Dry run and CI: every kind of GPU case (dtypes, packed, proj, layers) at interpreter sizes.
TINY_LSTM_SHAPES = (
    LSTMShape(3, 5, 8, 16, "float32"),
    LSTMShape(3, 5, 8, 16, "bfloat16"),
    LSTMShape(4, 6, 8, 16, "float32", packed=True),
    LSTMShape(3, 4, 8, 16, "float32", proj=8),
    LSTMShape(2, 4, 8, 16, "float32", layers=2),
    LSTMShape(3, 5, 8, 16, "bfloat16", cell="gru"),
    LSTMShape(4, 6, 8, 16, "float32", packed=True, cell="gru"),
    LSTMShape(3, 5, 8, 16, "float32", layers=2, cell="rnn"),
)
# torch.profiler's kernel count and time per sequence, one forward+backward each: the first
# shape, and the packed batch (whose time against the kernels' own shows the host's share).
PROFILE_SHAPES = {
    "gpu": (GPU_LSTM_SHAPES[0], next(s for s in GPU_LSTM_SHAPES if s.packed)),
    "cpu": (CPU_LSTM_SHAPES[0],),
    "tiny": (TINY_LSTM_SHAPES[0], next(s for s in TINY_LSTM_SHAPES if s.packed)),
}


def lstm_shapes(scale: Scale) -> tuple[LSTMShape, ...]:
    return {"gpu": GPU_LSTM_SHAPES, "cpu": CPU_LSTM_SHAPES, "tiny": TINY_LSTM_SHAPES}[scale]


@dataclass(frozen=True)
class Tolerance:
    """fastpar passes when its error against a float64 reference is at most
    `factor` x the baseline's error in the same dtype + `floor` (errors relative to the
    reference's largest magnitude, per output and per gradient)."""

    factor: float
    floor: float


TOLERANCES = {
    "float32": Tolerance(factor=8.0, floor=1e-4),  # TF32 follows torch's switch, off by default
    "bfloat16": Tolerance(factor=4.0, floor=2e-2),
    "float16": Tolerance(factor=4.0, floor=4e-3),
    "float64": Tolerance(factor=8.0, floor=1e-10),
}


@dataclass(frozen=True)
class AllReduceShape:
    ranks: tuple[int, ...]
    sizes: tuple[int, ...]  # bytes of float32
    samples: int
    max_calls: int


def _doubling(low: int, high: int) -> tuple[int, ...]:
    sizes = []
    while low <= high:
        sizes.append(low)
        low *= 2
    return tuple(sizes)


ALLREDUCE = {
    # Ranks sharing the one GPU of a GPU check: latency by size; 4x steps keep it short.
    "gpu": AllReduceShape((2, 4), (1024, 16384, 262144, 4 << 20, 16 << 20, 64 << 20), 7, 20),
    "cpu": AllReduceShape((2, 4), _doubling(1024, 64 << 20), 15, 500),
    "tiny": AllReduceShape((2,), (1024, 65536), 2, 3),
}
# The k-input reduction kernel: sizes in MB, input counts, dtypes.
REDUCE = {
    "gpu": ((1.0, 64.0), (2, 4), ("float32", "bfloat16")),
    "cpu": ((1.0, 64.0), (2, 4), ("float32", "bfloat16")),
    "tiny": ((0.0625,), (2, 3), ("float32", "bfloat16")),
}
