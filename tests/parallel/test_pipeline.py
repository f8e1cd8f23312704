"""Pipeline against single-process training: the gradients of every stage and the loss equal
those of the whole model on the whole batch, for every schedule (two chunks per rank for
interleaved-1f1b and zbv; split backwards with deferred weight passes for zero-bubble and zbv,
with fastpar's LSTMs split as well (fastpar::lstm_aten_layer)), 1, 2 and 3 ranks holding 1 to
6 stages, 1 to 8 micro-batches (some not dividing the batch), micro-batches of differing
shapes (small ones and ones that outgrow the transport's slots), an LSTM stack cut between two
stages, integer activations that carry no gradient, stages that start with an in-place layer
(and stages that leave their input alone, which take it without an alias), both loss
reductions, and gradients accumulated over steps; over the shared-memory pipes (the default on
one host) and over gloo. The inputs stay unmodified, and the profiler sees a range per
micro-batch and transfer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity

from fastpar.nn import LSTM
from fastpar.parallel.pipeline import (
    OutputOnly,
    Pipeline,
    PipelineConfig,
    shm_link,
    split_sequential,
)
from fastpar.parallel.pipeline.microbatches import first_microbatch, loss_weights, split_batch
from fastpar.parallel.pipeline.plan import _leaves_input_alone
from fastpar.parallel.pipeline.schedules import Placement
from fastpar.parallel.pipeline.wire import MAX_SLOT_BYTES, next_slot_bytes
from fastpar.testing.distributed import run_multiprocess

IN, WIDTH, OUT = 6, 16, 3
VOCAB = 13
# Split points per model and stage count. "lstm": mid-stack (the stack is layers 1..3);
# "tokens": integer activations (no gradient goes back) out of the first stage.
# "deep": an MLP with a LayerNorm, cut into up to 6 stages (2 chunks on each of 3 ranks).
# "inplace": every stage but the first starts with ReLU(inplace=True), which modifies the
# received input.
SPLITS = {
    "mlp": {1: [], 2: [3], 3: [2, 3]},
    "lstm": {1: [], 2: [3], 3: [2, 3], 4: [1, 2, 3]},
    "tokens": {2: [1], 3: [1, 2]},
    "deep": {1: [], 2: [3], 3: [2, 4], 4: [2, 3, 5], 6: [1, 2, 3, 4, 5]},
    "inplace": {2: [1], 4: [1, 3, 5]},
}
SCHEDULES = ("gpipe", "1f1b")  # one stage per rank, the most cases
CHUNKED = {"interleaved-1f1b": 2, "zbv": 2}  # chunks per rank
NEW = ("interleaved-1f1b", "zero-bubble", "zbv")
RTOL, ATOL = 1e-5, 1e-6  # float32; micro-batching changes only the order of summation
SMALL_PIPE = 8192  # bytes: the "long" cases' activations (up to ~10 KiB) do not fit whole


@dataclass(frozen=True)
class Case:
    # "mlp", "deep", "inplace": rows (B, IN); "lstm": sequence-first (T, B, IN); "tokens": ids
    model: str
    schedule: str
    num_microbatches: int
    batch: int = 12
    variable: bool = False  # micro-batches given as a list of differing shapes
    steps: int = 1  # gradients accumulate over the steps, as in training without zero_grad
    long: bool = False  # variable micro-batches of up to ~10 KiB, longer after step 0
    profiled: bool = False  # collect the profiler ranges of the step
    reduction: str = "mean"  # of the loss; "sum" adds the micro-batches' losses unweighted
    transport: str = "auto"  # "auto" is the shared-memory pipe here (one host, gloo)

    @property
    def batch_dim(self) -> int:
        return 1 if self.model == "lstm" else 0

    def num_stages(self, world_size: int) -> int:
        return CHUNKED.get(self.schedule, 1) * world_size

    def placement(self, world_size: int) -> Placement:
        return Placement.of(self.schedule, world_size, self.num_stages(world_size))  # type: ignore[arg-type]

    def __str__(self) -> str:
        shape = ("long" if self.long else "variable") if self.variable else f"B{self.batch}"
        name = f"{self.model}-{self.schedule}-m{self.num_microbatches}-{shape}-x{self.steps}"
        name += ("-profiled" if self.profiled else "") + f"-{self.reduction}"
        return name + ("" if self.transport == "auto" else f"-{self.transport}")


class Tokens(nn.Module):
    """Integer ids in [0, VOCAB): an activation that carries no gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.remainder(VOCAB)


