"""The router: error classification, naming errors, policy override, explain, attempts, reload."""

from __future__ import annotations

import random

import pytest

from spear_rt.errors import BackendFailure, CanonicalFailure
from spear_rt.ir import ErrorCode, Feature, Operation
from spear_rt.registry import RegisteredInstance, lease
from spear_rt.router import Router
from spear_rt.router.core import CAPACITY_RETRY_AFTER_S
from spear_rt.router.health import BreakerState
from spear_rt.router.policies import POLICIES
from tests.router.support import CHAT, FakeClock, backend, registry, request, router

NOKEY = '[[credentials]]\nname = "vendor"\napi_key_env = "SPEAR_TEST_UNSET_KEY"\n'


def failure(rt: Router, req: object, **kw: object) -> CanonicalFailure:
    with pytest.raises(CanonicalFailure) as info:
        rt.route(req, **kw)  # type: ignore[arg-type]
    return info.value


# --- what kind of "no" ---------------------------------------------------------------------------


async def test_nothing_serving_the_operation_is_no_candidate_not_retryable() -> None:
    """NoCandidateBackend, zero candidates, not retryable, counted in metrics."""
    rt = router(registry(backend("a", ops=["embeddings"])), FakeClock())
    error = failure(rt, request(CHAT)).error
    assert error.code is ErrorCode.NO_CANDIDATE_BACKEND
    assert error.candidates_checked == 0 and error.rejected_reasons == {}
    assert "no configured backend serves chat_completions" in error.message
    assert not error.retryable and error.retry_after_s is None
    assert rt.metrics.no_candidate.get("chat_completions", "NoCandidateBackend") == 1


async def test_only_capability_rejections_make_missing_capabilities() -> None:
    """All rejected for features/transports: MissingCapabilities with the requirement summary."""
    rt = router(registry(backend("a"), backend("b", transports=["grpc"])), FakeClock())
    error = failure(rt, request(features=[Feature.SUPPORTS_DIARIZATION])).error
    assert error.code is ErrorCode.MISSING_CAPABILITIES
    assert error.required == {
        "operation": "chat_completions",
        "features": ["supports_diarization"],
        "transports": [],
    }
    assert error.candidates_checked == 2
    assert error.rejected_reasons == {
        "a": "missing features: supports_diarization",
        "b": "missing features: supports_diarization",
    }
    assert not error.retryable


async def test_a_capable_but_unavailable_instance_makes_it_no_candidate() -> None:
    """Capability and credential rejections: NoCandidateBackend (config problem), not retryable."""
    rt = router(
        registry(
            backend("a"), backend("b", credential_ref="vendor", features=["supports_tools"]), NOKEY
        ),
        FakeClock(),
    )
    error = failure(rt, request(features=[Feature.SUPPORTS_TOOLS])).error
    assert error.code is ErrorCode.NO_CANDIDATE_BACKEND and not error.retryable


async def test_every_capable_instance_at_capacity_is_retryable_with_retry_after() -> None:
    """Busy (even beside incapable ones): NoCandidateBackend, retryable, retry_after_s set."""
    reg = registry(
        backend("busy", limits={"max_concurrency": 1}), backend("other", transports=["grpc"])
    )
    rt = router(reg, FakeClock())
    with lease(reg.instances["busy"]):
        error = failure(rt, request(transports=["http"])).error  # type: ignore[list-item]
    assert error.code is ErrorCode.NO_CANDIDATE_BACKEND
    assert error.retryable and error.retry_after_s == CAPACITY_RETRY_AFTER_S
    assert "at capacity" in error.message
    assert error.rejected_reasons is not None and set(error.rejected_reasons) == {"busy", "other"}


async def test_unhealthy_only_is_no_candidate() -> None:
    """Every instance's circuit open: NoCandidateBackend with the unhealthy reasons."""
    clock = FakeClock()
    reg = registry(backend("a"), health={"breaker": {"consecutive_failures": 1}})
    reg.instances["a"].runtime.breaker.on_result(False, clock())
    error = failure(router(reg, clock), request()).error
    assert error.code is ErrorCode.NO_CANDIDATE_BACKEND
    assert error.rejected_reasons is not None
    assert error.rejected_reasons["a"].startswith("unhealthy: circuit open")


# --- names that do not exist ---------------------------------------------------------------------


async def test_an_unknown_backend_pin_lists_the_configured_backends() -> None:
    """InvalidRequest naming the pin and every configured instance, sorted."""
    rt = router(registry(backend("zeta"), backend("alpha")), FakeClock())
    for call in (rt.route, rt.explain):
        with pytest.raises(CanonicalFailure) as info:
            call(request(backend="nope"))
        assert info.value.error.code is ErrorCode.INVALID_REQUEST
        assert (
            info.value.error.message == 'unknown backend "nope"; configured backends: alpha, zeta'
        )


