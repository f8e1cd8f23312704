"""Data slicing for data-parallel training: fixed-size blocks and adaptive per-rank blocks.

- `FixedSlicer`: k blocks of (almost) equal size, contiguous or shuffled per epoch; a DataLoader
  `batch_sampler`, with `shard(rank, world_size)` for the per-rank view.
- `DynamicSlicer`: per-rank block sizes that equalise modelled step times or follow the loss,
  decided from statistics all-reduced across ranks so every rank agrees; `last_stats`
  (`SlicerStats`) shows each step's measurements and decision.
"""

from __future__ import annotations

from fastpar.data.apportion import apportion
from fastpar.data.dynamic import DynamicSlicer
from fastpar.data.fixed import FixedShard, FixedSlicer
from fastpar.data.slicer_config import DynamicSlicerConfig, SlicerStats

__all__ = [
    "DynamicSlicer",
    "DynamicSlicerConfig",
    "FixedShard",
    "FixedSlicer",
    "SlicerStats",
    "apportion",
]
