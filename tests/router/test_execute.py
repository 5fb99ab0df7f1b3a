"""Executor: fallback with a retry budget, hedging with structured cancellation, mirroring.

Everything runs on trio's autojump clock: virtual time, exact instants, no real waiting.
Instances are given descending priorities so that routing order is deterministic: the
router tries `a`, then `b`, then `c`...
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

from spear_rt.backend import OneShotResponse
from spear_rt.config import HedgeConfig, MirrorConfig, RetryConfig
from spear_rt.errors import BackendFailure, CanonicalFailure
from spear_rt.ir import ErrorCode, Operation
from spear_rt.registry import BackendRegistry, RegisteredInstance, lease
from spear_rt.router import Router
from spear_rt.router.execute import Executor, RetryBudget, is_retryable
from spear_rt.router.health import BreakerState
from tests.router.support import CHAT, STT, backend, registry, request

Behaviour = Any  # "ok" | "stall" | "block" | BaseException | (seconds, Behaviour)


class Backends:
    """Scripted backends: what each instance does, and when each call started and ended."""

    def __init__(self, **behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.started: list[tuple[str, float]] = []
        self.cancelled: list[str] = []
        self.finished: list[str] = []
        self.release = trio.Event()

    @property
    def calls(self) -> list[str]:
        return [name for name, _ in self.started]

    def start_of(self, name: str) -> float:
        return next(t for n, t in self.started if n == name)

    async def __call__(self, inst: RegisteredInstance) -> str:
        self.started.append((inst.name, trio.current_time()))
        try:
            return await self._act(inst.name, self.behaviour.get(inst.name, "ok"))
        except trio.Cancelled:
            self.cancelled.append(inst.name)
            raise
        finally:
            self.finished.append(inst.name)

    async def _act(self, name: str, what: Behaviour) -> str:
        if isinstance(what, tuple):
            delay, what = what
            await trio.sleep(delay)
        if isinstance(what, BaseException):
            raise what
        if what == "stall":
            await trio.sleep_forever()
        if what == "block":
            await self.release.wait()
        return f"{name}-ok"


def tiered(*names: str, **sections: Any) -> BackendRegistry:
    """Instances in the given order with strictly descending priority."""
    count = len(names)
    return registry(*(backend(n, priority=count - i) for i, n in enumerate(names)), **sections)


def executor(reg: BackendRegistry, **kwargs: Any) -> tuple[Executor, Router]:
    rt = Router(reg, rng=random.Random(0))  # time: trio's (virtual) clock
    return Executor(lambda: rt, rng=random.Random(0), **kwargs), rt


def unavailable() -> BackendFailure:
    return BackendFailure("upstream 503", retryable=True, status=503)


def tasks() -> set[trio.lowlevel.Task]:
    """Every task alive in this run, found by walking the task tree from the root."""
    found: set[trio.lowlevel.Task] = set()
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        found.add(task)
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return found


# --- fallback ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [
        unavailable(),
        TimeoutError("upstream timed out"),
        BackendFailure("slow down", retryable=True, status=429),
    ],
    ids=["503", "timeout", "429"],
)
async def test_a_retryable_failure_falls_back_to_the_next_instance(
    autojump_clock: trio.testing.MockClock, failure: BaseException
) -> None:
    """a fails retryably, b answers: b's result after 2 attempts, one fallback counted."""
    backends = Backends(a=failure)
    ex, rt = executor(tiered("a", "b", "c"))
    done = await ex.run(request(), backends, idempotent=True)
    assert (done.result, done.instance.name, done.attempts, done.hedged) == ("b-ok", "b", 2, False)
    assert backends.calls == ["a", "b"]
    assert rt.metrics.fallbacks.get("chat_completions") == 1
    assert rt.metrics.errors.get("chat_completions", "a") == 1
    assert rt.metrics.errors.get("chat_completions", "b") == 0