def _model(kind: str) -> nn.Sequential:
    torch.manual_seed(1234)
    if kind == "tokens":
        return nn.Sequential(Tokens(), nn.Embedding(VOCAB, WIDTH), nn.Linear(WIDTH, OUT))
    if kind == "deep":
        return nn.Sequential(
            nn.Linear(IN, WIDTH),
            nn.Tanh(),
            nn.Linear(WIDTH, WIDTH),
            nn.LayerNorm(WIDTH),
            nn.Linear(WIDTH, WIDTH),
            nn.Tanh(),
            nn.Linear(WIDTH, OUT),
        )
    if kind == "inplace":
        return nn.Sequential(
            nn.Linear(IN, WIDTH),
            nn.ReLU(inplace=True),
            nn.Linear(WIDTH, WIDTH),
            nn.ReLU(inplace=True),
            nn.Linear(WIDTH, WIDTH),
            nn.ReLU(inplace=True),
            nn.Linear(WIDTH, OUT),
        )
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(IN, WIDTH),
            nn.Tanh(),
            nn.Linear(WIDTH, WIDTH),
            nn.Tanh(),
            nn.Linear(WIDTH, OUT),
        )
    return nn.Sequential(
        nn.Linear(IN, WIDTH),
        OutputOnly(LSTM(WIDTH, WIDTH, num_layers=2, backend="torch")),
        OutputOnly(LSTM(WIDTH, WIDTH, backend="torch")),
        nn.Linear(WIDTH, OUT),
    )


def _data(case: Case, step: int) -> tuple[Any, Any]:
    """Inputs and targets of one step: a batch tensor, or a list of micro-batches whose batch
    sizes and sequence lengths differ."""
    generator = torch.Generator().manual_seed(100 * step + case.num_microbatches)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    if case.model == "tokens":
        ids = torch.randint(0, 10 * VOCAB, (case.batch, 4), generator=generator)
        return ids, randn(case.batch, 4, OUT)
    if not case.variable:
        if case.model != "lstm":
            return randn(case.batch, IN), randn(case.batch, OUT)
        return randn(5, case.batch, IN), randn(5, case.batch, OUT)
    # Micro-batch k: batch 1 + k % 3, length 2 + (3 * k) % 5 (rows of sequences for "mlp").
    # "long" activations (up to ~10 KiB) outgrow the transport's first slots (4 KiB) in step
    # 0, the grown ones in step 1, and fit in step 2: the split and the inline paths both run.
    stretch = (10 + 5 * min(step, 1)) if case.long else 1
    shapes = [(1 + k % 3, (2 + (3 * k) % 5) * stretch) for k in range(case.num_microbatches)]
    if case.model != "lstm":
        return [randn(b, t, IN) for b, t in shapes], [randn(b, t, OUT) for b, t in shapes]
    return [randn(t, b, IN) for b, t in shapes], [randn(t, b, OUT) for b, t in shapes]


def _reference(case: Case, world_size: int) -> tuple[list[float], list[list[torch.Tensor]]]:
    """Single-process training: the losses of every step and the accumulated gradients of
    each rank's parameters (its stages in the order it holds them)."""
    model = _model(case.model)
    loss_fn = nn.MSELoss(reduction=case.reduction)
    losses = []
    for step in range(case.steps):
        inputs, targets = _data(case, step)
        if case.variable:
            # The batch is the union of the micro-batches: each one's mean loss weighs by its
            # share of the sequences.
            total = sum(t.shape[case.batch_dim] for t in targets)
            loss = sum(
                loss_fn(model(x), y)
                * (y.shape[case.batch_dim] / total if case.reduction == "mean" else 1.0)
                for x, y in zip(inputs, targets, strict=True)
            )
        else:
            loss = loss_fn(model(inputs), targets)
        loss.backward()
        losses.append(loss.item())
    placement = case.placement(world_size)
    stages = split_sequential(model, SPLITS[case.model][placement.num_stages])
    return losses, [
        [p.grad.clone() for s in placement.stages_of(rank) for p in stages[s].parameters()]
        for rank in range(world_size)
    ]


DEFAULT_PIPE = shm_link.PIPE_CAPACITY


