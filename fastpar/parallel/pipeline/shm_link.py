"""`ShmLink`: a pipeline link between two CPU-side stages on one host, over a shared-memory
pipe (`csrc/shm_pipe.h`).

A send copies the tensor and its shape into the pipe and returns; a receive copies it out. No
process-group call and no socket is on the way (a helper thread starts only for a tensor
larger than the pipe's free room), so a transfer costs about a memcpy, where gloo costs a
socket round trip and wakes its I/O threads (which compete with the stages for the cores).
The pipe also carries a failing stage's error to its neighbour.
"""

from __future__ import annotations

import datetime
import json
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fastpar import _native
from fastpar.parallel.pipeline.wire import (
    DTYPES,
    MAX_NDIM,
    Peer,
    PipelineError,
    check_sendable,
    message_ends,
    peer_failed,
    resolved,
)

__all__ = ["PIPE_CAPACITY", "ShmLink", "connect_shm_links"]

PIPE_CAPACITY = 4 * 2**20  # bytes per direction of a shared-memory pipe; larger tensors stream
PIPE_NAME_BYTES = 256
CONNECT_TAG = 19


class ShmLink:
    """Sends to and receives from a neighbouring stage on this host through a shared-memory pipe.

    Messages are taken from the pipe in the order they were sent, so nothing is posted ahead; a
    send returns once its tensor is in the pipe (or handed to the pipe's sender thread when the
    pipe is full, counted in `split_sends`). Errors name the peer like `Link`'s.

    `send(tensor, what)` copies the tensor into the pipe (completed by `finish_sends` if it did
    not fit); `recv(what, leaf=False)` is the peer's next tensor, on the CPU (see `Link.recv`):
    it is this process's alone, so with `leaf` the pipe makes it the leaf itself;
    `send_input_grad(leaf, what)` sends the leaf's gradient (see `Link.send_input_grad`)
    without a Python object of it. All three are the pipe's own functions
    (`ShmTensorPipe.calls`), not methods: they run per micro-batch right after a compute, when
    the code on the way is cold and every call layer costs microseconds of bubble, so no
    Python, no pybind11 dispatch; the pipe checks the tensor, makes it contiguous if needed and
    keeps a detached alias of what it could not write yet, and only a failure calls back into
    Python, to word the error (`_PipeFailures`). The one Python layer on the way resolves a
    lazy conjugation or negation, which the pipe would copy as raw memory (`_resolving`).

    Arguments:
        peer: the neighbour.
        pipe: this end of the native pipe (see `connect_shm_links`).
        timeout_s: the pipe's bound on every wait, for error messages.
        me: this stage.
    """

    send: Callable[[Tensor, str], None]
    recv: Callable[..., Tensor]
    send_input_grad: Callable[[Tensor, str], None]

    def __init__(self, peer: Peer, *, pipe: Any, timeout_s: float, me: Peer) -> None:
        self.peer = peer
        self.me = me
        self._pipe = pipe
        self._failures = _PipeFailures(pipe, me, peer, timeout_s)
        send, self.recv, send_input_grad = pipe.calls(self._failures.reworded)
        self.send, self.send_input_grad = _resolving(send, send_input_grad)
        self._deferred_seen = 0
        self.split_sends = 0

    def post_receives(self, count: int) -> None:
        """Nothing to post: the pipe keeps every message until it is received."""

    def send_error(self, message: str, origin: Peer) -> None:
        """Make the peer's waits on this pipe raise the error (it is in shared memory at once:
        nothing to wait for)."""
        self._pipe.abort(_error_text(message, origin))

    def finish_sends(self) -> None:
        """Wait (bounded) until every tensor sent is in the pipe."""
        try:
            deferred = self._pipe.flush()
        except self._failures.errors as error:
            raise self._failures.pipeline_error(error, "sending to") from error
        self.split_sends += deferred - self._deferred_seen
        self._deferred_seen = deferred

    def end_step(self) -> None:
        """Nothing to adapt: the pipe carries any size."""

    def drop(self) -> None:
        """Nothing to forget: the pipe owns what it has not written yet."""

    def name_senders(self, senders: Mapping[str, tuple[int, int]]) -> None:
        """See `Link.name_senders`."""
        self._failures.senders = senders


