"""The router: filter, then select with a policy, and explain every decision."""

from __future__ import annotations

import random
from collections.abc import Callable

import anyio
import msgspec

from spear_rt.errors import CanonicalFailure, ConfigError
from spear_rt.ir import CanonicalError, CanonicalRequestEnvelope, ErrorCode, Operation
from spear_rt.registry import BackendRegistry, RegisteredInstance
from spear_rt.router.filter import CAPABILITY, CAPACITY, filter_candidates
from spear_rt.router.policies import Policy, make_policy

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
    """Routes canonical requests over one registry; swap `registry` to reload."""

    def __init__(
        self,
        registry: BackendRegistry,
        rng: random.Random | None = None,
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        self._rng = rng
        self._clock = clock
        self.registry = registry
        self._policies: dict[str, Policy] = {}
        policy_config = registry.config.policy
        for name in {policy_config.default, *policy_config.by_operation.values()}:
            self._policy(name)

    def _policy(self, name: str) -> Policy:
        policy = self._policies.get(name)
        if policy is None:
            policy = self._policies[name] = make_policy(name, self._rng)
        return policy

    def policy_name(self, req: CanonicalRequestEnvelope) -> str:
        """The policy for a request: its own (if allowed) or the operation's default."""
        config = self.registry.config.policy
        return req.policy or config.by_operation.get(req.operation, config.default)

    def explain(self, req: CanonicalRequestEnvelope) -> tuple[RegisteredInstance | None, Decision]:
        """Route without side effects: the instance that would serve, and why."""
        try:
            policy = self._policy(self.policy_name(req))
        except ConfigError as exc:
            raise CanonicalFailure.of(ErrorCode.INVALID_REQUEST, exc.reason) from None
        instances = self.registry.serving(req.operation)
        eligible, rejected = filter_candidates(instances, req)
        decision = Decision(req.operation, policy.name, len(instances), rejected)
        if not eligible:
            return None, decision
        chosen = policy.select(eligible, req, self._clock())
        decision.selected = chosen.name
        decision.signals = {"inflight": chosen.runtime.inflight, "weight": chosen.config.weight}
        return chosen, decision

    def route(self, req: CanonicalRequestEnvelope) -> tuple[RegisteredInstance, Decision]:
        """Pick an instance or raise CanonicalFailure carrying the explanation."""
        self._check_names(req)
        chosen, decision = self.explain(req)
        if chosen is None:
            raise CanonicalFailure(self._no_candidate(req, decision))
        return chosen, decision

    def _check_names(self, req: CanonicalRequestEnvelope) -> None:
        """A pinned backend or model that does not exist is the caller's mistake: say what does."""
        registry = self.registry
        pinned = req.routing.backend
        if pinned is not None and pinned not in registry.instances:
            names = ", ".join(sorted(registry.instances)) or "none"
            raise CanonicalFailure.of(
                ErrorCode.INVALID_REQUEST,
                f"unknown backend {pinned!r}; configured backends: {names}",
                operation=req.operation,
            )
        model = req.routing.model
        serving = registry.serving(req.operation)
        if model is not None and serving and all(i.model is not None for i in serving):
            models = sorted({i.model for i in serving if i.model is not None})
            if model not in models:
                raise CanonicalFailure.of(
                    ErrorCode.INVALID_REQUEST,
                    f"unknown model {model!r} for {req.operation}; available: {', '.join(models)}",
                    operation=req.operation,
                )

    def _no_candidate(self, req: CanonicalRequestEnvelope, decision: Decision) -> CanonicalError:
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
        return error
