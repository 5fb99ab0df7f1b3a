"""Selection policies: each one's provable property, on the policy and through the router."""

from __future__ import annotations

import copy
import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spear_rt.errors import ConfigError
from spear_rt.ir import Operation
from spear_rt.registry import RegisteredInstance
from spear_rt.router.policies import (
    DEFAULT_BY_OPERATION,
    POLICIES,
    ConsistentHash,
    EwmaLatency,
    LeastInflight,
    LowestCost,
    RoundRobin,
    WeightedRandom,
    WeightedRoundRobin,
    _two,
    make_policy,
    unit_price,
)
from tests.router.support import CHAT, STT, FakeClock, backend, registry, request, router

REQ = request()


def fleet(weights: list[int], **fields: object) -> list[RegisteredInstance]:
    """Instances i0, i1, ... with the given weights, in that order."""
    reg = registry(*(backend(f"i{n}", weight=w, **fields) for n, w in enumerate(weights)))
    return list(reg.instances.values())


def picks(policy: object, candidates: list[RegisteredInstance], count: int) -> list[str]:
    return [policy.select(candidates, REQ, 0.0).name for _ in range(count)]  # type: ignore[attr-defined]


# --- round robin ---------------------------------------------------------------------------------


@given(n=st.integers(1, 9), cycles=st.integers(1, 4))
def test_round_robin_picks_each_candidate_once_per_cycle(n: int, cycles: int) -> None:
    """Over len(candidates) picks every candidate comes up exactly once, in order."""
    candidates = fleet([1] * n)
    got = picks(RoundRobin(), candidates, n * cycles)
    assert got == [c.name for c in candidates] * cycles


# --- smooth weighted round robin -----------------------------------------------------------------


@settings(max_examples=150)
@given(weights=st.lists(st.integers(1, 30), min_size=1, max_size=8), cycles=st.integers(1, 3))
def test_smooth_wrr_gives_exact_weights_per_cycle_and_interleaves(
    weights: list[int], cycles: int
) -> None:
    """Each cycle of sum(weights) picks holds every instance exactly `weight` times, and at
    every prefix each instance is less than one pick ahead of, and less than n-1 behind, its
    exact share t*w/W (plain WRR, which sends a weight's picks in a burst, breaks the first)."""
    candidates = fleet(weights)
    total, n = sum(weights), len(weights)
    got = picks(WeightedRoundRobin(), candidates, total * cycles)
    for k in range(cycles):
        cycle = Counter(got[k * total : (k + 1) * total])
        assert cycle == {f"i{i}": w for i, w in enumerate(weights)}
    seen: Counter[str] = Counter()
    for t, name in enumerate(got, 1):
        seen[name] += 1
        for i, w in enumerate(weights):
            lead = seen[f"i{i}"] - t * w / total
            assert -(n - 1) - 1e-9 <= lead < 1


def test_smooth_wrr_matches_the_nginx_example() -> None:
    """Weights 5, 1, 1 give a a b a c a a, cycle after cycle (nginx's documented sequence)."""
    a, b, c = fleet([5, 1, 1])
    mapping = {a.name: "a", b.name: "b", c.name: "c"}
    got = [mapping[n] for n in picks(WeightedRoundRobin(), [a, b, c], 14)]
    assert "".join(got) == "aabacaa" * 2


def test_smooth_wrr_resumes_an_instance_that_was_briefly_filtered_out() -> None:
    """Candidates that drop out and return keep their running score (no burst on return)."""
    a, b = fleet([1, 1])
    policy = WeightedRoundRobin()
    assert picks(policy, [a, b], 1) == ["i0"]
    assert picks(policy, [a], 3) == ["i0"] * 3
    assert picks(policy, [a, b], 2) == ["i1", "i0"]


# --- weighted random -----------------------------------------------------------------------------


def test_weighted_random_picks_in_proportion_to_weight() -> None:
    """30 000 seeded draws over weights 1, 2, 7 land within 1.5 points of 10/20/70 %."""
    candidates = fleet([1, 2, 7])
    counts = Counter(picks(WeightedRandom(random.Random(7)), candidates, 30_000))
    for name, share in (("i0", 0.1), ("i1", 0.2), ("i2", 0.7)):
        assert abs(counts[name] / 30_000 - share) < 0.015


