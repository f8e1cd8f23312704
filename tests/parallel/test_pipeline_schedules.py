"""Schedules without processes: every schedule's action lists run each micro-batch's forward and
backward exactly once per stage, in dependency order, without deadlock when the ranks exchange
messages through first-in-first-out links; memory stays within 1F1B's bound where the schedule
promises it; and `ideal_bubbles` (the replay with stage times) meets the theory for equal stages
and orders the schedules as designed."""

from __future__ import annotations

import collections
import random

import pytest

from fastpar.parallel.pipeline import SCHEDULES, ideal_bubbles, schedule_actions
from fastpar.parallel.pipeline.schedules import (
    COMPUTE_OPS,
    Action,
    Op,
    Placement,
    compute_orders,
    message_of,
    peak_activations,
)

MULTI_CHUNK = {"interleaved-1f1b": 2, "zbv": 2}  # chunks per rank (1 for the others)
GRID = [(1, 1), (1, 4), (2, 1), (2, 3), (2, 8), (3, 2), (3, 5), (4, 1), (4, 4), (4, 7), (4, 8)]


def _stages(schedule: str, ranks: int) -> int:
    return MULTI_CHUNK.get(schedule, 1) * ranks


def _cases() -> list[tuple[str, int, int]]:
    return [(s, w, m) for s in SCHEDULES for w, m in GRID]


@pytest.mark.parametrize("schedule, ranks, microbatches", _cases())
def test_each_microbatch_runs_once_per_stage_in_dependency_order(
    schedule: str, ranks: int, microbatches: int
) -> None:
    p = _stages(schedule, ranks)
    placement = Placement.of(schedule, ranks, p)  # type: ignore[arg-type]
    split = schedule in ("zero-bubble", "zbv")
    wanted = (
        [Op.FORWARD, Op.BACKWARD_INPUT, Op.BACKWARD_WEIGHT] if split else [Op.FORWARD, Op.BACKWARD]
    )
    actions = schedule_actions(schedule, ranks, p, microbatches)  # type: ignore[arg-type]
    for rank, order in enumerate(actions):
        compute = [a for a in order if a.op in COMPUTE_OPS]
        assert {a.stage for a in compute} == set(placement.stages_of(rank))
        counts = collections.Counter(compute)
        expected = {
            Action(op, s, k)
            for op in wanted
            for s in placement.stages_of(rank)
            for k in range(microbatches)
        }
        assert set(counts) == expected and set(counts.values()) == {1}
        position = {a: i for i, a in enumerate(order)}
        for a in compute:  # the rank's own dependencies come first
            s, k = a.stage, a.microbatch
            if a.op is not Op.FORWARD:
                assert position[Action(Op.FORWARD, s, k)] < position[a]
            if a.op is Op.BACKWARD_WEIGHT:
                assert position[Action(Op.BACKWARD_INPUT, s, k)] < position[a]
            if a.op is Op.FORWARD and s > 0:
                assert position[Action(Op.RECV_ACTIVATION, s, k)] < position[a]
            if a.op in (Op.BACKWARD, Op.BACKWARD_INPUT) and s < p - 1:
                assert position[Action(Op.RECV_GRADIENT, s, k)] < position[a]
    _run_with_fifo_links(actions, placement)


def _run_with_fifo_links(actions: list[list[Action]], placement: Placement) -> None:
    """Interpret every rank's list: a SEND appends to the link (source rank, dest rank); a RECV
    waits until its message was sent; a compute action waits for nothing else (its inputs
    arrived through RECVs). Raises if the ranks block each other."""
    ranks = placement.stage_ranks
    sent: set[tuple[object, ...]] = set()
    received: collections.Counter[tuple[object, ...]] = collections.Counter()
    cursors = [0] * len(actions)
    while any(c < len(a) for c, a in zip(cursors, actions, strict=True)):
        progressed = False
        for rank, order in enumerate(actions):
            while cursors[rank] < len(order):
                action = order[cursors[rank]]
                if action.op in (Op.SEND_ACTIVATION, Op.SEND_GRADIENT):
                    message = message_of(action)
                    assert ranks[message.source] == rank
                    assert message not in sent, f"{message} sent twice"
                    sent.add(message)
                elif action.op in (Op.RECV_ACTIVATION, Op.RECV_GRADIENT):
                    message = message_of(action)
                    assert ranks[message.dest] == rank
                    if message not in sent:
                        break
                    received[message] += 1
                cursors[rank] += 1
                progressed = True
        stuck = [str(a[c]) for a, c in zip(actions, cursors, strict=True) if c < len(a)]
        assert progressed, f"deadlock at {stuck}"
    assert set(received) == sent and set(received.values()) <= {1}


@pytest.mark.parametrize("ranks, microbatches", GRID)
def test_peak_activation_memory(ranks: int, microbatches: int) -> None:
    one_f_one_b = [peak_activations(o) for o in compute_orders("1f1b", ranks, ranks, microbatches)]
    for rank, (full, total) in enumerate(one_f_one_b):
        assert full == total == min(ranks - rank, microbatches)
    busiest = max(full for full, _ in one_f_one_b)
    zero_bubble = [
        peak_activations(o) for o in compute_orders("zero-bubble", ranks, ranks, microbatches)
    ]
    for (full, total), (reference, _) in zip(zero_bubble, one_f_one_b, strict=True):
        assert full <= reference  # what the backward needs: never more than 1F1B's
        assert total <= busiest  # with deferred W state counted whole: not above 1F1B's peak
    zbv = compute_orders("zbv", ranks, 2 * ranks, microbatches)
    assert max(peak_activations(o, chunks=2)[1] for o in zbv) <= busiest
    gpipe = compute_orders("gpipe", ranks, ranks, microbatches)
    assert {peak_activations(o) for o in gpipe} == {(microbatches, microbatches)}


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("num_stages, num_microbatches", [(1, 3), (2, 8), (3, 4), (4, 9)])
def test_ideal_bubbles_of_equal_stages_are_the_theory(
    schedule: str, num_stages: int, num_microbatches: int
) -> None:
    forward = [[1.0] * num_microbatches for _ in range(num_stages)]
    backward = [[2.0] * num_microbatches for _ in range(num_stages)]
    theory = (num_stages - 1) / (num_microbatches + num_stages - 1)
    assert ideal_bubbles(schedule, forward, backward) == pytest.approx([theory] * num_stages)


