"""Parallel executors: data parallelism (replicas with averaged gradients) and pipeline
model parallelism (consecutive stages on different ranks, fed with micro-batches)."""

from fastpar.parallel.data_parallel import DataParallel, DataParallelConfig

__all__ = ["DataParallel", "DataParallelConfig"]