async def test_fallback_walks_the_tiers_until_max_attempts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Every instance failing: a, b, c tried once each (max_attempts 3), d never; the error
    says how many attempts were made and stays retryable."""
    backends = Backends(a=unavailable(), b=unavailable(), c=unavailable())
    ex, rt = executor(
        tiered("a", "b", "c", "d"), retry=RetryConfig(max_attempts=3, min_retry_concurrency=10)
    )
    with pytest.raises(CanonicalFailure) as info:
        await ex.run(request(), backends, idempotent=True)
    assert backends.calls == ["a", "b", "c"]
    error = info.value.error
    assert error.code is ErrorCode.BACKEND_ERROR and error.retryable
    assert error.message == "upstream 503 (after 3 attempts)"
    assert rt.metrics.fallbacks.get("chat_completions") == 2


async def test_running_out_of_instances_ends_the_fallback(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two instances, both failing, max_attempts 5: each tried once, then the last failure."""
    backends = Backends(a=unavailable(), b=TimeoutError("too slow"))
    ex, _ = executor(tiered("a", "b"), retry=RetryConfig(max_attempts=5, min_retry_concurrency=10))
    with pytest.raises(CanonicalFailure) as info:
        await ex.run(request(), backends, idempotent=True)
    assert backends.calls == ["a", "b"]
    assert info.value.error.code is ErrorCode.TIMEOUT
    assert info.value.error.message == "too slow (after 2 attempts)"


async def test_non_idempotent_requests_never_fall_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A retryable failure of a non-idempotent request is raised as it is; b is never called."""
    backends = Backends(a=unavailable())
    ex, rt = executor(tiered("a", "b"))
    with pytest.raises(BackendFailure) as info:
        await ex.run(request(), backends, idempotent=False)
    assert info.value.status == 503
    assert backends.calls == ["a"]
    assert rt.metrics.fallbacks.get("chat_completions") == 0


async def test_non_retryable_failures_never_fall_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A 400 from the backend (not retryable) is raised as it is; b is never called."""
    backends = Backends(a=BackendFailure("bad request", retryable=False, status=400))
    ex, _ = executor(tiered("a", "b"))
    with pytest.raises(BackendFailure):
        await ex.run(request(), backends, idempotent=True)
    assert backends.calls == ["a"]