def test_weighted_random_is_reproducible_from_its_seed() -> None:
    """The same seed gives the same sequence (decisions can be replayed)."""
    candidates = fleet([1, 2, 7])
    first = picks(WeightedRandom(random.Random(3)), candidates, 50)
    assert picks(WeightedRandom(random.Random(3)), candidates, 50) == first


# --- power of two choices ------------------------------------------------------------------------


@given(n=st.integers(2, 50), seed=st.integers(0, 2**32 - 1))
def test_p2c_samples_two_distinct_candidates(n: int, seed: int) -> None:
    """The sampler always returns two different indices within range."""
    rng = random.Random(seed)
    for _ in range(20):
        a, b = _two(rng, n)
        assert a != b and 0 <= a < n and 0 <= b < n


@settings(max_examples=100)
@given(
    loads=st.lists(st.tuples(st.integers(0, 12), st.integers(1, 4)), min_size=1, max_size=8),
    seed=st.integers(0, 2**32 - 1),
)
def test_least_inflight_never_picks_the_more_loaded_of_its_two_samples(
    loads: list[tuple[int, int]], seed: int
) -> None:
    """Replaying the policy's RNG gives its two samples; the pick is the one with the lower
    inflight/weight (the first sampled on a tie), never the more loaded one."""
    candidates = fleet([w for _, w in loads])
    for inst, (inflight, _) in zip(candidates, loads, strict=True):
        inst.runtime.inflight = inflight
    policy, replay = LeastInflight(random.Random(seed)), random.Random(seed)
    for _ in range(30):
        chosen = policy.select(candidates, REQ, 0.0)
        if len(candidates) == 1:
            assert chosen is candidates[0]
            continue
        a, b = _two(replay, len(candidates))
        load_a, load_b = (
            c.runtime.inflight / c.config.weight for c in (candidates[a], candidates[b])
        )
        assert chosen is (candidates[b] if load_b < load_a else candidates[a])


async def test_least_inflight_through_the_router_avoids_the_busy_instance() -> None:
    """With two instances the router's least_inflight always takes the idle one."""
    reg = registry(backend("busy"), backend("idle"), policy={"default": "least_inflight"})
    reg.instances["busy"].runtime.inflight = 3
    rt = router(reg, FakeClock())
    assert {rt.route(request())[0].name for _ in range(20)} == {"idle"}


