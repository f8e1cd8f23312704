"""`fastpar train --metrics DIR`: rank 0 writes every gathered window as TensorBoard scalars and
CSV rows, and at the end of the run a PNG of the whole run.

Files in DIR:
- events.out.tfevents.*: TensorBoard scalars (`tensorboard --logdir DIR`): loss/train,
  loss/validation, throughput/tokens_per_s, time/step_s; with dynamic slicing
  slicing/block/replicaR, slicing/samples_per_s/replicaR, slicing/rate/replicaR and
  slicing/decision (+1 grow, -1 shrink, 1 rebalance, 0 hold or start); with replicas
  dp/allreduce_s/rankR and dp/exposed_comm/rankR (share of the step); with stages
  pp/bubble/rankR and pp/compute_s/rankR.
- steps.csv: one row per step (the whole job, also across resumes): loss, tokens/s, step time,
  blocks, decision.
- ranks.csv: one row per step and rank: every field of `metrics.ROW`, and the block the slicer
  cut for that rank's replica with its measured and smoothed samples/s.
- validation.csv: step, validation loss.
- metrics.png: loss (train and validation), tokens/s, blocks per replica over the steps (with
  the loss policy's grow/shrink decisions marked), exposed communication and bubble.
"""

from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastpar.training.metrics_folder import keep_rows
from fastpar.training.metrics_row import ROW
from fastpar.training.parallel_dims import ParallelDims

if TYPE_CHECKING:  # the launcher checks the columns and the packages without importing torch
    from fastpar.training.metrics import Window

_DECISION_VALUE = {"grow": 1.0, "shrink": -1.0, "rebalance": 1.0, "hold": 0.0, "start": 0.0}
STEP_COLUMNS = ("step", "loss", "tokens_per_s", "step_s", "blocks", "decision",
                "exposed_comm", "bubble")  # fmt: skip
RANK_COLUMNS = ("step", "rank", "replica", "stage", *ROW, "block", "samples_per_s", "rate")
VALIDATION_COLUMNS = ("step", "validation_loss")
CSV_COLUMNS = {"steps.csv": STEP_COLUMNS, "ranks.csv": RANK_COLUMNS,
               "validation.csv": VALIDATION_COLUMNS}  # fmt: skip


def check_metrics_available() -> None:
    """Raise ImportError saying what to install when TensorBoard or matplotlib is missing."""
    # Found, not imported: the launcher runs this before any rank starts, and importing
    # matplotlib (numpy with it) would cost it a fraction of a second for nothing.
    missing = [module for module in ("tensorboard", "matplotlib") if find_spec(module) is None]
    if missing:
        raise ImportError(
            f"--metrics needs {' and '.join(missing)}: pip install 'fastpar[metrics]'"
        )


@dataclass
class Series:
    """What the end-of-run plot needs, kept as the windows arrive."""

    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    blocks: list[tuple[int, ...]] = field(default_factory=list)
    decisions: list[str] = field(default_factory=list)
    exposed: list[float] = field(default_factory=list)
    bubble: list[float] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)

    @classmethod
    def from_rows(cls, steps: list[dict[str, str]], validation: list[dict[str, str]]) -> Series:
        """The series of the rows an earlier part of the run wrote to steps.csv and
        validation.csv."""
        series = cls()
        for row in steps:
            series.steps.append(int(row["step"]))
            series.loss.append(float(row["loss"]))
            series.tokens_per_s.append(float(row["tokens_per_s"]))
            blocks = row["blocks"]
            series.blocks.append(tuple(int(n) for n in blocks.split("/")) if blocks else ())
            series.decisions.append(row["decision"])
            series.exposed.append(float(row["exposed_comm"]))
            series.bubble.append(float(row["bubble"]))
        series.validation = [(int(r["step"]), float(r["validation_loss"])) for r in validation]
        return series


