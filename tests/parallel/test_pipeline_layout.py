"""Every rank of a pipeline runs the same model: `split_sequential(balance="auto")` takes the
cuts of the group's first rank on every rank, whatever each rank's own timings say, and stages
cut differently on different ranks (their own split_points) raise at construction on every rank
instead of training a model with layers skipped or run twice."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
import torch
from torch import nn

from fastpar.parallel.pipeline import Pipeline, split_sequential
from fastpar.parallel.pipeline.stages import stage_layers
from fastpar.testing.distributed import run_multiprocess

TIMEOUT_S = 60.0
LAYERS, WIDTH = 4, 6


class LayerClock:
    """A clock under which layer i of a model of `len(costs)` layers takes costs[i] seconds to
    time: `profile_layers` reads the clock at the start and at the end of every layer's timing,
    layer after layer."""

    def __init__(self, costs: list[float]) -> None:
        self.costs, self.calls, self.now = costs, 0, 0.0

    def __call__(self) -> float:
        if self.calls % 2 == 1:  # an end: the layer's cost has passed
            self.now += self.costs[(self.calls // 2) % len(self.costs)]
        self.calls += 1
        return self.now


def _model() -> nn.Sequential:
    torch.manual_seed(3)  # equal layers: their outputs fit the next layer wherever the cut falls
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH, dtype=torch.float64) for _ in range(LAYERS)])


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    shape = (8, WIDTH)
    return (torch.randn(shape, generator=generator, dtype=torch.float64),
            torch.randn(shape, generator=generator, dtype=torch.float64))  # fmt: skip


def _balanced_rank(rank: int, world_size: int) -> dict[str, Any]:
    model = _model()
    x, y = _batch()
    # Rank 0 finds layer 0 slow (cut [1]), rank 1 the last layer (cut [3]).
    costs = [1.0] * LAYERS
    costs[0 if rank == 0 else -1] = 3.0
    clock = LayerClock(costs)
    stages = split_sequential(model, world_size, balance="auto", example_input=x, repeats=1,
                              timer=clock)  # fmt: skip
    pipe = Pipeline(stages[rank], stage_index=rank, num_stages=world_size, loss_fn=nn.MSELoss(),
                    num_microbatches=2, timeout_s=TIMEOUT_S)  # fmt: skip
    loss = pipe.step(x, y)
    return {
        "sizes": [len(s) for s in stages],
        "clock_read": clock.calls > 0,
        "loss": loss,
        "grads": {n: p.grad for n, p in stages[rank].named_parameters()},
    }


def test_auto_balance_takes_the_first_ranks_cuts_on_every_rank() -> None:
    ranks = run_multiprocess(_balanced_rank, 2, timeout=3 * TIMEOUT_S, group_timeout=TIMEOUT_S)
    assert [r["sizes"] for r in ranks] == [[1, 3], [1, 3]]  # rank 0's cuts, on both ranks
    assert [r["clock_read"] for r in ranks] == [True, False]  # only rank 0 timed the layers
    model = _model()
    x, y = _batch()
    whole = nn.MSELoss()(model(x), y)
    whole.backward()
    torch.testing.assert_close(ranks[1]["loss"], whole.detach(), rtol=1e-12, atol=1e-12)
    want = dict(model.named_parameters())
    got = {**ranks[0]["grads"], **ranks[1]["grads"]}
    assert sorted(got) == sorted(want)  # every layer once
    for name, grad in got.items():
        torch.testing.assert_close(grad, want[name].grad, rtol=1e-12, atol=1e-12, msg=name)


def _differently_cut(rank: int, world_size: int) -> tuple[str, str, float]:
    stages = split_sequential(_model(), [2] if rank == 0 else [1])
    start = time.monotonic()
    try:
        pipe = Pipeline(stages[rank], stage_index=rank, num_stages=world_size,
                        loss_fn=nn.MSELoss(), num_microbatches=2, timeout_s=TIMEOUT_S)  # fmt: skip
        pipe.step(*_batch())
    except Exception as error:  # the test inspects what every rank raised
        return type(error).__name__, str(error), time.monotonic() - start
    return "ok", "", time.monotonic() - start


def test_stages_cut_differently_raise_on_every_rank() -> None:
    outcomes = run_multiprocess(_differently_cut, 2, timeout=3 * TIMEOUT_S,
                                group_timeout=TIMEOUT_S)  # fmt: skip
    for kind, message, seconds in outcomes:
        assert kind == "ValueError", (kind, message)
        assert "do not fit together" in message, message
        assert (
            "stage 0 (group rank 0) holds layers [0, 2), stage 1 (group rank 1) holds layers "
            "[1, 4): layers [1, 2) run twice"
        ) in message, message
        assert seconds < TIMEOUT_S / 2  # judged at the handshake, not waited out


def _mismatched_balance(rank: int, world_size: int, case: str) -> tuple[str, str]:
    model = _model()
    num_stages, example = 2, _batch()[0]
    if case == "count" and rank == 1:
        num_stages = 3
    if case == "argument" and rank == 1:
        example = None
    try:
        split_sequential(model, num_stages, balance="auto", example_input=example, repeats=1)
    except Exception as error:  # the test inspects what every rank raised
        return type(error).__name__, str(error)
    return "ok", ""


@pytest.mark.parametrize(
    "case, expected",
    [
        ("count", [("ValueError", r"the stage count differs across the group: \[2, 3\]")] * 2),
        (
            "argument",
            [
                ("RuntimeError", r"failed on group rank\(s\) \[1\]"),
                ("ValueError", "needs an example_input"),
            ],
        ),
    ],
)
def test_auto_balance_mismatches_raise_on_every_rank(
    case: str, expected: list[tuple[str, str]]
) -> None:
    outcomes = run_multiprocess(_mismatched_balance, 2, args=(case,), timeout=3 * TIMEOUT_S,
                                group_timeout=TIMEOUT_S)  # fmt: skip
    for (kind, message), (want_kind, pattern) in zip(outcomes, expected, strict=True):
        assert kind == want_kind, (kind, message)
        assert re.search(pattern, message), message


def test_stages_know_their_layers_through_wrappers() -> None:
    stages = split_sequential(_model(), [1, 3])
    assert [(x.start, x.end, x.total) for x in map(stage_layers, stages)] == [
        (0, 1, LAYERS),
        (1, 3, LAYERS),
        (3, 4, LAYERS),
    ]
    wrapper = nn.Module()
    wrapper.module = stages[1]  # as fastpar's DataParallel holds its module
    assert stage_layers(wrapper) == stage_layers(stages[1])
    assert stage_layers(nn.Sequential(*stages[1])) is None  # rebuilt: not checked


def test_a_group_without_torch_distributed_is_refused() -> None:
    with pytest.raises(ValueError, match=r"group: .*torch\.distributed is not initialised"):
        split_sequential(_model(), 2, balance="auto", example_input=_batch()[0],
                         group=object())  # type: ignore[arg-type]  # fmt: skip