async def test_an_unknown_model_lists_the_models_that_exist() -> None:
    """When every candidate declares a model and none matches: InvalidRequest with the models."""
    rt = router(
        registry(backend("a", model="whisper-1"), backend("b", model="gpt-4o")), FakeClock()
    )
    error = failure(rt, request(model="nope")).error
    assert error.code is ErrorCode.INVALID_REQUEST
    assert (
        error.message == 'unknown model "nope" for chat_completions; available: gpt-4o, whisper-1'
    )


async def test_an_unknown_model_is_fine_when_an_instance_takes_any_model() -> None:
    """An instance without a model accepts any; the model-declaring ones are rejected."""
    rt = router(registry(backend("a", model="whisper-1"), backend("any")), FakeClock())
    chosen, decision = rt.route(request(model="nope"))
    assert chosen.name == "any"
    assert decision.rejected_reasons == {"a": "serves model 'whisper-1', not 'nope'"}


# --- policies per request ------------------------------------------------------------------------


async def test_a_request_may_choose_a_policy_when_the_host_allows_it() -> None:
    """allow_request_override (the default): the request's policy decides and is reported."""
    rt = router(
        registry(backend("a"), backend("b"), policy={"default": "least_inflight"}), FakeClock()
    )
    assert [rt.route(request(policy="round_robin"))[0].name for _ in range(4)] == ["a", "b"] * 2
    assert rt.route(request(policy="round_robin"))[1].policy == "round_robin"
    assert rt.route(request())[1].policy == "least_inflight"


async def test_a_request_may_not_choose_a_policy_when_the_host_forbids_it() -> None:
    """allow_request_override = false: naming a policy is InvalidRequest; omitting it is fine."""
    reg = registry(backend("a"), policy={"allow_request_override": False})
    rt = router(reg, FakeClock())
    error = failure(rt, request(policy="round_robin")).error
    assert error.code is ErrorCode.INVALID_REQUEST
    assert "does not let requests choose a policy" in error.message
    assert rt.route(request())[0].name == "a"


async def test_an_unknown_policy_in_a_request_lists_the_known_ones() -> None:
    """A request naming no known policy: InvalidRequest listing what exists."""
    error = failure(router(registry(backend("a")), FakeClock()), request(policy="fastest")).error
    assert error.code is ErrorCode.INVALID_REQUEST
    assert "'fastest'" in error.message and "weighted_round_robin" in error.message


async def test_per_operation_policy_overrides_the_default() -> None:
    """[policy.by_operation] wins over [policy] default for its operation only."""
    reg = registry(
        backend("a"),
        policy={"default": "round_robin", "by_operation": {"embeddings": "lowest_cost"}},
    )
    rt = router(reg, FakeClock())
    assert rt.route(request(Operation.EMBEDDINGS))[1].policy == "lowest_cost"
    assert rt.route(request(CHAT))[1].policy == "round_robin"


# --- explain -------------------------------------------------------------------------------------


async def test_explain_tells_what_route_would_pick_without_moving_the_policy() -> None:
    """explain() answers the same as the next route() and leaves round robin where it was."""
    rt = router(
        registry(backend("a"), backend("b"), backend("c"), policy={"default": "round_robin"}),
        FakeClock(),
    )
    rt.route(request())
    for _ in range(3):
        chosen, decision = rt.explain(request())
        assert chosen is not None and chosen.name == "b" and decision.selected == "b"
    assert rt.route(request())[0].name == "b"
    assert rt.route(request())[0].name == "c"


@pytest.mark.parametrize("policy", sorted(POLICIES))
async def test_explain_predicts_the_next_route_for_every_policy(policy: str) -> None:
    """For each policy, explain() names what the following route() picks, and asking does
    not change the sequence (weights, prices, load and keys vary)."""
    reg = registry(
        *(
            backend(f"i{n}", weight=1 + n % 3, price={"per_1k_input_tokens": float(n % 2)})
            for n in range(5)
        ),
        policy={"default": policy},
    )
    for n, inst in enumerate(reg.instances.values()):
        inst.runtime.inflight = n % 3
    asked, silent = router(reg, FakeClock(), seed=4), router(reg, FakeClock(), seed=4)
    for k in range(30):
        req = request(hash_key=f"user-{k}")
        predicted, _ = asked.explain(req)
        chosen, _ = asked.route(req)
        assert predicted is chosen
        assert silent.route(req)[0] is chosen


async def test_explain_of_a_request_nobody_can_take_returns_the_reasons() -> None:
    """explain() does not raise for no candidate: it returns None and the decision."""
    rt = router(registry(backend("a", transports=["grpc"])), FakeClock())
    chosen, decision = rt.explain(request(transports=["http"]))  # type: ignore[list-item]
    assert chosen is None and decision.selected is None
    assert decision.rejected_reasons == {"a": "missing transports: http"}