def _run_cases(rank: int, world_size: int, cases: list[Case]) -> dict[str, Any]:
    results = {}
    for case in cases:
        placement = case.placement(world_size)
        stages = split_sequential(_model(case.model), SPLITS[case.model][placement.num_stages])
        mine = placement.stages_of(rank)
        chunks = [stages[s] for s in mine]
        # Long cases stream through a pipe smaller than their activations.
        shm_link.PIPE_CAPACITY = SMALL_PIPE if case.long else DEFAULT_PIPE
        # Chunks as a list, or (torch-transport cases) as the ModuleList Pipeline.module holds.
        given = chunks if case.transport != "torch" else nn.ModuleList(chunks)
        pipe = Pipeline(
            chunks[0] if len(mine) == 1 else given,
            stage_index=mine[0] if len(mine) == 1 else list(mine),
            num_stages=placement.num_stages,
            loss_fn=nn.MSELoss(reduction=case.reduction),
            loss_reduction=case.reduction,
            schedule=case.schedule,
            num_microbatches=case.num_microbatches,
            batch_dim=case.batch_dim,
            timeout_s=60,
            transport=case.transport,
        )
        want = "torch" if case.transport == "torch" else "shm"
        assert set(pipe.transports.values()) <= {want, "local"}, pipe.transports
        per_microbatch = len(mine) * (3 if case.schedule in ("zero-bubble", "zbv") else 2)
        losses, splits, ranges = [], [], set()
        for step in range(case.steps):
            inputs, targets = _data(case, step)
            before = [t.clone() for t in (inputs if case.variable else [inputs])]
            if case.profiled:
                with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as profile:
                    loss = pipe.step(inputs, targets)
                ranges = {e.name for e in profile.events() if e.name.startswith("fastpar.pp")}
            else:
                loss = pipe.step(inputs, targets)
            after = inputs if case.variable else [inputs]
            unchanged = all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
            stats = pipe.last_stats
            timed = (
                0 < stats.compute_s <= stats.step_s
                and 0 <= stats.bubble < 1
                and sorted(a.microbatch for a in stats.per_microbatch)
                == sorted(per_microbatch * list(range(case.num_microbatches)))
            )
            losses.append((None if loss is None else loss.item(), unchanged, timed))
            splits.append(pipe.last_stats.split_sends)
        grads = [p.grad.numpy() for chunk in chunks for p in chunk.parameters()]
        results[str(case)] = (losses, grads, splits, ranges)
    return results


CASES: dict[int, list[Case]] = {
    1: [Case("mlp", s, 5) for s in SCHEDULES],  # one stage: micro-batching alone
    2: [Case("mlp", s, m) for s in SCHEDULES for m in range(1, 9)]  # 5, 7, 8 do not divide 12
    + [Case("mlp", s, 4, variable=True) for s in SCHEDULES]
    + [
        Case("mlp", s, 6, variable=True, long=True, steps=3, transport=t)
        for s in SCHEDULES
        for t in ("auto", "torch")
    ]
    + [Case("mlp", s, m, transport="torch") for s in SCHEDULES for m in (1, 5, 8)]
    + [Case("mlp", s, 5, reduction="sum") for s in SCHEDULES]
    + [Case("tokens", s, 3, steps=2) for s in SCHEDULES]
    + [Case("lstm", s, 3, batch=5) for s in SCHEDULES]
    + [Case("lstm", "1f1b", 4, variable=True, steps=2)],
    3: [Case("mlp", s, m) for s in SCHEDULES for m in (1, 2, 3, 7)]
    + [Case("mlp", s, 5, batch=11, steps=2) for s in SCHEDULES]
    + [Case("mlp", s, 6, variable=True) for s in SCHEDULES]
    + [Case("lstm", "gpipe", 3, variable=True, reduction="sum")]
    + [Case("tokens", s, 4, steps=2) for s in SCHEDULES]
    + [Case("lstm", s, 3, batch=5) for s in SCHEDULES]
    + [Case("lstm", "gpipe", 4, variable=True)]
    + [Case("lstm", s, 4, variable=True, transport="torch") for s in SCHEDULES]
    + [Case("mlp", "1f1b", 3, profiled=True)]
    + [Case("mlp", "gpipe", 3, profiled=True, transport="torch")]
    + [Case("deep", s, m) for s in NEW for m in (2, 5)]
    + [Case("deep", s, 6, variable=True, transport="torch") for s in NEW]
    + [Case("lstm", "zero-bubble", 4, variable=True, steps=2)],
}
# Several chunks per rank and split backwards: 2 ranks hold 4 stages with interleaved-1f1b and
# zbv; one rank holds 2 (its links are local).
CASES[1] += [Case("deep", s, 5) for s in NEW]
CASES[2] += (
    [Case("deep", s, m) for s in NEW for m in (1, 3, 4, 8)]
    + [Case("deep", s, 4, variable=True, steps=2) for s in NEW]
    + [
        Case("deep", s, 6, variable=True, long=True, steps=3, transport=t)
        for s in ("interleaved-1f1b", "zbv")
        for t in ("auto", "torch")
    ]
    + [Case("deep", "zero-bubble", 5, reduction="sum"), Case("tokens", "zero-bubble", 3, steps=2)]
    + [Case("lstm", s, 3, batch=5) for s in NEW]
    + [Case("lstm", "zbv", 4, variable=True, transport="torch")]
    # zbv's V turn hands the input over within a rank (LocalLink).
    + [Case("inplace", s, 4) for s in ("1f1b", "zero-bubble", "zbv")]
    + [Case("inplace", "interleaved-1f1b", 3, transport="torch")]
)


