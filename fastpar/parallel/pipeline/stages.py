"""Cutting an `nn.Sequential` into pipeline stages: at given layers, or where profiling says
the slowest stage is fastest (`balance="auto"`, measured on one rank and shared, so that every
rank cuts the same way). Each stage records which of the model's layers it holds
(`StageLayers`), which the pipeline's handshake compares across ranks."""

from __future__ import annotations

import itertools
import numbers
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastpar._checks import check_choice, check_int, check_member
from fastpar._logging import get_logger

__all__ = [
    "LayerProfile",
    "OutputOnly",
    "StageLayers",
    "balanced_cuts",
    "measured_cuts",
    "profile_layers",
    "split_sequential",
    "stage_layers",
]

logger = get_logger(__name__)

Balance = Literal["auto"]


@dataclass(frozen=True)
class LayerProfile:
    """One layer's measured cost.

    Attributes:
        seconds: forward + backward time (the fastest repeat: load on the machine only adds).
        output_bytes: size of its output: what a cut after it sends each micro-batch.
    """

    seconds: float
    output_bytes: int


@dataclass(frozen=True)
class StageLayers:
    """The layers of the split model that a stage of `split_sequential` holds (its attribute
    `split_layers`): the pipeline's handshake checks that the stages of all ranks hold every
    layer once, in order.

    Attributes:
        start, end: the stage is the model's layers [start, end).
        total: the model's number of layers.
    """

    start: int
    end: int
    total: int


def split_sequential(
    model: nn.Sequential,
    split_points: Sequence[int] | int,
    *,
    balance: Balance | None = None,
    example_input: Tensor | None = None,
    repeats: int = 5,
    timer: Callable[[], float] = time.perf_counter,
    group: dist.ProcessGroup | None = None,
) -> list[nn.Sequential]:
    """Cut an `nn.Sequential` into consecutive stages.

    Arguments:
        model: the model; it is not modified, and the stages hold its own layers (no copies),
            so training the stages trains `model`.
        split_points: indices of the layers that start a new stage, strictly increasing, in
            (0, len(model)) (k split points give k + 1 stages); or, with balance="auto", the
            number of stages.
        balance: "auto": time each layer's forward and backward on `example_input` (see
            `profile_layers`) and cut where the slowest stage is fastest (`balanced_cuts`).
            Where torch.distributed is initialised this is a collective over `group`: every
            rank of it must call split_sequential together, with the same model and stage
            count; the group's first rank times the layers and every rank takes its cuts
            (timings differ from rank to rank, and ranks that cut differently would train
            another model). Bad arguments on any rank raise on every rank. (To time on this
            rank alone, pass `measured_cuts(...)` as split_points.)
        example_input: a micro-batch as the first stage gets it (needed with balance).
        repeats: timed runs per layer with balance (the fastest counts).
        timer: the clock profiling reads, in seconds.
        group: the ranks that agree on balance="auto"'s cuts (None: the default group); used
            only with balance, and only where torch.distributed is initialised.

    Returns:
        The stages: stage i is `model[split_points[i-1] : split_points[i]]`, an `nn.Sequential`
        whose layers keep their names in `model` ("4", not "0"), as torch.distributed.pipelining
        keeps fully qualified names: a stage's `state_dict()` keys are the model's, so it loads
        into `model` (or a stage of another split) by key, and the stages' state dicts merge
        into the model's. (`nn.Sequential.append` names a layer by the stage's length, which
        may be a name the stage holds already: add layers to `model` before splitting.) Each
        stage's `split_layers` is its `StageLayers`.
    """
    if balance is not None:

        def measure() -> list[int]:
            num_stages = _checked_balance(model, split_points, balance, example_input)
            assert example_input is not None
            return measured_cuts(model, num_stages, example_input, repeats=repeats, timer=timer)

        if dist.is_available() and dist.is_initialized():
            points = _cuts_of_first_rank(model, split_points, balance, example_input, measure,
                                         group)  # fmt: skip
        elif group is not None:
            raise ValueError(
                "group: balance='auto' agrees on the cuts over a process group, but "
                "torch.distributed is not initialised"
            )
        else:
            points = measure()
    else:
        _check_model(model)
        points = _given_points(split_points)
    return _cut(model, points)


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model must be an nn.Sequential, got {type(model).__name__}")
    if len(model) == 0:
        raise ValueError("model has no layers to split into stages")


def _checked_balance(
    model: nn.Sequential, split_points: object, balance: object, example_input: Tensor | None
) -> int:
    """The stage count of balance="auto"; raises naming the argument that is wrong."""
    _check_model(model)
    check_choice("balance", balance, ("auto",))
    num_stages = check_int("num_stages", split_points, 1, len(model))
    if example_input is None:
        raise ValueError('balance="auto" needs an example_input to time the layers on')
    return num_stages


