"""What the router counts: per-instance metrics, per-key rate limits and budgets.

Budgets are spent from what backends report (usage) or, failing that, from what was sent,
priced with the serving instance's declared prices. An exhausted budget is refused with
`BudgetExceeded` before any backend is called.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from spear_rt.config import BudgetConfig, Price
from spear_rt.ir import CanonicalError, ErrorCode, Usage
from spear_rt.metrics import MetricsRegistry
from spear_rt.router.limits import TokenBucket


def cost(price: Price | None, usage: Usage) -> float:
    """The price of `usage` at `price` (0 when the instance declares no price)."""
    if price is None:
        return 0.0
    return (
        usage.input_tokens / 1000 * (price.per_1k_input_tokens or 0.0)
        + usage.output_tokens / 1000 * (price.per_1k_output_tokens or 0.0)
        + usage.audio_seconds * (price.per_audio_second or 0.0)
        + usage.images * (price.per_image or 0.0)
        + usage.session_minutes * (price.per_session_minute or 0.0)
    )


class BudgetTracker:
    """Spend per client key over a sliding window."""

    def __init__(self, config: BudgetConfig) -> None:
        self.config = config
        self._spent: dict[str, deque[tuple[float, float]]] = {}
        self._totals: dict[str, float] = {}

    def spent(self, key: str, now: float) -> float:
        """What `key` spent within the window."""
        entries = self._spent.get(key)
        if not entries:
            return 0.0
        horizon = now - self.config.window_s
        while entries and entries[0][0] <= horizon:
            _, amount = entries.popleft()
            self._totals[key] -= amount
        return max(self._totals[key], 0.0)

    def check(self, key: str | None, now: float) -> CanonicalError | None:
        """BudgetExceeded when `key` has nothing left."""
        limit = self.config.amount
        if limit is None or key is None:
            return None
        spent = self.spent(key, now)
        if spent < limit:
            return None
        entries = self._spent[key]
        retry = entries[0][0] + self.config.window_s - now if entries else self.config.window_s
        return budget_error(spent, limit, self.config.window_s, retry)

    def charge(self, key: str | None, amount: float, now: float) -> None:
        """Add `amount` to `key`'s spend."""
        if key is None or amount <= 0:
            return
        self.spent(key, now)
        self._spent.setdefault(key, deque()).append((now, amount))
        self._totals[key] = self._totals.get(key, 0.0) + amount


class SharedUnavailable(Exception):
    """The state shared between nodes cannot be reached now: count locally."""


class SharedCounters(Protocol):
    """Rate limits and budgets counted across nodes (cluster/shared.py implements it).

    Every method may raise `SharedUnavailable`; the router then counts on this node alone.
    """

    async def take_token(self, name: str, rate_per_s: float, burst: float) -> float | None:
        """None when a token was taken from `name`'s bucket, else seconds until one."""
        ...

    async def spent(self, name: str, window_s: float) -> tuple[float, float]:
        """(spent in the window, seconds until the oldest spend leaves it)."""
        ...

    async def spend(self, name: str, amount: float, window_s: float) -> None:
        """Add `amount` to `name`'s spend."""
        ...


def budget_error(spent: float, limit: float, window_s: float, retry: float) -> CanonicalError:
    """BudgetExceeded for a key that spent `spent` of `limit`."""
    return CanonicalError(
        ErrorCode.BUDGET_EXCEEDED,
        f"budget exhausted: spent {spent:.4g} of {limit:g} in the last {window_s:g}s",
        retryable=True,
        retry_after_s=max(retry, 0.0),
    )


def rate_error(rate_per_s: float, retry: float) -> CanonicalError:
    """RateLimited for a key over its rate."""
    return CanonicalError(
        ErrorCode.RATE_LIMITED,
        f"client key over its rate of {rate_per_s:g} requests/s",
        retryable=True,
        retry_after_s=retry,
    )


class KeyLimiter:
    """A token bucket per client key (one-shot requests)."""

    def __init__(
        self, rate_per_s: float | None, burst: int | None, max_keys: int = 100_000
    ) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._buckets: dict[str, TokenBucket] = {}
        self._max_keys = max_keys

    def check(self, key: str | None, now: float) -> CanonicalError | None:
        """RateLimited (with retry-after) when `key` is over its rate; takes a token otherwise."""
        if self.rate_per_s is None or key is None:
            return None
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                self._buckets.clear()  # bounded memory; a flood of keys resets everyone
            bucket = self._buckets[key] = TokenBucket(self.rate_per_s, self.burst, now)
        if bucket.take(now):
            return None
        return rate_error(self.rate_per_s, bucket.retry_after(now))


class RouterMetrics:
    """The router's Prometheus series."""

    def __init__(self, registry: MetricsRegistry) -> None:
        labels = ("operation", "instance")
        self.requests = registry.counter(
            "spear_requests_total", "Requests sent to an instance", labels
        )
        self.errors = registry.counter("spear_errors_total", "Requests that failed", labels)
        self.timeouts = registry.counter("spear_timeouts_total", "Requests that timed out", labels)
        self.rate_limited = registry.counter(
            "spear_rate_limited_total",
            "Requests refused or answered 429",
            ("operation", "instance"),
        )
        self.latency = registry.histogram(
            "spear_request_latency_seconds", "Backend latency", labels
        )
        self.fallbacks = registry.counter(
            "spear_fallbacks_total", "Retries on another instance", ("operation",)
        )
        self.hedges = registry.counter(
            "spear_hedges_total", "Hedged second attempts", ("operation",)
        )
        self.mirrors = registry.counter(
            "spear_mirrors_total", "Mirrored copies sent", ("operation",)
        )
        self.no_candidate = registry.counter(
            "spear_no_candidate_total", "Requests no instance could take", ("operation", "code")
        )
