"""Token bucket: rate, burst and retry-after, exact on explicit time."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spear_rt.router.limits import TokenBucket


def test_a_full_bucket_serves_its_burst_then_refills_at_the_rate() -> None:
    """rate 2/s, burst 3: three at once, then one every 0.5 s."""
    bucket = TokenBucket(2.0, 3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.retry_after(0.0) == 0.5
    assert bucket.retry_after(0.2) == pytest.approx(0.3)
    assert not bucket.available(0.49)
    assert bucket.available(0.5) and bucket.take(0.5)
    assert not bucket.take(0.5)


def test_refill_stops_at_the_burst() -> None:
    """A long idle period gives back `burst` tokens, no more."""
    bucket = TokenBucket(10.0, 2, now=0.0)
    bucket.take(0.0)
    bucket.take(0.0)
    assert [bucket.take(100.0) for _ in range(3)] == [True, True, False]
    assert bucket.retry_after(100.0) == pytest.approx(0.1)


def test_available_and_retry_after_take_nothing() -> None:
    """Looking does not spend a token."""
    bucket = TokenBucket(1.0, 1, now=0.0)
    for _ in range(3):
        assert bucket.available(0.0) and bucket.retry_after(0.0) == 0.0
    assert bucket.take(0.0) and not bucket.take(0.0)


def test_default_burst_is_one_second_of_rate_and_at_least_one() -> None:
    """burst None: max(1, rate)."""
    assert TokenBucket(5.0).burst == 5.0
    assert TokenBucket(0.2).burst == 1.0
    slow = TokenBucket(0.2, now=0.0)
    assert slow.take(0.0) and not slow.take(0.0)
    assert slow.retry_after(0.0) == pytest.approx(5.0)


def test_a_non_positive_rate_is_refused() -> None:
    """rate_per_s <= 0 is a programming error."""
    with pytest.raises(ValueError):
        TokenBucket(0.0)


@given(
    rate=st.floats(0.5, 50.0),
    burst=st.integers(1, 10),
    gaps=st.lists(st.floats(0.0, 0.5), min_size=1, max_size=200),
)
def test_takes_never_exceed_burst_plus_rate_times_elapsed(
    rate: float, burst: int, gaps: list[float]
) -> None:
    """Over any arrival pattern: granted <= burst + rate x elapsed, and a refusal's
    retry_after is exactly when the next take succeeds."""
    bucket = TokenBucket(rate, burst, now=0.0)
    now, granted = 0.0, 0
    for gap in gaps:
        now += gap
        if bucket.take(now):
            granted += 1
        else:
            wait = bucket.retry_after(now)
            assert 0.0 < wait <= 1.0 / rate + 1e-9
            assert not copy.copy(bucket).available(now + wait * 0.999)
            assert copy.copy(bucket).available(now + wait + 1e-9)
        assert granted <= burst + rate * now + 1e-9
