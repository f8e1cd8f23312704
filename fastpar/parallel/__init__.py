"""Parallel executors: data parallelism (replicas with averaged gradients) and pipeline
model parallelism (consecutive stages on different ranks, fed with micro-batches)."""

from fastpar.parallel import pipeline
from fastpar.parallel.data_parallel import CommStats, DataParallel, DataParallelConfig
from fastpar.parallel.pipeline import *  # noqa: F403  (the names in pipeline.__all__)

__all__ = ["CommStats", "DataParallel", "DataParallelConfig", *pipeline.__all__]
