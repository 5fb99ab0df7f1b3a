"""Hard filtering of instances for a request, with a reason for every rejected instance.

Host config is authoritative: request allow/deny lists and backend pins only ever narrow
the set the host configured. Reasons are short human strings; they appear in explanations
and errors and never contain a credential value.

`filter_candidates` is the rule, instance by instance. `CandidateFilter` gives the same
answer faster, for one registry: what depends only on the request's shape (pins, lists,
model, features, transports, availability) is worked out once per shape and cached, so a
decision only looks at the signals that move (breaker, ejection, in-flight, tokens).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from spear_rt.ir import CanonicalRequestEnvelope, RoutingHints
from spear_rt.registry import RegisteredInstance
from spear_rt.router.health import BreakerState, OutlierDetector

# Reason prefixes: the router classifies an empty result by what rejected the instances.
CAPABILITY = "missing"
CAPACITY = "at capacity"
UNHEALTHY = "unhealthy"
EXCLUDED = "failed earlier in this request"


def _names(routing: RoutingHints, inst: RegisteredInstance) -> bool:
    """Whether a request's routing hints name `inst` explicitly."""
    return (
        routing.backend == inst.name
        or (routing.allowlist is not None and inst.name in routing.allowlist)
        or (routing.model is not None and routing.model in (inst.name, inst.model))
    )


def model_named_instance(
    instances: Sequence[RegisteredInstance], req: CanonicalRequestEnvelope
) -> str | None:
    """The only-when-named instance a request's `model` names (`"model": "stub"`): asked for
    by name, it takes the request alone, not a real engine that answers any model name."""
    model = req.routing.model
    if model is None:
        return None
    found = any(i.name == model and i.config.only_when_named for i in instances)
    return model if found else None


def static_rejection(
    inst: RegisteredInstance, req: CanonicalRequestEnvelope, named: str | None = None
) -> str | None:
    """Why `inst` can never take a request shaped like `req` (under this registry), or None;
    `named`: the instance the request's model names (`model_named_instance`)."""
    routing = req.routing
    if routing.backend is not None and inst.name != routing.backend:
        return f"not the requested backend {routing.backend!r}"
    if named is not None and inst.name != named:
        return f"the model names instance {named!r}"
    if routing.allowlist is not None and inst.name not in routing.allowlist:
        return "not in the request's allowlist"
    if inst.name in routing.denylist:
        return "in the request's denylist"
    if inst.config.only_when_named and not _names(routing, inst):
        return (
            f"serves only requests that name it (header spear-backend: {inst.name}, "
            f"or model {inst.model or inst.name!r})"
        )
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
    return None


def dynamic_rejection(
    inst: RegisteredInstance, now: float, outliers: OutlierDetector | None = None
) -> str | None:
    """Why `inst` cannot take a request at `now` (health and limits), or None."""
    runtime = inst.runtime
    breaker = runtime.breaker
    if not breaker.allows(now):
        if breaker.state is BreakerState.OPEN:
            return f"{UNHEALTHY}: circuit open for {breaker.open_until - now:.1f}s more"
        return f"{UNHEALTHY}: circuit half-open, probe in flight"
    if outliers is not None and outliers.is_ejected(inst.name, now):
        left = outliers.ejected_until[inst.name] - now
        return f"{UNHEALTHY}: ejected as an outlier for {left:.1f}s more"
    cap = inst.limits.max_concurrency
    if cap is not None and runtime.inflight >= cap:
        return f"{CAPACITY}: {runtime.inflight} in flight, max_concurrency {cap}"
    bucket = runtime.bucket
    if bucket is not None and not bucket.available(now):
        wait = bucket.retry_after(now)
        return f"{CAPACITY}: rate limit {bucket.rate_per_s:g}/s, next slot in {wait:.3f}s"
    return None


def rejection(
    inst: RegisteredInstance,
    req: CanonicalRequestEnvelope,
    now: float = 0.0,
    excluded: Collection[str] = (),
    outliers: OutlierDetector | None = None,
    named: str | None = None,
) -> str | None:
    """Why `inst` cannot take `req` at `now`, or None when it can."""
    if inst.name in excluded:
        return EXCLUDED
    return static_rejection(inst, req, named) or dynamic_rejection(inst, now, outliers)


def _tiers(
    eligible: list[RegisteredInstance], rejected: dict[str, str]
) -> list[RegisteredInstance]:
    """Priority tiers: the best tier serves; lower tiers stand by (not an error)."""
    if not eligible:
        return eligible
    top = max(i.config.priority for i in eligible)
    for inst in eligible:
        if inst.config.priority < top:
            rejected[inst.name] = f"standby: priority {inst.config.priority} < {top}"
    return [i for i in eligible if i.config.priority == top]


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
    named = model_named_instance(instances, req)
    for inst in instances:
        reason = rejection(inst, req, now, excluded, outliers, named)
        if reason is None:
            eligible.append(inst)
        else:
            rejected[inst.name] = reason
    return _tiers(eligible, rejected), rejected


