"""`Pipeline`: runs this rank's stages of a pipeline on micro-batches, under a schedule.

A rank holds one stage, or several model chunks (global stages) for "interleaved-1f1b" and
"zbv". `step(inputs, targets)` runs the rank's action list (see schedules.py): receive,
forward, send, backward (whole, or an input pass and a deferred weight pass), and leaves in
each stage's parameters the gradients of single-process training on the whole batch.

Transfers (see links.py): sends are posted as soon as a tensor is ready and completed at the
end of the step, so they overlap compute; every message carries its dtype and shape, so
micro-batches may differ in batch size and sequence length.

Failure: every wait is bounded by `timeout_s`. A rank that raises sends the error to its peers
in place of the next message they expect; each of them raises `PipelineError` naming the
failing stage and passes it on, so every rank of the pipeline raises instead of waiting. A
peer that dies or stalls is named in the `PipelineError` of its neighbours. A failed pipeline
is not reusable (messages of the failed step may be left in flight): build a new process
group. Construction exchanges every rank's arguments first (handshake.py), so mismatches
raise on every rank.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastpar._checks import check_int
from fastpar._logging import get_logger, log_once
from fastpar.comm.timeouts import group_timeout
from fastpar.parallel.pipeline.config import (
    ActionTime,
    PipelineConfig,
    Reduction,
    StepStats,
    Transport,
)
from fastpar.parallel.pipeline.handshake import (
    MAX_CHUNKS,
    Handshake,
    check_handshakes,
    exchange_handshakes,
)
from fastpar.parallel.pipeline.links import Inbox, Link, LocalLink
from fastpar.parallel.pipeline.microbatches import carries_grad, loss_weights, split_batch
from fastpar.parallel.pipeline.schedules import (
    COMPUTE_OPS,
    Action,
    Message,
    Op,
    Schedule,
    message_of,
    schedule_actions,
    splits_backward,
)
from fastpar.parallel.pipeline.shm_link import ShmLink, connect_shm_links
from fastpar.parallel.pipeline.split_backward import DeferredWeights, weight_split
from fastpar.parallel.pipeline.torch_link import TorchLink
from fastpar.parallel.pipeline.wire import Peer, PipelineError
from fastpar.profiling import range_name, ranges_recorded, record_range

__all__ = ["Pipeline"]

logger = get_logger(__name__)

_SENDS = (Op.SEND_ACTIVATION, Op.SEND_GRADIENT)
_NO_CONTEXT = contextlib.nullcontext()
_NO_GRADIENT = torch.empty(0)  # sent back for an activation that carries no gradient


class Pipeline:
    """This rank's stages of a pipeline, and the schedule that runs them on micro-batches.

    Arguments:
        stage: the stage's module (e.g. from `split_sequential`), already on its device; or a
            list of modules, this rank's chunks, one per entry of `stage_index`. A stage maps
            one tensor to one tensor. If it has `no_sync()` (fastpar's `DataParallel`), all
            backwards but the step's last run inside it, so gradients are averaged across
            replicas once per step.
        stage_index: the global stage `stage` is (one stage per rank: the rank in `group`),
            or a list of them: looped for "interleaved-1f1b" (rank r of w holds r, r + w, ...),
            [r, 2w - 1 - r] for "zbv".
        num_stages: number of global stages.
        group: the pipeline's process group (None: the default group). gloo on CPU, NCCL on
            GPU (then a gloo group for headers and an NCCL group for gradients are created
            over the same ranks; every rank of `group` must construct its Pipeline together).
        loss_fn: `loss_fn(output, target) -> scalar`, needed on the rank of the last stage.
        schedule, num_microbatches, loss_reduction, batch_dim, timeout_s, transport: see
            `PipelineConfig`; timeout_s None takes `group`'s own timeout (the one given to
            init_process_group / new_group).

    Construction is collective over `group` (bounded by `timeout_s`).

    Attributes:
        module: the stage, or an `nn.ModuleList` of the chunks (train its parameters with any
            optimizer).
        config: the validated `PipelineConfig`.
        last_stats: `StepStats` of the last step (times, bubble, messages sent apart).
        transports: for each peer's first stage, "shm", "torch" or "local".
        placement: which rank of `group` holds each global stage.
        is_first, is_last: whether this rank holds stage 0 / the last stage (it takes the
            inputs / the targets and returns the loss).
    """

    def __init__(
        self,
        stage: nn.Module | Sequence[nn.Module],
        *,
        stage_index: int | Sequence[int],
        num_stages: int,
        group: dist.ProcessGroup | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        schedule: Schedule = "1f1b",
        num_microbatches: int = 8,
        loss_reduction: Reduction = "mean",
        batch_dim: int = 0,
        timeout_s: float | None = None,
        transport: Transport = "auto",
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "Pipeline needs torch.distributed to be initialised "
                "(call torch.distributed.init_process_group first)"
            )
        self.group = group if group is not None else dist.group.WORLD
        self.loss_fn = loss_fn
        group_wait_s = group_timeout(self.group).total_seconds()
        if timeout_s is None:  # the group's own (init_process_group / new_group timeout=)
            timeout_s = group_wait_s
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
            self._chunks = _check_chunks(stage, stage_index, num_stages, loss_fn)
            if transport == "shm" and dist.get_backend(self.group) != "gloo":
                raise ValueError(
                    "transport 'shm' carries CPU tensors between processes of one host and "
                    f"needs a gloo group, got backend {dist.get_backend(self.group)!r}"
                )
        except (ValueError, TypeError) as error:
            local_error = error
        mine = Handshake.local(ok=local_error is None, stages=stage_index, num_stages=num_stages,
                               num_microbatches=num_microbatches, schedule=schedule,
                               transport=transport)  # fmt: skip
        timeout = self.config.timeout_s if local_error is None else group_wait_s
        table = exchange_handshakes(self.group, mine, timeout)
        if local_error is not None:
            raise local_error
        self._group_rank = dist.get_rank(self.group)
        self.placement = check_handshakes(table, self._group_rank)
        self._hosts = [row.host for row in table]

        single = not isinstance(stage, Sequence)
        self.module: nn.Module = stage if single else nn.ModuleList(stage)  # type: ignore[arg-type]
        self.stage_index = stage_index
        self.num_stages = num_stages
        self.is_first = 0 in self._chunks
        self.is_last = num_stages - 1 in self._chunks
        self._last_run: _StepState | None = None
        self._last_stats = StepStats()
        self._broken: str | None = None
        self._devices = {s: _module_device(module) for s, module in self._chunks.items()}
        self._no_sync = {s: getattr(module, "no_sync", None) for s, module in self._chunks.items()}
        self._split = {s: self._splits(s) for s in self._chunks}
        everyone = schedule_actions(schedule, self.placement.num_ranks, num_stages,
                                    num_microbatches)  # fmt: skip
        self._actions = everyone[self._group_rank]
        self._last_backward = {
            a.stage: a.microbatch for a in self._actions if a.op in (Op.BACKWARD, Op.BACKWARD_INPUT)
        }
        self._comm_device = torch.device("cpu")  # a stage on a GPU sends via the host...
        self._links = self._make_links()  # ...unless its links are NCCL (set there)
        multi = self.placement.num_stages != self.placement.num_ranks
        self._names = {
            message_of(a): _message_name(message_of(a), multi)
            for actions in everyone
            for a in actions
            if a.op in _SENDS
        }
        self._inboxes = {
            peer: Inbox(link, self._expected(everyone[peer]), self._names, self._leaves(link))
            for peer, link in self._links.items()
        }
        self._me = Peer(min(self._chunks), dist.get_rank())
        self._plan = [self._planned(action) for action in self._actions]
        self.transports = {link.peer.stage: _transport_name(link) for link in self._links.values()}

    # --- construction ---------------------------------------------------------------------------

    def _splits(self, stage: int) -> bool:
        """Whether this stage's backward runs as an I and a W pass."""
        if not splits_backward(self.config.schedule):
            return False
        if self._no_sync[stage] is not None:
            log_once(logger, f"stage {stage} is data-parallel: its weight gradients are reduced "
                     "inside autograd's backward, so its backward is not split")  # fmt: skip
            return False
        return True

    def _planned(self, action: Action) -> _Planned:
        """What `action` needs at run time, looked up once: every lookup between two compute
        actions delays a peer waiting for this rank's message (and runs on caches cooled by the
        stage's compute, several times slower than in a loop)."""
        s, k = action.stage, action.microbatch
        if action.op in COMPUTE_OPS:
            kind = {Op.FORWARD: "forward", Op.BACKWARD_WEIGHT: "weight"}.get(action.op, "backward")
            name = f"s{s}.mb{k}" if len(self._chunks) > 1 else f"mb{k}"
            return _Planned(action, (s, k), None, None, range_name("pp", kind, name))
        message = message_of(action)
        send = action.op in _SENDS
        peer = self.placement.stage_ranks[message.dest if send else message.source]
        what = self._names[message]
        profile = range_name("pp", "send" if send else "recv", what)
        if send:
            return _Planned(action, (s, k), self._links[peer], what, profile)
        device = self._devices[s] if self._devices[s] != self._comm_device else None
        inbox = self._inboxes[peer]
        return _Planned(action, (s, k), inbox, inbox.position(message), profile, device)

    def _leaves(self, link: Link) -> set[Message]:
        """The messages `link` should deliver as leaves (see `Link.recv`): the activations for
        stages on the link's device (the others are copied there, and the copy becomes the
        leaf)."""
        return {
            message
            for message in self._names
            if message.kind == "activation"
            and message.dest in self._chunks
            and self._devices[message.dest] == self._comm_device
        }

    def _expected(self, peer_actions: list[Action]) -> list[Message]:
        """The messages a peer sends this rank in a step, in the order it sends them."""
        ranks = self.placement.stage_ranks
        messages = [message_of(a) for a in peer_actions if a.op in _SENDS]
        return [m for m in messages if ranks[m.dest] == self._group_rank]

    def _make_links(self) -> dict[int, Link]:
        """A link to every group rank this rank exchanges messages with (itself included)."""
        ranks = dist.get_process_group_ranks(self.group)
        placement, me_group = self.placement, self._group_rank

        def peer(group_rank: int) -> Peer:
            return Peer(placement.stages_of(group_rank)[0], ranks[group_rank])

        me = peer(me_group)
        neighbours = sorted({
            placement.stage_ranks[t]
            for s in self._chunks
            for t in (s - 1, s + 1)
            if 0 <= t < placement.num_stages
        })  # fmt: skip
        links: dict[int, Link] = {}
        if me_group in neighbours:
            links[me_group] = LocalLink(me)
        others = {q: peer(q) for q in neighbours if q != me_group}
        gloo = dist.get_backend(self.group) == "gloo"
        if gloo and self.config.transport != "torch":
            local = [p for q, p in others.items() if self._hosts[q] == self._hosts[me_group]]
            pipes, failures = connect_shm_links(
                me, local, group=self.group, timeout_s=self.config.timeout_s
            )
            for q, p in others.items():
                if p.stage in pipes:
                    links[q] = pipes[p.stage]
                elif p.stage in failures and self.config.transport == "shm":
                    raise RuntimeError(
                        f"transport 'shm': no shared-memory pipe to {p}: {failures[p.stage]}"
                    )
                elif p.stage in failures:
                    logger.warning("%s: no shared-memory pipe to %s (%s); using "
                                   "torch.distributed", me, p, failures[p.stage])  # fmt: skip
        if all(q in links for q in others):
            return links
        if gloo:
            slot_group = fwd_group = bwd_group = self.group
        else:
            # See torch_link: headers on the host, one direction per NCCL communicator. Only
            # the pipeline's ranks join these groups, so pipelines of a DP x PP layout create
            # theirs independently.
            slot_group = dist.new_group(ranks, backend="gloo", use_local_synchronization=True)
            backend = dist.get_backend(self.group)
            bwd_group = dist.new_group(ranks, backend=backend, use_local_synchronization=True)
            fwd_group = self.group
            self._comm_device = self._devices[min(self._chunks)]
        for q, p in others.items():
            if q in links:
                continue
            # Each pair of ranks: the lower one sends on fwd_group, the higher on bwd_group.
            higher = q > me_group
            send_group, recv_group = (fwd_group, bwd_group) if higher else (bwd_group, fwd_group)
            links[q] = TorchLink(p, slot_group=slot_group, send_group=send_group,
                                 recv_group=recv_group, device=self._comm_device,
                                 timeout_s=self.config.timeout_s, me=me)  # fmt: skip
        return links

    # --- the step -------------------------------------------------------------------------------

    def step(
        self,
        inputs: Tensor | Sequence[Tensor] | None = None,
        targets: Tensor | Sequence[Tensor] | None = None,
    ) -> Tensor | None:
        """Forward and backward of one batch through the pipeline; gradients accumulate into
        the stages' parameters' `.grad` (call `zero_grad()` between steps as usual).

        Arguments:
            inputs: on the rank holding stage 0, the batch (a tensor, cut into
                `num_microbatches` pieces along `batch_dim`) or the micro-batches themselves
                (a sequence of `num_microbatches` tensors whose shapes may differ). Ignored
                elsewhere.
            targets: on the rank holding the last stage, the targets, as a tensor or a
                sequence like `inputs`. Ignored elsewhere.

        Returns:
            On the rank holding the last stage the batch's loss (a detached scalar, see
            `loss_reduction`); None elsewhere.

        Raises:
            PipelineError: this or another stage failed, or a peer died or stalled.
        """
        me = self._me
        if self._broken is not None:
            raise PipelineError(
                f"stage {me.stage}: this pipeline failed in an earlier step ({self._broken}); "
                "build a new process group and Pipeline",
                stage=me.stage,
                rank=me.rank,
            )
        try:
            return self._step(inputs, targets)
        except PipelineError as error:
            self._fail(str(error), Peer(error.stage, error.rank), skip=error.via)
            raise
        except Exception as error:
            self._fail(f"{me} raised {type(error).__name__}: {error}", me, skip=None)
            raise

    @property
    def last_stats(self) -> StepStats:
        """`StepStats` of the last step, made when first asked for: off the step's path."""
        run = self._last_run
        if run is not None:
            self._last_run = None
            self._last_stats = run.stats()
        return self._last_stats

    def _step(
        self, inputs: Tensor | Sequence[Tensor] | None, targets: Tensor | Sequence[Tensor] | None
    ) -> Tensor | None:
        cfg = self.config
        m, dim = cfg.num_microbatches, cfg.batch_dim
        run = _StepState(
            start=time.perf_counter(),
            inputs=split_batch("inputs", inputs, m, dim) if self.is_first else [],
            targets=split_batch("targets", targets, m, dim) if self.is_last else [],
        )
        run.weights = loss_weights(run.targets, dim, cfg.loss_reduction) if self.is_last else []
        self._last_run = run
        # Asked once per step: a range costs microseconds even when nobody listens.
        ranges = ranges_recorded()
        for inbox in self._inboxes.values():
            inbox.start_step()
        for planned in self._plan:
            if planned.route is None:
                self._compute(planned, run, ranges)
            elif ranges:
                with record_range(planned.profile):
                    self._transfer(planned, run)
            else:
                self._transfer(planned, run)
        for link in self._links.values():
            link.finish_sends()
            link.end_step()
            run.split_sends += link.split_sends
            link.split_sends = 0
        run.end = time.perf_counter()
        return torch.stack(run.losses).sum() if self.is_last else None

    def _transfer(self, planned: _Planned, run: _StepState) -> None:
        op, key = planned.action.op, planned.key
        if op is Op.RECV_ACTIVATION:
            # The inbox delivers the stage's input as a leaf (see _leaves), but for a stage on
            # another device than the link: there the copy becomes the leaf.
            x = planned.route.recv(planned.what)
            if planned.device is not None:
                x = x.to(planned.device)
                if carries_grad(x):
                    x.requires_grad = True
            run.stage_inputs[key] = x
        elif op is Op.RECV_GRADIENT:
            run.output_grads[key] = planned.route.recv(planned.what)
        elif op is Op.SEND_ACTIVATION:
            self._send(planned, run.outputs[key])
        else:
            x = run.stage_inputs.pop(key)  # a leaf that requires grad iff it carries one
            grad = x.grad if x.requires_grad else _NO_GRADIENT
            self._send(planned, torch.zeros_like(x) if grad is None else grad)

    def _compute(self, planned: _Planned, run: _StepState, ranges: bool) -> None:
        action, key = planned.action, planned.key
        s, k = key
        began = time.perf_counter()
        profile = record_range(planned.profile) if ranges else _NO_CONTEXT
        if action.op is Op.FORWARD:
            x = run.inputs[k] if s == 0 else run.stage_inputs[key]
            split = self._split[s] and torch.is_grad_enabled()
            deferred = run.deferred.setdefault(key, DeferredWeights()) if split else None
            context = (weight_split(self._chunks[s], deferred, f"stage {s}")
                       if deferred is not None else _NO_CONTEXT)  # fmt: skip
            with profile, context:
                y = self._chunks[s](x)
                if not isinstance(y, Tensor):
                    raise TypeError(
                        f"stage {s} returned {type(y).__name__}; a pipeline stage must return "
                        "one Tensor (wrap modules returning tuples, such as LSTMs, in OutputOnly)"
                    )
                if s == self.num_stages - 1:
                    assert self.loss_fn is not None
                    y = self.loss_fn(y, run.targets[k]) * run.weights[k]
                    run.losses.append(y.detach())
            run.outputs[key] = y
        elif action.op is Op.BACKWARD_WEIGHT:
            with profile:
                deferred = run.deferred.pop(key, None)
                if deferred is not None:
                    deferred.run()
        else:
            y = run.outputs.pop(key)
            grad = run.output_grads.pop(key, None)
            # An output that carries no gradient does not require grad: no backward runs.
            # is_cpu first: y.device builds an object, and .to enters the dispatcher.
            if grad is not None and not (grad.is_cpu and y.is_cpu):
                grad = grad.to(y.device)
            with self._backward_context(s, k), profile:
                if y.requires_grad and (grad is not None or s == self.num_stages - 1):
                    torch.autograd.backward(y, grad)
        # Only the times here: the stats are made when asked for (last_stats), off the path
        # between this compute and the send a peer waits for.
        run.times.append((action, began, time.perf_counter()))

    def _send(self, planned: _Planned, tensor: Tensor) -> None:
        # A stage on a GPU sends via the host unless its link is NCCL (see _make_links). The
        # links detach what they send. is_cpu first: tensor.device builds an object, which
        # costs microseconds right after a compute, when this code is cold.
        on_cpu = tensor.is_cpu and self._comm_device.type == "cpu"
        if not on_cpu and tensor.device != self._comm_device:
            tensor = tensor.detach().to(self._comm_device)
        planned.route.send(tensor, planned.what)

    def _backward_context(
        self, stage: int, microbatch: int
    ) -> contextlib.AbstractContextManager[object]:
        # A data-parallel stage averages gradients once per step: in its last backward, with
        # the accumulated gradients.
        no_sync = self._no_sync[stage]
        if no_sync is None or microbatch == self._last_backward[stage]:
            return _NO_CONTEXT
        return no_sync()

    def _fail(self, message: str, origin: Peer, *, skip: int | None) -> None:
        """Tell the peers (except stage `skip`, where the news came from) and mark this
        pipeline broken; each notice waits a bounded time to be taken."""
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


