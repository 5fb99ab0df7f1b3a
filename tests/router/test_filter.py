"""Hard filtering: one reason per rejected instance, for every kind of rejection."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spear_rt.ir import Feature, Operation, Transport
from spear_rt.registry import lease
from spear_rt.router.filter import CandidateFilter, filter_candidates
from tests.router.support import CHAT, FakeClock, backend, registry, request, router

CREDENTIALS = '[[credentials]]\nname = "vendor"\napi_key_env = "SPEAR_TEST_VENDOR_KEY"\n'


def reasons(reg: object, req: object, clock: FakeClock | None = None) -> dict[str, str]:
    _, decision = router(reg, clock or FakeClock()).explain(req)  # type: ignore[arg-type]
    return decision.rejected_reasons


async def test_an_instance_without_the_operation_is_not_a_candidate() -> None:
    """Instances not declaring the operation are not checked, so they need no reason."""
    reg = registry(
        backend("chat", ops=["chat_completions"]), backend("tts", ops=["text_to_speech"])
    )
    chosen, decision = router(reg, FakeClock()).explain(request(CHAT))
    assert chosen is not None and chosen.name == "chat"
    assert decision.candidates_checked == 1
    assert decision.rejected_reasons == {}


async def test_missing_features_and_transports_are_named() -> None:
    """Each missing feature/transport is listed, sorted."""
    reg = registry(
        backend("ok", features=["supports_stream", "supports_tools"]),
        backend("nofeat", features=["supports_stream"]),
        backend("notrans", features=["supports_stream", "supports_tools"], transports=["grpc"]),
    )
    req = request(
        features=[Feature.SUPPORTS_TOOLS, Feature.SUPPORTS_STREAM], transports=[Transport.HTTP]
    )
    assert reasons(reg, req) == {
        "nofeat": "missing features: supports_tools",
        "notrans": "missing transports: http",
    }


async def test_route_by_model_keeps_instances_serving_the_model_or_any() -> None:
    """An instance declaring another model is out; one declaring none accepts any model."""
    reg = registry(backend("m1", model="m1"), backend("m2", model="m2"), backend("any"))
    assert reasons(reg, request(model="m1")) == {"m2": "serves model 'm2', not 'm1'"}


async def test_a_model_naming_an_only_when_named_instance_goes_to_it_alone() -> None:
    """`"model": "stub"` asks for the stub by name: a real engine that answers any model name
    (and outranks it) does not take it; other model names leave the stub out as before."""
    reg = registry(backend("stub", only_when_named=True, priority=0), backend("real", priority=10))
    assert reasons(reg, request(model="stub")) == {"real": "the model names instance 'stub'"}
    assert set(reasons(reg, request(model="gpt-4o-mini"))) == {"stub"}


async def test_request_lists_only_narrow_the_hosts_set() -> None:
    """allowlist keeps, denylist removes, a pin keeps one; each rejection says which."""
    reg = registry(backend("a"), backend("b"), backend("c"))
    assert reasons(reg, request(allowlist=("a", "b"), denylist=("b",))) == {
        "b": "in the request's denylist",
        "c": "not in the request's allowlist",
    }
    assert reasons(reg, request(backend="c")) == {
        "a": "not the requested backend 'c'",
        "b": "not the requested backend 'c'",
    }


async def test_unset_credential_makes_the_instance_unavailable_without_its_value() -> None:
    """Unset env var: unavailable, reason names the credential and the variable; a set value
    never appears anywhere in the explanation."""
    reg = registry(backend("keyed", credential_ref="vendor"), backend("free"), CREDENTIALS)
    got = reasons(reg, request())
    assert got == {
        "keyed": "unavailable: credential 'vendor': environment variable "
        "SPEAR_TEST_VENDOR_KEY is not set"
    }
    secret = "sk-very-secret-value"
    reg = registry(
        backend("keyed", credential_ref="vendor", model="x"),
        backend("free", model="y"),
        CREDENTIALS,
        environ={"SPEAR_TEST_VENDOR_KEY": secret},
    )
    chosen, decision = router(reg, FakeClock()).explain(request(model="y"))
    assert chosen is not None and chosen.name == "free"
    assert secret not in msgspec.json.encode(decision).decode()
    assert secret not in repr(reg.instances["keyed"].info)


async def test_open_and_half_open_circuits_are_unhealthy() -> None:
    """Open: how long it stays open; half-open with its probe taken: probe in flight."""
    clock = FakeClock()
    reg = registry(
        backend("a"),
        backend("b"),
        health={"breaker": {"consecutive_failures": 1, "cooldown_s": 4.0, "jitter": 0.0}},
    )
    breaker = reg.instances["a"].runtime.breaker
    breaker.on_result(False, clock())
    assert reasons(reg, request(), clock) == {"a": "unhealthy: circuit open for 4.0s more"}
    clock.advance(1.5)
    assert reasons(reg, request(), clock) == {"a": "unhealthy: circuit open for 2.5s more"}
    clock.advance(2.5)
    assert reasons(reg, request(), clock) == {}  # half-open: one probe may go
    breaker.on_start(clock())
    assert reasons(reg, request(), clock) == {"a": "unhealthy: circuit half-open, probe in flight"}


async def test_an_ejected_outlier_is_unhealthy_until_its_ejection_ends() -> None:
    """The reason says how long the ejection lasts; once it ends the instance is back."""
    clock = FakeClock()
    reg = registry(backend("a"), backend("b"))
    rt = router(reg, clock)
    rt.route(request())  # first outlier sweep happens now; the next is due in 10 s
    rt.outliers.ejected_until["a"] = clock() + 30.0
    assert rt.explain(request())[1].rejected_reasons == {
        "a": "unhealthy: ejected as an outlier for 30.0s more"
    }
    clock.advance(30.0)
    assert rt.explain(request())[1].rejected_reasons == {}


async def test_concurrency_and_rate_limits_are_at_capacity() -> None:
    """max_concurrency counts in-flight leases; an empty token bucket says when the next slot is."""
    clock = FakeClock(0.0)
    reg = registry(
        backend("conc", limits={"max_concurrency": 2}),
        backend("rate", limits={"rate_per_s": 2.0, "burst": 1}),
        backend("free"),
    )
    with lease(reg.instances["conc"]), lease(reg.instances["conc"]):
        assert reasons(reg, request(), clock) == {
            "conc": "at capacity: 2 in flight, max_concurrency 2"
        }
    assert reasons(reg, request(), clock) == {}
    reg.instances["rate"].runtime.bucket.take(clock())  # type: ignore[union-attr]
    assert reasons(reg, request(), clock) == {
        "rate": "at capacity: rate limit 2/s, next slot in 0.500s"
    }
    clock.advance(0.5)
    assert reasons(reg, request(), clock) == {}


async def test_excluded_instances_failed_earlier_whatever_else_is_true() -> None:
    """An instance that already failed this request is rejected for that, first."""
    reg = registry(backend("a", model="other"), backend("b"))
    _, decision = router(reg, FakeClock()).route(request(), exclude={"a", "nonexistent"})
    assert decision.rejected_reasons == {"a": "failed earlier in this request"}


async def test_only_the_best_tier_of_eligible_instances_serves() -> None:
    """Tiers are taken among eligible instances: a rejected top tier does not hide the next."""
    reg = registry(
        backend("top", priority=9, model="other"),
        backend("mid1", priority=5),
        backend("mid2", priority=5),
        backend("low", priority=1),
    )
    chosen, decision = router(reg, FakeClock()).explain(request(model="m"))
    assert chosen is not None and chosen.name in {"mid1", "mid2"}
    assert decision.rejected_reasons == {
        "top": "serves model 'other', not 'm'",
        "low": "standby: priority 1 < 5",
    }
    assert decision.signals["eligible"] == 2


async def test_every_check_is_reported_in_one_decision() -> None:
    """One request, one instance per rejection kind: each gets its own reason, in order."""
    clock = FakeClock(0.0)
    reg = registry(
        backend("ok", features=["supports_stream"]),
        backend("nofeat"),
        backend("notrans", features=["supports_stream"], transports=["grpc"]),
        backend("model", features=["supports_stream"], model="m2"),
        backend("denied", features=["supports_stream"]),
        backend("outside", features=["supports_stream"]),
        backend("nokey", features=["supports_stream"], credential_ref="vendor"),
        backend("open", features=["supports_stream"]),
        backend("busy", features=["supports_stream"], limits={"max_concurrency": 1}),
        backend("limited", features=["supports_stream"], limits={"rate_per_s": 1.0, "burst": 1}),
        backend("standby", features=["supports_stream"], priority=-1),
        CREDENTIALS,
        health={"breaker": {"consecutive_failures": 1, "jitter": 0.0, "cooldown_s": 5.0}},
    )
    reg.instances["open"].runtime.breaker.on_result(False, clock())
    reg.instances["busy"].runtime.inflight = 1
    reg.instances["limited"].runtime.bucket.take(clock())  # type: ignore[union-attr]
    req = request(
        features=[Feature.SUPPORTS_STREAM],
        transports=[Transport.HTTP],
        model="m1",
        allowlist=tuple(n for n in reg.instances if n != "outside"),
        denylist=("denied",),
    )
    chosen, decision = router(reg, clock).explain(req)
    assert chosen is not None and chosen.name == "ok"
    assert list(decision.rejected_reasons.items()) == [
        ("nofeat", "missing features: supports_stream"),
        ("notrans", "missing transports: http"),
        ("model", "serves model 'm2', not 'm1'"),
        ("denied", "in the request's denylist"),
        ("outside", "not in the request's allowlist"),
        (
            "nokey",
            "unavailable: credential 'vendor': "
            "environment variable SPEAR_TEST_VENDOR_KEY is not set",
        ),
        ("open", "unhealthy: circuit open for 5.0s more"),
        ("busy", "at capacity: 1 in flight, max_concurrency 1"),
        ("limited", "at capacity: rate limit 1/s, next slot in 1.000s"),
        ("standby", "standby: priority -1 < 0"),
    ]
    assert decision.candidates_checked == 11
    assert decision.operation is Operation.CHAT_COMPLETIONS


@pytest.mark.parametrize("op", list(Operation))
async def test_a_request_with_no_constraints_rejects_nobody(op: Operation) -> None:
    """Every configured instance is a candidate for a plain request."""
    reg = registry(backend("a"), backend("b"))
    chosen, decision = router(reg, FakeClock()).explain(request(op))
    assert chosen is not None
    assert decision.rejected_reasons == {} and decision.candidates_checked == 2


# --- the fast filter agrees with the rule --------------------------------------------------------

NAMES = [f"i{n}" for n in range(7)]
FEATURES = [Feature.SUPPORTS_STREAM, Feature.SUPPORTS_TOOLS]


@st.composite
def fleets(draw: st.DrawFn) -> tuple[str, list[dict[str, object]]]:
    """TOML for up to 7 instances with random static properties, and their dynamic states."""
    count = draw(st.integers(1, len(NAMES)))
    toml, states = CREDENTIALS, []
    for name in NAMES[:count]:
        fields: dict[str, object] = {"priority": draw(st.sampled_from([0, 0, 1, 2]))}
        if draw(st.booleans()):
            fields["model"] = draw(st.sampled_from(["m1", "m2"]))
        fields["features"] = draw(st.lists(st.sampled_from(FEATURES), unique=True))
        fields["transports"] = draw(
            st.lists(st.sampled_from(["http", "websocket"]), min_size=1, unique=True)
        )
        if draw(st.integers(0, 5)) == 0:
            fields["credential_ref"] = "vendor"
        limits: dict[str, object] = {}
        if draw(st.booleans()):
            limits["max_concurrency"] = draw(st.integers(1, 2))
        if draw(st.booleans()):
            limits.update(rate_per_s=1.0, burst=1)
        if limits:
            fields["limits"] = limits
        toml += backend(name, **fields)
        states.append(
            {
                "inflight": draw(st.integers(0, 2)),
                "breaker": draw(
                    st.sampled_from(["closed", "open", "expired", "half_open", "probing"])
                ),
                "ejected": draw(st.sampled_from([None, None, 5.0, -5.0])),
                "drained": draw(st.booleans()),
            }
        )
    return toml, states


def apply(reg: object, rt: object, states: list[dict[str, object]], now: float) -> None:
    for inst, state in zip(reg.instances.values(), states, strict=False):  # type: ignore[attr-defined]
        runtime = inst.runtime
        runtime.inflight = state["inflight"]
        match state["breaker"]:
            case "open":
                runtime.breaker.on_result(False, now)
            case "expired" | "half_open" | "probing":
                runtime.breaker.on_result(False, now - 100.0)
                if state["breaker"] != "expired":
                    runtime.breaker.allows(now)
                if state["breaker"] == "probing":
                    runtime.breaker.on_start(now)
        if state["ejected"] is not None:
            rt.outliers.ejected_until[inst.name] = now + state["ejected"]  # type: ignore[attr-defined]
        if state["drained"] and runtime.bucket is not None:
            runtime.bucket.take(now)


@settings(max_examples=300, deadline=None)
@given(
    fleet=fleets(),
    data=st.data(),
)
def test_candidate_filter_agrees_with_filter_candidates(
    fleet: tuple[str, list[dict[str, object]]], data: st.DataObject
) -> None:
    """The cached filter returns the rule's eligible instances and reasons, in the same order,
    on a fresh cache and on a warm one, whatever the static and dynamic states."""
    toml, states = fleet
    now = 1000.0
    reg = registry(toml, health={"breaker": {"consecutive_failures": 1, "jitter": 0.0}})
    rt = router(reg, FakeClock(now))
    apply(reg, rt, states, now)
    present = list(reg.instances)
    req = request(
        features=data.draw(st.lists(st.sampled_from(FEATURES), unique=True)),
        transports=data.draw(
            st.lists(
                st.sampled_from([Transport.HTTP, Transport.WEBSOCKET]), unique=True, max_size=1
            )
        ),
        model=data.draw(st.sampled_from([None, "m1"])),
        backend=data.draw(st.sampled_from([None, None, None, *present])),
        allowlist=data.draw(
            st.one_of(st.none(), st.lists(st.sampled_from(present), unique=True).map(tuple))
        ),
        denylist=tuple(data.draw(st.lists(st.sampled_from(present), unique=True, max_size=2))),
    )
    fast = CandidateFilter()
    instances = reg.serving(CHAT)
    for _ in range(3):
        excluded = set(data.draw(st.lists(st.sampled_from(present), unique=True, max_size=2)))
        got_eligible, got_rejected = fast(instances, req, now, excluded, rt.outliers)
        want_eligible, want_rejected = filter_candidates(instances, req, now, excluded, rt.outliers)
        assert list(got_eligible) == want_eligible
        assert list(got_rejected.items()) == list(want_rejected.items())
        # state moves between decisions; the cache must not hide it
        for inst in reg.instances.values():
            inst.runtime.inflight = data.draw(st.integers(0, 2))


async def test_an_unchanged_eligible_set_keeps_its_identity() -> None:
    """Requests of one shape get the very same tuple while nothing changes (policies cache on it),
    and again the same one while the same instance stays at capacity."""
    reg = registry(backend("a", limits={"max_concurrency": 1}), backend("b"), backend("c"))
    fast = CandidateFilter()
    instances = reg.serving(CHAT)
    first, _ = fast(instances, request(request_id="r1"), 0.0)
    second, _ = fast(instances, request(request_id="r2"), 0.0)
    assert first is second and [i.name for i in first] == ["a", "b", "c"]
    with lease(reg.instances["a"]):
        busy1, rejected = fast(instances, request(), 0.0)
        busy2, _ = fast(instances, request(), 0.0)
    assert busy1 is busy2 and [i.name for i in busy1] == ["b", "c"]
    assert rejected == {"a": "at capacity: 1 in flight, max_concurrency 1"}
    assert fast(instances, request(), 0.0)[0] is first
