"""`DataParallel`: replicas of one module on the ranks of a group, with gradients averaged by
bucketed all-reduces that overlap the rest of the backward pass. Shaped like PyTorch's
`DistributedDataParallel`.

How a step flows:
1. Construction checks that every rank holds the same parameter set (names, shapes, dtypes)
   and broadcasts parameters and buffers from the group's first rank.
2. Parameters are cut into buckets in reverse registration order (backward produces gradients
   roughly in that order), the first bucket small so communication starts early.
3. During backward, a post-accumulate-grad hook copies each gradient into its bucket's flat
   buffer; when the last gradient of a bucket arrives, that bucket's all-reduce is launched
   asynchronously (fastpar's ring on CPU, torch.distributed otherwise: NCCL runs on its own
   CUDA stream, gloo and the ring on their own threads) while autograd keeps computing.
4. A callback queued on the autograd engine runs when backward finishes: it launches the
   buckets that still miss gradients (see "unused parameters"), waits for every bucket, and
   writes the averaged gradients back into `param.grad`. `backward()` returns after that.

Unused parameters: a parameter that gets no gradient in an iteration never blocks the job.
Each bucket carries one extra element per parameter, 1 where this rank produced the gradient,
summed by the same all-reduce. A parameter used by some rank gets the sum of the gradients of
the ranks that used it divided by the world size (a rank that did not use it contributes
zeros), exactly as DDP with `find_unused_parameters=True`. A parameter no rank used keeps its
`.grad` as it was (None after `zero_grad()`), so optimizers skip it, again as DDP does.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from fastpar._logging import get_logger, log_once
from fastpar.profiling import record_range

logger = get_logger(__name__)

CommChoice = Literal["auto", "ring", "torch"]
_MB = 2**20


@dataclass(kw_only=True, frozen=True)
class DataParallelConfig:
    """Options of `DataParallel`."""

    comm: CommChoice = "auto"
    """"ring": fastpar's ring (raises where it cannot serve a bucket); "torch":
    torch.distributed (NCCL on GPU, gloo on CPU); "auto": the ring where it applies, else torch,
    the reason logged once."""
    bucket_cap_mb: float = 25.0
    """Size of a gradient bucket in MiB; larger buckets mean fewer, longer all-reduces."""
    first_bucket_mb: float = 1.0
    """Size of the first bucket (the last layers' gradients), small so communication starts
    as early as possible in backward."""

    def __post_init__(self) -> None:
        if self.comm not in ("auto", "ring", "torch"):
            raise ValueError(f"comm must be 'auto', 'ring' or 'torch', got {self.comm!r}")
        for name in ("bucket_cap_mb", "first_bucket_mb"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")


@dataclass(eq=False)
class _Bucket:
    index: int
    params: list[nn.Parameter]
    offsets: list[int]  # start of each parameter's gradient in `buffer`
    buffer: torch.Tensor  # gradients, then one "used" flag per parameter
    comm: Any  # an all_reduce callable: (tensor, async_op=True) -> work
    pending: int = 0
    ready: list[bool] = field(default_factory=list)
    work: Any = None

    @property
    def numel(self) -> int:
        return self.offsets[-1] + self.params[-1].numel() if self.params else 0


def _parameter_signature(module: nn.Module) -> list[tuple[str, tuple[int, ...], str, bool]]:
    return [
        (name, tuple(p.shape), str(p.dtype), p.requires_grad)
        for name, p in module.named_parameters()
    ]


def _first_difference(
    mine: list[tuple[str, tuple[int, ...], str, bool]],
    reference: list[tuple[str, tuple[int, ...], str, bool]],
) -> str | None:
    for index, (a, b) in enumerate(zip(mine, reference, strict=False)):
        if a != b:
            return f"parameter #{index} is {a} here but {b} on the group's first rank"
    if len(mine) != len(reference):
        return f"{len(mine)} parameters here but {len(reference)} on the group's first rank"
    return None


class DataParallel(nn.Module):
    """Data-parallel replicas of `module` with gradients averaged across `group`.

    Arguments:
        module: the model; the same architecture on every rank. Its parameters and buffers are
            overwritten with the group's first rank's values at construction.
        group: the process group of the replicas (None: the default group).
        comm: "auto", "ring" or "torch" (see `DataParallelConfig`).
        bucket_cap_mb: gradient bucket size in MiB.
        first_bucket_mb: size of the first bucket in MiB.

    `forward` calls `module`; `backward()` on its result returns once gradients are averaged.
    `no_sync()` skips communication while gradients accumulate (the next synchronised backward
    averages the accumulated sum). `state_dict()`/`load_state_dict()` are the plain module's,
    with no "module." prefix.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        group: dist.ProcessGroup | None = None,
        comm: CommChoice = "auto",
        bucket_cap_mb: float = 25.0,
        first_bucket_mb: float = 1.0,
    ) -> None:
        super().__init__()
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "DataParallel needs torch.distributed to be initialised "
                "(call torch.distributed.init_process_group first)"
            )
        self.config = DataParallelConfig(
            comm=comm, bucket_cap_mb=bucket_cap_mb, first_bucket_mb=first_bucket_mb
        )
        self.module = module
        self.group = group if group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(self.group)
        self._src = dist.get_global_rank(self.group, 0)
        self._sync_enabled = True
        self._lock = threading.Lock()
        self._callback_queued = False
        self._next_bucket = 0  # the next bucket to launch in this backward
        self._ring: Any = None
        # What happened in the last backward, in order: ("grad", param index) as hooks fire,
        # ("launch", bucket index) as all-reduces start, ("end",) when backward finished.
        self.last_backward_events: list[tuple[Any, ...]] = []
        # Seconds the last backward spent after autograd finished, waiting for all-reduces:
        # backward time minus this is this rank's own compute (what throughput slicing needs).
        self.last_comm_wait_s = 0.0

        self._check_same_parameters()
        self._broadcast_state()
        self._buckets = self._build_buckets()
        self._hooks = [
            param.register_post_accumulate_grad_hook(self._make_hook(bucket, slot, position))
            for bucket in self._buckets
            for slot, param in enumerate(bucket.params)
            for position in [self._param_index[id(param)]]
        ]

    # --- construction ---------------------------------------------------------------------------

    def _check_same_parameters(self) -> None:
        signatures: list[Any] = [None] * self.world_size
        dist.all_gather_object(signatures, _parameter_signature(self.module), group=self.group)
        for rank, signature in enumerate(signatures):
            difference = _first_difference(signature, signatures[0])
            if difference is not None:
                raise ValueError(
                    f"DataParallel needs the same parameters on every rank; on group rank "
                    f"{rank}, {difference}"
                )

    @torch.no_grad()
    def _broadcast_state(self) -> None:
        tensors = [p.data for p in self.module.parameters()] + list(self.module.buffers())
        for tensor in tensors:
            dist.broadcast(tensor, src=self._src, group=self.group)

    def _comm_for(self, buffer: torch.Tensor) -> Any:
        choice = self.config.comm
        if choice != "torch":
            if self._ring is None:
                from fastpar.comm import RingAllReduce

                self._ring = RingAllReduce(self.group, device=buffer.device)
            if self._ring.should_use(buffer):
                ring = self._ring
                return lambda tensor: ring.all_reduce(tensor, async_op=True)
            reason = f"fastpar's ring does not serve {buffer.dtype} buckets on {buffer.device}"
            if choice == "ring":
                raise ValueError(f"comm='ring' was requested but {reason}; use comm='auto'")
            log_once(logger, f"DataParallel uses torch.distributed: {reason}")
        group = self.group
        return lambda tensor: dist.all_reduce(tensor, group=group, async_op=True)

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
        offsets, total = [], 0
        for param in params:
            offsets.append(total)
            total += param.numel()
        buffer = torch.zeros(total + len(params), dtype=params[0].dtype, device=params[0].device)
        return _Bucket(
            index=index,
            params=params,
            offsets=offsets,
            buffer=buffer,
            comm=self._comm_for(buffer),
            pending=len(params),
            ready=[False] * len(params),
        )

    # --- the training step ----------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with record_range("fastpar.dp.forward"):
            return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally, without communication, inside this context."""
        previous = self._sync_enabled
        self._sync_enabled = False
        try:
            yield
        finally:
            self._sync_enabled = previous

    def _make_hook(self, bucket: _Bucket, slot: int, position: int) -> Any:
        def hook(param: torch.Tensor) -> None:
            if not self._sync_enabled:
                return
            self._start_backward_if_needed()
            self._copy_grad(bucket, slot, param)
            with self._lock:
                self.last_backward_events.append(("grad", position))
                if bucket.ready[slot]:
                    return  # AccumulateGrad runs once per leaf and backward; never twice
                bucket.ready[slot] = True
                bucket.pending -= 1
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
            self._callback_queued = True
            self.last_backward_events = []
        torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)

    @staticmethod
    def _copy_grad(bucket: _Bucket, slot: int, param: torch.Tensor) -> None:
        start, count = bucket.offsets[slot], param.numel()
        grad = param.grad
        assert grad is not None  # post-accumulate hooks fire after .grad is set
        bucket.buffer[start : start + count].copy_(grad.reshape(-1))
        bucket.buffer[bucket.numel + slot] = 1

    def _launch(self, bucket: _Bucket) -> None:
        self.last_backward_events.append(("launch", bucket.index))
        with record_range(f"fastpar.dp.allreduce.bucket{bucket.index}"):
            bucket.work = bucket.comm(bucket.buffer)

    def _finish_backward(self) -> None:
        started = time.perf_counter()
        with record_range("fastpar.dp.wait"):
            try:
                with self._lock:
                    for bucket in self._buckets[self._next_bucket :]:
                        # Parameters that got no gradient on this rank contribute zeros.
                        for slot, ready in enumerate(bucket.ready):
                            if not ready:
                                start = bucket.offsets[slot]
                                count = bucket.params[slot].numel()
                                bucket.buffer[start : start + count].zero_()
                                bucket.buffer[bucket.numel + slot] = 0
                                bucket.ready[slot] = True
                        bucket.pending = 0
                    self._launch_ready_buckets()
                for bucket in self._buckets:
                    bucket.work.wait()
                    self._write_back(bucket)
            finally:
                with self._lock:
                    self.last_backward_events.append(("end",))
                    self._callback_queued = False
                    self._next_bucket = 0
                self.last_comm_wait_s = time.perf_counter() - started
                for bucket in self._buckets:
                    bucket.work = None
                    bucket.pending = len(bucket.params)
                    bucket.ready = [False] * len(bucket.params)

    @torch.no_grad()
    def _write_back(self, bucket: _Bucket) -> None:
        used_by = bucket.buffer[bucket.numel :].tolist()
        scale = 1.0 / self.world_size
        for slot, param in enumerate(bucket.params):
            if used_by[slot] == 0:
                continue  # no rank produced this gradient: leave .grad as it was
            start, count = bucket.offsets[slot], param.numel()
            averaged = bucket.buffer[start : start + count].view_as(param).mul_(scale)
            if param.grad is None:
                param.grad = averaged.clone()
            else:
                param.grad.copy_(averaged)

    # --- state ----------------------------------------------------------------------------------

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped module's state dict (no "module." prefix)."""
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Loads a plain module's state dict into the wrapped module."""
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    def close(self) -> None:
        """Remove the gradient hooks and release the ring's buffers."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    @property
    def bucket_sizes(self) -> list[int]:
        """Number of gradient elements per bucket, in launch order."""
        return [bucket.numel for bucket in self._buckets]
