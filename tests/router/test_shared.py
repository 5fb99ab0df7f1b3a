"""The router's cluster hooks: limits and budgets counted across nodes (`SharedCounters`),
ejections told to the other nodes (`on_ejection`) and taken from them (`apply_ejections`).

`OneClock` is the shared state of a cluster in one process (token buckets and spends on one
fake clock), standing in for Redis (tested for real in tests/cluster/test_redis_share.py).
"""

from __future__ import annotations

import pytest

from spear_rt.errors import BackendFailure, CanonicalFailure
from spear_rt.ir import ErrorCode, Usage
from spear_rt.registry import RegisteredInstance
from spear_rt.router import Router
from spear_rt.router.accounting import SharedUnavailable
from spear_rt.router.health import BreakerState
from spear_rt.router.limits import TokenBucket
from tests.router.support import CHAT, FakeClock, backend, registry, request, router

LIMITED = {"per_key_rate_per_s": 1.0, "per_key_burst": 2}


class OneClock:
    """Every node's counters on one clock (what Redis gives a cluster)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.buckets: dict[str, TokenBucket] = {}
        self.spends: dict[str, list[tuple[float, float]]] = {}

    async def take_token(self, name: str, rate_per_s: float, burst: float) -> float | None:
        now = self.clock()
        bucket = self.buckets.setdefault(name, TokenBucket(rate_per_s, burst, now))
        return None if bucket.take(now) else bucket.retry_after(now)

    async def spent(self, name: str, window_s: float) -> tuple[float, float]:
        now = self.clock()
        live = [(t, a) for t, a in self.spends.get(name, []) if t > now - window_s]
        retry = live[0][0] + window_s - now if live else window_s
        return sum(a for _, a in live), retry

    async def spend(self, name: str, amount: float, window_s: float) -> None:
        self.spends.setdefault(name, []).append((self.clock(), amount))


class Away:
    """Shared counters whose Redis cannot be reached."""

    async def take_token(self, name: str, rate_per_s: float, burst: float) -> float | None:
        raise SharedUnavailable("down")

    async def spent(self, name: str, window_s: float) -> tuple[float, float]:
        raise SharedUnavailable("down")

    async def spend(self, name: str, amount: float, window_s: float) -> None:
        raise SharedUnavailable("down")


def node(clock: FakeClock, shared: object, **server: object) -> Router:
    rt = router(registry(backend("a"), server=server or LIMITED), clock)
    rt.shared = shared  # type: ignore[assignment]
    return rt


async def refused(rt: Router) -> ErrorCode | None:
    try:
        await rt.admit_shared(request(key="k"))
    except CanonicalFailure as exc:
        return exc.error.code
    return None


async def test_two_nodes_count_one_keys_rate_together() -> None:
    clock = FakeClock()
    shared = OneClock(clock)
    a, b = node(clock, shared), node(clock, shared)
    assert [await refused(n) for n in (a, b, a, b)] == [None, None, *[ErrorCode.RATE_LIMITED] * 2]
    clock.advance(1.0)  # one token earned back, for whichever node asks first
    assert [await refused(n) for n in (b, a)] == [None, ErrorCode.RATE_LIMITED]
    with pytest.raises(CanonicalFailure) as info:
        await a.admit_shared(request(key="k"))
    assert info.value.error.retry_after_s == pytest.approx(1.0)
    assert "over its rate of 1 requests/s" in info.value.error.message


async def test_without_redis_each_node_counts_alone() -> None:
    clock = FakeClock()
    a = node(clock, Away())
    assert [await refused(a) for _ in range(3)] == [None, None, ErrorCode.RATE_LIMITED]
    await a.admit_shared(request(key=None))  # no key: never limited


async def test_a_budget_spent_on_one_node_is_exhausted_on_the_other() -> None:
    clock = FakeClock()
    shared = OneClock(clock)
    price = {"per_1k_input_tokens": 1.0}
    budget = {"amount": 1.0, "window_s": 60.0}
    reg = registry(backend("a", price=price), budget=budget)
    a, b = router(reg, clock), router(registry(backend("a", price=price), budget=budget), clock)
    a.shared = b.shared = shared
    await a.charge_shared(request(key="k"), reg.instances["a"], Usage(input_tokens=1500))
    assert await refused(b) is ErrorCode.BUDGET_EXCEEDED
    clock.advance(61)
    assert await refused(b) is None


async def test_a_breaker_that_opens_is_told_once_and_opens_on_the_other_node() -> None:
    clock = FakeClock()
    health = {"breaker": {"consecutive_failures": 2, "cooldown_s": 10.0, "jitter": 0.0}}
    a = router(registry(backend("a"), health=health), clock)
    b = router(registry(backend("a"), health=health), clock)
    told: list[tuple[str, str, float]] = []
    a.on_ejection = lambda kind, name, seconds: told.append((kind, name, seconds))

    async def failing(_: RegisteredInstance) -> None:
        raise BackendFailure("down", status=503)

    for _ in range(3):  # the third finds it open already: told once
        try:
            await a.attempt(a.registry.instances["a"], failing, CHAT)
        except BackendFailure:
            pass
    assert told == [("breaker", "a", pytest.approx(10.0))]
    b.apply_ejections({("breaker", "a"): 10.0, ("breaker", "unknown"): 5.0})
    breaker = b.registry.instances["a"].runtime.breaker
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(CanonicalFailure) as info:
        b.route(request())
    assert "circuit open for 10.0s more" in str(info.value.error.rejected_reasons)
    b.apply_ejections({("breaker", "a"): 3.0})  # a shorter one changes nothing
    assert breaker.open_until == pytest.approx(clock() + 10.0)
    clock.advance(10.0)
    assert breaker.allows(clock())  # half-open after the told time, like the first node
    b.apply_ejections({("outlier", "a"): 4.0})
    assert b.outliers.is_ejected("a", clock())
