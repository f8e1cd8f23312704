"""Calls that go to torch.distributed (dtypes the ring does not serve) on non-contiguous views:
the view gets the sum of every rank's view, and the rest of its base tensor is untouched. The
oracle is local: every rank rebuilds every rank's input from the seed and sums them itself."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch

import fastpar.comm as comm
from fastpar.testing.distributed import run_multiprocess

SEED = random.randrange(2**31)
DTYPES = (torch.int8, torch.complex64)  # not served by the ring: they go to gloo

# Views of a (6, 10) base: strided, transposed, a block with an offset, a strided transposed
# block, and a contiguous one (which must still work).
VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "every_other_column": lambda base: base[:, ::2],
    "transposed": lambda base: base.t(),
    "block": lambda base: base[1:5, 2:7],
    "strided_transposed_block": lambda base: base[::2, 1::3].t(),
    "contiguous_rows": lambda base: base[2:4],
}


def _base(seed: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
    """Rank `rank`'s base tensor: small integers (exact in int8 sums of 3 ranks, and in
    complex64), never all zero."""
    generator = torch.Generator().manual_seed(seed * 7 + rank)
    real = torch.randint(-20, 21, (6, 10), generator=generator)
    if dtype.is_complex:
        imag = torch.randint(-20, 21, (6, 10), generator=generator)
        return torch.complex(real.float(), imag.float()).to(dtype)
    return real.to(dtype)


def _fallback_views(rank: int, world_size: int, seed: int) -> int:
    checked = 0
    for dtype in DTYPES:
        for name, view_of in VIEWS.items():
            for async_op in (False, True):
                base = _base(seed, rank, dtype)
                before = base.clone()
                view = view_of(base)
                expected = sum(view_of(_base(seed, r, dtype)) for r in range(world_size))
                result = comm.all_reduce(view, async_op=async_op)
                if async_op:
                    assert result is not None and result.wait()
                context = f"seed {seed}, {dtype}, {name}, async_op={async_op}"
                assert torch.equal(view, expected), context
                outside = torch.ones_like(base, dtype=torch.bool)
                view_of(outside).fill_(False)
                assert torch.equal(base[outside], before[outside]), f"{context}: outside changed"
                checked += 1
    # A view whose elements share memory is refused, not reduced into garbage.
    shared = torch.ones(1, 4, dtype=torch.int8).expand(3, 4)
    with pytest.raises(ValueError, match="share memory"):
        comm.all_reduce(shared)
    comm.close_rings()
    return checked


@pytest.mark.parametrize("world_size", [2, 3])
def test_non_contiguous_fallback_calls_touch_only_the_view(world_size: int) -> None:
    results = run_multiprocess(_fallback_views, world_size, args=(SEED,), timeout=120)
    assert results == [len(DTYPES) * len(VIEWS) * 2] * world_size


def test_the_oracle_sees_a_contiguous_reduction_of_a_view_as_wrong() -> None:
    # The check above can fail: reducing the view's storage as if contiguous (what gloo does)
    # changes elements outside it.
    base = _base(SEED, 0, torch.int8)
    before = base.clone()
    view = base[:, ::2]
    flat = base.view(-1)[: view.numel()]
    flat.add_(flat.clone())
    outside = torch.ones_like(base, dtype=torch.bool)
    outside[:, ::2] = False
    assert not torch.equal(base[outside], before[outside])
