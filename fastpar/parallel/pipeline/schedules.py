"""Pipeline schedules as pure data: the list of actions each rank runs in one step.

No processes, no tensors: a schedule is a function of (schedule name, ranks, stages,
micro-batches), so unit tests can check dependency order and memory directly.

Glossary: w ranks; p global stages (p = v * w with v chunks per rank); m micro-batches; stage s
holds layers [cut(s), cut(s+1)); micro-batch k. Actions (see `Op`):
    F      forward of micro-batch k on stage s
    B      whole backward (input and weight gradients)
    I, W   the backward split in two: I computes the gradient of the stage's input (what the
           previous stage waits for), W the weight gradients (which nobody waits for, so it
           can fill the schedule's idle time)
    SEND / RECV of an activation (stage s to s+1) or a gradient (stage s to s-1)

Placements (which rank holds global stage s):
    "single": s on rank s (gpipe, 1f1b, zero-bubble; p == w)
    "loop":   s on rank s % w (interleaved-1f1b; v chunks per rank)
    "v":      s on rank s for s < w, else on rank 2w-1-s (zbv; v == 2, so stage 0 and the
              last stage are both on rank 0 and stages w-1, w meet on rank w-1)

GPipe and 1F1B are written out; the others come from one list scheduler (`_greedy_orders`):
it replays the pipeline with unit costs (F = I = W = 1, B = 2) and lets each free rank pick,
in this order, a ready backward, a ready forward while the rank's activation memory is under
its cap, a deferred W, or nothing. Because every order it returns was replayed with all
dependencies met, the orders cannot deadlock with any stage times (per-rank orders and data
edges form a DAG).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

# Plain data in a torch-free module: `fastpar train` checks its options with them before any
# rank starts.
from fastpar._schedule_names import PLACEMENTS as _PLACEMENTS
from fastpar._schedule_names import SCHEDULES, Schedule

__all__ = [
    "SCHEDULES",
    "Action",
    "Message",
    "Op",
    "Placement",
    "Schedule",
    "compute_orders",
    "message_of",
    "peak_activations",
    "schedule_actions",
    "splits_backward",
]

# Unit costs the list scheduler plans with (a backward is two forwards' work).
_PLAN_COST = {"F": 1, "B": 2, "I": 1, "W": 1}


class Op(enum.Enum):
    FORWARD = "F"
    BACKWARD = "B"
    BACKWARD_INPUT = "I"
    BACKWARD_WEIGHT = "W"
    SEND_ACTIVATION = "SEND_F"
    RECV_ACTIVATION = "RECV_F"
    SEND_GRADIENT = "SEND_B"
    RECV_GRADIENT = "RECV_B"


COMPUTE_OPS = frozenset({Op.FORWARD, Op.BACKWARD, Op.BACKWARD_INPUT, Op.BACKWARD_WEIGHT})


@dataclass(frozen=True, slots=True)
class Action:
    """One thing a rank does: `op` for micro-batch `microbatch` on global stage `stage`."""

    op: Op
    stage: int
    microbatch: int

    def __str__(self) -> str:
        return f"{self.op.value}{self.stage}.{self.microbatch}"


@dataclass(frozen=True, slots=True)
class Message:
    """What travels from stage `source` to stage `dest`: the activation or the gradient of
    micro-batch `microbatch`. A SEND and its matching RECV map to equal messages."""

    kind: Literal["activation", "gradient"]
    source: int
    dest: int
    microbatch: int


def message_of(action: Action) -> Message:
    """The message a SEND or RECV action moves."""
    s, k = action.stage, action.microbatch
    if action.op is Op.SEND_ACTIVATION:
        return Message("activation", s, s + 1, k)
    if action.op is Op.RECV_ACTIVATION:
        return Message("activation", s - 1, s, k)
    if action.op is Op.SEND_GRADIENT:
        return Message("gradient", s, s - 1, k)
    if action.op is Op.RECV_GRADIENT:
        return Message("gradient", s + 1, s, k)
    raise ValueError(f"{action} moves no message")


@dataclass(frozen=True)
class Placement:
    """Which rank holds each global stage.

    Attributes:
        num_ranks: w.
        stage_ranks: stage_ranks[s] is the rank of global stage s (length p).
    """

    num_ranks: int
    stage_ranks: tuple[int, ...]

    @classmethod
    def of(cls, schedule: Schedule, num_ranks: int, num_stages: int) -> Placement:
        """The placement `schedule` uses; raises ValueError if it cannot hold these counts."""
        if schedule not in _PLACEMENTS:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        kind = _PLACEMENTS[schedule]
        w, p = num_ranks, num_stages
        if kind == "single" and p != w:
            raise ValueError(
                f"schedule {schedule!r} runs one stage per rank: num_stages {p} != {w} ranks"
            )
        if kind == "loop" and p % w != 0:
            raise ValueError(
                f"schedule {schedule!r} needs num_stages a multiple of the {w} ranks, got {p}"
            )
        if kind == "v" and p != 2 * w:
            raise ValueError(f"schedule {schedule!r} needs num_stages 2 * {w} ranks, got {p}")
        if kind == "v":
            ranks = tuple(s if s < w else 2 * w - 1 - s for s in range(p))
        else:
            ranks = tuple(s % w for s in range(p))
        return cls(num_ranks=w, stage_ranks=ranks)

    @property
    def num_stages(self) -> int:
        return len(self.stage_ranks)

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """The global stages `rank` holds, ascending."""
        return tuple(s for s, r in enumerate(self.stage_ranks) if r == rank)

    def chunks(self, rank: int) -> int:
        return len(self.stages_of(rank))


def splits_backward(schedule: Schedule) -> bool:
    """Whether `schedule` splits each backward into I and W actions."""
    return schedule in ("zero-bubble", "zbv")


def compute_orders(
    schedule: Schedule, num_ranks: int, num_stages: int, num_microbatches: int
) -> list[list[Action]]:
    """Each rank's compute actions (F, B or I and W) in the order it runs them.

    Arguments:
        schedule: one of SCHEDULES.
        num_ranks: w.
        num_stages: p global stages (== w except for interleaved-1f1b (a multiple of w) and
            zbv (2 w)).
        num_microbatches: m >= 1.

    Returns:
        orders[rank]: every (stage of the rank, micro-batch) forward once and backward once
        (as B, or as I then W).
    """
    placement = Placement.of(schedule, num_ranks, num_stages)
    m = num_microbatches
    if m < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {m}")
    if schedule == "gpipe":
        return [
            [Action(Op.FORWARD, r, k) for k in range(m)]
            + [Action(Op.BACKWARD, r, k) for k in range(m)]
            for r in range(num_ranks)
        ]
    if schedule == "1f1b":
        return [_one_f_one_b(r, num_ranks, m) for r in range(num_ranks)]
    return _greedy_orders(schedule, placement, m)


def _one_f_one_b(stage: int, num_stages: int, m: int) -> list[Action]:
    # Enough warm-up forwards that the last stage's first backward can start, then one
    # forward and one backward in turn, then the remaining backwards.
    warmup = min(num_stages - stage - 1, m)
    actions = [Action(Op.FORWARD, stage, k) for k in range(warmup)]
    for k in range(m - warmup):
        actions.append(Action(Op.FORWARD, stage, warmup + k))
        actions.append(Action(Op.BACKWARD, stage, k))
    actions.extend(Action(Op.BACKWARD, stage, k) for k in range(m - warmup, m))
    return actions


def _caps(schedule: Schedule, placement: Placement, rank: int) -> tuple[int, int]:
    """(cap on chunk-activations between F and B/I, cap between F and B/W) for `rank`, in
    units of one micro-batch's activations of one chunk."""
    w, v = placement.num_ranks, placement.chunks(rank)
    if schedule == "interleaved-1f1b":
        # Megatron's warm-up depth: the first backward of the rank can start once it holds
        # (v - 1) * w + 2 (w - 1 - rank) + 1 forwards.
        full = (v - 1) * w + 2 * (w - 1 - rank) + 1
        return full, full
    if schedule == "zero-bubble":
        # 1F1B's depth for full activations; deferred W state may add up to the first
        # stage's depth, so no rank holds more than 1F1B's busiest rank.
        return w - rank, w
    # zbv: each chunk is half a rank's layers; 1F1B's busiest rank holds w micro-batches of a
    # whole rank, i.e. 2 w chunk-activations, on every rank.
    return 2 * w, 2 * w


