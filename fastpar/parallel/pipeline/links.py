"""Links between the ranks of a pipeline: one typed interface (`Link`), three transports.

- `ShmLink` (shm_link.py): a shared-memory pipe between CPU processes of one host.
- `TorchLink` (torch_link.py): torch.distributed isend/irecv (gloo, or NCCL for GPU stages).
- `LocalLink`: between two stages of the same rank (zbv's V turns on one rank; any placement
  with several stages per rank and one rank): a queue, no copy.

A rank receives from one peer in the order that peer sent (every transport is first in, first
out); plan.py reads ahead where a schedule wants the messages in another order.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Protocol

from torch import Tensor

from fastpar.parallel.pipeline.microbatches import carries_grad, input_grad
from fastpar.parallel.pipeline.wire import Peer

__all__ = ["Link", "LocalLink"]


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

    def send_input_grad(self, leaf: Tensor, what: str) -> None:
        """`send(input_grad(leaf), what)` (see microbatches.input_grad): the gradient of a stage's
        input, received as `leaf`, after the stage's backward."""

    def send_error(self, message: str, origin: Peer) -> None:
        """Deliver `message` in place of the next tensor the peer expects (bounded)."""

    def finish_sends(self) -> None:
        """Wait (bounded) until every send started this step completed."""

    def end_step(self) -> None:
        """Adapt to this step's messages (e.g. grow receive buffers), alike on both sides."""

    def drop(self) -> None:
        """Forget pending messages (after a failure the link is not used again)."""

    def name_senders(self, senders: Mapping[str, tuple[int, int]]) -> None:
        """Learn, per message between this rank and the peer (by name, either way), (its stage
        on this rank, its stage on the peer): a failed transfer of it then names those two
        stages (the peer's as where the failure happened), not the first stage of each rank."""


class LocalLink:
    """A link from a rank to itself: what one of its stages sends, another receives."""

    def __init__(self, me: Peer) -> None:
        self.peer = me
        self.split_sends = 0
        # (tensor, whether it is an alias of what was sent: detached, or else the tensor itself)
        self._queue: collections.deque[tuple[Tensor, bool]] = collections.deque()

    def post_receives(self, count: int) -> None:
        """Nothing to post."""

    def recv(self, what: str, leaf: bool = False) -> Tensor:
        if not self._queue:
            raise RuntimeError(f"{self.peer}: {what} was received before it was sent")
        tensor, alias = self._queue.popleft()
        if leaf and carries_grad(tensor):
            if not alias:  # the sender's own tensor must not become this leaf
                tensor = tensor.detach()
            tensor.requires_grad = True
        return tensor

    def send(self, tensor: Tensor, what: str) -> None:
        # Detached only where it matters (a detach costs ~10 us when cold, on the path between
        # two stages of this rank): a tensor that requires grad, or one received as a leaf.
        if tensor.requires_grad:
            self._queue.append((tensor.detach(), True))
        else:
            self._queue.append((tensor, False))

    def send_input_grad(self, leaf: Tensor, what: str) -> None:
        self.send(input_grad(leaf), what)

    def send_error(self, message: str, origin: Peer) -> None:
        """Nobody else to tell."""

    def finish_sends(self) -> None:
        """Sends complete at once."""

    def end_step(self) -> None:
        """Nothing to adapt."""

    def drop(self) -> None:
        self._queue.clear()

    def name_senders(self, senders: Mapping[str, tuple[int, int]]) -> None:
        """Nothing to name: this rank is both ends."""
