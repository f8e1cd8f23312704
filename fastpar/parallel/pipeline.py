"""`Pipeline`: model parallelism by pipeline stages, one stage per rank, fed with micro-batches.

A model cut into consecutive stages runs one stage per rank; the batch is cut into
micro-batches so that all stages work at once. `step(inputs, targets)` runs forward and
backward for every micro-batch under a schedule and leaves in each stage's parameters the
gradients of single-process training on the whole batch:

    stages = split_sequential(model, [4])             # layers [0, 4) and [4, end)
    pipe = Pipeline(stages[rank], stage_index=rank, num_stages=2, loss_fn=nn.MSELoss())
    loss = pipe.step(x, y)                            # the loss on the last stage, else None
    optimizer.step()

Schedules (F = forward, B = backward of a micro-batch; p stages, m micro-batches):
    "gpipe": F0 .. F(m-1), then B0 .. B(m-1); activations of all m micro-batches are alive.
    "1f1b":  stage s runs p-s-1 warm-up forwards, then alternates one forward and one backward,
             so at most p-s micro-batches are in flight (<= num_stages).
Both have the same bubble, (p-1)/(m+p-1) of the step; 1F1B holds fewer activations.

Communication (see `pipeline_comm`): every message carries a small header with its dtype and
shape, so micro-batches may differ in batch size and sequence length. Sends are posted as soon
as a tensor is ready and completed at the end of the step, so transfers overlap compute.
- Neighbouring stages in CPU processes of one host (a gloo group; transport "auto" or "shm")
  talk through a shared-memory pipe: a send is a copy into shared memory, a receive a copy out.
- Otherwise (transport "torch", other hosts, NCCL) torch.distributed isend/irecv carry them.
  Receives are posted before their data can arrive (a step's activations at its start, each
  gradient when its activation leaves), so on gloo a transfer happens while both sides compute.
  On NCCL, payloads run on the process group's own CUDA streams and the host reads headers
  from a gloo side group.

Failure: every wait is bounded by `timeout_s`. A stage that raises sends the error to its
neighbours in place of the next message they expect; each of them raises `PipelineError`
naming the failing stage and passes it on, so every rank of the pipeline raises instead of
waiting. A peer that dies or stalls is named in the `PipelineError` of its neighbours. A failed
pipeline is not reusable (messages of the failed step may be left in flight): build a new
process group. Construction exchanges every rank's arguments first, so mismatches (a stage
count that is not the group size, differing micro-batch counts) raise on every rank.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastpar._checks import check_int_at_least, check_positive
from fastpar._logging import get_logger
from fastpar.comm.ring import host_identity
from fastpar.parallel.pipeline_comm import Link, Peer, PipelineError, ShmLink, connect_shm_links
from fastpar.profiling import record_range

__all__ = [
    "OutputOnly",
    "Pipeline",
    "PipelineConfig",
    "PipelineError",
    "StepStats",
    "ideal_bubbles",
    "schedule_actions",
    "split_sequential",
]

logger = get_logger(__name__)

Schedule = Literal["gpipe", "1f1b"]
SCHEDULES: tuple[str, ...] = ("gpipe", "1f1b")
Reduction = Literal["mean", "sum"]
REDUCTIONS: tuple[str, ...] = ("mean", "sum")
Transport = Literal["auto", "shm", "torch"]
TRANSPORTS: tuple[str, ...] = ("auto", "shm", "torch")
Action = tuple[Literal["F", "B"], int]
DEFAULT_TIMEOUT_S = 300.0


@dataclass(kw_only=True, frozen=True)
class PipelineConfig:
    """Options of `Pipeline` (the same on every rank of the pipeline)."""

    num_stages: int
    """Number of stages; must equal the size of the pipeline's process group."""
    num_microbatches: int = 8
    """Micro-batches per step; a tensor batch of size N is cut into pieces of N // m or
    N // m + 1 along `batch_dim` (so m need not divide N)."""
    schedule: Schedule = "1f1b"
    """"gpipe" (all forwards, then all backwards) or "1f1b" (at most num_stages micro-batches
    in flight)."""
    loss_reduction: Reduction = "mean"
    """"mean": `loss_fn` averages over its micro-batch, and each micro-batch's loss is weighted
    by its share of the batch (its size along batch_dim over the batch's), which gives the loss
    and gradients of `loss_fn` on the whole batch; "sum": losses are added unweighted."""
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
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.loss_reduction not in REDUCTIONS:
            raise ValueError(
                f"loss_reduction must be one of {REDUCTIONS}, got {self.loss_reduction!r}"
            )
        check_positive("timeout_s", self.timeout_s)
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")


