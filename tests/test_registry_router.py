"""Registry and router: per-instance rejection reasons, tiers, naming errors, P2C's property.

Routing reads the event loop's clock, so these tests run as (trio) async tests.
"""

from __future__ import annotations

import functools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spear_rt.backend import InstanceDefaults
from spear_rt.config import Config, parse_config
from spear_rt.errors import CanonicalFailure, ConfigError
from spear_rt.ir import (
    CanonicalRequestEnvelope,
    ErrorCode,
    Feature,
    Operation,
    RequestRequirements,
    RoutingHints,
    Transport,
)
from spear_rt.registry import BackendRegistry, KindUnavailable, lease, load_kind
from spear_rt.router import Router

STT = Operation.SPEECH_TO_TEXT


def config(toml: str) -> Config:
    return parse_config(toml, "test")


def backend(name: str, **fields: object) -> str:
    """One [[backends]] table of kind stub with the given fields."""
    lines = [f'[[backends]]\nname = "{name}"\nkind = "stub"']
    limits = fields.pop("limits", None)
    for key, value in fields.items():
        lines.append(f"{key} = {toml_value(value)}")
    if limits is not None:
        lines.append("[backends.limits]")
        lines += [f"{k} = {toml_value(v)}" for k, v in limits.items()]  # type: ignore[attr-defined]
    return "\n".join(lines) + "\n"


