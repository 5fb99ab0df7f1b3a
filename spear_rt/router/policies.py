"""Selection policies: given eligible candidates, pick one.

Policies keep their own small state (counters, RNG, latency averages) and read instance
runtime signals; they never filter (that is `filter.py`'s job), never perform I/O and never
read a clock: time comes in as `now`. Each has a provable property, tested in
tests/router/test_policies.py:

* round_robin: over len(candidates) picks, each candidate once;
* weighted_round_robin (smooth, nginx): over sum(weights) picks, each instance exactly
  `weight` times, interleaved (no instance twice in a row unless its weight forces it);
* weighted_random: picks in proportion to weight in expectation;
* least_inflight: power of two choices; never picks the more loaded of the two sampled;
* ewma_latency: peak EWMA of latency × (inflight + 1), P2C over that cost;
* consistent_hash: a key maps to the same instance while it stays eligible; adding or
  removing one of N instances moves about 1/N of the keys;
* lowest_cost: the cheapest candidate for the operation by declared price;
* priority_fallback: the filter already keeps only the best priority tier; within it, smooth
  WRR; on failure the executor excludes the instance and routes again (next tier).

Speed: the router's filter hands out the same candidate *tuple* for every request of a shape
while nothing is rejected at decision time. Policies whose selection is O(n) in Python keep
what they derive from such a tuple (weights, running scores, the ring, the cheapest set)
until a different sequence comes; lists always take the plain path. Both paths pick the
same instances (tests/router/test_policies.py checks it), so this is only about time.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import itertools
import math
import operator
import random
from collections.abc import Sequence
from typing import Any, Protocol

from spear_rt.errors import ConfigError
from spear_rt.ir import CanonicalRequestEnvelope, Operation
from spear_rt.registry import RegisteredInstance


class Policy(Protocol):
    """Selects one instance from a non-empty candidate list."""

    name: str

    def select(
        self, candidates: Sequence[RegisteredInstance], req: CanonicalRequestEnvelope, now: float
    ) -> RegisteredInstance:
        """Pick one of `candidates` (never empty)."""
        ...


def _load(inst: RegisteredInstance) -> float:
    return inst.runtime.inflight / inst.config.weight


class RoundRobin:
    """Each candidate in turn."""

    name = "round_robin"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._next = 0

    def select(
        self, candidates: Sequence[RegisteredInstance], req: CanonicalRequestEnvelope, now: float
    ) -> RegisteredInstance:
        """The next candidate in order."""
        chosen = candidates[self._next % len(candidates)]
        self._next += 1
        return chosen


class WeightedRoundRobin:
    """Smooth weighted round robin (nginx): exact proportions per cycle, interleaved."""

    name = "weighted_round_robin"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._current: dict[str, int] = {}
        # While the same candidate tuple keeps coming, its scores live here, aligned with it.
        self._aligned: tuple[RegisteredInstance, ...] | None = None
        self._scores: list[int] = []
        self._weights: list[int] = []
        self._total = 0

    def _flush(self) -> None:
        if self._aligned is not None:
            self._current.update(zip([i.name for i in self._aligned], self._scores, strict=True))
            self._aligned = None

    def __deepcopy__(self, memo: dict[int, Any]) -> WeightedRoundRobin:
        clone = copy.copy(self)
        clone._current = dict(self._current)
        clone._scores = list(self._scores)
        return clone

    def select(
        self, candidates: Sequence[RegisteredInstance], req: CanonicalRequestEnvelope, now: float
    ) -> RegisteredInstance:
        """Add each weight to its running score, pick the highest, subtract the total."""
        if isinstance(candidates, tuple):
            if candidates is not self._aligned:
                self._flush()
                self._weights = [i.config.weight for i in candidates]
                self._scores = [self._current.get(i.name, 0) for i in candidates]
                self._total = sum(self._weights)
                self._aligned = candidates
            scores = list(map(operator.add, self._scores, self._weights))
            best_index = scores.index(max(scores))  # the first of equals, as below
            scores[best_index] -= self._total
            self._scores = scores
            chosen: RegisteredInstance = candidates[best_index]
            return chosen
        self._flush()
        current = self._current
        total = 0
        best: RegisteredInstance | None = None
        best_score = 0
        for inst in candidates:
            weight = inst.config.weight
            score = current.get(inst.name, 0) + weight
            current[inst.name] = score
            total += weight
            if best is None or score > best_score:
                best, best_score = inst, score
        assert best is not None
        current[best.name] = best_score - total
        return best


class WeightedRandom:
    """Random in proportion to weight."""

    name = "weighted_random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._for: tuple[RegisteredInstance, ...] | None = None
        self._cum_weights: list[int] = []

    def __deepcopy__(self, memo: dict[int, Any]) -> WeightedRandom:
        clone = copy.copy(self)
        clone._rng = copy.deepcopy(self._rng, memo)
        return clone

    def select(
        self, candidates: Sequence[RegisteredInstance], req: CanonicalRequestEnvelope, now: float
    ) -> RegisteredInstance:
        """One weighted draw."""
        if isinstance(candidates, tuple):
            if candidates is not self._for:
                self._cum_weights = list(itertools.accumulate(i.config.weight for i in candidates))
                self._for = candidates
            # What choices(weights=...) computes first, so the same draw.
            drawn: list[RegisteredInstance] = self._rng.choices(
                candidates, cum_weights=self._cum_weights
            )
            return drawn[0]
        return self._rng.choices(candidates, weights=[i.config.weight for i in candidates])[0]


def _two(rng: random.Random, n: int) -> tuple[int, int]:
    a = rng.randrange(n)
    b = rng.randrange(n - 1)
    return a, b + 1 if b >= a else b


class LeastInflight:
    """Power of two choices over inflight/weight: sample two, keep the less loaded."""

    name = "least_inflight"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def select(
        self, candidates: Sequence[RegisteredInstance], req: CanonicalRequestEnvelope, now: float
    ) -> RegisteredInstance:
        """Two distinct random candidates; the one with the lower inflight/weight wins."""
        if len(candidates) == 1:
            return candidates[0]
        a, b = _two(self._rng, len(candidates))
        first, second = candidates[a], candidates[b]
        return second if _load(second) < _load(first) else first


class EwmaLatency:
    """Peak EWMA latency × (inflight + 1), chosen by power of two choices.

    A slower answer than the average replaces it at once (peak); faster answers pull it down
    with weight 1 - exp(-dt/tau), so the average decays with time, not with request count.
    Instances never observed cost `default_s` so new instances get tried.
    """

    name = "ewma_latency"

    def __init__(
        self, rng: random.Random | None = None, tau_s: float = 10.0, default_s: float = 0.1
    ) -> None:
        self._rng = rng or random.Random()
        self.tau_s = tau_s
        self.default_s = default_s
        self._ewma: dict[str, tuple[float, float]] = {}  # name -> (ewma seconds, stamp)

    def observe(self, name: str, latency_s: float, now: float) -> None:
        """Fold one observed latency into `name`'s average."""
        prev = self._ewma.get(name)
        if prev is None or latency_s > prev[0]:
            self._ewma[name] = (latency_s, now)
            return
        ewma, stamp = prev
        w = math.exp(-max(now - stamp, 0.0) / self.tau_s)
        self._ewma[name] = (ewma * w + latency_s * (1 - w), now)

    def latency(self, name: str) -> float:
        """The current average for `name` (default when unobserved)."""
        entry = self._ewma.get(name)
        return self.default_s if entry is None else entry[0]

    def cost(self, inst: RegisteredInstance) -> float:
        """Expected wait if this request went to `inst`."""
        return self.latency(inst.name) * (inst.runtime.inflight + 1)

    def select(
        self, candidates: Sequence[RegisteredInstance], req: CanonicalRequestEnvelope, now: float
    ) -> RegisteredInstance:
        """P2C over cost."""
        if len(candidates) == 1:
            return candidates[0]
        a, b = _two(self._rng, len(candidates))
        first, second = candidates[a], candidates[b]
        return second if self.cost(second) < self.cost(first) else first


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class ConsistentHash:
    """A hash ring with virtual nodes over the eligible instances (cached per set).

    On a ring, removing an instance moves only the keys it owned (to their clockwise
    successor) and adding one takes only the keys it now owns, so a briefly unhealthy
    instance moves its own keys and gets them back when it returns.
    """

    name = "consistent_hash"
    VNODES = 100

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rings: dict[tuple[str, ...], tuple[list[int], list[str]]] = {}
        self._for: tuple[RegisteredInstance, ...] | None = None
        self._by_name: dict[str, RegisteredInstance] = {}
        self._hashes: list[int] = []
        self._owners: list[str] = []

    def __deepcopy__(self, memo: dict[int, Any]) -> ConsistentHash:
        return self  # only caches: selecting changes nothing

    def _ring(self, names: tuple[str, ...]) -> tuple[list[int], list[str]]:
        ring = self._rings.get(names)
        if ring is None:
            points = sorted(
                (_hash64(f"{name}#{i}".encode()), name)
                for name in names
                for i in range(self.VNODES)
            )
            ring = ([p for p, _ in points], [n for _, n in points])
            if len(self._rings) > 16:
                self._rings.clear()
            self._rings[names] = ring
        return ring

    def select_key(self, key: str, names: tuple[str, ...]) -> str:
        """The instance name `key` maps to on the ring of `names` (non-empty)."""
        hashes, owners = self._ring(names)
        i = bisect.bisect(hashes, _hash64(key.encode()))
        return owners[i % len(owners)]

    def select(
        self, candidates: Sequence[RegisteredInstance], req: CanonicalRequestEnvelope, now: float
    ) -> RegisteredInstance:
        """The instance owning the request's key (hash_key, else task_id, else request_id)."""
        key = req.routing.hash_key or req.task_id or req.request_id
        if isinstance(candidates, tuple):
            if candidates is not self._for:
                self._by_name = {i.name: i for i in candidates}
                self._hashes, self._owners = self._ring(tuple(sorted(self._by_name)))
                self._for = candidates
            i = bisect.bisect(self._hashes, _hash64(key.encode()))  # as select_key
            return self._by_name[self._owners[i % len(self._owners)]]
        by_name = {i.name: i for i in candidates}
        return by_name[self.select_key(key, tuple(sorted(by_name)))]