class MetricsWriter:
    """Rank 0's TensorBoard and CSV files in `directory`, and the PNG at `close`.

    Arguments:
        first_step: the run's first step. A run resumed at step S keeps the earlier rows of
            steps before S (validation: at S or before), drops the others (it trains them
            again), tells TensorBoard to hide the earlier events at S or later, and draws the
            whole run from step 0.
    """

    def __init__(self, directory: Path, dims: ParallelDims, seq_len: int, title: str, *,
                 first_step: int = 0) -> None:  # fmt: skip
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from torch.utils.tensorboard.writer import FileWriter

        self.directory, self.dims, self.seq_len, self.title = directory, dims, seq_len, title
        directory.mkdir(parents=True, exist_ok=True)
        self.cost_s = 0.0
        self.series = Series()
        kept_validation: list[dict[str, str]] = []
        if first_step > 0:
            kept = keep_rows(directory / "steps.csv", first_step)
            keep_rows(directory / "ranks.csv", first_step)
            kept_validation = keep_rows(directory / "validation.csv", first_step, inclusive=True)
            self.series = Series.from_rows(kept, kept_validation)
        # One event per step holding all its scalars, queued for the writer thread without
        # blocking (a scalar per event through a 10-event queue costs milliseconds a step).
        self.tensorboard = FileWriter(str(directory), max_queue=1000, flush_secs=30)
        # TensorBoard's restart marker (as SummaryWriter's purge_step writes it): events of
        # earlier files at this step or later are hidden, the steps this run trains again.
        restart = SessionLog(status=SessionLog.START)
        self.tensorboard.add_event(Event(step=first_step, session_log=restart))
        for row in kept_validation:
            if int(row["step"]) == first_step:  # hidden by the marker, and still valid
                self._add({"loss/validation": float(row["validation_loss"])}, first_step)
        self._files: list[Any] = []
        self.steps_csv = self._csv("steps.csv", STEP_COLUMNS, first_step)
        self.ranks_csv = self._csv("ranks.csv", RANK_COLUMNS, first_step)
        self.validation_csv = self._csv("validation.csv", VALIDATION_COLUMNS, first_step)

    def _csv(self, name: str, columns: tuple[str, ...], first_step: int) -> Any:
        path = self.directory / name
        append = first_step > 0 and path.exists()
        handle = open(path, "a" if append else "w", newline="")  # noqa: SIM115 (see close)
        self._files.append(handle)
        writer = csv.writer(handle)
        if not append:
            writer.writerow(columns)
        return writer

    def flush(self) -> None:
        """Put every row and event written so far on disk (at each checkpoint, and when the
        run fails: TensorBoard's writer thread would lose its queue at exit). The rows are
        synced as a checkpoint's files are, so that a machine that fails after a checkpoint
        still holds the rows before it, which a resumed run does not write again."""
        for handle in self._files:
            handle.flush()
            os.fsync(handle.fileno())
        self.tensorboard.flush()

    def write(self, window: Window) -> None:
        """One gathered window: CSV rows and TensorBoard scalars."""
        start = time.perf_counter()
        losses, step_s = window.losses(), window.step_seconds()
        exposed = window.fraction("exposed_s").mean(1).tolist()
        bubble = window.column("bubble").mean(1).tolist()
        global_samples = window.column("global_samples")[:, 0].tolist()
        rows = window.rows.tolist()
        for i, step in enumerate(window.steps):
            decision = window.decisions[i] if window.decisions else None
            stats = decision.stats if decision is not None else None
            tokens_per_s = global_samples[i] * self.seq_len / step_s[i]
            blocks = decision.blocks if decision is not None else ()
            event = stats.event if stats is not None else ""
            self.steps_csv.writerow([step, losses[i], tokens_per_s, step_s[i],
                                     "/".join(map(str, blocks)), event, exposed[i],
                                     bubble[i]])  # fmt: skip
            for rank, row in enumerate(rows[i]):
                replica, stage = self.dims.coordinates(rank)
                extra: list[Any] = ["", "", ""]
                if decision is not None and stats is not None:
                    extra = [blocks[replica], stats.samples_per_s[replica], stats.rates[replica]]
                self.ranks_csv.writerow([step, rank, replica, stage, *map(repr, row), *extra])
            self._scalars(step, losses[i], tokens_per_s, step_s[i], rows[i], blocks, stats)
            series = self.series
            series.steps.append(step)
            series.loss.append(losses[i])
            series.tokens_per_s.append(tokens_per_s)
            series.blocks.append(blocks)
            series.decisions.append(event)
            series.exposed.append(exposed[i])
            series.bubble.append(bubble[i])
        self.cost_s += time.perf_counter() - start

    def _scalars(self, step: int, loss: float, tokens_per_s: float, step_s: float,
                 rows: list[list[float]], blocks: tuple[int, ...], stats: Any) -> None:  # fmt: skip
        values = {"throughput/tokens_per_s": tokens_per_s, "time/step_s": step_s}
        if not math.isnan(loss):
            values["loss/train"] = loss
        for replica, block in enumerate(blocks):
            values[f"slicing/block/replica{replica}"] = block
            if stats is not None:
                values[f"slicing/samples_per_s/replica{replica}"] = stats.samples_per_s[replica]
                values[f"slicing/rate/replica{replica}"] = stats.rates[replica]
        if stats is not None:
            values["slicing/decision"] = _DECISION_VALUE[stats.event]
        field_of = {name: index for index, name in enumerate(ROW)}
        for rank, row in enumerate(rows):
            if self.dims.dp > 1:
                values[f"dp/allreduce_s/rank{rank}"] = row[field_of["allreduce_s"]]
                exposed = row[field_of["exposed_s"]] / max(row[field_of["step_s"]], 1e-12)
                values[f"dp/exposed_comm/rank{rank}"] = exposed
            if self.dims.pp > 1:
                values[f"pp/bubble/rank{rank}"] = row[field_of["bubble"]]
                compute = row[field_of["forward_s"]] + row[field_of["backward_s"]]
                values[f"pp/compute_s/rank{rank}"] = compute
        self._add(values, step)

    def _add(self, values: dict[str, float], step: int) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(value))
                                 for tag, value in values.items()])  # fmt: skip
        self.tensorboard.add_summary(summary, step)

    def write_validation(self, step: int, loss: float) -> None:
        start = time.perf_counter()
        self.validation_csv.writerow([step, loss])
        self._add({"loss/validation": loss}, step)
        self.series.validation.append((step, loss))
        self.cost_s += time.perf_counter() - start

    def close(self) -> Path:
        """Flush and close the files and draw the run (once, after the last step: not part of
        `cost_s`); returns the PNG's path."""
        self.tensorboard.close()
        for handle in self._files:
            handle.close()
        from fastpar.training.metrics_plot import plot_run

        path = self.directory / "metrics.png"
        plot_run(self.series, self.dims, self.title, path)
        return path
