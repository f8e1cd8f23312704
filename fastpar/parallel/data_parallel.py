"""`DataParallel`: replicas of one module on the ranks of a group, with gradients averaged by
bucketed all-reduces that overlap the rest of the backward pass. Shaped like PyTorch's
`DistributedDataParallel` with `gradient_as_bucket_view=True`.

How a step flows:
1. Construction checks that every rank holds the same parameter set (names, shapes, dtypes)
   and broadcasts parameters and buffers from the group's first rank.
2. Parameters are cut into buckets in reverse registration order (backward produces gradients
   roughly in that order), the first bucket small so communication starts early. Each bucket is
   one flat buffer; every parameter's gradient is a view into it. With `shared_buckets=True`
   (CPU, fastpar's ring or hierarchical all-reduce) the buffers live in memory every rank of a
   host maps (`RingAllReduce.empty_shared`, `HierarchicalAllReduce.empty_shared`), so the
   all-reduce of a large bucket reads the host's peers' gradients where they lie instead of
   copying them in and out (small ones copy, which is faster there); where that memory cannot
   be allocated (a small /dev/shm), ordinary buffers serve, with the same results, and the
   reason is logged once.
3. During backward, a post-accumulate-grad hook makes `param.grad` that view, divided by the
   world size on the way (a fresh gradient, after `zero_grad(set_to_none=True)`, is multiplied
   into the view in the one pass that copies it; one that autograd accumulated into the view is
   scaled in place), so the all-reduce is a plain sum and no pass over the gradients follows it:
   the same arithmetic as DDP, which also divides before summing. A sparse gradient
   (`Embedding(sparse=True)`) is copied in dense, so `.grad` is dense from then on (DDP's
   values; SGD and Adagrad take it, SparseAdam refuses it). When the last gradient of a
   bucket arrives, and communication overlaps backward (`overlap`), that bucket's all-reduce is
   launched asynchronously (fastpar's ring or hierarchical all-reduce; torch.distributed
   otherwise: NCCL runs on its own CUDA stream, gloo and fastpar's CPU all-reduces on their own
   threads) while autograd keeps computing. On a CPU host where every core already runs a
   rank's compute thread, an all-reduce during backward only takes turns with compute (a 1 MiB
   bucket took 8-10 ms there, 0.1 ms after backward), so by default buckets wait for the end.
4. A callback queued on the autograd engine runs when backward finishes: it launches the
   buckets not launched yet (also those that still miss gradients, see "unused parameters")
   and waits for every bucket. Without overlap it runs them itself, one after the other: a
   hand-over to the communication thread and back only adds wake-ups when nothing is left to
   overlap. `backward()` returns after that, with every `param.grad` holding the average.

Measurements: `last_stats` (`CommStats`) holds the last synchronised backward's communication,
timed on the host as the hooks and the final wait run (no extra synchronisation): how long the
all-reduces took from the first launch to the last completion, and how much of that was exposed,
i.e. waited for after autograd had finished. On CUDA, torch.distributed's (NCCL's) `wait()` only
orders the streams, so there the figures are host-side (launch and enqueue) times unless the
caller synchronises; fastpar's CUDA ring's `wait()` also waits on the host for the kernel (to
raise what the device found), so its figures include the device's time.

Failures: if an all-reduce fails (a peer died, hung or called differently), `backward()` raises
that error, which names the rank, after every bucket's work has ended, and sets every `.grad` to
None first: an optimizer step that runs anyway (the error caught) changes nothing, and no rank
ever steps on its own unreduced gradients. `timeout` bounds the waits through torch.distributed's
gloo too (whose own bound is the group's timeout, 30 minutes by default): one that runs out
raises CommTimeoutError naming this rank, and since gloo goes on with that all-reduce, the
wrapper is unusable afterwards (CommClosedError), as fastpar's ring is after its timeout. A
backward that raised before its end (in autograd or a gradient hook, on every rank) is forgotten
at the next forward, which sets every `.grad` to None (they were never averaged) and logs a
warning; later backwards synchronise as usual. `close()` forgets it too, after waiting (within the
timeout) for the all-reduces it launched, so that none writes into a bucket afterwards.

Unused parameters: a parameter that gets no gradient in an iteration never blocks the job.
Each bucket carries one extra element per parameter, 1 where this rank produced the gradient
(in this backward or in a `no_sync()` one since the last synchronised backward), summed by the
same all-reduce. A parameter used by some rank gets the sum over ranks of the gradients they
hold divided by the world size (a rank that did not use it in this backward contributes the
`.grad` it accumulated before, zeros if None), exactly as DDP with
`find_unused_parameters=True`. A parameter no rank used keeps its `.grad` as it was (None after
`zero_grad()`), so optimizers skip it, again as DDP does. Those flags are read on the host (one
synchronisation per backward) only in a backward where this rank left a parameter unused;
otherwise every parameter was used and nothing needs reading.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from datetime import timedelta
from typing import Any, Literal, get_args

import torch
import torch.distributed as dist
from torch import nn

from fastpar._checks import check_bool, check_choice, check_member, check_positive
from fastpar._logging import get_logger, log_once
from fastpar._machine import usable_cores
from fastpar.comm.agreement import exchange_prefix, wait_for_ranks
from fastpar.comm.errors import CommClosedError, CommTimeoutError
from fastpar.comm.timeouts import group_timeout
from fastpar.profiling import record_range

logger = get_logger(__name__)

CommChoice = Literal["auto", "ring", "torch"]
OverlapChoice = Literal["auto", "on", "off"]
_MB = 2**20
# Wrappers whose gradient hooks are registered (not closed): a parameter must be in one at most
_open_wrappers: weakref.WeakSet[DataParallel] = weakref.WeakSet()


@dataclass(kw_only=True, frozen=True)
class DataParallelConfig:
    """Options of `DataParallel`."""

    comm: CommChoice = "auto"
    """"auto": fastpar's all-reduce where it applies (the ring when every rank shares a host,
    the hierarchical all-reduce when several hosts hold the same number >= 2 of ranks), else
    torch.distributed, the choice and its reason logged once on rank 0; "ring": fastpar's
    all-reduce, raising where it cannot serve a bucket (naming why); "torch": torch.distributed
    (NCCL on GPU, gloo on CPU)."""
    bucket_cap_mb: float = 25.0
    """Size of a gradient bucket in MiB; larger buckets mean fewer, longer all-reduces."""
    first_bucket_mb: float = 1.0
    """Size of the first bucket (the last layers' gradients), small so communication starts
    as early as possible in backward."""
    timeout_s: float | None = None
    """How long a wait for a peer may last before it raises CommTimeoutError naming this rank:
    fastpar's all-reduce's waits, and on CPU (gloo) the end of backward's wait for
    torch.distributed's all-reduces (all of a backward's buckets within it) and construction's
    waits: for every rank's parameter names and shapes (through the store, on any device; the
    error names the ranks that did not post theirs), then for the broadcast. None: the group's own
    timeout (given to init_process_group / new_group; 30 minutes by default for gloo), which
    also bounds NCCL's collectives on CUDA (its watchdog): NCCL's bounded wait would block the
    host, count from the launch and abort the communicator."""
    overlap: OverlapChoice = "auto"
    """When buckets are all-reduced: "on": each as soon as its gradients are ready, while
    backward goes on; "off": all when backward has finished; "auto": "on", except on CPU where
    this host has no core to spare for communication (LOCAL_WORLD_SIZE, else the group's size,
    ranks x torch.get_num_threads() >= the cores this process may use): there an all-reduce
    during backward only takes turns with compute (on 2 ranks of 2 cores a 1 MiB bucket took
    8-10 ms during backward, 0.1 ms after it). The choice and its reason are logged once."""
    shared_buckets: bool = False
    """CPU with fastpar's ring or hierarchical all-reduce: keep the buckets in memory every
    rank of a host maps (/dev/shm, as much as the gradients), so the all-reduce of a large
    bucket reads the host's peers' gradients in place (ordinary buckets, logged once, where it
    cannot be allocated). It made 16-64 MB all-reduces 1.05-1.3x faster on 2 ranks of one
    host and 1.2-1.7x on 2 simulated hosts x 2 ranks. Off by default: it made no measured
    difference to a training step on 2 ranks, and /dev/shm is often small (docker: 64 MiB)
    and shared with data loaders. The results are the same bits either way."""

    def __post_init__(self) -> None:
        check_choice("comm", self.comm, get_args(CommChoice))
        check_choice("overlap", self.overlap, get_args(OverlapChoice))
        check_bool("shared_buckets", self.shared_buckets)
        for name in ("bucket_cap_mb", "first_bucket_mb"):
            check_positive(name, getattr(self, name))
        if self.timeout_s is not None:
            check_positive("timeout_s", self.timeout_s)


@dataclass(kw_only=True, frozen=True)
class CommStats:
    """One synchronised backward's gradient communication, in seconds (host clock)."""

    backward_s: float = 0.0
    """From this rank's first gradient to the end of backward (its waits included)."""
    allreduce_s: float = 0.0
    """From the first bucket's launch (the end of autograd, if later) to the end of the wait
    for the last one."""
    exposed_s: float = 0.0
    """Waited for all-reduces after autograd had finished: communication backward did not hide
    (backward time minus this is this rank's own compute)."""
    buckets: int = 0
    """All-reduces launched."""
    bytes: int = 0
    """Bytes all-reduced (gradients and "used" flags)."""

    @classmethod
    def total(cls, stats: Iterable[CommStats]) -> CommStats:
        """Several backwards' communication added up (a rank with one DataParallel per
        pipeline chunk); all zeros for none."""
        rows = list(stats)
        return cls(**{f.name: sum(getattr(row, f.name) for row in rows) for f in fields(cls)})


