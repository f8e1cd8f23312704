"""What each step of `fastpar train` measured and decided, on every rank, gathered to rank 0.

Every rank fills one row of plain floats per step (`ROW`: its loss, block, compute, step time,
all-reduce time and exposed communication from `DataParallel.last_stats`, forward/backward and
bubble from `Pipeline.last_stats`); the values are host-clock times and the loss the loop reads
anyway, so recording adds no synchronisation. Every `--log-every` steps one all-gather of the
window's rows (W x steps x fields floats) brings them to rank 0; it replaces the all-reduce of
the losses that the progress line needed before, so the number of collectives does not change.
The dynamic slicer's decisions need no gathering: every rank holds them (`SlicerStats`).

Rank 0 turns a window into the progress line's notes (`blocks 22/10`, `exposed comm 3 %`,
`bubble 0.18`) and, with `--metrics DIR`, hands it to the writer (`metrics_files`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from fastpar.comm.devices import collective_device
from fastpar.data import SlicerStats
from fastpar.training.metrics_row import ROW
from fastpar.training.parallel_dims import RankPlace


@dataclass(frozen=True)
class Decision:
    """The dynamic slicer's side of one step, known to every rank."""

    blocks: tuple[int, ...]
    """The blocks the slicer cut for the step, per replica (before it was trained)."""
    stats: SlicerStats | None
    """What the slicer measured and decided after the step (None: fixed slicing)."""


@dataclass
class Window:
    """The steps since the last gather, every rank's rows (rank 0 only)."""

    steps: list[int]
    rows: torch.Tensor
    """(steps, W, len(ROW)) float64: rows[i, rank] is that rank's row of steps[i]."""
    decisions: list[Decision]
    """Per step; empty under fixed slicing."""

    def column(self, name: str) -> torch.Tensor:
        """(steps, W) values of one ROW field."""
        return self.rows[:, :, ROW.index(name)]

    def losses(self) -> list[float]:
        """Per step, the mean loss over the samples of the ranks that computed one."""
        loss, samples = self.column("loss"), self.column("samples")
        has = ~torch.isnan(loss)
        weighted = torch.where(has, loss * samples, 0.0).sum(1)
        counts = torch.where(has, samples, 0.0).sum(1)
        return (weighted / counts).tolist()

    def mean_loss(self) -> float:
        loss, samples = self.column("loss"), self.column("samples")
        has = ~torch.isnan(loss)
        count = torch.where(has, samples, 0.0).sum()
        total = torch.where(has, loss * samples, 0.0).sum()
        return (total / count).item() if count > 0 else math.nan

    def step_seconds(self) -> list[float]:
        """Per step, the slowest rank's step time (steps are synchronous)."""
        return self.column("step_s").amax(1).tolist()

    def fraction(self, name: str) -> torch.Tensor:
        """(steps, W) the field divided by each rank's step time."""
        return self.column(name) / self.column("step_s").clamp_min(1e-12)


@dataclass
class StepMetrics:
    """One rank's rows of the current window, and the gather that brings them to rank 0."""

    place: RankPlace
    rows: list[list[float]] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    cost_s: float = 0.0
    """Seconds spent recording the rows and packing/unpacking them, for the metrics' cost."""
    gather_s: float = 0.0
    """Seconds in the all-gather itself (mostly waiting for the slowest rank to arrive), which
    replaced the all-reduce of the losses that ran at the same place before."""

    def record(self, step: int, row: dict[str, float], decision: Decision | None) -> None:
        """Keep this rank's `row` (every ROW field) of `step`; cheap, no communication."""
        start = time.perf_counter()
        self.steps.append(step)
        self.rows.append([float(row[name]) for name in ROW])
        if decision is not None:
            self.decisions.append(decision)
        self.cost_s += time.perf_counter() - start

    def gather(self) -> Window | None:
        """Every rank's rows since the last gather (a collective over the world); the Window on
        rank 0, None elsewhere."""
        start = time.perf_counter()
        mine = torch.tensor(self.rows, dtype=torch.float64, device=collective_device(None))
        everyone = [torch.empty_like(mine) for _ in range(self.place.dims.world_size)]
        collective = time.perf_counter()
        dist.all_gather(everyone, mine)
        waited = time.perf_counter() - collective
        self.gather_s += waited
        window = None
        if self.place.rank == 0:
            rows = torch.stack([t.cpu() for t in everyone], dim=1)
            window = Window(self.steps, rows, self.decisions)
        self.rows, self.steps, self.decisions = [], [], []
        self.cost_s += time.perf_counter() - start - waited
        return window


def progress_notes(window: Window, place: RankPlace) -> str:
    """The few numbers that matter for the layout: the blocks the dynamic slicer chose per
    replica, the communication the data-parallel backward left exposed (share of the step,
    averaged over ranks and steps), the pipeline's bubble (averaged over stages and steps)."""
    notes = []
    if window.decisions:
        notes.append("blocks " + "/".join(map(str, window.decisions[-1].blocks)))
    if place.dims.dp > 1:
        notes.append(f"exposed comm {window.fraction('exposed_s').mean().item():.0%}")
    if place.dims.pp > 1:
        notes.append(f"bubble {window.column('bubble').mean().item():.2f}")
    return "  ".join(note.replace("%", " %") for note in notes)
