"""Replaying a schedule with given stage times: the bubble the schedule alone causes.

Transfers are free here, so measured bubble - `ideal_bubbles` is what communication and
overheads cost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from fastpar.parallel.pipeline.schedules import (
    Action,
    Op,
    Schedule,
    compute_orders,
    splits_backward,
)

__all__ = ["ideal_bubbles", "replay"]


def replay(
    orders: Sequence[Sequence[Action]], num_stages: int, duration: Callable[[Action], float]
) -> dict[Action, float]:
    """Run each rank's compute order as early as its inputs allow.

    Arguments:
        orders: per rank, its compute actions (F, B, I, W) in order.
        num_stages: p.
        duration: seconds an action takes.

    Returns:
        The end time of every action.

    Raises:
        ValueError: the orders deadlock (an action waits for one that can never run).
    """
    ends: dict[Action, float] = {}
    clocks, cursors = [0.0] * len(orders), [0] * len(orders)
    while any(cursor < len(order) for cursor, order in zip(cursors, orders, strict=True)):
        progressed = False
        for rank, order in enumerate(orders):
            while cursors[rank] < len(order):
                action = order[cursors[rank]]
                source = _source(action, num_stages)
                if source is not None and source not in ends:
                    break  # its input is not computed yet: try the other ranks
                ready = ends[source] if source is not None else 0.0
                clocks[rank] = max(clocks[rank], ready) + duration(action)
                ends[action] = clocks[rank]
                cursors[rank] += 1
                progressed = True
        if not progressed:
            raise ValueError("the schedule deadlocks: no rank can run its next action")
    return ends


def _source(action: Action, num_stages: int) -> Action | None:
    """The action whose result `action` needs from another stage (None: none)."""
    s, k = action.stage, action.microbatch
    if action.op is Op.FORWARD:
        return Action(Op.FORWARD, s - 1, k) if s > 0 else None
    if action.op is Op.BACKWARD_WEIGHT:
        return Action(Op.BACKWARD_INPUT, s, k)
    if s == num_stages - 1:
        return Action(Op.FORWARD, s, k)
    return Action(action.op, s + 1, k)


def ideal_bubbles(
    schedule: Schedule,
    forward_s: Sequence[Sequence[float]],
    backward_s: Sequence[Sequence[float]],
    weight_s: Sequence[Sequence[float]] | None = None,
    *,
    num_ranks: int | None = None,
) -> list[float]:
    """Each rank's bubble under `schedule` with the given compute times and free transfers: the
    schedule's own idle time, which is (p-1)/(m+p-1) for 1F1B only with stages of equal speed.

    Arguments:
        schedule: one of SCHEDULES.
        forward_s: [global stage][micro-batch] forward durations in seconds.
        backward_s: [global stage][micro-batch] backward durations: the whole backward, or,
            for schedules that split it, the input-gradient pass.
        weight_s: for schedules that split the backward, the weight-gradient passes; None
            there: each backward_s is a whole backward, split in two equal halves.
        num_ranks: w; None: p for one stage per rank, p / 2 for zbv (interleaved-1f1b needs it).

    Returns:
        Per rank, 1 - (its compute) / (the pipeline's step: from the common start until the
        last rank to finish is done).
    """
    p = len(forward_s)
    m = len(forward_s[0]) if p else 0
    if num_ranks is None:
        if schedule == "interleaved-1f1b":
            raise ValueError("ideal_bubbles: num_ranks is needed for interleaved-1f1b")
        num_ranks = p // 2 if schedule == "zbv" else p
    split = splits_backward(schedule)
    if split and weight_s is None:
        halves = [[t / 2 for t in row] for row in backward_s]
        backward_s = weight_s = halves
    times = {Op.FORWARD: forward_s, Op.BACKWARD: backward_s, Op.BACKWARD_INPUT: backward_s}
    if weight_s is not None:
        times[Op.BACKWARD_WEIGHT] = weight_s

    def duration(action: Action) -> float:
        return times[action.op][action.stage][action.microbatch]

    orders = compute_orders(schedule, num_ranks, p, m)
    ends = replay(orders, p, duration)
    step = max(ends.values(), default=0.0)
    compute = [sum(duration(a) for a in order) for order in orders]
    return [1.0 - busy / step if step > 0 else 0.0 for busy in compute]
