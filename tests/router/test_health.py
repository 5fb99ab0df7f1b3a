"""Circuit breaker state machine and outlier ejection, on explicit time."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spear_rt.config import BreakerConfig, OutlierConfig
from spear_rt.router.health import BreakerState, CircuitBreaker, OutlierDetector
from tests.router.support import FakeClock, backend, registry, request, router

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class FixedRandom(random.Random):
    """random() always returns `value` (to pin the jitter)."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def breaker(**fields: float) -> CircuitBreaker:
    """A breaker with no jitter unless asked, and thresholds from `fields`."""
    return CircuitBreaker(BreakerConfig(**{"jitter": 0.0, **fields}))  # type: ignore[arg-type]


def fail(b: CircuitBreaker, now: float, times: int = 1) -> None:
    for _ in range(times):
        b.on_result(False, now)


# --- tripping ------------------------------------------------------------------------------------


def test_consecutive_failures_open_the_circuit() -> None:
    """Three failures in a row open it; a success in between resets the count."""
    b = breaker(consecutive_failures=3, min_requests=1000)
    fail(b, 0.0, 2)
    b.on_result(True, 0.0)
    fail(b, 0.0, 2)
    assert b.state is CLOSED and b.allows(0.0)
    fail(b, 0.0)
    assert b.state is OPEN and not b.allows(0.0)
    assert b.transitions == [(0.0, OPEN)]


def test_error_rate_over_the_window_opens_the_circuit_once_there_are_enough_requests() -> None:
    """50 % errors over >= 4 outcomes in the window opens it; fewer outcomes do not."""
    b = breaker(consecutive_failures=100, error_rate=0.5, min_requests=4, window_s=10.0)
    for now, ok in ((0.0, False), (1.0, True), (2.0, False)):
        b.on_result(ok, now)
    assert b.state is CLOSED and b.error_rate(2.0) == pytest.approx(2 / 3)
    b.on_result(True, 3.0)
    assert b.state is OPEN  # 2 of 4


def test_outcomes_older_than_the_window_do_not_count() -> None:
    """Failures that left the window no longer push the error rate."""
    b = breaker(consecutive_failures=100, error_rate=0.5, min_requests=4, window_s=10.0)
    fail(b, 0.0, 3)
    for now in (10.0, 10.5, 11.0):
        b.on_result(True, now)
    assert b.error_rate(11.0) == 0.0
    b.on_result(False, 11.5)
    assert b.state is CLOSED  # 1 of 4 in the window


# --- cool-down, half-open, closing ---------------------------------------------------------------


@pytest.mark.parametrize("u", [0.0, 0.5, 0.999999])
def test_the_cool_down_has_jitter_within_its_bounds(u: float) -> None:
    """open_until = trip time + cooldown x (1 + jitter x u), u in [0, 1)."""
    b = CircuitBreaker(
        BreakerConfig(consecutive_failures=1, cooldown_s=5.0, jitter=0.2), FixedRandom(u)
    )
    fail(b, 100.0)
    assert b.open_until == pytest.approx(100.0 + 5.0 * (1 + 0.2 * u))
    assert 105.0 <= b.open_until < 106.0


def test_jittered_cool_downs_spread_over_the_whole_range() -> None:
    """Over many breakers the jitter covers [cooldown, cooldown x (1 + jitter)) and no further."""
    ends = []
    for seed in range(300):
        b = CircuitBreaker(
            BreakerConfig(consecutive_failures=1, cooldown_s=5.0, jitter=0.2), random.Random(seed)
        )
        fail(b, 0.0)
        ends.append(b.open_until)
    assert 5.0 <= min(ends) < 5.05 and 5.95 < max(ends) < 6.0


def test_open_becomes_half_open_after_the_cool_down_and_closes_after_successes() -> None:
    """Open rejects until open_until; then one probe at a time; two successes close it."""
    b = breaker(consecutive_failures=1, cooldown_s=5.0, half_open_probes=1, close_after_successes=2)
    fail(b, 0.0)
    assert not b.allows(4.999) and b.state is OPEN
    assert b.allows(5.0) and b.state is HALF_OPEN
    b.on_start(5.0)
    assert not b.allows(5.0)  # the probe is in flight
    b.on_result(True, 5.5)
    assert b.state is HALF_OPEN and b.allows(5.5)
    b.on_start(5.5)
    b.on_result(True, 6.0)
    assert b.state is CLOSED and b.allows(6.0)
    assert [s for _, s in b.transitions] == [OPEN, HALF_OPEN, CLOSED]