def _cuts_of_first_rank(
    model: nn.Sequential,
    split_points: object,
    balance: object,
    example_input: Tensor | None,
    measure: Callable[[], list[int]],
    group: dist.ProcessGroup | None,
) -> list[int]:
    """balance="auto" over a process group: its first rank measures, every rank takes the cuts.

    Every rank's outcome (its arguments checked, and on the first rank the cuts or the error)
    is gathered on every rank and judged the same way, so a bad argument or a failed
    measurement anywhere raises on every rank instead of leaving the others waiting."""
    group = group if group is not None else dist.group.WORLD
    me = check_member(group)
    error: Exception | None = None
    cuts: list[int] | None = None
    try:
        if me == 0:
            cuts = measure()
        else:
            _checked_balance(model, split_points, balance, example_input)
    except Exception as caught:  # raised below, once every rank has heard of it
        error = caught
    layers = len(model) if isinstance(model, nn.Sequential) else -1
    counted = isinstance(split_points, numbers.Integral) and not isinstance(split_points, bool)
    count = int(split_points) if counted else -1  # type: ignore[call-overload]
    row = (error is None, count, layers, cuts)
    table: list[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(table, row, group=group)
    if error is not None:
        raise error
    rows: list[tuple[bool, int, int, list[int] | None]] = table  # type: ignore[assignment]
    failed = [rank for rank, (ok, *_) in enumerate(rows) if not ok]
    if failed:
        raise RuntimeError(
            f"split_sequential(balance='auto') failed on group rank(s) {failed} (see their error)"
        )
    for name, column in (("the stage count", 1), ("the model's number of layers", 2)):
        values = [r[column] for r in rows]
        if len(set(values)) != 1:
            raise ValueError(
                f"split_sequential(balance='auto'): {name} differs across the group: {values}"
            )
    assert rows[0][3] is not None
    return list(rows[0][3])


def _given_points(split_points: object) -> list[object]:
    if isinstance(split_points, numbers.Integral) and not isinstance(split_points, bool):
        raise ValueError(
            f"split_points {split_points} is a stage count: pass balance='auto' and an "
            "example_input, or the layer indices where stages start"
        )
    if isinstance(split_points, Iterable):
        return list(split_points)
    raise TypeError(
        "split_points must be a list of the layer indices where stages start, got "
        f"{type(split_points).__name__} {split_points!r}"
    )


def _cut(model: nn.Sequential, given: Sequence[object]) -> list[nn.Sequential]:
    """The stages starting at the layers `given` (checked here), each with its `split_layers`."""
    points = [check_int(f"split_points[{index}]", point, 0) for index, point in enumerate(given)]
    bounds = [0, *points, len(model)]
    for index, point in enumerate(points):
        if not bounds[index] < point < len(model):
            raise ValueError(
                f"split_points must be strictly increasing in (0, {len(model)}) for a model of "
                f"{len(model)} layers, got {points}"
            )
    # Every entry of `_modules`, not `named_children()`, which skips a layer used twice.
    named = list(model._modules.items())
    stages = []
    for start, end in itertools.pairwise(bounds):
        stage = nn.Sequential(OrderedDict(named[start:end]))
        stage.split_layers = StageLayers(start, end, len(model))
        stages.append(stage)
    _warn_of_shared_parameters(stages)
    return stages


def stage_layers(stage: nn.Module) -> StageLayers | None:
    """The layers a stage of `split_sequential` holds, looking through wrappers that keep the
    stage as `module` (fastpar's DataParallel); None for a stage built otherwise."""
    module: object = stage
    while isinstance(module, nn.Module):
        layers = getattr(module, "split_layers", None)
        if isinstance(layers, StageLayers):
            return layers
        module = getattr(module, "module", None)
    return None


def _warn_of_shared_parameters(stages: Sequence[nn.Module]) -> None:
    """Say which stages share a parameter (tied weights, e.g. an embedding and the output
    layer): a rank adds into its `.grad` the gradient of its own stages' uses only."""
    holders: dict[int, list[tuple[int, str]]] = {}
    for index, stage in enumerate(stages):
        for name, param in stage.named_parameters():  # once per stage, even if used twice
            holders.setdefault(id(param), []).append((index, name))
    for places in holders.values():
        if len({index for index, _ in places}) > 1:
            logger.warning(
                "stages %s share a parameter (%s): its gradient is whole only on a rank that "
                "holds all of them (zbv's rank 0 holds the first and the last stage); "
                "elsewhere sum it across those ranks before the optimizer step",
                [index for index, _ in places],
                ", ".join(f"stage {index} {name}" for index, name in places),
            )


def measured_cuts(
    model: nn.Sequential,
    num_stages: int,
    example_input: Tensor,
    *,
    repeats: int = 5,
    timer: Callable[[], float] = time.perf_counter,
) -> list[int]:
    """balance="auto"'s split points: each layer timed (`profile_layers`), the cuts where the
    slowest stage is fastest (`balanced_cuts`); logs each stage's measured cost."""
    profiles = profile_layers(model, example_input, repeats=repeats, timer=timer)
    points = balanced_cuts([p.seconds for p in profiles], num_stages,
                           [p.output_bytes for p in profiles])  # fmt: skip
    bounds = [0, *points, len(profiles)]
    costs = [sum(p.seconds for p in profiles[a:b]) for a, b in itertools.pairwise(bounds)]
    logger.info(
        "balanced cuts %s: stage costs %s ms (slowest %.2fx the mean)", points,
        [round(c * 1e3, 3) for c in costs], max(costs) * len(costs) / sum(costs),
    )  # fmt: skip
    return points


def profile_layers(
    model: nn.Sequential,
    example_input: Tensor,
    *,
    repeats: int = 5,
    timer: Callable[[], float] = time.perf_counter,
) -> list[LayerProfile]:
    """Time each layer's forward and backward, feeding it the previous layer's output.

    The layers are timed in rounds, each round once through every layer, and a layer's cost is
    its fastest round: a burst of load on the machine then slows one round of a few layers,
    which the other rounds outvote, instead of every repeat of one layer (identical layers
    timed back to back differed by a quarter under load, enough to move a cut). The backward
    of a layer gets a gradient of ones for its output (its cost does not depend on the
    values); parameters' `.grad` and the buffers (BatchNorm's running statistics) are restored
    afterwards, and `example_input` is left as it was. Layers whose output carries no gradient
    (integer ids) are timed forward only.
    """
    check_int("repeats", repeats, 1)
    saved = [(p, None if p.grad is None else p.grad.clone()) for p in model.parameters()]
    buffers = [(b, b.clone()) for b in model.buffers()]
    # Every layer gets a copy of its input: a layer working in place (ReLU(inplace=True)) would
    # otherwise overwrite example_input, and refuse a leaf that requires grad.
    inputs = [example_input]
    with torch.no_grad():
        for index, layer in enumerate(model):
            output = layer(inputs[-1].clone())
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"layer {index} ({type(layer).__name__}) returned {type(output).__name__}; "
                    "a pipeline stage passes on one Tensor (wrap modules returning tuples, such "
                    "as LSTMs, in OutputOnly)"
                )
            inputs.append(output)
    times: list[list[float]] = [[] for _ in model]
    sizes = [0] * len(model)
    for _ in range(repeats + 1):  # the first round warms up (allocations, lazy init)
        for index, layer in enumerate(model):
            x = inputs[index]
            leaf = x.detach().requires_grad_(x.is_floating_point())
            fed = leaf.clone()  # with a grad_fn when leaf requires grad: no leaf, see above
            start = timer()
            y = layer(fed)
            if y.requires_grad:
                y.backward(torch.ones_like(y))
            times[index].append(timer() - start)
            sizes[index] = y.numel() * y.element_size()
    for param, grad in saved:
        param.grad = grad
    with torch.no_grad():
        for buffer, value in buffers:
            buffer.copy_(value)
    return [LayerProfile(min(t[1:]), size) for t, size in zip(times, sizes, strict=True)]