def toml_value(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


_load_kind = functools.cache(load_kind)  # entry-point discovery is slow; kinds never change


def registry(toml: str, environ: dict[str, str] | None = None) -> BackendRegistry:
    return BackendRegistry.build(config(toml), loader=_load_kind, environ=environ or {})


def request(
    op: Operation = STT,
    *,
    features: frozenset[Feature] = frozenset(),
    transports: frozenset[Transport] = frozenset(),
    **routing: object,
) -> CanonicalRequestEnvelope:
    return CanonicalRequestEnvelope(
        request_id="req_1",
        operation=op,
        routing=RoutingHints(**routing),  # type: ignore[arg-type]
        requirements=RequestRequirements(
            required_features=features, required_transports=transports
        ),
    )


def route_error(reg: BackendRegistry, req: CanonicalRequestEnvelope) -> CanonicalFailure:
    with pytest.raises(CanonicalFailure) as info:
        Router(reg, random.Random(0)).route(req)
    return info.value


# --- registry ---------------------------------------------------------------------------------


def test_instances_take_the_kinds_defaults_unless_configured() -> None:
    """Unset ops/features/transports come from the kind; set ones replace them."""
    reg = registry(backend("a") + backend("b", ops=["embeddings"], transports=["http"]))
    a, b = reg.instances["a"], reg.instances["b"]
    assert a.ops == frozenset(Operation)
    assert Transport.WEBSOCKET in a.transports
    assert b.ops == {Operation.EMBEDDINGS} and b.transports == {Transport.HTTP}
    assert [i.name for i in reg.serving(Operation.EMBEDDINGS)] == ["a", "b"]
    assert [i.name for i in reg.serving(STT)] == ["a"]


def test_missing_credential_env_registers_the_instance_as_unavailable() -> None:
    """A credential whose env var is unset: registered, unavailable, reason names the var."""
    toml = '[[credentials]]\nname = "c"\napi_key_env = "SPEAR_TEST_KEY"\n' + backend(
        "a", credential_ref="c"
    )
    missing = registry(toml).instances["a"]
    assert missing.unavailable is not None and "SPEAR_TEST_KEY" in missing.unavailable
    present = registry(toml, {"SPEAR_TEST_KEY": "sk-secret"}).instances["a"]
    assert present.unavailable is None
    assert present.info.api_key is not None and present.info.api_key.reveal() == "sk-secret"
    assert "sk-secret" not in repr(present.info) and "sk-secret" not in str(present.describe())


def test_unknown_kind_is_a_config_error_naming_the_backend() -> None:
    """An unknown kind fails the build with the key backends[i].kind and the installed kinds."""
    with pytest.raises(ConfigError) as info:
        registry(backend("a") + '[[backends]]\nname = "b"\nkind = "no_such_kind"\n')
    assert info.value.key == "backends[1].kind"
    assert "stub" in info.value.reason


def test_kind_that_cannot_import_is_registered_unavailable() -> None:
    """A kind whose extra is missing: instance kept, reason BackendNotEnabled."""

    def loader(name: str) -> object:
        raise KindUnavailable(f"kind {name!r} could not be imported: no module")

    reg = BackendRegistry.build(config(backend("a")), loader=loader, environ={})  # type: ignore[arg-type]
    inst = reg.instances["a"]
    assert inst.kind is None
    assert inst.unavailable is not None and inst.unavailable.startswith("BackendNotEnabled")


def test_capabilities_lists_only_available_instances() -> None:
    """capabilities(): per operation, the live instances with their features and transports."""
    toml = '[[credentials]]\nname = "c"\napi_key_env = "UNSET_VAR"\n'
    toml += backend(
        "live", ops=["speech_to_text"], features=["supports_stream"], transports=["websocket"]
    )
    toml += backend("dead", ops=["speech_to_text"], credential_ref="c", features=["supports_tools"])
    caps = registry(toml).capabilities()
    assert caps == {
        "speech_to_text": {
            "instances": ["live"],
            "features": ["supports_stream"],
            "transports": ["websocket"],
        }
    }


def test_reload_keeps_runtime_state_of_unchanged_instances() -> None:
    """A rebuilt registry shares in-flight counters with the previous one by name."""
    old = registry(backend("a"))
    with lease(old.instances["a"]):
        new = BackendRegistry.build(config(backend("a") + backend("b")), previous=old, environ={})
        assert new.instances["a"].runtime.inflight == 1
    assert new.instances["a"].runtime.inflight == 0
    assert new.instances["b"].runtime.inflight == 0


def test_stub_kind_is_installed_under_the_entry_point() -> None:
    """load_kind finds the stub through the spear_rt.backends entry point."""
    kind = load_kind("stub")
    assert kind.name == "stub"
    assert isinstance(kind.defaults, InstanceDefaults)


# --- filter reasons ---------------------------------------------------------------------------


async def test_every_rejected_instance_gets_its_reason() -> None:
    """features, transports, model, allow/deny, credential, concurrency: each one a reason."""
    toml = '[[credentials]]\nname = "c"\napi_key_env = "UNSET_VAR"\n'
    toml += backend(
        "ok", features=["supports_stream", "supports_timestamps"], transports=["websocket"]
    )
    toml += backend("nofeat", features=["supports_stream"], transports=["websocket"])
    toml += backend(
        "notrans", features=["supports_stream", "supports_timestamps"], transports=["http"]
    )
    toml += backend(
        "othermodel", model="m2", features=["supports_timestamps"], transports=["websocket"]
    )
    toml += backend("denied", features=["supports_timestamps"], transports=["websocket"])
    toml += backend("outside", features=["supports_timestamps"], transports=["websocket"])
    toml += backend(
        "nokey", credential_ref="c", features=["supports_timestamps"], transports=["websocket"]
    )
    toml += backend(
        "busy",
        features=["supports_timestamps"],
        transports=["websocket"],
        limits={"max_concurrency": 1},
    )
    reg = registry(toml)
    reg.instances["busy"].runtime.inflight = 1
    req = request(
        features=frozenset({Feature.SUPPORTS_TIMESTAMPS}),
        transports=frozenset({Transport.WEBSOCKET}),
        model="m1",
        allowlist=("ok", "nofeat", "notrans", "othermodel", "denied", "nokey", "busy"),
        denylist=("denied",),
    )
    chosen, decision = Router(reg, random.Random(0)).explain(req)
    assert chosen is not None and chosen.name == "ok"
    reasons = decision.rejected_reasons
    assert reasons == {
        "nofeat": "missing features: supports_timestamps",
        "notrans": "missing transports: websocket",
        "othermodel": "serves model 'm2', not 'm1'",
        "denied": "in the request's denylist",
        "outside": "not in the request's allowlist",
        "nokey": reasons["nokey"],
        "busy": "at capacity: 1 in flight, max_concurrency 1",
    }
    assert (
        reasons["nokey"].startswith("unavailable: credential 'c'")
        and "UNSET_VAR" in reasons["nokey"]
    )
    assert decision.candidates_checked == 8
    assert decision.selected == "ok"


async def test_pinned_backend_narrows_to_that_instance() -> None:
    """?backend=b routes to b; the others are rejected as not requested."""
    reg = registry(backend("a") + backend("b"))
    chosen, decision = Router(reg, random.Random(0)).route(request(backend="b"))
    assert chosen.name == "b"
    assert decision.rejected_reasons == {"a": "not the requested backend 'b'"}


async def test_only_the_best_priority_tier_serves() -> None:
    """Higher priority wins; lower tiers stand by with a reason, and serve once it is gone."""
    toml = backend("primary", priority=10, limits={"max_concurrency": 1}) + backend(
        "fallback", priority=0
    )
    reg = registry(toml)
    router = Router(reg, random.Random(0))
    for _ in range(5):
        chosen, decision = router.route(request())
        assert chosen.name == "primary"
    assert decision.rejected_reasons == {"fallback": "standby: priority 0 < 10"}
    with lease(reg.instances["primary"]):
        chosen, decision = router.route(request())
    assert chosen.name == "fallback"
    assert decision.rejected_reasons["primary"].startswith("at capacity")


# --- errors that name what exists --------------------------------------------------------------


async def test_unknown_backend_names_the_configured_ones() -> None:
    """A pin to a backend that does not exist: InvalidRequest listing every configured name."""
    failure = route_error(registry(backend("b1") + backend("a1")), request(backend="nope"))
    assert failure.error.code is ErrorCode.INVALID_REQUEST
    assert '"nope"' in failure.error.message and "a1, b1" in failure.error.message


async def test_unknown_model_names_the_available_models() -> None:
    """Every instance declares a model and none matches: InvalidRequest listing the models."""
    reg = registry(backend("a", model="whisper-1") + backend("b", model="gpt-4o-transcribe"))
    failure = route_error(reg, request(model="nope"))
    assert failure.error.code is ErrorCode.INVALID_REQUEST
    assert "gpt-4o-transcribe, whisper-1" in failure.error.message


async def test_model_routing_keeps_the_instance_serving_it() -> None:
    """model=m picks the instance declaring m."""
    reg = registry(backend("a", model="m1") + backend("b", model="m2"))
    chosen, _ = Router(reg, random.Random(0)).route(request(model="m2"))
    assert chosen.name == "b"


async def test_no_instance_for_the_operation_is_no_candidate() -> None:
    """Nothing declares the op: NoCandidateBackend saying so, zero candidates checked."""
    failure = route_error(registry(backend("a", ops=["embeddings"])), request())
    error = failure.error
    assert error.code is ErrorCode.NO_CANDIDATE_BACKEND
    assert error.candidates_checked == 0
    assert "no configured backend serves speech_to_text" in error.message
    assert not error.retryable


async def test_only_capability_rejections_are_missing_capabilities() -> None:
    """Every instance lacks a capability: MissingCapabilities with the requirements summary."""
    reg = registry(backend("a", features=["supports_stream"]) + backend("b", transports=["http"]))
    failure = route_error(reg, request(features=frozenset({Feature.SUPPORTS_DIARIZATION})))
    error = failure.error
    assert error.code is ErrorCode.MISSING_CAPABILITIES
    assert error.required == {
        "operation": "speech_to_text",
        "features": ["supports_diarization"],
        "transports": [],
    }
    assert set(error.rejected_reasons or {}) == {"a", "b"}


async def test_unavailable_instances_are_no_candidate_not_missing_capabilities() -> None:
    """A capable but unavailable instance makes it NoCandidateBackend, not retryable."""
    toml = '[[credentials]]\nname = "c"\napi_key_env = "UNSET_VAR"\n'
    toml += backend("a", credential_ref="c") + backend("b", features=["supports_stream"])
    failure = route_error(
        registry(toml), request(features=frozenset({Feature.SUPPORTS_DIARIZATION}))
    )
    assert failure.error.code is ErrorCode.NO_CANDIDATE_BACKEND
    assert not failure.error.retryable


async def test_everything_at_capacity_is_retryable_with_a_retry_hint() -> None:
    """All capable instances busy: NoCandidateBackend, retryable, with retry_after_s."""
    reg = registry(backend("a", limits={"max_concurrency": 1}))
    with lease(reg.instances["a"]):
        failure = route_error(reg, request())
    assert failure.error.code is ErrorCode.NO_CANDIDATE_BACKEND
    assert failure.error.retryable
    assert failure.error.retry_after_s is not None and failure.error.retry_after_s > 0


async def test_unknown_policy_in_a_request_is_invalid_request() -> None:
    """A request naming a policy that does not exist is the caller's error."""
    req = request()
    req.policy = "no_such_policy"
    failure = route_error(registry(backend("a")), req)
    assert failure.error.code is ErrorCode.INVALID_REQUEST


# --- least_inflight (power of two choices) -----------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    loads=st.lists(st.tuples(st.integers(0, 20), st.integers(1, 5)), min_size=2, max_size=6),
    seed=st.integers(0, 2**32 - 1),
)
async def test_least_inflight_never_picks_the_more_loaded_of_two(
    loads: list[tuple[int, int]], seed: int
) -> None:
    """P2C: with two instances the less loaded (inflight/weight) always wins; with more, the
    unique most loaded never does."""
    toml = "".join(backend(f"i{n}", weight=w) for n, (_, w) in enumerate(loads))
    reg = registry(toml)
    for n, (inflight, _) in enumerate(loads):
        reg.instances[f"i{n}"].runtime.inflight = inflight
    ratio = {f"i{n}": i / w for n, (i, w) in enumerate(loads)}
    router = Router(reg, random.Random(seed))
    picks = [router.route(request())[0].name for _ in range(20)]
    top = max(ratio.values())
    most_loaded = [name for name, r in ratio.items() if r == top]
    if len(most_loaded) == 1 and len(set(ratio.values())) > 1:
        assert most_loaded[0] not in picks
    if len(loads) == 2 and ratio["i0"] != ratio["i1"]:
        assert set(picks) == {min(ratio, key=ratio.__getitem__)}
