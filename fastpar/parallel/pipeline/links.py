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
from collections.abc import Sequence
from typing import Protocol

from torch import Tensor

from fastpar.parallel.pipeline.schedules import Message
from fastpar.parallel.pipeline.wire import Peer, PipelineError

__all__ = ["Inbox", "Link", "LocalLink"]


class Link(Protocol):
    """Sends to and receives from one peer rank, with every host wait bounded by the
    pipeline's timeout_s; a transport error becomes a `PipelineError` naming the peer."""

    peer: Peer
    split_sends: int
    """Tensors that could not leave whole at once since the counter was last reset."""

    def post_receives(self, count: int) -> None:
        """Get ready for the peer's next `count` messages (transports that post ahead)."""

    def recv(self, what: str) -> Tensor:
        """The peer's next tensor; `what` names it in errors and profiles ("activation 3").
        Raises PipelineError when the peer reported a failure, died or stayed silent."""
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

    def recv(self, what: str) -> Tensor:
        if not self._queue:
            raise RuntimeError(f"{self.peer}: {what} was received before it was sent")
        return self._queue.popleft()

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
    """

    def __init__(self, link: Link, expected: Sequence[Message], names: dict[Message, str]) -> None:
        self.link = link
        self._expected = list(expected)
        self._names = names
        self._what = [names[message] for message in self._expected]
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
        while self._received <= position:
            self._early[self._received] = self.link.recv(self._what[self._received])
            self._received += 1
        return self._early.pop(position)