def _resolving(
    send: Callable[[Tensor, str], None], send_input_grad: Callable[[Tensor, str], None]
) -> tuple[Callable[[Tensor, str], None], Callable[[Tensor, str], None]]:
    """The pipe's sends, with a lazy conjugation or negation resolved first (see
    `wire.resolved`): two flag reads per message where there is none."""

    # Anything but a tensor goes on as it is: the pipe words the refusal.
    def send_resolved(tensor: Tensor, what: str) -> None:
        send(resolved(tensor) if isinstance(tensor, Tensor) else tensor, what)

    def send_input_grad_resolved(leaf: Tensor, what: str) -> None:
        # A gradient may be lazy too (autograd's backward of x.conj() is grad.conj()); one
        # that is not sent (see microbatches.input_grad) is left to the pipe.
        carried = isinstance(leaf, Tensor) and leaf.requires_grad
        grad = leaf.grad if carried else None
        if grad is not None and (grad.is_conj() or grad.is_neg()):
            send(resolved(grad), what)
        else:
            send_input_grad(leaf, what)

    return send_resolved, send_input_grad_resolved


class _PipeFailures:
    """Words a pipe's errors for one link (held by the pipe's functions: it must not hold the
    link, or a cycle would keep the pipe open until the garbage collector ran)."""

    def __init__(self, pipe: Any, me: Peer, peer: Peer, timeout_s: float) -> None:
        native = _native.load()
        self.errors = (native.PipeAbortedError, native.PipeBrokenError)
        self._pipe, self._me, self._peer, self._timeout_s = pipe, me, peer, timeout_s
        self.senders: Mapping[str, tuple[int, int]] = {}  # see Link.name_senders

    def reworded(self, error: Exception, call: str, argument: object) -> BaseException:
        """The error a failed send or recv of the pipe raises (`error` is raised from it): the
        pipe's own as a PipelineError; a refused tensor worded as every link words it."""
        if isinstance(error, self.errors):
            if call == "send":
                return self.pipeline_error(error, "sending to")
            return self.pipeline_error(error, f"receiving {argument} from", str(argument))
        refused = isinstance(error, (ValueError, TypeError)) and isinstance(argument, Tensor)
        if call == "send" and refused:
            try:
                check_sendable(argument)
            except (ValueError, TypeError) as refusal:
                return refusal
        return error

    def pipeline_error(
        self, error: Exception, doing: str, what: str | None = None
    ) -> PipelineError:
        """The pipe's error as a PipelineError: a peer's own error as it reported it; a dead or
        silent peer named as the culprit (the stage that sends `what`, when receiving it), and
        told so, should it wake up later."""
        if isinstance(error, self.errors[0]):  # the peer aborted
            origin, message = _parse_error_text(str(error), self._peer)
            return PipelineError(message, stage=origin.stage, rank=origin.rank,
                                 via=self._peer.stage)  # fmt: skip
        cause = f"left the pipeline ({error})"
        me, peer = message_ends(self._me, self._peer, self.senders, what)
        failure = peer_failed(me, doing, peer, self._timeout_s, cause)
        self._pipe.abort(_error_text(str(failure), peer))
        return failure


def _error_text(message: str, origin: Peer) -> str:
    """An error as it travels in the pipe: JSON, with the message cut until the whole text fits
    the pipe's room for it (escapes make the JSON longer than the message)."""
    room = _native.load().PIPE_ABORT_TEXT_BYTES
    while True:
        text = json.dumps(
            {"stage": origin.stage, "rank": origin.rank, "message": message}, ensure_ascii=False
        )
        excess = len(text.encode("utf-8")) - room
        if excess <= 0:
            return text
        data = message.encode("utf-8")
        message = data[: max(0, len(data) - excess)].decode("utf-8", errors="ignore")


def _parse_error_text(text: str, sender: Peer) -> tuple[Peer, str]:
    try:
        fields = json.loads(text)
        return Peer(int(fields["stage"]), int(fields["rank"])), str(fields["message"])
    except (ValueError, KeyError, TypeError):  # not ours: attribute it to the sender
        return sender, text


