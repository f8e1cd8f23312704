"""Pipeline failures end in an error on every rank within a bounded time, never in a hang:
mismatched arguments at construction, a stage that raises (forward, backward, loss), a peer
that dies, a peer that stalls past `timeout_s`; over both transports (the shared-memory pipes
that "auto" picks on one host, and torch.distributed over gloo).

Each rank returns what it raised (type, message, seconds taken), so the test sees every rank's
outcome; run_multiprocess's own timeout bounds the whole run should anything hang. Every wait is
bounded by TIMEOUT_S, long enough that no load on the machine reaches it: an error that comes
within PROMPT_S came by message or by a vanished peer, not by waiting out the timeout.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastpar.parallel.pipeline import Pipeline, PipelineError
from fastpar.testing.distributed import run_multiprocess

Outcome = tuple[str, str, float]  # exception type ("ok" if none), message, seconds

TIMEOUT_S = 120.0  # the groups' and the pipelines' timeout
PROMPT_S = TIMEOUT_S / 2
RUN_S = 3 * TIMEOUT_S  # a whole run: past a wait for the timeout, which the asserts then name


def _outcome(action: Callable[[], object]) -> Outcome:
    start = time.monotonic()
    try:
        action()
    except Exception as error:  # the test inspects what every rank raised
        return type(error).__name__, str(error), time.monotonic() - start
    return "ok", "", time.monotonic() - start


class _RaiseInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("planted failure in backward")


class Planted(nn.Module):
    """A linear layer that fails at its `at`-th forward call: raises in forward or later in
    backward, kills its process, or stalls for `stall_s` seconds."""

    def __init__(self, mode: str, at: int, stall_s: float = 0.0) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.mode, self.at, self.stall_s, self.calls = mode, at, stall_s, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        y = self.linear(x)
        if self.calls - 1 != self.at:
            return y
        if self.mode == "forward":
            raise RuntimeError("planted failure in forward")
        if self.mode == "backward":
            return _RaiseInBackward.apply(y)
        if self.mode == "die":
            os._exit(3)
        if self.mode == "stall":
            threading.Event().wait(self.stall_s)  # a stage stuck in a long computation
        return y


class PlantedLoss:
    """Mean squared error that raises at its `at`-th call."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls - 1 == self.at:
            raise ValueError("planted failure in the loss")
        return nn.functional.mse_loss(output, target)


def _pipeline(rank: int, world_size: int, module: nn.Module, **kwargs: Any) -> Pipeline:
    defaults: dict[str, Any] = dict(
        stage_index=rank, num_stages=world_size, loss_fn=nn.MSELoss(), num_microbatches=4,
        timeout_s=TIMEOUT_S,
    )  # fmt: skip
    return Pipeline(module, **{**defaults, **kwargs})


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return torch.randn(8, 4, generator=generator), torch.randn(8, 4, generator=generator)


# --- construction ------------------------------------------------------------------------------


def _construct_mismatched(rank: int, world_size: int) -> list[Outcome]:
    cases: list[dict[str, Any]] = [
        {"num_stages": 3},
        {"num_stages": 2 + rank},
        {"num_microbatches": 4 + rank},
        {"schedule": "zb" if rank == 1 else "1f1b"},
        {"stage_index": 0},
        {"schedule": "gpipe" if rank == 0 else "1f1b"},
        {"loss_fn": None},
        {"transport": "shm" if rank == 0 else "auto"},
        {"transport": "tcp" if rank == 1 else "auto"},
    ]
    outcomes = [
        _outcome(lambda c=c: _pipeline(rank, world_size, nn.Linear(4, 4), **c)) for c in cases
    ]
    ddp = DistributedDataParallel(nn.Linear(4, 4))
    return [*outcomes, _outcome(lambda: _pipeline(rank, world_size, ddp))]