def _greedy_orders(schedule: Schedule, placement: Placement, m: int) -> list[list[Action]]:
    w, p = placement.num_ranks, placement.num_stages
    split = splits_backward(schedule)
    strict = schedule == "interleaved-1f1b"
    backward_op = Op.BACKWARD_INPUT if split else Op.BACKWARD
    ends: dict[Action, int] = {}
    clocks = [0] * w
    orders: list[list[Action]] = [[] for _ in range(w)]
    forwards = [
        sorted(
            (Action(Op.FORWARD, s, k) for s in placement.stages_of(r) for k in range(m)),
            key=lambda a: _forward_priority(schedule, placement, a),
        )
        for r in range(w)
    ]
    backwards: list[list[Action]] = [[] for _ in range(w)]  # forwarded, waiting for backward
    weights: list[list[Action]] = [[] for _ in range(w)]  # I done, W deferred
    full, total = [0] * w, [0] * w
    caps = [_caps(schedule, placement, r) for r in range(w)]
    remaining = [len(f) * (3 if split else 2) for f in forwards]
    chunks = [placement.chunks(r) for r in range(w)]

    def done(action: Action, now: int) -> bool:
        return action in ends and ends[action] <= now

    def ready(action: Action, now: int) -> bool:
        s, k = action.stage, action.microbatch
        if action.op is Op.FORWARD:
            return s == 0 or done(Action(Op.FORWARD, s - 1, k), now)
        return done(Action(Op.FORWARD, s, k), now) and (
            s == p - 1 or done(Action(backward_op, s + 1, k), now)
        )

    while any(remaining):
        rank = min((r for r in range(w) if remaining[r]), key=lambda r: (clocks[r], r))
        now = clocks[rank]
        backward = next((a for a in backwards[rank] if ready(a, now)), None)
        forward = None
        if full[rank] < caps[rank][0] and total[rank] < caps[rank][1]:
            # Interleaved forwards keep Megatron's order strictly: picking any ready one
            # lets later rounds fill the memory cap that earlier ones need.
            candidates = forwards[rank][:1] if strict else forwards[rank]
            forward = next((a for a in candidates if ready(a, now)), None)
        # A backward first (it frees memory and others wait for it), except that a rank
        # with several chunks alternates one forward and one backward, as 1F1B does, so a
        # run of backwards does not starve the next rank of forwards; and under ZB-H1 a
        # forward the caps allow goes first (it cannot lift memory above 1F1B's, and the
        # next stage's I depends on it), which is what lets the W passes fill the bubble.
        last_forward = bool(orders[rank]) and orders[rank][-1].op is Op.FORWARD
        forward_first = schedule == "zero-bubble" or (chunks[rank] > 1 and not last_forward)
        choice = (forward or backward) if forward_first else (backward or forward)
        if choice is None and weights[rank]:
            choice = weights[rank][0]
        if choice is None:
            # Wait for the next action to end; another rank still free now may start one
            # (costs are whole units, so nothing ends before now + 1).
            later = [end for end in ends.values() if end > now]
            others_free = any(remaining[r] and clocks[r] == now for r in range(w) if r != rank)
            if not later and not others_free:
                raise ValueError(f"the {schedule} schedule deadlocks on rank {rank}")
            clocks[rank] = min(later, default=now + 1)
            continue
        if choice.op is Op.FORWARD:
            forwards[rank].remove(choice)
            backwards[rank].append(Action(backward_op, choice.stage, choice.microbatch))
            backwards[rank].sort(key=lambda a: _backward_priority(schedule, placement, a))
            full[rank] += 1
            total[rank] += 1
        elif choice.op is Op.BACKWARD_WEIGHT:
            weights[rank].remove(choice)
            total[rank] -= 1
        else:
            backwards[rank].remove(choice)
            full[rank] -= 1
            if split:
                weights[rank].append(Action(Op.BACKWARD_WEIGHT, choice.stage, choice.microbatch))
            else:
                total[rank] -= 1
        clocks[rank] = now + _PLAN_COST[choice.op.value]
        ends[choice] = clocks[rank]
        orders[rank].append(choice)
        remaining[rank] -= 1
    return orders