def connect_shm_links(
    me: Peer,
    peers: Sequence[Peer],
    *,
    group: dist.ProcessGroup,
    timeout_s: float,
    capacity: int | None = None,
) -> tuple[dict[int, ShmLink], dict[int, str]]:
    """Open a shared-memory pipe to each neighbour in `peers` (all on this host).

    Collective between each pair: the lower stage creates the segment and sends its name over
    `group` (gloo), the higher one maps it and answers; the name is then unlinked, so a crash
    leaves nothing in /dev/shm. Both ends of a pair learn the same outcome.

    Returns:
        (links, failures) keyed by the peer's stage: a link per pipe that opened, and for each
        that did not, why (the caller decides whether to fall back).
    """
    native = _native.load()
    capacity = PIPE_CAPACITY if capacity is None else capacity  # read now: tests lower it
    timeout = datetime.timedelta(seconds=timeout_s)
    pipes: dict[int, Any] = {}
    failures: dict[int, str] = {}
    sends: list[dist.Work] = []
    names: dict[int, tuple[dist.Work, Tensor]] = {}
    answers: dict[int, tuple[dist.Work, Tensor]] = {}

    def post(text: str, peer: Peer) -> Tensor:
        message = _encode_text(text)
        sends.append(dist.isend(message, dst=peer.rank, group=group, tag=CONNECT_TAG))
        return message

    def receive(peer: Peer) -> tuple[dist.Work, Tensor]:
        buffer = torch.zeros(PIPE_NAME_BYTES, dtype=torch.uint8)
        return dist.irecv(buffer, src=peer.rank, group=group, tag=CONNECT_TAG), buffer

    def wait(pending: tuple[dist.Work, Tensor], peer: Peer) -> str:
        work, buffer = pending
        try:
            work.wait(timeout)
        except RuntimeError as error:
            raise PipelineError(
                f"{me}: {peer} did not join the shared-memory pipe's set-up within "
                f"timeout_s={timeout_s:g} ({error})",
                stage=peer.stage,
                rank=peer.rank,
            ) from error
        return bytes(buffer.tolist()).rstrip(b"\0").decode("utf-8", errors="replace")

    def open_pipe(peer: Peer, name: str, create: bool) -> str | None:
        """Create or map the segment `name` for the pipe to `peer`; why not, if it failed."""
        try:
            pipes[peer.stage] = native.ShmTensorPipe(
                name, create, capacity, timeout_s, max_dims=MAX_NDIM, dtypes=list(DTYPES)
            )
        except RuntimeError as error:
            return f"{'creating' if create else 'mapping'} the segment failed: {error}"
        return None

    kept: list[Tensor] = []  # messages in flight
    try:
        # 1. The creators create and announce; everyone posts what they will receive.
        for peer in peers:
            if me.stage < peer.stage:
                name = f"/fastpar-pp-{os.getpid()}-{uuid.uuid4().hex[:12]}"
                failure = open_pipe(peer, name, create=True)
                if failure is not None:
                    failures[peer.stage] = failure
                    name = f"error: {me}: {failure}"
                kept.append(post(name, peer))
                answers[peer.stage] = receive(peer)
            else:
                names[peer.stage] = receive(peer)
        # 2. The others map the segment and answer.
        for peer in peers:
            if peer.stage not in names:
                continue
            name = wait(names[peer.stage], peer)
            failure = name.removeprefix("error: ") if name.startswith("error: ") else None
            if failure is None:
                failure = open_pipe(peer, name, create=False)
                failure = None if failure is None else f"{me}: {failure}"
            if failure is not None:
                failures[peer.stage] = failure
            kept.append(post("ok" if failure is None else f"error: {failure}", peer))
        # 3. The creators learn the outcome; a mapped segment's name is no longer needed.
        for peer in peers:
            if peer.stage not in answers:
                continue
            answer = wait(answers[peer.stage], peer)
            if answer != "ok" and peer.stage not in failures:
                failures[peer.stage] = answer.removeprefix("error: ")
            if peer.stage in pipes:
                pipes[peer.stage].unlink()
        for work in sends:
            work.wait(timeout)
    except BaseException:
        for pipe in pipes.values():
            pipe.close()
        raise
    links: dict[int, ShmLink] = {}
    for peer in peers:
        pipe = pipes.get(peer.stage)
        if peer.stage in failures:
            if pipe is not None:
                pipe.close()
            continue
        pipe.connect()
        links[peer.stage] = ShmLink(peer, pipe=pipe, timeout_s=timeout_s, me=me)
    return links, failures


def _encode_text(text: str) -> Tensor:
    data = text.encode("utf-8")[: PIPE_NAME_BYTES - 1]
    message = torch.zeros(PIPE_NAME_BYTES, dtype=torch.uint8)
    message[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return message
