"""No store exchange leaves keys behind once every rank has returned or raised, whichever way
it ended: a late rank alone in the retry nobody came to, a rank that raised between stages, a
rank that came after all the others had left. Ranks are threads over one store
(tests/comm/exchange_driver.py); the keys left are those written and still there."""

from __future__ import annotations

import pytest

from fastpar.comm.errors import CommTimeoutError
from fastpar.comm.exchange_numbers import ExchangeNumbers
from tests.comm import exchange_driver as driver

STORES = ["hash", "tcp"]
LATE_TIMEOUT_S = 1.0  # how long the late rank waits for a retry
RETRY_TIMEOUT_S = 10.0  # the retry's: ample for ranks that all come

# Rank 0 gives up on rank 1 and does not retry; rank 1 comes once rank 0 has ended.
ALONE_AFTER_THE_OTHERS_GAVE_UP = [
    driver.Schedule(timeout_s=driver.SHORT_S),
    driver.Schedule(timeout_s=LATE_TIMEOUT_S, before={"first": driver.after_rank(0)}),
]


@pytest.mark.parametrize("kind", STORES)
def test_a_late_rank_alone_in_a_retry_nobody_came_to_leaves_no_keys(kind: str) -> None:
    """The late rank posted its record in the retry, decided its first stage and counted itself
    out there, and no other rank ever came to delete them: 4 keys per late setup."""
    stores, written = driver.rank_stores(kind, 2)
    keys_before = stores[0].num_keys()
    gave_up, late = driver.drive(
        stores, [driver.begin("test-alone")], ALONE_AFTER_THE_OTHERS_GAVE_UP
    )
    assert isinstance(gave_up.error, CommTimeoutError)
    assert isinstance(late.error, CommTimeoutError)
    assert late.message.endswith("and no rank retried within 1 s")
    assert written.left() == []
    assert stores[0].num_keys() == keys_before


def test_a_late_rank_that_gave_up_alone_meets_the_next_setup() -> None:
    """Leaving no trace in the retry, the late rank also takes no number there: its next setup
    is the others' next one, and that one works and leaves nothing either."""
    stores, written = driver.rank_stores("hash", 2)
    numbers = [ExchangeNumbers(), ExchangeNumbers()]
    gave_up, late = driver.drive(
        stores, [driver.begin("test-next")], ALONE_AFTER_THE_OTHERS_GAVE_UP, numbers
    )
    assert isinstance(gave_up.error, CommTimeoutError)
    assert late.message.endswith("and no rank retried within 1 s")
    everyone = [driver.Schedule(timeout_s=RETRY_TIMEOUT_S)] * 2
    retried = driver.drive(stores, [driver.begin("test-next")], everyone, numbers)
    assert [(rank.results, rank.error) for rank in retried] == [
        ([[b"first 0", b"first 1"]], None)
    ] * 2
    assert written.left() == []


@pytest.mark.parametrize("kind", STORES)
def test_a_rank_that_raised_between_stages_leaves_no_keys(kind: str) -> None:
    """Rank 0 raises once rank 1 waits in the second stage; rank 2 comes to it only after."""
    stores, written = driver.rank_stores(kind, 3)
    between = driver.raises(ValueError("between stages"), then=driver.after_keys("mapped/1"))
    ended = driver.drive(
        stores,
        [driver.first("test/between"), driver.agree("mapped")],
        [
            driver.Schedule(before={"mapped": between}),
            driver.Schedule(),
            driver.Schedule(before={"mapped": driver.after_rank(0, 1)}),
        ],
    )
    assert [type(rank.error) for rank in ended] == [ValueError, CommTimeoutError, CommTimeoutError]
    assert written.left() == []


@pytest.mark.parametrize("kind", STORES)
def test_a_rank_that_came_after_every_other_left_leaves_no_keys(kind: str) -> None:
    """Ranks 0 and 1 abandon the first stage and leave; rank 2 finds it abandoned after both
    have counted out, and is the last to leave."""
    stores, written = driver.rank_stores(kind, 3)
    gave_up, stopped, late = driver.drive(
        stores,
        [driver.first("test/after")],
        [
            driver.Schedule(timeout_s=driver.SHORT_S),
            driver.Schedule(),
            driver.Schedule(before={"first": driver.after_rank(0, 1)}),
        ],
    )
    assert isinstance(gave_up.error, CommTimeoutError)
    assert isinstance(stopped.error, CommTimeoutError)
    assert (late.results, late.error) == ([None], None)
    assert written.left() == []
