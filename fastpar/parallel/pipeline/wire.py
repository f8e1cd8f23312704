"""The pipeline's wire format: what every message between two stages starts with, and the
errors that name the stage that failed.

Every message starts with a fixed-size int64 header (`Header`) that says what it carries: a
tensor with its dtype and shape, or the error that ended a peer's step. Shapes may therefore
change from one micro-batch to the next, and a failing stage can wake the neighbours waiting
for it.

Header layout (HEADER_LEN int64 values):
    [kind, a, b, ndim, d0, ..., d{MAX_NDIM-1}]
    Kind.INLINE / Kind.SPLIT: a tensor, a = dtype code (index in DTYPES), then its shape;
        inline: the payload follows the header in the same message; split: in the next
        message on the payload channel.
    Kind.ERROR: a = the stage where the failure happened, b = its rank, d0 = length of the
        UTF-8 message that follows the header.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

MAX_NDIM = 8
HEADER_LEN = 4 + MAX_NDIM
HEADER_BYTES = 8 * HEADER_LEN  # 96: payloads after it stay aligned for every dtype
MIN_SLOT_BYTES = 4096  # a header plus an error message
MAX_SLOT_BYTES = 4 * 2**20  # bigger payloads are sent apart: a second handshake costs little


class Kind(enum.IntEnum):
    """What a message carries."""

    INLINE = 1  # a tensor, its payload right after the header
    SPLIT = 2  # a tensor, its payload in a second message
    ERROR = 3  # the error that ended the sender's step, as UTF-8 text after the header


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


def message_ends(
    me: Peer, peer: Peer, senders: Mapping[str, tuple[int, int]], what: str | None
) -> tuple[Peer, Peer]:
    """The stages at both ends of message `what` between the ranks of `me` and `peer` (see
    `Link.name_senders`); `me` and `peer` themselves for a message not named there."""
    stages = senders.get(what) if what is not None else None
    if stages is None:
        return me, peer
    return Peer(stages[0], me.rank), Peer(stages[1], peer.rank)


def peer_failed(me: Peer, doing: str, peer: Peer, timeout_s: float, cause: str) -> PipelineError:
    """The error of a transfer with `peer` that broke on this side: the peer died, stalled, or
    `cause` (the transport's account); the peer is named as where the failure happened."""
    return PipelineError(
        f"{me}: {doing} {peer} failed: the peer died, stalled for more than "
        f"timeout_s={timeout_s:g}, or {cause}",
        stage=peer.stage,
        rank=peer.rank,
        via=peer.stage,
    )


def check_sendable(tensor: Tensor) -> None:
    """Raise unless `tensor` can travel between stages (on either transport)."""
    if tensor.dim() > MAX_NDIM:
        raise ValueError(
            f"pipeline activations may have at most {MAX_NDIM} dimensions, got shape "
            f"{tuple(tensor.shape)}"
        )
    if tensor.dtype not in DTYPES:
        raise TypeError(f"pipeline activations of dtype {tensor.dtype} are not supported")


def resolved(tensor: Tensor) -> Tensor:
    """`tensor` with its lazy conjugation or negation applied (`x.conj()`, `x.mH`,
    `x.conj().imag` only flag their memory): a transport sends memory, which must hold the
    values. The tensor itself, uncopied, when it has neither flag."""
    if tensor.is_conj() or tensor.is_neg():
        return tensor.detach().resolve_conj().resolve_neg()
    return tensor


@dataclass(frozen=True, slots=True)
class Header:
    """A decoded header: a tensor's kind, dtype and shape, or an error's origin and length."""

    kind: Kind
    dtype: torch.dtype | None = None
    shape: tuple[int, ...] = ()
    origin: Peer | None = None
    text_bytes: int = 0

    @property
    def payload_bytes(self) -> int:
        assert self.dtype is not None
        return math.prod(self.shape) * self.dtype.itemsize

    @classmethod
    def for_tensor(cls, kind: Kind, tensor: Tensor) -> Tensor:
        """The encoded header announcing `tensor`: int64 (HEADER_LEN,) on the CPU."""
        check_sendable(tensor)
        # One tensor built from a list: this runs per message, and every tensor op costs µs.
        padding = [0] * (MAX_NDIM - tensor.dim())
        values = [int(kind), DTYPES.index(tensor.dtype), 0, tensor.dim(), *tensor.shape, *padding]
        return torch.tensor(values, dtype=torch.int64)

    @classmethod
    def for_error(cls, origin: Peer, text_bytes: int) -> Tensor:
        """The encoded header of an error message of `text_bytes` UTF-8 bytes."""
        values = [int(Kind.ERROR), origin.stage, origin.rank, 1, text_bytes]
        return torch.tensor(values + [0] * (HEADER_LEN - len(values)), dtype=torch.int64)

    @classmethod
    def decode(cls, values: list[int]) -> Header:
        """Read HEADER_LEN int64 values; raises ValueError on a kind it does not know."""
        kind, a, b, ndim, *dims = values
        if kind == Kind.ERROR:
            return cls(Kind.ERROR, origin=Peer(a, b), text_bytes=dims[0])
        if kind not in (Kind.INLINE, Kind.SPLIT) or not 0 <= a < len(DTYPES):
            raise ValueError(f"corrupt pipeline header {values[:4]}")
        return cls(Kind(kind), dtype=DTYPES[a], shape=tuple(dims[:ndim]))


def next_slot_bytes(current: int, largest: int) -> int:
    """The slot capacity after a step whose largest message had `largest` bytes: grown with a
    quarter to spare (lengths that creep up do not overflow every step), never shrunk."""
    if largest <= current:
        return current
    wanted = math.ceil(largest * 5 / 4 / MIN_SLOT_BYTES) * MIN_SLOT_BYTES
    return max(current, min(MAX_SLOT_BYTES, wanted))
