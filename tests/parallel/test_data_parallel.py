"""DataParallel against PyTorch's DistributedDataParallel and single-process training.

Each multi-process run covers several configurations, since starting ranks costs seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastpar.comm import HOST_ENV, CommClosedError, CommTimeoutError
from fastpar.parallel import DataParallel, DataParallelConfig
from fastpar.parallel.data_parallel import has_spare_core
from fastpar.testing.distributed import run_multiprocess
from tests.store_keys import store_key_counts

VOCAB, EMBED, HIDDEN, SEQ, BATCH = 23, 8, 16, 7, 4


class LanguageModel(nn.Module):
    """Embedding -> 2-layer LSTM -> linear: next-token prediction on integer sequences."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, EMBED)
        self.lstm = nn.LSTM(EMBED, HIDDEN, num_layers=2, batch_first=True)
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        output, _ = self.lstm(self.embedding(tokens))
        return self.head(output)


class BranchyModel(nn.Module):
    """A trunk and two branches: `left` is skipped on some ranks in some steps (locally
    unused), `rare` is skipped by every rank in most steps (globally unused)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(6, 12)
        self.left = nn.Linear(12, 12)
        self.rare = nn.Linear(12, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor, use_left: bool, use_rare: bool) -> torch.Tensor:
        h = torch.tanh(self.trunk(x))
        if use_left:
            h = torch.tanh(self.left(h))
        if use_rare:
            h = torch.tanh(self.rare(h))
        return self.head(h)


def _batch(kind: str, rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    if kind == "lm":
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=generator)
        return tokens[:, :-1], tokens[:, 1:]
    return torch.randn(BATCH, 6, generator=generator), torch.randint(
        0, 3, (BATCH,), generator=generator
    )


def _loss(model: nn.Module, kind: str, inputs: torch.Tensor, targets: torch.Tensor,
          rank: int, step: int) -> torch.Tensor:  # fmt: skip
    if kind == "lm":
        logits = model(inputs)
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
    logits = model(inputs, use_left=(step + rank) % 2 == 0, use_rare=step % 4 == 0)
    return nn.functional.cross_entropy(logits, targets)


def _new_model(kind: str) -> nn.Module:
    return LanguageModel() if kind == "lm" else BranchyModel()


def _train_against_ddp(rank: int, world_size: int, configs: list[tuple]) -> list[str]:
    """For each (kind, comm, bucket_cap_mb, first_bucket_mb[, overlap[, timeout]]) (overlap
    "auto" and no timeout when left out): 10 SGD steps with momentum with fastpar and with DDP
    from the same start, on different data per rank; parameters must agree. Ranks start from
    different weights, so the initial broadcast is exercised too."""
    failures = []
    for kind, comm, bucket_cap_mb, first_bucket_mb, *more in configs:
        overlap = more[0] if more else "auto"
        timeout = more[1] if len(more) > 1 else None
        torch.manual_seed(rank)  # different on purpose: both wrappers broadcast from rank 0
        ours = _new_model(kind)
        theirs = _new_model(kind)
        theirs.load_state_dict(ours.state_dict())
        dp = DataParallel(ours, comm=comm, bucket_cap_mb=bucket_cap_mb,
                          first_bucket_mb=first_bucket_mb, overlap=overlap,
                          timeout=timeout)  # fmt: skip
        ddp = DistributedDataParallel(theirs, find_unused_parameters=kind == "branchy")
        opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
        opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
        for step in range(10):
            inputs, targets = _batch(kind, rank, step)
            for model, opt in ((dp, opt_ours), (ddp, opt_theirs)):
                opt.zero_grad(set_to_none=True)
                _loss(model, kind, inputs, targets, rank, step).backward()
                opt.step()
        for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            # Both divide each gradient by the world size before summing; a sum of two is the
            # same in any order, so on two ranks the bits agree.
            if world_size == 2 and not torch.equal(a, b):
                failures.append(f"{kind}/{comm}/{bucket_cap_mb}/{overlap}: {name} not bitwise")
            if not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
                error = (a - b).abs().max().item()
                failures.append(f"{kind}/{comm}/{bucket_cap_mb}: {name} differs by {error:.3g}")
        dp.close()
    return failures


CONFIGS = [
    ("lm", "torch", 25.0, 1.0, "on"),
    ("lm", "torch", 0.002, 0.001, "off", 30.0),  # waits on torch.distributed bounded by ours
    ("lm", "ring", 25.0, 1.0, "off"),
    ("lm", "ring", 0.002, 0.001, "on"),  # a bucket or two per parameter
    ("lm", "ring", 0.002, 0.001, "off"),
    ("lm", "auto", 0.01, 0.004, "auto"),
    ("branchy", "torch", 25.0, 1.0, "off"),
    ("branchy", "torch", 0.001, 0.0005, "on", 30.0),
    ("branchy", "ring", 0.001, 0.0005, "on"),
    ("branchy", "ring", 0.001, 0.0005, "off"),
]


def test_matches_ddp_on_two_ranks() -> None:
    failures = run_multiprocess(_train_against_ddp, 2, args=(CONFIGS,), timeout=240)
    assert failures == [[], []]


def test_matches_ddp_on_three_ranks() -> None:
    configs = [("lm", "ring", 0.002, 0.001, "on"), ("branchy", "auto", 0.001, 0.0005, "off")]
    failures = run_multiprocess(_train_against_ddp, 3, args=(configs,), timeout=240)
    assert failures == [[], [], []]


def _no_sync_equals_large_batch(rank: int, world_size: int, micro_batches: int) -> float:
    torch.manual_seed(0)
    model = LanguageModel()
    reference = LanguageModel()
    reference.load_state_dict(model.state_dict())
    dp = DataParallel(model, comm="ring", bucket_cap_mb=0.01, first_bucket_mb=0.005)
    for j in range(micro_batches):
        inputs, targets = _batch("lm", rank, j)
        context = dp.no_sync() if j < micro_batches - 1 else torch.enable_grad()
        with context:
            (_loss(dp, "lm", inputs, targets, rank, j) / micro_batches).backward()
    # The same data on one process: every rank's micro-batches in one batch, one backward.
    batches = [_batch("lm", r, j) for r in range(world_size) for j in range(micro_batches)]
    inputs = torch.cat([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    _loss(reference, "lm", inputs, targets, rank, 0).backward()
    worst = 0.0
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
        worst = max(worst, (a.grad - b.grad).abs().max().item())
    dp.close()
    return worst


def test_no_sync_accumulation_equals_one_large_batch() -> None:
    run_multiprocess(_no_sync_equals_large_batch, 2, args=(3,), timeout=120)


def _accumulate_against_ddp(rank: int, world_size: int, patterns: list[tuple]) -> list[str]:
    """For each (no_sync, uses_left): micro-batches accumulated into .grad, under no_sync() but
    the last or each synchronised, `left` used on rank r in micro-batch j if uses_left[j][r]
    (`rare` by none): the gradients must be DDP's."""
    failures = []
    for no_sync, uses_left in patterns:
        torch.manual_seed(0)
        ours, theirs = BranchyModel(), BranchyModel()
        theirs.load_state_dict(ours.state_dict())
        dp = DataParallel(ours, comm="ring", bucket_cap_mb=0.001, first_bucket_mb=0.0005)
        ddp = DistributedDataParallel(theirs, find_unused_parameters=True,
                                      gradient_as_bucket_view=True)  # fmt: skip
        for model in (dp, ddp):
            for micro, left in enumerate(uses_left):
                inputs, targets = _batch("branchy", rank, micro)
                last = micro == len(uses_left) - 1
                with model.no_sync() if no_sync and not last else contextlib.nullcontext():
                    logits = model(inputs, use_left=left[rank], use_rare=False)
                    nn.functional.cross_entropy(logits, targets).backward()
        for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            if (a.grad is None) != (b.grad is None):
                failures.append(f"{no_sync} {uses_left}: {name}.grad None {a.grad is None}")
            elif a.grad is not None and not torch.allclose(a.grad, b.grad, rtol=1e-6, atol=1e-7):
                error = (a.grad - b.grad).abs().max().item()
                failures.append(f"{no_sync} {uses_left}: {name}.grad differs by {error:.3g}")
        dp.close()
    return failures


