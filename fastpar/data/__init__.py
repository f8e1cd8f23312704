"""Data slicing for data-parallel training: fixed-size blocks and adaptive per-rank blocks.

- `FixedSlicer`: k blocks of (almost) equal size, contiguous or shuffled per epoch; a DataLoader
  `batch_sampler`, with `shard(rank, world_size)` for the per-rank view.
- `DynamicSlicer`: per-rank block sizes that equalise modelled step times or follow the loss,
  decided from statistics all-reduced across ranks so every rank agrees; `last_stats`
  (`SlicerStats`) shows each step's measurements and decision.
- `BlockCollate`: a DataLoader `collate_fn` for its `batch_sampler`, which also collates the
  empty block a rank gets when an epoch ends with fewer samples than ranks.
"""

from __future__ import annotations

from fastpar.data.apportion import apportion
from fastpar.data.collate import BlockCollate
from fastpar.data.dynamic import DynamicSlicer
from fastpar.data.fixed import FixedShard, FixedSlicer
from fastpar.data.slicer_config import DynamicSlicerConfig, SlicerStats

__all__ = [
    "BlockCollate",
    "DynamicSlicer",
    "DynamicSlicerConfig",
    "FixedShard",
    "FixedSlicer",
    "SlicerStats",
    "apportion",
]
