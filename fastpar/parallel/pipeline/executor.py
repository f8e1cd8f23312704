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
raise on every rank, among them stages of `split_sequential` cut differently on different ranks.
"""

from __future__ import annotations

import datetime
import itertools
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastpar._checks import check_int, check_member
from fastpar._logging import get_logger, log_once
from fastpar.comm.timeouts import group_timeout
from fastpar.parallel.pipeline.config import (
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
from fastpar.parallel.pipeline.links import Link, LocalLink
from fastpar.parallel.pipeline.microbatches import first_microbatch, loss_weights, split_batch
from fastpar.parallel.pipeline.plan import StepPlan, StepState
from fastpar.parallel.pipeline.schedules import (
    Action,
    Message,
    Op,
    Schedule,
    message_of,
    schedule_actions,
    splits_backward,
)
from fastpar.parallel.pipeline.shm_link import ShmLink, connect_shm_links
from fastpar.parallel.pipeline.stages import stage_layers
from fastpar.parallel.pipeline.torch_link import TorchLink
from fastpar.parallel.pipeline.wire import Peer, PipelineError
from fastpar.profiling import ranges_recorded

__all__ = ["Pipeline"]

logger = get_logger(__name__)

_SENDS = (Op.SEND_ACTIVATION, Op.SEND_GRADIENT)


class Pipeline:
    """This rank's stages of a pipeline, and the schedule that runs them on micro-batches.

    Arguments:
        stage: the stage's module (e.g. from `split_sequential`), already on its device; or a
            list (or nn.ModuleList) of modules, this rank's chunks, one per entry of
            `stage_index`. A stage maps one tensor to one tensor. If it has `no_sync()`
            (fastpar's `DataParallel`), all backwards but the step's last run inside it, so
            gradients are averaged across replicas once per step.
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
        # Before the handshake: a process outside the group cannot join it to raise with the rest.
        self._group_rank = check_member(self.group)
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
        # What each stage holds of the split model, for the handshake to check that the ranks
        # cut it the same way.
        layers = () if local_error else tuple(stage_layers(m) for m in self._chunks.values())
        mine = Handshake.local(ok=local_error is None, stages=stage_index, num_stages=num_stages,
                               num_microbatches=num_microbatches, schedule=schedule,
                               transport=transport, layers=layers)  # fmt: skip
        timeout = self.config.timeout_s if local_error is None else group_wait_s
        table = exchange_handshakes(self.group, mine, timeout)
        if local_error is not None:
            raise local_error
        self.placement = check_handshakes(table, self._group_rank)
        self._hosts = [row.host for row in table]

        single = _single_stage(stage)
        self.module: nn.Module = stage if single else nn.ModuleList(stage)  # type: ignore[arg-type]
        self.stage_index = stage_index
        self.num_stages = num_stages
        self.is_first = 0 in self._chunks
        self.is_last = num_stages - 1 in self._chunks
        self._last_run: StepState | None = None
        self._last_stats = StepStats()
        self._broken: str | None = None
        self._devices = {s: _module_device(module) for s, module in self._chunks.items()}
        self._no_sync = {s: getattr(module, "no_sync", None) for s, module in self._chunks.items()}
        self._split = {s: self._splits(s) for s in self._chunks}
        everyone = schedule_actions(schedule, self.placement.num_ranks, num_stages,
                                    num_microbatches)  # fmt: skip
        self._actions = everyone[self._group_rank]
        self._comm_device = torch.device("cpu")  # a stage on a GPU sends via the host...
        self._links = self._make_links()  # ...unless its links are NCCL (set there)
        multi = self.placement.num_stages != self.placement.num_ranks
        self._names = {
            message_of(a): _message_name(message_of(a), multi)
            for actions in everyone
            for a in actions
            if a.op in _SENDS
        }
        self._me = Peer(min(self._chunks), dist.get_rank())
        expected = {peer: self._expected(everyone[peer]) for peer in self._links}
        # A failed transfer names the stages at both ends of its message (see name_senders).
        sent = [message_of(a) for a in self._actions if a.op in _SENDS]
        ranks = self.placement.stage_ranks
        for peer, link in self._links.items():
            ends = {self._names[m]: (m.dest, m.source) for m in expected[peer]}
            ends |= {self._names[m]: (m.source, m.dest) for m in sent if ranks[m.dest] == peer}
            link.name_senders(ends)
        self._receive_counts = [(link, len(expected[q])) for q, link in self._links.items()]
        self._plan = StepPlan(
            self._actions, chunks=self._chunks, num_stages=num_stages,
            num_microbatches=num_microbatches, loss_fn=loss_fn, split=self._split,
            no_sync=self._no_sync, devices=self._devices, comm_device=self._comm_device,
            links=self._links, stage_ranks=self.placement.stage_ranks,
            expected=expected,
            names=self._names,
        )  # fmt: skip
        # Stage 0's first forward comes first (and needs no target): the step starts it before
        # cutting the batch.
        self._first_forward_first = num_stages > 1 and self._actions[0] == Action(Op.FORWARD, 0, 0)
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
            backend = dist.get_backend(self.group)
            slot_group, bwd_group = _link_groups(ranks, backend, self.config.timeout_s)
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
            origin = self._failed_stage()
            self._fail(f"{origin} raised {type(error).__name__}: {error}", origin, skip=None)
            raise

    def _failed_stage(self) -> Peer:
        """The stage of this rank that raised: the one whose action did (recorded by the plan),
        else the first (an error before any action: this rank's inputs)."""
        run = self._last_run
        stage = run.failed_stage if run is not None else None
        return Peer(stage if stage is not None else self._me.stage, self._me.rank)

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
        run = StepState(start=time.perf_counter(), inputs=[], targets=[],
                        num_slots=self._plan.num_slots)  # fmt: skip
        self._last_run = run
        # Asked once per step: a range costs microseconds even when nobody listens.
        ranged = ranges_recorded()
        plan = self._plan.ranged if ranged else self._plan.runs
        # Everything waits on the step's first forward, which needs micro-batch 0 alone: the
        # rest is cut after it, while its output is on its way (cutting costs tens of
        # microseconds, cold). A rank without stage 0 waits for its first message anyway, and
        # with ranges on, the forward's send comes after it apart.
        prepared = ranged or not self._first_forward_first
        if prepared:
            self._prepare(run, inputs, targets)
        else:
            run.inputs = [first_microbatch("inputs", inputs, m, dim)]
        for link, count in self._receive_counts:
            link.post_receives(count)
        plan[0](run)
        if not prepared:
            self._prepare(run, inputs, targets)
        for action in itertools.islice(plan, 1, None):
            action(run)
        for link in self._links.values():
            link.finish_sends()
            link.end_step()
            run.split_sends += link.split_sends
            link.split_sends = 0
        run.spent.clear()
        run.end = time.perf_counter()
        return torch.stack(run.losses).sum() if self.is_last else None

    def _prepare(
        self,
        run: StepState,
        inputs: Tensor | Sequence[Tensor] | None,
        targets: Tensor | Sequence[Tensor] | None,
    ) -> None:
        """Give `run` its micro-batches and loss weights."""
        cfg = self.config
        m, dim = cfg.num_microbatches, cfg.batch_dim
        if self.is_first:
            run.inputs = split_batch("inputs", inputs, m, dim)
        if self.is_last:
            run.failed_stage = self.num_stages - 1  # a bad target is the last stage's
            run.targets = split_batch("targets", targets, m, dim)
            assert targets is not None  # split_batch raised otherwise
            run.weights = loss_weights(targets, m, dim, cfg.loss_reduction)
            run.failed_stage = None

    def _fail(self, message: str, origin: Peer, *, skip: int | None) -> None:
        """Tell the peers (except the rank of stage `skip`, where the news came from) and mark
        this pipeline broken; each notice waits a bounded time to be taken."""
        self._broken = message
        skipped = self.placement.stage_ranks[skip] if skip is not None else None
        for peer, link in self._links.items():
            if peer == skipped:
                continue
            try:
                link.send_error(message, origin)
            except PipelineError as error:  # the link is broken too; the original error wins
                logger.warning("could not tell %s about the failure: %s", link.peer, error)
        for link in self._links.values():
            link.drop()


def _single_stage(stage: nn.Module | Sequence[nn.Module]) -> bool:
    """Whether `stage` is one module, not a list of chunks (an nn.ModuleList, as `module` holds
    them, is a list: it has no forward of its own)."""
    return isinstance(stage, nn.Module) and not isinstance(stage, nn.ModuleList)


def _check_chunks(
    stage: nn.Module | Sequence[nn.Module],
    stage_index: int | Sequence[int],
    num_stages: int,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None,
) -> dict[int, nn.Module]:
    """{global stage: module} for this rank; raises ValueError / TypeError naming the argument."""
    single = _single_stage(stage)
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


def _link_groups(
    ranks: list[int], backend: str, timeout_s: float
) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """The groups TorchLinks need besides the pipeline's own on a GPU backend: gloo for the
    headers, and `backend` for one direction of payloads (see torch_link: one direction per
    communicator). Only the pipeline's ranks join, so the pipelines of a DP x PP layout create
    theirs independently. They wait as long as the pipeline (`timeout_s`), not torch's default."""
    timeout = datetime.timedelta(seconds=timeout_s)
    slot_group = dist.new_group(
        ranks, backend="gloo", timeout=timeout, use_local_synchronization=True
    )
    payload_group = dist.new_group(
        ranks, backend=backend, timeout=timeout, use_local_synchronization=True
    )
    return slot_group, payload_group


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