def _backward_priority(schedule: Schedule, placement: Placement, action: Action) -> tuple[int, ...]:
    k, s, w = action.microbatch, action.stage, placement.num_ranks
    if schedule == "interleaved-1f1b":
        return (k // w, -s, k)  # Megatron's: rounds of w micro-batches, chunks in reverse
    return (k, -s)


def _forward_priority(schedule: Schedule, placement: Placement, action: Action) -> tuple[int, ...]:
    k, s, w = action.microbatch, action.stage, placement.num_ranks
    if schedule == "interleaved-1f1b":
        # Megatron's order: rounds of w micro-batches, each round through the chunks in turn.
        return (k // w, s, k)
    # Oldest micro-batch first; of one micro-batch, the stage nearest the loss.
    return (k, -s)


def with_transfers(order: Sequence[Action], placement: Placement) -> list[Action]:
    """A rank's compute order with a RECV before each action whose input comes from another
    stage and a SEND after each action whose result another stage needs (also between two
    stages of the same rank: the executor hands those over locally)."""
    p = placement.num_stages
    actions: list[Action] = []
    for action in order:
        s, k = action.stage, action.microbatch
        forward = action.op is Op.FORWARD
        backward = action.op in (Op.BACKWARD, Op.BACKWARD_INPUT)
        if forward and s > 0:
            actions.append(Action(Op.RECV_ACTIVATION, s, k))
        if backward and s < p - 1:
            actions.append(Action(Op.RECV_GRADIENT, s, k))
        actions.append(action)
        if forward and s < p - 1:
            actions.append(Action(Op.SEND_ACTIVATION, s, k))
        if backward and s > 0:
            actions.append(Action(Op.SEND_GRADIENT, s, k))
    return actions


def schedule_actions(
    schedule: Schedule, num_ranks: int, num_stages: int, num_microbatches: int
) -> list[list[Action]]:
    """Every rank's full action list, compute and transfers (see `compute_orders`)."""
    placement = Placement.of(schedule, num_ranks, num_stages)
    orders = compute_orders(schedule, num_ranks, num_stages, num_microbatches)
    return [with_transfers(order, placement) for order in orders]


def peak_activations(order: Sequence[Action], chunks: int = 1) -> tuple[float, float]:
    """Peak activation memory of one rank's order, in micro-batches of the rank's whole layers
    (one chunk's activations count 1 / chunks).

    Returns:
        (peak of activations between F and its B or I: everything the backward needs; peak
        of micro-batches between F and the end of their backward (B, or W): counting a
        deferred W's state as a whole micro-batch's activations, an upper bound).
    """
    full = total = peak_full = peak_total = 0
    for action in order:
        if action.op is Op.FORWARD:
            full, total = full + 1, total + 1
        elif action.op in (Op.BACKWARD, Op.BACKWARD_INPUT):
            full -= 1
            total -= action.op is Op.BACKWARD
        elif action.op is Op.BACKWARD_WEIGHT:
            total -= 1
        peak_full, peak_total = max(peak_full, full), max(peak_total, total)
    return peak_full / chunks, peak_total / chunks