def test_mismatched_arguments_raise_on_every_rank() -> None:
    outcomes = run_multiprocess(_construct_mismatched, 2, timeout=RUN_S, group_timeout=TIMEOUT_S)
    expected = [
        ["num_stages 3 != group size 2", "num_stages 3 != group size 2"],
        [
            r"num_stages differs across the group: \[2, 3\] \(group size 2\)",
            "num_stages 3 != group size 2",
        ],
        [r"num_microbatches differs across the group: \[4, 5\]"] * 2,
        [r"invalid on group rank\(s\) \[1\]", "schedule must be one of"],
        [r"group ranks 0..1 hold stages \[0, 0\]"] * 2,
        [r"schedule differs across the group: \['gpipe', '1f1b'\]"] * 2,
        [r"invalid on group rank\(s\) \[1\]", r"loss_fn is needed on the last stage \(stage 1\)"],
        [r"transport differs across the group: \['shm', 'auto'\]"] * 2,
        [r"invalid on group rank\(s\) \[1\]", "transport must be one of"],
        ["DistributedDataParallel.*use fastpar.parallel.DataParallel"] * 2,
    ]
    for case, patterns in enumerate(expected):
        for rank, pattern in enumerate(patterns):
            kind, message, seconds = outcomes[rank][case]
            wanted = "TypeError" if case == len(expected) - 1 else "ValueError"
            assert kind == wanted, (case, rank, kind, message)
            assert re.search(pattern, message), (case, rank, message)
            assert seconds < PROMPT_S, (case, rank, seconds)


def _construct_outside_the_group(rank: int, world_size: int) -> Outcome:
    first_two = dist.new_group([0, 1])
    if rank == 2:  # the outsider passes what the first member does
        return _outcome(lambda: _pipeline(0, 2, nn.Linear(4, 4), group=first_two))
    pipe = _pipeline(rank, 2, nn.Linear(4, 4), group=first_two)
    x, y = _batch()
    return _outcome(lambda: pipe.step(x, y))  # the members go on without the outsider


def test_a_rank_outside_the_group_is_refused_by_name() -> None:
    outcomes = run_multiprocess(
        _construct_outside_the_group, 3, timeout=RUN_S, group_timeout=TIMEOUT_S
    )
    assert [kind for kind, _, _ in outcomes] == ["ok", "ok", "ValueError"], outcomes
    assert outcomes[2][1] == (
        "group: this process (global rank 2 of 3) is not one of the group's members; call this "
        "only on its members"
    )
    assert outcomes[2][2] < PROMPT_S


# --- a stage that raises -------------------------------------------------------------------------

RAISING_CASES = [
    # (failing stage, mode, at which forward call, schedule)
    (1, "forward", 2, "gpipe"),
    (2, "backward", 1, "1f1b"),
    (0, "forward", 0, "1f1b"),
    (2, "loss", 3, "gpipe"),
    # The first stage's last backward (of micro-batch 3 of 4) ends 1F1B: the other stages
    # have finished this step, and learn of the failure at the next one.
    (0, "backward", 3, "1f1b"),
]


TRANSPORTS = ["auto", "torch"]


def _raising_stage(rank: int, world_size: int, transport: str) -> list[list[Outcome]]:
    results = []
    for stage, mode, at, schedule in RAISING_CASES:
        # A fresh group per case: a failed step may leave messages in flight on its group.
        group = dist.new_group(list(range(world_size)))
        planted = mode if rank == stage and mode != "loss" else "none"
        module = Planted(planted, at)
        loss_fn = PlantedLoss(at if mode == "loss" and rank == stage else -1)
        pipe = _pipeline(
            rank,
            world_size,
            module,
            group=group,
            schedule=schedule,
            loss_fn=loss_fn,
            transport=transport,
        )
        x, y = _batch()
        first = _outcome(lambda p=pipe, x=x, y=y: p.step(x, y))
        again = _outcome(lambda p=pipe, x=x, y=y: p.step(x, y))
        results.append([first, again])
    return results


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_raising_stage_fails_every_rank(transport: str) -> None:
    outcomes = run_multiprocess(
        _raising_stage, 3, args=(transport,), timeout=RUN_S, group_timeout=TIMEOUT_S
    )
    for case, (stage, mode, at, _) in enumerate(RAISING_CASES):
        original = {
            "forward": "RuntimeError: planted failure in forward",
            "backward": "RuntimeError: planted failure in backward",
            "loss": "ValueError: planted failure in the loss",
        }[mode]
        told = f"stage {stage} (rank {stage}) raised {original}"
        late = (stage, mode, at) == (0, "backward", 3)
        for rank in range(3):
            (kind, message, seconds), (again_kind, again_message, _) = outcomes[rank][case]
            if rank == stage:
                assert f"{kind}: {message}" == original, (case, rank)
            elif late:
                assert kind == "ok", (case, rank, kind, message)
            else:
                assert kind == "PipelineError", (case, rank, kind, message)
                assert message == told, (case, rank)
            # Far below the timeout: the peers were told, they did not time out.
            assert seconds < PROMPT_S, (case, rank, seconds)
            assert again_kind == "PipelineError", (case, rank, again_kind)
            if late and rank != stage:
                assert again_message == told, (case, rank)
            else:
                assert "failed in an earlier step" in again_message


