"""Which host each rank of a group runs on, and the all-reduce path that layout calls for.

A host is what `host_identity()` says: two ranks are on one host when they can share memory
(POSIX shared memory on CPU, CUDA IPC on GPU). For tests and for simulating several hosts on one
machine, the environment variable FASTPAR_HOST_ID replaces the identity of a process (ranks
with different values count as different hosts; never set it to merge real hosts). A second
way to simulate hosts needs no variable: start each simulated host's ranks in their own IPC
namespace (`unshare --ipc torchrun ...`), which changes the real identity.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import torch.distributed as dist

from fastpar.comm.exchange import exchange

HOST_ENV = "FASTPAR_HOST_ID"

Path = Literal["ring", "hierarchical", "torch"]


def shared_memory_identity() -> str:
    """Equal on two processes when they can share a POSIX shared-memory segment (hostname, boot
    id, IPC namespace)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        ipc = os.readlink("/proc/self/ns/ipc")
    except OSError:
        boot, ipc = "", ""
    return f"{socket.gethostname()}|{boot}|{ipc}"


def host_identity() -> str:
    """This process's host: FASTPAR_HOST_ID when set, else `shared_memory_identity()`. The ring,
    the hierarchical all-reduce and the pipeline's links all ask this one function."""
    override = os.environ.get(HOST_ENV, "")
    return f"{HOST_ENV}={override}" if override else shared_memory_identity()


@dataclass(frozen=True)
class HostLayout:
    """The hosts of a group's ranks.

    Attributes:
        hosts: the group ranks on each host, ascending; hosts ordered by their lowest rank.
        rank: this process's group rank.
    """

    hosts: tuple[tuple[int, ...], ...]
    rank: int

    @classmethod
    def from_identities(cls, identities: list[str], rank: int) -> HostLayout:
        """The layout of ranks whose host identities are `identities` (by group rank)."""
        by_host: dict[str, list[int]] = {}
        for r, identity in enumerate(identities):
            by_host.setdefault(identity, []).append(r)
        return cls(hosts=tuple(tuple(ranks) for ranks in by_host.values()), rank=rank)

    @property
    def world_size(self) -> int:
        return sum(len(ranks) for ranks in self.hosts)

    @property
    def host(self) -> int:
        """The index of this rank's host."""
        return next(h for h, ranks in enumerate(self.hosts) if self.rank in ranks)

    @property
    def local_rank(self) -> int:
        """This rank's position among its host's ranks."""
        return self.hosts[self.host].index(self.rank)

    def describe(self) -> str:
        """e.g. "4 ranks on 2 hosts ([0, 1], [2, 3])"."""
        listed = ", ".join(str(list(ranks)) for ranks in self.hosts)
        hosts = "1 host" if len(self.hosts) == 1 else f"{len(self.hosts)} hosts"
        return f"{self.world_size} ranks on {hosts} ({listed})"

    def path(self) -> tuple[Path, str]:
        """The all-reduce this layout calls for, and why (said once in the log).

        "ring": every rank on one host (shared memory or CUDA IPC); "hierarchical": several
        hosts holding the same number (>= 2) of ranks each; "torch": anything else.
        """
        sizes = [len(ranks) for ranks in self.hosts]
        if len(sizes) == 1:
            return "ring", f"{self.describe()}: they share memory"
        if len(set(sizes)) > 1:
            return "torch", (
                f"{self.describe()}: the hierarchical all-reduce needs the same number of ranks "
                f"on every host, these hold {', '.join(map(str, sizes))}"
            )
        if sizes[0] == 1:
            return "torch", (
                f"{self.describe()}: each host holds one rank, so nothing is shared inside a host"
            )
        return "hierarchical", (
            f"{self.describe()}: shared memory inside each host, torch.distributed between hosts"
        )


def gather_host_layout(
    group: dist.ProcessGroup,
    timeout: timedelta,
    *,
    during: str = "creating fastpar's all-reduce (fastpar.comm.create_all_reduce)",
) -> HostLayout:
    """Every rank's host, through the default store (collective over `group`, bounded by
    `timeout`; CommTimeoutError naming the ranks that did not answer and, from `during`, what
    this rank was creating). A rank that missed a gathering the others gave up on joins their
    next one."""
    store = dist.distributed_c10d._get_default_store()
    identities = exchange(store, "hosts", group, host_identity().encode(), timeout,
                          "say which host it runs on", during=during)  # fmt: skip
    return HostLayout.from_identities([i.decode() for i in identities], dist.get_rank(group))