@dataclass(eq=False)
class _Bucket:
    index: int
    params: list[nn.Parameter]
    buffer: torch.Tensor  # gradients, then one "used" flag per parameter
    views: list[torch.Tensor]  # views[slot]: params[slot]'s gradient inside `buffer`
    comm: Callable[[torch.Tensor, bool], Any]  # sums a buffer (async_op: returns its work)
    through_torch: bool  # comm is torch.distributed's (its waits are bounded by ours)
    pending: int = 0
    ready: list[bool] = field(default_factory=list)
    # accumulated[slot]: params[slot] got a gradient under no_sync() since the last
    # synchronised backward, so it counts as used there (DDP's local_used_map)
    accumulated: list[bool] = field(default_factory=list)
    work: Any = None

    @property
    def numel(self) -> int:
        return self.buffer.numel() - len(self.params)

    @property
    def grads(self) -> torch.Tensor:
        return self.buffer[: self.numel]

    @property
    def flags(self) -> torch.Tensor:
        return self.buffer[self.numel :]


def _state_signature(module: nn.Module) -> list[tuple[str, str, tuple[int, ...], str, bool]]:
    """What every rank's module must agree on: each parameter's and buffer's name, shape, dtype
    and requires_grad (a buffer that differs would block or corrupt the broadcast of state)."""
    return [
        (kind, name, tuple(t.shape), str(t.dtype), t.requires_grad)
        for kind, named in (("parameter", module.named_parameters()),
                            ("buffer", module.named_buffers()))
        for name, t in named
    ]  # fmt: skip


