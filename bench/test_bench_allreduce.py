"""All-reduce of one float32 tensor, fastpar's ring next to torch.distributed (gloo here; ranks
sharing one GPU use gloo on the CUDA tensors too). Rank 0 is the pytest process; the other ranks
are spawned once per world size and run the calls rank 0 announces, so pytest-benchmark times
rank 0's calls as it would any function. Every size is first checked: exact sums of
integer-valued inputs, bitwise equal on every rank."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from allreduce import JOB_CHECK, JOB_RING, JOB_STOP, JOB_TORCH, _device_for, run_job, serve_peer
from conftest import bench_scale
from shapes import ALLREDUCE

from fastpar.comm import RingAllReduce

ROUNDS, WARMUP = 20, 2


@dataclass
class Group:
    world: int
    ring: RingAllReduce
    device: torch.device

    def job(self, kind: int, nbytes: int, calls: int) -> object:
        """Announce a job to the peers and run rank 0's part of it."""
        job = torch.tensor([kind, nbytes, calls], dtype=torch.int64)
        dist.broadcast(job, 0)
        if kind in (JOB_CHECK, JOB_STOP):
            return None if kind == JOB_STOP else run_job(job.tolist(), 0, self.world, self.ring,
                                                         self.device)  # fmt: skip
        return None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    plan = ALLREDUCE[bench_scale(metafunc.config)]
    if "group" in metafunc.fixturenames:
        metafunc.parametrize("group", plan.ranks, indirect=True, ids=lambda n: f"{n}ranks",
                             scope="module")  # fmt: skip
    if "nbytes" in metafunc.fixturenames:
        metafunc.parametrize("nbytes", plan.sizes)


@pytest.fixture(scope="module")
def group(request: pytest.FixtureRequest, device: torch.device) -> Iterator[Group]:
    world = request.param
    timeout = timedelta(seconds=120)
    store = dist.TCPStore(
        "127.0.0.1", 0, world, is_master=True, timeout=timeout, wait_for_workers=False
    )
    context = mp.get_context("spawn")
    peers = [context.Process(target=serve_peer, args=(rank, world, store.port, device.type))
             for rank in range(1, world)]  # fmt: skip
    for peer in peers:
        peer.start()
    try:
        dist.init_process_group("gloo", store=store, rank=0, world_size=world, timeout=timeout)
        ring_device = _device_for(0, device.type)
        with RingAllReduce(device=ring_device, timeout=120, serve_shared_gpu=True) as ring:
            group = Group(world, ring, ring_device)
            yield group
            group.job(JOB_STOP, 0, 0)
        dist.destroy_process_group()
    finally:
        for peer in peers:
            peer.join(timeout=30)
            if peer.is_alive():
                peer.kill()
    assert all(peer.exitcode == 0 for peer in peers), [p.exitcode for p in peers]


@pytest.mark.parametrize("impl", ["fastpar_ring", "torch"])
def test_allreduce(benchmark, group: Group, nbytes: int, impl: str) -> None:
    exact, equal = group.job(JOB_CHECK, nbytes, 1)
    assert exact and equal, f"{nbytes} bytes: exact sum {exact}, ranks bitwise equal {equal}"
    calls = 1 if benchmark.disabled else ROUNDS + WARMUP
    kind = JOB_RING if impl == "fastpar_ring" else JOB_TORCH
    tensor = torch.randn(nbytes // 4, device=group.device)
    collective = group.ring.all_reduce if kind == JOB_RING else dist.all_reduce

    def call() -> None:
        collective(tensor)
        if group.device.type == "cuda":
            torch.cuda.synchronize(group.device)

    dist.broadcast(torch.tensor([kind, nbytes, calls], dtype=torch.int64), 0)
    benchmark.group = f"allreduce {group.world} ranks {nbytes} B"
    benchmark.extra_info.update(ranks=group.world, bytes=nbytes)
    benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
