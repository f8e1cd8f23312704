"""BlockCollate: an empty block collates to a batch of 0 samples shaped like any other, and a
DataLoader fed by DynamicSlicer.batch_sampler() on real ranks keeps every rank in step through
an epoch whose last step leaves a rank without samples."""

from __future__ import annotations

import pickle
from collections import namedtuple
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.nn.utils.rnn import pack_sequence
from torch.utils.data import DataLoader, Dataset, default_collate

from fastpar.data import BlockCollate, DynamicSlicer
from fastpar.testing.distributed import run_multiprocess

Pair = namedtuple("Pair", ["x", "y"])


class _Samples(Dataset[Any]):
    """Sample i is made by `make(i)`."""

    def __init__(self, kind: str, count: int = 5) -> None:
        self.kind, self.count = kind, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> Any:
        features = torch.arange(6, dtype=torch.float32).reshape(2, 3) + i
        if self.kind == "tensor":
            return features
        if self.kind == "tuple":
            return features, i
        if self.kind == "dict":
            return {"x": features, "name": f"s{i}", "mask": torch.tensor([True, i % 2 == 0])}
        if self.kind == "namedtuple":
            return Pair(x=features.double(), y=float(i))
        return [features, f"s{i}", (i, b"raw")]


def _cat(first: Any, second: Any) -> Any:
    """Two collated batches joined along the batch dimension."""
    if isinstance(first, torch.Tensor):
        return torch.cat([first, second])
    if isinstance(first, dict):
        return {key: _cat(first[key], second[key]) for key in first}
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(_cat(a, b) for a, b in zip(first, second, strict=True)))
    if all(isinstance(item, (str, bytes)) for item in [*first, *second]):
        return type(first)([*first, *second])
    return type(first)(_cat(a, b) for a, b in zip(first, second, strict=True))


def _equal(first: Any, second: Any) -> bool:
    if isinstance(first, torch.Tensor):
        same = first.dtype == second.dtype and first.shape == second.shape
        return same and torch.equal(first, second)
    if type(first) is not type(second):
        return False
    if isinstance(first, dict):
        return first.keys() == second.keys() and all(_equal(first[k], second[k]) for k in first)
    if isinstance(first, (list, tuple)):
        pairs = zip(first, second, strict=False)
        return len(first) == len(second) and all(_equal(a, b) for a, b in pairs)
    return first == second


@pytest.mark.parametrize("kind", ["tensor", "tuple", "dict", "namedtuple", "list"])
def test_an_empty_block_joins_any_batch_as_the_identity(kind: str) -> None:
    dataset = _Samples(kind)
    collate = BlockCollate(dataset)
    empty = collate([])
    batch = default_collate([dataset[i] for i in (3, 4)])
    # Structure, dtypes and trailing shapes as default_collate's batch; 0 samples.
    assert _equal(_cat(empty, batch), batch)
    assert _equal(_cat(batch, empty), batch)
    assert _equal(collate([dataset[3], dataset[4]]), batch)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_data_loader_yields_an_empty_block_as_an_empty_batch(num_workers: int) -> None:
    dataset = _Samples("dict")
    collate = pickle.loads(pickle.dumps(BlockCollate(dataset)))  # as the workers get it
    loader = DataLoader(
        dataset, batch_sampler=[[0, 1], [], [2]], collate_fn=collate, num_workers=num_workers
    )
    batches = list(loader)
    assert [len(batch["name"]) for batch in batches] == [2, 0, 1]
    assert batches[1]["x"].shape == (0, 2, 3) and batches[1]["mask"].dtype == torch.bool
    with pytest.raises(IndexError):  # why the collate is needed: PyTorch's own fails
        list(DataLoader(dataset, batch_sampler=[[]]))


def _collate_pairs(samples: list[Pair]) -> Pair:
    """A collate_fn that takes an empty list itself: the reference for BlockCollate's."""
    x = torch.stack([s.x for s in samples]) if samples else torch.empty(0, 2, 3).double()
    return Pair(x=x, y=torch.tensor([s.y for s in samples], dtype=torch.float64))


def test_a_namedtuple_from_a_collate_fn_keeps_its_type() -> None:
    dataset = _Samples("namedtuple")
    empty = BlockCollate(dataset, _collate_pairs)([])
    assert _equal(empty, _collate_pairs([]))


@dataclass
class _Batch:
    x: torch.Tensor


