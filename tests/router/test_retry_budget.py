"""The retry budget (Envoy's semantics): retries in flight, against requests in flight.

A retry may start while the retries already in flight number fewer than
max(min_retry_concurrency, budget_percent% of the requests in flight). A sequential client
(one request in flight) always gets its fallback; a burst cannot multiply the load by more
than the budget. Everything runs on trio's autojump clock.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from spear_rt.config import RetryConfig
from spear_rt.errors import BackendFailure, CanonicalFailure, ConfigError
from spear_rt.ir import CanonicalRequestEnvelope
from spear_rt.router.execute import RetryBudget
from tests.router.support import backend, config, request
from tests.router.test_execute import Backends, executor, tiered


def server_error() -> BackendFailure:
    return BackendFailure("upstream 500", retryable=True, status=500)


def request_() -> CanonicalRequestEnvelope:
    return request(policy="priority_fallback")


async def test_a_sequential_client_always_falls_back_from_a_dead_primary(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """priority_fallback, primary answering 500, default [policy.retry]: 20 requests one
    after another all succeed on the fallback (the third failed '(after 1 attempt)' when the
    budget counted retries per second)."""
    backends = Backends(a=server_error())
    ex, _ = executor(tiered("a", "b"))
    served = []
    for _ in range(20):
        done = await ex.run(request_(), backends, idempotent=True)
        served.append(done.instance.name)
    assert served == ["b"] * 20


@pytest.mark.parametrize("n", [10, 50])
async def test_a_burst_against_a_dead_fleet_is_capped_by_the_budget(
    autojump_clock: trio.testing.MockClock, n: int
) -> None:
    """n concurrent requests, both instances failing after 1 s: at most n * (1 + 20%) + 3
    attempts reach the backends, and every request fails with a clear retryable error."""
    backends = Backends(a=(1.0, server_error()), b=(1.0, server_error()))
    ex, _ = executor(tiered("a", "b"), retry=RetryConfig(max_attempts=3))
    failures: list[CanonicalFailure | BaseException] = []

    async def one() -> None:
        try:
            await ex.run(request_(), backends, idempotent=True)
        except (CanonicalFailure, BackendFailure) as exc:
            failures.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
    assert len(failures) == n
    assert n < len(backends.calls) <= n * 1.2 + 3
    budget = ex._budget
    assert budget.active_requests == 0 and budget.active_retries == 0


def test_retries_in_flight_are_bounded_by_the_floor_and_the_percent() -> None:
    """Floor 3: with 1 request in flight 3 retries may run at once, not 4; with 100 requests
    in flight 20% allows 20; a finished retry frees its place."""
    budget = RetryBudget(RetryConfig(budget_percent=20.0, min_retry_concurrency=3))
    budget.active_requests = 1
    assert [budget.try_retry() for _ in range(4)] == [True, True, True, False]
    budget.retry_done()
    assert budget.try_retry()
    budget.active_requests, budget.active_retries = 100, 0
    assert sum(budget.try_retry() for _ in range(30)) == 20


def test_the_old_ratio_key_still_works_and_the_per_second_floor_is_refused() -> None:
    """budget_ratio (before: a share of the request rate) is read as budget_percent / 100;
    min_retries_per_s has no in-flight equivalent: a config error names its replacement."""
    cfg = config(backend("a"), policy={"retry": {"budget_ratio": 0.5}})
    assert cfg.policy.retry.ratio == 0.5
    assert config(backend("a")).policy.retry.ratio == 0.2
    assert config(backend("a")).policy.retry.min_retry_concurrency == 3
    with pytest.raises(ConfigError) as info:
        config(backend("a"), policy={"retry": {"min_retries_per_s": 1.0}})
    assert "policy.retry.min_retries_per_s" in str(info.value)
    assert "min_retry_concurrency" in str(info.value)
    with pytest.raises(ConfigError) as both:
        config(backend("a"), policy={"retry": {"budget_ratio": 0.5, "budget_percent": 10.0}})
    assert "budget_percent" in str(both.value)
    with pytest.raises(ConfigError):
        config(backend("a"), policy={"retry": {"min_retry_concurrency": -1}})
