"""Selection policies: given eligible candidates, pick one.

Policies keep their own small state (counters, RNG) and read instance runtime signals;
they never filter (that is `filter.py`'s job) and never perform I/O.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

from spear_rt.errors import ConfigError
from spear_rt.ir import CanonicalRequestEnvelope
from spear_rt.registry import RegisteredInstance


class Policy(Protocol):
    """Selects one instance from a non-empty candidate list."""

    name: str

    def select(
        self, candidates: Sequence[RegisteredInstance], req: CanonicalRequestEnvelope
    ) -> RegisteredInstance:
        """Pick one of `candidates` (never empty)."""
        ...


def _load(inst: RegisteredInstance) -> float:
    return inst.runtime.inflight / inst.config.weight


class LeastInflight:
    """Power of two choices over inflight/weight: sample two, keep the less loaded."""

    name = "least_inflight"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def select(
        self, candidates: Sequence[RegisteredInstance], req: CanonicalRequestEnvelope
    ) -> RegisteredInstance:
        """Two distinct random candidates; the one with the lower inflight/weight wins."""
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(range(len(candidates)), 2)
        first, second = candidates[a], candidates[b]
        return second if _load(second) < _load(first) else first


POLICIES = {"least_inflight": LeastInflight}


def make_policy(name: str, rng: random.Random | None = None) -> Policy:
    """Instantiate a policy by its config name."""
    try:
        factory = POLICIES[name]
    except KeyError:
        known = ", ".join(sorted(POLICIES))
        raise ConfigError("policy", f"unknown policy {name!r}; known: {known}") from None
    return factory(rng)
