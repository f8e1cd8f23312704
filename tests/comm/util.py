"""Inputs and references shared by the all-reduce tests."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from fastpar.comm.reduce import SUPPORTED_DTYPES

R = dist.ReduceOp
OPS = (R.SUM, R.AVG, R.PRODUCT, R.MIN, R.MAX)
# Fresh per run and shown in failures; the ranks get it as an argument.
SEED = random.randrange(2**31)
# Small chunks so that calls of a few thousand elements already cross chunks and wrap the slots.
SMALL_RING = {"chunk_bytes": 4096, "slots": 3}
# The most ranks a test reduces over (the CUDA ring's limit, csrc/ipc_ring.h's kMaxRanks).
MAX_RANKS = 8
# bfloat16 holds the integers up to 256 exactly (8 significant bits), 257 not: its values stay
# within 256 / MAX_RANKS, else a sum of 8 ranks rounds (gloo rounds after every addition, the
# ring once at the end, and they differ).
_SUM_BOUND = {torch.bfloat16: 256 // MAX_RANKS}


def every_call(sizes: Sequence[int]) -> Iterator[tuple[torch.dtype, R, int]]:
    """Every (dtype, op, size) the ring handles: each dtype with each op (AVG only for floating
    dtypes) and each size."""
    for dtype in SUPPORTED_DTYPES:
        for op in OPS:
            if op == R.AVG and not dtype.is_floating_point:
                continue
            for size in sizes:
                yield dtype, op, size


def integer_valued(
    size: int, dtype: torch.dtype, op: R, generator: torch.Generator
) -> torch.Tensor:
    """Random integers that every dtype holds exactly, as do all their partial sums and
    products over up to MAX_RANKS ranks (so a reduction in any order, rounding after each step
    or once, is exact); never all zeros."""
    if op == R.PRODUCT:
        values = torch.randint(1, 3, (size,), generator=generator)
        signs = torch.randint(0, 2, (size,), generator=generator) * 2 - 1
        return (values * signs).to(dtype)
    bound = _SUM_BOUND.get(dtype, 50)
    return torch.randint(-bound, bound + 1, (size,), generator=generator).to(dtype)


def expect_gloo(tensor: torch.Tensor, op: R, world_size: int) -> torch.Tensor:
    """torch.distributed's (gloo's) all-reduce of a CPU copy of `tensor`."""
    expected = tensor.detach().cpu().clone()
    if op == R.AVG:  # gloo has no AVG: the sum (exact for integer values), divided in the dtype
        dist.all_reduce(expected, op=R.SUM)
        return expected.div_(world_size)
    dist.all_reduce(expected, op=op)
    return expected


def fold_in_rank_order(inputs: list[torch.Tensor], op: R) -> torch.Tensor:
    """inputs[0] op inputs[1] op ... left to right, in float32 for 16-bit floats (as the ring
    accumulates), rounded once; AVG is the sum divided by the count in the input dtype."""
    low = inputs[0].dtype in (torch.float16, torch.bfloat16)
    acc = inputs[0].float() if low else inputs[0].clone()
    for x in inputs[1:]:
        x = x.float() if low else x
        if op in (R.SUM, R.AVG):
            acc = acc + x
        elif op == R.PRODUCT:
            acc = acc * x
        elif op == R.MIN:
            acc = torch.minimum(acc, x)
        else:
            acc = torch.maximum(acc, x)
    result = acc.to(inputs[0].dtype)
    return result.div_(len(inputs)) if op == R.AVG else result


def shm_segments(creator_pid: int) -> set[str]:
    """The shared-memory segments in /dev/shm of the rings that process `creator_pid` (a group's
    rank 0) created; other processes' rings, of concurrent runs, do not count."""
    return {path.name for path in Path("/dev/shm").glob(f"fastpar-{creator_pid}-*")}


def places(
    generator: torch.Generator, fixed: list[tuple[int, int]], *, area: int, drawn: int,
    smallest: int = 1,
) -> list[tuple[int, int]]:  # fmt: skip
    """(offset, size) in elements of an area of `area`: `fixed`, then `drawn` more at random
    offsets below 5000, of at least `smallest` elements."""
    out = list(fixed)
    for _ in range(drawn):
        offset = int(torch.randint(0, 5000, (1,), generator=generator))
        size = int(torch.randint(smallest, area - offset, (1,), generator=generator))
        out.append((offset, size))
    return out