@dataclass
class StepStats:
    """Where the last step's time went on this stage, in seconds (host clock; on CUDA the
    compute times are launch times unless the caller synchronises)."""

    step_s: float = 0.0
    forward_s: float = 0.0
    backward_s: float = 0.0
    split_sends: int = 0
    """Tensors that could not leave whole at once: on torch links, sent apart from their header
    (larger than the receiver's slot, which grows after a step, or any tensor on NCCL); on
    shared-memory links, larger than the pipe's free room (finished by its sender thread)."""
    per_microbatch: list[tuple[str, int, float, float]] = field(default_factory=list)
    """("F" or "B", micro-batch, start, end) relative to the step's start."""

    @property
    def compute_s(self) -> float:
        return self.forward_s + self.backward_s

    @property
    def bubble(self) -> float:
        """Fraction of the step this stage was not computing (waiting, communicating)."""
        return 1.0 - self.compute_s / self.step_s if self.step_s > 0 else 0.0


def schedule_actions(
    schedule: Schedule, stage_index: int, num_stages: int, num_microbatches: int
) -> list[Action]:
    """The order in which one stage runs forwards and backwards.

    Arguments:
        schedule: "gpipe" or "1f1b".
        stage_index: the stage, in [0, num_stages).
        num_stages: p.
        num_microbatches: m.

    Returns:
        A list of ("F", k) and ("B", k), each micro-batch k in [0, m) once per kind; B(k)
        always after F(k); backwards in micro-batch order.
    """
    m = num_microbatches
    if schedule == "gpipe":
        return [("F", k) for k in range(m)] + [("B", k) for k in range(m)]
    # 1F1B: enough warm-up forwards that the last stage's first backward can start, then one
    # forward and one backward in turn, then the remaining backwards.
    warmup = min(num_stages - stage_index - 1, m)
    actions: list[Action] = [("F", k) for k in range(warmup)]
    for k in range(m - warmup):
        actions.append(("F", warmup + k))
        actions.append(("B", k))
    actions.extend(("B", k) for k in range(m - warmup, m))
    return actions


def ideal_bubbles(
    schedule: Schedule, forward_s: Sequence[Sequence[float]], backward_s: Sequence[Sequence[float]]
) -> list[float]:
    """Each stage's bubble under `schedule` with the given compute times and free transfers: the
    schedule's own idle time, which is (p-1)/(m+p-1) only for stages of equal speed. Set next
    to the measured idle fraction of the same step, the difference is what communication and
    overheads cost.

    Arguments:
        schedule: "gpipe" or "1f1b".
        forward_s, backward_s: [stage][micro-batch] durations in seconds (e.g. from each stage's
            `StepStats.per_microbatch`).

    Returns:
        Per stage, 1 - (its compute) / (the pipeline's step: from the common start until the
        last stage to finish is done).
    """
    num_stages, m = len(forward_s), len(forward_s[0]) if forward_s else 0
    durations = {"F": forward_s, "B": backward_s}
    orders = [schedule_actions(schedule, s, num_stages, m) for s in range(num_stages)]
    ends: dict[tuple[str, int, int], float] = {}  # (kind, stage, micro-batch) -> end time
    clocks, cursors = [0.0] * num_stages, [0] * num_stages
    while any(cursor < m * 2 for cursor in cursors):
        progressed = False
        for stage in range(num_stages):
            while cursors[stage] < 2 * m:
                kind, k = orders[stage][cursors[stage]]
                source = stage - 1 if kind == "F" else stage + 1  # who sends its input
                ready = 0.0
                if 0 <= source < num_stages:
                    if (kind, source, k) not in ends:
                        break  # its input is not computed yet: try the other stages
                    ready = ends[(kind, source, k)]
                clocks[stage] = max(clocks[stage], ready) + durations[kind][stage][k]
                ends[(kind, stage, k)] = clocks[stage]
                cursors[stage] += 1
                progressed = True
        if not progressed:
            raise ValueError(f"the {schedule} schedule deadlocks with {num_stages} stages")
    step = max(clocks, default=0.0)
    return [
        1.0 - (sum(forward_s[s]) + sum(backward_s[s])) / step if step > 0 else 0.0
        for s in range(num_stages)
    ]