def test_accumulated_gradients_of_parameters_unused_in_the_last_backward_match_ddp() -> None:
    """A parameter that got gradients in earlier micro-batches but none in the synchronised
    backward still contributes them (they were dropped, or left unaveraged on their rank)."""
    patterns = [
        (True, [(True, True), (False, False)]),  # used only under no_sync, by every rank
        (True, [(True, False), (False, True)]),  # under no_sync on rank 0, at the sync on 1
        (False, [(True, True), (False, True)]),  # each synchronised, no zero_grad between
    ]
    failures = run_multiprocess(_accumulate_against_ddp, 2, args=(patterns,), timeout=120)
    assert failures == [[], []]


def _record_overlap(rank: int, world_size: int, overlap: str) -> list[tuple]:
    torch.manual_seed(0)
    model = LanguageModel()
    dp = DataParallel(model, comm="ring", bucket_cap_mb=0.004, first_bucket_mb=0.002,
                      overlap=overlap)  # fmt: skip
    buckets = {bucket.buffer.untyped_storage().data_ptr() for bucket in dp._buckets}
    for set_to_none in (True, False):  # a fresh .grad copied in once, or accumulated in place
        for p in model.parameters():
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        inputs, targets = _batch("lm", rank, 0)
        _loss(dp, "lm", inputs, targets, rank, 0).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None, name
            assert p.grad.untyped_storage().data_ptr() in buckets, f"{name}: not a bucket view"
    events = list(dp.last_backward_events)
    assert len(dp.bucket_sizes) >= 3, dp.bucket_sizes
    _check_comm_stats(dp, model)
    dp.close()
    return events


