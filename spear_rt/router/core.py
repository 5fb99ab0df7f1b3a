"""The router: filter, then select with a policy, and explain every decision.

One router serves realtime sessions and one-shot requests. `route` picks an instance (or
raises a `CanonicalFailure` that carries the explanation); `attempt` runs a call on it and
feeds what happened back into health, latency averages and metrics; `explain` answers
"what would happen" with no side effect at all. `reload` swaps the registry atomically:
per-instance runtime (in-flight, breaker) carries over by name.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Awaitable, Callable, Collection
from typing import NoReturn, TypeVar

import anyio
import msgspec

from spear_rt.config import Config
from spear_rt.errors import BackendFailure, CanonicalFailure, ConfigError, echo
from spear_rt.ir import CanonicalError, CanonicalRequestEnvelope, ErrorCode, Operation, Usage
from spear_rt.metrics import MetricsRegistry
from spear_rt.registry import BackendRegistry, RegisteredInstance
from spear_rt.router.accounting import (
    BudgetTracker,
    KeyLimiter,
    RouterMetrics,
    SharedCounters,
    SharedUnavailable,
    budget_error,
    cost,
    rate_error,
)
from spear_rt.router.filter import CAPABILITY, CAPACITY, UNHEALTHY, CandidateFilter
from spear_rt.router.health import BreakerState, OutlierDetector
from spear_rt.router.policies import DEFAULT_BY_OPERATION, EwmaLatency, Policy, make_policy

T = TypeVar("T")

# Over capacity, tell clients when to come back rather than queueing them.
CAPACITY_RETRY_AFTER_S = 1.0


class Decision(msgspec.Struct, omit_defaults=True):
    """Why an instance was chosen (or none was): the router's explanation."""

    operation: Operation
    policy: str
    candidates_checked: int
    rejected_reasons: dict[str, str]
    selected: str | None = None
    signals: dict[str, float] = msgspec.field(default_factory=dict)