def _first_difference(
    mine: list[tuple[str, str, tuple[int, ...], str, bool]],
    reference: list[tuple[str, str, tuple[int, ...], str, bool]],
) -> str | None:
    for a, b in zip(mine, reference, strict=False):
        if a != b:
            return f"{a[0]} {a[1:]} here but {b[0]} {b[1:]} on the group's first rank"
    if len(mine) != len(reference):
        return (
            f"{len(mine)} parameters and buffers here but {len(reference)} on the group's "
            "first rank"
        )
    return None


class DataParallel(nn.Module):
    """Data-parallel replicas of `module` with gradients averaged across `group`.

    Arguments:
        module: the model; the same architecture on every rank. Its parameters and buffers are
            overwritten with the group's first rank's values at construction. Buffers only
            then: afterwards each rank's (BatchNorm running statistics) follow its own data,
            where DDP (broadcast_buffers=True) copies rank 0's at every forward.
        group: the process group of the replicas (None: the default group).
        comm: "auto", "ring" or "torch" (see `DataParallelConfig`).
        bucket_cap_mb: gradient bucket size in MiB.
        first_bucket_mb: size of the first bucket in MiB.
        timeout: how long a wait for a peer may last (timedelta or seconds; None: the group's
            own timeout) before construction or backward raises `CommTimeoutError` naming this
            rank (see `DataParallelConfig.timeout_s`; NCCL's collectives keep the group's
            timeout). After a backward timed out waiting for gloo, that all-reduce goes on
            (gloo ends it when the peer calls it, or at the group's timeout) and may still
            write into the buckets, so this DataParallel is unusable afterwards
            (`CommClosedError`), as fastpar's ring is.
        overlap: "auto", "on" or "off": whether buckets are all-reduced during backward (see
            `DataParallelConfig`).
        shared_buckets: keep CPU buckets in shared memory (see `DataParallelConfig`).

    `forward` calls `module`; `backward()` on its result returns once gradients are averaged
    (each `.grad` a view into its bucket), or raises the communication error with every `.grad`
    set to None. `last_stats` (`CommStats`) times the last synchronised backward's
    all-reduces and the part of them left exposed. `no_sync()` skips communication while
    gradients accumulate (the next synchronised backward averages the accumulated sum).
    `state_dict()`/`load_state_dict()` are the plain module's, with no "module." prefix, also
    within a parent module's.
    `close()` removes the gradient hooks; until then its parameters cannot be wrapped again
    (e.g. to average layers unfrozen since: a wrapper averages the parameters that required
    gradients when it was built).
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        group: dist.ProcessGroup | None = None,
        comm: CommChoice = "auto",
        bucket_cap_mb: float = 25.0,
        first_bucket_mb: float = 1.0,
        timeout: timedelta | float | None = None,
        overlap: OverlapChoice = "auto",
        shared_buckets: bool = False,
    ) -> None:
        super().__init__()
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "DataParallel needs torch.distributed to be initialised "
                "(call torch.distributed.init_process_group first)"
            )
        _check_not_wrapped(module)
        timeout_s = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
        self.config = DataParallelConfig(
            comm=comm,
            bucket_cap_mb=bucket_cap_mb,
            first_bucket_mb=first_bucket_mb,
            timeout_s=timeout_s,
            overlap=overlap,
            shared_buckets=shared_buckets,
        )
        self.module = module
        self.register_load_state_dict_pre_hook(_under_module_prefix)
        self.group = group if group is not None else dist.group.WORLD
        check_member(self.group)
        self.world_size = dist.get_world_size(self.group)
        self._src = dist.get_global_rank(self.group, 0)
        self._sync_enabled = True
        self._lock = threading.Lock()
        self._callback_queued = False
        self._next_bucket = 0  # the next bucket to launch in this backward
        self._some_unused = False  # whether this rank left a parameter unused in this backward
        self._ring: Any = None
        self._shared_memory_problem: str | None = None  # why buckets are in ordinary memory
        # What happened in the last backward, in order: ("grad", param index) as hooks fire,
        # ("launch", bucket index) as all-reduces start, ("end",) when backward finished.
        self.last_backward_events: list[tuple[Any, ...]] = []
        self.last_stats = CommStats()
        self._first_grad_at = self._first_launch_at = 0.0
        # Why this wrapper is unusable (a torch.distributed all-reduce that timed out may still
        # write into its buckets); None while it is usable
        self._unusable: str | None = None

        self._check_same_state()
        self._broadcast_state(self._deadline())
        try:
            self._buckets = self._build_buckets()
        except BaseException:  # e.g. comm="ring" and a bucket it cannot serve
            if self._ring is not None:  # created for the buckets, and no close() will come
                self._ring.close()
                self._ring = None
            raise
        self._grad_scale = 1.0 / self.world_size
        self.overlaps_backward = self._decide_overlap()
        self._hooks = [
            param.register_post_accumulate_grad_hook(self._make_hook(bucket, slot, position))
            for bucket in self._buckets
            for slot, param in enumerate(bucket.params)
            for position in [self._param_index[id(param)]]
        ]
        _open_wrappers.add(self)

    # --- construction ---------------------------------------------------------------------------

    def _check_same_state(self) -> None:
        """Every rank posts its parameters' and buffers' signature through the default store and
        reads everyone's, waiting at most the timeout (CommTimeoutError naming the ranks that did
        not post theirs); ValueError naming the first rank whose signature differs. The last
        rank to read them deletes them."""
        me = dist.get_rank(self.group)
        store = dist.distributed_c10d._get_default_store()
        prefix = exchange_prefix("data-parallel", self.group)
        keys = {r: f"{prefix}/{r}" for r in range(self.world_size)}
        store.set(keys[me], pickle.dumps(_state_signature(self.module)))
        if self.config.timeout_s is not None:
            timeout = timedelta(seconds=self.config.timeout_s)
        else:
            device = next(self._state_tensors(), torch.empty(0)).device
            timeout = group_timeout(self.group, device)
        wait_for_ranks(store, keys, timeout, me, "post its parameter names and shapes",
                       during="constructing a DataParallel")  # fmt: skip
        signatures = [pickle.loads(store.get(keys[r])) for r in range(self.world_size)]
        # The last rank to have read every signature deletes them (no rank may delete its own
        # after reading: a slower one may not have read it yet), so that a loop building
        # wrappers does not grow the store by a key per rank each time.
        read = f"{prefix}/read"
        if store.add(read, 1) == self.world_size:
            for key in [*keys.values(), read]:
                store.delete_key(key)
        for rank, signature in enumerate(signatures):
            difference = _first_difference(signature, signatures[0])
            if difference is not None:
                raise ValueError(
                    "DataParallel needs the same parameters and buffers on every rank; on group "
                    f"rank {rank}, {difference}"
                )

    def _state_tensors(self) -> Iterator[torch.Tensor]:
        yield from (p.data for p in self.module.parameters())
        yield from self.module.buffers()

    @torch.no_grad()
    def _broadcast_state(self, deadline: float | None) -> None:
        what = "the group's first rank's parameters and buffers"
        works = [
            (dist.broadcast(tensor, src=self._src, group=self.group, async_op=True), tensor.device)
            for tensor in self._state_tensors()
        ]
        for work, device in works:
            self._wait_within(work, deadline, what, device)

    def _deadline(self) -> float | None:
        """When a wait that starts now must end (monotonic clock); None: no bound of ours (the
        group's timeout)."""
        timeout = self.config.timeout_s
        return None if timeout is None else time.monotonic() + timeout

    def _wait_within(
        self, work: Any, deadline: float | None, what: str, device: torch.device
    ) -> None:
        """Wait for torch.distributed's `work` on tensors on `device` until `deadline` (None:
        its own bound, the group's timeout); CommTimeoutError naming this rank when it is still
        running then. A failure of the collective itself is raised as torch raised it.

        torch.distributed does not cancel a collective whose wait ran out: gloo completes it
        when the peer calls it, or fails it at the group's timeout. Until then it may write into
        the buckets, so from then on this wrapper refuses to run (CommClosedError).

        CPU tensors only (gloo): NCCL's wait(timeout) blocks the host until the kernel ends,
        counts from the launch (a bucket launched early in backward would time out while the
        peers still compute theirs) and aborts the communicator when it runs out; there
        NCCL's watchdog applies the group's timeout."""
        if deadline is None or device.type != "cpu":
            work.wait()
            return
        # At least 1 ms: torch takes a zero timeout for "no bound"
        left = max(deadline - time.monotonic(), 1e-3)
        try:
            work.wait(timeout=timedelta(seconds=left))
        except Exception as error:
            if work.is_completed():  # it ended, failed: not a wait that ran out
                raise
            message = (
                f"rank {dist.get_rank()} timed out after {self.config.timeout_s:g} s waiting "
                f"for {what} through torch.distributed ({dist.get_backend(self.group)}): a "
                "peer has not called the collective (slow, hung, or not calling it at all)"
            )
            self._unusable = (
                f"DataParallel is unusable: {message}, and that collective may still write "
                "into its tensors (torch.distributed ends it when the peer calls it, or at the "
                "group's timeout)"
            )
            raise CommTimeoutError(message) from error

    def _fastpar_all_reduce(self, device: torch.device) -> Any:
        """fastpar's all-reduce of the group (created on first use, collectively)."""
        if self._ring is None:
            from fastpar.comm import create_all_reduce

            self._ring = create_all_reduce(
                self.group,
                device=device,
                timeout=self.config.timeout_s,
                serve_shared_gpu=self.config.comm == "ring",
            )
        return self._ring

    def _bucket_buffer(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A zero-filled bucket: in fastpar's shared memory where fastpar will reduce it and
        that memory can be allocated (the same verdict on every rank), else ordinary memory."""
        if self.config.comm != "torch" and self.config.shared_buckets and device.type == "cpu":
            from fastpar.comm import SharedMemoryUnavailableError

            ring = self._fastpar_all_reduce(device)
            probe = torch.empty(0, dtype=dtype)
            if ring.should_use(probe, dist.ReduceOp.SUM) and self._shared_memory_problem is None:
                try:
                    return ring.empty_shared(numel, dtype=dtype)
                except SharedMemoryUnavailableError as error:
                    self._shared_memory_problem = str(error)  # the same on every rank
                    if dist.get_rank() == 0:
                        log_once(
                            logger, f"DataParallel keeps its buckets in ordinary memory: {error}"
                        )
        return torch.zeros(numel, dtype=dtype, device=device)

    def _comm_for(self, buffer: torch.Tensor) -> tuple[Callable[[torch.Tensor, bool], Any], bool]:
        """The sum of this bucket across the group (the hooks divided the gradients already),
        and whether torch.distributed computes it."""
        choice = self.config.comm
        if choice != "torch":
            self._fastpar_all_reduce(buffer.device)
            if self._ring.should_use(buffer, dist.ReduceOp.SUM):
                ring = self._ring
                return (lambda tensor, async_op: ring.all_reduce(tensor, async_op=async_op)), False
            reason = self._ring.fallback_reason(buffer, dist.ReduceOp.SUM)
            if choice == "ring":
                raise ValueError(
                    f"comm='ring' was requested but fastpar's all-reduce cannot serve this "
                    f"{buffer.dtype} bucket on {buffer.device}: {reason}; use comm='auto'"
                )
            if dist.get_rank() == 0:  # once per run (create_all_reduce said why for a layout)
                log_once(logger, f"DataParallel uses torch.distributed: {reason}")
        group = self.group
        return (
            lambda tensor, async_op: dist.all_reduce(tensor, group=group, async_op=async_op)
        ), True

    def _build_buckets(self) -> list[_Bucket]:
        params = [p for p in self.module.parameters() if p.requires_grad]
        self._param_index = {id(p): i for i, p in enumerate(params)}
        buckets: list[_Bucket] = []
        current: list[nn.Parameter] = []
        current_bytes = 0

        def close_bucket() -> None:
            nonlocal current, current_bytes
            if current:
                buckets.append(self._make_bucket(len(buckets), current))
            current, current_bytes = [], 0

        for param in reversed(params):
            cap = (self.config.first_bucket_mb if not buckets else self.config.bucket_cap_mb) * _MB
            if current and (
                param.dtype != current[0].dtype
                or param.device != current[0].device
                or current_bytes + param.numel() * param.element_size() > cap
            ):
                close_bucket()
            current.append(param)
            current_bytes += param.numel() * param.element_size()
        close_bucket()
        return buckets

    def _make_bucket(self, index: int, params: list[nn.Parameter]) -> _Bucket:
        total = sum(p.numel() for p in params)
        buffer = self._bucket_buffer(total + len(params), params[0].dtype, params[0].device)
        views, start = [], 0
        for param in params:
            views.append(buffer[start : start + param.numel()].view_as(param))
            start += param.numel()
        comm, through_torch = self._comm_for(buffer)
        return _Bucket(
            index=index,
            params=params,
            buffer=buffer,
            views=views,
            comm=comm,
            through_torch=through_torch,
            pending=len(params),
            ready=[False] * len(params),
            accumulated=[False] * len(params),
        )

    def _decide_overlap(self) -> bool:
        """Whether buckets are all-reduced during backward (see `DataParallelConfig.overlap`)."""
        if self.config.overlap != "auto":
            return self.config.overlap == "on"
        if not self._buckets or self._buckets[0].buffer.device.type != "cpu":
            return True
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        cores = usable_cores()
        spare = has_spare_core(local_ranks, torch.get_num_threads(), cores)
        if dist.get_rank() == 0:
            log_once(
                logger,
                f"DataParallel all-reduces CPU buckets {'during' if spare else 'after'} backward: "
                f"{local_ranks} ranks x {torch.get_num_threads()} threads on {cores} cores",
            )
        return spare

    # --- the training step ----------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._check_usable()
        if self._unfinished_backward_left():
            self._abandon_unfinished_backward()
        with record_range("fastpar.dp.forward"):
            return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally, without communication, inside this context.

        What counts is where the backward runs (DDP decides at the forward): a backward outside
        the context synchronises, whatever the forward ran under. Either way the next
        synchronised backward averages everything accumulated since the last one."""
        previous = self._sync_enabled
        self._sync_enabled = False
        try:
            yield
        finally:
            self._sync_enabled = previous

    def _make_hook(self, bucket: _Bucket, slot: int, position: int) -> Any:
        view = bucket.views[slot]

        def hook(param: torch.Tensor) -> None:
            if not self._sync_enabled:
                bucket.accumulated[slot] = True
                return
            self._start_backward_if_needed()
            with self._lock:
                self.last_backward_events.append(("grad", position))
                if bucket.ready[slot]:
                    return  # AccumulateGrad runs once per leaf and backward; never twice
                bucket.ready[slot] = True
            grad = param.grad
            assert grad is not None  # post-accumulate hooks fire after .grad is set
            if not _is_view(grad, view):
                _scale_into(view, grad, self._grad_scale)
                param.grad = view
            elif self._grad_scale != 1.0:  # autograd accumulated into the view
                with torch.no_grad():
                    view.mul_(self._grad_scale)
            with self._lock:
                bucket.pending -= 1
                if self.overlaps_backward:
                    self._launch_ready_buckets()

        return hook

    def _launch_ready_buckets(self) -> None:
        # Collectives must be issued in the same order on every rank, so buckets launch in
        # index order: a complete bucket waits for the ones before it (as in DDP).
        while self._next_bucket < len(self._buckets):
            bucket = self._buckets[self._next_bucket]
            if bucket.pending > 0:
                return
            self._launch(bucket)
            self._next_bucket += 1

    def _start_backward_if_needed(self) -> None:
        with self._lock:
            if self._callback_queued:
                return
            # Once per backward, in its first hook, before it writes into a bucket (only the
            # end of a backward, or a forward outside one, makes the wrapper unusable)
            self._check_usable()
            self._callback_queued = True
            self.last_backward_events = []
            self._first_grad_at = time.perf_counter()
            self._first_launch_at = 0.0
            # "used" flags: 1 unless this rank leaves a parameter unused (the last sum is there)
            for bucket in self._buckets:
                bucket.flags.fill_(1)
        torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)

    def _launch(self, bucket: _Bucket) -> None:
        self.last_backward_events.append(("launch", bucket.index))
        if not self._first_launch_at:
            self._first_launch_at = time.perf_counter()
        with record_range(f"fastpar.dp.allreduce.bucket{bucket.index}"):
            # torch.distributed's synchronous call is its asynchronous one waited for with no
            # bound but the group's timeout: its work is waited for at the end, within ours.
            if self.overlaps_backward or bucket.through_torch:
                bucket.work = bucket.comm(bucket.buffer, True)
            else:  # backward is over: this thread runs it, with no hand-over to another
                bucket.comm(bucket.buffer, False)
                bucket.work = _FINISHED

    @torch.no_grad()
    def _mark_unused(self, bucket: _Bucket) -> None:
        """Parameters that got no gradient in this backward contribute the gradient they hold
        (accumulated under no_sync(), or left from an earlier backward; zeros if None), as DDP
        does, and a 0 flag unless a no_sync() backward since the last sync gave them one."""
        for slot, ready in enumerate(bucket.ready):
            if ready:
                continue
            self._some_unused = True
            param, view = bucket.params[slot], bucket.views[slot]
            if param.grad is None:
                view.zero_()
            elif _is_view(param.grad, view):
                param.grad = view.clone()  # kept as it was if no rank uses the parameter
                view.mul_(self._grad_scale)
            else:
                _scale_into(view, param.grad, self._grad_scale)
            bucket.flags[slot] = 1 if bucket.accumulated[slot] else 0
            bucket.ready[slot] = True
        bucket.pending = 0

    def _finish_backward(self) -> None:
        started = time.perf_counter()
        error: BaseException | None = None
        with record_range("fastpar.dp.wait"):
            try:
                with self._lock:
                    for bucket in self._buckets[self._next_bucket :]:
                        if bucket.pending > 0:
                            self._mark_unused(bucket)
                    self._launch_ready_buckets()
                error = self._wait_for_launched()
                if error is None and self._some_unused:
                    self._expose_used_elsewhere()
            except Exception as failure:  # re-raised below
                error = error or failure
            finally:
                with self._lock:
                    self.last_backward_events.append(("end",))
                self._record_stats(started)
                self._reset_backward_state()
        if error is not None:
            self._drop_gradients()
            error.add_note(
                "DataParallel: gradients were not averaged, so every parameter's .grad was set "
                "to None (an optimizer step changes nothing)"
            )
            raise error

    def _wait_for_launched(self) -> BaseException | None:
        """Wait for every launched all-reduce, even after one failed: no work may still write
        into a bucket (a .grad) once backward has returned. torch.distributed's are waited for
        within the timeout, all of them together (one still running then makes the wrapper
        unusable, see `_wait_within`). Returns the first failure."""
        error: BaseException | None = None
        deadline = self._deadline()
        for bucket in self._buckets:
            if bucket.work is None:
                continue
            try:
                if bucket.through_torch:
                    what = f"the all-reduce of gradient bucket {bucket.index}"
                    self._wait_within(bucket.work, deadline, what, bucket.buffer.device)
                else:  # fastpar's all-reduce bounds its own waits
                    bucket.work.wait()
            except Exception as failure:  # the caller raises it
                error = error or failure
        return error

    def _check_usable(self) -> None:
        if self._unusable is not None:
            raise CommClosedError(self._unusable)

    def _reset_backward_state(self) -> None:
        """Nothing launched, no gradient arrived: ready for the next synchronised backward."""
        with self._lock:
            self._callback_queued = False
            self._next_bucket = 0
            self._some_unused = False
            for bucket in self._buckets:
                bucket.work = None
                bucket.pending = len(bucket.params)
                bucket.ready = [False] * len(bucket.params)
                bucket.accumulated = [False] * len(bucket.params)

    def _unfinished_backward_left(self) -> bool:
        """Whether the last synchronised backward raised before its end (in autograd or a hook),
        so its end-of-backward callback never ran; not while called inside a backward (-1:
        outside any; activation checkpointing recomputes forwards within one)."""
        return self._callback_queued and torch._C._current_graph_task_id() == -1

    def _forget_unfinished_backward(self) -> BaseException | None:
        """Wait for the all-reduces the unfinished backward launched (none may still write into
        a bucket), forget its state (it would keep every later backward from synchronising),
        and drop its gradients, never averaged. Returns the error of a launched all-reduce."""
        error = self._wait_for_launched()
        self._reset_backward_state()
        self._drop_gradients()
        return error

    def _abandon_unfinished_backward(self) -> None:
        """At a forward after an unfinished backward: forget it (`_forget_unfinished_backward`)
        and raise its all-reduce's error, else warn."""
        error = self._forget_unfinished_backward()
        message = (
            "DataParallel: the last synchronised backward raised before its end, so its "
            "gradients were not averaged and every parameter's .grad was set to None"
        )
        if error is not None:
            error.add_note(message)
            raise error
        logger.warning(message)

    def _record_stats(self, autograd_done: float) -> None:
        now = time.perf_counter()
        launched = [bucket for bucket in self._buckets if bucket.work is not None]
        self.last_stats = CommStats(
            backward_s=now - self._first_grad_at,
            # Launched when backward ended (overlap off): launching is part of the all-reduce.
            allreduce_s=now - min(self._first_launch_at, autograd_done) if launched else 0.0,
            exposed_s=now - autograd_done,
            buckets=len(launched),
            bytes=sum(b.buffer.numel() * b.buffer.element_size() for b in launched),
        )

    @property
    def last_comm_wait_s(self) -> float:
        """Seconds the last backward waited for all-reduces after autograd finished (the same as
        `last_stats.exposed_s`)."""
        return self.last_stats.exposed_s

    def _expose_used_elsewhere(self) -> None:
        """Give the parameters this rank left unused but another rank used their averaged
        gradient (every parameter this rank used has its bucket view as .grad already)."""
        used_by = torch.cat([bucket.flags for bucket in self._buckets]).tolist()
        position = 0
        for bucket in self._buckets:
            for param, view in zip(bucket.params, bucket.views, strict=True):
                if used_by[position] != 0 and not _is_view(param.grad, view):
                    param.grad = view
                position += 1

    def _drop_gradients(self) -> None:
        for bucket in self._buckets:
            for param in bucket.params:
                param.grad = None

    # --- state ----------------------------------------------------------------------------------

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped module's state dict (no "module." prefix)."""
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Loads a plain module's state dict into the wrapped module."""
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    def close(self) -> None:
        """Remove the gradient hooks and release the ring's buffers.

        A synchronised backward that raised before its end (in autograd or a hook) may have
        launched all-reduces that nobody waited for: close() waits for them first, within the
        timeout (the group's when None), so that none writes into a bucket (a `.grad`) or runs on
        the ring once close() has returned, and sets every `.grad` to None (never averaged), as
        the next forward would have. Their errors, or a wait that runs out, are logged: close()
        raises nothing for a backward that already raised."""
        if self._unfinished_backward_left():
            error = self._forget_unfinished_backward()
            if error is not None:
                logger.warning(
                    "DataParallel.close(): an all-reduce launched by the last synchronised "
                    "backward, which raised before its end, failed: %s",
                    error,
                )
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        _open_wrappers.discard(self)
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    @property
    def buckets_in_shared_memory(self) -> bool:
        """Whether every bucket lives in fastpar's shared memory (its all-reduce copies
        nothing in or out)."""
        in_area = getattr(self._ring, "in_shared_area", None)
        return in_area is not None and all(in_area(bucket.buffer) for bucket in self._buckets)

    @property
    def bucket_sizes(self) -> list[int]:
        """Number of gradient elements per bucket, in launch order."""
        return [bucket.numel for bucket in self._buckets]


def _check_not_wrapped(module: nn.Module) -> None:
    """Refuse parameters whose gradients an open DataParallel averages already: both hooks
    would scale and all-reduce them, each gradient ending divided by the world size twice."""
    for name, param in module.named_parameters():
        if any(id(param) in wrapper._param_index for wrapper in _open_wrappers):
            raise ValueError(
                f"parameter {name!r} belongs to another DataParallel that was not closed; call "
                f"its close() before wrapping the module again (e.g. after unfreezing layers)"
            )


def _under_module_prefix(
    wrapper: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    """A parent module's `load_state_dict` looks for the wrapped module's entries under
    prefix + "module.", where `state_dict()` writes them without it (the plain module's names)."""
    for key in [key for key in state_dict if key.startswith(prefix)]:
        state_dict[prefix + "module." + key[len(prefix) :]] = state_dict.pop(key)


def has_spare_core(local_ranks: int, threads: int, cores: int | None) -> bool:
    """Whether a host of `cores` cores (None: unknown) has one left for communication once
    `local_ranks` ranks run `threads` compute threads each."""
    return cores is not None and cores > local_ranks * threads


def _is_view(grad: torch.Tensor | None, view: torch.Tensor) -> bool:
    """Whether `grad` is the bucket view `view` (the same memory, shape and strides)."""
    return (
        grad is not None
        and grad.layout == torch.strided  # a sparse one has no data pointer
        and grad.data_ptr() == view.data_ptr()
        and grad.stride() == view.stride()
    )


@torch.no_grad()
def _scale_into(view: torch.Tensor, grad: torch.Tensor, scale: float) -> None:
    """view = grad * scale, in the one pass that copies the gradient into its bucket."""
    if grad.layout != torch.strided:  # Embedding(sparse=True): buckets are dense
        grad = grad.to_dense()
    if scale == 1.0:
        view.copy_(grad)
    else:
        torch.mul(grad, scale, out=view)


class _Finished:
    """The work of an all-reduce that ran synchronously."""

    def wait(self) -> bool:
        return True


_FINISHED = _Finished()
