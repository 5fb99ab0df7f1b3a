"""Rate limits: token buckets per instance and per client key (sans-I/O, explicit `now`)."""

from __future__ import annotations


class TokenBucket:
    """`rate_per_s` tokens per second up to `burst`; one request takes one token."""

    __slots__ = ("burst", "rate_per_s", "_stamp", "_tokens")

    def __init__(self, rate_per_s: float, burst: float | None = None, now: float = 0.0) -> None:
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be positive")
        self.rate_per_s = rate_per_s
        self.burst = burst if burst is not None else max(1.0, rate_per_s)
        self._tokens = self.burst
        self._stamp = now

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate_per_s)
            self._stamp = now

    def available(self, now: float) -> bool:
        """Whether a token could be taken now (takes nothing)."""
        self._refill(now)
        return self._tokens >= 1.0

    def take(self, now: float) -> bool:
        """Take one token if there is one."""
        self._refill(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def retry_after(self, now: float) -> float:
        """Seconds until a token is available (0 when one is)."""
        self._refill(now)
        return 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) / self.rate_per_s