def _check_comm_stats(dp: DataParallel, model: nn.Module) -> None:
    """`last_stats` counts every bucket and byte the backward all-reduced, and its times nest:
    the exposed wait is part of the all-reduce span, which is part of backward."""
    stats = dp.last_stats
    params = [p for p in model.parameters() if p.requires_grad]
    assert stats.buckets == len(dp.bucket_sizes)
    assert stats.bytes == sum((p.numel() + 1) * p.element_size() for p in params)
    assert 0 < stats.exposed_s <= stats.allreduce_s <= stats.backward_s
    assert dp.last_comm_wait_s == stats.exposed_s
    with dp.no_sync():  # nothing is all-reduced, nothing is recorded
        _loss(dp, "lm", *_batch("lm", 0, 1), 0, 1).backward()
    assert dp.last_stats == stats


def test_first_bucket_is_launched_before_backward_ends() -> None:
    for events in run_multiprocess(_record_overlap, 2, args=("on",), timeout=120):
        first_launch = events.index(("launch", 0))
        last_grad = max(i for i, event in enumerate(events) if event[0] == "grad")
        assert first_launch < last_grad, events  # gradients were still being computed
        assert events[-1] == ("end",)


def test_without_overlap_every_bucket_is_launched_after_the_last_gradient() -> None:
    for events in run_multiprocess(_record_overlap, 2, args=("off",), timeout=120):
        first_launch = events.index(("launch", 0))
        last_grad = max(i for i, event in enumerate(events) if event[0] == "grad")
        assert first_launch > last_grad, events
        launches = [event[1] for event in events if event[0] == "launch"]
        assert launches == sorted(launches) and len(launches) >= 3, events
        assert events[-1] == ("end",)


