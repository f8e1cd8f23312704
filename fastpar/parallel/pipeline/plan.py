"""A rank's step compiled once: every action of its list (schedules.py) as a small function of
the step's state, with everything that does not change between steps looked up at construction.

Between two compute actions the rank's caches are cold (the stage's compute has just filled
them with weights and activations), so each line of Python there costs microseconds, and the
work after a compute until its message is in the pipe, or after a message arrives until the
next compute starts, delays a peer. Hence, per action, one call of a function that reads and
writes a list of slots at fixed indices: no dispatch on the action's kind, no dict keyed by
(stage, micro-batch), no name or device looked up.

Each compute also does the receive right before it and the send right after it, when it can
(its own message, nothing to read ahead, no device to copy to): one call per compute, and the
send before the compute's bookkeeping. With a profiler on, the step runs the unfused actions,
each in its own range.

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
from torch.nn.modules import module as _module_hooks  # module-wide hooks

from fastpar.parallel.pipeline.config import ActionTime, StepStats
from fastpar.parallel.pipeline.links import Link, LocalLink
from fastpar.parallel.pipeline.microbatches import carries_grad, input_grad
from fastpar.parallel.pipeline.schedules import COMPUTE_OPS, Action, Message, Op, message_of
from fastpar.parallel.pipeline.split_backward import DeferredWeights, weight_split
from fastpar.parallel.pipeline.wire import PipelineError
from fastpar.profiling import range_name, record_range

__all__ = ["StepPlan", "StepState"]

_NO_CONTEXT = contextlib.nullcontext()
_SENDS = (Op.SEND_ACTIVATION, Op.SEND_GRADIENT)
_RECEIVES = (Op.RECV_ACTIVATION, Op.RECV_GRADIENT)

Run = Callable[["StepState"], None]
_Call = tuple[Callable[..., Any], str]  # a link's send or recv, and the message's name


class _Slot(enum.IntEnum):
    """What a slot of (stage, micro-batch) holds during a step."""

    INPUT = 0  # the received activation (a leaf), until its gradient is sent back
    OUTPUT = 1  # the stage's output (the weighted loss on the last stage), until its backward
    OUTPUT_GRAD = 2  # the received gradient of the output, until the backward
    DEFERRED = 3  # the micro-batch's deferred weight-gradient jobs, until its W pass


class StepState:
    """What one step keeps between actions."""

    __slots__ = ("end", "failed_stage", "inputs", "losses", "slots", "spent", "split_sends",
                 "start", "targets", "times", "weights")  # fmt: skip

    def __init__(
        self, *, start: float, inputs: list[Tensor], targets: list[Tensor], num_slots: int
    ) -> None:
        self.start = start
        self.end = start  # set when the step is done
        self.inputs = inputs  # micro-batches of stage 0
        self.targets = targets  # micro-batches' targets on the last stage
        self.weights: Sequence[float] = ()
        self.slots: list[Any] = [None] * num_slots  # see _Slot
        self.losses: list[Tensor] = []
        self.times: list[tuple[Action, float, float]] = []  # compute actions: (began, ended)
        # Outputs whose backward ran, dropped right before the rank's next receive (see
        # StepPlan._backward).
        self.spent: list[Tensor] = []
        self.split_sends = 0
        # The stage whose action raised (set by the compute's own handler: a try costs nothing
        # until it raises), so that a rank holding several stages blames the right one.
        self.failed_stage: int | None = None

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
        runs: the step's functions: one per compute, with its receive and send where it can
            (see the module docstring), and one per other transfer.
        ranged: one function per action (a receive of a message read earlier has none), each
            inside a profiler range named after the action.
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
        self._comm_cpu = comm_device.type == "cpu"
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
        # Each receive's reads (see the module docstring), in the order of the actions.
        reads = {a: self._reads(a) for a in actions if a.op in _RECEIVES}
        unread = {peer: len(msgs) - self._read[peer] for peer, msgs in expected.items()}
        if any(unread.values()):
            raise ValueError(f"the schedule leaves messages unreceived: {unread}")
        self.ranged = [
            _in_range(run, self._range_name(action, multi))
            for action in actions
            if (run := self._compile(action, reads.get(action))) is not None
        ]
        self.runs = self._fused(actions, reads)

    def _slot(self, kind: _Slot, stage: int, microbatch: int) -> int:
        return (self._order.index(stage) * self._m + microbatch) * 4 + kind

    def _range_name(self, action: Action, multi: bool) -> str:
        s, k = action.stage, action.microbatch
        if action.op in COMPUTE_OPS:
            kind = {Op.FORWARD: "forward", Op.BACKWARD_WEIGHT: "weight"}.get(action.op, "backward")
            return range_name("pp", kind, f"s{s}.mb{k}" if multi else f"mb{k}")
        send = action.op in _SENDS
        return range_name("pp", "send" if send else "recv", self._names[message_of(action)])

    def _compile(self, action: Action, reads: list[Message] | None) -> Run | None:
        """`action` alone (None: a receive with nothing left to read)."""
        if action.op is Op.FORWARD:
            return self._forward(action)
        if action.op is Op.BACKWARD_WEIGHT:
            return self._weight(action)
        if action.op in (Op.BACKWARD, Op.BACKWARD_INPUT):
            return self._backward(action)
        if action.op in _SENDS:
            return self._send(action)
        assert reads is not None
        return self._receive(reads)

    def _fused(self, actions: Sequence[Action], reads: dict[Action, list[Message]]) -> list[Run]:
        """The step's functions with each compute's own receive and send inside it
        (with_transfers puts a compute's receive right before it, its send right after it)."""
        runs: list[Run] = []
        for index, action in enumerate(actions):
            if action.op not in COMPUTE_OPS:
                continue
            before = actions[index - 1] if index > 0 else None
            after = actions[index + 1] if index + 1 < len(actions) else None
            read: _Call | None = None
            if before is not None and before.op in _RECEIVES:
                if self._inline_read(before, reads[before]):
                    read = self._read_call(message_of(before))
                elif (run := self._receive(reads[before])) is not None:
                    runs.append(run)
            send = self._send_call(after) if after is not None and after.op in _SENDS else None
            if action.op is Op.FORWARD:
                runs.append(self._forward(action, read, send))
            elif action.op is Op.BACKWARD_WEIGHT:
                runs.append(self._weight(action))
            else:
                runs.append(self._backward(action, read, send))
        return runs

    # --- compute ----------------------------------------------------------------------------

    def _forward(self, action: Action, read: _Call | None = None, send: _Call | None = None) -> Run:
        """F; with `read`, its input received first; with `send`, its output sent after."""
        s, k = action.stage, action.microbatch
        module, loss_fn = self._chunks[s], self._loss_fn
        first, last, split = s == 0, s == self._last_stage, self._split[s]
        source = self._slot(_Slot.INPUT, s, k)
        output = self._slot(_Slot.OUTPUT, s, k)
        deferred_slot = self._slot(_Slot.DEFERRED, s, k)
        stage_name = f"stage {s}"
        clock = time.perf_counter
        recv, recv_what = read if read is not None else (None, "")
        to_comm, comm_cpu = self._to_comm, self._comm_cpu
        transmit, send_what = send if send is not None else (None, "")
        alias = None if first else self._input_alias(s)

        def forward(run: StepState) -> None:
            try:
                slots = run.slots
                if recv is not None:
                    if run.spent:
                        run.spent.clear()
                    x = slots[source] = recv(recv_what, True)
                else:
                    x = run.inputs[k] if first else slots[source]
                if alias is not None and x.requires_grad:
                    x = alias(x)
                began = clock()
                context = _NO_CONTEXT
                if split and torch.is_grad_enabled():
                    deferred = slots[deferred_slot] = DeferredWeights()
                    context = weight_split(module, deferred, stage_name)
                with context:
                    y = module(x)
                    if not isinstance(y, Tensor):
                        raise TypeError(
                            f"stage {s} returned {type(y).__name__}; a pipeline stage must "
                            "return one Tensor (wrap modules returning tuples, such as LSTMs, in "
                            "OutputOnly)"
                        )
                    if last:
                        assert loss_fn is not None
                        y = loss_fn(y, run.targets[k]) * run.weights[k]
                        run.losses.append(y.detach())
                ended = clock()
                if transmit is not None:
                    transmit(y if y.is_cpu and comm_cpu else to_comm(y), send_what)
                slots[output] = y
                # Only the times here: the stats are made when asked for (Pipeline.last_stats).
                run.times.append((action, began, ended))
            except Exception:
                run.failed_stage = s  # the stage the error is blamed on
                raise

        return forward

    def _input_alias(self, stage: int) -> Callable[[Tensor], Tensor] | None:
        """How `stage` takes its received input: the leaf itself (None) where the stage leaves
        it alone (see _leaves_input_alone), else an alias (see _alias_owned). The leaf from a
        LocalLink shares its storage with the sending stage's output, which that stage's
        backward may need, so its alias shares the version counter too (an in-place change then
        fails that backward, as in the whole model, instead of corrupting its gradients)."""
        if _leaves_input_alone(self._chunks[stage]):
            return None
        link = self._links[self._stage_ranks[stage - 1]]
        return _SharedAlias.apply if isinstance(link, LocalLink) else _alias_owned

    def _weight(self, action: Action) -> Run:
        stage = action.stage
        index = self._slot(_Slot.DEFERRED, stage, action.microbatch)
        clock = time.perf_counter

        def weight(run: StepState) -> None:
            try:
                deferred, run.slots[index] = run.slots[index], None
                began = clock()
                if deferred is not None:
                    deferred.run()
                run.times.append((action, began, clock()))
            except Exception:
                run.failed_stage = stage  # the stage the error is blamed on
                raise

        return weight

    def _backward(
        self, action: Action, read: _Call | None = None, send: _Call | None = None
    ) -> Run:
        """B or I; with `read`, its output's gradient received first; with `send`, its input's
        gradient sent after.

        The output is not dropped here but right before the rank's next receive (`run.spent`):
        dropping it frees its autograd graph, tens of microseconds between two computes when
        cold, and before a receive the rank usually waits for its peer anyway."""
        s, k = action.stage, action.microbatch
        output = self._slot(_Slot.OUTPUT, s, k)
        output_grad = self._slot(_Slot.OUTPUT_GRAD, s, k)
        source = self._slot(_Slot.INPUT, s, k)
        last = s == self._last_stage
        # A data-parallel stage averages gradients once per step: in its last backward, with
        # the accumulated gradients.
        no_sync = self._no_sync[s] if k != self._last_backward[s] else None
        clock = time.perf_counter
        backward_fn = torch.autograd.backward
        recv, recv_what = read if read is not None else (None, "")
        to_comm, comm_cpu = self._to_comm, self._comm_cpu
        transmit, send_what = send if send is not None else (None, "")
        direct = self._sends_leaf(s)

        def backward(run: StepState) -> None:
            try:
                slots = run.slots
                y, slots[output] = slots[output], None
                if recv is not None:
                    if run.spent:
                        run.spent.clear()
                    grad = recv(recv_what, False)
                else:
                    grad, slots[output_grad] = slots[output_grad], None
                # is_cpu first: y.device builds an object, and .to enters the dispatcher.
                if grad is not None and not (grad.is_cpu and y.is_cpu):
                    grad = grad.to(y.device)
                began = clock()
                # An output that carries no gradient does not require grad: no backward runs.
                with no_sync() if no_sync is not None else _NO_CONTEXT:
                    if y.requires_grad and (grad is not None or last):
                        backward_fn(y, grad)
                ended = clock()
                if transmit is not None:
                    x, slots[source] = slots[source], None
                    if direct:  # the link takes the leaf (see _send_call)
                        transmit(x, send_what)
                    else:
                        dx = input_grad(x)
                        transmit(dx if dx.is_cpu and comm_cpu else to_comm(dx), send_what)
                run.times.append((action, began, ended))
                run.spent.append(y)
            except Exception:
                run.failed_stage = s  # the stage the error is blamed on
                raise

        return backward

    # --- transfers ----------------------------------------------------------------------------

    def _to_comm(self, tensor: Tensor) -> Tensor:
        """`tensor` where the links take it: a stage on a GPU sends via the host unless its link
        is NCCL (see Pipeline). The links detach what they send. Callers test
        `tensor.is_cpu and self._comm_cpu` first (tensor.device builds an object)."""
        comm = self._comm_device
        return tensor if tensor.device == comm else tensor.detach().to(comm)

    def _sends_leaf(self, stage: int) -> bool:
        """Whether `stage` sends its input's gradient as `link.send_input_grad(leaf)`: its input
        arrives as the leaf itself on the link's device (see _read_of), where the link can take
        the gradient from (the pipe without making a Python object of it)."""
        return self._devices[stage] == self._comm_device

    def _send_call(self, action: Action) -> _Call:
        """The link's call for a SEND action (send_input_grad for gradients of _sends_leaf
        stages, else send) and the message's name."""
        message = message_of(action)
        link = self._links[self._stage_ranks[message.dest]]
        gradient = action.op is Op.SEND_GRADIENT and self._sends_leaf(action.stage)
        return link.send_input_grad if gradient else link.send, self._names[message]

    def _send(self, action: Action) -> Run:
        send, what = self._send_call(action)
        stage = action.stage  # blamed for an error (see StepState.failed_stage)
        to_comm, comm_cpu = self._to_comm, self._comm_cpu
        index = self._slot(
            _Slot.OUTPUT if action.op is Op.SEND_ACTIVATION else _Slot.INPUT,
            action.stage,
            action.microbatch,
        )

        if action.op is Op.SEND_ACTIVATION:

            def send_activation(run: StepState) -> None:
                try:
                    y = run.slots[index]
                    send(y if y.is_cpu and comm_cpu else to_comm(y), what)
                except Exception:
                    run.failed_stage = stage
                    raise

            return send_activation

        if self._sends_leaf(action.stage):

            def send_leaf_gradient(run: StepState) -> None:
                try:
                    x, run.slots[index] = run.slots[index], None
                    send(x, what)
                except Exception:
                    run.failed_stage = stage
                    raise

            return send_leaf_gradient

        def send_gradient(run: StepState) -> None:
            try:
                x, run.slots[index] = run.slots[index], None
                dx = input_grad(x)
                send(dx if dx.is_cpu and comm_cpu else to_comm(dx), what)
            except Exception:
                run.failed_stage = stage
                raise

        return send_gradient

    def _reads(self, action: Action) -> list[Message]:
        """The peer's messages a receive reads (see the module docstring): up to its own, or none
        when an earlier receive read it."""
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
            return []
        reads = expected[self._read[peer] : position + 1]
        self._read[peer] = position + 1
        return reads

    def _inline_read(self, action: Action, reads: list[Message]) -> bool:
        """Whether a receive's reads are its own message alone, delivered where its stage runs
        (so its compute can receive it itself)."""
        message = message_of(action)
        return reads == [message] and (
            message.kind == "gradient" or self._devices[message.dest] == self._comm_device
        )

    def _read_call(self, message: Message) -> _Call:
        """The link's recv and the message's name."""
        return self._links[self._stage_ranks[message.source]].recv, self._names[message]

    def _receive(self, reads: list[Message]) -> Run | None:
        """A receive alone: its reads, each into the slot where its stage takes it (None: no
        reads)."""
        runs = [self._read_of(message) for message in reads]
        if len(runs) <= 1:
            return runs[0] if runs else None

        def receive_several(run: StepState) -> None:
            for read in runs:
                read(run)

        return receive_several

    def _read_of(self, message: Message) -> Run:
        """Reads `message` into the slot where its stage takes it."""
        recv, what = self._read_call(message)
        if message.kind == "gradient":
            index = self._slot(_Slot.OUTPUT_GRAD, message.dest, message.microbatch)

            def read_gradient(run: StepState) -> None:
                if run.spent:
                    run.spent.clear()
                run.slots[index] = recv(what, False)

            return read_gradient
        index = self._slot(_Slot.INPUT, message.dest, message.microbatch)
        device = self._devices[message.dest]
        if device == self._comm_device:
            # The link delivers the stage's input as a leaf (see Link.recv).
            def read_activation(run: StepState) -> None:
                if run.spent:
                    run.spent.clear()
                run.slots[index] = recv(what, True)

            return read_activation

        def read_activation_to(run: StepState) -> None:
            if run.spent:
                run.spent.clear()
            x = recv(what, False).to(device)  # the copy on the stage's device becomes the leaf
            if carries_grad(x):
                x.requires_grad = True
            run.slots[index] = x

        return read_activation_to


# Layers whose forward changes no input in place and returns a new tensor, one that shares no
# memory with its input (with `inplace` False, for the layers that have the flag).
_KEEPS_INPUT = frozenset(
    {nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LayerNorm, nn.RMSNorm}
    | {nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid}
)


def _leaves_input_alone(stage: nn.Module) -> bool:
    """Whether `stage` provably neither changes its input in place nor hands it (or a view of
    it) to a layer that may, so that it can take the received leaf without an alias (an
    autograd node, tens of microseconds per micro-batch when the caches are cold): an
    nn.Sequential whose first layer, through nested nn.Sequentials, is one of _KEEPS_INPUT,
    none of them with a forward hook or a forward of its own, and no module-wide forward hook.

    Decided once, when the plan is built. A stage changed afterwards so that it modifies its
    input gets autograd's error for a leaf that requires grad, never other gradients: the
    alias is what lets such a stage run, not what keeps its numbers right."""
    if _module_hooks._global_forward_pre_hooks or _module_hooks._global_forward_hooks:
        return False
    module = stage
    while type(module) is nn.Sequential and len(module) > 0 and not _hooked(module):
        module = module[0]
    return (
        type(module) in _KEEPS_INPUT
        and not getattr(module, "inplace", False)
        and not _hooked(module)
    )


def _hooked(module: nn.Module) -> bool:
    """Whether `module` runs code of the user's around or instead of its class's forward."""
    return bool(module._forward_pre_hooks or module._forward_hooks) or "forward" in vars(module)


def _alias_owned(leaf: Tensor) -> Tensor:
    """The received leaf as its stage takes it: autograd refuses in-place operations on a leaf
    that requires grad (and on its views), but a stage may start with an in-place layer
    (ReLU(inplace=True)) as that layer may in the whole model. An alias that autograd does not
    count as a view, without a copy; its gradient lands in the leaf's .grad. Not for a leaf
    sharing its storage with another tensor: the alias has a version counter of its own."""
    return _unsafe_view(leaf, leaf.shape)


_unsafe_view = torch.ops.aten._unsafe_view.default


class _SharedAlias(torch.autograd.Function):
    """`_alias_owned` sharing the leaf's version counter (a detach), at an autograd node's cost."""

    @staticmethod
    def forward(ctx: Any, leaf: Tensor) -> Tensor:
        return leaf.detach()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


def _in_range(run: Run, name: str) -> Run:
    def ranged(state: StepState) -> None:
        with record_range(name):
            run(state)

    return ranged
