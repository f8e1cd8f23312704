"""PackedLayout: packed rows to and from the padded tensor, against torch's
pack_padded_sequence / pad_packed_sequence, with their gradients."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils._python_dispatch import TorchDispatchMode

import fastpar.nn
from fastpar.ops.packing import PackedLayout, batch_sizes_of, checked_lengths


def _packed(steps: int, lengths: list[int], features: tuple[int, ...], seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, len(lengths), *features, generator=generator, dtype=torch.float64)
    return pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)


@pytest.mark.parametrize(
    ("steps", "lengths", "features"),
    [(5, [5, 3, 3, 1], (2,)), (7, [2, 7, 4], (3, 2)), (4, [4], (1,)), (6, [6, 6], (3,))],
)
def test_pad_and_pack_match_torch(steps: int, lengths: list[int], features: tuple) -> None:
    packed = _packed(steps, lengths, features, seed=steps)
    layout = PackedLayout(packed.batch_sizes, packed.data.device)
    # torch's padded tensor in the packed batch's sorted order.
    want, want_lengths = pad_packed_sequence(packed._replace(unsorted_indices=None))
    got = layout.pad(packed.data)
    assert torch.equal(got, want)
    assert torch.equal(layout.lengths, want_lengths)
    assert torch.equal(layout.pack(got), packed.data)


def test_steps_past_the_longest_sequence_hold_zeros() -> None:
    packed = _packed(3, [3, 1], (2,), seed=3)
    layout = PackedLayout(packed.batch_sizes, packed.data.device, steps=5)
    want, _ = pad_packed_sequence(packed._replace(unsorted_indices=None), total_length=5)
    assert torch.equal(layout.pad(packed.data), want)


def test_gradients_both_ways() -> None:
    packed = _packed(6, [6, 4, 1, 3], (3,), seed=4)
    layout = PackedLayout(packed.batch_sizes, packed.data.device)
    data = packed.data.clone().requires_grad_()
    torch.autograd.gradcheck(layout.pad, (data,))
    torch.autograd.gradgradcheck(layout.pad, (data,))
    padded = layout.pad(packed.data).detach().requires_grad_()
    torch.autograd.gradcheck(layout.pack, (padded,))
    # Rows past each length get no gradient.
    cotangent = torch.randn(packed.data.shape, dtype=torch.float64)
    layout.pack(padded).backward(cotangent)
    assert padded.grad[4:, 1].abs().max() == 0 and padded.grad[1:, 3].abs().max() == 0


def test_batch_sizes_and_lengths_checks() -> None:
    assert batch_sizes_of(torch.tensor([4, 2, 2])).tolist() == [3, 3, 1, 1]
    with pytest.raises(ValueError, match="lengths must all be >= 1"):
        checked_lengths(torch.tensor([2, 0]), 3)
    with pytest.raises(ValueError, match=r"lengths must be <= T = 3"):
        checked_lengths(torch.tensor([4, 1]), 3)


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _ops_for_packed_step(steps: int, backend: str) -> int:
    torch.manual_seed(0)
    lstm = fastpar.nn.LSTM(3, 4, backend=backend)
    lengths = torch.linspace(1, steps, 8).round().long()
    packed = pack_padded_sequence(torch.randn(steps, 8, 3), lengths, enforce_sorted=False)
    packed.data.requires_grad_()
    with _CountOps() as counter:
        lstm(packed)[0].data.sum().backward()
    return counter.count


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_module_ops_do_not_grow_with_time(backend: str) -> None:
    # torch's pad and pack copy a step at a time in backward: thousands of small kernels at
    # T=512. The layout's gathers are one each way whatever T.
    assert _ops_for_packed_step(48, backend) == _ops_for_packed_step(12, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_module_never_waits_for_the_gpu(dtype: torch.dtype) -> None:
    # torch's pad_packed_sequence copies unsorted_indices to the host, and a blocking copy of
    # the lengths to the GPU waits for every queued kernel: either stalls the host each step.
    lstm = fastpar.nn.LSTM(8, 16, num_layers=2, bidirectional=True, backend="triton")
    lstm = lstm.to("cuda", dtype)
    lengths = torch.tensor([5, 12, 3, 9, 12, 1])
    x = torch.randn(12, 6, 8, device="cuda", dtype=dtype)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    packed.data.requires_grad_()
    lstm(packed)[0].data.sum().backward()  # compiles the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, (h_n, c_n) = lstm(packed)
        (out.data.float().sum() + h_n.float().sum() + c_n.float().sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