class _Planned(NamedTuple):
    """One action of this rank's list and what it needs at run time (see `_planned`)."""

    action: Action
    key: tuple[int, int]  # (stage, micro-batch)
    route: Any  # SEND: the Link to the peer; RECV: the Inbox of the peer; compute: None
    what: Any  # SEND: the message's name; RECV: its Inbox position; compute: None
    profile: str  # the profiler range's name
    device: torch.device | None = None  # RECV: the stage's device, when not the link's (None)


class _StepState:
    """What one step keeps between actions, keyed by (stage, micro-batch)."""

    def __init__(self, *, start: float, inputs: list[Tensor], targets: list[Tensor]) -> None:
        self.start = start
        self.end = start  # set when the step is done
        self.inputs = inputs  # micro-batches of stage 0
        self.targets = targets  # micro-batches' targets on the last stage
        self.weights: list[float] = []
        self.stage_inputs: dict[tuple[int, int], Tensor] = {}  # received activations (leaves)
        self.outputs: dict[tuple[int, int], Tensor] = {}  # a stage's output (or weighted loss)
        self.output_grads: dict[tuple[int, int], Tensor] = {}
        self.deferred: dict[tuple[int, int], DeferredWeights] = {}
        self.losses: list[Tensor] = []
        self.times: list[tuple[Action, float, float]] = []  # compute actions: (began, ended)
        self.split_sends = 0

    def stats(self) -> StepStats:
        """The step's `StepStats` (compute times in seconds from its start)."""
        stats = StepStats(step_s=self.end - self.start, split_sends=self.split_sends)
        for action, began, ended in self.times:
            if action.op is Op.FORWARD:
                stats.forward_s += ended - began
            elif action.op is Op.BACKWARD_WEIGHT:
                stats.weight_s += ended - began
            else:
                stats.backward_s += ended - began
            start, end = began - self.start, ended - self.start
            timed = ActionTime(action.op.value, action.stage, action.microbatch, start, end)
            stats.per_microbatch.append(timed)
        return stats


