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
from torch.utils.data import Dataset, default_collate


class BlockCollate:
    """`collate_fn` that also collates an empty block: `collate_fn([dataset[0]])` with every
    tensor cut to 0 rows (and every batch of strings or bytes emptied).

    A plain object holding the dataset and the collate function, so worker processes can take
    it (pickled with them).

    Arguments:
        dataset: the map-style dataset the loader reads; its sample 0 gives the empty batch
            its structure.
        collate_fn: how non-empty blocks are collated (default: `default_collate`); its output
            must be tensors, mappings and sequences of them, or sequences of strings or bytes.
    """

    def __init__(
        self, dataset: Dataset[Any], collate_fn: Callable[[list[Any]], Any] = default_collate
    ) -> None:
        self.dataset = dataset
        self.collate_fn = collate_fn

    def __call__(self, samples: list[Any]) -> Any:
        if samples:
            return self.collate_fn(samples)
        return _no_rows(self.collate_fn([self.dataset[0]]))


def _no_rows(batch: Any) -> Any:
    """`batch` (one sample collated) with its batch dimension cut to 0."""
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, Mapping):
        items = {key: _no_rows(value) for key, value in batch.items()}
        try:
            return type(batch)(items)
        except TypeError:  # a mapping type that cannot be built from a dict, as default_collate
            return items
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        collated = [_is_collated(item) for item in batch]
        if not any(collated):
            # default_collate passes strings and bytes through as the list (or tuple) of the
            # samples' values: a batch dimension of its own.
            return type(batch)()
        if not all(collated):
            raise TypeError(
                f"cannot tell the batch dimension of a collated {type(batch).__name__} that "
                f"mixes tensors or containers with {[type(item).__name__ for item in batch]}"
            )
        items = [_no_rows(item) for item in batch]
        if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
            return type(batch)(*items)
        return type(batch)(items)
    raise TypeError(
        f"cannot make an empty batch of a collated {type(batch).__name__}: BlockCollate "
        "handles tensors, mappings and sequences of them, and sequences of strings or bytes"
    )


def _is_collated(item: Any) -> bool:
    """A tensor or a container of them, as opposed to a sample's raw string or bytes."""
    return isinstance(item, (torch.Tensor, Mapping, Sequence)) and not isinstance(
        item, (str, bytes)
    )
