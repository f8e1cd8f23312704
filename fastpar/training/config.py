"""Options of `fastpar train`, validated once, before any process starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ParallelMode = Literal["dp", "pp", "dp+pp"]
SlicingMode = Literal["fixed", "throughput", "loss"]


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    """Everything a training run needs; the same on every rank."""

    nproc: int = 2
    """Processes to start on this machine (ignored under torchrun, which starts them)."""
    parallel: ParallelMode = "dp"
    """dp: replicas; pp: one pipeline stage per rank; dp+pp: pipelines of `pp_stages` stages,
    replicated (ranks = replicas x stages)."""
    pp_stages: int = 2
    """Stages per pipeline with dp+pp (with pp every rank is a stage)."""
    microbatches: int = 4
    """Micro-batches per pipeline step."""
    schedule: Literal["gpipe", "1f1b"] = "1f1b"
    """Pipeline schedule."""
    comm: Literal["ring", "torch"] = "ring"
    """Gradient all-reduce: fastpar's ring or torch.distributed."""
    backend: Literal["auto", "triton", "torch"] = "auto"
    """LSTM backend."""
    embed: int = 48
    hidden: int = 128
    layers: int = 2
    seq_len: int = 48
    batch_size: int = 16
    """Samples (windows of seq_len bytes) per step and replica: the global batch is
    batch_size x replicas (dynamic slicing moves it between ranks)."""
    steps: int = 1500
    """Optimizer steps in the whole run (a resumed run continues up to this)."""
    lr: float = 4e-3
    slicing: SlicingMode = "fixed"
    """fixed: equal blocks; throughput: blocks follow each replica's speed; loss: blocks grow
    while the loss is stable and shrink when it jumps (dp only for the adaptive ones)."""
    train_bytes: int = 2_000_000
    validation_bytes: int = 200_000
    validation_batches: int = 8
    checkpoint_dir: Path = Path("checkpoints")
    checkpoint_every: int = 250
    resume: bool = False
    profile_dir: Path | None = None
    sample_bytes: int = 240
    seed: int = 0
    timeout_s: float = 120.0
    """Bound on every wait for a peer; a dead or stalled rank ends the run with an error."""
    log_every: int = 10

    def __post_init__(self) -> None:
        positive = ("nproc", "pp_stages", "microbatches", "embed", "hidden", "layers",
                    "seq_len", "batch_size", "steps", "train_bytes", "validation_bytes",
                    "validation_batches", "checkpoint_every", "log_every")  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value}")
        for name, choices in (
            ("parallel", ("dp", "pp", "dp+pp")),
            ("schedule", ("gpipe", "1f1b")),
            ("comm", ("ring", "torch")),
            ("backend", ("auto", "triton", "torch")),
            ("slicing", ("fixed", "throughput", "loss")),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"--{name} must be one of {choices}, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if not self.timeout_s > 0:
            raise ValueError(f"--timeout must be > 0, got {self.timeout_s}")
        if self.parallel != "dp" and self.slicing != "fixed":
            raise ValueError(
                f"--slicing {self.slicing} adapts data-parallel replicas and needs --parallel dp; "
                f"got --parallel {self.parallel}"
            )

    def layout(self, world_size: int) -> tuple[int, int]:
        """(replicas, stages) for `world_size` ranks; raises when they do not fit."""
        if self.parallel == "dp":
            return world_size, 1
        if self.parallel == "pp":
            if world_size < 2:
                raise ValueError(f"--parallel pp needs at least 2 ranks, got {world_size}")
            return 1, world_size
        if world_size % self.pp_stages != 0 or world_size == self.pp_stages:
            raise ValueError(
                f"--parallel dp+pp needs a number of ranks that is a multiple of --pp-stages "
                f"{self.pp_stages} with at least 2 replicas; got {world_size} ranks"
            )

        return world_size // self.pp_stages, self.pp_stages
