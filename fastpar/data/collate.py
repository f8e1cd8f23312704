"""A DataLoader `collate_fn` for the dynamic slicer's blocks, empty ones included.

In the last step of an epoch a rank gets an empty block when fewer samples than ranks remain,
and it must still step with its peers (their next collective waits for it). PyTorch's
`default_collate` fails on an empty list (it reads the first sample for the batch's type), so a
loader fed by `DynamicSlicer.batch_sampler()` collates through `BlockCollate`: an empty block
becomes a batch of zero samples with the structure, dtypes and trailing shapes of any other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.nn.utils.rnn import PackedSequence
from torch.utils.data import Dataset, default_collate


class BlockCollate:
    """`collate_fn` that also collates an empty block: by default `collate_fn([dataset[0]])`
    with every tensor cut to 0 rows along its first dimension, every sequence of per-sample
    values (strings, bytes, numbers) emptied, and every container rebuilt with its type
    (namedtuples included).

    What it cannot cut, it refuses with a TypeError on the first block it collates (not at an
    epoch's last step, where the empty block comes): a dataclass, a PackedSequence (it packs
    time steps, and PyTorch has no PackedSequence of 0 sequences), a 0-dim tensor or a number
    (no batch dimension), a custom batch object, a sequence that mixes tensors with other
    values. For those, pass `empty_batch`. So too for a collate_fn whose tensors are not batch
    first (`pad_sequence`'s default, time-major): cutting their first dimension would cut time.

    A plain object holding the dataset and the functions, so worker processes can take it
    (pickled with them).

    Arguments:
        dataset: the map-style dataset the loader reads; its sample 0 gives the empty batch
            its structure (unless `empty_batch` is given).
        collate_fn: how non-empty blocks are collated (default: `default_collate`).
        empty_batch: returns the batch of an empty block, called each time one comes (so no
            two steps share its tensors); a module-level function or `functools.partial` for
            worker processes that are not forked.

    Example:
        BlockCollate(dataset, collate_sequences,
                     empty_batch=functools.partial(SequenceBatch.empty, features=40))
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        collate_fn: Callable[[list[Any]], Any] = default_collate,
        *,
        empty_batch: Callable[[], Any] | None = None,
    ) -> None:
        for name, function in (("collate_fn", collate_fn), ("empty_batch", empty_batch)):
            if function is not None and not callable(function):
                raise TypeError(f"{name} must be callable, got {type(function).__name__}")
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.empty_batch = empty_batch
        self._checked = empty_batch is not None

    def __call__(self, samples: list[Any]) -> Any:
        if samples:
            batch = self.collate_fn(samples)
            if not self._checked:  # refused now, not at the epoch's last step
                self._no_rows(batch)
                self._checked = True
            return batch
        if self.empty_batch is not None:
            return self.empty_batch()
        return self._no_rows(self.collate_fn([self.dataset[0]]))

    def _no_rows(self, batch: Any) -> Any:
        try:
            return _no_rows(batch)
        except _CannotEmpty as error:
            raise TypeError(
                f"BlockCollate cannot make an empty batch from collate_fn's output, of type "
                f"{type(batch).__name__}: {error}. Pass empty_batch=, a function that returns "
                "the batch of an empty block, or give the DataLoader a collate_fn that collates "
                "an empty list itself"
            ) from None


class _CannotEmpty(Exception):
    """A part of a collated batch whose 0-row form cannot be told; the message says why."""


def _no_rows(batch: Any) -> Any:
    """`batch` (samples collated) with its batch dimension cut to 0."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            raise _CannotEmpty("a 0-dim tensor has no batch dimension")
        return batch[:0]
    if isinstance(batch, PackedSequence):  # a namedtuple of tensors, but not batch-major
        raise _CannotEmpty("a PackedSequence packs time steps, and none holds 0 sequences")
    if isinstance(batch, Mapping):
        items = {key: _no_rows(value) for key, value in batch.items()}
        try:
            return type(batch)(items)
        except TypeError:  # a mapping type that cannot be built from a dict, as default_collate
            return items
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        return _sequence_without_rows(batch)
    raise _CannotEmpty(
        "it cuts tensors, mappings and sequences of them, and sequences of per-sample values, "
        f"not {type(batch).__name__}"
    )


def _sequence_without_rows(batch: Sequence[Any]) -> Sequence[Any]:
    name = type(batch).__name__
    is_namedtuple = isinstance(batch, tuple) and hasattr(batch, "_fields")
    collated = [_is_collated(item) for item in batch]
    if not any(collated):
        # default_collate passes strings and bytes through as the list (or tuple) of the
        # samples' values: a batch dimension of its own.
        if is_namedtuple:
            raise _CannotEmpty(f"a namedtuple of plain values ({name}) cannot be empty")
        return _rebuilt(type(batch), [])
    if not all(collated):
        raise _CannotEmpty(
            f"the batch dimension is unclear in a {name} that mixes tensors or containers "
            f"with {[type(item).__name__ for item in batch]}"
        )
    items = [_no_rows(item) for item in batch]
    if is_namedtuple:
        return type(batch)(*items)
    return _rebuilt(type(batch), items)


def _rebuilt(kind: type, items: list[Any]) -> Any:
    try:
        return kind(items)
    except TypeError:
        raise _CannotEmpty(f"a {kind.__name__} cannot be built from a list") from None


def _is_collated(item: Any) -> bool:
    """A tensor or a container of them, as opposed to a sample's raw string or bytes."""
    return isinstance(item, (torch.Tensor, Mapping, Sequence)) and not isinstance(
        item, (str, bytes)
    )