# --- a peer that dies or stalls ------------------------------------------------------------------


def _dying_peer(rank: int, world_size: int, transport: str) -> Outcome:
    module = Planted("die" if rank == 1 else "none", 1)
    pipe = _pipeline(rank, world_size, module, transport=transport)
    x, y = _batch()
    return _outcome(lambda: pipe.step(x, y))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_dead_peer_is_named_by_its_neighbours(transport: str) -> None:
    outcomes = run_multiprocess(
        _dying_peer, 3, args=(transport,), timeout=RUN_S, group_timeout=TIMEOUT_S, may_die=(1,)
    )
    assert outcomes[1] is None
    for rank in (0, 2):
        kind, message, seconds = outcomes[rank]
        assert kind == "PipelineError", (rank, message)
        # The neighbours see the closed connection or the process gone (not a timeout) and
        # name the dead stage.
        assert "stage 1 (rank 1) failed: the peer died" in message, (rank, message)
        assert seconds < PROMPT_S, (rank, seconds)


def _stalling_peer(
    rank: int, world_size: int, timeout_s: float, stall_s: float, transport: str
) -> Outcome:
    module = Planted("stall" if rank == 1 else "none", 0, stall_s=stall_s)
    pipe = _pipeline(
        rank, world_size, module, schedule="gpipe", timeout_s=timeout_s, transport=transport
    )
    x, y = _batch()
    return _outcome(lambda: pipe.step(x, y))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_stalled_peer_times_out_with_its_name(transport: str) -> None:
    # The stall outlasts the timeout by far: a rank that waited it out would take stall_s.
    timeout_s, stall_s = 1.0, 10.0
    args = (timeout_s, stall_s, transport)
    outcomes = run_multiprocess(_stalling_peer, 2, args=args, timeout=60)
    kind, message, seconds = outcomes[0]
    assert kind == "PipelineError", message
    assert "stage 1 (rank 1) failed" in message and "timeout_s=1" in message
    assert timeout_s <= seconds < stall_s
    # The stalled stage finds its peer gone when it resumes, and raises too.
    assert outcomes[1][0] == "PipelineError", outcomes[1]


# --- several chunks per rank --------------------------------------------------------------------

# (schedule, failing rank, its chunk (0 or 1), mode, at which call); 2 ranks, 4 global stages
# for interleaved-1f1b and zbv. zbv's loss is on rank 0; zero-bubble's backward fails in the
# input pass.
CHUNKED_CASES = [
    ("interleaved-1f1b", 1, 1, "forward", 2),
    ("zero-bubble", 1, 0, "backward", 1),
    ("zbv", 0, 1, "loss", 2),
    ("zbv", 1, 0, "forward", 1),
]


def _stages_of(rank: int, schedule: str) -> list[int]:
    if schedule == "zero-bubble":
        return [rank]
    return [rank, rank + 2] if schedule == "interleaved-1f1b" else [rank, 3 - rank]


def _chunked_pipeline(rank: int, schedule: str, chunks: list[nn.Module], **kwargs: Any) -> Pipeline:
    if schedule == "zero-bubble":
        return _pipeline(rank, 2, chunks[0], schedule=schedule, **kwargs)
    return Pipeline(chunks, stage_index=_stages_of(rank, schedule), num_stages=4,
                    schedule=schedule, num_microbatches=4, **kwargs)  # fmt: skip