@pytest.fixture(scope="module")
def pipeline_results() -> dict[int, list[dict[str, Any]]]:
    return {
        world_size: run_multiprocess(_run_cases, world_size, args=(cases,), timeout=120)
        for world_size, cases in CASES.items()
    }


@pytest.mark.parametrize(
    "world_size, case",
    [(w, c) for w, cases in CASES.items() for c in cases],
    ids=lambda v: str(v),
)
def test_gradients_match_single_process(
    pipeline_results: dict[int, list[dict[str, Any]]], world_size: int, case: Case
) -> None:
    ref_losses, ref_grads = _reference(case, world_size)
    for rank, per_rank in enumerate(pipeline_results[world_size]):
        losses, grads, splits, ranges = per_rank[str(case)]
        assert all(unchanged for _, unchanged, _ in losses), "the step modified its inputs"
        assert all(timed for _, _, timed in losses), "inconsistent StepStats"
        assert len(grads) == len(ref_grads[rank])
        assert len(grads) > 0 or (case.model == "tokens" and rank == 0)
        for index, (got, want) in enumerate(zip(grads, ref_grads[rank], strict=True)):
            torch.testing.assert_close(
                torch.from_numpy(got),
                want,
                rtol=RTOL,
                atol=ATOL,
                msg=lambda m, r=rank, i=index: f"stage {r} parameter {i}: {m}",
            )
        if case.long and case.transport == "torch":
            # Activations outgrow the first slots and the once-grown ones, then fit.
            assert splits[0] > 0 and splits[1] > 0 and splits[2] == 0, splits
        elif case.long:
            # From step 1 some activations are larger than the whole pipe: they stream
            # through it, finished by its sender thread.
            assert all(count > 0 for count in splits[1:]), splits
        else:
            assert splits == [0] * case.steps, splits
        if case.profiled:
            assert ranges == _expected_ranges(rank, world_size, case.num_microbatches)
        if rank == case.placement(world_size).stage_ranks[-1]:
            assert [loss for loss, _, _ in losses] == pytest.approx(ref_losses, rel=RTOL)
        else:
            assert all(loss is None for loss, _, _ in losses)


def _expected_ranges(rank: int, world_size: int, num_microbatches: int) -> set[str]:
    """Profiler ranges per micro-batch: forward, backward, and the transfers of the stage."""
    kinds = ["forward.mb", "backward.mb"]
    if rank > 0:
        kinds += ["recv.activation", "send.gradient"]
    if rank < world_size - 1:
        kinds += ["send.activation", "recv.gradient"]
    return {f"fastpar.pp.{kind}{k}" for kind in kinds for k in range(num_microbatches)}


# --- a received input taken as it arrived -------------------------------------------------------


