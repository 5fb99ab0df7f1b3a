"""Rate limits: token buckets per instance and per client key (sans-I/O, explicit `now`)."""

from __future__ import annotations


class TokenBucket:
    """`rate_per_s` tokens per second up to `burst`; one request takes one token.

    `tokens` is the count at the last refill: refills only add, so `tokens >= 1` means a
    token is available now too (the router's filter reads it to skip the refill).
    """

    __slots__ = ("_stamp", "burst", "rate_per_s", "tokens")

    def __init__(self, rate_per_s: float, burst: float | None = None, now: float = 0.0) -> None:
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be positive")
        self.rate_per_s = rate_per_s
        self.burst = burst if burst is not None else max(1.0, rate_per_s)
        self.tokens = self.burst
        self._stamp = now

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self.tokens = min(self.burst, self.tokens + (now - self._stamp) * self.rate_per_s)
            self._stamp = now

    def available(self, now: float) -> bool:
        """Whether a token could be taken now (takes nothing)."""
        self._refill(now)
        return self.tokens >= 1.0

    def take(self, now: float) -> bool:
        """Take one token if there is one."""
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def retry_after(self, now: float) -> float:
        """Seconds until a token is available (0 when one is)."""
        self._refill(now)
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate_per_s
