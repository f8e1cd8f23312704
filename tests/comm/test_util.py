"""The shared inputs hold what the all-reduce tests rely on: integer-valued tensors whose
reductions over up to MAX_RANKS ranks are exact in every dtype, in any order."""

from __future__ import annotations

import random

import torch
import torch.distributed as dist

from fastpar.comm.reduce import SUPPORTED_DTYPES
from tests.comm.util import MAX_RANKS, integer_valued

R = dist.ReduceOp
SEED = random.randrange(2**31)


def test_integer_valued_sums_and_products_are_exact_over_max_ranks() -> None:
    generator = torch.Generator().manual_seed(SEED)
    for dtype in SUPPORTED_DTYPES:
        for op in (R.SUM, R.PRODUCT):
            inputs = [integer_valued(20000, dtype, op, generator) for _ in range(MAX_RANKS)]
            exact = torch.stack([x.double() for x in inputs])
            exact = exact.sum(0) if op == R.SUM else exact.prod(0)
            stepwise = inputs[0].clone()  # rounded after every step, in the dtype (as gloo)
            for x in inputs[1:]:
                stepwise = stepwise + x if op == R.SUM else stepwise * x
            assert torch.equal(stepwise.double(), exact), f"seed {SEED}: {dtype} {op}"
