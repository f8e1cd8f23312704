"""A rank's step compiled once: every action of its list (schedules.py) as a small function of
the step's state, with everything that does not change between steps looked up at construction.

Between two compute actions the rank's caches are cold (the stage's compute has just filled
them with weights and activations), so each line of Python there costs microseconds, and the
work after a compute until its message is in the pipe, or after a message arrives until the
next compute starts, delays a peer. Hence, per action, one call of a function that reads and
writes a list of slots at fixed indices: no dispatch on the action's kind, no dict keyed by
(stage, micro-batch), no name or device looked up.

Receiving: a rank takes one peer's messages in the order that peer sent them (every transport
is first in, first out), but a schedule may want them in another order (an activation and a
gradient crossing between the same two ranks). Schedules are pure, so the reads each receive
needs are known in advance: a receive reads the peer's messages up to the one it wants, each
into the slot where its stage will take it, and a later receive of a message already read
does nothing.
"""

from __future__ import annotations

import contextlib
import enum
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fastpar.parallel.pipeline.config import ActionTime, StepStats
from fastpar.parallel.pipeline.links import Link
from fastpar.parallel.pipeline.microbatches import carries_grad
from fastpar.parallel.pipeline.schedules import COMPUTE_OPS, Action, Message, Op, message_of
from fastpar.parallel.pipeline.split_backward import DeferredWeights, weight_split
from fastpar.parallel.pipeline.wire import PipelineError
from fastpar.profiling import range_name, record_range

__all__ = ["StepPlan", "StepState"]

_NO_CONTEXT = contextlib.nullcontext()
_NO_GRADIENT = torch.empty(0)  # sent back for an activation that carries no gradient
_SENDS = (Op.SEND_ACTIVATION, Op.SEND_GRADIENT)

Run = Callable[["StepState"], None]


class _Slot(enum.IntEnum):
    """What a slot of (stage, micro-batch) holds during a step."""

    INPUT = 0  # the received activation (a leaf), until its gradient is sent back
    OUTPUT = 1  # the stage's output (the weighted loss on the last stage), until its backward
    OUTPUT_GRAD = 2  # the received gradient of the output, until the backward
    DEFERRED = 3  # the micro-batch's deferred weight-gradient jobs, until its W pass


class StepState:
    """What one step keeps between actions."""

    __slots__ = ("end", "inputs", "losses", "slots", "split_sends", "start", "targets",
                 "times", "weights")  # fmt: skip

    def __init__(
        self, *, start: float, inputs: list[Tensor], targets: list[Tensor], num_slots: int
    ) -> None:
        self.start = start
        self.end = start  # set when the step is done
        self.inputs = inputs  # micro-batches of stage 0
        self.targets = targets  # micro-batches' targets on the last stage
        self.weights: list[float] = []
        self.slots: list[Any] = [None] * num_slots  # see _Slot
        self.losses: list[Tensor] = []
        self.times: list[tuple[Action, float, float]] = []  # compute actions: (began, ended)
        self.split_sends = 0

    def stats(self) -> StepStats:
        """The step's `StepStats` (compute times in seconds from its start)."""
        stats = StepStats(step_s=self.end - self.start, split_sends=self.split_sends)
        for action, began, ended in self.times:
            if action.op is Op.FORWARD:
                stats.forward_s += ended - began
            elif action.op is Op.BACKWARD_WEIGHT:
                stats.weight_s += ended - began
            else:
                stats.backward_s += ended - began
            start, end = began - self.start, ended - self.start
            timed = ActionTime(action.op.value, action.stage, action.microbatch, start, end)
            stats.per_microbatch.append(timed)
        return stats


