"""Point-to-point transport between neighbouring pipeline stages.

Every message is a fixed-size int64 header followed by its payload. The header says what comes
next (a tensor with its dtype and shape, or the error that ended a peer's step), so shapes may
change from one micro-batch to the next, and a failing stage can wake the neighbours that are
waiting for it instead of leaving them blocked.

Header layout (HEADER_LEN int64 values):
    [kind, a, b, ndim, d0, ..., d{MAX_NDIM-1}]
    kind TENSOR: a = dtype code (index in DTYPES), b unused, then the shape.
    kind ERROR:  a = the stage where the failure happened, b = its rank; the payload is the
                 UTF-8 message as a uint8 vector of length d0.

Matching rules this relies on: messages between two ranks are matched in the order they were
posted, per (source, tag). Headers use HEADER_TAG and payloads PAYLOAD_TAG, so all of a step's
headers can be received ahead (they are small) while payloads, whose size comes from their
header, are received when needed. NCCL ignores tags and matches in order, which is why on
NCCL headers travel on a separate gloo group (also keeping the host from waiting on the GPU to
learn a shape) and the two directions use two NCCL groups: one direction per communicator means
a send can never wait behind a receive queued on the same stream.
"""

from __future__ import annotations

import contextlib
import datetime
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from fastpar.profiling import record_range

MAX_NDIM = 8
HEADER_LEN = 4 + MAX_NDIM
HEADER_TAG = 17
PAYLOAD_TAG = 18

KIND_TENSOR = 1
KIND_ERROR = 2

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
    """A neighbouring stage: its index in the pipeline and its global rank."""

    stage: int
    rank: int

    def __str__(self) -> str:
        return f"stage {self.stage} (rank {self.rank})"