def split_sequential(model: nn.Sequential, split_points: Sequence[int]) -> list[nn.Sequential]:
    """Cut an `nn.Sequential` into consecutive stages.

    Arguments:
        model: the model; it is not modified, and the stages hold its own layers (no copies),
            so training the stages trains `model`.
        split_points: indices of the layers that start a new stage, strictly increasing, in
            (0, len(model)); k split points give k + 1 stages.

    Returns:
        The stages: stage i is `nn.Sequential(model[split_points[i-1] : split_points[i]])`.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model must be an nn.Sequential, got {type(model).__name__}")
    points = list(split_points)
    bounds = [0, *points, len(model)]
    for index, point in enumerate(points):
        if isinstance(point, bool) or not isinstance(point, int):
            raise TypeError(f"split_points[{index}] must be an int, got {point!r}")
        if not bounds[index] < point < len(model):
            raise ValueError(
                f"split_points must be strictly increasing in (0, {len(model)}) for a model of "
                f"{len(model)} layers, got {points}"
            )
    layers = list(model)
    return [nn.Sequential(*layers[start:end]) for start, end in itertools.pairwise(bounds)]


class OutputOnly(nn.Module):
    """Keeps the first element of a module's tuple output, e.g. the output sequence of an LSTM
    (which returns `(output, (h, c))`), so the stage passes on one tensor.

    Arguments:
        module: the wrapped module; its parameters are this module's.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: object, **kwargs: object) -> Tensor:
        return self.module(*args, **kwargs)[0]