@pytest.mark.parametrize("ranks, microbatches", [(2, 2), (2, 8), (3, 6), (4, 4), (4, 8)])
def test_interleaving_divides_the_bubble_by_the_chunks(ranks: int, microbatches: int) -> None:
    # Each of the 2 chunks holds half a rank's layers: forward 0.5, backward 1.
    p = 2 * ranks
    forward = [[0.5] * microbatches for _ in range(p)]
    backward = [[1.0] * microbatches for _ in range(p)]
    bubbles = ideal_bubbles("interleaved-1f1b", forward, backward, num_ranks=ranks)
    theory = (ranks - 1) / (2 * microbatches + ranks - 1)
    assert max(bubbles) == pytest.approx(theory)


@pytest.mark.parametrize("ranks, microbatches", [(w, m) for w, m in GRID if 1 < w <= m])
def test_zero_bubble_meets_zb_h1(ranks: int, microbatches: int) -> None:
    # F = I = W = 1, m >= p: ZB-H1 idles (p-1)(F+B-2W) = p-1 units of a step of 3m + p-1.
    ones = [[1.0] * microbatches for _ in range(ranks)]
    bubbles = ideal_bubbles("zero-bubble", ones, ones, ones)
    theory = (ranks - 1) / (3 * microbatches + ranks - 1)
    assert max(bubbles) == pytest.approx(theory)


def test_zero_bubble_meets_zb_h1_with_two_stages() -> None:
    # F = I = W = 1: ZB-H1's bubble is (p-1)(F+B-2W) = 1 of a step of 3m + 1.
    m = 8
    ones = [[1.0] * m for _ in range(2)]
    bubbles = ideal_bubbles("zero-bubble", ones, ones, ones)
    assert bubbles == pytest.approx([1 / (3 * m + 1)] * 2)
    one_f_one_b = ideal_bubbles("1f1b", ones, [[2.0] * m] * 2)

    def idle(bubble: float) -> float:  # the same compute (3 m) in both
        return 3 * m * bubble / (1 - bubble)

    assert idle(max(bubbles)) == pytest.approx(idle(max(one_f_one_b)) / 3)


@pytest.mark.parametrize("ranks, microbatches", GRID)
def test_zero_bubble_schedules_idle_less_than_1f1b(ranks: int, microbatches: int) -> None:
    m, w = microbatches, ranks
    one_f_one_b = ideal_bubbles("1f1b", [[1.0] * m] * w, [[2.0] * m] * w)
    zero_bubble = ideal_bubbles("zero-bubble", [[1.0] * m] * w, [[1.0] * m] * w, [[1.0] * m] * w)
    halves = [[0.5] * m] * (2 * w)
    zbv = ideal_bubbles("zbv", halves, halves, halves)
    if w == 1:
        assert max(one_f_one_b) == max(zero_bubble) == 0
    else:
        assert max(zbv) <= max(zero_bubble) < max(one_f_one_b)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ideal_bubbles_replay_unequal_times_within_bounds(schedule: str) -> None:
    rng = random.Random(7)
    w, m = 3, 5
    p = _stages(schedule, w)
    times = [[[rng.uniform(0.5, 2.0) for _ in range(m)] for _ in range(p)] for _ in range(3)]
    bubbles = ideal_bubbles(schedule, *times, num_ranks=w)  # type: ignore[arg-type]
    assert len(bubbles) == w
    assert all(0 < b < 1 for b in bubbles)  # with 3 ranks every rank waits at some point
    scaled = [[[3 * t for t in row] for row in kind] for kind in times]
    assert ideal_bubbles(schedule, *scaled, num_ranks=w) == pytest.approx(bubbles)  # type: ignore[arg-type]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_ideal_bubbles_of_unequal_stages(schedule: str) -> None:
    # Stage 0's backwards take 1.75, stage 1's 2 (forwards 1). Stage 1 never waits after its
    # first forward and ends backward k at 11 + 2k (GPipe) or 3k + 4 (1F1B): 25 for k = 7
    # either way. Stage 0 keeps up, so the step ends with its last backward at 25 + 1.75.
    forward = [[1.0] * 8, [1.0] * 8]
    backward = [[1.75] * 8, [2.0] * 8]
    step = 26.75
    expected = [1 - (8 + 14) / step, 1 - (8 + 16) / step]
    assert ideal_bubbles(schedule, forward, backward) == pytest.approx(expected)


def test_placements() -> None:
    assert Placement.of("interleaved-1f1b", 2, 6).stage_ranks == (0, 1, 0, 1, 0, 1)
    assert Placement.of("zbv", 3, 6).stage_ranks == (0, 1, 2, 2, 1, 0)
    with pytest.raises(ValueError, match="num_stages 2 \\* 3 ranks, got 5"):
        Placement.of("zbv", 3, 5)
    with pytest.raises(ValueError, match="multiple of the 2 ranks, got 5"):
        Placement.of("interleaved-1f1b", 2, 5)
    with pytest.raises(ValueError, match="one stage per rank: num_stages 4 != 2 ranks"):
        Placement.of("1f1b", 2, 4)
