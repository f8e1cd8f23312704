"""The pipe's plain CPython send and recv (`ShmTensorPipe.calls`): the same tensors, leaves and
errors as its pybind methods, errors reworded by the caller's callback; both endpoints in one
process."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from fastpar import _native

CAPACITY = 4096


def _unchanged(error: Exception, call: str, argument: object) -> BaseException:
    return error


@pytest.fixture
def pipes() -> Iterator[tuple[Any, Any]]:
    native = _native.load()
    name = f"/fastpar-pp-calls-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    dtypes = [torch.float32, torch.int64]
    a = native.ShmTensorPipe(name, True, CAPACITY, 5.0, max_dims=3, dtypes=dtypes)
    b = native.ShmTensorPipe(name, False, CAPACITY, 5.0, max_dims=3, dtypes=dtypes)
    a.unlink()
    a.connect()
    b.connect()
    yield a, b
    a.close()
    b.close()


def test_calls_carry_tensors_and_make_leaves(pipes: tuple[Any, Any]) -> None:
    a, b = pipes
    send, _, send_input_grad = a.calls(_unchanged)
    _, recv, _ = b.calls(_unchanged)
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    floats = torch.randn(3, 5, generator=generator)
    big = torch.randn(2, 1000, generator=generator)  # 8 KB: larger than the pipe
    integers = torch.randint(-(2**40), 2**40, (7,), generator=generator)
    view = torch.randn(5, 3, generator=generator).t()  # not contiguous
    for tensor in (floats, integers, view):
        send(tensor, "a name, unused")
    got = [recv("floats", True), recv("integers", True), recv("view")]
    send(big)  # goes through the sender thread as the receiver makes room
    got.append(recv("big", False))
    a.flush()
    # A leaf's gradient, zeros where it has none, an empty float tensor where it needs none.
    with_grad = torch.randn(3, 5, generator=generator, requires_grad=True)
    (with_grad * floats).sum().backward()
    without_grad = torch.zeros(4, 2, requires_grad=True)
    for leaf in (with_grad, without_grad, integers):
        send_input_grad(leaf, "gradient")
    grads = [recv("gradient", False) for _ in range(3)]
    assert torch.equal(grads[0], floats)  # d(sum(w * floats)) / dw
    assert torch.equal(grads[1], torch.zeros(4, 2))
    assert grads[2].shape == (0,) and grads[2].dtype == torch.float32
    for received, sent in zip(got, (floats, integers, view, big), strict=True):
        assert received.dtype == sent.dtype and torch.equal(received.detach(), sent)
    assert [t.requires_grad for t in got] == [True, False, False, False]
    assert all(t.is_leaf for t in got)
    assert a.deferred_sends == 1


def test_calls_raise_what_the_methods_raise(pipes: tuple[Any, Any]) -> None:
    native = _native.load()
    a, b = pipes
    send, recv_a, _ = a.calls(_unchanged)
    _, recv, _ = b.calls(_unchanged)
    with pytest.raises(TypeError, match=r"takes a torch\.Tensor"):
        send([1.0])
    with pytest.raises(TypeError, match="takes a str and a bool"):
        recv("x", 1)
    with pytest.raises(ValueError, match="at most 3 dimensions, got 4"):
        send(torch.zeros(1, 1, 1, 1))
    with pytest.raises(TypeError, match="dtype Double are not sendable"):
        send(torch.zeros(2, dtype=torch.float64))
    a.abort("planted failure")
    with pytest.raises(native.PipeAbortedError, match=r"^planted failure$"):
        recv("gradient 1", False)
    a.close()
    with pytest.raises(native.PipeBrokenError, match="closed"):
        recv_a("activation 1", True)


def test_on_error_words_what_is_raised(pipes: tuple[Any, Any]) -> None:
    native = _native.load()
    a, b = pipes
    seen: list[tuple[str, str, object]] = []

    def reworded(error: Exception, call: str, argument: object) -> BaseException:
        seen.append((type(error).__name__, call, argument))
        return LookupError(f"{call} failed: {error}")

    send, _, _ = a.calls(reworded)
    _, recv, _ = b.calls(reworded)
    refused = torch.zeros(1, 1, 1, 1)
    with pytest.raises(LookupError, match=r"^send failed: .*at most 3 dimensions") as caught:
        send(refused, "activation 2")
    assert isinstance(caught.value.__cause__, ValueError)
    a.abort("planted failure")
    with pytest.raises(LookupError, match=r"^recv failed: planted failure$") as caught:
        recv("gradient 4", True)
    assert isinstance(caught.value.__cause__, native.PipeAbortedError)
    assert seen == [("ValueError", "send", refused), ("PipeAbortedError", "recv", "gradient 4")]