class Pipeline:
    """This rank's stage of a pipeline, and the schedule that runs it on micro-batches.

    Arguments:
        stage: the stage's module (e.g. from `split_sequential`), already on its device. It
            maps one tensor to one tensor. If it has `no_sync()` (fastpar's `DataParallel`),
            all backwards but the step's last run inside it, so gradients are averaged across
            replicas once per step.
        stage_index: this rank's stage, in [0, num_stages); also its rank in `group`.
        num_stages: number of stages, == the size of `group`.
        group: the pipeline's process group (None: the default group). gloo on CPU, NCCL on
            GPU (then a gloo group for headers and an NCCL group for gradients are created
            over the same ranks; every rank of `group` must construct its Pipeline together).
        loss_fn: `loss_fn(output, target) -> scalar`, needed on the last stage.
        schedule, num_microbatches, loss_reduction, batch_dim, timeout_s, transport: see
            `PipelineConfig`.

    Construction is collective over `group` (bounded by `timeout_s`).

    Attributes:
        module: the stage (train its parameters with any optimizer).
        config: the validated `PipelineConfig`.
        last_stats: `StepStats` of the last step (times, bubble, messages sent apart).
        transports: for each neighbouring stage, "shm" or "torch": what its link uses.
    """

    def __init__(
        self,
        stage: nn.Module,
        *,
        stage_index: int,
        num_stages: int,
        group: dist.ProcessGroup | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        schedule: Schedule = "1f1b",
        num_microbatches: int = 8,
        loss_reduction: Reduction = "mean",
        batch_dim: int = 0,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        transport: Transport = "auto",
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "Pipeline needs torch.distributed to be initialised "
                "(call torch.distributed.init_process_group first)"
            )
        self.group = group if group is not None else dist.group.WORLD
        self.module = stage
        self.loss_fn = loss_fn
        # Arguments are exchanged before any of them is judged, so that a rank with bad
        # arguments still joins the exchange and every rank raises, none waits.
        local_error: ValueError | TypeError | None = None
        try:
            self.config = PipelineConfig(
                num_stages=num_stages,
                num_microbatches=num_microbatches,
                schedule=schedule,
                loss_reduction=loss_reduction,
                batch_dim=batch_dim,
                timeout_s=timeout_s,
                transport=transport,
            )
            check_int_at_least("stage_index", stage_index, 0)
            if stage_index >= num_stages:
                raise ValueError(f"stage_index {stage_index} >= num_stages {num_stages}")
            if stage_index == num_stages - 1 and loss_fn is None:
                raise ValueError(f"loss_fn is needed on the last stage (stage {stage_index})")
            if isinstance(stage, nn.parallel.DistributedDataParallel):
                # DDP decides at forward time whether a backward reduces; the schedules
                # interleave forwards and backwards, so its reducer would fire too early.
                raise TypeError(
                    "stage is a torch DistributedDataParallel, which cannot accumulate over a "
                    "pipeline's interleaved micro-batches; use fastpar.parallel.DataParallel"
                )
            if transport == "shm" and dist.get_backend(self.group) != "gloo":
                raise ValueError(
                    "transport 'shm' carries CPU tensors between processes of one host and "
                    f"needs a gloo group, got backend {dist.get_backend(self.group)!r}"
                )
        except (ValueError, TypeError) as error:
            local_error = error
        timeout = self.config.timeout_s if local_error is None else DEFAULT_TIMEOUT_S
        table = _exchange_arguments(
            self.group,
            [stage_index, num_stages, num_microbatches, schedule, transport],
            local_error,
            timeout,
        )
        if local_error is not None:
            raise local_error
        _check_arguments(table, stage_index, dist.get_rank(self.group))
        self._hosts = [row[-1] for row in table]

        self.stage_index = stage_index
        self.num_stages = num_stages
        self.is_first = stage_index == 0
        self.is_last = stage_index == num_stages - 1
        self.last_stats = StepStats()
        self._broken: str | None = None
        self._device = _module_device(stage)
        self._no_sync = getattr(stage, "no_sync", None)
        self._links = self._make_links()
        self.transports = {
            link.peer.stage: "shm" if isinstance(link, ShmLink) else "torch"
            for link in self._links.values()
        }

    # --- construction ---------------------------------------------------------------------------

    def _make_links(self) -> dict[str, Link | ShmLink]:
        ranks = dist.get_process_group_ranks(self.group)
        me = Peer(self.stage_index, ranks[self.stage_index])
        self._comm_device = torch.device("cpu")  # a stage on a GPU sends and receives via the host
        neighbours = {
            name: Peer(stage, ranks[stage])
            for name, stage in (("prev", self.stage_index - 1), ("next", self.stage_index + 1))
            if 0 <= stage < self.num_stages
        }
        links: dict[str, Link | ShmLink] = {}
        gloo = dist.get_backend(self.group) == "gloo"
        if gloo and self.config.transport != "torch":
            local = [
                peer
                for peer in neighbours.values()
                if self._hosts[peer.stage] == self._hosts[self.stage_index]
            ]
            pipes, failures = connect_shm_links(
                me, local, group=self.group, timeout_s=self.config.timeout_s
            )
            for name, peer in neighbours.items():
                if peer.stage in pipes:
                    links[name] = pipes[peer.stage]
                elif peer.stage in failures and self.config.transport == "shm":
                    raise RuntimeError(
                        f"transport 'shm': no shared-memory pipe to {peer}: {failures[peer.stage]}"
                    )
                elif peer.stage in failures:
                    logger.warning(
                        "%s: no shared-memory pipe to %s (%s); using torch.distributed",
                        me, peer, failures[peer.stage],
                    )  # fmt: skip
        if len(links) == len(neighbours):
            return links
        if gloo:
            slot_group = fwd_group = bwd_group = self.group
        else:
            # See pipeline_comm: headers on the host, one direction per NCCL communicator.
            # Only the pipeline's ranks join these groups, so pipelines of a DP x PP layout
            # create theirs independently.
            slot_group = dist.new_group(ranks, backend="gloo", use_local_synchronization=True)
            backend = dist.get_backend(self.group)
            bwd_group = dist.new_group(ranks, backend=backend, use_local_synchronization=True)
            fwd_group = self.group
            self._comm_device = self._device
        # Activations go forward on fwd_group, their gradients back on bwd_group.
        directions = {"prev": (bwd_group, fwd_group), "next": (fwd_group, bwd_group)}
        for name, peer in neighbours.items():
            if name in links:
                continue
            send_group, recv_group = directions[name]
            links[name] = Link(
                peer,
                slot_group=slot_group,
                send_group=send_group,
                recv_group=recv_group,
                device=self._comm_device,
                timeout_s=self.config.timeout_s,
                me=me,
            )
        return links

    # --- the step -------------------------------------------------------------------------------

    def step(
        self,
        inputs: Tensor | Sequence[Tensor] | None = None,
        targets: Tensor | Sequence[Tensor] | None = None,
    ) -> Tensor | None:
        """Forward and backward of one batch through the pipeline; gradients accumulate into
        the stage's parameters' `.grad` (call `zero_grad()` between steps as usual).

        Arguments:
            inputs: on the first stage, the batch (a tensor, cut into `num_microbatches`
                pieces along `batch_dim`) or the micro-batches themselves (a sequence of
                `num_microbatches` tensors whose shapes may differ). Ignored elsewhere.
            targets: on the last stage, the targets, as a tensor or a sequence like `inputs`.
                Ignored elsewhere.

        Returns:
            On the last stage the batch's loss (a detached scalar, see `loss_reduction`);
            None on the other stages.

        Raises:
            PipelineError: this or another stage failed, or a peer died or stalled.
        """
        if self._broken is not None:
            raise PipelineError(
                f"stage {self.stage_index}: this pipeline failed in an earlier step "
                f"({self._broken}); build a new process group and Pipeline",
                stage=self.stage_index,
                rank=dist.get_rank(),
            )
        try:
            return self._step(inputs, targets)
        except PipelineError as error:
            self._fail(str(error), Peer(error.stage, error.rank), skip=error.via)
            raise
        except Exception as error:
            me = Peer(self.stage_index, dist.get_rank())
            self._fail(f"{me} raised {type(error).__name__}: {error}", me, skip=None)
            raise

    def _step(
        self, inputs: Tensor | Sequence[Tensor] | None, targets: Tensor | Sequence[Tensor] | None
    ) -> Tensor | None:
        cfg = self.config
        m = cfg.num_microbatches
        start = time.perf_counter()
        stats = StepStats()
        self.last_stats = stats
        micro_inputs = _split("inputs", inputs, m, cfg.batch_dim) if self.is_first else None
        micro_targets = _split("targets", targets, m, cfg.batch_dim) if self.is_last else None
        weights = self._loss_weights(micro_targets)
        prev, nxt = self._links.get("prev"), self._links.get("next")
        if prev is not None:
            # Every activation of the step, now: this stage has nothing to do until the first
            # one arrives. Gradient receives are posted as their activations leave (below),
            # which keeps the first stage's first forward from waiting on them.
            prev.post_receives(m)

        stage_inputs: dict[int, Tensor] = {}
        stage_outputs: dict[int, Tensor] = {}
        losses: list[Tensor] = []
        for kind, k in schedule_actions(cfg.schedule, self.stage_index, self.num_stages, m):
            began = time.perf_counter()
            if kind == "F":
                if prev is not None:
                    x = prev.recv(f"activation {k}").to(self._device)
                    if _carries_grad(x):
                        x = x.detach().requires_grad_(True)  # a leaf, whose .grad goes back
                    stage_inputs[k] = x
                else:
                    assert micro_inputs is not None
                    x = micro_inputs[k]
                began = time.perf_counter()
                with record_range(f"fastpar.pp.forward.mb{k}"):
                    y = self.module(x)
                    if not isinstance(y, Tensor):
                        raise TypeError(
                            f"stage {self.stage_index} returned {type(y).__name__}; a pipeline "
                            "stage must return one Tensor (wrap modules returning tuples, such "
                            "as LSTMs, in OutputOnly)"
                        )
                    if micro_targets is not None:
                        assert self.loss_fn is not None
                        y = self.loss_fn(y, micro_targets[k]) * weights[k]
                        losses.append(y.detach())
                ended = time.perf_counter()
                stats.forward_s += ended - began
                stage_outputs[k] = y
                if nxt is not None:
                    nxt.send(y.detach().to(self._comm_device), f"activation {k}")
                    if _carries_grad(y):  # its gradient will come back
                        nxt.post_receives(1)
            else:
                y = stage_outputs.pop(k)
                grad = None
                if nxt is not None and _carries_grad(y):
                    grad = nxt.recv(f"gradient {k}").to(self._device)
                    began = time.perf_counter()
                with self._backward_context(k), record_range(f"fastpar.pp.backward.mb{k}"):
                    if y.requires_grad:
                        torch.autograd.backward(y, grad)
                ended = time.perf_counter()
                stats.backward_s += ended - began
                x = stage_inputs.pop(k, None)
                if prev is not None and x is not None and _carries_grad(x):
                    x_grad = x.grad if x.grad is not None else torch.zeros_like(x)
                    prev.send(x_grad.to(self._comm_device), f"gradient {k}")
            stats.per_microbatch.append((kind, k, began - start, ended - start))
        for link in self._links.values():
            link.finish_sends()
            link.end_step()
            stats.split_sends += link.split_sends
            link.split_sends = 0
        stats.step_s = time.perf_counter() - start
        return torch.stack(losses).sum() if self.is_last else None

    def _loss_weights(self, micro_targets: list[Tensor] | None) -> list[float]:
        if micro_targets is None or self.config.loss_reduction == "sum":
            return [1.0] * self.config.num_microbatches
        dim = self.config.batch_dim
        sizes = [_size_along("targets", t, dim) for t in micro_targets]
        total = sum(sizes)
        return [size / total for size in sizes]

    def _backward_context(self, microbatch: int) -> contextlib.AbstractContextManager[object]:
        # A data-parallel stage averages gradients once per step: in the last micro-batch's
        # backward (the last action of every schedule), with the accumulated gradients.
        if self._no_sync is None or microbatch == self.config.num_microbatches - 1:
            return _NO_CONTEXT
        return self._no_sync()

    def _fail(self, message: str, origin: Peer, *, skip: int | None) -> None:
        """Tell the neighbours (except stage `skip`, where the news came from) and mark this
        pipeline broken; each notice waits at most ERROR_DELIVERY_S to be taken."""
        self._broken = message
        for link in self._links.values():
            if link.peer.stage == skip:
                continue
            try:
                link.send_error(message, origin)
            except PipelineError as error:  # the link is broken too; the original error wins
                logger.warning("could not tell %s about the failure: %s", link.peer, error)
        for link in self._links.values():
            link.drop()


