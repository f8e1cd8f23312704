"""The compact summary a GPU check prints last, read from the rows in its results folder (only
the standard library: it must print whatever state the stages left).

    python3 bench/gpu_summary.py [results]
"""

from __future__ import annotations

import csv
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

FAILED = ("FAIL", "ERROR", "failed", "error", "TIMEOUT", "CRASH")
# The public reference point for the first LSTM shape (B16 T1024 I768 H768, bfloat16).
CUDNN_H100 = "public reference, cuDNN on an H100: 2.01 ms forward, 5.19 ms forward+backward"


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _cell(value: str, width: int = 60) -> str:
    try:
        number = float(value)
    except ValueError:
        return value if len(value) <= width else value[: width - 3] + "..."
    if number != number or value.strip().lower() in ("true", "false"):
        return value
    return f"{number:.3g}" if abs(number) < 1000 else f"{number:.0f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    cells = [list(headers)] + [[_cell(str(v)) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _section(title: str, rows: list[dict[str, str]], columns: Sequence[tuple[str, str]]) -> str:
    if not rows:
        return f"== {title}: no rows"
    body = table([h for h, _ in columns], [[r.get(k) or "" for _, k in columns] for r in rows])
    return f"== {title}\n{body}"


def summary(out: Path, dry_run: bool = False) -> str:
    parts = []
    versions = out / "versions.txt"
    parts.append(
        "== versions\n" + (versions.read_text().rstrip() if versions.exists() else "(not written)")
    )
    if dry_run:
        parts.append(
            "DRY RUN: tiny shapes on a CPU, Triton's interpreter; no figure below is a GPU's."
        )
    parts.append(
        _section(
            "stages",
            _rows(out / "stages.csv"),
            [
                ("stage", "stage"),
                ("status", "status"),
                ("s", "seconds"),
                ("budget", "budget_s"),
                ("rows", "rows"),
                ("failed", "failed"),
                ("detail", "detail"),
            ],
        )
    )
    tests = _rows(out / "tests.csv")
    if tests:
        counts = Counter((r["module"], r["status"]) for r in tests)
        modules = sorted({m for m, _ in counts})
        statuses = ["passed", "failed", "error", "skipped", "TIMEOUT", "CRASH"]
        body = table(
            ["module", *statuses], [[m, *[str(counts[(m, s)]) for s in statuses]] for m in modules]
        )
        bad = [
            f"  {r['status']}: {r['case']}: {r.get('error', '')[:160]}"
            for r in tests
            if r["status"] in FAILED
        ]
        parts.append(
            "== GPU tests (pytest -m gpu, one run per module)\n"
            + body
            + ("\n" + "\n".join(bad) if bad else "")
        )
    else:
        parts.append("== GPU tests: no rows")
    lstm = _rows(out / "lstm.csv") + _rows(out / "lstm_tiles.csv")
    parts.append(
        _section(
            "LSTM, GRU, RNN vs torch's module of the cell (x base: time / baseline's; LSTM "
            f"{CUDNN_H100})",
            lstm,
            [
                ("shape", "shape"),
                ("impl", "impl"),
                ("status", "status"),
                ("fwd ms", "fwd_ms"),
                ("x base", "fwd_vs_base"),
                ("fwd+bwd ms", "fwdbwd_ms"),
                ("x base", "fwdbwd_vs_base"),
                ("TFLOP/s", "fwdbwd_tflops"),
                ("err", "max_rel_err"),
                ("base err", "base_rel_err"),
                ("kernel", "kernel"),
                ("error", "error"),
            ],
        )
    )
    parts.append(
        _section(
            "kernels per forward+backward (torch.profiler)",
            _rows(out / "lstm_profile.csv"),
            [
                ("shape", "shape"),
                ("impl", "impl"),
                ("status", "status"),
                ("kernels", "kernels"),
                ("kernel ms", "kernel_ms"),
                ("kernels/seq", "kernels_per_seq"),
                ("kernel us/seq", "kernel_us_per_seq"),
                ("error", "error"),
            ],
        )
    )
    reduce_rows = _rows(out / "allreduce.csv")
    section = _section(
        "all-reduce, float32 SUM (ring vs torch.distributed)",
        reduce_rows,
        [
            ("ranks", "ranks"),
            ("gpus", "gpus"),
            ("bytes", "bytes"),
            ("status", "status"),
            ("exact", "exact"),
            ("bitwise", "bitwise_equal"),
            ("ring us", "ring_us"),
            ("p20", "ring_p20_us"),
            ("p80", "ring_p80_us"),
            ("ring busbw GB/s", "ring_busbw_GBps"),
            ("torch", "torch_backend"),
            ("torch us", "torch_us"),
            ("speedup", "speedup"),
            ("error", "error"),
        ],
    )
    if any(0 < int(r.get("gpus") or 0) < int(r.get("ranks") or 0) for r in reduce_rows):
        section += (
            "\nRanks share one GPU: their bandwidth is that GPU's memory. NVLink "
            "bandwidth needs two GPUs and is not measured here."
        )
    parts.append(section)
    sanitizer = _rows(out / "sanitizer.csv")
    verdicts = [r for r in sanitizer if r["case"].endswith("verdict")]
    bad = [r for r in sanitizer if r["status"] in FAILED and r not in verdicts]
    title = "compute-sanitizer" if verdicts else "kernels at small shapes (no sanitizer)"
    count = (
        f"{sum(r['status'] == 'ok' for r in sanitizer if r not in verdicts)} of "
        f"{len(sanitizer) - len(verdicts)} kernel cases ran without an error"
    )
    # Verdicts and failures get a table; a clean run without a sanitizer is just the count.
    columns = [("case", "case"), ("status", "status"), ("error", "error")]
    shown = verdicts + bad
    parts.append((_section(title, shown, columns) if shown else f"== {title}") + "\n" + count)
    return "\n\n".join(parts)


if __name__ == "__main__":
    print(summary(Path(sys.argv[1] if len(sys.argv) > 1 else "results")))
