"""Hard filtering of instances for a request, with a reason for every rejected instance.

Host config is authoritative: request allow/deny lists and backend pins only ever narrow
the set the host configured. Reasons are short human strings; they appear in explanations
and errors and never contain a credential value.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from spear_rt.ir import CanonicalRequestEnvelope
from spear_rt.registry import RegisteredInstance
from spear_rt.router.health import BreakerState, OutlierDetector

# Reason prefixes: the router classifies an empty result by what rejected the instances.
CAPABILITY = "missing"
CAPACITY = "at capacity"
UNHEALTHY = "unhealthy"


def rejection(
    inst: RegisteredInstance,
    req: CanonicalRequestEnvelope,
    now: float = 0.0,
    excluded: Collection[str] = (),
    outliers: OutlierDetector | None = None,
) -> str | None:
    """Why `inst` cannot take `req` at `now`, or None when it can."""
    if inst.name in excluded:
        return "failed earlier in this request"
    routing = req.routing
    if routing.backend is not None and inst.name != routing.backend:
        return f"not the requested backend {routing.backend!r}"
    if routing.allowlist is not None and inst.name not in routing.allowlist:
        return "not in the request's allowlist"
    if inst.name in routing.denylist:
        return "in the request's denylist"
    if inst.unavailable is not None:
        return f"unavailable: {inst.unavailable}"
    if routing.model is not None and inst.model is not None and inst.model != routing.model:
        return f"serves model {inst.model!r}, not {routing.model!r}"
    needs = req.requirements
    missing_features = needs.required_features - inst.features
    if missing_features:
        return f"{CAPABILITY} features: {', '.join(sorted(missing_features))}"
    missing_transports = needs.required_transports - inst.transports
    if missing_transports:
        return f"{CAPABILITY} transports: {', '.join(sorted(missing_transports))}"
    runtime = inst.runtime
    breaker = runtime.breaker
    if not breaker.allows(now):
        if breaker.state is BreakerState.OPEN:
            return f"{UNHEALTHY}: circuit open for {breaker.open_until - now:.1f}s more"
        return f"{UNHEALTHY}: circuit half-open, probe in flight"
    if outliers is not None and outliers.is_ejected(inst.name, now):
        return f"{UNHEALTHY}: ejected as an outlier for {outliers.ejected_until[inst.name] - now:.1f}s more"
    cap = inst.limits.max_concurrency
    if cap is not None and runtime.inflight >= cap:
        return f"{CAPACITY}: {runtime.inflight} in flight, max_concurrency {cap}"
    bucket = runtime.bucket
    if bucket is not None and not bucket.available(now):
        return f"{CAPACITY}: rate limit {bucket.rate_per_s:g}/s, next slot in {bucket.retry_after(now):.3f}s"
    return None


def filter_candidates(
    instances: Sequence[RegisteredInstance],
    req: CanonicalRequestEnvelope,
    now: float = 0.0,
    excluded: Collection[str] = (),
    outliers: OutlierDetector | None = None,
) -> tuple[list[RegisteredInstance], dict[str, str]]:
    """Split `instances` into the eligible ones of the best priority tier and the rejected."""
    eligible: list[RegisteredInstance] = []
    rejected: dict[str, str] = {}
    for inst in instances:
        reason = rejection(inst, req, now, excluded, outliers)
        if reason is None:
            eligible.append(inst)
        else:
            rejected[inst.name] = reason
    if eligible:
        # Priority tiers: the best tier serves; lower tiers stand by (not an error).
        top = max(i.config.priority for i in eligible)
        for inst in eligible:
            if inst.config.priority < top:
                rejected[inst.name] = f"standby: priority {inst.config.priority} < {top}"
        eligible = [i for i in eligible if i.config.priority == top]
    return eligible, rejected