def test_a_failed_probe_reopens_with_a_doubled_cool_down_up_to_the_cap() -> None:
    """Each half-open failure doubles the cool-down (5, 10, 20, 40, 60, 60); closing resets it."""
    b = breaker(consecutive_failures=1, cooldown_s=5.0, max_cooldown_s=60.0)
    now = 0.0
    fail(b, now)
    lengths = [b.open_until - now]
    for _ in range(5):
        now = b.open_until
        assert b.allows(now)
        b.on_start(now)
        fail(b, now)
        lengths.append(b.open_until - now)
    assert lengths == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]
    now = b.open_until
    for _ in range(2):
        assert b.allows(now)
        b.on_start(now)
        b.on_result(True, now)
    assert b.state is CLOSED
    fail(b, now)
    assert b.open_until - now == 5.0


def test_a_cancelled_probe_frees_its_slot() -> None:
    """A probe that ended without an outcome (hedge loser) lets the next one go."""
    b = breaker(consecutive_failures=1)
    fail(b, 0.0)
    assert b.allows(b.open_until)
    b.on_start(b.open_until)
    assert not b.allows(b.open_until)
    b.on_cancel()
    assert b.allows(b.open_until) and b.state is HALF_OPEN


def test_late_answers_while_open_change_nothing() -> None:
    """Outcomes of requests sent before the trip do not move an open circuit."""
    b = breaker(consecutive_failures=1, cooldown_s=5.0)
    fail(b, 0.0)
    until = b.open_until
    b.on_result(True, 1.0)
    fail(b, 2.0)
    assert b.state is OPEN and b.open_until == until


EVENTS = st.lists(
    st.one_of(
        st.tuples(st.just("ok"), st.floats(0.0, 3.0)),
        st.tuples(st.just("fail"), st.floats(0.0, 3.0)),
        st.tuples(st.just("cancel"), st.floats(0.0, 3.0)),
    ),
    max_size=80,
)


@settings(max_examples=300)
@given(events=EVENTS, seed=st.integers(0, 2**32 - 1), jitter=st.sampled_from([0.0, 0.2, 1.0]))
def test_the_breaker_never_skips_a_state(
    events: list[tuple[str, float]], seed: int, jitter: float
) -> None:
    """Over any outcome sequence: closed -> open -> half-open -> (closed | open) only; half-open
    never before the cool-down ends; each cool-down within [c, c x (1 + jitter)] of a doubling
    series capped at max_cooldown_s; nothing goes out while open."""
    cfg = BreakerConfig(
        consecutive_failures=3,
        error_rate=0.5,
        min_requests=4,
        window_s=5.0,
        cooldown_s=2.0,
        max_cooldown_s=9.0,
        jitter=jitter,
        half_open_probes=1,
        close_after_successes=2,
    )
    b = CircuitBreaker(cfg, random.Random(seed))
    allowed = {CLOSED: {OPEN}, OPEN: {HALF_OPEN}, HALF_OPEN: {CLOSED, OPEN}}
    state, now, opened_at, base = CLOSED, 0.0, 0.0, cfg.cooldown_s
    for kind, dt in events:
        now += dt
        admitted = b.allows(now)
        if b.state is not state:  # allows() may move open -> half-open, and only that
            assert (state, b.state) == (OPEN, HALF_OPEN)
            assert now >= b.open_until
            state = b.state
        if b.state is OPEN:
            assert not admitted
        if not admitted:
            continue
        b.on_start(now)
        if kind == "cancel":
            b.on_cancel()
        else:
            b.on_result(kind == "ok", now)
        if b.state is not state:
            assert b.state in allowed[state], (state, b.state)
            if b.state is OPEN:
                base = min(base * 2, cfg.max_cooldown_s) if state is HALF_OPEN else base
                opened_at = now
                assert base - 1e-9 <= b.open_until - opened_at <= base * (1 + jitter) + 1e-9
            if b.state is CLOSED:
                base = cfg.cooldown_s
            state = b.state
    walk = [s for _, s in b.transitions]
    for prev, nxt in zip([CLOSED, *walk], walk, strict=False):
        assert nxt in allowed[prev]


# --- outlier ejection ----------------------------------------------------------------------------


