"""No store exchange leaves keys behind once every rank has returned or raised, whichever way
it ended: a rank that raised between stages, a rank that came after all the others had left.
Ranks are threads over one store (tests/comm/exchange_driver.py); the keys left are those
written and still there."""

from __future__ import annotations

import pytest

from fastpar.comm.errors import CommTimeoutError
from tests.comm.exchange_driver import (
    SHORT_S,
    Schedule,
    after_keys,
    after_rank,
    agree,
    drive,
    first,
    raises,
    rank_stores,
)

STORES = ["hash", "tcp"]


@pytest.mark.parametrize("kind", STORES)
def test_a_rank_that_raised_between_stages_leaves_no_keys(kind: str) -> None:
    """Rank 0 raises once rank 1 waits in the second stage; rank 2 comes to it only after."""
    stores, written = rank_stores(kind, 3)
    between = raises(ValueError("between stages"), then=after_keys("mapped/1"))
    ended = drive(
        stores,
        [first("test/between"), agree("mapped")],
        [
            Schedule(before={"mapped": between}),
            Schedule(),
            Schedule(before={"mapped": after_rank(0, 1)}),
        ],
    )
    assert [type(rank.error) for rank in ended] == [ValueError, CommTimeoutError, CommTimeoutError]
    assert written.left() == []


@pytest.mark.parametrize("kind", STORES)
def test_a_rank_that_came_after_every_other_left_leaves_no_keys(kind: str) -> None:
    """Ranks 0 and 1 abandon the first stage and leave; rank 2 finds it abandoned after both
    have counted out, and is the last to leave."""
    stores, written = rank_stores(kind, 3)
    gave_up, stopped, late = drive(
        stores,
        [first("test/after")],
        [Schedule(timeout_s=SHORT_S), Schedule(), Schedule(before={"first": after_rank(0, 1)})],
    )
    assert isinstance(gave_up.error, CommTimeoutError)
    assert isinstance(stopped.error, CommTimeoutError)
    assert (late.results, late.error) == ([None], None)
    assert written.left() == []