def _peer_dies_mid_backward(rank: int, world_size: int, comm: str) -> str | None:
    """Rank 1 dies in its second backward, after its first buckets were launched; rank 0 must
    raise naming it, with no .grad left for an optimizer step that runs anyway."""
    torch.manual_seed(0)
    model = LanguageModel()
    dp = DataParallel(model, comm=comm, bucket_cap_mb=0.004, first_bucket_mb=0.002, timeout=3.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(2):
        optimizer.zero_grad()
        if step == 1 and rank == 1:  # the first layer's gradient comes last in backward
            model.lstm.weight_ih_l0.register_hook(lambda grad: os._exit(3))
        inputs, targets = _batch("lm", rank, step)
        loss = _loss(dp, "lm", inputs, targets, rank, step)
        if step == 0:
            loss.backward()
            optimizer.step()
            continue
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(CommTimeoutError) as info:
            loss.backward()
        assert all(p.grad is None for p in model.parameters())
        optimizer.step()  # a caller that carries on anyway
        for a, b in zip(model.parameters(), before, strict=True):
            assert torch.equal(a, b), "a parameter moved after a failed all-reduce"
    return str(info.value)


@pytest.mark.parametrize("comm", ["ring", "auto"])
def test_a_dead_peer_raises_in_backward_and_nothing_steps(comm: str) -> None:
    results = run_multiprocess(_peer_dies_mid_backward, 2, args=(comm,), timeout=60, may_die=(1,))
    assert results[1] is None
    # Named as soon as its process is gone, long before the 3 s timeout.
    assert "rank 1 (pid" in results[0] and "exited" in results[0], results[0]


TIMEOUT_S = 2.0
SLOW_PEER_S = 30.0  # a peer this late must never be waited for


def _slow_peer_in_backward(
    rank: int, world_size: int, comm: str, overlap: str
) -> tuple[float, str] | None:
    """Rank 1 is alive but late for its backward (a data loader stuck for 30 s): rank 0's
    backward through torch.distributed (gloo, whose own bound is the group's 60 s) must raise
    within the timeout, with no .grad left for an optimizer step that runs anyway (the ones
    accumulated under no_sync() included), and the wrapper must refuse to run afterwards (that
    all-reduce goes on). No synchronised step before: on a loaded machine one rank may lag the
    other by more than the 2 s there."""
    if comm == "auto":
        os.environ[HOST_ENV] = f"simulated-{rank}"  # a host each: "auto" takes torch.distributed
    store = dist.distributed_c10d._get_default_store()
    torch.manual_seed(rank)
    model = LanguageModel()
    dp = DataParallel(model, comm=comm, bucket_cap_mb=0.004, first_bucket_mb=0.002,
                      timeout=TIMEOUT_S, overlap=overlap)  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with dp.no_sync():
        _loss(dp, "lm", *_batch("lm", rank, 0), rank, 0).backward()
    inputs, targets = _batch("lm", rank, 1)
    loss = _loss(dp, "lm", inputs, targets, rank, 1)
    if rank == 1:  # late until rank 0 has given up (at most SLOW_PEER_S), then leaves
        store.wait(["slow-peer/given-up"], timedelta(seconds=SLOW_PEER_S))
        return None
    next_loss = _loss(dp, "lm", inputs, targets, rank, 1)  # its backward comes after the timeout
    assert all(p.grad is not None for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    start = time.monotonic()
    with pytest.raises(CommTimeoutError) as info:
        loss.backward()
    elapsed = time.monotonic() - start
    assert all(p.grad is None for p in model.parameters())
    optimizer.step()  # a caller that carries on anyway
    for a, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(a, b), "a parameter moved after a timed-out all-reduce"
    buckets = [bucket.buffer.clone() for bucket in dp._buckets]
    with pytest.raises(CommClosedError, match="DataParallel is unusable: rank 0 timed out"):
        next_loss.backward()  # raised by its first gradient hook, before any bucket is written
    assert all(torch.equal(a.buffer, b) for a, b in zip(dp._buckets, buckets, strict=True))
    with pytest.raises(CommClosedError, match="DataParallel is unusable: rank 0 timed out"):
        dp(inputs)
    store.set("slow-peer/given-up", "1")
    return elapsed, str(info.value)


@pytest.mark.parametrize(("comm", "overlap"), [("torch", "on"), ("torch", "off"), ("auto", "off")])
def test_a_slow_peer_makes_backward_through_torch_raise_within_the_timeout(
    comm: str, overlap: str
) -> None:
    """The timeout bounded fastpar's ring only: through torch.distributed, backward waited for
    the group's timeout (30 minutes by default for gloo)."""
    results = run_multiprocess(_slow_peer_in_backward, 2, args=(comm, overlap), timeout=60)
    elapsed, message = results[0]
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 4, (elapsed, message)
    assert "rank 0 timed out after 2 s waiting for the all-reduce of gradient bucket" in message
    assert "torch.distributed (gloo)" in message
    assert results[1] is None


def _peer_never_constructs(
    rank: int, world_size: int, timeout: float | None
) -> tuple[float, str] | None:
    store = dist.distributed_c10d._get_default_store()
    if rank == 1:  # never builds its DataParallel; leaves once the others have given up
        others = [f"absent/given-up/{r}" for r in range(world_size) if r != 1]
        store.wait(others, timedelta(seconds=SLOW_PEER_S))
        return None
    # The others start together: one that came late would be named too
    store.set(f"absent/ready/{rank}", "1")
    store.wait([f"absent/ready/{r}" for r in range(world_size) if r != 1])
    start = time.monotonic()
    with pytest.raises(CommTimeoutError) as info:
        DataParallel(LanguageModel(), timeout=timeout)
    elapsed = time.monotonic() - start
    store.set(f"absent/given-up/{rank}", "1")
    return elapsed, str(info.value)


@pytest.mark.parametrize("timeout", [TIMEOUT_S, None])
def test_a_peer_that_never_constructs_is_a_timeout_naming_it(timeout: float | None) -> None:
    """Construction's collectives (the check of parameters, the broadcast) waited for the
    group's timeout, then said only that this rank timed out. None: the group's timeout."""
    group_timeout = SLOW_PEER_S if timeout is not None else TIMEOUT_S
    results = run_multiprocess(_peer_never_constructs, 3, args=(timeout,), timeout=60,
                               group_timeout=group_timeout)  # fmt: skip
    assert results[1] is None
    waiting = (
        "waiting for rank(s) [1] to post its parameter names and shapes while constructing a "
        "DataParallel"
    )
    for rank, other in ((0, 2), (2, 0)):
        elapsed, message = results[rank]
        # A rank still waiting when the other gave up stops then (they started together).
        assert TIMEOUT_S - 0.5 <= elapsed < TIMEOUT_S + 4, (elapsed, message)
        assert message.startswith(f"rank {rank} timed out after 2 s {waiting}") or (
            message.startswith(
                f"rank {rank} stopped {waiting}: rank {other} gave up waiting for them first"
            )
        ), message
        assert "RingAllReduce" not in message, message
    assert any("timed out after 2 s" in message for _, message in (results[0], results[2]))


def _store_keys_after_wrappers(rank: int, world_size: int) -> list[int]:
    """The default store's key count before and after each of 3 wrappers built and closed."""
    return store_key_counts(lambda: DataParallel(nn.Linear(3, 3), comm="torch").close())


def test_wrappers_built_in_a_loop_do_not_grow_the_store() -> None:
    """Each construction left one parameter signature per rank in the store, never deleted."""
    results = run_multiprocess(_store_keys_after_wrappers, 3, timeout=60)
    for counts in results:
        assert counts == [counts[0]] * 4, results


def _usability_checks_per_backward(rank: int, world_size: int) -> list[int]:
    model = LanguageModel()
    dp = DataParallel(model, comm="torch", bucket_cap_mb=0.004, first_bucket_mb=0.002)
    checks = 0
    check_usable = dp._sync.check_usable

    def counted() -> None:
        nonlocal checks
        checks += 1
        check_usable()

    dp._sync.check_usable = counted  # type: ignore[method-assign]
    counts = []
    for step in range(3):
        inputs, targets = _batch("lm", rank, step)
        checks = 0
        loss = nn.functional.cross_entropy(  # not through dp's forward, which checks too
            model(inputs).reshape(-1, VOCAB), targets.reshape(-1)
        )
        loss.backward()
        counts.append(checks)
    dp.close()
    return counts


def test_usability_is_checked_once_per_backward() -> None:
    """It was checked in every gradient hook, once per parameter and backward."""
    assert run_multiprocess(_usability_checks_per_backward, 2, timeout=60) == [[1, 1, 1]] * 2


def _nan_guard(grad: torch.Tensor) -> torch.Tensor:
    raise FloatingPointError("a non-finite gradient (test)")


def _training_goes_on_after_a_backward_raised(rank: int, world_size: int, overlap: str) -> None:
    """Every rank's backward raises in step 1 (a gradient hook), after the last layers' buckets
    got their gradients, and the loop skips that step: the other steps must still average
    gradients, as single-process training (float64) on every rank's data does."""
    torch.manual_seed(0)
    model, reference = LanguageModel().double(), LanguageModel().double()
    reference.load_state_dict(model.state_dict())
    dp = DataParallel(model, comm="ring", bucket_cap_mb=0.004, first_bucket_mb=0.002,
                      overlap=overlap)  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for step in range(4):
        optimizer.zero_grad()
        loss = _loss(dp, "lm", *_batch("lm", rank, step), rank, step)
        if step == 1:  # the first layer's gradient comes last in backward
            guard = model.embedding.weight.register_hook(_nan_guard)
            with pytest.raises(FloatingPointError):
                loss.backward()
            guard.remove()
            continue
        loss.backward()
        optimizer.step()
        reference_optimizer.zero_grad()
        for r in range(world_size):
            (_loss(reference, "lm", *_batch("lm", r, step), r, step) / world_size).backward()
        reference_optimizer.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    dp.close()


@pytest.mark.parametrize("overlap", ["on", "off"])
def test_training_goes_on_after_a_backward_raised(overlap: str) -> None:
    """The raised backward's bookkeeping used to stay, so no later backward all-reduced."""
    run_multiprocess(_training_goes_on_after_a_backward_raised, 2, args=(overlap,), timeout=120)


PEER_HOLDS_BACK_S = 2.0  # how long rank 1 holds back its all-reduces for rank 0's close()


def _close_after_a_backward_raised(rank: int, world_size: int) -> tuple[bool, bool, bool]:
    """Every rank's backward raises (a gradient hook on the first layer) after the last layers'
    buckets were launched through gloo; rank 0 then calls close() while its all-reduces still
    wait for rank 1, which launches its own only once rank 0's close() has returned (or after
    PEER_HOLDS_BACK_S, as a close() that waits never returns before it does). Returns, on rank
    0: whether an all-reduce was pending when close() returned, whether a bucket was written
    after it, whether a .grad was left; on rank 1: whether its all-reduces all ended."""
    store = dist.distributed_c10d._get_default_store()
    torch.manual_seed(rank)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).double()
    dp = DataParallel(model, comm="torch", bucket_cap_mb=1e-5, first_bucket_mb=1e-5,
                      timeout=60, overlap="on")  # fmt: skip
    model[0].weight.register_hook(_nan_guard)
    loss = dp(torch.randn(3, 4, dtype=torch.float64)).square().sum()
    if rank == 1:
        with contextlib.suppress(RuntimeError):  # its time bound: rank 0's close() waits
            store.wait(["close-test/closed"], timedelta(seconds=PEER_HOLDS_BACK_S))
    with pytest.raises(FloatingPointError):
        loss.backward()
    works = [bucket.work for bucket in dp._buckets if bucket.work is not None]
    assert works, "no bucket was launched before backward raised"
    buffers = [bucket.buffer for bucket in dp._buckets]
    dp.close()
    pending = any(not work.is_completed() for work in works)
    after_close = [buffer.clone() for buffer in buffers]
    grads_left = any(p.grad is not None for p in model.parameters())
    if rank == 1:
        store.set("close-test/peer-closed", "1")
        return pending, False, grads_left
    store.set("close-test/closed", "1")
    store.wait(["close-test/peer-closed"], timedelta(seconds=60))
    for work in works:  # the ones close() left running, so that they end before the check
        work.wait()
    written = any(not torch.equal(a, b) for a, b in zip(buffers, after_close, strict=True))
    return pending, written, grads_left


def test_close_waits_for_the_all_reduces_of_a_backward_that_raised() -> None:
    """close() returned with them still running: they wrote into the buckets afterwards."""
    results = run_multiprocess(_close_after_a_backward_raised, 2, timeout=120)
    assert results[0] == (False, False, False), results
    assert results[1] == (False, False, False), results


def _close_while_the_peer_never_launches(rank: int, world_size: int) -> tuple[float, str] | None:
    """As above, but rank 1 launches its all-reduces only once rank 0's close() has returned:
    close() must give up within the timeout (2 s), raising nothing, and log why. Returns, on
    rank 0, how long close() took and what it logged."""
    store = dist.distributed_c10d._get_default_store()
    torch.manual_seed(rank)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).double()
    dp = DataParallel(model, comm="torch", bucket_cap_mb=1e-5, first_bucket_mb=1e-5,
                      timeout=TIMEOUT_S, overlap="on")  # fmt: skip
    model[0].weight.register_hook(_nan_guard)
    loss = dp(torch.randn(3, 4, dtype=torch.float64)).square().sum()
    if rank == 1:
        store.wait(["close-test/given-up"], timedelta(seconds=60))
    with pytest.raises(FloatingPointError):
        loss.backward()
    works = [bucket.work for bucket in dp._buckets if bucket.work is not None]
    if rank == 1:
        dp.close()
        store.set("close-test/peer-closed", "1")
        return None
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("fastpar.parallel.data_parallel").addHandler(handler)
    start = time.monotonic()
    dp.close()
    elapsed = time.monotonic() - start
    store.set("close-test/given-up", "1")
    for work in works:  # gloo's, left running: they end once rank 1 launches its own
        work.wait()
    store.wait(["close-test/peer-closed"], timedelta(seconds=60))
    return elapsed, "\n".join(messages)