# Eligible instances and the standby reasons that go with them.
_Variant = tuple[tuple[RegisteredInstance, ...], dict[str, str]]


class _Shape:
    """The static filtering of one registry's instances for one request shape."""

    __slots__ = ("checks", "eligible", "instances", "position", "rejected", "static", "variants")

    def __init__(
        self, instances: Sequence[RegisteredInstance], req: CanonicalRequestEnvelope
    ) -> None:
        self.instances = instances
        self.position = {inst.name: n for n, inst in enumerate(instances)}
        named = model_named_instance(instances, req)
        rows = [(inst, static_rejection(inst, req, named)) for inst in instances]
        self.static = {inst.name: reason for inst, reason in rows if reason is not None}
        passing = [inst for inst, reason in rows if reason is None]
        # What each passing instance needs looked at per decision.
        self.checks = [(i, i.runtime, i.runtime.breaker, i.limits.max_concurrency) for i in passing]
        # The answer when no passing instance is rejected at decision time.
        self.rejected = dict(self.static)
        self.eligible = tuple(_tiers(passing, self.rejected))
        # Eligible tuple and standby reasons per set of instances rejected at decision time
        # (the eligible set depends on nothing else), so that a set that persists (one
        # instance at capacity for a while) also keeps its identity.
        self.variants: dict[tuple[str, ...], _Variant] = {}

    def variant(self, late: dict[str, str]) -> _Variant:
        """Eligible instances and standby reasons when the instances in `late` are out."""
        key = tuple(late)
        found = self.variants.get(key)
        if found is None:
            standby: dict[str, str] = {}
            remaining = [check[0] for check in self.checks if check[0].name not in late]
            if len(self.variants) >= 16:
                self.variants.clear()
            found = self.variants[key] = (tuple(_tiers(remaining, standby)), standby)
        return found


class CandidateFilter:
    """`filter_candidates` for one registry, with its static part cached per request shape.

    Same eligible instances (in order) and same reasons (in order) as `filter_candidates`,
    and the same calls into breakers, outlier detector and buckets wherever those could
    change anything. The eligible set comes back as a tuple that keeps its identity while
    the set does, so policies may cache what they derive from it.
    """

    MAX_SHAPES = 256

    def __init__(self) -> None:
        self._shapes: dict[tuple[object, ...], _Shape] = {}

    def _shape(
        self, instances: Sequence[RegisteredInstance], req: CanonicalRequestEnvelope
    ) -> _Shape | None:
        routing, needs = req.routing, req.requirements
        key = (
            req.operation,
            routing.backend,
            routing.allowlist,
            routing.denylist,
            routing.model,
            needs.required_features,
            needs.required_transports,
        )
        try:
            shape = self._shapes.get(key)
        except TypeError:  # unhashable lists in hand-built hints: no caching
            return None
        if shape is None or shape.instances is not instances:
            if len(self._shapes) >= self.MAX_SHAPES:
                self._shapes.clear()
            shape = self._shapes[key] = _Shape(instances, req)
        return shape

    def __call__(
        self,
        instances: Sequence[RegisteredInstance],
        req: CanonicalRequestEnvelope,
        now: float = 0.0,
        excluded: Collection[str] = (),
        outliers: OutlierDetector | None = None,
    ) -> tuple[Sequence[RegisteredInstance], dict[str, str]]:
        """Eligible instances of the best tier and the rejected ones, with reasons."""
        shape = self._shape(instances, req)
        if shape is None:
            return filter_candidates(instances, req, now, excluded, outliers)
        ejected = outliers.ejected_until if outliers is not None else None
        closed = BreakerState.CLOSED
        late: dict[str, str] = {}  # rejected at decision time, in instance order
        for inst, runtime, breaker, cap in shape.checks:
            # A closed breaker, room under the cap, a token at the last refill and no
            # ejection entry: dynamic_rejection would say None and change nothing.
            if (
                breaker.state is not closed
                or (cap is not None and runtime.inflight >= cap)
                or (runtime.bucket is not None and runtime.bucket.tokens < 1.0)
                or (ejected and inst.name in ejected)
                or (excluded and inst.name in excluded)
            ):
                if excluded and inst.name in excluded:
                    reason: str | None = EXCLUDED
                else:
                    reason = dynamic_rejection(inst, now, outliers)
                if reason is not None:
                    late[inst.name] = reason
        if not late and not excluded:
            return shape.eligible, dict(shape.rejected)
        static = shape.static
        if excluded:  # "failed earlier" comes before any other reason
            static = {name: EXCLUDED if name in excluded else r for name, r in static.items()}
        if not late:
            rejected = dict(static)
        elif not static:
            rejected = late
        else:  # both, in instance order
            position = shape.position
            both = [*static.items(), *late.items()]
            rejected = dict(sorted(both, key=lambda kv: position[kv[0]]))
        eligible, standby = shape.variant(late)
        rejected.update(standby)
        return eligible, rejected