_NO_CONTEXT = contextlib.nullcontext()


def _carries_grad(tensor: Tensor) -> bool:
    # Both sides decide from the activation's dtype alone, so they agree without a message.
    return tensor.is_floating_point() or tensor.is_complex()


def _module_device(module: nn.Module) -> torch.device:
    for tensor in [*module.parameters(), *module.buffers()]:
        return tensor.device
    return torch.device("cpu")


def _size_along(name: str, tensor: Tensor, dim: int) -> int:
    if tensor.dim() <= dim:
        raise ValueError(
            f"{name} of shape {tuple(tensor.shape)} has no batch_dim {dim} to cut along"
        )
    return tensor.shape[dim]


def _split(
    name: str, value: Tensor | Sequence[Tensor] | None, num_microbatches: int, dim: int
) -> list[Tensor]:
    """Cut a batch into micro-batches, or check a list of given micro-batches."""
    if value is None:
        raise ValueError(f"{name} are needed on this stage, got None")
    if isinstance(value, Tensor):
        size = _size_along(name, value, dim)
        if size < num_microbatches:
            raise ValueError(
                f"{name} batch size {size} (dim {dim}) < num_microbatches {num_microbatches}"
            )
        return list(torch.tensor_split(value, num_microbatches, dim=dim))
    pieces = list(value)
    if len(pieces) != num_microbatches:
        raise ValueError(
            f"{name}: {len(pieces)} micro-batches given, num_microbatches is {num_microbatches}"
        )
    for index, piece in enumerate(pieces):
        if not isinstance(piece, Tensor):
            raise TypeError(f"{name}[{index}] must be a Tensor, got {type(piece).__name__}")
    return pieces