class StepPlan:
    """This rank's actions compiled into functions of a `StepState` (see the module docstring).

    Arguments:
        actions: the rank's action list.
        chunks: {global stage: module} of this rank.
        num_stages: p.
        num_microbatches: m.
        loss_fn: the loss, on the rank of the last stage.
        split: the stages whose backward runs as an I and a W pass.
        no_sync: per stage, its `no_sync` (data-parallel stages) or None.
        devices: per stage, the device of its parameters.
        comm_device: where the links take and deliver tensors.
        links: {peer rank: link} (this rank's own link included, where it has one).
        stage_ranks: the rank of every global stage.
        expected: {peer rank: the messages the peer sends this rank in a step, in its order}.
        names: every message's name in errors and profiles.

    Attributes:
        runs: one function per action (a receive of a message read earlier has none).
        ranged: the same inside profiler ranges named after the actions.
        num_slots: the length of `StepState.slots`.
    """

    def __init__(
        self,
        actions: Sequence[Action],
        *,
        chunks: dict[int, nn.Module],
        num_stages: int,
        num_microbatches: int,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None,
        split: dict[int, bool],
        no_sync: dict[int, Callable[[], contextlib.AbstractContextManager[Any]] | None],
        devices: dict[int, torch.device],
        comm_device: torch.device,
        links: dict[int, Link],
        stage_ranks: Sequence[int],
        expected: dict[int, list[Message]],
        names: dict[Message, str],
    ) -> None:
        self._chunks = chunks
        self._order = sorted(chunks)
        self._m = num_microbatches
        self._last_stage = num_stages - 1
        self._loss_fn = loss_fn
        self._split = split
        self._no_sync = no_sync
        self._devices = devices
        self._comm_device = comm_device
        self._links = links
        self._stage_ranks = stage_ranks
        self._expected = expected
        self._names = names
        self._read = dict.fromkeys(expected, 0)  # per peer: messages read so far (compiling)
        self._last_backward = {
            a.stage: a.microbatch for a in actions if a.op in (Op.BACKWARD, Op.BACKWARD_INPUT)
        }
        self.num_slots = 4 * len(chunks) * num_microbatches
        multi = len(chunks) > 1
        self.runs: list[Run] = []
        self.ranged: list[Run] = []
        for action in actions:
            run = self._compile(action)
            if run is None:
                continue
            self.runs.append(run)
            self.ranged.append(_in_range(run, self._range_name(action, multi)))
        unread = {peer: len(msgs) - self._read[peer] for peer, msgs in expected.items()}
        if any(unread.values()):
            raise ValueError(f"the schedule leaves messages unreceived: {unread}")

    def _slot(self, kind: _Slot, stage: int, microbatch: int) -> int:
        return (self._order.index(stage) * self._m + microbatch) * 4 + kind

    def _range_name(self, action: Action, multi: bool) -> str:
        s, k = action.stage, action.microbatch
        if action.op in COMPUTE_OPS:
            kind = {Op.FORWARD: "forward", Op.BACKWARD_WEIGHT: "weight"}.get(action.op, "backward")
            return range_name("pp", kind, f"s{s}.mb{k}" if multi else f"mb{k}")
        send = action.op in _SENDS
        return range_name("pp", "send" if send else "recv", self._names[message_of(action)])

    def _compile(self, action: Action) -> Run | None:
        if action.op is Op.FORWARD:
            return self._forward(action)
        if action.op is Op.BACKWARD_WEIGHT:
            return self._weight(action)
        if action.op in (Op.BACKWARD, Op.BACKWARD_INPUT):
            return self._backward(action)
        if action.op in _SENDS:
            return self._send(action)
        return self._receive(action)

    # --- compute ----------------------------------------------------------------------------

    def _forward(self, action: Action) -> Run:
        s, k = action.stage, action.microbatch
        module, loss_fn = self._chunks[s], self._loss_fn
        first, last, split = s == 0, s == self._last_stage, self._split[s]
        source = self._slot(_Slot.INPUT, s, k)
        output = self._slot(_Slot.OUTPUT, s, k)
        deferred_slot = self._slot(_Slot.DEFERRED, s, k)
        stage_name = f"stage {s}"
        clock = time.perf_counter

        def forward(run: StepState) -> None:
            x = run.inputs[k] if first else run.slots[source]
            began = clock()
            context = _NO_CONTEXT
            if split and torch.is_grad_enabled():
                deferred = run.slots[deferred_slot] = DeferredWeights()
                context = weight_split(module, deferred, stage_name)
            with context:
                y = module(x)
                if not isinstance(y, Tensor):
                    raise TypeError(
                        f"stage {s} returned {type(y).__name__}; a pipeline stage must return "
                        "one Tensor (wrap modules returning tuples, such as LSTMs, in OutputOnly)"
                    )
                if last:
                    assert loss_fn is not None
                    y = loss_fn(y, run.targets[k]) * run.weights[k]
                    run.losses.append(y.detach())
            run.slots[output] = y
            # Only the times here: the stats are made when asked for (Pipeline.last_stats).
            run.times.append((action, began, clock()))

        return forward

    def _weight(self, action: Action) -> Run:
        index = self._slot(_Slot.DEFERRED, action.stage, action.microbatch)
        clock = time.perf_counter

        def weight(run: StepState) -> None:
            deferred, run.slots[index] = run.slots[index], None
            began = clock()
            if deferred is not None:
                deferred.run()
            run.times.append((action, began, clock()))

        return weight

    def _backward(self, action: Action) -> Run:
        s, k = action.stage, action.microbatch
        output = self._slot(_Slot.OUTPUT, s, k)
        output_grad = self._slot(_Slot.OUTPUT_GRAD, s, k)
        last = s == self._last_stage
        # A data-parallel stage averages gradients once per step: in its last backward, with
        # the accumulated gradients.
        no_sync = self._no_sync[s] if k != self._last_backward[s] else None
        clock = time.perf_counter
        backward_fn = torch.autograd.backward

        def backward(run: StepState) -> None:
            slots = run.slots
            y, slots[output] = slots[output], None
            grad, slots[output_grad] = slots[output_grad], None
            # is_cpu first: y.device builds an object, and .to enters the dispatcher.
            if grad is not None and not (grad.is_cpu and y.is_cpu):
                grad = grad.to(y.device)
            began = clock()
            # An output that carries no gradient does not require grad: no backward runs.
            with no_sync() if no_sync is not None else _NO_CONTEXT:
                if y.requires_grad and (grad is not None or last):
                    backward_fn(y, grad)
            run.times.append((action, began, clock()))

        return backward

    # --- transfers ----------------------------------------------------------------------------

    def _send(self, action: Action) -> Run:
        message = message_of(action)
        link = self._links[self._stage_ranks[message.dest]]
        send, what = link.send, self._names[message]
        comm = self._comm_device
        comm_cpu = comm.type == "cpu"
        s, k = action.stage, action.microbatch

        # A stage on a GPU sends via the host unless its link is NCCL (see Pipeline). The
        # links detach what they send. is_cpu first: tensor.device builds an object.
        if action.op is Op.SEND_ACTIVATION:
            output = self._slot(_Slot.OUTPUT, s, k)

            def send_activation(run: StepState) -> None:
                y = run.slots[output]
                if not (y.is_cpu and comm_cpu) and y.device != comm:
                    y = y.detach().to(comm)
                send(y, what)

            return send_activation

        source = self._slot(_Slot.INPUT, s, k)

        def send_gradient(run: StepState) -> None:
            # A leaf that requires grad iff it carries one.
            x, run.slots[source] = run.slots[source], None
            grad = x.grad if x.requires_grad else _NO_GRADIENT
            if grad is None:
                grad = torch.zeros_like(x)
            if not (grad.is_cpu and comm_cpu) and grad.device != comm:
                grad = grad.detach().to(comm)
            send(grad, what)

        return send_gradient

    def _receive(self, action: Action) -> Run | None:
        """The reads `action` needs (see the module docstring); None when its message was read
        by an earlier receive."""
        message = message_of(action)
        peer = self._stage_ranks[message.source]
        expected = self._expected.get(peer, [])
        if message not in expected:
            link = self._links[peer]
            raise PipelineError(
                f"{link.peer} sends no {self._names[message]} in this schedule",
                stage=link.peer.stage,
                rank=link.peer.rank,
            )
        position = expected.index(message)
        if position < self._read[peer]:
            return None
        reads = [self._read_of(peer, m) for m in expected[self._read[peer] : position + 1]]
        self._read[peer] = position + 1
        if len(reads) == 1:
            return reads[0]

        def receive_several(run: StepState) -> None:
            for read in reads:
                read(run)

        return receive_several

    def _read_of(self, peer: int, message: Message) -> Run:
        """Reads `message` from `peer` into the slot where its stage takes it."""
        recv, what = self._links[peer].recv, self._names[message]
        if message.kind == "gradient":
            index = self._slot(_Slot.OUTPUT_GRAD, message.dest, message.microbatch)

            def read_gradient(run: StepState) -> None:
                run.slots[index] = recv(what, False)

            return read_gradient
        index = self._slot(_Slot.INPUT, message.dest, message.microbatch)
        device = self._devices[message.dest]
        if device == self._comm_device:
            # The link delivers the stage's input as a leaf (see Link.recv).
            def read_activation(run: StepState) -> None:
                run.slots[index] = recv(what, True)

            return read_activation

        def read_activation_to(run: StepState) -> None:
            x = recv(what, False).to(device)  # the copy on the stage's device becomes the leaf
            if carries_grad(x):
                x.requires_grad = True
            run.slots[index] = x

        return read_activation_to


def _in_range(run: Run, name: str) -> Run:
    def ranged(state: StepState) -> None:
        with record_range(name):
            run(state)

    return ranged
