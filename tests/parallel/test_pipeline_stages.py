"""Stage pieces without processes: the split backward (an input pass, then deferred weight
passes) gives the gradients of a whole backward for Linear, Embedding and LayerNorm and falls
back, said once, for other modules; `balanced_cuts` is the brute-force optimum; and
`split_sequential(..., balance="auto")` finds the cuts of a model with known, uneven layer
costs, and leaves the model's buffers and the example input unchanged."""

from __future__ import annotations

import itertools
import logging
import random
from collections import OrderedDict
from typing import Any

import pytest
import torch
from torch import nn

from fastpar.nn import LSTM
from fastpar.parallel.pipeline import OutputOnly, split_sequential
from fastpar.parallel.pipeline.split_backward import DeferredWeights, weight_split
from fastpar.parallel.pipeline.stages import balanced_cuts

DTYPES = [(torch.float32, 1e-5, 1e-6), (torch.float64, 1e-12, 1e-12)]


def _model(dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Embedding(11, 8, padding_idx=2),
        nn.Linear(8, 12),
        nn.LayerNorm(12),
        nn.Tanh(),
        nn.Linear(12, 12, bias=False),
        nn.LSTM(12, 6),  # no split: its weight gradients come in the input pass
    ).to(dtype)


def _forward(model: nn.Sequential, ids: torch.Tensor) -> torch.Tensor:
    hidden = model[:5](ids)  # (T, B, 12)
    return model[5](hidden)[0]


@pytest.mark.parametrize("dtype, rtol, atol", DTYPES)
def test_split_backward_equals_whole_backward(
    dtype: torch.dtype, rtol: float, atol: float, caplog: pytest.LogCaptureFixture
) -> None:
    ids = torch.randint(0, 11, (5, 3))  # (T, B), some of them the padding index
    grad = torch.randn(5, 3, 6, dtype=dtype)
    whole = _model(dtype)
    _forward(whole, ids).backward(grad)

    split = _model(dtype)
    deferred = DeferredWeights()
    with caplog.at_level(logging.INFO), weight_split(split, deferred, f"stage {dtype}"):
        out = _forward(split, ids)
    out.backward(grad)  # the input pass
    deferred_params = [p for n, p in split.named_parameters() if not n.startswith("5.")]
    assert all(p.grad is None for p in deferred_params)  # not yet: they wait for W
    assert all(p.grad is not None for p in split[5].parameters())  # computed in the I pass
    assert len(deferred.jobs) == 4  # Embedding, Linear, LayerNorm, Linear
    deferred.run()
    for (name, got), want in zip(split.named_parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=rtol, atol=atol, msg=name)
    said = [r.message for r in caplog.records if "no weight-gradient split" in r.message]
    assert len(said) == 1 and f"stage {dtype}" in said[0] and "5.weight_ih_l0" in said[0]


def test_split_backward_under_autocast_equals_whole_backward() -> None:
    # Autocast casts Linear's and LayerNorm's tensors: their gradients flow through the casts.
    ids = torch.randint(0, 11, (5, 3))
    grad = torch.randn(5, 3, 12)
    whole = _model(torch.float32)[:5]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = whole(ids)
    out.backward(grad.to(out.dtype))

    split = _model(torch.float32)[:5]
    deferred = DeferredWeights()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with weight_split(split, deferred, "stage autocast"):
            got = split(ids)
        got.backward(grad.to(got.dtype))
    deferred.run()
    assert got.dtype == out.dtype == torch.bfloat16
    for (name, param), want in zip(split.named_parameters(), whole.parameters(), strict=True):
        assert param.grad.dtype == want.grad.dtype == torch.float32, name
        torch.testing.assert_close(param.grad, want.grad, rtol=1e-6, atol=1e-6, msg=name)


