"""`PipelineConfig` (the options every rank of a pipeline shares) and `StepStats` (where one
step's time went on a rank)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple, get_args

from fastpar._checks import check_choice, check_int_at_least, check_timeout_s
from fastpar.parallel.pipeline.schedules import SCHEDULES, Schedule

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "REDUCTIONS",
    "TRANSPORTS",
    "ActionTime",
    "PipelineConfig",
    "Reduction",
    "StepStats",
    "Transport",
]

Reduction = Literal["mean", "sum"]
REDUCTIONS: tuple[str, ...] = get_args(Reduction)
Transport = Literal["auto", "shm", "torch"]
TRANSPORTS: tuple[str, ...] = get_args(Transport)
DEFAULT_TIMEOUT_S = 300.0


@dataclass(kw_only=True, frozen=True)
class PipelineConfig:
    """Options of `Pipeline` (the same on every rank of the pipeline)."""

    num_stages: int
    """Number of global stages: the group size with one stage per rank, a multiple of it for
    "interleaved-1f1b", twice it for "zbv"."""
    num_microbatches: int = 8
    """Micro-batches per step; a tensor batch of size N is cut into pieces of N // m or
    N // m + 1 along `batch_dim` (so m need not divide N)."""
    schedule: Schedule = "1f1b"
    """"gpipe" (all forwards, then all backwards), "1f1b" (at most num_stages micro-batches
    in flight), "interleaved-1f1b" (several chunks per rank, looped), "zero-bubble" (ZB-H1:
    backward split into input and weight passes, weights deferred into the bubble) or "zbv"
    (zero-bubble with two chunks per rank placed in a V)."""
    loss_reduction: Reduction = "mean"
    """"mean": `loss_fn` averages over its micro-batch, and each micro-batch's loss is weighted
    by its share of the batch (its size along batch_dim over the batch's), which gives the loss
    and gradients of `loss_fn` on the whole batch when it averages over the batch dimension;
    "sum": losses are added unweighted. A loss averaged over a count that depends on the data
    (cross-entropy with ignore_index, a padding mask) is not the whole batch's under "mean":
    give such a `loss_fn` reduction="sum" and divide by the batch's count yourself."""
    batch_dim: int = 0
    """Dimension of inputs and targets along which micro-batches are cut (1 for
    sequence-first tensors)."""
    timeout_s: float = DEFAULT_TIMEOUT_S
    """Bound in seconds on every host wait for a peer, counted from when the wait starts; a
    peer silent for longer is named in a `PipelineError`. It must exceed the longest honest
    wait: about the other stages' compute of one step (the first backward of a GPipe step)."""
    transport: Transport = "auto"
    """How activations travel between neighbouring stages: "shm" (a shared-memory pipe; CPU
    processes of one host on a gloo group), "torch" (torch.distributed isend/irecv), or "auto"
    (shm where it applies, else torch; a pipe that cannot be set up falls back to torch with a
    warning). The numbers are the same either way."""

    def __post_init__(self) -> None:
        check_int_at_least("num_stages", self.num_stages, 1)
        check_int_at_least("num_microbatches", self.num_microbatches, 1)
        check_int_at_least("batch_dim", self.batch_dim, 0)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("loss_reduction", self.loss_reduction, REDUCTIONS)
        check_timeout_s("timeout_s", self.timeout_s)
        check_choice("transport", self.transport, TRANSPORTS)


class ActionTime(NamedTuple):
    """When one compute action ran, in seconds from the step's start."""

    kind: str  # "F", "B", "I" or "W" (see schedules.Op)
    stage: int
    microbatch: int
    start: float
    end: float


@dataclass
class StepStats:
    """Where the last step's time went on this rank, in seconds (host clock; on CUDA the
    compute times are launch times unless the caller synchronises)."""

    step_s: float = 0.0
    forward_s: float = 0.0
    backward_s: float = 0.0
    """Whole backwards and input-gradient passes."""
    weight_s: float = 0.0
    """Deferred weight-gradient passes (zero-bubble schedules)."""
    split_sends: int = 0
    """Tensors that could not leave whole at once: on torch links, sent apart from their header
    (larger than the receiver's slot, which grows after a step, or any tensor on NCCL); on
    shared-memory links, larger than the pipe's free room (finished by its sender thread)."""
    per_microbatch: list[ActionTime] = field(default_factory=list)
    """Every compute action of the step, in the order it ran."""

    @property
    def compute_s(self) -> float:
        return self.forward_s + self.backward_s + self.weight_s

    @property
    def bubble(self) -> float:
        """Fraction of the step this rank was not computing (waiting, communicating)."""
        return 1.0 - self.compute_s / self.step_s if self.step_s > 0 else 0.0

    def durations(self, kind: str) -> dict[int, list[float]]:
        """{stage: [duration of micro-batch k's `kind` action]} for the stages of this rank."""
        rows: dict[int, dict[int, float]] = {}
        for action in self.per_microbatch:
            if action.kind == kind:
                rows.setdefault(action.stage, {})[action.microbatch] = action.end - action.start
        return {stage: [row[k] for k in sorted(row)] for stage, row in rows.items()}