@settings(max_examples=100)
@given(
    stats=st.lists(
        st.tuples(st.integers(0, 6), st.sampled_from([None, 0.01, 0.05, 0.2, 1.0])),
        min_size=2,
        max_size=8,
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_ewma_latency_never_picks_the_costlier_of_its_two_samples(
    stats: list[tuple[int, float | None]], seed: int
) -> None:
    """P2C over cost = latency average x (inflight + 1): never the costlier of the pair."""
    candidates = fleet([1] * len(stats))
    policy, replay = EwmaLatency(random.Random(seed)), random.Random(seed)
    for inst, (inflight, latency) in zip(candidates, stats, strict=True):
        inst.runtime.inflight = inflight
        if latency is not None:
            policy.observe(inst.name, latency, 0.0)
    for _ in range(30):
        chosen = policy.select(candidates, REQ, 0.0)
        a, b = _two(replay, len(candidates))
        cost_a, cost_b = policy.cost(candidates[a]), policy.cost(candidates[b])
        assert chosen is (candidates[b] if cost_b < cost_a else candidates[a])


# --- peak EWMA -----------------------------------------------------------------------------------


def test_peak_ewma_takes_a_slow_answer_at_once_and_decays_with_time() -> None:
    """A slower observation replaces the average; a faster one pulls it down by 1 - e^(-dt/tau)."""
    ewma = EwmaLatency(tau_s=10.0, default_s=0.1)
    assert ewma.latency("a") == 0.1  # never observed: the default
    ewma.observe("a", 0.1, 0.0)
    assert ewma.latency("a") == 0.1
    ewma.observe("a", 0.5, 1.0)
    assert ewma.latency("a") == 0.5  # the peak, at once
    ewma.observe("a", 0.1, 11.0)  # dt = tau
    assert ewma.latency("a") == pytest.approx(0.5 * math.exp(-1) + 0.1 * (1 - math.exp(-1)))
    before = ewma.latency("a")
    ewma.observe("a", 0.1, 11.0)  # no time passed: no weight
    assert ewma.latency("a") == before


def test_peak_ewma_decays_with_time_not_with_request_count() -> None:
    """Two fast answers 5 s apart move the average exactly as much as one answer after 10 s."""
    once, twice = EwmaLatency(tau_s=10.0), EwmaLatency(tau_s=10.0)
    for ewma in (once, twice):
        ewma.observe("a", 0.5, 0.0)
    once.observe("a", 0.1, 10.0)
    twice.observe("a", 0.1, 5.0)
    twice.observe("a", 0.1, 10.0)
    assert twice.latency("a") == pytest.approx(once.latency("a"))
    assert once.latency("a") == pytest.approx(0.1 + 0.4 * math.exp(-1))


def test_ewma_cost_penalises_requests_in_flight() -> None:
    """A fast instance with a queue costs more than a slower idle one; the idle one wins."""
    fast, slow = fleet([1, 1])
    ewma = EwmaLatency(random.Random(0))
    ewma.observe(fast.name, 0.1, 0.0)
    ewma.observe(slow.name, 0.2, 0.0)
    assert ewma.cost(fast) < ewma.cost(slow)
    fast.runtime.inflight = 5
    assert ewma.cost(fast) == pytest.approx(0.6)
    assert ewma.cost(slow) == pytest.approx(0.2)
    assert {ewma.select([fast, slow], REQ, 0.0).name for _ in range(20)} == {slow.name}


async def test_router_attempts_feed_the_latency_average_from_its_clock() -> None:
    """Router.attempt measures latency with the router's clock and folds it into ewma_latency."""
    clock = FakeClock()
    reg = registry(backend("a"), policy={"default": "ewma_latency"})
    rt = router(reg, clock)
    inst, _ = rt.route(request())

    async def call(_: RegisteredInstance) -> str:
        clock.advance(0.3)
        return "ok"

    assert await rt.attempt(inst, call, CHAT) == "ok"
    _, decision = rt.explain(request())
    assert decision.policy == "ewma_latency"
    assert decision.signals["ewma_latency_ms"] == pytest.approx(300.0)


# --- consistent hash -----------------------------------------------------------------------------

KEYS = [f"session-{k}" for k in range(10_000)]


def owners(ring: ConsistentHash, members: list[str]) -> dict[str, str]:
    names = tuple(sorted(members))
    return {key: ring.select_key(key, names) for key in KEYS}


def test_consistent_hash_maps_a_key_to_the_same_instance() -> None:
    """hash_key, else task_id, else request_id decides; the candidates' order does not."""
    candidates = fleet([1] * 6)
    ring = ConsistentHash()
    by_key = request(hash_key="user-42")
    first = ring.select(candidates, by_key, 0.0)
    for _ in range(3):
        assert ring.select(list(reversed(candidates)), by_key, 0.0) is first
    by_task = request(task_id="task-9", request_id="r1")
    assert ring.select(candidates, by_task, 0.0) is ring.select(
        candidates, request(task_id="task-9", request_id="r2"), 0.0
    )
    assert ring.select(candidates, by_key, 0.0).name == ring.select_key(
        "user-42", tuple(sorted(c.name for c in candidates))
    )


@settings(max_examples=12, deadline=None)
@given(n=st.integers(2, 16), data=st.data())
def test_consistent_hash_removal_moves_only_the_removed_instances_keys(
    n: int, data: st.DataObject
) -> None:
    """Removing one of N moves exactly the keys it owned (about 1/N, at most 1.5/N + 1 %);
    every other key stays where it was."""
    members = [f"inst-{i}" for i in range(n)]
    gone = data.draw(st.sampled_from(members))
    ring = ConsistentHash()
    before = owners(ring, members)
    after = owners(ring, [m for m in members if m != gone])
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(before[k] == gone for k in moved)
    assert len(moved) == sum(1 for k in KEYS if before[k] == gone)
    assert len(moved) / len(KEYS) <= 1.5 / n + 0.01


@settings(max_examples=12, deadline=None)
@given(n=st.integers(2, 16), newcomer=st.text("abcdefgh", min_size=1, max_size=6))
def test_consistent_hash_adding_an_instance_moves_about_one_in_n_plus_one(
    n: int, newcomer: str
) -> None:
    """Adding one to N moves only keys to the newcomer: between 0.5/(N+1) and 1.5/(N+1) + 1 %."""
    members = [f"inst-{i}" for i in range(n)]
    ring = ConsistentHash()
    before = owners(ring, members)
    after = owners(ring, [*members, f"new-{newcomer}"])
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k] == f"new-{newcomer}" for k in moved)
    share = len(moved) / len(KEYS)
    assert 0.5 / (n + 1) <= share <= 1.5 / (n + 1) + 0.01


