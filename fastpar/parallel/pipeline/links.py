"""Links between the ranks of a pipeline: one typed interface (`Link`), three transports.

- `ShmLink` (shm_link.py): a shared-memory pipe between CPU processes of one host.
- `TorchLink` (torch_link.py): torch.distributed isend/irecv (gloo, or NCCL for GPU stages).
- `LocalLink`: between two stages of the same rank (zbv's V turns on one rank; any placement
  with several stages per rank and one rank): a queue, no copy.

A rank receives from one peer in the order that peer sent (every transport is first in, first
out), but a schedule may want the peer's messages in another order (an activation and a
gradient crossing between the same two ranks). Schedules are pure, so each side knows the
peer's send order; `Inbox` reads ahead in that order and keeps what is not wanted yet.
"""

from __future__ import annotations

import collections
from collections.abc import Collection, Sequence
from typing import Protocol

from torch import Tensor

from fastpar.parallel.pipeline.microbatches import carries_grad
from fastpar.parallel.pipeline.schedules import Message
from fastpar.parallel.pipeline.wire import Peer, PipelineError

__all__ = ["Inbox", "Link", "LocalLink"]


class Link(Protocol):
    """Sends to and receives from one peer rank, with every host wait bounded by the
    pipeline's timeout_s; a transport error becomes a `PipelineError` naming the peer.
    Profiler ranges around transfers are the caller's (only while a profiler runs: a range
    costs microseconds even when nobody listens, on the path a peer waits on)."""

    peer: Peer
    split_sends: int
    """Tensors that could not leave whole at once since the counter was last reset."""

    def post_receives(self, count: int) -> None:
        """Get ready for the peer's next `count` messages (transports that post ahead)."""

    def recv(self, what: str, leaf: bool = False) -> Tensor:
        """The peer's next tensor; `what` names it in errors ("activation 3"). With `leaf`, a
        floating or complex tensor comes back as a leaf that requires grad (the transport's own
        tensor in place, or else a detached alias). Raises PipelineError when the peer reported
        a failure, died or stayed silent."""
        ...

    def send(self, tensor: Tensor, what: str) -> None:
        """Start sending `tensor`'s values (detached from autograd here); `finish_sends` waits
        for it."""

    def send_error(self, message: str, origin: Peer) -> None:
        """Deliver `message` in place of the next tensor the peer expects (bounded)."""

    def finish_sends(self) -> None:
        """Wait (bounded) until every send started this step completed."""

    def end_step(self) -> None:
        """Adapt to this step's messages (e.g. grow receive buffers), alike on both sides."""

    def drop(self) -> None:
        """Forget pending messages (after a failure the link is not used again)."""


class LocalLink:
    """A link from a rank to itself: what one of its stages sends, another receives."""

    def __init__(self, me: Peer) -> None:
        self.peer = me
        self.split_sends = 0
        self._queue: collections.deque[Tensor] = collections.deque()

    def post_receives(self, count: int) -> None:
        """Nothing to post."""

    def recv(self, what: str, leaf: bool = False) -> Tensor:
        if not self._queue:
            raise RuntimeError(f"{self.peer}: {what} was received before it was sent")
        tensor = self._queue.popleft()  # a detached alias: its own leaf
        if leaf and carries_grad(tensor):
            tensor.requires_grad = True
        return tensor

    def send(self, tensor: Tensor, what: str) -> None:
        self._queue.append(tensor.detach())

    def send_error(self, message: str, origin: Peer) -> None:
        """Nobody else to tell."""

    def finish_sends(self) -> None:
        """Sends complete at once."""

    def end_step(self) -> None:
        """Nothing to adapt."""

    def drop(self) -> None:
        self._queue.clear()


class Inbox:
    """The messages one peer sends this rank in a step, handed out in any order.

    Arguments:
        link: the link to the peer.
        expected: the peer's messages to this rank, in the order the peer sends them.
        names: what to call a message in errors and profiles.
        leaves: the messages to receive as leaves (see `Link.recv`).
    """

    def __init__(
        self,
        link: Link,
        expected: Sequence[Message],
        names: dict[Message, str],
        leaves: Collection[Message] = (),
    ) -> None:
        self.link = link
        self._expected = list(expected)
        self._names = names
        self._what = [names[message] for message in self._expected]
        self._leaf = [message in leaves for message in self._expected]
        self._positions = {message: index for index, message in enumerate(self._expected)}
        self._received = 0  # messages of this step read from the link
        self._early: dict[int, Tensor] = {}  # read, not yet handed out, by position

    def position(self, message: Message) -> int:
        """Where `message` comes in the peer's sends of a step: what `recv` takes. Looked up
        once, when the plan is made (a Message hashes in Python, microseconds per message on
        the path between two computes)."""
        if message not in self._positions:
            raise PipelineError(
                f"{self.link.peer} sends no {self._names[message]} in this schedule",
                stage=self.link.peer.stage,
                rank=self.link.peer.rank,
            )
        return self._positions[message]

    def start_step(self) -> None:
        """Post the step's receives (on transports that post ahead)."""
        self._received = 0
        self._early.clear()
        self.link.post_receives(len(self._expected))

    def recv(self, position: int) -> Tensor:
        """The tensor of the peer's message at `position` (see `position`), reading (and
        keeping) the peer's earlier messages first."""
        if position < self._received:
            return self._early.pop(position)
        while self._received < position:
            index = self._received
            self._early[index] = self.link.recv(self._what[index], self._leaf[index])
            self._received += 1
        self._received += 1
        return self.link.recv(self._what[position], self._leaf[position])
