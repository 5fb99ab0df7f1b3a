"""Instance health: a circuit breaker per instance and success-rate outlier ejection.

Sans-I/O: every method takes `now` (event-loop seconds); nothing reads a clock.

Circuit breaker rules:

1. CLOSED counts outcomes in a sliding window of `window_s`. It opens after
   `consecutive_failures` failures in a row, or when the window holds at least
   `min_requests` outcomes and their error rate is at least `error_rate`.
2. OPEN rejects everything until its cool-down ends: `cooldown_s` × (1 + `jitter` × u),
   u drawn uniformly from [0, 1) (jitter keeps a fleet from probing in lockstep); each
   re-open doubles the cool-down up to `max_cooldown_s`.
3. After the cool-down it is HALF_OPEN: at most `half_open_probes` requests at a time;
   `close_after_successes` successes close it (cool-down back to base), one failure re-opens.

    state      event                                  next
    CLOSED     failure, threshold reached             OPEN
    OPEN       now >= open_until (on `allows`)        HALF_OPEN
    HALF_OPEN  success, close_after_successes reached CLOSED
    HALF_OPEN  failure                                OPEN (cool-down doubled)
"""

from __future__ import annotations

import enum
import random
from collections import deque
from collections.abc import Iterable

from spear_rt.config import BreakerConfig, OutlierConfig


class BreakerState(enum.StrEnum):
    """Circuit breaker states."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """One instance's breaker."""

    def __init__(
        self, config: BreakerConfig = BreakerConfig(), rng: random.Random | None = None
    ) -> None:
        self.config = config
        self.state = BreakerState.CLOSED
        self._rng = rng or random.Random()
        self._window: deque[tuple[float, bool]] = deque()  # (time, ok)
        self._failures_in_window = 0
        self._consecutive = 0
        self._cooldown = config.cooldown_s
        self.open_until = 0.0
        self._probes = 0
        self._half_open_successes = 0
        self.transitions: list[tuple[float, BreakerState]] = []

    def allows(self, now: float) -> bool:
        """Whether a new request may go to this instance now (does not reserve a probe)."""
        if self.state is BreakerState.OPEN and now >= self.open_until:
            self._enter(BreakerState.HALF_OPEN, now)
        if self.state is BreakerState.HALF_OPEN:
            return self._probes < self.config.half_open_probes
        return self.state is BreakerState.CLOSED

    def on_start(self, now: float) -> None:
        """A request was sent (counts against half-open probes)."""
        if self.state is BreakerState.HALF_OPEN:
            self._probes += 1

    def on_cancel(self) -> None:
        """A request ended without an outcome (cancelled, or the caller's own error)."""
        if self.state is BreakerState.HALF_OPEN:
            self._probes = max(0, self._probes - 1)

    def on_result(self, ok: bool, now: float) -> None:
        """Record one outcome."""
        if self.state is BreakerState.HALF_OPEN:
            self._probes = max(0, self._probes - 1)
            if not ok:
                self._open(now, escalate=True)
                return
            self._half_open_successes += 1
            if self._half_open_successes >= self.config.close_after_successes:
                self._cooldown = self.config.cooldown_s
                self._enter(BreakerState.CLOSED, now)
            return
        if self.state is BreakerState.OPEN:
            return  # a late answer from before the trip: no news
        self._record(ok, now)
        if self._should_trip():
            self._open(now, escalate=False)

    def open_remotely(self, until: float, now: float) -> None:
        """Another node's breaker for this instance is open until `until`: open ours as long
        (without escalating our own cool-down); already open longer: no change."""
        if until <= now or (self.state is BreakerState.OPEN and self.open_until >= until):
            return
        self.open_until = until
        if self.state is not BreakerState.OPEN:
            self._enter(BreakerState.OPEN, now)

    def error_rate(self, now: float) -> float:
        """Failures / outcomes within the window (0 when empty)."""
        self._expire(now)
        return self._failures_in_window / len(self._window) if self._window else 0.0

    def _record(self, ok: bool, now: float) -> None:
        self._expire(now)
        self._window.append((now, ok))
        if ok:
            self._consecutive = 0
        else:
            self._failures_in_window += 1
            self._consecutive += 1

    def _expire(self, now: float) -> None:
        horizon = now - self.config.window_s
        window = self._window
        while window and window[0][0] <= horizon:
            _, ok = window.popleft()
            if not ok:
                self._failures_in_window -= 1

    def _should_trip(self) -> bool:
        cfg = self.config
        if self._consecutive >= cfg.consecutive_failures:
            return True
        n = len(self._window)
        return n >= cfg.min_requests and self._failures_in_window / n >= cfg.error_rate

    def _open(self, now: float, *, escalate: bool) -> None:
        if escalate:
            self._cooldown = min(self._cooldown * 2, self.config.max_cooldown_s)
        self.open_until = now + self._cooldown * (1 + self.config.jitter * self._rng.random())
        self._enter(BreakerState.OPEN, now)

    def _enter(self, state: BreakerState, now: float) -> None:
        self.state = state
        self.transitions.append((now, state))
        if len(self.transitions) > 64:
            del self.transitions[:32]
        self._probes = 0
        self._half_open_successes = 0
        if state is BreakerState.CLOSED:
            self._window.clear()
            self._failures_in_window = 0
            self._consecutive = 0


class OutlierDetector:
    """Ejects instances whose success rate is far below their peers' (Envoy's rule)."""

    def __init__(self, config: OutlierConfig = OutlierConfig()) -> None:
        self.config = config
        self.ejected_until: dict[str, float] = {}
        self._ejections: dict[str, int] = {}

    def is_ejected(self, name: str, now: float) -> bool:
        """Whether `name` is currently ejected."""
        until = self.ejected_until.get(name)
        if until is None:
            return False
        if now >= until:
            del self.ejected_until[name]
            return False
        return True

    def evaluate(self, stats: Iterable[tuple[str, int, int]], now: float) -> list[str]:
        """Given (name, requests, failures) per instance, eject outliers; returns new ejections."""
        cfg = self.config
        if not cfg.enabled:
            return []
        rates = {n: 1 - f / r for n, r, f in stats if r >= cfg.min_requests}
        if len(rates) < max(cfg.min_peers, 3):
            # With n peers one outlier is at most sqrt(n - 1) deviations out: below 5 peers
            # the default 1.9 factor could never eject anyone (Envoy's minimum is 5 hosts).
            return []
        mean = sum(rates.values()) / len(rates)
        stdev = (sum((r - mean) ** 2 for r in rates.values()) / len(rates)) ** 0.5
        cutoff = mean - cfg.stdev_factor * stdev
        budget = int(len(rates) * cfg.max_ejection_percent / 100)
        ejected_now = sum(1 for n in rates if self.is_ejected(n, now))
        new = []
        for name, rate in sorted(rates.items(), key=lambda kv: kv[1]):
            if rate >= cutoff or self.is_ejected(name, now) or ejected_now >= budget:
                continue
            count = self._ejections.get(name, 0) + 1
            self._ejections[name] = count
            self.ejected_until[name] = now + cfg.base_ejection_s * count
            ejected_now += 1
            new.append(name)
        return new