def balanced_cuts(
    costs: Sequence[float], num_stages: int, output_bytes: Sequence[int] | None = None
) -> list[int]:
    """The split points that minimise the slowest stage (the sum of its layers' costs); among
    equally slow choices, the one sending the fewest bytes between stages.

    Arguments:
        costs: per layer, its time (any unit).
        num_stages: p, in [1, len(costs)].
        output_bytes: per layer, its output size (None: all equal).

    Returns:
        p - 1 strictly increasing indices in (0, len(costs)).
    """
    n = len(costs)
    check_int("num_stages", num_stages, 1, n)
    sent = list(output_bytes) if output_bytes is not None else [0] * n
    prefix = [0.0, *itertools.accumulate(costs)]
    inf = (float("inf"), float("inf"))
    # best[s][i]: (slowest stage, bytes sent) for the first i layers in s stages; cut[s][i]:
    # where the last of those stages starts. A linear-partition dynamic programme.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = (0.0, 0)
    for s in range(1, num_stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                previous = best[s - 1][j]
                if previous == inf:
                    continue
                value = (
                    max(previous[0], prefix[i] - prefix[j]),
                    previous[1] + (sent[j - 1] if j > 0 else 0),
                )
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    points, i = [], n
    for s in range(num_stages, 1, -1):
        i = cut[s][i]
        points.append(i)
    return points[::-1]


class OutputOnly(nn.Module):
    """Keeps the first element of a module's tuple output, e.g. the output sequence of an LSTM
    (which returns `(output, (h, c))`), so the stage passes on one tensor.

    Arguments:
        module: the wrapped module; its parameters are this module's.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: object, **kwargs: object) -> Tensor:
        return self.module(*args, **kwargs)[0]