class _Checkpointed(nn.Module):
    """`block` under torch.utils.checkpoint without reentry: recomputed in the backward."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)


@pytest.mark.parametrize("recurrent", [False, True])
def test_split_backward_of_a_checkpointed_block_equals_whole_backward(recurrent: bool) -> None:
    """The recomputation must run the ops the forward ran (a fastpar LSTM ran layer by layer
    for the split, and as one stack in the recomputation: torch's CheckpointError)."""

    def model() -> nn.Sequential:
        torch.manual_seed(3)
        inner = nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 12), nn.LayerNorm(12))
        if recurrent:
            inner.append(OutputOnly(LSTM(12, 12, num_layers=2, backend="torch")))
        return nn.Sequential(_Checkpointed(inner), nn.Tanh(), nn.Linear(12, 4))

    ids = torch.randint(0, 11, (5, 3))
    grad = torch.randn(5, 3, 4)
    whole = model()
    whole(ids).backward(grad)
    split = model()
    deferred = DeferredWeights()
    with weight_split(split, deferred, "stage checkpointed"):
        out = split(ids)
    out.backward(grad)  # recomputes the block, outside weight_split
    deferred.run()
    for (name, got), want in zip(split.named_parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_split_backward_passes_input_gradients_at_once() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    x = torch.randn(2, 4, requires_grad=True)
    deferred = DeferredWeights()
    with weight_split(layer, deferred, "stage 0"):
        y = layer(x)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, torch.ones(2, 3) @ layer.weight)
    assert layer.weight.grad is None
    deferred.run()
    torch.testing.assert_close(layer.weight.grad, torch.ones(3, 2) @ x.detach())
    assert deferred.jobs == []


def _brute_force(costs: list[float], num_stages: int) -> float:
    best = float("inf")
    for points in itertools.combinations(range(1, len(costs)), num_stages - 1):
        bounds = [0, *points, len(costs)]
        best = min(best, max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_balanced_cuts_minimise_the_slowest_stage(seed: int) -> None:
    rng = random.Random(seed)
    costs = [rng.uniform(0.1, 3.0) for _ in range(rng.randint(3, 9))]
    for num_stages in range(1, len(costs) + 1):
        points = balanced_cuts(costs, num_stages)
        bounds = [0, *points, len(costs)]
        assert len(points) == num_stages - 1 and points == sorted(set(points))
        slowest = max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds))
        assert slowest == pytest.approx(_brute_force(costs, num_stages))


def test_balanced_cuts_prefer_small_activations_among_equals() -> None:
    # Four equal layers, two stages: only cut 2 is optimal; with 3 stages of [1, 1, 1, 1, 1, 1]
    # several cuts tie, and the one sending the fewest bytes wins.
    assert balanced_cuts([1.0] * 4, 2) == [2]
    assert balanced_cuts([1.0] * 6, 3, [9, 1, 9, 1, 9, 9]) == [2, 4]


