"""Point-to-point transport between neighbouring pipeline stages.

Two transports share one interface (`Link` and `ShmLink`: post_receives, recv, send,
send_error, finish_sends, end_step, drop):
- `ShmLink`, for two CPU-side stages on one host: a shared-memory pipe (`csrc/shm_pipe.h`). A
  send copies the tensor and its shape into the pipe and returns; a receive copies it out. No
  process-group call and no socket is on the way (a helper thread starts only for a tensor
  larger than the pipe's free room), so a transfer costs about a memcpy, where gloo costs a
  socket round trip and wakes its I/O threads (which compete with the stages for the cores).
  The pipe also carries a failing stage's error to its neighbour.
- `Link`: torch.distributed isend/irecv (gloo, or NCCL for GPU stages), described below.

Every message starts with a fixed-size int64 header that says what it carries: a tensor with
its dtype and shape, or the error that ended a peer's step. Shapes may therefore change from
one micro-batch to the next, and a failing stage can wake the neighbours waiting for it.

Receives are posted ahead, before their message can arrive, into "slots": byte buffers of a
capacity both sides know. A receive into a larger buffer is allowed (the header says how many
bytes are meaningful), so a message that fits its slot travels whole, header and payload in
one send, and since its receive is already posted the data moves as soon as the sender posts
it, while the receiver computes. A bigger message sends its header into the slot and the
payload as a second message, received when the header is read. Both sides derive the slot
capacity from the sizes of the messages of earlier steps on the link (a step's messages are
the same on both sides), so it grows to fit without any extra message.

Header layout (HEADER_LEN int64 values):
    [kind, a, b, ndim, d0, ..., d{MAX_NDIM-1}]
    KIND_INLINE / KIND_SPLIT: a tensor, a = dtype code (index in DTYPES), then its shape;
        inline: the payload follows the header in the same message; split: in the next
        message on the payload channel.
    KIND_ERROR: a = the stage where the failure happened, b = its rank, d0 = length of the
        UTF-8 message that follows the header.

On NCCL, payloads travel on the GPU (never inline) and slots on a gloo group, so the host
learns shapes without waiting for the GPU; the two directions use two NCCL groups, one
direction per communicator, so a send never waits behind a receive queued on its stream.
Messages between two ranks are matched in posting order per (source, tag); slots and split
payloads use different tags.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import json
import math
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fastpar import _native
from fastpar.profiling import record_range

MAX_NDIM = 8
HEADER_LEN = 4 + MAX_NDIM
HEADER_BYTES = 8 * HEADER_LEN  # 96: payloads after it stay aligned for every dtype
SLOT_TAG = 17
PAYLOAD_TAG = 18
MIN_SLOT_BYTES = 4096  # a header plus an error message
MAX_SLOT_BYTES = 4 * 2**20  # bigger payloads are sent apart: a second handshake costs little
ERROR_DELIVERY_S = 10.0  # how long a failing stage waits for a neighbour to take its error
PIPE_CAPACITY = 4 * 2**20  # bytes per direction of a shared-memory pipe; larger tensors stream
PIPE_NAME_BYTES = 256
CONNECT_TAG = 19

KIND_INLINE = 1
KIND_SPLIT = 2
KIND_ERROR = 3

DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
)


class PipelineError(RuntimeError):
    """A pipeline step failed on this rank or on another stage of the pipeline.

    Attributes:
        stage: the stage where the failure happened (this stage, a peer that raised, or the
            peer that died or went silent).
        rank: that stage's global rank.
        via: the neighbouring stage this rank learned it from (None: found here).
    """

    def __init__(self, message: str, *, stage: int, rank: int, via: int | None = None) -> None:
        super().__init__(message)
        self.stage = stage
        self.rank = rank
        self.via = via


@dataclass(frozen=True)
class Peer:
    """A stage of the pipeline: its index and its global rank."""

    stage: int
    rank: int

    def __str__(self) -> str:
        return f"stage {self.stage} (rank {self.rank})"


def check_sendable(tensor: Tensor) -> None:
    """Raise unless `tensor` can travel between stages (on either transport)."""
    if tensor.dim() > MAX_NDIM:
        raise ValueError(
            f"pipeline activations may have at most {MAX_NDIM} dimensions, got shape "
            f"{tuple(tensor.shape)}"
        )
    if tensor.dtype not in DTYPES:
        raise TypeError(f"pipeline activations of dtype {tensor.dtype} are not supported")


def encode_header(kind: int, tensor: Tensor) -> Tensor:
    """The header announcing `tensor`: int64 (HEADER_LEN,) on the CPU."""
    check_sendable(tensor)
    # One tensor built from a list: this runs per message, and every tensor op costs µs.
    padding = [0] * (MAX_NDIM - tensor.dim())
    values = [kind, DTYPES.index(tensor.dtype), 0, tensor.dim(), *tensor.shape, *padding]
    return torch.tensor(values, dtype=torch.int64)


def next_slot_bytes(current: int, largest: int) -> int:
    """The slot capacity after a step whose largest message had `largest` bytes: grown with a
    quarter to spare (lengths that creep up do not overflow every step), never shrunk."""
    if largest <= current:
        return current
    wanted = math.ceil(largest * 5 / 4 / MIN_SLOT_BYTES) * MIN_SLOT_BYTES
    return max(current, min(MAX_SLOT_BYTES, wanted))


class Link:
    """Sends to and receives from one neighbouring stage, with every host wait bounded.

    Arguments:
        peer: the neighbour.
        slot_group: gloo group for slots (headers, inline payloads, errors).
        send_group: group for split payloads this rank sends to the peer.
        recv_group: group for split payloads this rank receives from the peer.
        device: where payloads live (CPU for gloo, the stage's CUDA device for NCCL).
        timeout_s: bound on every host-side wait, in seconds.
        me: this stage, for error messages.
    """

    def __init__(
        self,
        peer: Peer,
        *,
        slot_group: dist.ProcessGroup,
        send_group: dist.ProcessGroup,
        recv_group: dist.ProcessGroup,
        device: torch.device,
        timeout_s: float,
        me: Peer,
    ) -> None:
        self.peer = peer
        self.me = me
        self._slot_group = slot_group
        self._send_group = send_group
        self._recv_group = recv_group
        self._device = device
        self._inline = device.type == "cpu"  # the same on both sides: same backend
        self._timeout = datetime.timedelta(seconds=timeout_s)
        self._timeout_s = timeout_s
        # Slot capacities per direction and the largest message of the current step.
        self._send_slot = self._recv_slot = MIN_SLOT_BYTES
        self._sent_largest = self._received_largest = 0
        self._slots: collections.deque[tuple[dist.Work, Tensor]] = collections.deque()
        # Sends in flight with the tensors they read from (kept alive until they complete).
        self._sends: list[tuple[dist.Work, Tensor]] = []
        self.split_sends = 0  # tensors sent apart from their header (too big for the slot)

    # --- receiving ----------------------------------------------------------------------------

    def post_receives(self, count: int) -> None:
        """Post the slots of the peer's next `count` messages."""
        for _ in range(count):
            buffer = torch.empty(self._recv_slot, dtype=torch.uint8)
            with self._failing_as("posting a receive from"):
                work = dist.irecv(buffer, src=self.peer.rank, group=self._slot_group, tag=SLOT_TAG)
            self._slots.append((work, buffer))

    def recv(self, what: str) -> Tensor:
        """The peer's next tensor (its slot must have been posted).

        Arguments:
            what: names the message in errors and profiles, e.g. "activation 3".

        Returns:
            The tensor, on this link's device, with the shape and dtype the sender announced
            (on CUDA, ordered before the current stream's later work).

        Raises:
            PipelineError: the peer reported a failure, died, or sent nothing in timeout_s.
        """
        if not self._slots:
            raise RuntimeError(f"{self.me}: no receive posted for {what} from {self.peer}")
        work, buffer = self._slots.popleft()
        with record_range(f"fastpar.pp.recv.{what.replace(' ', '')}"):
            self._wait(work, f"receiving {what} from")
            kind, a, b, ndim, *dims = buffer[:HEADER_BYTES].view(torch.int64).tolist()
            if kind == KIND_ERROR:
                text = bytes(buffer[HEADER_BYTES : HEADER_BYTES + dims[0]].tolist())
                raise PipelineError(
                    text.decode("utf-8", errors="replace"), stage=a, rank=b, via=self.peer.stage
                )
            if kind not in (KIND_INLINE, KIND_SPLIT):
                raise RuntimeError(f"{self.me}: corrupt header {kind, a, b} from {self.peer}")
            dtype, shape = DTYPES[a], tuple(dims[:ndim])
            nbytes = math.prod(shape) * dtype.itemsize
            self._received_largest = max(self._received_largest, HEADER_BYTES + nbytes)
            if kind == KIND_INLINE:
                return buffer[HEADER_BYTES : HEADER_BYTES + nbytes].view(dtype).view(shape)
            payload = torch.empty(shape, dtype=dtype, device=self._device)
            with self._failing_as(f"receiving {what} from"):
                work = dist.irecv(
                    payload, src=self.peer.rank, group=self._recv_group, tag=PAYLOAD_TAG
                )
            if payload.is_cuda:
                # Stream-ordered: the current stream waits for NCCL's, the host does not. A
                # silent peer is caught by the process group's timeout (NCCL watchdog); the
                # header already proved that the peer posted this payload.
                work.wait()
            else:
                self._wait(work, f"receiving {what} from")
            return payload

    # --- sending ------------------------------------------------------------------------------

    def send(self, tensor: Tensor, what: str) -> None:
        """Post `tensor` to the peer; completion is awaited by `finish_sends`, so the caller
        goes on computing while the transfer runs."""
        size = HEADER_BYTES + tensor.numel() * tensor.element_size()
        self._sent_largest = max(self._sent_largest, size)
        with record_range(f"fastpar.pp.send.{what.replace(' ', '')}"):
            if self._inline and size <= self._send_slot:
                header = encode_header(KIND_INLINE, tensor).view(torch.uint8)
                payload = tensor.detach().reshape(-1).view(torch.uint8)
                self._isend(torch.cat([header, payload]), self._slot_group, SLOT_TAG)
            else:
                self.split_sends += 1
                header = encode_header(KIND_SPLIT, tensor).view(torch.uint8)
                self._isend(header, self._slot_group, SLOT_TAG)
                self._isend(tensor.detach().contiguous(), self._send_group, PAYLOAD_TAG)

    def send_error(self, message: str, origin: Peer) -> None:
        """Post an error in place of the next tensor the peer expects (the message is cut to
        fit the smallest slot) and wait, bounded, until it is delivered."""
        text = message.encode("utf-8")[: MIN_SLOT_BYTES - HEADER_BYTES] or b"?"
        values = [KIND_ERROR, origin.stage, origin.rank, 1, len(text)]
        header = torch.tensor(values + [0] * (HEADER_LEN - len(values)), dtype=torch.int64)
        data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        self._isend(torch.cat([header.view(torch.uint8), data]), self._slot_group, SLOT_TAG)
        # Only this send: earlier ones may never complete if the peer failed too. A peer that
        # is between steps takes it at its next step, or, once this wait gave up (which
        # closes the connections), sees the connection closed: either way it raises.
        work, _ = self._sends[-1]
        self._wait(work, "telling", timeout_s=min(self._timeout_s, ERROR_DELIVERY_S))

    def _isend(self, tensor: Tensor, group: dist.ProcessGroup, tag: int) -> None:
        with self._failing_as("sending to"):
            work = dist.isend(tensor, dst=self.peer.rank, group=group, tag=tag)
        self._sends.append((work, tensor))

    def finish_sends(self) -> None:
        """Wait (bounded) until every posted send completed."""
        sends, self._sends = self._sends, []
        for work, tensor in sends:
            if tensor.is_cuda:
                work.wait()  # stream-ordered; bounded by the process group's timeout
            else:
                self._wait(work, "sending to")

    def end_step(self) -> None:
        """Grow the slots for the next step from this step's messages (on both sides alike)."""
        if self._inline:
            self._send_slot = next_slot_bytes(self._send_slot, self._sent_largest)
            self._recv_slot = next_slot_bytes(self._recv_slot, self._received_largest)
        self._sent_largest = self._received_largest = 0

    def drop(self) -> None:
        """Forget posted receives and sends (after a failure the link is not used again)."""
        self._slots.clear()
        self._sends = []

    # --- errors -------------------------------------------------------------------------------

    def _wait(self, work: dist.Work, doing: str, timeout_s: float | None = None) -> None:
        timeout = self._timeout if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        with self._failing_as(doing):
            work.wait(timeout)

    @contextlib.contextmanager
    def _failing_as(self, doing: str) -> Iterator[None]:
        """Turn a transport error into a PipelineError that names the peer."""
        try:
            yield
        except RuntimeError as error:
            raise PipelineError(
                f"{self.me}: {doing} {self.peer} failed: the peer died, stalled for more than "
                f"timeout_s={self._timeout_s:g}, or its connection broke ({error})",
                stage=self.peer.stage,
                rank=self.peer.rank,
                via=self.peer.stage,
            ) from error


class ShmLink:
    """Sends to and receives from a neighbouring stage on this host through a shared-memory pipe.

    Messages are taken from the pipe in the order they were sent, so nothing is posted ahead; a
    send returns once its tensor is in the pipe (or handed to the pipe's sender thread when the
    pipe is full, counted in `split_sends`). Errors name the peer like `Link`'s.

    Arguments:
        peer: the neighbour.
        pipe: this end of the native pipe (see `connect_shm_links`).
        timeout_s: the pipe's bound on every wait, for error messages.
        me: this stage.
    """

    def __init__(self, peer: Peer, *, pipe: Any, timeout_s: float, me: Peer) -> None:
        self.peer = peer
        self.me = me
        self._pipe = pipe
        self._timeout_s = timeout_s
        native = _native.load()
        self._errors = (native.PipeAbortedError, native.PipeBrokenError)
        self._sends: list[Tensor] = []  # read by the pipe until finish_sends
        self._deferred_seen = 0
        self.split_sends = 0

    def post_receives(self, count: int) -> None:
        """Nothing to post: the pipe keeps every message until it is received."""

    def recv(self, what: str) -> Tensor:
        """The peer's next tensor, on the CPU (see `Link.recv`)."""
        # try/except rather than a context manager: this runs per micro-batch, where every
        # microsecond is bubble.
        with record_range(f"fastpar.pp.recv.{what.replace(' ', '')}"):
            try:
                return self._pipe.recv(what)
            except self._errors as error:
                raise self._pipeline_error(error, f"receiving {what} from") from error

    def send(self, tensor: Tensor, what: str) -> None:
        """Copy `tensor` into the pipe (completed by `finish_sends` if it did not fit)."""
        check_sendable(tensor)
        data = tensor.detach().contiguous()
        with record_range(f"fastpar.pp.send.{what.replace(' ', '')}"):
            try:
                self._pipe.send(data)
            except self._errors as error:
                raise self._pipeline_error(error, "sending to") from error
        self._sends.append(data)

    def send_error(self, message: str, origin: Peer) -> None:
        """Make the peer's waits on this pipe raise the error (it is in shared memory at once:
        nothing to wait for)."""
        self._pipe.abort(_error_text(message, origin))

    def finish_sends(self) -> None:
        """Wait (bounded) until every tensor sent is in the pipe."""
        try:
            self._pipe.flush()
        except self._errors as error:
            raise self._pipeline_error(error, "sending to") from error
        self._sends.clear()
        deferred = self._pipe.deferred_sends
        self.split_sends += deferred - self._deferred_seen
        self._deferred_seen = deferred

    def end_step(self) -> None:
        """Nothing to adapt: the pipe carries any size."""

    def drop(self) -> None:
        self._sends.clear()

    def _pipeline_error(self, error: Exception, doing: str) -> PipelineError:
        """The pipe's error as a PipelineError: a peer's own error as it reported it; a dead or
        silent peer named as the culprit (and told so, should it wake up later)."""
        if isinstance(error, self._errors[0]):  # the peer aborted
            origin, message = _parse_error_text(str(error), self.peer)
            return PipelineError(message, stage=origin.stage, rank=origin.rank, via=self.peer.stage)
        message = (
            f"{self.me}: {doing} {self.peer} failed: the peer died, stalled for more than "
            f"timeout_s={self._timeout_s:g}, or left the pipeline ({error})"
        )
        self._pipe.abort(_error_text(message, self.peer))
        return PipelineError(
            message, stage=self.peer.stage, rank=self.peer.rank, via=self.peer.stage
        )


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
            pipes[peer.stage] = native.ShmTensorPipe(name, create, capacity, timeout_s)
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
