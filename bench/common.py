"""Shared pieces of the benchmark scripts: timing statistics, tables and CSV output.

Every benchmark measures fastpar and its baseline in the same run and reports ratios, with the
median and the 20th/80th percentiles of repeated timings.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fastpar._machine import describe_cores


@dataclass(frozen=True)
class Timing:
    median_s: float
    p20_s: float
    p80_s: float


def time_cpu(fn: Callable[[], object], *, repeats: int = 30, min_time_s: float = 0.05) -> Timing:
    """Times `fn` on the host clock: one warm-up call, then `repeats` samples, each averaging as
    many calls as fill `min_time_s` (so microsecond calls are not dominated by timer noise)."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-9)
    calls = max(1, int(min_time_s / once))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    quantiles = statistics.quantiles(samples, n=10)
    return Timing(statistics.median(samples), quantiles[1], quantiles[7])


def device_name(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {describe_cores()}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def write_csv(path: Path, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(headers)
        writer.writerows(rows)


class RowLog:
    """A CSV that grows one row at a time, flushed as each row is written, so a benchmark that
    crashes or times out keeps every row it finished; rows with an `error` say why they failed.

    `begin(case)` notes the case in progress in `<csv>.running` (read after a crash to name the
    case that died); `done()` lists the cases already written (to resume after a crash).
    """

    def __init__(self, path: Path, headers: Sequence[str]) -> None:
        self.path = Path(path)
        self.headers = list(headers)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.running = self.path.with_name(self.path.name + ".running")
        if not self.path.exists() or self.path.stat().st_size == 0:
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(self.headers)

    def rows(self) -> list[dict[str, str]]:
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def done(self) -> set[str]:
        return {row.get("case", "") for row in self.rows()}

    def begin(self, case: str) -> None:
        self.running.write_text(case + "\n")

    def write(self, row: dict[str, object]) -> None:
        unknown = set(row) - set(self.headers)
        if unknown:
            raise KeyError(f"{self.path.name}: no column for {sorted(unknown)}")
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([_csv_value(row.get(h, "")) for h in self.headers])
            f.flush()
            os.fsync(f.fileno())
        self.running.unlink(missing_ok=True)


def _csv_value(value: object) -> object:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return value


def error_text(error: BaseException, limit: int = 300) -> str:
    """One line for a table cell: the exception's type and the start of its message."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class LSTMLanguageModel(torch.nn.Module):
    """The benchmarks' model: embedding -> multi-layer torch.nn.LSTM -> vocabulary logits."""

    def __init__(self, vocab: int, embedding: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, embedding)
        self.lstm = torch.nn.LSTM(embedding, hidden, num_layers=layers, batch_first=True)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, T) int64 -> logits (B, T, vocab)."""
        output, _ = self.lstm(self.embed(tokens))
        return self.head(output)
