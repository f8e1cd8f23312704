"""What both transports between processes (ShmLink, TorchLink) deliver for tensors whose values
are not their memory: a lazy conjugate (`x.conj()`, `x.mH`) or negation (`x.conj().imag`),
as an activation and as an input gradient, small (inline) and larger than a slot (split); and
the extra groups a GPU pipeline creates wait as long as the pipeline."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from fastpar.comm.timeouts import group_timeout
from fastpar.parallel.pipeline.executor import _link_groups
from fastpar.parallel.pipeline.shm_link import connect_shm_links
from fastpar.parallel.pipeline.torch_link import TorchLink
from fastpar.parallel.pipeline.wire import Peer, resolved
from fastpar.testing.distributed import run_multiprocess


def _lazy(seed: int) -> dict[str, torch.Tensor]:
    """Tensors with a conjugate or negative bit, small and several slots large."""
    generator = torch.Generator().manual_seed(seed)
    small = torch.randn(4, 3, dtype=torch.complex64, generator=generator)
    big = torch.randn(3000, dtype=torch.complex128, generator=generator)  # > 4096-byte slots
    return {"conj": small.conj(), "mH": small.mH, "imag of conj": small.conj().imag,
            "big conj": big.conj()}  # fmt: skip


def _input_grad_leaf(seed: int) -> torch.Tensor:
    """A stage input whose gradient autograd leaves as a lazy conjugate."""
    generator = torch.Generator().manual_seed(seed)
    leaf = torch.randn(5, dtype=torch.complex64, generator=generator).requires_grad_(True)
    (leaf.conj() * torch.randn(5, dtype=torch.complex64, generator=generator)).real.sum().backward()
    assert leaf.grad is not None and leaf.grad.is_conj()
    return leaf


def _exchange(rank: int, world_size: int, seed: int) -> dict[str, Any]:
    me, peer = Peer(rank, rank), Peer(1 - rank, 1 - rank)
    shm, failures = connect_shm_links(
        me, [peer], group=dist.group.WORLD, timeout_s=30, capacity=4096
    )
    assert not failures, failures
    world = dist.group.WORLD
    links = {
        "shm": shm[peer.stage],
        "torch": TorchLink(peer, slot_group=world, send_group=world, recv_group=world,
                           device=torch.device("cpu"), timeout_s=30, me=me),
    }  # fmt: skip
    tensors = _lazy(seed)
    received: dict[str, bool] = {}
    for transport, link in links.items():
        if rank == 0:
            for what, tensor in tensors.items():
                link.send(tensor, what)
            link.send_input_grad(_input_grad_leaf(seed), "input grad")
            link.finish_sends()
            continue
        link.post_receives(len(tensors) + 1)
        for what, tensor in tensors.items():
            got = link.recv(what)
            received[f"{transport} {what}"] = got.dtype == tensor.dtype and torch.equal(
                got, tensor.resolve_conj().resolve_neg()
            )
        got = link.recv("input grad")
        received[f"{transport} input grad"] = torch.equal(
            got, _input_grad_leaf(seed).grad.resolve_conj()
        )
    return received


def test_lazy_conjugates_and_negations_arrive_as_their_values() -> None:
    sender, receiver = run_multiprocess(_exchange, 2, args=(5,), timeout=120)
    assert sender == {}
    assert len(receiver) == 10 and all(receiver.values()), receiver


def test_resolving_copies_only_tensors_with_a_lazy_bit() -> None:
    plain = torch.randn(3, dtype=torch.complex64)
    assert resolved(plain) is plain
    torch.testing.assert_close(resolved(plain.conj()), plain.conj().resolve_conj())
    assert not resolved(plain.conj().imag).is_neg()
    torch.testing.assert_close(resolved(plain.conj().imag), -plain.imag)


def _timeouts(rank: int, world_size: int) -> list[float]:
    groups = _link_groups(list(range(world_size)), "gloo", timeout_s=7.5)
    return [group_timeout(group).total_seconds() for group in groups]


def test_the_groups_of_a_gpu_pipelines_links_take_its_timeout() -> None:
    for timeouts in run_multiprocess(_timeouts, 2, timeout=60):
        assert timeouts == [7.5, 7.5]
