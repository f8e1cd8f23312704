"""DataParallel with its buckets in the ring's shared memory (one host) or each host's (simulated
hosts, the hierarchical all-reduce): the same bits as ordinary buckets, DDP's results, and
ordinary buckets (same numbers, the reason logged) where /dev/shm is full."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fastpar.comm.shared_area as shared_area
from fastpar.parallel import DataParallel
from fastpar.testing.distributed import run_multiprocess
from tests.comm.test_hierarchical import simulate_hosts
from tests.parallel.test_data_parallel import _batch, _loss, _new_model

STEPS = 10


def _wide_model() -> nn.Module:
    """4.4 MB of parameters: a bucket of 16 ring chunks, reduced in place in shared memory
    (smaller calls copy)."""
    return nn.Sequential(nn.Linear(64, 1024), nn.Tanh(), nn.Linear(1024, 1024), nn.Tanh(),
                         nn.Linear(1024, 8))  # fmt: skip


def _wide_loss(model: nn.Module, rank: int, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    inputs = torch.randn(4, 64, generator=generator)
    targets = torch.randint(0, 8, (4,), generator=generator)
    return nn.functional.cross_entropy(model(inputs), targets)


def _train(rank: int, kind: str, set_to_none: bool, **options: object) -> tuple[list, bool]:
    """10 SGD steps (momentum) of a DataParallel (or DDP when options is empty): the final
    parameters, and whether the buckets were in shared memory."""
    torch.manual_seed(rank)  # different on purpose: the wrappers broadcast from rank 0
    model = _wide_model() if kind == "wide" else _new_model(kind)
    if options:
        wrapped = DataParallel(model, **options)
    else:
        wrapped = DistributedDataParallel(model, find_unused_parameters=kind == "branchy")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=set_to_none)
        if kind == "wide":
            loss = _wide_loss(wrapped, rank, step)
        else:
            inputs, targets = _batch(kind, rank, step)
            loss = _loss(wrapped, kind, inputs, targets, rank, step)
        loss.backward()
        optimizer.step()
    shared = isinstance(wrapped, DataParallel) and wrapped.buckets_in_shared_memory
    if isinstance(wrapped, DataParallel):
        wrapped.close()
    return [p.detach().clone() for p in model.parameters()], shared


ONE_HOST_CASES = [
    ("wide", True, 25.0),  # a bucket reduced in place
    ("wide", False, 25.0),  # gradients accumulated in place in it
    ("lm", True, 25.0),
    ("lm", False, 0.004),  # several buckets; gradients accumulate in place in the buckets
    ("branchy", True, 0.001),  # unused parameters
]


def _against_ordinary_and_ddp(
    rank: int, world_size: int, cases: list = ONE_HOST_CASES, hosts: list[int] | None = None
) -> list[str]:
    if hosts is not None:
        simulate_hosts(rank, hosts)
    failures = []
    for kind, set_to_none, bucket_mb in cases:
        sizes = {"bucket_cap_mb": bucket_mb, "first_bucket_mb": bucket_mb / 2}
        shared, in_shm = _train(rank, kind, set_to_none, comm="ring", shared_buckets=True, **sizes)
        ordinary, not_in_shm = _train(
            rank, kind, set_to_none, comm="ring", shared_buckets=False, **sizes
        )
        reference, _ = _train(rank, kind, set_to_none)
        where = f"{kind} set_to_none={set_to_none} buckets {bucket_mb} MiB"
        if not in_shm or not_in_shm:
            failures.append(f"{where}: buckets in shared memory {in_shm} / {not_in_shm}")
        for index, (a, b, c) in enumerate(zip(shared, ordinary, reference, strict=True)):
            if not torch.equal(a, b):
                failures.append(f"{where}: parameter {index} differs from ordinary buckets")
            if not torch.allclose(a, c, rtol=1e-5, atol=1e-6):
                failures.append(f"{where}: parameter {index} differs from DDP")
    return failures


@pytest.mark.parametrize("world_size", [2, 3])
def test_shared_buckets_equal_ordinary_ones_bitwise_and_ddp(world_size: int) -> None:
    failures = run_multiprocess(_against_ordinary_and_ddp, world_size, timeout=240)
    assert failures == [[]] * world_size


def test_shared_buckets_on_two_hosts_equal_ordinary_ones_bitwise_and_ddp() -> None:
    """2 simulated hosts x 2 ranks: the buckets live in each host's areas and the hierarchical
    all-reduce reads the host's peers in place (large buckets) or takes its one-barrier path
    (small ones)."""
    cases = [("wide", False, 25.0), ("lm", True, 0.004)]
    failures = run_multiprocess(_against_ordinary_and_ddp, 4, args=(cases, [0, 0, 1, 1]),
                                timeout=240)  # fmt: skip
    assert failures == [[]] * 4


def _small_dev_shm(rank: int, world_size: int) -> tuple[bool, list[str]]:
    if rank == 1:
        shared_area._free_bytes = lambda directory: 4096  # one page free on this rank
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("fastpar").addHandler(handler)
    logging.getLogger("fastpar").setLevel(logging.INFO)
    params, shared = _train(rank, "lm", True, comm="auto", shared_buckets=True)
    reference, _ = _train(rank, "lm", True, comm="auto")
    assert all(torch.equal(a, b) for a, b in zip(params, reference, strict=True))
    return shared, [m for m in messages if "ordinary memory" in m]


def test_a_full_dev_shm_falls_back_to_ordinary_buckets_saying_why() -> None:
    results = run_multiprocess(_small_dev_shm, 2, timeout=120)
    assert [shared for shared, _ in results] == [False, False]
    logged = results[0][1]
    assert len(logged) == 1, logged  # once, on rank 0
    assert "rank 1 could not allocate shared memory" in logged[0]
    assert "0.0 MiB free" in logged[0], logged[0]