def test_close_gives_up_on_the_all_reduces_of_a_backward_that_raised_within_the_timeout() -> None:
    results = run_multiprocess(_close_while_the_peer_never_launches, 2, timeout=120)
    elapsed, messages = results[0]
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 4, (elapsed, messages)
    assert "DataParallel.close(): an all-reduce launched by the last synchronised" in messages
    assert "rank 0 timed out after 2 s waiting for the all-reduce of gradient bucket" in messages
    assert results[1] is None


def _unfreeze_and_wrap_again(rank: int, world_size: int) -> None:
    """Fine-tuning: steps with the embedding frozen, then unfrozen and the model wrapped again
    (a wrapper averages the parameters that required gradients when it was built). Wrapping
    before closing the first wrapper is refused: both would average the gradients, each ending
    divided by the world size twice. After close(), gradients are single-process training's
    (float64) on every rank's data."""
    torch.manual_seed(0)
    model, reference = LanguageModel().double(), LanguageModel().double()
    reference.load_state_dict(model.state_dict())
    for module in (model, reference):
        module.embedding.weight.requires_grad_(False)
    dp = DataParallel(model, comm="ring", bucket_cap_mb=0.004, first_bucket_mb=0.002)
    for step in range(4):
        if step == 2:
            for module in (model, reference):
                module.embedding.weight.requires_grad_(True)
            with pytest.raises(ValueError, match=r"'lstm\.weight_ih_l0' belongs to another"):
                DataParallel(model, comm="ring")
            dp.close()
            dp = DataParallel(model, comm="ring", bucket_cap_mb=0.004, first_bucket_mb=0.002)
        model.zero_grad()
        reference.zero_grad()
        _loss(dp, "lm", *_batch("lm", rank, step), rank, step).backward()
        for r in range(world_size):
            (_loss(reference, "lm", *_batch("lm", r, step), r, step) / world_size).backward()
        for a, b in zip(model.parameters(), reference.parameters(), strict=True):
            assert (a.grad is None) == (b.grad is None)
            if a.grad is not None:
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
    dp.close()


