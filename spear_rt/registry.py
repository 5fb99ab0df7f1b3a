"""BackendRegistry and CapabilityIndex: configured instances, their capabilities and state.

Kinds are loaded by entry point (group ``spear_rt.backends``) only when configured, so a kind
whose extra is not installed is never imported. An instance that cannot serve (engine missing,
credential env var unset) is still registered, with the reason, so discovery can show it.
A registry is immutable once built; a reload builds a new one and swaps it atomically, while
the per-instance runtime state (in-flight counts) of unchanged instances carries over.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from importlib.metadata import entry_points

from spear_rt.backend import BackendKind, InstanceInfo, Secret
from spear_rt.config import BackendConfig, BreakerConfig, Config
from spear_rt.errors import ConfigError
from spear_rt.ir import Feature, Hosting, Limits, Operation, Transport
from spear_rt.router.health import CircuitBreaker
from spear_rt.router.limits import TokenBucket

ENTRY_POINT_GROUP = "spear_rt.backends"

KindLoader = Callable[[str], BackendKind]


class KindUnavailable(Exception):
    """A configured kind exists but cannot be imported (its extra is not installed)."""


def available_kinds() -> list[str]:
    """Names of every backend kind installed under the entry-point group."""
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def load_kind(name: str) -> BackendKind:
    """Import one backend kind by entry-point name."""
    matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not matches:
        known = ", ".join(available_kinds()) or "none installed"
        raise ConfigError("kind", f"unknown backend kind {name!r}; installed kinds: {known}")
    try:
        kind: BackendKind = matches[0].load()
    except ImportError as exc:
        raise KindUnavailable(f"kind {name!r} could not be imported: {exc}") from None
    return kind


class InstanceRuntime:
    """Mutable per-instance signals the router reads (shared across reloads by name)."""

    __slots__ = (
        "breaker",
        "bucket",
        "inflight",
        "interval_failures",
        "interval_requests",
        "total_requests",
    )

    def __init__(self, breaker: BreakerConfig | None = None) -> None:
        self.inflight = 0
        self.total_requests = 0
        self.breaker = CircuitBreaker(breaker or BreakerConfig())
        self.bucket: TokenBucket | None = None
        self.interval_requests = 0  # for outlier ejection, reset each evaluation
        self.interval_failures = 0

    def set_rate(self, limits: Limits) -> None:
        """(Re)build the token bucket when the configured rate changed."""
        rate = limits.rate_per_s
        if rate is None:
            self.bucket = None
        elif (
            self.bucket is None
            or self.bucket.rate_per_s != rate
            or self.bucket.burst != (limits.burst or max(1.0, rate))
        ):
            self.bucket = TokenBucket(rate, limits.burst)


class RegisteredInstance:
    """One configured instance with its resolved capabilities and availability."""

    __slots__ = (
        "config",
        "features",
        "hosting",
        "info",
        "kind",
        "limits",
        "name",
        "ops",
        "runtime",
        "transports",
        "unavailable",
    )

    def __init__(
        self,
        config: BackendConfig,
        kind: BackendKind | None,
        info: InstanceInfo,
        unavailable: str | None,
        runtime: InstanceRuntime,
    ) -> None:
        self.config = config
        self.name = config.name
        self.kind = kind
        self.info = info
        self.unavailable = unavailable
        self.runtime = runtime
        defaults = kind.defaults if kind is not None else None
        self.ops: frozenset[Operation] = frozenset(
            config.ops if config.ops is not None else (defaults.ops if defaults else ())
        )
        self.features: frozenset[Feature] = frozenset(
            config.features
            if config.features is not None
            else (defaults.features if defaults else ())
        )
        self.transports: frozenset[Transport] = frozenset(
            config.transports
            if config.transports is not None
            else (defaults.transports if defaults else ())
        )
        self.hosting: Hosting = config.hosting or (defaults.hosting if defaults else Hosting.REMOTE)
        self.limits: Limits = config.limits or (defaults.limits if defaults else Limits())

    @property
    def model(self) -> str | None:
        """The model this instance serves, or None when it accepts any."""
        return self.config.model

    def describe(self) -> dict[str, object]:
        """Discovery view: capabilities, limits, state; the credential by name only."""
        return {
            "name": self.name,
            "kind": self.config.kind,
            "hosting": self.hosting,
            "model": self.model,
            "base_url": self.config.base_url,
            "credential_ref": self.config.credential_ref,
            "weight": self.config.weight,
            "priority": self.config.priority,
            "only_when_named": self.config.only_when_named,
            "ops": sorted(self.ops),
            "features": sorted(self.features),
            "transports": sorted(self.transports),
            "limits": self.limits,
            "available": self.unavailable is None,
            "unavailable_reason": self.unavailable,
            "inflight": self.runtime.inflight,
        }


class BackendRegistry:
    """All configured instances and the operation -> instances capability index."""

    def __init__(self, instances: list[RegisteredInstance], config: Config) -> None:
        self.config = config
        self.instances: dict[str, RegisteredInstance] = {i.name: i for i in instances}
        index: dict[Operation, list[RegisteredInstance]] = {}
        for inst in instances:
            for op in inst.ops:
                index.setdefault(op, []).append(inst)
        self.index: Mapping[Operation, tuple[RegisteredInstance, ...]] = {
            op: tuple(insts) for op, insts in index.items()
        }

    @classmethod
    def build(
        cls,
        config: Config,
        *,
        loader: KindLoader = load_kind,
        environ: Mapping[str, str] = os.environ,
        previous: BackendRegistry | None = None,
    ) -> BackendRegistry:
        """Resolve every configured instance; raises ConfigError for an unknown kind."""
        instances = []
        for i, backend in enumerate(config.backends):
            kind: BackendKind | None
            try:
                kind = loader(backend.kind)
                reason: str | None = None
            except ConfigError as exc:
                raise ConfigError(f"backends[{i}].kind", exc.reason) from None
            except KindUnavailable as exc:
                kind, reason = None, f"BackendNotEnabled: {exc}"
            api_key, key_reason = _resolve_key(config, backend, environ)
            info = InstanceInfo(
                name=backend.name,
                model=backend.model,
                base_url=backend.base_url,
                api_key=api_key,
                options=dict(backend.options),
            )
            if reason is None:
                reason = key_reason
            if reason is None and kind is not None:
                reason = kind.unavailable_reason(info)
            if previous is not None and backend.name in previous.instances:
                runtime = previous.instances[backend.name].runtime
            else:
                runtime = InstanceRuntime(config.health.breaker)
            registered = RegisteredInstance(backend, kind, info, reason, runtime)
            runtime.set_rate(registered.limits)
            instances.append(registered)
        return cls(instances, config)

    def serving(self, operation: Operation) -> tuple[RegisteredInstance, ...]:
        """Instances declaring `operation` (available or not)."""
        return self.index.get(operation, ())

    def capabilities(self) -> dict[str, dict[str, list[str]]]:
        """Operation -> features and transports offered by available instances."""
        out: dict[str, dict[str, list[str]]] = {}
        for op, insts in sorted(self.index.items()):
            live = [i for i in insts if i.unavailable is None]
            out[op] = {
                "instances": [i.name for i in live],
                "features": sorted({f for i in live for f in i.features}),
                "transports": sorted({t for i in live for t in i.transports}),
            }
        return out


def _resolve_key(
    config: Config, backend: BackendConfig, environ: Mapping[str, str]
) -> tuple[Secret | None, str | None]:
    """The instance's key from its credential's env var, or why it is missing."""
    if backend.credential_ref is None:
        return None, None
    env = config.credential_env(backend.credential_ref)
    value = environ.get(env or "")
    if not value:
        return None, f"credential {backend.credential_ref!r}: environment variable {env} is not set"
    return Secret(value), None


@contextmanager
def lease(instance: RegisteredInstance) -> Iterator[RegisteredInstance]:
    """Count a request or session as in flight on `instance` for the block's duration."""
    runtime = instance.runtime
    runtime.inflight += 1
    runtime.total_requests += 1
    try:
        yield instance
    finally:
        runtime.inflight -= 1
