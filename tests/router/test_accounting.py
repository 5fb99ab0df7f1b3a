"""Prices, budgets per client key and per-key rate limits; refusals come before any backend call."""

from __future__ import annotations

import pytest

from spear_rt.config import BudgetConfig, Price
from spear_rt.errors import CanonicalFailure
from spear_rt.ir import ErrorCode, Usage
from spear_rt.registry import RegisteredInstance
from spear_rt.router.accounting import BudgetTracker, KeyLimiter, cost
from tests.router.support import CHAT, FakeClock, backend, registry, request, router

PRICE = Price(
    per_1k_input_tokens=0.5,
    per_1k_output_tokens=1.5,
    per_audio_second=0.01,
    per_image=0.04,
    per_session_minute=0.06,
)


def test_cost_prices_every_unit_of_usage() -> None:
    """tokens per 1k, audio per second, images each, sessions per minute; no price is free."""
    usage = Usage(
        input_tokens=2000, output_tokens=1000, audio_seconds=30, images=2, session_minutes=0.5
    )
    assert cost(PRICE, usage) == pytest.approx(1.0 + 1.5 + 0.3 + 0.08 + 0.03)
    assert cost(None, usage) == 0.0


def test_a_budget_is_exceeded_once_spent_and_recovers_as_spend_leaves_the_window() -> None:
    """1.0 per 60 s: 0.6 then 0.5 exhausts it; retry_after is when the oldest spend leaves."""
    budget = BudgetTracker(BudgetConfig(amount=1.0, window_s=60.0))
    budget.charge("k", 0.6, 0.0)
    assert budget.check("k", 1.0) is None
    budget.charge("k", 0.5, 10.0)
    error = budget.check("k", 20.0)
    assert error is not None and error.code is ErrorCode.BUDGET_EXCEEDED
    assert error.retryable and error.retry_after_s == pytest.approx(40.0)
    assert "spent 1.1 of 1" in error.message
    assert budget.check("other", 20.0) is None
    assert budget.check("k", 60.0) is None  # the 0.6 left the window
    assert budget.spent("k", 60.0) == pytest.approx(0.5)
    assert budget.spent("k", 70.0) == pytest.approx(0.0)


def test_no_budget_or_no_key_is_unlimited() -> None:
    """amount unset, or a request without a client key: never refused."""
    unlimited = BudgetTracker(BudgetConfig())
    unlimited.charge("k", 1e9, 0.0)
    assert unlimited.check("k", 0.0) is None
    budget = BudgetTracker(BudgetConfig(amount=1.0))
    budget.charge(None, 5.0, 0.0)
    assert budget.check(None, 0.0) is None


def test_key_limiter_gives_each_key_its_own_bucket() -> None:
    """2/s burst 2 per key: the third call is RateLimited with its exact retry-after."""
    limiter = KeyLimiter(2.0, 2)
    assert limiter.check("a", 0.0) is None and limiter.check("a", 0.0) is None
    error = limiter.check("a", 0.0)
    assert error is not None and error.code is ErrorCode.RATE_LIMITED
    assert error.retryable and error.retry_after_s == pytest.approx(0.5)
    assert limiter.check("b", 0.0) is None
    assert limiter.check("a", 0.5) is None
    assert KeyLimiter(None, None).check("a", 0.0) is None
    assert limiter.check(None, 0.0) is None


def test_key_limiter_memory_is_bounded() -> None:
    """Past max_keys the table is reset rather than grown."""
    limiter = KeyLimiter(1.0, 1, max_keys=3)
    for key in "abc":
        limiter.check(key, 0.0)
    assert limiter.check("a", 0.0) is not None
    limiter.check("d", 0.0)  # fourth key: reset
    assert limiter.check("a", 0.0) is None


async def test_an_exhausted_budget_is_refused_before_any_backend_call() -> None:
    """admit() raises BudgetExceeded once the key's spend reaches the budget; the backend is
    never called; after the window it admits again."""
    clock = FakeClock(0.0)
    reg = registry(
        backend("a", price={"per_1k_input_tokens": 1.0, "per_1k_output_tokens": 1.0}),
        budget={"amount": 2.0, "window_s": 100.0},
    )
    rt = router(reg, clock)
    calls: list[str] = []

    async def call(inst: RegisteredInstance) -> Usage:
        calls.append(inst.name)
        return Usage(input_tokens=1000, output_tokens=1000)

    async def serve() -> None:
        req = request(key="client-1")
        rt.admit(req)
        inst, _ = rt.route(req)
        usage = await rt.attempt(inst, call, CHAT)
        assert rt.charge(req, inst, usage) == 2.0

    await serve()
    clock.advance(1.0)
    with pytest.raises(CanonicalFailure) as info:
        await serve()
    assert info.value.error.code is ErrorCode.BUDGET_EXCEEDED
    assert info.value.error.operation is CHAT
    assert info.value.error.retry_after_s == pytest.approx(99.0)
    assert calls == ["a"]
    rt.admit(request(key="client-2"))  # another key has its own budget
    clock.advance(99.0)
    await serve()
    assert calls == ["a", "a"]


async def test_a_client_key_over_its_rate_is_refused_with_retry_after() -> None:
    """[server] per_key_rate_per_s: admit() raises RateLimited with the bucket's retry-after."""
    clock = FakeClock(0.0)
    rt = router(
        registry(backend("a"), server={"per_key_rate_per_s": 1.0, "per_key_burst": 1}), clock
    )
    rt.admit(request(key="k"))
    with pytest.raises(CanonicalFailure) as info:
        rt.admit(request(key="k"))
    assert info.value.error.code is ErrorCode.RATE_LIMITED
    assert info.value.error.retry_after_s == pytest.approx(1.0)
    rt.admit(request())  # no key: not limited per key
    clock.advance(1.0)
    rt.admit(request(key="k"))