def _exchange_arguments(
    group: dist.ProcessGroup,
    arguments: list[object],
    local_error: Exception | None,
    timeout_s: float,
) -> list[list[int]]:
    """All ranks' rows, by group rank: (ok, stage_index, num_stages, num_microbatches, schedule,
    transport, host), strings as their index in SCHEDULES / TRANSPORTS (-1: not one of them) and
    host as a 64-bit hash of `host_identity()`.

    Gathered on the group itself: on gloo with a wait bounded by timeout_s, on NCCL with
    all_gather_object (bounded by the process group's timeout).
    """

    def as_int(value: object, names: tuple[str, ...] = ()) -> int:
        if isinstance(value, str):
            return names.index(value) if value in names else -1
        return value if isinstance(value, int) and not isinstance(value, bool) else -1

    stage_index, num_stages, num_microbatches, schedule, transport = arguments
    host = hashlib.blake2b(host_identity().encode(), digest_size=8).digest()
    mine = [
        int(local_error is None),
        as_int(stage_index),
        as_int(num_stages),
        as_int(num_microbatches),
        as_int(schedule, SCHEDULES),
        as_int(transport, TRANSPORTS),
        int.from_bytes(host, "little", signed=True),
    ]
    size = dist.get_world_size(group)
    if dist.get_backend(group) != "gloo":
        table: list[object] = [None] * size
        dist.all_gather_object(table, mine, group=group)
        return [list(row) for row in table]  # type: ignore[call-overload]
    local = torch.tensor(mine, dtype=torch.int64)
    gathered = [torch.empty_like(local) for _ in range(size)]
    work = dist.all_gather(gathered, local, group=group, async_op=True)
    assert work is not None
    try:
        work.wait(datetime.timedelta(seconds=timeout_s))
    except RuntimeError as error:
        raise PipelineError(
            f"Pipeline construction: not every rank of the group (size {size}) joined within "
            f"timeout_s={timeout_s:g} ({error})",
            stage=-1,
            rank=-1,
        ) from error
    return [row.tolist() for row in gathered]