class Router:
    """Routes canonical requests over one registry."""

    def __init__(
        self,
        registry: BackendRegistry,
        rng: random.Random | None = None,
        clock: Callable[[], float] = anyio.current_time,
        metrics: MetricsRegistry | None = None,
    ) -> None:
        self._rng = rng
        self._clock = clock
        self._policies: dict[str, Policy] = {}
        self.metrics = RouterMetrics(metrics or MetricsRegistry())
        self.registry = registry
        # Nodes of a cluster (cluster/shared.py): limits and budgets counted across nodes,
        # and each ejection this node makes told to the others, (kind, instance, seconds).
        self.shared: SharedCounters | None = None
        self.on_ejection: Callable[[str, str, float], None] | None = None
        self.reload(registry)

    @staticmethod
    def check_policies(config: Config) -> None:
        """Raise ConfigError when `config` names a policy that does not exist."""
        for name in {*config.policy.by_operation.values(), config.policy.default}:
            if name is not None:
                make_policy(name)

    def reload(self, registry: BackendRegistry) -> None:
        """Serve from `registry` from now on (its policies must all exist)."""
        config = registry.config
        for name in {*DEFAULT_BY_OPERATION.values(), *config.policy.by_operation.values()}:
            self._policy(name)
        if config.policy.default is not None:
            self._policy(config.policy.default)
        self.registry = registry
        self._filter = CandidateFilter()  # its cache belongs to this registry
        self.outliers = OutlierDetector(config.health.outlier)
        self._outlier_due = 0.0
        self.budgets = BudgetTracker(config.budget)
        self.key_limiter = KeyLimiter(config.server.per_key_rate_per_s, config.server.per_key_burst)

    def _policy(self, name: str) -> Policy:
        policy = self._policies.get(name)
        if policy is None:
            policy = self._policies[name] = make_policy(name, self._rng)
        return policy

    def policy_name(self, req: CanonicalRequestEnvelope) -> str:
        """The request's own policy (if the host allows overrides), else the operation's."""
        config = self.registry.config.policy
        if req.policy is not None:
            if not config.allow_request_override:
                raise CanonicalFailure.of(
                    ErrorCode.INVALID_REQUEST, "this server does not let requests choose a policy"
                )
            return req.policy
        if req.operation in config.by_operation:
            return config.by_operation[req.operation]
        return config.default or DEFAULT_BY_OPERATION[req.operation]

    # --- selection ----------------------------------------------------------------------------

    def _decide(
        self, req: CanonicalRequestEnvelope, exclude: Collection[str], dry_run: bool
    ) -> tuple[RegisteredInstance | None, Decision]:
        try:
            policy = self._policy(self.policy_name(req))
        except ConfigError as exc:
            raise CanonicalFailure.of(ErrorCode.INVALID_REQUEST, exc.reason) from None
        now = self._clock()
        self._evaluate_outliers(now)
        instances = self.registry.serving(req.operation)
        eligible, rejected = self._filter(instances, req, now, exclude, self.outliers)
        decision = Decision(req.operation, policy.name, len(instances), rejected)
        if not eligible:
            return None, decision
        if dry_run:
            policy = copy.deepcopy(policy)
        chosen = policy.select(eligible, req, now)
        decision.selected = chosen.name
        decision.signals = {
            "inflight": chosen.runtime.inflight,
            "weight": chosen.config.weight,
            "priority": chosen.config.priority,
            "eligible": len(eligible),
        }
        if isinstance(policy, EwmaLatency):
            decision.signals["ewma_latency_ms"] = policy.latency(chosen.name) * 1000
        return chosen, decision

    def explain(self, req: CanonicalRequestEnvelope) -> tuple[RegisteredInstance | None, Decision]:
        """What `route` would pick and why, without changing any state."""
        self._check_names(req)
        return self._decide(req, (), dry_run=True)

    def route(
        self, req: CanonicalRequestEnvelope, exclude: Collection[str] = ()
    ) -> tuple[RegisteredInstance, Decision]:
        """Pick an instance (not in `exclude`) or raise CanonicalFailure with the explanation."""
        self._check_names(req)
        chosen, decision = self._decide(req, exclude, dry_run=False)
        if chosen is None:
            error = self.no_candidate_error(req, decision)
            self.metrics.no_candidate.inc(req.operation, error.code)
            raise CanonicalFailure(error)
        return chosen, decision

    def admit(self, req: CanonicalRequestEnvelope) -> None:
        """Per-key rate limit and budget, checked before any routing or backend call."""
        key = req.meta.client_key_id
        now = self._clock()
        for error in (self.budgets.check(key, now), self.key_limiter.check(key, now)):
            if error is not None:
                self._refuse(req, error)

    def _refuse(self, req: CanonicalRequestEnvelope, error: CanonicalError) -> NoReturn:
        """Raise `error` (a key over its rate or budget) for `req`, counted."""
        error.operation = req.operation
        self.metrics.rate_limited.inc(req.operation, "")
        raise CanonicalFailure(error)

    async def admit_shared(self, req: CanonicalRequestEnvelope) -> None:
        """`admit`, counted across the cluster's nodes when there is one (else this node's)."""
        shared, key = self.shared, req.meta.client_key_id
        if shared is None or key is None:
            return self.admit(req)
        try:
            error = await self._shared_error(shared, key)
        except SharedUnavailable:
            return self.admit(req)  # Redis is away: this node counts alone meanwhile
        if error is not None:
            self._refuse(req, error)

    async def _shared_error(self, shared: SharedCounters, key: str) -> CanonicalError | None:
        budget = self.budgets.config
        if budget.amount is not None:
            spent, retry = await shared.spent(key, budget.window_s)
            if spent >= budget.amount:
                return budget_error(spent, budget.amount, budget.window_s, retry)
        limiter = self.key_limiter
        if limiter.rate_per_s is not None:
            burst = limiter.burst if limiter.burst is not None else max(1.0, limiter.rate_per_s)
            wait = await shared.take_token(key, limiter.rate_per_s, burst)
            if wait is not None:
                return rate_error(limiter.rate_per_s, wait)
        return None

    def charge(
        self, req: CanonicalRequestEnvelope, instance: RegisteredInstance, usage: Usage
    ) -> float:
        """Spend `usage` at `instance`'s prices against the request's client key."""
        amount = cost(instance.config.price, usage)
        self.budgets.charge(req.meta.client_key_id, amount, self._clock())
        return amount

    async def charge_shared(
        self, req: CanonicalRequestEnvelope, instance: RegisteredInstance, usage: Usage
    ) -> float:
        """`charge`, and across the cluster's nodes when there is one."""
        amount = self.charge(req, instance, usage)
        shared, key = self.shared, req.meta.client_key_id
        if shared is not None and key is not None and amount > 0:
            try:
                await shared.spend(key, amount, self.budgets.config.window_s)
            except SharedUnavailable:
                pass  # counted locally above
        return amount

    def apply_ejections(self, ejections: dict[tuple[str, str], float]) -> None:
        """Ejections in force on other nodes ((kind, instance) -> seconds left): avoid them."""
        now = self._clock()
        for (kind, name), left in ejections.items():
            instance = self.registry.instances.get(name)
            if instance is None or left <= 0:
                continue
            if kind == "breaker":
                instance.runtime.breaker.open_remotely(now + left, now)
            elif kind == "outlier":
                until = self.outliers.ejected_until.get(name, 0.0)
                self.outliers.ejected_until[name] = max(until, now + left)

    # --- attempts -----------------------------------------------------------------------------

    async def attempt(
        self,
        instance: RegisteredInstance,
        call: Callable[[RegisteredInstance], Awaitable[T]],
        operation: Operation,
    ) -> T:
        """Run `call` on `instance`, recording in-flight, health, latency and metrics."""
        runtime = instance.runtime
        op = str(operation)
        start = self._clock()
        runtime.breaker.on_start(start)
        if runtime.bucket is not None:
            runtime.bucket.take(start)
        runtime.inflight += 1
        runtime.total_requests += 1
        runtime.interval_requests += 1
        self.metrics.requests.inc(op, instance.name)
        try:
            result = await call(instance)
        except anyio.get_cancelled_exc_class():
            runtime.breaker.on_cancel()  # a hedge loser: neither success nor failure
            raise
        except BaseException as exc:
            self._record_failure(instance, op, exc)
            raise
        finally:
            runtime.inflight -= 1
        end = self._clock()
        runtime.breaker.on_result(True, end)
        self.metrics.latency.observe(end - start, op, instance.name)
        for policy in self._policies.values():
            if isinstance(policy, EwmaLatency):
                policy.observe(instance.name, end - start, end)
        return result

    def connection_failed(self, name: str, operation: Operation, exc: BaseException) -> None:
        """A long-lived connection to instance `name` failed (breaker and metrics feedback)."""
        instance = self.registry.instances.get(name)
        if instance is not None:
            self._record_failure(instance, str(operation), exc)

    def _record_failure(self, instance: RegisteredInstance, op: str, exc: BaseException) -> None:
        now = self._clock()
        runtime = instance.runtime
        counts_against = isinstance(exc, (BackendFailure, TimeoutError, OSError))
        if counts_against:
            breaker = runtime.breaker
            was_open = breaker.state is BreakerState.OPEN
            breaker.on_result(False, now)
            runtime.interval_failures += 1
            if not was_open and breaker.state is BreakerState.OPEN and self.on_ejection:
                self.on_ejection("breaker", instance.name, breaker.open_until - now)
        else:
            runtime.breaker.on_cancel()  # the caller's mistake says nothing about the instance
        if isinstance(exc, TimeoutError):
            self.metrics.timeouts.inc(op, instance.name)
        elif isinstance(exc, BackendFailure) and exc.status == 429:
            self.metrics.rate_limited.inc(op, instance.name)
        self.metrics.errors.inc(op, instance.name)

    def _evaluate_outliers(self, now: float) -> None:
        if now < self._outlier_due:
            return
        self._outlier_due = now + self.registry.config.health.outlier_interval_s
        stats = []
        for inst in self.registry.instances.values():
            rt = inst.runtime
            stats.append((inst.name, rt.interval_requests, rt.interval_failures))
            rt.interval_requests = rt.interval_failures = 0
        for name in self.outliers.evaluate(stats, now):
            if self.on_ejection is not None:
                self.on_ejection("outlier", name, self.outliers.ejected_until[name] - now)

    def count_fallback(self, operation: Operation) -> None:
        """A retry went to another instance."""
        self.metrics.fallbacks.inc(operation)

    def count_hedge(self, operation: Operation) -> None:
        """A hedged extra attempt started."""
        self.metrics.hedges.inc(operation)

    def count_mirror(self, operation: Operation) -> None:
        """A mirrored copy was sent."""
        self.metrics.mirrors.inc(operation)

    # --- errors -------------------------------------------------------------------------------

    def _check_names(self, req: CanonicalRequestEnvelope) -> None:
        """A pinned backend or model that does not exist is the caller's mistake: say what does."""
        registry = self.registry
        pinned = req.routing.backend
        if pinned is not None and pinned not in registry.instances:
            names = ", ".join(sorted(registry.instances)) or "none"
            raise CanonicalFailure.of(
                ErrorCode.INVALID_REQUEST,
                f"unknown backend {echo(pinned)}; configured backends: {names}",
                operation=req.operation,
            )
        model = req.routing.model
        serving = registry.serving(req.operation)
        if model is not None and serving and all(i.model is not None for i in serving):
            models = sorted({i.model for i in serving if i.model is not None})
            if model not in models:
                raise CanonicalFailure.of(
                    ErrorCode.INVALID_REQUEST,
                    f"unknown model {echo(model)} for {req.operation}; "
                    f"available: {', '.join(models)}",
                    operation=req.operation,
                )

    def _next_recovery(self, operation: Operation) -> float:
        """Seconds until the first unhealthy instance for `operation` may be tried again."""
        now = self._clock()
        waits = [
            max(i.runtime.breaker.open_until - now, 0.0)
            for i in self.registry.serving(operation)
            if i.runtime.breaker.state is BreakerState.OPEN
        ]
        waits += [
            max(until - now, 0.0)
            for name, until in self.outliers.ejected_until.items()
            if name in {i.name for i in self.registry.serving(operation)}
        ]
        return max(min(waits), 0.1) if waits else CAPACITY_RETRY_AFTER_S

    def no_candidate_error(
        self, req: CanonicalRequestEnvelope, decision: Decision
    ) -> CanonicalError:
        """The canonical error (with the explanation) for a request no instance can take."""
        reasons = decision.rejected_reasons
        required = {
            "operation": str(req.operation),
            "features": sorted(req.requirements.required_features),
            "transports": sorted(req.requirements.required_transports),
        }
        error = CanonicalError(
            ErrorCode.NO_CANDIDATE_BACKEND,
            f"no backend instance can serve {req.operation}",
            operation=req.operation,
            required=required,
            candidates_checked=decision.candidates_checked,
            rejected_reasons=reasons,
        )
        if not reasons:
            error.message = f"no configured backend serves {req.operation}"
        elif all(r.startswith(CAPABILITY) for r in reasons.values()):
            error.code = ErrorCode.MISSING_CAPABILITIES
            error.message = f"no backend instance for {req.operation} has the required capabilities"
        elif any(r.startswith(CAPACITY) for r in reasons.values()):
            error.message = f"every backend instance for {req.operation} is at capacity"
            error.retryable = True
            error.retry_after_s = CAPACITY_RETRY_AFTER_S
        elif any(r.startswith(UNHEALTHY) for r in reasons.values()):
            error.message = f"every backend instance for {req.operation} is unhealthy"
            error.retryable = True
            error.retry_after_s = self._next_recovery(req.operation)
        return error