def _chunked_failures(
    rank: int, world_size: int, transport: str
) -> tuple[list[Outcome], list[int | None]]:
    results, stages = [], []
    for schedule, failing, chunk, mode, at in CHUNKED_CASES:
        group = dist.new_group(list(range(world_size)))
        planted = [
            Planted(mode if (rank, c) == (failing, chunk) and mode != "loss" else "none", at)
            for c in range(2)
        ]
        loss_fn = PlantedLoss(at if mode == "loss" and rank == failing else -1)
        pipe = _chunked_pipeline(rank, schedule, planted, group=group, loss_fn=loss_fn,
                                 timeout_s=TIMEOUT_S, transport=transport)  # fmt: skip
        x, y = _batch()
        start = time.monotonic()
        try:
            pipe.step(x, y)
        except Exception as error:  # the test inspects what every rank raised
            results.append((type(error).__name__, str(error), time.monotonic() - start))
            stages.append(error.stage if isinstance(error, PipelineError) else None)
        else:
            results.append(("ok", "", time.monotonic() - start))
            stages.append(None)
    return results, stages


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_raising_chunk_fails_every_rank(transport: str) -> None:
    results = run_multiprocess(
        _chunked_failures, 2, args=(transport,), timeout=RUN_S, group_timeout=TIMEOUT_S
    )
    outcomes, culprits = zip(*results, strict=True)
    for case, (schedule, failing, chunk, mode, _) in enumerate(CHUNKED_CASES):
        # The stage of the chunk that raised, not the rank's first (zbv's loss: stage 3).
        stage = _stages_of(failing, schedule)[chunk]
        original = {
            "forward": "RuntimeError: planted failure in forward",
            "backward": "RuntimeError: planted failure in backward",
            "loss": "ValueError: planted failure in the loss",
        }[mode]
        for rank in range(2):
            kind, message, seconds = outcomes[rank][case]
            if rank == failing:
                assert f"{kind}: {message}" == original, (case, rank)
            else:
                assert kind == "PipelineError", (case, rank, kind, message)
                assert message == f"stage {stage} (rank {failing}) raised {original}", (case, rank)
                assert culprits[rank][case] == stage, (case, rank)  # PipelineError.stage
            # Far below the timeout: the peer was told, it did not time out.
            assert seconds < PROMPT_S, (case, rank, seconds)


def _dying_chunked_peer(rank: int, world_size: int, schedule: str, transport: str) -> Outcome:
    chunks = [Planted("die" if rank == 1 and c == 1 else "none", 1) for c in range(2)]
    pipe = _chunked_pipeline(rank, schedule, chunks, loss_fn=nn.MSELoss(), timeout_s=TIMEOUT_S,
                             transport=transport)  # fmt: skip
    x, y = _batch()
    return _outcome(lambda: pipe.step(x, y))


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("schedule", ["interleaved-1f1b", "zbv"])
def test_a_dead_peer_holding_two_chunks_is_named(schedule: str, transport: str) -> None:
    outcomes = run_multiprocess(
        _dying_chunked_peer, 2, args=(schedule, transport), timeout=RUN_S,
        group_timeout=TIMEOUT_S, may_die=(1,),
    )  # fmt: skip
    assert outcomes[1] is None
    kind, message, seconds = outcomes[0]
    assert kind == "PipelineError", message
    # Named by the stages at both ends of the message rank 0 waited for, not by each rank's
    # first stage: "stage 2 (rank 0): receiving gradient 0 stage 2 from stage 3 (rank 1) ..."
    # (or "sending activation 1 stage 3 to stage 3" where the send finds the peer gone).
    ends = re.search(r"^stage (\d) \(rank 0\): (receiving|sending) (activation|gradient) \d "
                     r"stage (\d) (from|to) stage (\d) \(rank 1\) failed: the peer died",
                     message)  # fmt: skip
    assert ends is not None, message
    me, kind, dest, peer = int(ends[1]), ends[3], int(ends[4]), int(ends[6])
    source = dest - 1 if kind == "activation" else dest + 1
    assert (me, peer) == ((dest, source) if ends[2] == "receiving" else (source, dest)), message
    assert seconds < PROMPT_S, seconds


# --- an in-place change of a tensor that autograd saved ------------------------------------------


def _overwritten_saved_output(rank: int, world_size: int) -> tuple[Outcome, Outcome]:
    # Tanh saves its output for its backward; the next stage's ReLU overwrites it in place.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.ReLU(inplace=True), nn.Linear(4, 1))
    x, y = torch.randn(6, 4), torch.randn(6, 1)
    whole = _outcome(lambda: nn.MSELoss()(model(x), y).backward())
    # One rank holds both stages: the activation crosses a LocalLink, without a copy.
    pipe = Pipeline([model[:2], model[2:]], stage_index=[0, 1], num_stages=2,
                    schedule="interleaved-1f1b", loss_fn=nn.MSELoss(), num_microbatches=2,
                    timeout_s=30)  # fmt: skip
    return whole, _outcome(lambda: pipe.step(x, y))


def test_an_overwritten_saved_output_fails_as_in_the_whole_model() -> None:
    (whole, piped) = run_multiprocess(_overwritten_saved_output, 1, timeout=60)[0]
    assert whole[0] == "RuntimeError" and "modified by an inplace operation" in whole[1], whole
    # Not gradients computed from the overwritten values.
    assert piped[0] == "RuntimeError" and "modified by an inplace operation" in piped[1], piped
