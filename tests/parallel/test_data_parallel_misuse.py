"""DataParallel under uses that used to leave the replicas silently different: parameters that
are strided views, a closed wrapper, `load_state_dict(assign=True)`, a backward retried after
one that raised, one rank abandoning a backward its peers finished. Each either does what DDP
or a one-process run does, or raises on every rank."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastpar.comm import CommClosedError
from fastpar.parallel import DataParallel
from fastpar.testing.distributed import run_multiprocess


class StridedView(nn.Module):
    """A parameter that is columns 0-1 of a 4x4 storage whose columns 2-3 are another tensor."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.storage = torch.full((4, 4), -7.0 - rank)
        self.weight = nn.Parameter(self.storage[:, :2])
        with torch.no_grad():
            self.weight.copy_(torch.arange(8.0).view(4, 2) * (rank + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def _strided_parameter_against_ddp(rank: int, world_size: int, comm: str) -> None:
    ours, theirs = StridedView(rank), StridedView(rank)
    dp = DataParallel(ours, comm=comm)
    DistributedDataParallel(theirs)
    assert torch.equal(ours.weight, theirs.weight), (ours.weight, theirs.weight)
    assert torch.equal(ours.storage, theirs.storage), (ours.storage, theirs.storage)
    dp.close()


@pytest.mark.parametrize("comm", ["torch", "auto"])
def test_a_strided_parameter_is_broadcast_as_ddp_does(comm: str) -> None:
    """gloo broadcast the view's storage as if contiguous: rank 1 kept half of its own values
    and had the memory beside the view overwritten."""
    run_multiprocess(_strided_parameter_against_ddp, 2, args=(comm,), timeout=60)


class Chain(nn.Module):
    def __init__(self, layers: int = 4, width: int = 6) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(5, 6, generator=torch.Generator().manual_seed(100 * step + rank))


def _closed_wrapper(rank: int, world_size: int) -> None:
    dp = DataParallel(Chain(), comm="torch")
    dp(_batch(rank, 0)).sum().backward()
    dp.close()
    with pytest.raises(CommClosedError, match=r"this DataParallel was closed \(close\(\)\)"):
        dp(_batch(rank, 1))
    dp.close()  # again: nothing


def test_a_closed_data_parallel_refuses_to_run() -> None:
    """Its forward and backward ran on, each rank on its own gradients."""
    run_multiprocess(_closed_wrapper, 2, timeout=60)


def _close_cut_short(rank: int, world_size: int) -> None:
    model = Chain()
    dp = DataParallel(model, comm="torch")

    def interrupted() -> None:  # Ctrl-C while close() waits for a hung peer
        raise KeyboardInterrupt

    dp._sync.unfinished_backward_left = lambda: True  # type: ignore[method-assign]
    dp._sync.forget_unfinished_backward = interrupted  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        dp.close()
    DataParallel(model, comm="torch").close()  # unhooked: the module can be wrapped again


def test_a_close_cut_short_still_unhooks_the_module() -> None:
    """close() marked the wrapper closed before its work: cut short, it left the hooks on,
    and the module could never be wrapped again."""
    run_multiprocess(_close_cut_short, 2, timeout=60)


def _load_with_assign(rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    model, reference = Chain(), Chain()
    dp = DataParallel(model, comm="torch")
    saved = {name: value.clone() + 1 for name, value in dp.state_dict().items()}
    with pytest.raises(ValueError, match="assign=True"):
        dp.load_state_dict(saved, assign=True)
    # Within a parent's load, assign=True loads the wrapped module in place: see
    # test_data_parallel_load.py.
    # A dict loaded elsewhere with assign=True: torch left the mark in its metadata.
    saved = Chain().state_dict()
    Chain().load_state_dict(saved, assign=True)
    parameters = list(model.parameters())
    # In place, the loaded weights are still averaged (single-process training on both ranks'
    # data, float32, is the reference).
    dp.load_state_dict(saved)
    assert all(a is b for a, b in zip(model.parameters(), parameters, strict=True))
    reference.load_state_dict(saved)
    dp(_batch(rank, 0)).sum().backward()
    for r in range(world_size):
        (reference(_batch(r, 0)).sum() / world_size).backward()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    dp.close()


def test_load_state_dict_with_assign_is_refused() -> None:
    """assign=True swapped the Parameter objects; the hooks stayed on the old ones, so
    gradients were no longer averaged."""
    run_multiprocess(_load_with_assign, 2, timeout=60)


class FailingBackward(torch.autograd.Function):
    """The identity, whose backward raises while `switch["fail"]` is set."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, switch: dict
    ) -> torch.Tensor:
        ctx.switch = switch  # type: ignore[attr-defined]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
        if ctx.switch["fail"]:  # type: ignore[attr-defined]
            raise FloatingPointError("a non-finite gradient (test)")
        return grad, None


class ChainThatFails(Chain):
    """Its backward raises between the first layer and the rest while `switch["fail"]`."""

    def forward(self, x: torch.Tensor, switch: dict) -> torch.Tensor:
        x = FailingBackward.apply(torch.tanh(self.layers[0](x)), switch)
        for layer in self.layers[1:]:
            x = torch.tanh(layer(x))
        return x


def _retried_backward(rank: int, world_size: int, comm: str, overlap: str) -> None:
    """Every rank's backward raises after the last layers' gradients arrived; the same graph's
    backward is retried, as DDP refuses ("marked as ready twice"). Then training goes on with a
    forward, and matches single-process training on both ranks' data."""
    torch.manual_seed(0)
    model, reference = ChainThatFails(), ChainThatFails()
    reference.load_state_dict(model.state_dict())
    dp = DataParallel(model, comm=comm, bucket_cap_mb=0.0002, first_bucket_mb=0.0002,
                      overlap=overlap)  # fmt: skip
    switch = {"fail": True}
    loss = dp(_batch(rank, 0), switch).sum()
    with pytest.raises(FloatingPointError):
        loss.backward(retain_graph=True)
    switch["fail"] = False
    with pytest.raises(RuntimeError, match="got a second gradient in one synchronised backward"):
        loss.backward()
    assert all(p.grad is None for p in model.parameters())
    dp(_batch(rank, 1), switch).sum().backward()
    for r in range(world_size):
        (reference(_batch(r, 1), switch).sum() / world_size).backward()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    dp.close()


@pytest.mark.parametrize(("comm", "overlap"), [("torch", "on"), ("ring", "off")])
def test_a_backward_retried_after_one_that_raised_is_refused(comm: str, overlap: str) -> None:
    """The retry found the raised backward's state and returned each rank's own gradients."""
    run_multiprocess(_retried_backward, 2, args=(comm, overlap), timeout=120)


ONE_LINEAR_MB = 42 * 4 / 2**20  # one Linear(6, 6) per bucket (42 floats): equal sizes


def _one_rank_abandons_a_backward(rank: int, world_size: int, comm: str, overlap: str) -> None:
    """Rank 1's backward of step 0 raises after the last layers' gradients arrived, and its
    loop skips the step; rank 0's backward of step 0 must raise too (it used to average its
    buckets with rank 1's buckets of step 1, all of the same size). Then both ranks train on,
    as one-process training (SGD with momentum) on both ranks' data, skipping step 0."""
    torch.manual_seed(0)
    model, reference = ChainThatFails(), ChainThatFails()
    reference.load_state_dict(model.state_dict())
    dp = DataParallel(model, comm=comm, bucket_cap_mb=ONE_LINEAR_MB,
                      first_bucket_mb=ONE_LINEAR_MB, overlap=overlap, timeout=30)  # fmt: skip
    assert len(set(dp.bucket_sizes)) == 1 and len(dp.bucket_sizes) == 4, dp.bucket_sizes
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    works = {"fail": False}
    for step in range(3):
        optimizer.zero_grad()
        if step == 0:
            fails = {"fail": rank == 1}
            expected = (
                (FloatingPointError, "non-finite")
                if rank == 1
                else (RuntimeError, "another rank's backward of this step raised before its end")
            )
            with pytest.raises(expected[0], match=expected[1]):
                dp(_batch(rank, step), fails).sum().backward()
            continue
        dp(_batch(rank, step), works).sum().backward()
        assert all(p.grad is not None for p in model.parameters())
        optimizer.step()
        reference_optimizer.zero_grad()
        for r in range(world_size):
            (reference(_batch(r, step), works).sum() / world_size).backward()
        reference_optimizer.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    dp.close()


@pytest.mark.parametrize(("comm", "overlap"), [("ring", "on"), ("torch", "on"), ("ring", "off")])
def test_a_backward_one_rank_abandons_raises_on_every_rank(comm: str, overlap: str) -> None:
    run_multiprocess(_one_rank_abandons_a_backward, 2, args=(comm, overlap), timeout=120)