def test_wrapping_parameters_of_an_open_data_parallel_again_is_refused() -> None:
    run_multiprocess(_unfreeze_and_wrap_again, 2, timeout=120)


def _sparse_embedding_against_ddp(rank: int, world_size: int) -> list[str]:
    """An Embedding(sparse=True), whose gradients are sparse tensors: 4 steps of 2 micro-batches
    (the first under no_sync()), with optimizers that take sparse gradients; parameters must be
    DDP's."""
    failures = []
    for optimizer_class, options in (
        (torch.optim.SGD, {"momentum": 0.9}),
        (torch.optim.Adagrad, {}),
    ):
        results = []
        for wrapper in ("fastpar", "ddp"):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Embedding(VOCAB, EMBED, sparse=True), nn.Linear(EMBED, VOCAB))
            wrapped = (DataParallel(model, comm="ring") if wrapper == "fastpar"
                       else DistributedDataParallel(model))  # fmt: skip
            optimizer = optimizer_class(model.parameters(), lr=0.1, **options)
            for step in range(4):
                optimizer.zero_grad()
                for micro in range(2):
                    inputs, targets = _batch("lm", rank, 2 * step + micro)
                    with wrapped.no_sync() if micro == 0 else contextlib.nullcontext():
                        logits = wrapped(inputs)
                        loss = nn.functional.cross_entropy(
                            logits.reshape(-1, VOCAB), targets.reshape(-1)
                        )
                        loss.backward()
                optimizer.step()
            results.append([p.detach().clone() for p in model.parameters()])
            if isinstance(wrapped, DataParallel):
                wrapped.close()
        for index, (a, b) in enumerate(zip(*results, strict=True)):
            if not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
                failures.append(f"{optimizer_class.__name__}: parameter {index} differs")
    return failures