def healthy(n: int, requests: int = 100) -> list[tuple[str, int, int]]:
    return [(f"ok{i}", requests, 0) for i in range(n)]


def test_a_clear_outlier_among_five_peers_is_ejected() -> None:
    """Four at 100 % and one at 50 % success: the one is ejected for base_ejection_s."""
    detector = OutlierDetector(OutlierConfig(base_ejection_s=30.0))
    assert detector.evaluate([*healthy(4), ("bad", 100, 50)], 0.0) == ["bad"]
    assert detector.is_ejected("bad", 29.9)
    assert not detector.is_ejected("ok0", 0.0)


def test_three_peers_are_enough_with_a_tighter_stdev_factor() -> None:
    """With three peers a clear outlier goes when its success rate is > 1 stdev below the mean.

    (With the default factor 1.9, three or four peers can never eject anyone: one outlier
    among n is at most sqrt(n - 1) standard deviations from the mean.)"""
    detector = OutlierDetector(OutlierConfig(stdev_factor=1.0, min_peers=3))
    assert detector.evaluate([*healthy(2), ("bad", 100, 60)], 0.0) == ["bad"]
    assert OutlierDetector().evaluate([*healthy(3), ("bad", 100, 100)], 0.0) == []
    assert (
        OutlierDetector(OutlierConfig(stdev_factor=1.0)).evaluate(
            [*healthy(2), ("bad", 100, 60)], 0.0
        )
        == []
    )


def test_too_few_peers_or_requests_eject_nobody() -> None:
    """Two peers, or peers under min_requests, are not enough to judge anyone."""
    detector = OutlierDetector(OutlierConfig(stdev_factor=0.1, min_requests=20))
    assert detector.evaluate([("ok", 100, 0), ("bad", 100, 100)], 0.0) == []
    assert detector.evaluate([*healthy(4, requests=19), ("bad", 19, 19)], 0.0) == []


def test_max_ejection_percent_caps_the_ejected_share() -> None:
    """Six peers at 34 %: at most two out, the worst first, counting those already out."""
    detector = OutlierDetector(OutlierConfig(stdev_factor=0.5, max_ejection_percent=34.0))
    stats = [*healthy(3, 1000), ("bad1", 1000, 900), ("bad2", 1000, 800), ("bad3", 1000, 700)]
    assert detector.evaluate(stats, 0.0) == ["bad1", "bad2"]
    assert detector.evaluate(stats, 1.0) == []  # two already out: the cap is reached


def test_an_ejection_expires_and_a_repeat_lasts_longer() -> None:
    """The first ejection lasts base_ejection_s, the second twice as long."""
    detector = OutlierDetector(OutlierConfig(base_ejection_s=10.0))
    stats = [*healthy(4), ("bad", 100, 60)]
    detector.evaluate(stats, 0.0)
    assert detector.is_ejected("bad", 9.999) and not detector.is_ejected("bad", 10.0)
    detector.evaluate(stats, 10.0)
    assert detector.is_ejected("bad", 29.999) and not detector.is_ejected("bad", 30.0)


def test_disabled_outlier_detection_ejects_nobody() -> None:
    """enabled = false turns ejection off."""
    detector = OutlierDetector(OutlierConfig(enabled=False))
    assert detector.evaluate([*healthy(9), ("bad", 100, 100)], 0.0) == []


async def test_the_router_sweeps_outliers_on_its_interval() -> None:
    """Attempt counts of the last interval decide; the ejected instance is filtered with a
    reason until the ejection ends; counters restart each interval."""
    clock = FakeClock(0.0)
    reg = registry(*(backend(f"i{n}") for n in range(5)), health={"outlier_interval_s": 10.0})
    rt = router(reg, clock)
    rt.route(request())  # sweep at t=0 (nothing to judge); next at t=10
    for inst in reg.instances.values():
        inst.runtime.interval_requests = 100
    reg.instances["i3"].runtime.interval_failures = 60
    clock.advance(9.0)
    assert rt.route(request())[1].rejected_reasons == {}  # not due yet
    clock.advance(1.0)
    _, decision = rt.route(request())
    assert decision.rejected_reasons == {"i3": "unhealthy: ejected as an outlier for 30.0s more"}
    assert all(i.runtime.interval_requests == 0 for i in reg.instances.values())
    clock.advance(30.0)
    assert rt.route(request())[1].rejected_reasons == {}