class _LeafLinearInputs(TorchFunctionMode):
    """Counts the F.linear calls whose input is a leaf that requires grad: a stage's received
    input taken as it arrived, not through an alias."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        if func is F.linear and args[0].is_leaf and args[0].requires_grad:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _stage_starting_with_linear(
    rank: int, world_size: int, schedule: str, seed: int, batch: tuple[torch.Tensor, ...]
) -> tuple[int, list[np.ndarray], list[np.ndarray], tuple[str, str]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(IN, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(),
                          nn.Linear(WIDTH, OUT))  # fmt: skip
    inputs, targets = batch
    nn.MSELoss()(model(inputs), targets).backward()
    want = {id(p): p.grad.numpy().copy() for p in model.parameters()}
    model.zero_grad(set_to_none=True)
    placement = Placement.of(schedule, world_size, 2)  # type: ignore[arg-type]
    stages = split_sequential(model, [2])  # stage 1 starts with a Linear
    mine = placement.stages_of(rank)
    pipe = Pipeline([stages[s] for s in mine], stage_index=list(mine), num_stages=2,
                    schedule=schedule, loss_fn=nn.MSELoss(), num_microbatches=3,
                    timeout_s=60)  # fmt: skip
    with _LeafLinearInputs() as leaf_inputs:
        pipe.step(inputs, targets)
    mine_params = [p for s in mine for p in stages[s].parameters()]
    grads = [p.grad.numpy().copy() for p in mine_params]
    # Changed after the pipeline was built to modify its input: autograd refuses, as for any
    # leaf that requires grad, instead of computing other gradients.
    stages[1][0].register_forward_pre_hook(lambda module, args: args[0].relu_())
    try:
        pipe.step(inputs, targets)
        changed = ("ok", "")
    except RuntimeError as error:
        changed = (type(error).__name__, str(error))
    return leaf_inputs.count, grads, [want[id(p)] for p in mine_params], changed


@pytest.mark.parametrize("world_size, schedule", [(2, "1f1b"), (1, "zbv")])
def test_a_stage_that_leaves_its_input_alone_takes_it_without_an_alias(
    world_size: int, schedule: str
) -> None:
    # 1f1b: stage 1's input comes over the pipe; zbv on one rank: from stage 0 on the same rank
    # (a LocalLink), with the backward split. No alias node on the path of every micro-batch,
    # and the gradients of the whole model; and on every rank autograd's error once the stage
    # modifies its input.
    seed = int(torch.randint(2**31, ()))
    batch = (torch.randn(12, IN), torch.randn(12, OUT))
    results = run_multiprocess(
        _stage_starting_with_linear, world_size, args=(schedule, seed, batch), timeout=60
    )
    received = 0
    for rank, (count, got, want, changed) in enumerate(results):
        received += count
        assert "a leaf Variable that requires grad is being used in an in-place" in changed[1]
        for index, (g, w) in enumerate(zip(got, want, strict=True)):
            np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL, err_msg=f"rank {rank} #{index}")
    assert received == 3, "stage 1 took its 3 micro-batches through an alias"


# --- pieces that need no processes -----------------------------------------------------------


def test_split_sequential_shares_layers_and_checks_points() -> None:
    model = _model("mlp")
    stages = split_sequential(model, [1, 4])
    assert [len(s) for s in stages] == [1, 3, 1]
    assert [id(m) for s in stages for m in s] == [id(m) for m in model]
    assert len(model) == 5
    with pytest.raises(ValueError, match=r"strictly increasing in \(0, 5\).*got \[3, 3\]"):
        split_sequential(model, [3, 3])
    with pytest.raises(ValueError, match=r"got \[0\]"):
        split_sequential(model, [0])
    with pytest.raises(ValueError, match=r"got \[5\]"):
        split_sequential(model, [5])
    with pytest.raises(TypeError, match=r"nn\.Sequential"):
        split_sequential(nn.Linear(2, 2), [1])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_stages": 0}, "num_stages must be an integer >= 1, got 0"),
        ({"num_stages": 2, "num_microbatches": 0}, "num_microbatches must be an integer >= 1"),
        ({"num_stages": 2, "schedule": "zb"}, "schedule must be one of"),
        ({"num_stages": 2, "loss_reduction": "max"}, "loss_reduction must be one of"),
        ({"num_stages": 2, "batch_dim": -1}, "batch_dim must be an integer >= 0, got -1"),
        ({"num_stages": 2, "timeout_s": 0}, "timeout_s must be a finite number > 0, got 0"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PipelineConfig(**kwargs)


def test_slots_grow_with_a_margin_and_never_shrink() -> None:
    assert next_slot_bytes(4096, 100) == 4096
    assert next_slot_bytes(4096, 11_520) == 16_384  # 11520 * 5/4 = 14400, in 4 KiB units
    assert next_slot_bytes(16_384, 17_280) == 24_576
    assert next_slot_bytes(24_576, 2**30) == MAX_SLOT_BYTES


def test_output_only_keeps_the_lstm_output_sequence() -> None:
    lstm = LSTM(IN, WIDTH, backend="torch")
    x = torch.randn(4, 2, IN)
    np.testing.assert_array_equal(OutputOnly(lstm)(x).detach(), lstm(x)[0].detach())


class _OwnSequential(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.relu_())


def _with_forward(module: nn.Module) -> nn.Module:
    module.forward = lambda x: x.relu_()  # type: ignore[method-assign]
    return module


@pytest.mark.parametrize(
    "stage, alone",
    [
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True)), True),
        (nn.Sequential(nn.Sequential(nn.LayerNorm(4), nn.Tanh()), nn.Linear(4, 4)), True),
        (nn.Conv1d(4, 4, 3), True),
        (nn.Sequential(nn.ReLU(), nn.Linear(4, 4)), True),
        (nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 4)), False),
        (nn.Sequential(nn.Dropout(0.5), nn.Linear(4, 4)), False),  # eval: its input itself
        (nn.Sequential(nn.Identity(), nn.ReLU(inplace=True)), False),
        (nn.Sequential(), False),
        (_OwnSequential(nn.Linear(4, 4)), False),
        (nn.Sequential(_with_forward(nn.Linear(4, 4))), False),
        (OutputOnly(LSTM(4, 4, backend="torch")), False),
    ],
    ids=[
        "linear",
        "nested-layernorm",
        "conv",
        "relu",
        "relu-inplace",
        "dropout",
        "identity",
        "empty",
        "own-sequential",
        "own-forward",
        "lstm",
    ],
)
def test_only_a_stage_that_provably_leaves_its_input_alone_takes_it_without_an_alias(
    stage: nn.Module, alone: bool
) -> None:
    assert _leaves_input_alone(stage) is alone


@pytest.mark.parametrize("where", ["stage", "first layer", "every module"])
@pytest.mark.parametrize("kind", ["pre", "post"])
def test_a_forward_hook_takes_the_input_through_an_alias(where: str, kind: str) -> None:
    stage = nn.Sequential(nn.Linear(4, 4))
    assert _leaves_input_alone(stage)
    register = {
        ("stage", "pre"): stage.register_forward_pre_hook,
        ("stage", "post"): stage.register_forward_hook,
        ("first layer", "pre"): stage[0].register_forward_pre_hook,
        ("first layer", "post"): stage[0].register_forward_hook,
        ("every module", "pre"): nn.modules.module.register_module_forward_pre_hook,
        ("every module", "post"): nn.modules.module.register_module_forward_hook,
    }[where, kind]
    handle = register(lambda *args: None)  # a hook may change the input in place
    try:
        assert not _leaves_input_alone(stage)
    finally:
        handle.remove()
    assert _leaves_input_alone(stage)


BATCH_CUTS = [(64, 8, 0), (13, 5, 0), (7, 7, 1), (10, 3, 1)]  # rows, micro-batches, batch dim


def _batch(rows: int, dim: int) -> torch.Tensor:
    shape = [3, 3]
    shape[dim] = rows
    return torch.randn(shape)


@pytest.mark.parametrize("rows, microbatches, dim", BATCH_CUTS)
def test_loss_weights_of_a_tensor_are_its_pieces_shares(
    rows: int, microbatches: int, dim: int
) -> None:
    targets = _batch(rows, dim)
    pieces = split_batch("targets", targets, microbatches, dim)
    expected = [piece.shape[dim] / rows for piece in pieces]  # what each piece holds
    assert list(loss_weights(targets, microbatches, dim, "mean")) == expected
    assert list(loss_weights(pieces, microbatches, dim, "mean")) == expected
    assert list(loss_weights(targets, microbatches, dim, "sum")) == [1.0] * microbatches


@pytest.mark.parametrize("rows, microbatches, dim", BATCH_CUTS)
def test_first_microbatch_is_tensor_splits_first_piece(
    rows: int, microbatches: int, dim: int
) -> None:
    batch = _batch(rows, dim)
    expected = torch.tensor_split(batch, microbatches, dim=dim)[0]
    first = first_microbatch("inputs", batch, microbatches, dim)
    assert first.shape == expected.shape
    assert first.data_ptr() == expected.data_ptr()  # a view, like tensor_split's
    np.testing.assert_array_equal(first, expected)
    pieces = [torch.randn(2, 3) for _ in range(microbatches)]
    assert first_microbatch("inputs", pieces, microbatches, dim) is pieces[0]
    with pytest.raises(ValueError, match="inputs batch size"):
        first_microbatch("inputs", batch, rows + 1, dim)
    with pytest.raises(ValueError, match="inputs are needed"):
        first_microbatch("inputs", None, microbatches, dim)
