"""`DataParallel`'s options (`DataParallelConfig`), what one backward's communication cost
(`CommStats`), and how overlap="auto" decides."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Literal, get_args

import torch
import torch.distributed as dist

from fastpar._checks import check_bool, check_choice, check_positive, check_timeout_s
from fastpar._logging import get_logger, log_once
from fastpar._machine import usable_cores

__all__ = [
    "CommChoice",
    "CommStats",
    "DataParallelConfig",
    "OverlapChoice",
    "decide_overlap",
    "has_spare_core",
    "local_world_size",
]

logger = get_logger(__name__)

CommChoice = Literal["auto", "ring", "torch"]
OverlapChoice = Literal["auto", "on", "off"]


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
            check_timeout_s("timeout_s", self.timeout_s)


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


def has_spare_core(local_ranks: int, threads: int, cores: int | None) -> bool:
    """Whether a host of `cores` cores (None: unknown) has one left for communication once
    `local_ranks` ranks run `threads` compute threads each."""
    return cores is not None and cores > local_ranks * threads


def local_world_size(default: int) -> int:
    """The ranks on this host as LOCAL_WORLD_SIZE says (torchrun sets it), else `default`.

    Raises:
        ValueError: LOCAL_WORLD_SIZE is set but is not an integer >= 1 (the message names it).
    """
    value = os.environ.get("LOCAL_WORLD_SIZE")
    if value is None:
        return default
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(
            "the environment variable LOCAL_WORLD_SIZE must be an integer >= 1 (the ranks on "
            f"this host), got {value!r}"
        )
    return count


def decide_overlap(choice: OverlapChoice, device: torch.device | None, world_size: int) -> bool:
    """Whether buckets are all-reduced during backward (see `DataParallelConfig.overlap`).

    Arguments:
        choice: the configured overlap.
        device: the first bucket's device (None: no bucket).
        world_size: the group's size, the ranks on this host unless LOCAL_WORLD_SIZE says.
    """
    if choice != "auto":
        return choice == "on"
    if device is None or device.type != "cpu":
        return True
    local_ranks = local_world_size(world_size)
    cores = usable_cores()
    spare = has_spare_core(local_ranks, torch.get_num_threads(), cores)
    if dist.get_rank() == 0:
        log_once(
            logger,
            f"DataParallel all-reduces CPU buckets {'during' if spare else 'after'} backward: "
            f"{local_ranks} ranks x {torch.get_num_threads()} threads on {cores} cores",
        )
    return spare
