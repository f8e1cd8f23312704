"""`DataParallel`, the module: construction (options, the agreement on the initial state, the
buckets, the gradient hooks), forward, `no_sync()`, the state dict and `close()`. What a
backward does is `BackwardSync`'s (backward.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch import nn

from fastpar._checks import check_member, check_timeout
from fastpar._logging import get_logger
from fastpar.comm.errors import CommClosedError
from fastpar.parallel.data_parallel.backward import BackwardSync, check_not_hooked
from fastpar.parallel.data_parallel.buckets import build_buckets
from fastpar.parallel.data_parallel.config import (
    CommChoice,
    CommStats,
    DataParallelConfig,
    OverlapChoice,
    decide_overlap,
)
from fastpar.parallel.data_parallel.initial_state import broadcast_state, check_same_state
from fastpar.parallel.data_parallel.loading import (
    InPlaceLoads,
    refuse_assign,
    under_module_prefix,
    without_assign_marks,
)
from fastpar.profiling import record_range

__all__ = ["DataParallel"]

logger = get_logger(__name__)


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
    `load_state_dict(..., assign=True)` is refused (the buckets and hooks hold the Parameter
    objects, which assign would replace); load in place (the default). A parent module's load
    with assign=True assigns what is outside the wrapper and loads the wrapped module in place,
    with a warning (see `InPlaceLoads`). After `close()` both load as torch's.
    `close()` removes the gradient hooks; until then its parameters cannot be wrapped again
    (e.g. to average layers unfrozen since: a wrapper averages the parameters that required
    gradients when it was built). A closed DataParallel refuses to run (`CommClosedError`):
    its gradients would no longer be averaged.
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
        check_not_hooked(module)
        # Checked under the name the caller used (the config's field is timeout_s).
        timeout_s = None if timeout is None else check_timeout("timeout", timeout).total_seconds()
        self.config = DataParallelConfig(
            comm=comm,
            bucket_cap_mb=bucket_cap_mb,
            first_bucket_mb=first_bucket_mb,
            timeout_s=timeout_s,
            overlap=overlap,
            shared_buckets=shared_buckets,
        )
        self.module = module
        self._closed = False
        self.register_load_state_dict_pre_hook(under_module_prefix)
        self.group = group if group is not None else dist.group.WORLD
        check_member(self.group)
        self.world_size = dist.get_world_size(self.group)

        check_same_state(module, self.group, timeout_s)
        broadcast_state(module, self.group, timeout_s)
        params = [p for p in module.parameters() if p.requires_grad]
        self._buckets, self._ring = build_buckets(params, self.config, self.group)
        try:
            first_device = self._buckets[0].buffer.device if self._buckets else None
            overlaps = decide_overlap(self.config.overlap, first_device, self.world_size)
            self._sync = BackwardSync(
                params,
                self._buckets,
                world_size=self.world_size,
                overlaps_backward=overlaps,
                timeout_s=timeout_s,
                group=self.group,
            )
            self._sync.register_hooks()
        except BaseException:
            # No close() will come for a wrapper that was never built: release what it holds.
            self._buckets = []
            self._close_ring()
            raise
        self._in_place_loads = InPlaceLoads(module)

    # --- the training step ----------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._closed:
            raise CommClosedError(
                "this DataParallel was closed (close()): it no longer averages gradients; "
                "wrap the module in a new DataParallel to train it in parallel again"
            )
        self._sync.check_usable()
        if self._sync.unfinished_backward_left():
            self._sync.abandon_unfinished_backward()
        with record_range("fastpar.dp.forward"):
            return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally, without communication, inside this context.

        What counts is where the backward runs (DDP decides at the forward): a backward outside
        the context synchronises, whatever the forward ran under. Either way the next
        synchronised backward averages everything accumulated since the last one."""
        previous = self._sync.sync_enabled
        self._sync.sync_enabled = False
        try:
            yield
        finally:
            self._sync.sync_enabled = previous

    @property
    def overlaps_backward(self) -> bool:
        """Whether buckets are all-reduced during backward (`DataParallelConfig.overlap`)."""
        return self._sync.overlaps_backward

    @property
    def last_stats(self) -> CommStats:
        """The last synchronised backward's communication."""
        return self._sync.last_stats

    @property
    def last_backward_events(self) -> list[tuple[Any, ...]]:
        """What happened in the last backward, in order: ("grad", param index) as hooks fire,
        ("launch", bucket index) as all-reduces start, ("end",) when backward finished."""
        return self._sync.last_backward_events

    @property
    def last_comm_wait_s(self) -> float:
        """Seconds the last backward waited for all-reduces after autograd finished (the same as
        `last_stats.exposed_s`)."""
        return self.last_stats.exposed_s

    # --- state ----------------------------------------------------------------------------------

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped module's state dict (no "module." prefix)."""
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Loads a plain module's state dict into the wrapped module, in place (`assign=True`
        is refused until `close()`: see `refuse_assign`)."""
        if assign and not self._closed:
            refuse_assign()
        return self.module.load_state_dict(
            without_assign_marks(state_dict), strict=strict, assign=assign
        )

    def close(self) -> None:
        """Remove the gradient hooks and release the ring's buffers.

        A synchronised backward that raised before its end (in autograd or a hook) may have
        launched all-reduces that nobody waited for: close() waits for them first, within the
        timeout (the group's when None), so that none writes into a bucket (a `.grad`) or runs on
        the ring once close() has returned, and sets every `.grad` to None (never averaged), as
        the next forward would have. Their errors, or a wait that runs out, are logged: close()
        raises nothing for a backward that already raised. Closing again does nothing."""
        if self._closed:
            return
        try:
            if self._sync.unfinished_backward_left():
                error = self._sync.forget_unfinished_backward()
                if error is not None:
                    logger.warning(
                        "DataParallel.close(): an all-reduce launched by the last synchronised "
                        "backward, which raised before its end, failed: %s",
                        error,
                    )
        finally:  # a close() cut short (Ctrl-C while it waits) still unhooks the parameters
            self._closed = True
            self._sync.remove_hooks()
            self._in_place_loads.remove()
            self._close_ring()

    def _close_ring(self) -> None:
        """Release fastpar's all-reduce of the buckets (its shared memory too), once."""
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