async def test_consistent_hash_sends_a_key_back_when_its_instance_recovers() -> None:
    """A briefly excluded instance gives its keys to others and gets them back after."""
    reg = registry(*(backend(f"i{n}") for n in range(5)), policy={"default": "consistent_hash"})
    rt = router(reg, FakeClock())
    reqs = [request(hash_key=f"k{n}") for n in range(200)]
    home = {r.routing.hash_key: rt.route(r)[0].name for r in reqs}
    away = {r.routing.hash_key: rt.route(r, exclude={"i2"})[0].name for r in reqs}
    assert all(away[k] == home[k] for k in home if home[k] != "i2")
    assert "i2" not in away.values()
    assert {r.routing.hash_key: rt.route(r)[0].name for r in reqs} == home


# --- lowest cost ---------------------------------------------------------------------------------


def test_lowest_cost_picks_the_cheapest_declared_price_and_round_robins_ties() -> None:
    """Chat compares per-1k input + output prices; two cheapest alternate; unpriced never win."""
    reg = registry(
        backend("dear", price={"per_1k_input_tokens": 1.0, "per_1k_output_tokens": 2.0}),
        backend("cheap1", price={"per_1k_input_tokens": 0.5, "per_1k_output_tokens": 0.5}),
        backend("unpriced"),
        backend("cheap2", price={"per_1k_input_tokens": 0.25, "per_1k_output_tokens": 0.75}),
    )
    candidates = list(reg.instances.values())
    assert [unit_price(i, CHAT) for i in candidates] == [3.0, 1.0, math.inf, 1.0]
    assert picks(LowestCost(), candidates, 4) == ["cheap1", "cheap2"] * 2


def test_lowest_cost_uses_the_unit_of_the_operation() -> None:
    """speech_to_text compares per audio second, images per image, realtime per minute."""
    reg = registry(
        backend(
            "a", price={"per_audio_second": 0.002, "per_image": 0.5, "per_session_minute": 1.0}
        ),
        backend(
            "b", price={"per_audio_second": 0.001, "per_image": 0.9, "per_session_minute": 0.5}
        ),
    )
    a, b = reg.instances["a"], reg.instances["b"]
    policy = LowestCost()
    assert policy.select([a, b], request(STT), 0.0) is b
    assert policy.select([a, b], request(Operation.IMAGE_GENERATION), 0.0) is a
    assert policy.select([a, b], request(Operation.REALTIME_VOICE), 0.0) is b


def test_lowest_cost_round_robins_when_nobody_declares_a_price() -> None:
    """With no prices at all every candidate ties, so they take turns."""
    candidates = fleet([1, 1, 1])
    assert picks(LowestCost(), candidates, 6) == ["i0", "i1", "i2"] * 2


# --- priority fallback ---------------------------------------------------------------------------


async def test_priority_fallback_serves_from_the_best_tier_with_smooth_wrr() -> None:
    """Top tier shares by weight (2:1 per cycle); the lower tier stands by with a reason."""
    reg = registry(
        backend("p1", priority=10, weight=2),
        backend("p2", priority=10, weight=1),
        backend("standby", priority=1),
        policy={"default": "priority_fallback"},
    )
    rt = router(reg, FakeClock())
    got = []
    for _ in range(6):
        inst, decision = rt.route(request())
        got.append(inst.name)
    assert got == ["p1", "p2", "p1"] * 2
    assert decision.policy == "priority_fallback"
    assert decision.rejected_reasons == {"standby": "standby: priority 1 < 10"}


async def test_priority_fallback_uses_the_next_tier_when_the_top_one_is_out() -> None:
    """Excluded (failed earlier) or unhealthy top-tier instances hand over to the next tier."""
    clock = FakeClock()
    reg = registry(
        backend("top", priority=10),
        backend("mid", priority=5),
        backend("low", priority=0),
        policy={"default": "priority_fallback"},
        health={"breaker": {"consecutive_failures": 1}},
    )
    rt = router(reg, clock)
    inst, decision = rt.route(request(), exclude={"top"})
    assert inst.name == "mid"
    assert decision.rejected_reasons == {
        "top": "failed earlier in this request",
        "low": "standby: priority 0 < 5",
    }
    reg.instances["top"].runtime.breaker.on_result(False, clock())
    inst, decision = rt.route(request())
    assert inst.name == "mid"
    assert decision.rejected_reasons["top"].startswith("unhealthy: circuit open")