class Clock:
    """A clock that advances only by the costs layers charge it: profiling sees exactly the
    costs the test chose, whatever else runs on the machine."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _ChargeBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, clock: Clock, cost: float) -> torch.Tensor:
        ctx.clock, ctx.cost = clock, cost
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        ctx.clock.now += ctx.cost
        return grad, None, None


class Costly(nn.Module):
    """A linear layer whose forward costs `cost` and backward 2 `cost` on `clock`."""

    def __init__(self, cost: float, clock: Clock) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.cost, self.clock = cost, clock

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.now += self.cost
        return _ChargeBackward.apply(self.linear(x), self.clock, 2 * self.cost)


@pytest.mark.parametrize(
    "costs, num_stages, sizes",
    [
        ([4, 4, 4, 4, 20, 4, 4, 4, 4], 3, [4, 1, 4]),  # the heavy layer alone
        ([1, 1, 1, 1, 1, 1, 1, 9], 2, [7, 1]),
        ([4, 1, 1, 1, 1, 1, 1, 1, 1, 4], 4, [1, 4, 4, 1]),
    ],
)
def test_auto_balance_picks_the_optimal_cuts(
    costs: list[float], num_stages: int, sizes: list[int]
) -> None:
    clock = Clock()
    model = nn.Sequential(*[Costly(c, clock) for c in costs])
    stages = split_sequential(
        model, num_stages, balance="auto", example_input=torch.randn(3, 8), timer=clock
    )
    assert [len(s) for s in stages] == sizes
    bounds = [0, *itertools.accumulate(sizes)]
    slowest = max(3 * sum(costs[a:b]) for a, b in itertools.pairwise(bounds))
    assert slowest == pytest.approx(3 * _brute_force(costs, num_stages))
    assert all(p.grad is None for p in model.parameters())  # profiling left no gradients
    assert [id(m) for s in stages for m in s] == [id(m) for m in model]


class BurstClock(Clock):
    """A `Clock` under a burst of load: the `burst` consecutive timings after the first `skip`
    each take `extra` longer."""

    def __init__(self, skip: int, burst: int, extra: float) -> None:
        super().__init__()
        self.calls, self.skip, self.burst, self.extra = 0, skip, burst, extra

    def __call__(self) -> float:
        self.calls += 1
        timing = (self.calls - 1) // 2  # each timing reads the clock at its start and its end
        if self.calls % 2 == 0 and self.skip <= timing < self.skip + self.burst:
            self.now += self.extra
        return self.now


def test_auto_balance_outlasts_a_burst_of_load() -> None:
    # Six equal layers, 5 repeats (+1 warm-up): a burst over six consecutive timings would
    # hit every timing of one layer if layers were timed one after another (and move the
    # cut); timed in rounds, it hits one round, which the others outvote.
    repeats, layers = 5, 6
    clock = BurstClock(skip=repeats + 1, burst=repeats + 1, extra=10.0)
    model = nn.Sequential(*[Costly(1.0, clock) for _ in range(layers)])
    stages = split_sequential(model, 2, balance="auto", example_input=torch.randn(3, 8),
                              repeats=repeats, timer=clock)  # fmt: skip
    assert clock.calls == 2 * layers * (repeats + 1)  # the burst fell within the profile
    assert [len(s) for s in stages] == [3, 3]


def test_auto_balance_leaves_the_model_and_input_as_they_were() -> None:
    # In-place layers, one of them first, and BatchNorm's running statistics in train mode.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.ReLU(inplace=True),
        nn.Linear(8, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(inplace=True),
        nn.Linear(8, 8),
        nn.Dropout(0.5, inplace=True),
        nn.Linear(8, 2),
    )
    example = torch.randn(4, 8)
    example_before = example.clone()
    buffers_before = {name: b.clone() for name, b in model.named_buffers()}
    stages = split_sequential(model, 3, balance="auto", example_input=example, repeats=2)
    assert [m for s in stages for m in s] == list(model)
    torch.testing.assert_close(example, example_before, rtol=0, atol=0)
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(buffer, buffers_before[name], rtol=0, atol=0, msg=name)
    assert all(p.grad is None for p in model.parameters())


def test_split_sequential_rejects_a_count_without_balance() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="stage count: pass balance='auto'"):
        split_sequential(model, 2)
    with pytest.raises(ValueError, match="needs an example_input"):
        split_sequential(model, 2, balance="auto")
    with pytest.raises(ValueError, match="num_stages must be an integer in \\[1, 2\\], got 3"):
        split_sequential(model, 3, balance="auto", example_input=torch.ones(1, 2))


def test_split_sequential_names_a_bad_argument() -> None:
    with pytest.raises(TypeError, match="split_points must be a list of the layer indices"):
        split_sequential(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="model has no layers"):
        split_sequential(nn.Sequential(), 1, balance="auto", example_input=torch.zeros(1))
    # A layer returning a tuple (torch's LSTM) cannot end a stage: said while profiling.
    model = nn.Sequential(nn.Linear(2, 4), nn.LSTM(4, 4), nn.Linear(4, 2))
    with pytest.raises(TypeError, match=r"layer 1 \(LSTM\) returned tuple.*OutputOnly"):
        split_sequential(model, 2, balance="auto", example_input=torch.randn(3, 1, 2))


def test_split_sequential_takes_numpy_integers_as_torch_does() -> None:
    numpy = pytest.importorskip("numpy")  # installed with the metrics extra
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(4)])
    stages = split_sequential(model, list(numpy.array([1, 3])))
    assert [len(stage) for stage in stages] == [1, 2, 1]
    with pytest.raises(TypeError, match=r"split_points\[1\] must be an integer, got float 2.0"):
        split_sequential(model, [1, 2.0])  # type: ignore[list-item]


def _named_model(seed: int) -> nn.Sequential:
    """Children named as a user names them, one of them nested, with buffers (BatchNorm) and a
    layer used twice (the ReLU, under two names)."""
    torch.manual_seed(seed)
    relu = nn.ReLU()
    return nn.Sequential(
        OrderedDict(
            embed=nn.Embedding(13, 8),
            proj=nn.Linear(8, 12),
            act=relu,
            norm=nn.BatchNorm1d(5),
            block=nn.Sequential(nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 6)),
            act2=relu,
            head=nn.Linear(6, 3),
        )
    )


@pytest.mark.parametrize("points", [[1], [2, 4], [1, 3, 5, 6], [1, 2, 3, 4, 5, 6]])
def test_split_sequential_keeps_the_models_names(points: list[int]) -> None:
    """As torch.distributed.pipelining: a stage's state_dict keys are the model's, the stages'
    state dicts are the model's state dict, and a stage's state loads into the model by key."""
    seed = random.randrange(2**31)
    model = _named_model(seed)
    stages = split_sequential(model, points)
    whole = model.state_dict()
    merged: dict[str, torch.Tensor] = {}
    for stage in stages:
        state = stage.state_dict()
        assert not merged.keys() & state.keys(), f"seed {seed}"  # no name in two stages
        merged.update(state)
    assert list(merged) == list(whole), f"seed {seed}"
    for key, value in whole.items():
        assert merged[key] is value or torch.equal(merged[key], value), f"{key} seed {seed}"
    # Checkpoints of stages restore another model by key: one stage at a time, then merged.
    other = _named_model(seed + 1)
    for stage in stages:
        missing, unexpected = other.load_state_dict(stage.state_dict(), strict=False)
        # (BatchNorm fills in a missing num_batches_tracked with its own, unreported.)
        others = whole.keys() - stage.state_dict().keys() - {"norm.num_batches_tracked"}
        assert not unexpected and set(missing) == others, f"seed {seed}"
    for key, value in other.state_dict().items():
        torch.testing.assert_close(value, whole[key], rtol=0, atol=0, msg=key)
    other.load_state_dict(merged)
    # The stages still compute the model, and index their layers by position.
    ids = torch.randint(0, 13, (4, 5))
    out = ids
    for stage in stages:
        out = stage(out)
    torch.testing.assert_close(out, model(ids), rtol=0, atol=0)
    assert [id(m) for s in stages for m in s] == [id(m) for m in model]
    assert stages[-1][-1] is model.head


def test_split_sequential_warns_of_weights_tied_across_stages(
    caplog: pytest.LogCaptureFixture,
) -> None:
    embedding, head = nn.Embedding(11, 8), nn.Linear(8, 11, bias=False)
    head.weight = embedding.weight  # tied: each stage's rank sees the gradient of its own use
    model = nn.Sequential(embedding, nn.Linear(8, 8), nn.Tanh(), head)
    with caplog.at_level(logging.WARNING):
        split_sequential(model, [1, 3])
        split_sequential(model[:3], [1])  # nothing shared
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1, said
    assert "stages [0, 2] share a parameter (stage 0 0.weight, stage 2 3.weight)" in said[0]