def encode_tensor_header(tensor: Tensor) -> Tensor:
    """The header announcing `tensor`: int64 (HEADER_LEN,) on the CPU."""
    if tensor.dim() > MAX_NDIM:
        raise ValueError(
            f"pipeline activations may have at most {MAX_NDIM} dimensions, got shape "
            f"{tuple(tensor.shape)}"
        )
    if tensor.dtype not in DTYPES:
        raise TypeError(f"pipeline activations of dtype {tensor.dtype} are not supported")
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[0] = KIND_TENSOR
    header[1] = DTYPES.index(tensor.dtype)
    header[3] = tensor.dim()
    header[4 : 4 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
    return header


class Link:
    """Sends to and receives from one neighbouring stage, with every wait bounded.

    Arguments:
        peer: the neighbour.
        header_group: group for headers (gloo: CPU tensors).
        send_group: group for payloads this rank sends to the peer.
        recv_group: group for payloads this rank receives from the peer.
        device: where payloads live (CPU for gloo, the stage's CUDA device for NCCL).
        timeout_s: bound on every host-side wait, in seconds.
        me: this stage, for error messages.
    """

    def __init__(
        self,
        peer: Peer,
        *,
        header_group: dist.ProcessGroup,
        send_group: dist.ProcessGroup,
        recv_group: dist.ProcessGroup,
        device: torch.device,
        timeout_s: float,
        me: Peer,
    ) -> None:
        self.peer = peer
        self.me = me
        self._header_group = header_group
        self._send_group = send_group
        self._recv_group = recv_group
        self._device = device
        self._timeout = datetime.timedelta(seconds=timeout_s)
        self._timeout_s = timeout_s
        # What the receiver thread delivers: (tensor, CUDA event or None) or an exception.
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._receiver: threading.Thread | None = None
        self._stream: torch.cuda.Stream | None = None  # the receiver's stream on CUDA
        # Sends in flight with the tensors they read from (kept alive until they complete).
        self._sends: list[tuple[dist.Work, Tensor]] = []

    # --- receiving ----------------------------------------------------------------------------

    def start_receiving(self, count: int, what: str) -> None:
        """Receive the peer's next `count` messages in the background, in order.

        All headers are posted at once (they are small), and a receiver thread posts each
        payload's receive the moment its header lands, so the transfer runs while this stage
        computes instead of starting when `recv` asks for it. The thread ends after `count`
        messages or the first error; its waits are bounded by timeout_s.

        Arguments:
            count: number of messages (one per micro-batch).
            what: what they are, e.g. "activation"; message k is called f"{what} {k}".
        """
        headers = []
        for _ in range(count):
            buffer = torch.empty(HEADER_LEN, dtype=torch.int64)
            with self._failing_as("posting a receive from"):
                work = dist.irecv(
                    buffer, src=self.peer.rank, group=self._header_group, tag=HEADER_TAG
                )
            headers.append((work, buffer))
        self._inbox = queue.SimpleQueue()
        self._receiver = threading.Thread(
            target=self._receive_all,
            args=(headers, what, self._inbox),
            name=f"fastpar-pp-recv-from-stage{self.peer.stage}",
            daemon=True,  # a thread left waiting on a failed peer must not keep the process
        )
        self._receiver.start()

    def recv(self, what: str) -> Tensor:
        """The next tensor from the peer, in the order the peer sent them.

        Arguments:
            what: names the wait in profiles, e.g. "activation 3".

        Returns:
            The tensor, on this link's device, with the shape and dtype the sender announced
            (on CUDA, ordered before the current stream's later work).

        Raises:
            PipelineError: the peer reported a failure, died, or sent nothing in timeout_s.
        """
        try:
            # The receiver's own waits are bounded (header, then payload); this bound only
            # guards against the thread itself getting lost.
            with record_range(f"fastpar.pp.wait.{what.replace(' ', '')}"):
                item = self._inbox.get(timeout=2 * self._timeout_s + 10)
        except queue.Empty:
            raise PipelineError(
                f"{self.me}: the receiver thread for {self.peer} gave nothing within "
                f"{2 * self._timeout_s + 10:g}s",
                stage=self.peer.stage,
                rank=self.peer.rank,
                via=self.peer.stage,
            ) from None
        if isinstance(item, BaseException):
            raise item
        tensor, ready = item
        if ready is not None:
            stream = torch.cuda.current_stream(tensor.device)
            stream.wait_event(ready)
            tensor.record_stream(stream)  # allocated on the receiver's stream, used on this one
        return tensor

    def _receive_all(
        self, headers: list[tuple[dist.Work, Tensor]], what: str, inbox: queue.SimpleQueue
    ) -> None:
        stream = None
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)
            stream = self._recv_stream()
        for index, (work, header) in enumerate(headers):
            try:
                name = f"{what} {index}"
                with record_range(f"fastpar.pp.recv.{what}{index}"):
                    inbox.put(self._receive_one(work, header, name, stream))
            except BaseException as error:  # handed to the main thread, which raises it
                inbox.put(error)
                return

    def _receive_one(
        self,
        work: dist.Work,
        header: Tensor,
        what: str,
        stream: torch.cuda.Stream | None,
    ) -> tuple[Tensor, torch.cuda.Event | None]:
        self._wait(work, f"receiving the header of {what} from")
        kind, a, b, ndim, *dims = header.tolist()
        if kind == KIND_ERROR:
            message = self._recv_payload(torch.uint8, (dims[0],), what, on_host=True)
            raise PipelineError(
                bytes(message.tolist()).decode("utf-8", errors="replace"),
                stage=a,
                rank=b,
                via=self.peer.stage,
            )
        if kind != KIND_TENSOR:
            raise RuntimeError(f"{self.me}: corrupt header {header.tolist()} from {self.peer}")
        shape = tuple(dims[:ndim])
        if stream is None:
            return self._recv_payload(DTYPES[a], shape, what, on_host=False), None
        with torch.cuda.stream(stream):
            tensor = self._recv_payload(DTYPES[a], shape, what, on_host=False)
            ready = torch.cuda.Event()
            ready.record(stream)
        return tensor, ready

    def _recv_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(self._device)
        return self._stream

    def _recv_payload(
        self, dtype: torch.dtype, shape: tuple[int, ...], what: str, *, on_host: bool
    ) -> Tensor:
        group = self._header_group if on_host else self._recv_group
        device = torch.device("cpu") if on_host else self._device
        buffer = torch.empty(shape, dtype=dtype, device=device)
        with self._failing_as(f"receiving {what} from"):
            work = dist.irecv(buffer, src=self.peer.rank, group=group, tag=PAYLOAD_TAG)
        if device.type == "cuda":
            # Stream-ordered: the receiver's stream waits for NCCL's, the host does not. A
            # silent peer is caught by the process group's timeout (NCCL watchdog); the header
            # before this payload already proved that the peer reached this message.
            work.wait()
        else:
            self._wait(work, f"receiving {what} from")
        return buffer

    # --- sending ------------------------------------------------------------------------------

    def send(self, tensor: Tensor, what: str) -> None:
        """Post the header and payload of `tensor` to the peer; completion is awaited by
        `finish_sends`, so the caller goes on computing while the transfer runs."""
        header = encode_tensor_header(tensor)
        payload = tensor.contiguous()
        with record_range(f"fastpar.pp.send.{what.replace(' ', '')}"):
            self._isend(header, self._header_group, HEADER_TAG)
            self._isend(payload, self._send_group, PAYLOAD_TAG)

    def send_error(self, message: str, origin: Peer) -> None:
        """Post an error header and its message in place of the next tensor the peer expects."""
        data = torch.tensor(list(message.encode("utf-8")), dtype=torch.uint8)
        header = torch.zeros(HEADER_LEN, dtype=torch.int64)
        header[0], header[1], header[2], header[3], header[4] = (
            KIND_ERROR,
            origin.stage,
            origin.rank,
            1,
            data.numel(),
        )
        self._isend(header, self._header_group, HEADER_TAG)
        self._isend(data, self._header_group, PAYLOAD_TAG)

    def _isend(self, tensor: Tensor, group: dist.ProcessGroup, tag: int) -> None:
        with self._failing_as("sending to"):
            work = dist.isend(tensor, dst=self.peer.rank, group=group, tag=tag)
        self._sends.append((work, tensor))

    def finish_sends(self) -> None:
        """Wait (bounded) until every posted send completed."""
        sends, self._sends = self._sends, []
        for work, tensor in sends:
            if tensor.device.type == "cuda":
                work.wait()  # stream-ordered; bounded by the process group's timeout
            else:
                self._wait(work, "sending to")

    def _wait(self, work: dist.Work, doing: str) -> None:
        with self._failing_as(doing):
            work.wait(self._timeout)

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

    def finish_receiving(self) -> None:
        """Join the receiver thread (it has delivered its last message)."""
        if self._receiver is not None:
            self._receiver.join()
            self._receiver = None

    def drop(self) -> None:
        """Forget the receiver and the sends in flight (after a failure the link is not used
        again; a receiver still waiting ends on its own within timeout_s)."""
        self._receiver = None
        self._inbox = queue.SimpleQueue()
        self._sends = []
