"""The shared-memory pipe between two stages (`connect_shm_links`, `csrc/shm_pipe.h`) on its own:
tensors of every dtype and shape arrive equal (received activations as leaves), also where a
message wraps around the end of the pipe's ring, tensors far larger than the pipe stream through
it even when both sides send at once, nothing stays in /dev/shm, and an abort, a dead peer or a
silent one ends every wait on the other side within a bounded time, with the error named. A
pipe that cannot be set up makes Pipeline fall back to torch.distributed under "auto" only."""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from fastpar import _native
from fastpar.parallel.pipeline import Pipeline, shm_link
from fastpar.parallel.pipeline.shm_link import (
    ShmLink,
    _error_text,
    _parse_error_text,
    connect_shm_links,
)
from fastpar.parallel.pipeline.wire import Peer, PipelineError, check_sendable
from fastpar.testing.distributed import run_multiprocess

CAPACITY = 4096  # the smallest pipe: most tensors below do not fit whole
# The links' and the group's timeout, long enough that no load on the machine reaches it: an
# error that comes within PROMPT_S came by message or by a vanished peer, not by a timeout.
TIMEOUT_S = 120.0
PROMPT_S = TIMEOUT_S / 2
RUN_S = 3 * TIMEOUT_S  # a whole run: past a wait for the timeout, which the asserts then name


def _link(rank: int, timeout_s: float = TIMEOUT_S, capacity: int = CAPACITY) -> ShmLink:
    me, peer = Peer(rank, rank), Peer(1 - rank, 1 - rank)
    links, failures = connect_shm_links(
        me, [peer], group=dist.group.WORLD, timeout_s=timeout_s, capacity=capacity
    )
    assert not failures, failures
    return links[peer.stage]


def _tensors(seed: int) -> list[torch.Tensor]:
    """Fresh random tensors of many dtypes and shapes, small and several times the pipe."""
    generator = torch.Generator().manual_seed(seed)
    floats = torch.randn(3, 1000, 7, generator=generator)  # 84 KB: 20x the pipe
    return [
        floats,
        torch.randn(5, generator=generator, dtype=torch.float64),
        torch.randn(17, 3, generator=generator).to(torch.bfloat16),
        torch.randn(2, 2, generator=generator).to(torch.float16),
        torch.randint(-(2**40), 2**40, (999,), generator=generator),
        torch.randint(0, 2, (4, 5), generator=generator).bool(),
        torch.randn(6, generator=generator, dtype=torch.complex64),
        torch.tensor(3.25),  # zero dimensions
        torch.empty(0, 4),  # no elements
        torch.randn(1, 1, 1, 1, 1, 1, 1, 1, generator=generator),  # MAX_NDIM dimensions
        torch.randn(4097, generator=generator)[1:],  # an offset view, one byte past a page
        torch.randn(5, 3, generator=generator).t(),  # not contiguous: the pipe copies it
    ]


def _exchange(rank: int, world_size: int) -> dict[str, Any]:
    link = _link(rank)
    mine, theirs = _tensors(seed=rank), _tensors(seed=1 - rank)
    before = [tensor.clone() for tensor in mine]
    # Both sides send everything before receiving anything: each sends 20x the pipe's capacity
    # towards a peer that is not reading yet, which only the sender thread can finish.
    for index, tensor in enumerate(mine):
        link.send(tensor, f"tensor {index}")
    received = [link.recv(f"tensor {index}") for index in range(len(theirs))]
    link.finish_sends()
    equal = [
        got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
        for got, want in zip(received, theirs, strict=True)
    ]
    unchanged = all(torch.equal(a, b) for a, b in zip(mine, before, strict=True))
    return {"equal": equal, "deferred": link.split_sends, "unchanged": unchanged}


def test_tensors_arrive_equal_in_both_directions_at_once() -> None:
    for rank, result in enumerate(run_multiprocess(_exchange, 2, timeout=60)):
        assert all(result["equal"]), (rank, result["equal"])
        assert result["unchanged"], "sending must not modify the tensors"
        assert result["deferred"] > 0, "the big tensor must have streamed through the pipe"


ROUND_TRIPS = 2000
HEADER_BYTES = 4 * 8  # the glue's header of a 1-d tensor: magic, dtype, ndim, its size


def _round_trips(rank: int, world_size: int, seed: int) -> dict[str, Any]:
    """Rank 0 sends tensors of random sizes one at a time and rank 1 sends each straight back:
    every message finds its ring empty, so it goes in at once (no sender thread), wherever the
    previous one left off."""
    link = _link(rank)
    if rank == 1:
        for index in range(ROUND_TRIPS):
            link.send(link.recv(f"tensor {index}"), f"tensor {index}")
        link.finish_sends()
        return {"deferred": link.split_sends}
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 200, (ROUND_TRIPS,), generator=generator).tolist()
    sent = [torch.randint(0, 256, (n,), generator=generator, dtype=torch.uint8) for n in sizes]
    returned = []
    for index, tensor in enumerate(sent):
        link.send(tensor, f"tensor {index}")
        returned.append(link.recv(f"tensor {index}"))
    link.finish_sends()
    equal = [torch.equal(a, b) for a, b in zip(sent, returned, strict=True)]
    return {"deferred": link.split_sends, "equal": equal, "sizes": sizes}


