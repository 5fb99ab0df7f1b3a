"""Executing one-shot requests over the router: fallback, hedging and mirroring.

* **Fallback** (every policy, idempotent operations only): an attempt that fails retryably
  (backend 429/5xx, timeout) excludes its instance and the request is routed again — which,
  with priority tiers, reaches the next tier — up to `max_attempts`, and only while the
  retry budget allows (Envoy's: retries in flight may number max(min_retry_concurrency,
  budget_percent of the requests in flight), so a sequential client always falls back and a
  failing fleet is not hammered twice as hard).
* **Hedging** `hedged(k, delay_ms)` (operations named in config only): if the first attempt
  has not answered within `delay_ms`, a second starts on another instance, up to `k`; the
  first success wins and the others are cancelled (they run in one task group: cancellation
  is structured, nothing leaks). A cancelled loser counts as neither success nor failure.
* **Mirroring** `mirror_to(instance, sample_rate)`: after the primary answered, a copy of the
  request goes to a secondary through a bounded queue worked by the server's task group; the
  caller never waits for it, and its latency and failures only reach metrics.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar

import anyio
import anyio.abc
import msgspec

from spear_rt.backend import OneShotResponse
from spear_rt.config import HedgeConfig, MirrorConfig, RetryConfig
from spear_rt.errors import BackendFailure, CanonicalFailure
from spear_rt.ir import CanonicalError, CanonicalRequestEnvelope, ErrorCode
from spear_rt.registry import RegisteredInstance
from spear_rt.router.core import Router

T = TypeVar("T")
Call = Callable[[RegisteredInstance], Awaitable[T]]


class Executed(msgspec.Struct, Generic[T]):
    """A successful result and how it was obtained."""

    result: T
    instance: RegisteredInstance
    attempts: int
    hedged: bool = False


def is_retryable(exc: BaseException) -> bool:
    """Whether another instance might succeed where this attempt failed."""
    if isinstance(exc, BackendFailure):
        return exc.retryable
    if isinstance(exc, CanonicalFailure):
        return exc.error.retryable
    return isinstance(exc, TimeoutError)


class RetryBudget:
    """Envoy's retry budget: retries in flight, bounded by a share of requests in flight.

    A retry may start while fewer than max(min_retry_concurrency, ratio x requests in flight)
    retries are running, so one request at a time always gets its fallback, while a burst
    against a failing fleet adds at most that share of concurrent load.
    """

    def __init__(self, config: RetryConfig) -> None:
        self.config = config
        self.active_requests = 0
        self.active_retries = 0

    def allowed(self) -> float:
        """How many retries may be in flight now."""
        return max(
            float(self.config.min_retry_concurrency), self.config.ratio * self.active_requests
        )

    def try_retry(self) -> bool:
        """Take a place for one retry if the budget has room (give it back with retry_done)."""
        if self.active_retries >= self.allowed():
            return False
        self.active_retries += 1
        return True

    def retry_done(self) -> None:
        """A retry ended (answered, failed or cancelled)."""
        self.active_retries -= 1


class Executor:
    """Runs one-shot calls with fallback, hedging and mirroring over a router."""

    def __init__(
        self,
        router: Callable[[], Router],
        *,
        retry: RetryConfig = RetryConfig(),
        hedge: HedgeConfig = HedgeConfig(),
        mirror: MirrorConfig = MirrorConfig(),
        rng: random.Random | None = None,
    ) -> None:
        self._router = router
        self.retry = retry
        self.hedge = hedge
        self.mirror = mirror
        self._budget = RetryBudget(retry)
        self._rng = rng or random.Random()
        self._mirror_send, self._mirror_receive = anyio.create_memory_object_stream[
            tuple[CanonicalRequestEnvelope, Callable[[RegisteredInstance], Awaitable[object]]]
        ](mirror.queue)
        self.mirror_dropped = 0

    async def run(
        self, req: CanonicalRequestEnvelope, call: Call[T], *, idempotent: bool
    ) -> Executed[T]:
        """Route and run `call`, falling back or hedging as configured."""
        self._budget.active_requests += 1
        try:
            return await self._run(req, call, idempotent=idempotent)
        finally:
            self._budget.active_requests -= 1

    async def _run(
        self, req: CanonicalRequestEnvelope, call: Call[T], *, idempotent: bool
    ) -> Executed[T]:
        router = self._router()
        # A hedge sends the same request twice: only for idempotent requests.
        hedging = idempotent and req.operation in self.hedge.operations and self.hedge.k > 1
        # Every attempt that failed excluded its instance, so len(excluded) counts them.
        excluded: set[str] = set()
        last: BaseException | None = None
        retrying = False  # this attempt holds a place in the retry budget
        while True:
            tried = len(excluded)
            try:
                done = await self._attempt(router, req, call, excluded, hedging)
                done.attempts += tried
            except CanonicalFailure as exc:
                if len(excluded) == tried:  # the router refused: no attempt was made
                    if last is None:
                        raise  # its own answer (no candidate, at capacity) as it is
                    raise _exhausted(req, last, tried) from None
                if not (idempotent and is_retryable(exc)):
                    raise
                last = exc
            except (BackendFailure, TimeoutError) as exc:
                if not (idempotent and is_retryable(exc)):
                    raise
                last = exc
            else:
                self._maybe_mirror(req, call)
                return done
            finally:
                if retrying:
                    self._budget.retry_done()
                    retrying = False
            attempts = len(excluded)
            if attempts >= self.retry.max_attempts or not self._budget.try_retry():
                raise _exhausted(req, last, attempts)
            retrying = True
            router.count_fallback(req.operation)

    async def _attempt(
        self,
        router: Router,
        req: CanonicalRequestEnvelope,
        call: Call[T],
        excluded: set[str],
        hedging: bool,
    ) -> Executed[T]:
        if hedging:
            return await self._hedged(router, req, call, excluded)
        instance, _ = router.route(req, exclude=excluded)
        excluded.add(instance.name)  # should it fail, the retry goes elsewhere
        return Executed(await router.attempt(instance, call, req.operation), instance, 1)

    async def _hedged(
        self, router: Router, req: CanonicalRequestEnvelope, call: Call[T], excluded: set[str]
    ) -> Executed[T]:
        # The first route is outside the task group so that a refusal is raised as it is.
        instance, _ = router.route(req, exclude=excluded)
        race = _HedgeRace(router, req, call, excluded, self.hedge)
        try:
            await race.run(instance)
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1:  # the caller's own error, as itself
                raise group.exceptions[0] from None
            raise
        if race.winner is not None:
            return race.winner
        raise race.failures[-1]

    def _maybe_mirror(
        self, req: CanonicalRequestEnvelope, call: Callable[[RegisteredInstance], Awaitable[object]]
    ) -> None:
        mirror = self.mirror
        if not mirror.instance or req.operation not in mirror.operations:
            return
        if self._rng.random() >= mirror.sample_rate:
            return
        try:
            self._mirror_send.send_nowait((req, call))
        except anyio.WouldBlock:
            self.mirror_dropped += 1  # a slow mirror never slows the primary

    async def mirror_worker(self) -> None:
        """Work the mirror queue (run in the server's task group)."""
        async for req, call in self._mirror_receive:
            router = self._router()
            instance = router.registry.instances.get(self.mirror.instance)
            if instance is None:
                continue
            router.count_mirror(req.operation)
            try:
                result = await router.attempt(instance, call, req.operation)
                if isinstance(result, OneShotResponse) and result.stream is not None:
                    await _drain(result.stream)
            except Exception:
                pass


async def _drain(stream: AsyncIterator[bytes]) -> None:
    """Read a mirrored stream to its end and close it: the shadow does all the work of the
    request, and its upstream connection is released (it leaked while left unread)."""
    try:
        async for _chunk in stream:
            pass
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


class _HedgeRace(Generic[T]):
    """One hedged request: attempts started `delay_ms` apart, the first success wins."""

    def __init__(
        self,
        router: Router,
        req: CanonicalRequestEnvelope,
        call: Call[T],
        excluded: set[str],
        hedge: HedgeConfig,
    ) -> None:
        self.router, self.req, self.call, self.excluded, self.hedge = (
            router,
            req,
            call,
            excluded,
            hedge,
        )
        self.winner: Executed[T] | None = None
        self.failures: list[BaseException] = []
        self.started: list[RegisteredInstance] = []
        self._finished = anyio.Event()

    async def run(self, first: RegisteredInstance) -> None:
        """Start attempts until one succeeds, all fail, or k were started."""
        instance = first
        async with anyio.create_task_group() as tg:
            for n in range(self.hedge.k):
                if self.failures and not is_retryable(self.failures[-1]):
                    break  # another instance would refuse it the same way
                if n:
                    try:
                        taken = self.excluded | {i.name for i in self.started}
                        instance, _ = self.router.route(self.req, exclude=taken)
                    except CanonicalFailure:
                        break
                    self.router.count_hedge(self.req.operation)
                self.started.append(instance)
                tg.start_soon(self._attempt, instance, tg)
                with anyio.move_on_after(self.hedge.delay_ms / 1000):
                    await self._finished.wait()
                self._finished = anyio.Event()
                if self.winner is not None:
                    break

    async def _attempt(self, instance: RegisteredInstance, tg: anyio.abc.TaskGroup) -> None:
        try:
            result = await self.router.attempt(instance, self.call, self.req.operation)
        except (BackendFailure, TimeoutError, CanonicalFailure) as exc:
            self.failures.append(exc)
            self.excluded.add(instance.name)
            self._finished.set()
            return
        if self.winner is None:
            started = len(self.started)
            self.winner = Executed(result, instance, started, hedged=started > 1)
            tg.cancel_scope.cancel()  # the losers are cancelled here


def _exhausted(
    req: CanonicalRequestEnvelope, last: BaseException | None, attempts: int
) -> CanonicalFailure:
    if isinstance(last, CanonicalFailure):
        error = last.error
    elif isinstance(last, BackendFailure) and last.status == 429:
        # The last instance said "slow down": the caller should back off, not retry at once.
        retry = last.retry_after_s if last.retry_after_s is not None else 1.0
        error = CanonicalError(
            ErrorCode.RATE_LIMITED,
            f"{last}",
            retryable=True,
            operation=req.operation,
            retry_after_s=retry,
        )
    else:
        code = ErrorCode.TIMEOUT if isinstance(last, TimeoutError) else ErrorCode.BACKEND_ERROR
        error = CanonicalError(
            code, f"{last}" or "backend failed", retryable=True, operation=req.operation
        )
    error.message = f"{error.message} (after {attempts} attempt{'s' if attempts != 1 else ''})"
    return CanonicalFailure(error)