class _Padded:
    """A custom batch object, as moved to a device by `.to()`."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def to(self, device: torch.device | str) -> _Padded:
        return _Padded(self.x.to(device))


_Point = namedtuple("_Point", ["name", "kind"])


@pytest.mark.parametrize(
    "collate_fn, kind, why",
    [
        (lambda s: _Batch(torch.stack(s)), "_Batch", "not _Batch"),
        (lambda s: pack_sequence(s, enforce_sorted=False), "PackedSequence", "time steps"),
        (lambda s: pack_sequence(s), "PackedSequence", "time steps"),
        (len, "int", "not int"),
        (lambda s: (torch.stack(s), len(s)), "tuple", r"with \['Tensor', 'int'\]"),
        (lambda s: torch.tensor(len(s)), "Tensor", "0-dim tensor"),
        (lambda s: _Padded(torch.stack(s)), "_Padded", "not _Padded"),
        (lambda s: _Point("a", "b"), "_Point", "namedtuple of plain values"),
    ],
    ids=["dataclass", "packed", "packed-sorted", "count", "tensor-and-count", "0-dim",
         "custom-object", "namedtuple-of-values"],
)  # fmt: skip
def test_an_output_it_cannot_empty_is_refused_at_the_first_block(
    collate_fn: Any, kind: str, why: str
) -> None:
    # Refused on the first block collated: the empty block comes at an epoch's last step.
    dataset = _Samples("tensor")
    message = rf"empty batch from collate_fn's output, of type {kind}: .*{why}.*empty_batch="
    with pytest.raises(TypeError, match=message):
        BlockCollate(dataset, collate_fn)([dataset[0], dataset[1]])
    with pytest.raises(TypeError, match=message):
        BlockCollate(dataset, collate_fn)([])


def test_torch_has_no_packed_sequence_of_zero_sequences() -> None:
    # Why BlockCollate refuses one instead of cutting its tensors.
    with pytest.raises(RuntimeError):
        pack_sequence([])


def _empty_padded() -> _Padded:
    return _Padded(torch.empty(0, 2, 3))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_empty_batch_makes_the_empty_block_of_a_custom_batch(num_workers: int) -> None:
    dataset = _Samples("tensor")
    collate = BlockCollate(dataset, _collate_padded, empty_batch=_empty_padded)
    loader = DataLoader(dataset, batch_sampler=[[0, 1], [], [2]], collate_fn=collate,
                        num_workers=num_workers)  # fmt: skip
    batches = list(loader)
    assert [type(batch) for batch in batches] == [_Padded] * 3
    for batch, block in zip(batches, [[0, 1], [], [2]], strict=True):
        expected = _collate_padded([dataset[i] for i in block]) if block else _empty_padded()
        assert _equal(batch.x, expected.x)
    assert collate([]) is not collate([])  # no two steps share its tensors


def _collate_padded(samples: list[torch.Tensor]) -> _Padded:
    return _Padded(torch.stack(samples))


@pytest.mark.parametrize("name", ["collate_fn", "empty_batch"])
def test_a_function_that_is_not_callable_is_refused_by_name(name: str) -> None:
    with pytest.raises(TypeError, match=rf"{name} must be callable, got Tensor"):
        BlockCollate(_Samples("tensor"), **{name: torch.zeros(0)})


# ------------------------------------------------------- ranks in step through a DataLoader

_SAMPLES, _FEATURES, _WORLD, _EPOCHS = 14, 5, 3, 2


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(_SAMPLES, _FEATURES, generator=generator, dtype=torch.float64)
    return inputs, torch.randn(_SAMPLES, generator=generator, dtype=torch.float64)


def _slicer(world_size: int | None) -> DynamicSlicer:
    # Blocks of 4 (loss policy, no growth): 12 samples in the first step, then 2 for 3 ranks.
    return DynamicSlicer(
        _SAMPLES, min_size=4, max_size=4, policy="loss", growth=1.0, world_size=world_size
    )


def _weight() -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, _FEATURES, dtype=torch.float64)


def _train_on_rank(rank: int, world_size: int) -> list[tuple[list[int], torch.Tensor]]:
    """The documented loop through a DataLoader: per step, this rank's batch size and the
    all-reduced gradient of the step's mean loss."""
    inputs, targets = _data()
    dataset = torch.utils.data.TensorDataset(inputs, targets)
    slicer = _slicer(None)
    loader = DataLoader(
        dataset, batch_sampler=slicer.batch_sampler(), collate_fn=BlockCollate(dataset)
    )
    steps = []
    for _ in range(_EPOCHS):
        for x, y in loader:
            weight = _weight().requires_grad_()
            loss = (x @ weight - y).square().mean()  # NaN for an empty block
            (loss * len(x) / sum(slicer.last_sizes)).backward()
            assert weight.grad is not None
            gradient = weight.grad.clone()
            dist.all_reduce(gradient)
            sizes = [0] * world_size
            sizes[rank] = len(x)
            steps.append((sizes, gradient))
            slicer.record_step(len(x), 0.01, loss.item())
    return steps


def test_ranks_step_together_through_an_epoch_that_leaves_one_without_samples() -> None:
    results = run_multiprocess(_train_on_rank, _WORLD, timeout=120)
    # The oracle: one process cuts the same steps and takes the gradient of each step's mean
    # loss over its global batch.
    inputs, targets = _data()
    slicer = _slicer(_WORLD)
    expected = []
    for _ in range(_EPOCHS):
        for step in slicer.steps():
            indices = [i for block in step for i in block]
            weight = _weight().requires_grad_()
            (inputs[indices] @ weight - targets[indices]).square().mean().backward()
            assert weight.grad is not None
            expected.append(([len(block) for block in step], weight.grad))
            slicer.record_all([len(block) for block in step], [0.01] * _WORLD, [1.0] * _WORLD)
    assert [sizes for sizes, _ in expected] == [[4, 4, 4], [1, 1, 0]] * _EPOCHS
    for rank, steps in enumerate(results):
        assert len(steps) == len(expected), rank  # every rank took every step
        for (sizes, gradient), (global_sizes, reference) in zip(steps, expected, strict=True):
            assert sizes[rank] == global_sizes[rank]
            torch.testing.assert_close(gradient, reference, rtol=1e-12, atol=1e-12)