def test_messages_wrap_around_the_ring_intact() -> None:
    seed = int.from_bytes(os.urandom(4), "little")
    first, second = run_multiprocess(_round_trips, 2, args=(seed,), timeout=120)
    assert all(first["equal"]), (seed, first["equal"].index(False))
    assert first["deferred"] == second["deferred"] == 0, "every message must fit at once"
    # The random sizes must have cut headers and payloads at the ring's end.
    starts = list(itertools.accumulate(HEADER_BYTES + n for n in first["sizes"]))[:-1]
    offsets = [(start % CAPACITY, n) for start, n in zip(starts, first["sizes"][1:], strict=True)]
    assert any(o > CAPACITY - HEADER_BYTES for o, _ in offsets), seed
    assert any(0 < CAPACITY - o - HEADER_BYTES < n for o, n in offsets), seed


def _segments(rank: int, world_size: int) -> list[str]:
    link = _link(rank)
    link.send(torch.arange(10.0), "numbers")
    assert torch.equal(link.recv("numbers"), torch.arange(10.0))
    link.finish_sends()
    dist.barrier()
    # Each rank's pipe names carry their creator's pid: none is left once both have mapped it.
    return [path.name for path in Path("/dev/shm").glob(f"fastpar-pp-{os.getpid()}-*")]


def test_no_segment_stays_in_dev_shm() -> None:
    assert run_multiprocess(_segments, 2, timeout=60) == [[], []]


def _aborted(rank: int, world_size: int) -> tuple[str, str, float]:
    link = _link(rank)
    dist.barrier()
    if rank == 0:
        time.sleep(0.5)  # the peer is waiting by now
        link.send_error("stage 0 raised ValueError: planted", Peer(0, 0))
        return "sent", "", 0.0
    start = time.monotonic()
    try:
        link.recv("activation 0")
    except PipelineError as error:
        waited = time.monotonic() - start
        # Every later call raises the same, sends included: nobody would receive them.
        with pytest.raises(PipelineError, match="planted"):
            link.send(torch.ones(3), "gradient 0")
        return f"{error.stage} {error.rank} {error.via}", str(error), waited
    return "no error", "", 0.0


def _abort_after_delivery(rank: int, world_size: int) -> tuple[str, str]:
    """Rank 0's message is in the pipe when rank 1 aborts: rank 0's flush has nothing left to
    wait for and returns; its next send raises the abort."""
    link = _link(rank)
    if rank == 0:
        link.send(torch.ones(3), "activation 0")
        dist.barrier()  # delivered
        dist.barrier()  # aborted
        try:
            link.finish_sends()
        except PipelineError as error:
            return "flush raised", str(error)
        try:
            link.send(torch.ones(3), "activation 1")
        except PipelineError as error:
            return "send raised", str(error)
        return "nothing raised", ""
    received = link.recv("activation 0")
    dist.barrier()
    link.send_error("stage 1 raised ValueError: planted", Peer(1, 1))
    dist.barrier()
    return "received", str(received.tolist())


def test_a_flush_with_nothing_left_returns_after_an_abort() -> None:
    sender, receiver = run_multiprocess(_abort_after_delivery, 2, timeout=60)
    assert receiver == ("received", "[1.0, 1.0, 1.0]")
    assert sender == ("send raised", "stage 1 raised ValueError: planted")


def test_an_abort_reaches_the_waiting_peer_verbatim() -> None:
    _, (origin, message, waited) = run_multiprocess(
        _aborted, 2, timeout=RUN_S, group_timeout=TIMEOUT_S
    )
    assert origin == "0 0 0"
    assert message == "stage 0 raised ValueError: planted"
    assert waited < PROMPT_S  # told, not timed out


def _timed_recv(link: ShmLink, what: str) -> tuple[str, float]:
    """The error that receiving `what` ends in, and how long it took to come."""
    start = time.monotonic()
    try:
        link.recv(what)
    except PipelineError as error:
        return str(error), time.monotonic() - start
    return "no error", 0.0


def _dead(rank: int, world_size: int) -> tuple[str, float]:
    link = _link(rank)
    dist.barrier()
    if rank == 1:
        os._exit(3)
    return _timed_recv(link, "gradient 2")


def test_a_dead_peer_ends_the_wait() -> None:
    (message, waited), _ = run_multiprocess(
        _dead, 2, timeout=RUN_S, group_timeout=TIMEOUT_S, may_die=(1,)
    )
    assert "receiving gradient 2 from stage 1 (rank 1) failed" in message
    assert "exited" in message
    assert waited < PROMPT_S  # noticed by its pid, not by the timeout