async def test_a_decision_reports_the_signals_it_used() -> None:
    """inflight, weight, priority and the number of eligible instances of the chosen one."""
    reg = registry(backend("a", weight=7, priority=3), policy={"default": "round_robin"})
    reg.instances["a"].runtime.inflight = 2
    _, decision = router(reg, FakeClock()).route(request())
    assert decision.signals == {"inflight": 2, "weight": 7, "priority": 3, "eligible": 1}


# --- attempts ------------------------------------------------------------------------------------


async def test_attempt_counts_in_flight_while_the_call_runs() -> None:
    """In flight is 1 during the call and 0 after, whether it succeeds or fails."""
    reg = registry(backend("a"))
    rt = router(reg, FakeClock())
    inst = reg.instances["a"]
    seen = []

    async def ok(i: RegisteredInstance) -> int:
        seen.append(i.runtime.inflight)
        return 1

    async def bad(i: RegisteredInstance) -> int:
        seen.append(i.runtime.inflight)
        raise BackendFailure("boom", retryable=True, status=503)

    assert await rt.attempt(inst, ok, CHAT) == 1
    with pytest.raises(BackendFailure):
        await rt.attempt(inst, bad, CHAT)
    assert seen == [1, 1] and inst.runtime.inflight == 0
    assert inst.runtime.total_requests == 2


async def test_backend_failures_trip_the_breaker_and_caller_errors_do_not() -> None:
    """BackendFailure/TimeoutError count against the instance; a caller's ValueError does not."""
    clock = FakeClock()
    reg = registry(backend("a"), health={"breaker": {"consecutive_failures": 2}})
    rt = router(reg, clock)
    inst = reg.instances["a"]

    def raising(exc: BaseException):  # type: ignore[no-untyped-def]
        async def call(_: RegisteredInstance) -> None:
            raise exc

        return call

    for _ in range(3):
        with pytest.raises(ValueError):
            await rt.attempt(inst, raising(ValueError("bad input")), CHAT)
    assert inst.runtime.breaker.state is BreakerState.CLOSED
    with pytest.raises(TimeoutError):
        await rt.attempt(inst, raising(TimeoutError()), CHAT)
    with pytest.raises(BackendFailure):
        await rt.attempt(inst, raising(BackendFailure("x", status=500)), CHAT)
    assert inst.runtime.breaker.state is BreakerState.OPEN
    assert inst.runtime.interval_failures == 2


async def test_a_rate_limited_instance_spends_a_token_per_attempt() -> None:
    """Each attempt takes one token from the instance's bucket; an empty one filters it out."""
    clock = FakeClock(0.0)
    reg = registry(backend("a", limits={"rate_per_s": 1.0, "burst": 2}))
    rt = router(reg, clock)

    async def call(_: RegisteredInstance) -> None:
        return None

    for _ in range(2):
        inst, _ = rt.route(request())
        await rt.attempt(inst, call, CHAT)
    error = failure(rt, request()).error
    assert error.retryable and error.rejected_reasons == {
        "a": "at capacity: rate limit 1/s, next slot in 1.000s"
    }
    clock.advance(1.0)
    assert rt.route(request())[0].name == "a"


# --- reload --------------------------------------------------------------------------------------


async def test_reload_swaps_instances_and_keeps_runtime_by_name() -> None:
    """After reload new instances route, removed ones do not, and survivors keep in-flight
    counts and breaker state."""
    clock = FakeClock()
    old = registry(backend("a"), backend("b"), health={"breaker": {"consecutive_failures": 1}})
    rt = router(old, clock)
    old.instances["b"].runtime.breaker.on_result(False, clock())
    with lease(old.instances["a"]):
        new = registry(
            backend("a"),
            backend("b"),
            backend("c"),
            previous=old,
            policy={"default": "round_robin"},
        )
        rt.reload(new)
        assert new.instances["a"].runtime.inflight == 1
    assert new.instances["b"].runtime.breaker.state is BreakerState.OPEN
    assert {rt.route(request())[0].name for _ in range(4)} == {"a", "c"}
    rt.reload(registry(backend("c"), previous=new))
    assert rt.route(request(), exclude=())[1].candidates_checked == 1


def test_every_circuit_open_is_retryable_with_the_wait_until_a_probe() -> None:
    """All circuits open: a retryable NoCandidate whose retry_after is the cool-down left."""
    now = [100.0]
    reg = registry(backend("a"), backend("b"))
    rt = Router(reg, rng=random.Random(0), clock=lambda: now[0])
    for inst in reg.instances.values():
        for _ in range(5):
            inst.runtime.breaker.on_result(False, now[0])
    with pytest.raises(CanonicalFailure) as info:
        rt.route(request())
    error = info.value.error
    assert error.retryable and error.code is ErrorCode.NO_CANDIDATE_BACKEND
    soonest = min(i.runtime.breaker.open_until for i in reg.instances.values()) - now[0]
    assert error.retry_after_s == pytest.approx(soonest)
