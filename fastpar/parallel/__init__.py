"""Parallel executors: data parallelism (replicas with averaged gradients) and pipeline
model parallelism (consecutive stages on different ranks, fed with micro-batches)."""

from fastpar.parallel.data_parallel import DataParallel, DataParallelConfig
from fastpar.parallel.pipeline import (
    OutputOnly,
    Pipeline,
    PipelineConfig,
    PipelineError,
    StepStats,
    ideal_bubbles,
    split_sequential,
)

__all__ = [
    "DataParallel",
    "DataParallelConfig",
    "OutputOnly",
    "Pipeline",
    "PipelineConfig",
    "PipelineError",
    "StepStats",
    "ideal_bubbles",
    "split_sequential",
]