def _check_chunks(
    stage: nn.Module | Sequence[nn.Module],
    stage_index: int | Sequence[int],
    num_stages: int,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None,
) -> dict[int, nn.Module]:
    """{global stage: module} for this rank; raises ValueError / TypeError naming the argument."""
    single = isinstance(stage, nn.Module)
    modules = [stage] if single else list(stage)  # type: ignore[list-item]
    indices = [stage_index] if single else stage_index
    if not isinstance(indices, Sequence) or isinstance(indices, str):
        raise TypeError(f"stage_index must be a list of ints with a list of stages: {indices!r}")
    indices = list(indices)
    if len(indices) != len(modules) or not 1 <= len(modules) <= MAX_CHUNKS:
        raise ValueError(
            f"{len(modules)} stage modules need as many stage_index entries (1 to "
            f"{MAX_CHUNKS}), got {indices}"
        )
    chunks: dict[int, nn.Module] = {}
    for position, (index, module) in enumerate(zip(indices, modules, strict=True)):
        name = "stage_index" if single else f"stage_index[{position}]"
        check_int(name, index, 0)
        if index >= num_stages:
            raise ValueError(f"{name} {index} >= num_stages {num_stages}")
        if not isinstance(module, nn.Module):
            raise TypeError(f"stage {index} must be an nn.Module, got {type(module).__name__}")
        if isinstance(module, nn.parallel.DistributedDataParallel):
            # DDP decides at forward time whether a backward reduces; the schedules
            # interleave forwards and backwards, so its reducer would fire too early.
            raise TypeError(
                "stage is a torch DistributedDataParallel, which cannot accumulate over a "
                "pipeline's interleaved micro-batches; use fastpar.parallel.DataParallel"
            )
        if index in chunks:
            raise ValueError(f"stage_index lists stage {index} twice: {indices}")
        chunks[index] = module
    if num_stages - 1 in chunks and loss_fn is None:
        raise ValueError(f"loss_fn is needed on the last stage (stage {num_stages - 1})")
    return chunks


def _message_name(message: Message, multi: bool) -> str:
    name = f"{message.kind} {message.microbatch}"
    return f"{name} stage {message.dest}" if multi else name


def _transport_name(link: Link) -> str:
    if isinstance(link, ShmLink):
        return "shm"
    return "local" if isinstance(link, LocalLink) else "torch"


def _module_device(module: nn.Module) -> torch.device:
    for tensor in [*module.parameters(), *module.buffers()]:
        return tensor.device
    return torch.device("cpu")