def test_sparse_gradients_are_averaged_as_ddp_does() -> None:
    """They raised "Cannot access data pointer of Tensor that doesn't have storage"."""
    failures = run_multiprocess(_sparse_embedding_against_ddp, 2, timeout=120)
    assert failures == [[], []]


def _mismatched_parameters(rank: int, world_size: int) -> str:
    model = nn.Linear(4, 3 if rank == 0 else 5)
    with pytest.raises(ValueError, match="same parameters and buffers on every rank") as info:
        DataParallel(model)
    return str(info.value)


def test_different_parameters_are_an_error_on_every_rank() -> None:
    messages = run_multiprocess(_mismatched_parameters, 2, timeout=60)
    for message in messages:
        assert "group rank 1" in message and "'weight', (5, 4)" in message


def _mismatched_buffers(rank: int, world_size: int) -> str:
    """Buffers are broadcast from the first rank: one of another shape would be corrupted or
    block the broadcast (it passed the parameters' check)."""
    model = nn.Linear(4, 3)
    model.register_buffer("scale", torch.ones(2 if rank == 0 else 3))
    with pytest.raises(ValueError, match="same parameters and buffers on every rank") as info:
        DataParallel(model, timeout=30)
    return str(info.value)


def test_different_buffers_are_an_error_on_every_rank() -> None:
    messages = run_multiprocess(_mismatched_buffers, 2, timeout=60)
    for message in messages:
        assert "group rank 1" in message and "buffer ('scale', (3,)" in message


def _outside_the_group(rank: int, world_size: int) -> str | None:
    first_two = dist.new_group([0, 1])
    if rank < 2:
        DataParallel(nn.Linear(4, 3), group=first_two).close()
        return None
    with pytest.raises(ValueError) as info:
        DataParallel(nn.Linear(4, 3), group=first_two)
    return str(info.value)