# --- names and defaults --------------------------------------------------------------------------


def test_every_policy_is_made_by_its_config_name() -> None:
    """make_policy knows the eight single-selection policies; an unknown name lists them."""
    assert set(POLICIES) == {
        "round_robin",
        "weighted_round_robin",
        "weighted_random",
        "least_inflight",
        "ewma_latency",
        "consistent_hash",
        "lowest_cost",
        "priority_fallback",
    }
    for name in POLICIES:
        assert make_policy(name, random.Random(0)).name == name
    with pytest.raises(ConfigError) as info:
        make_policy("fastest")
    assert "least_inflight" in info.value.reason and "'fastest'" in info.value.reason


async def test_operation_defaults_follow_the_spec() -> None:
    """With no policy configured each operation uses routing.md's default."""
    assert DEFAULT_BY_OPERATION == {
        Operation.CHAT_COMPLETIONS: "ewma_latency",
        Operation.EMBEDDINGS: "weighted_round_robin",
        Operation.IMAGE_GENERATION: "priority_fallback",
        Operation.SPEECH_TO_TEXT: "least_inflight",
        Operation.TEXT_TO_SPEECH: "weighted_round_robin",
        Operation.REALTIME_VOICE: "least_inflight",
    }
    rt = router(registry(backend("a")), FakeClock())
    for op, name in DEFAULT_BY_OPERATION.items():
        assert rt.route(request(op))[1].policy == name


# --- cached (tuple) and plain (list) paths pick the same -----------------------------------------


@settings(max_examples=80, deadline=None)
@given(
    weights=st.lists(st.integers(1, 9), min_size=1, max_size=7),
    steps=st.lists(
        st.tuples(st.integers(0, 2**7 - 1), st.integers(1, 12)), min_size=1, max_size=12
    ),
    seed=st.integers(0, 2**32 - 1),
    name=st.sampled_from(
        [
            "weighted_round_robin",
            "priority_fallback",
            "weighted_random",
            "consistent_hash",
            "lowest_cost",
        ]
    ),
)
def test_policies_pick_the_same_from_a_cached_tuple_as_from_a_list(
    weights: list[int], steps: list[tuple[int, int]], seed: int, name: str
) -> None:
    """Candidate sets come and go (as the filter's interned tuples for one policy, as fresh
    lists for the other): both policies pick the same instance every time, and a dry-run
    copy taken midway picks what the original picks next."""
    reg = registry(
        *(
            backend(f"i{n}", weight=w, price={"per_1k_input_tokens": float(w % 3)})
            for n, w in enumerate(weights)
        )
    )
    fleet_ = list(reg.instances.values())
    cached, plain = make_policy(name, random.Random(seed)), make_policy(name, random.Random(seed))
    interned: dict[tuple[str, ...], tuple[RegisteredInstance, ...]] = {}
    for step, (mask, count) in enumerate(steps):
        chosen = [inst for n, inst in enumerate(fleet_) if mask >> n & 1] or fleet_
        as_tuple = interned.setdefault(tuple(i.name for i in chosen), tuple(chosen))
        for k in range(count):
            req = request(hash_key=f"key-{step}-{k}")
            if k == count // 2:
                dry = copy.deepcopy(cached)
                expected = dry.select(as_tuple, req, 0.0)
                assert cached.select(as_tuple, req, 0.0) is expected
                assert plain.select(list(chosen), req, 0.0) is expected
                continue
            assert cached.select(as_tuple, req, 0.0) is plain.select(list(chosen), req, 0.0)


def test_a_price_declared_for_other_operations_is_no_price_for_this_one() -> None:
    """An instance priced only per image is not 'free' for chat: the chat-priced one wins."""
    from spear_rt.config import Price
    from spear_rt.router.policies import unit_price

    reg = registry(backend("images_only"), backend("chat_priced"))
    images_only, chat_priced = reg.instances["images_only"], reg.instances["chat_priced"]
    images_only.config.price = Price(per_image=0.01)
    chat_priced.config.price = Price(per_1k_input_tokens=0.5, per_1k_output_tokens=1.5)
    assert unit_price(images_only, CHAT) == float("inf")
    assert unit_price(chat_priced, CHAT) == 2.0
