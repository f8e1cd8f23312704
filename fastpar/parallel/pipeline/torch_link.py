"""`TorchLink`: a pipeline link over torch.distributed isend/irecv (gloo, or NCCL for GPU
stages).

Receives are posted ahead, before their message can arrive, into "slots": byte buffers of a
capacity both sides know. A receive into a larger buffer is allowed (the header says how many
bytes are meaningful), so a message that fits its slot travels whole, header and payload in
one send, and since its receive is already posted the data moves as soon as the sender posts
it, while the receiver computes. A bigger message sends its header into the slot and the
payload as a second message, received when the header is read. Both sides derive the slot
capacity from the sizes of the messages of earlier steps on the link (a step's messages are
the same on both sides), so it grows to fit without any extra message.

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
from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from fastpar.parallel.pipeline.microbatches import carries_grad, input_grad
from fastpar.parallel.pipeline.wire import (
    HEADER_BYTES,
    MIN_SLOT_BYTES,
    Header,
    Kind,
    Peer,
    PipelineError,
    message_ends,
    next_slot_bytes,
    peer_failed,
    resolved,
)

__all__ = ["ERROR_DELIVERY_S", "TorchLink"]

SLOT_TAG = 17
PAYLOAD_TAG = 18
ERROR_DELIVERY_S = 10.0  # how long a failing stage waits for a neighbour to take its error


class TorchLink:
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
        self._sends: list[tuple[dist.Work, Tensor, str | None]] = []  # and the message's name
        self.split_sends = 0  # tensors sent apart from their header (too big for the slot)
        self._senders: Mapping[str, tuple[int, int]] = {}  # see name_senders

    # --- receiving ----------------------------------------------------------------------------

    def post_receives(self, count: int) -> None:
        """Post the slots of the peer's next `count` messages."""
        for _ in range(count):
            buffer = torch.empty(self._recv_slot, dtype=torch.uint8)
            with self._failing_as("posting a receive from"):
                work = dist.irecv(buffer, src=self.peer.rank, group=self._slot_group, tag=SLOT_TAG)
            self._slots.append((work, buffer))

    def recv(self, what: str, leaf: bool = False) -> Tensor:
        """The peer's next tensor (its slot must have been posted).

        Arguments:
            what: names the message in errors, e.g. "activation 3".
            leaf: return a floating or complex tensor as a leaf that requires grad (detached:
                it may be a view of the slot).

        Returns:
            The tensor, on this link's device, with the shape and dtype the sender announced
            (on CUDA, ordered before the current stream's later work).

        Raises:
            PipelineError: the peer reported a failure, died, or sent nothing in timeout_s.
        """
        if not self._slots:
            raise RuntimeError(f"{self.me}: no receive posted for {what} from {self.peer}")
        tensor = self._receive(self._slots.popleft(), what)
        if leaf and carries_grad(tensor):
            return tensor.detach().requires_grad_(True)
        return tensor

    def _receive(self, slot: tuple[dist.Work, Tensor], what: str) -> Tensor:
        work, buffer = slot
        self._wait(work, f"receiving {what} from", what=what)
        try:
            header = Header.decode(buffer[:HEADER_BYTES].view(torch.int64).tolist())
        except ValueError as error:
            raise RuntimeError(f"{self.me}: {error} from {self.peer}") from error
        if header.kind is Kind.ERROR:
            assert header.origin is not None
            text = bytes(buffer[HEADER_BYTES : HEADER_BYTES + header.text_bytes].tolist())
            raise PipelineError(
                text.decode("utf-8", errors="replace"),
                stage=header.origin.stage,
                rank=header.origin.rank,
                via=self.peer.stage,
            )
        assert header.dtype is not None
        dtype, shape, nbytes = header.dtype, header.shape, header.payload_bytes
        self._received_largest = max(self._received_largest, HEADER_BYTES + nbytes)
        if header.kind is Kind.INLINE:
            return buffer[HEADER_BYTES : HEADER_BYTES + nbytes].view(dtype).view(shape)
        payload = torch.empty(shape, dtype=dtype, device=self._device)
        with self._failing_as(f"receiving {what} from", what):
            work = dist.irecv(payload, src=self.peer.rank, group=self._recv_group, tag=PAYLOAD_TAG)
        if payload.is_cuda:
            # Stream-ordered: the current stream waits for NCCL's, the host does not. A
            # silent peer is caught by the process group's timeout (NCCL watchdog); the
            # header already proved that the peer posted this payload.
            work.wait()
        else:
            self._wait(work, f"receiving {what} from", what=what)
        return payload

    # --- sending ------------------------------------------------------------------------------

    def send_input_grad(self, leaf: Tensor, what: str) -> None:
        """See `Link.send_input_grad`."""
        self.send(input_grad(leaf), what)

    def send(self, tensor: Tensor, what: str) -> None:
        """Post `tensor` to the peer; completion is awaited by `finish_sends`, so the caller
        goes on computing while the transfer runs."""
        tensor = resolved(tensor)
        size = HEADER_BYTES + tensor.numel() * tensor.element_size()
        self._sent_largest = max(self._sent_largest, size)
        if self._inline and size <= self._send_slot:
            header = Header.for_tensor(Kind.INLINE, tensor).view(torch.uint8)
            payload = tensor.detach().reshape(-1).view(torch.uint8)
            self._isend(torch.cat([header, payload]), self._slot_group, SLOT_TAG, what)
        else:
            self.split_sends += 1
            header = Header.for_tensor(Kind.SPLIT, tensor).view(torch.uint8)
            self._isend(header, self._slot_group, SLOT_TAG, what)
            self._isend(tensor.detach().contiguous(), self._send_group, PAYLOAD_TAG, what)

    def send_error(self, message: str, origin: Peer) -> None:
        """Post an error in place of the next tensor the peer expects (the message is cut to
        fit the smallest slot) and wait, bounded, until it is delivered."""
        text = message.encode("utf-8")[: MIN_SLOT_BYTES - HEADER_BYTES] or b"?"
        header = Header.for_error(origin, len(text))
        data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        self._isend(torch.cat([header.view(torch.uint8), data]), self._slot_group, SLOT_TAG, None)
        # Only this send: earlier ones may never complete if the peer failed too. A peer that
        # is between steps takes it at its next step, or, once this wait gave up (which
        # closes the connections), sees the connection closed: either way it raises.
        work, _, _ = self._sends[-1]
        self._wait(work, "telling", timeout_s=min(self._timeout_s, ERROR_DELIVERY_S))

    def _isend(self, tensor: Tensor, group: dist.ProcessGroup, tag: int, what: str | None) -> None:
        with self._failing_as(_sending(what), what):
            work = dist.isend(tensor, dst=self.peer.rank, group=group, tag=tag)
        self._sends.append((work, tensor, what))

    def finish_sends(self) -> None:
        """Wait (bounded) until every posted send completed."""
        sends, self._sends = self._sends, []
        for work, tensor, what in sends:
            if tensor.is_cuda:
                work.wait()  # stream-ordered; bounded by the process group's timeout
            else:
                self._wait(work, _sending(what), what=what)

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

    def name_senders(self, senders: Mapping[str, tuple[int, int]]) -> None:
        """See `Link.name_senders`."""
        self._senders = senders

    # --- errors -------------------------------------------------------------------------------

    def _wait(
        self, work: dist.Work, doing: str, timeout_s: float | None = None, what: str | None = None
    ) -> None:
        timeout = self._timeout if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        with self._failing_as(doing, what):
            work.wait(timeout)

    @contextlib.contextmanager
    def _failing_as(self, doing: str, what: str | None = None) -> Iterator[None]:
        """Turn a transport error into a PipelineError that names the peer (the stage that
        sends `what`, when receiving it)."""
        try:
            yield
        except RuntimeError as error:
            cause = f"its connection broke ({error})"
            me, peer = message_ends(self.me, self.peer, self._senders, what)
            raise peer_failed(me, doing, peer, self._timeout_s, cause) from error


def _sending(what: str | None) -> str:
    return f"sending {what} to" if what is not None else "sending to"