def _silent(rank: int, world_size: int, timeout_s: float, silent_s: float) -> tuple[str, float]:
    link = _link(rank, timeout_s=timeout_s)
    if rank == 1:
        time.sleep(silent_s)  # alive, sending nothing
        return "", 0.0
    return _timed_recv(link, "activation 5")


def test_a_silent_peer_times_out() -> None:
    # The silence outlasts the timeout by far: a rank that waited it out would take silent_s.
    timeout_s, silent_s = 0.5, 10.0
    (message, waited), _ = run_multiprocess(_silent, 2, args=(timeout_s, silent_s), timeout=60)
    assert "receiving activation 5 from stage 1 (rank 1) failed" in message
    assert "timed out after 0.5 s" in message
    assert timeout_s <= waited < silent_s


def test_bad_arguments_are_named() -> None:
    native = _native.load()
    with pytest.raises(ValueError, match="capacity must be a positive multiple of 4096, got 100"):
        native.ShmTensorPipe("/fastpar-pp-test-bad", True, 100, 1.0)
    with pytest.raises(ValueError, match="at most 8 dimensions"):
        check_sendable(torch.zeros([1] * 9))
    with pytest.raises(TypeError, match=r"dtype torch\.uint16 are not supported"):
        check_sendable(torch.zeros(2, dtype=torch.uint16))


def _leaves_and_refusals(rank: int, world_size: int, seed: int) -> dict[str, Any]:
    """Rank 0 sends a float and an integer tensor twice, trying in between tensors no link may
    carry; rank 1 receives them as leaves, then not."""
    link = _link(rank)
    generator = torch.Generator().manual_seed(seed)
    floats, integers = torch.randn(4, 3, generator=generator), torch.arange(6)
    if rank == 0:
        errors = []
        for refused in (torch.zeros([1] * 9), torch.zeros(2, dtype=torch.uint16)):
            try:
                link.send(refused, "refused")
            except (ValueError, TypeError) as error:
                errors.append(f"{type(error).__name__}: {error}")
        for _ in range(2):
            link.send(floats, "floats")
            link.send(integers, "integers")
        link.finish_sends()
        return {"errors": errors}
    received = [link.recv(what, leaf) for leaf in (True, False) for what in ("floats", "integers")]
    return {
        "equal": [torch.equal(got.detach(), want) for got, want in
                  zip(received, [floats, integers] * 2, strict=True)],
        "requires_grad": [tensor.requires_grad for tensor in received],
        "is_leaf": [tensor.is_leaf for tensor in received],
    }  # fmt: skip


def test_received_tensors_become_leaves_and_refused_tensors_are_named() -> None:
    seed = int.from_bytes(os.urandom(4), "little")
    sender, receiver = run_multiprocess(_leaves_and_refusals, 2, args=(seed,), timeout=60)
    assert len(sender["errors"]) == 2, sender
    assert sender["errors"][0].startswith("ValueError: pipeline activations may have at most 8")
    assert sender["errors"][1] == (
        "TypeError: pipeline activations of dtype torch.uint16 are not supported"
    )
    assert all(receiver["equal"]), (seed, receiver)
    # A leaf for a floating tensor asked as one; integers carry no gradient.
    assert receiver["requires_grad"] == [True, False, False, False], receiver
    assert all(receiver["is_leaf"]), receiver


def _unmappable(rank: int, world_size: int) -> dict[str, Any]:
    # A pipe larger than any /dev/shm: creating its segment fails on the creator.
    shm_link.PIPE_CAPACITY = 2**42
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    stage = nn.Linear(4, 4)
    results: dict[str, Any] = {}
    for transport in ("auto", "shm"):
        try:
            pipe = Pipeline(
                stage, stage_index=rank, num_stages=2, loss_fn=nn.MSELoss(), transport=transport
            )
            pipe.step(x, y)
            results[transport] = pipe.transports
        except RuntimeError as error:
            results[transport] = str(error)
    return results


def test_a_pipe_that_cannot_be_set_up_falls_back_only_under_auto() -> None:
    for rank, result in enumerate(run_multiprocess(_unmappable, 2, timeout=60)):
        assert result["auto"] == {1 - rank: "torch"}, result
        assert "transport 'shm': no shared-memory pipe to stage" in result["shm"], result
        assert "creating the segment failed" in result["shm"], result


def test_error_texts_fit_the_pipe_and_read_back() -> None:
    room = _native.load().PIPE_ABORT_TEXT_BYTES
    origin, sender = Peer(2, 5), Peer(1, 4)
    # A traceback-like message: newlines, quotes and non-ASCII escape to longer JSON.
    long_message = 'stage 2 raised "ValueError":\n  ünïcödé ✓ line\n' * 200
    for message in ("short", long_message):
        text = _error_text(message, origin)
        assert len(text.encode("utf-8")) <= room
        peer, parsed = _parse_error_text(text, sender)
        assert peer == origin and message.startswith(parsed) and len(parsed) > 0
    # A text that is not one of ours is the sender's, verbatim.
    assert _parse_error_text("plain words", sender) == (sender, "plain words")