def test_a_rank_outside_the_group_is_refused() -> None:
    assert run_multiprocess(_outside_the_group, 3, timeout=60) == [
        None,
        None,
        "group: this process (global rank 2 of 3) is not one of the group's members; call this "
        "only on its members",
    ]


def _fastpar_mappings() -> int:
    """This process's mappings of fastpar's shared memory (a ring's segment stays mapped until
    the ring is closed)."""
    with open("/proc/self/maps") as maps:
        return sum("/fastpar-" in line for line in maps)


def _ring_refused(rank: int, world_size: int) -> tuple[int, int, str]:
    model = nn.Linear(3, 3)
    model.phase = nn.Parameter(torch.zeros(3, dtype=torch.complex64))  # the ring sums no complex
    before = _fastpar_mappings()
    with pytest.raises(ValueError, match="comm='ring' was requested") as info:
        DataParallel(model, comm="ring")
    return before, _fastpar_mappings(), str(info.value)


def test_a_construction_that_raises_closes_the_ring_it_created() -> None:
    """The ring created for the buckets stayed open (its shared memory mapped, until the
    process ended) when a bucket it could not serve made construction raise."""
    for before, after, message in run_multiprocess(_ring_refused, 2, timeout=60):
        assert "torch.complex64 bucket on cpu" in message, message
        assert after == before, (before, after)


def _state_dict_round_trip(rank: int, world_size: int) -> None:
    torch.manual_seed(rank)
    model = LanguageModel()
    dp = DataParallel(model, comm="torch")
    plain = LanguageModel()
    plain.load_state_dict(dp.state_dict())  # no "module." prefix
    assert dp.state_dict().keys() == plain.state_dict().keys()
    dp.load_state_dict(plain.state_dict())
    assert dp.module is model
    # After construction every rank holds rank 0's weights.
    gathered = [torch.empty_like(model.head.weight) for _ in range(world_size)]
    dist.all_gather(gathered, model.head.weight.detach())
    assert all(torch.equal(g, gathered[0]) for g in gathered)
    dp.close()


def test_state_dict_is_the_plain_modules() -> None:
    run_multiprocess(_state_dict_round_trip, 2, timeout=60)


def _state_dict_inside_a_parent(rank: int, world_size: int) -> None:
    """Part of a model wrapped in place (model.head = DataParallel(model.head)): the model's
    state dict has the plain model's names, and loads back into it and into the plain model
    (the parent's load looked for "head.module.weight" and, with strict=False, loaded nothing)."""
    torch.manual_seed(0)
    model, plain = LanguageModel(), LanguageModel()
    model.head = DataParallel(model.head, comm="torch")
    saved = {name: value.clone() for name, value in model.state_dict().items()}
    assert saved.keys() == plain.state_dict().keys()
    plain.load_state_dict(saved)
    for wrong in model.parameters():
        wrong.data.add_(1.0)
    model.load_state_dict(saved)
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    model.head.close()


def test_state_dict_inside_a_parent_module_is_the_plain_models() -> None:
    run_multiprocess(_state_dict_inside_a_parent, 2, timeout=60)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"comm": "nccl"}, r"comm must be one of \('auto', 'ring', 'torch'\), got 'nccl'"),
        ({"bucket_cap_mb": 0}, "bucket_cap_mb must be a finite number > 0, got 0"),
        ({"first_bucket_mb": -1.0}, r"first_bucket_mb must be a finite number > 0, got -1.0"),
        ({"timeout_s": float("inf")}, "timeout_s must be a finite number > 0, got inf"),
        ({"overlap": True}, r"overlap must be one of \('auto', 'on', 'off'\), got True"),
    ],
)
def test_bad_options_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DataParallelConfig(**kwargs)


@pytest.mark.parametrize(
    ("local_ranks", "threads", "cores", "spare"),
    [(2, 1, 2, False), (2, 8, 16, False), (2, 1, 3, True), (4, 3, 16, True), (1, 1, None, False)],
)
def test_overlap_needs_a_core_beyond_the_compute_threads(
    local_ranks: int, threads: int, cores: int | None, spare: bool
) -> None:
    assert has_spare_core(local_ranks, threads, cores) is spare


def test_a_bool_is_not_a_size() -> None:
    with pytest.raises(TypeError, match="bucket_cap_mb must be a number, got bool True"):
        DataParallelConfig(bucket_cap_mb=True)


def test_needs_an_initialised_process_group() -> None:
    with pytest.raises(RuntimeError, match="init_process_group"):
        DataParallel(nn.Linear(2, 2))