def unit_price(inst: RegisteredInstance, operation: Operation) -> float:
    """The instance's declared price for one typical unit of `operation` (inf if undeclared)."""
    price = inst.config.price
    if price is None:
        return math.inf
    parts: tuple[float | None, ...]
    match operation:
        case Operation.CHAT_COMPLETIONS | Operation.EMBEDDINGS | Operation.TEXT_TO_SPEECH:
            parts = (price.per_1k_input_tokens, price.per_1k_output_tokens)
        case Operation.SPEECH_TO_TEXT:
            parts = (price.per_audio_second,)
        case Operation.IMAGE_GENERATION:
            parts = (price.per_image,)
        case Operation.REALTIME_VOICE:
            parts = (price.per_session_minute,)
    declared = [p for p in parts if p is not None]
    # A price declared for other operations only is no price for this one (not "free").
    return sum(declared) if declared else math.inf


class LowestCost:
    """The cheapest candidate for the operation; ties go round robin among the cheapest."""

    name = "lowest_cost"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._tie = RoundRobin()
        self._for: tuple[RegisteredInstance, ...] | None = None
        self._cheapest: dict[Operation, list[RegisteredInstance]] = {}

    def __deepcopy__(self, memo: dict[int, Any]) -> LowestCost:
        clone = copy.copy(self)
        clone._tie = copy.copy(self._tie)
        return clone

    @staticmethod
    def cheapest(
        candidates: Sequence[RegisteredInstance], operation: Operation
    ) -> list[RegisteredInstance]:
        """The candidates sharing the minimum declared unit price, in order."""
        prices = [unit_price(i, operation) for i in candidates]
        best = min(prices)
        return [i for i, p in zip(candidates, prices, strict=True) if p == best]

    def select(
        self, candidates: Sequence[RegisteredInstance], req: CanonicalRequestEnvelope, now: float
    ) -> RegisteredInstance:
        """Minimum declared unit price."""
        if isinstance(candidates, tuple):
            if candidates is not self._for:
                self._cheapest = {}
                self._for = candidates
            cheapest = self._cheapest.get(req.operation)
            if cheapest is None:
                cheapest = self._cheapest[req.operation] = self.cheapest(candidates, req.operation)
        else:
            cheapest = self.cheapest(candidates, req.operation)
        return self._tie.select(cheapest, req, now)


class PriorityFallback(WeightedRoundRobin):
    """Best priority tier first (the filter's tiers); smooth WRR within the tier."""

    name = "priority_fallback"


POLICIES: dict[str, type] = {
    cls.name: cls
    for cls in (
        RoundRobin,
        WeightedRoundRobin,
        WeightedRandom,
        LeastInflight,
        EwmaLatency,
        ConsistentHash,
        LowestCost,
        PriorityFallback,
    )
}

DEFAULT_BY_OPERATION = {
    Operation.CHAT_COMPLETIONS: "ewma_latency",
    Operation.EMBEDDINGS: "weighted_round_robin",
    Operation.IMAGE_GENERATION: "priority_fallback",
    Operation.SPEECH_TO_TEXT: "least_inflight",
    Operation.TEXT_TO_SPEECH: "weighted_round_robin",
    Operation.REALTIME_VOICE: "least_inflight",
}


def make_policy(name: str, rng: random.Random | None = None) -> Policy:
    """Instantiate a policy by its config name."""
    try:
        factory = POLICIES[name]
    except KeyError:
        known = ", ".join(sorted(POLICIES))
        raise ConfigError("policy", f"unknown policy {name!r}; known: {known}") from None
    policy: Policy = factory(rng)
    return policy