async def test_the_retry_budget_stops_retries(autojump_clock: trio.testing.MockClock) -> None:
    """One retry in flight and no percent: while the first request's fallback is running, a
    second request gets no retry; once it has answered, a retry is allowed again."""
    backends = Backends(a=unavailable(), b="block")
    ex, rt = executor(
        tiered("a", "b"),
        retry=RetryConfig(max_attempts=5, budget_percent=0.0, min_retry_concurrency=1),
    )
    results: list[str] = []

    async def first() -> None:
        results.append((await ex.run(request(), backends, idempotent=True)).instance.name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        await trio.testing.wait_all_tasks_blocked()
        assert backends.calls == ["a", "b"]  # the first request's retry is in flight
        with pytest.raises(CanonicalFailure) as refused:
            await ex.run(request(), backends, idempotent=True)
        assert refused.value.error.message == "upstream 503 (after 1 attempt)"
        backends.release.set()
    assert results == ["b"]
    assert (await ex.run(request(), backends, idempotent=True)).instance.name == "b"
    assert backends.calls == ["a", "b", "a", "a", "b"]
    assert rt.metrics.fallbacks.get("chat_completions") == 2


def test_the_retry_budget_allows_a_percent_of_requests_in_flight() -> None:
    """budget_percent 50, no floor: 4 requests in flight allow 2 retries at once, not 3."""
    budget = RetryBudget(RetryConfig(budget_percent=50.0, min_retry_concurrency=0))
    assert not budget.try_retry()
    budget.active_requests = 4
    assert [budget.try_retry() for _ in range(3)] == [True, True, False]
    budget.active_requests = 2  # two requests ended: their share of the budget went with them
    budget.retry_done()
    assert not budget.try_retry()
    budget.retry_done()
    assert budget.try_retry()


async def test_a_router_refusal_before_any_attempt_is_not_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Everything at capacity: the router's own retryable answer reaches the caller unchanged
    (retry_after, no '(after N attempts)'), and no fallback is counted."""
    reg = registry(backend("a", limits={"max_concurrency": 1}))
    backends = Backends()
    ex, rt = executor(reg)
    with lease(reg.instances["a"]), pytest.raises(CanonicalFailure) as info:
        await ex.run(request(), backends, idempotent=True)
    error = info.value.error
    assert error.code is ErrorCode.NO_CANDIDATE_BACKEND and error.retryable
    assert error.retry_after_s is not None
    assert error.message == "every backend instance for chat_completions is at capacity"
    assert backends.calls == []
    assert rt.metrics.fallbacks.get("chat_completions") == 0


def test_what_is_retryable() -> None:
    """Retryable backend failures, timeouts and retryable canonical errors; nothing else."""
    assert is_retryable(unavailable()) and is_retryable(TimeoutError())
    assert not is_retryable(BackendFailure("no", retryable=False, status=400))
    assert is_retryable(CanonicalFailure.of(ErrorCode.RATE_LIMITED, "later", retryable=True))
    assert not is_retryable(CanonicalFailure.of(ErrorCode.INVALID_REQUEST, "no"))
    assert not is_retryable(ValueError())


# --- hedging -------------------------------------------------------------------------------------

HEDGE = HedgeConfig(operations=["chat_completions"], k=2, delay_ms=50.0)


async def test_a_hedge_starts_at_the_delay_wins_and_cancels_the_loser(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """a stalls; b starts at exactly t0 + 50 ms and answers; run returns at that instant with
    b's result; a observed its cancellation and finished before run returned; no task is left;
    a's breaker saw neither success nor failure."""
    reg = tiered("a", "b")
    backends = Backends(a="stall")
    ex, rt = executor(reg, hedge=HEDGE)
    before = tasks()
    t0 = trio.current_time()
    done = await ex.run(request(), backends, idempotent=True)
    assert trio.current_time() == t0 + 0.05
    assert backends.start_of("a") == t0 and backends.start_of("b") == t0 + 0.05
    assert (done.result, done.instance.name, done.hedged, done.attempts) == ("b-ok", "b", True, 2)
    assert backends.cancelled == ["a"] and sorted(backends.finished) == ["a", "b"]
    assert tasks() == before
    a = reg.instances["a"].runtime
    assert a.inflight == 0 and reg.instances["b"].runtime.inflight == 0
    assert (
        a.breaker.state is BreakerState.CLOSED and a.breaker.error_rate(trio.current_time()) == 0.0
    )
    assert a.interval_failures == 0
    assert rt.metrics.errors.get("chat_completions", "a") == 0
    assert rt.metrics.latency.count("chat_completions", "a") == 0
    assert rt.metrics.hedges.get("chat_completions") == 1


async def test_every_loser_of_a_wider_hedge_is_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """k=3: a and b stall, c starts at 100 ms and wins; both stalled calls are cancelled."""
    backends = Backends(a="stall", b="stall")
    ex, rt = executor(
        tiered("a", "b", "c"),
        hedge=HedgeConfig(operations=["chat_completions"], k=3, delay_ms=50.0),
    )
    before = tasks()
    t0 = trio.current_time()
    done = await ex.run(request(), backends, idempotent=True)
    assert done.instance.name == "c" and backends.start_of("c") == t0 + 0.1
    assert sorted(backends.cancelled) == ["a", "b"]
    assert tasks() == before
    assert rt.metrics.hedges.get("chat_completions") == 2


async def test_no_hedge_when_the_first_answers_in_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """a answers at 10 ms: nothing else starts, not hedged, one attempt."""
    backends = Backends(a=(0.01, "ok"))
    ex, rt = executor(tiered("a", "b"), hedge=HEDGE)
    t0 = trio.current_time()
    done = await ex.run(request(), backends, idempotent=True)
    assert trio.current_time() == t0 + 0.01
    assert backends.calls == ["a"] and not done.hedged and done.attempts == 1
    assert rt.metrics.hedges.get("chat_completions") == 0


async def test_a_fast_failure_starts_the_hedge_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """a fails at 5 ms: b starts then, not at 50 ms."""
    backends = Backends(a=(0.005, unavailable()))
    ex, _ = executor(tiered("a", "b"), hedge=HEDGE)
    t0 = trio.current_time()
    done = await ex.run(request(), backends, idempotent=True)
    assert backends.start_of("b") == t0 + 0.005
    assert done.instance.name == "b"


async def test_a_hedge_where_every_attempt_fails_counts_its_attempts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Both hedged attempts fail: the request fails after 2 attempts (not 0), no third call."""
    backends = Backends(a=unavailable(), b=(0.01, unavailable()))
    ex, _ = executor(
        tiered("a", "b"), hedge=HEDGE, retry=RetryConfig(max_attempts=5, min_retry_concurrency=10)
    )
    with pytest.raises(CanonicalFailure) as info:
        await ex.run(request(), backends, idempotent=True)
    assert backends.calls == ["a", "b"]
    assert info.value.error.message == "upstream 503 (after 2 attempts)"


async def test_a_hedged_request_nobody_can_take_gets_the_routers_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """No candidate for a hedged operation: the CanonicalFailure itself, not an exception group."""
    backends = Backends()
    ex, _ = executor(tiered("a", "b"), hedge=HEDGE)
    with pytest.raises(CanonicalFailure) as info:
        await ex.run(request(transports=["grpc"]), backends, idempotent=True)  # type: ignore[list-item]
    assert info.value.error.code is ErrorCode.MISSING_CAPABILITIES
    assert backends.calls == []


async def test_non_idempotent_requests_are_never_hedged(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A hedge would send the request twice: a non-idempotent request waits for a instead."""
    backends = Backends(a=(0.2, "ok"))
    ex, rt = executor(tiered("a", "b"), hedge=HEDGE)
    done = await ex.run(request(), backends, idempotent=False)
    assert backends.calls == ["a"] and not done.hedged
    assert rt.metrics.hedges.get("chat_completions") == 0


async def test_a_non_retryable_failure_stops_the_hedge(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """a refuses the request as invalid: no hedge to b, the refusal reaches the caller."""
    refusal = BackendFailure("bad request", retryable=False, status=400)
    backends = Backends(a=refusal)
    ex, _ = executor(tiered("a", "b"), hedge=HEDGE)
    with pytest.raises(BackendFailure, match="bad request"):
        await ex.run(request(), backends, idempotent=True)
    assert backends.calls == ["a"]


async def test_a_callers_own_error_in_a_hedge_is_raised_as_itself(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A bug in the call (ValueError) comes out as that ValueError, not an exception group."""
    backends = Backends(a=ValueError("caller bug"))
    ex, _ = executor(tiered("a", "b"), hedge=HEDGE)
    with pytest.raises(ValueError, match="caller bug"):
        await ex.run(request(), backends, idempotent=True)


async def test_concurrent_hedged_requests_do_not_share_state(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two hedged requests at once: each hedges at its own 50 ms and gets its own winner."""
    backends = Backends(a="stall")
    ex, _ = executor(tiered("a", "b", "c"), hedge=HEDGE)
    results: list[str] = []

    async def one() -> None:
        results.append((await ex.run(request(), backends, idempotent=True)).result)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one)
        nursery.start_soon(one)
    assert sorted(results) == ["b-ok", "b-ok"]
    assert backends.cancelled == ["a", "a"]


async def test_operations_not_named_for_hedging_are_not_hedged(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """speech_to_text is not in [policy.hedge] operations: a slow a is simply waited for."""
    backends = Backends(a=(0.2, "ok"))
    ex, _ = executor(tiered("a", "b"), hedge=HEDGE)
    t0 = trio.current_time()
    done = await ex.run(request(STT), backends, idempotent=True)
    assert trio.current_time() == t0 + 0.2
    assert backends.calls == ["a"] and done.instance.name == "a"


# --- mirroring -----------------------------------------------------------------------------------


def mirrored(queue: int = 4, sample_rate: float = 1.0) -> tuple[Executor, Router, BackendRegistry]:
    reg = tiered("primary", "shadow")
    config = MirrorConfig(
        instance="shadow", sample_rate=sample_rate, operations=["chat_completions"], queue=queue
    )
    ex, rt = executor(reg, mirror=config)
    return ex, rt, reg


async def test_the_caller_never_waits_for_the_mirror(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """run() returns the primary's answer at once while the mirror call is still blocked on an
    event the test only sets afterwards; the mirror then completes on its own."""
    ex, rt, reg = mirrored()
    nursery.start_soon(ex.mirror_worker)
    backends = Backends(shadow="block")
    t0 = trio.current_time()
    done = await ex.run(request(), backends, idempotent=True)
    assert done.result == "primary-ok" and trio.current_time() == t0
    await trio.testing.wait_all_tasks_blocked()
    assert backends.calls == ["primary", "shadow"]
    assert "shadow" not in backends.finished and reg.instances["shadow"].runtime.inflight == 1
    second = await ex.run(request(), backends, idempotent=True)  # still not waiting
    assert second.result == "primary-ok" and trio.current_time() == t0
    backends.release.set()
    await trio.testing.wait_all_tasks_blocked()
    assert backends.finished.count("shadow") == 2
    assert reg.instances["shadow"].runtime.inflight == 0
    assert rt.metrics.mirrors.get("chat_completions") == 2


async def test_a_mirrored_stream_is_read_to_its_end_and_closed(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """A streamed answer of the shadow is consumed and closed by the worker (it was dropped
    unread: the upstream request of openai_http stayed open)."""
    ex, _, _ = mirrored()
    nursery.start_soon(ex.mirror_worker)
    read: list[bytes] = []
    closed = trio.Event()

    async def chunks() -> AsyncIterator[bytes]:
        try:
            for chunk in (b"data: 1\n\n", b"data: [DONE]\n\n"):
                yield chunk
                read.append(chunk)
        finally:
            closed.set()

    async def call(inst: RegisteredInstance) -> OneShotResponse:
        return OneShotResponse(stream=chunks() if inst.name == "shadow" else None)

    await ex.run(request(), call, idempotent=True)
    with trio.fail_after(5):
        await closed.wait()
    assert read == [b"data: 1\n\n", b"data: [DONE]\n\n"]


async def test_mirror_failures_never_reach_the_caller(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """A failing mirror: the caller gets its answers, the worker keeps going, metrics count it."""
    ex, rt, _ = mirrored()
    nursery.start_soon(ex.mirror_worker)
    backends = Backends(shadow=unavailable())
    for _ in range(3):
        assert (await ex.run(request(), backends, idempotent=True)).result == "primary-ok"
        await trio.testing.wait_all_tasks_blocked()
    assert backends.calls.count("shadow") == 3
    assert rt.metrics.errors.get("chat_completions", "shadow") == 3


async def test_a_full_mirror_queue_drops_and_counts(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """Queue of 1 and a blocked mirror: one copy in flight, one queued, the third dropped."""
    ex, _, _ = mirrored(queue=1)
    nursery.start_soon(ex.mirror_worker)
    backends = Backends(shadow="block")
    for _ in range(3):
        await ex.run(request(), backends, idempotent=True)
        await trio.testing.wait_all_tasks_blocked()
    assert ex.mirror_dropped == 1
    backends.release.set()
    await trio.testing.wait_all_tasks_blocked()
    assert backends.calls.count("shadow") == 2


async def test_only_sampled_requests_of_named_operations_are_mirrored(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """sample_rate 0 mirrors nothing; an operation not named is never mirrored."""
    for ex, op in ((mirrored(sample_rate=0.0)[0], CHAT), (mirrored()[0], Operation.EMBEDDINGS)):
        nursery.start_soon(ex.mirror_worker)
        backends = Backends()
        await ex.run(request(op), backends, idempotent=True)
        await trio.testing.wait_all_tasks_blocked()
        assert backends.calls == ["primary"]
