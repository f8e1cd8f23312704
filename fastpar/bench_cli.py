"""`fastpar bench [lstm|allreduce|dp|pp|reduce|slicing|all]`: runs the benchmark scripts of a
source checkout's `bench/` folder, each measuring fastpar and its baseline in the same run,
prints their tables, and writes one CSV and one PNG plot per suite into a results folder.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from fastpar._machine import probe_writable

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"


@dataclass(frozen=True)
class Suite:
    script: str
    title: str
    kind: str  # "lines": y against a numeric x per series; "bars": grouped bars per category
    x: str  # the x column (lines) or the category columns joined by "/" (bars)
    ys: tuple[str, ...]  # columns plotted, one series each
    series: str = ""  # lines: a column that splits rows into series (e.g. ranks)
    ylabel: str = ""
    args: tuple[str, ...] = ()


SUITES: dict[str, Suite] = {
    "lstm": Suite("lstm.py", "LSTM forward+backward (lower is better)", "bars", "shape/impl",
                  ("fwd_ms", "fwdbwd_ms"), ylabel="ms"),
    "allreduce": Suite("allreduce.py", "all-reduce bus bandwidth", "lines", "bytes",
                       ("ring_busbw_GBps", "torch_busbw_GBps"), series="ranks",
                       ylabel="busbw GB/s"),
    "dp": Suite("data_parallel.py", "data-parallel LSTM LM step (lower is better)", "bars",
                "variant", ("step_ms",), ylabel="ms"),
    "pp": Suite("pipeline.py", "pipeline step, 2 stages x 8 micro-batches (lower is better)",
                "bars", "schedule/library/transport", ("step_ms",), ylabel="ms"),
    "reduce": Suite("reduce.py", "k-input reduction bandwidth", "bars", "dtype/size_MB/inputs",
                    ("fastpar_GBps", "stack_sum_GBps", "add_chain_GBps"), ylabel="GB/s"),
    "slicing": Suite("slicing.py", "straggler that comes and goes: samples/s by slicing",
                     "bars", "scenario/phase",
                     ("samples_per_s",), ylabel="samples/s"),
}  # fmt: skip
GROUPS = {"all": ("reduce", "allreduce", "dp", "pp", "slicing", "lstm")}


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _number(value: str | None) -> float:
    """A CSV cell as a number; NaN (a gap in the plot) where a case failed or did not apply."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")


def _measured(suite: Suite, rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Rows with a number in at least one plotted column: a case that failed has empty cells
    (its error is in the CSV)."""
    return [r for r in rows if any(not math.isnan(_number(r.get(y))) for y in suite.ys)]


def plot(suite: Suite, rows: list[dict[str, str]], png: Path) -> None:
    """One PNG per suite: fastpar next to its baseline, named by the device of the rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _measured(suite, rows)
    figure, axes = plt.subplots(figsize=(9, 4.5))
    if suite.kind == "lines":
        groups: dict[str, list[dict[str, str]]] = defaultdict(list)
        for row in rows:
            groups[row.get(suite.series, "")].append(row)
        for key, group in groups.items():
            xs = [float(r[suite.x]) for r in group]
            for y in suite.ys:
                label = f"{y} ({suite.series} {key})" if suite.series else y
                axes.plot(xs, [_number(r.get(y)) for r in group], marker="o", label=label)
        axes.set_xscale("log", base=2)
        axes.set_xlabel(suite.x)
    else:
        columns = suite.x.split("/")
        labels = ["/".join(r[c] for c in columns) for r in rows]
        width = 0.8 / len(suite.ys)
        for index, y in enumerate(suite.ys):
            positions = [i + index * width for i in range(len(rows))]
            axes.bar(positions, [_number(r.get(y)) for r in rows], width=width, label=y)
        axes.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], labels, rotation=30,
                        ha="right", fontsize=8)  # fmt: skip
    devices = sorted({r.get("device", "") for r in rows} - {""})
    axes.set_title(f"{suite.title}\n{', '.join(devices)}", fontsize=10)
    axes.set_ylabel(suite.ylabel)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(png, dpi=120)
    plt.close(figure)


def run(names: list[str], results: Path) -> int:
    """Runs the named suites ("all" for every one); returns the exit status.

    `results` may be relative: it is the caller's folder that it is relative to, although the
    scripts run in the checkout.
    """
    if not BENCH_DIR.is_dir():
        print(f"fastpar bench runs the scripts in a source checkout's bench/ folder, and "
              f"{BENCH_DIR} does not exist", file=sys.stderr)  # fmt: skip
        return 2
    selected: list[str] = []
    for name in names:
        for suite in GROUPS.get(name, (name,)):
            if suite not in SUITES:
                choices = ", ".join([*SUITES, *GROUPS])
                print(f"unknown benchmark {suite!r}; choose from {choices}", file=sys.stderr)
                return 2
            if suite not in selected:
                selected.append(suite)
    if importlib.util.find_spec("matplotlib") is None:  # found out after the first suite ran
        print("fastpar bench plots with matplotlib, which is not installed: "
              "pip install 'fastpar[bench]'", file=sys.stderr)  # fmt: skip
        return 2
    results = Path(results).resolve()
    try:  # before the long runs, not when the first suite writes its CSV
        results.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        why = "a file is in the way" if results.is_file() else error.strerror
        print(f"fastpar bench --results: cannot create the folder {results} ({why})",
              file=sys.stderr)  # fmt: skip
        return 2
    try:  # the probe the training folders use: os.access misses what only a write meets
        probe_writable(results)
    except OSError as error:
        print(f"fastpar bench --results: the folder {results} is not writable "
              f"({error.strerror})", file=sys.stderr)  # fmt: skip
        return 2
    status = 0
    for name in selected:
        suite = SUITES[name]
        csv_path = results / f"{name}.csv"
        print(f"\n=== {name}: bench/{suite.script}", flush=True)
        command = [sys.executable, str(BENCH_DIR / suite.script), "--csv", str(csv_path),
                   *suite.args]  # fmt: skip
        completed = subprocess.run(command, cwd=BENCH_DIR.parent, check=False)
        if completed.returncode != 0 or not csv_path.exists():
            print(f"=== {name}: did not complete (exit {completed.returncode})", flush=True)
            status = 1
            continue
        png = results / f"{name}.png"
        rows = _read(csv_path)
        needed = {*suite.ys, *suite.x.split("/"), *([suite.series] if suite.series else [])}
        missing = sorted(needed - set(rows[0] if rows else ()))
        if missing:
            print(f"=== {name}: no plot, {csv_path} lacks columns {missing}", flush=True)
            status = 1
            continue
        plot(suite, rows, png)
        print(f"=== {name}: {csv_path} and {png}", flush=True)
    return status