def _check_arguments(table: list[list[int]], stage_index: int, group_rank: int) -> None:
    """Judge every rank's arguments the same way, so all ranks raise the same error."""
    size = len(table)
    bad = [rank for rank, row in enumerate(table) if row[0] == 0]
    if bad:
        raise ValueError(f"Pipeline arguments are invalid on group rank(s) {bad} (see their error)")
    num_stages = [row[2] for row in table]
    if any(n != size for n in num_stages):
        mine = num_stages[group_rank]
        if mine != size:
            raise ValueError(f"num_stages {mine} != group size {size}")
        raise ValueError(f"num_stages differs across the group: {num_stages} (group size {size})")
    counts = [row[3] for row in table]
    if len(set(counts)) != 1:
        raise ValueError(f"num_microbatches differs across the group: {counts}")
    schedules = [SCHEDULES[row[4]] for row in table]
    if len(set(schedules)) != 1:
        raise ValueError(f"schedule differs across the group: {schedules}")
    transports = [TRANSPORTS[row[5]] for row in table]
    if len(set(transports)) != 1:
        raise ValueError(f"transport differs across the group: {transports}")
    if transports[0] == "shm" and len({row[6] for row in table}) != 1:
        raise ValueError(
            "transport 'shm' needs every stage on one host (and IPC namespace); use 'auto' to "
            "let stages on other hosts use torch.distributed"
        )
    stages = [row[1] for row in table]
    if stages != list(range(size)):
        raise ValueError(
            f"stage_index must equal the rank in the pipeline's group: group ranks 0..{size - 1} "
            f"hold stages {stages} (this rank: stage_index {stage_index}, group rank "
            f"{group_rank})"
        )
