"""Prometheus exposition (spear_rt.metrics) and the router's series moving as requests go.

(spear_rt/metrics.py is checked here, beside the router that feeds it.)
"""

from __future__ import annotations

import math
import random
import re
from collections import defaultdict

import pytest
import trio
import trio.testing

from spear_rt.config import HedgeConfig
from spear_rt.errors import BackendFailure, CanonicalFailure
from spear_rt.ir import Feature
from spear_rt.metrics import LATENCY_BUCKETS_S, MetricsRegistry
from spear_rt.registry import RegisteredInstance
from spear_rt.router import Router
from spear_rt.router.execute import Executor
from tests.router.support import CHAT, FakeClock, backend, registry, request

SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r'(?:\{(?P<labels>(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*)\})?'
    r" (?P<value>[+-]?(?:Inf|NaN|[0-9.eE+-]+))$"
)
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\.)*)"')
Labels = tuple[tuple[str, str], ...]


def parse(text: str) -> dict[str, dict[tuple[str, Labels], float]]:
    """Validate Prometheus text format and return family -> {(sample name, labels): value}.

    Checks: text ends with a newline; every family has HELP then TYPE before its samples;
    sample names belong to the family's type; histogram buckets are cumulative, end in
    le="+Inf" and that bucket equals _count."""
    assert text.endswith("\n")
    families: dict[str, dict[tuple[str, Labels], float]] = {}
    kinds: dict[str, str] = {}
    current: str | None = None
    helped: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in helped, f"second HELP for {name}"
            helped.add(name)
            current = None
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name in helped and name not in kinds, line
            assert kind in {"counter", "gauge", "histogram", "summary", "untyped"}
            kinds[name], current = kind, name
            families[name] = {}
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        assert current is not None, f"sample before its TYPE: {line!r}"
        suffixes = ("_bucket", "_sum", "_count") if kinds[current] == "histogram" else ("",)
        assert match["name"] in {current + s for s in suffixes}, line
        labels = tuple(LABEL.findall(match["labels"] or ""))
        value = float(match["value"].replace("Inf", "inf"))
        families[current][(match["name"], labels)] = value
    for name, kind in kinds.items():
        if kind == "histogram":
            check_histogram(name, families[name])
    return families


def check_histogram(name: str, samples: dict[tuple[str, Labels], float]) -> None:
    buckets: dict[Labels, list[tuple[float, float]]] = defaultdict(list)
    for (sample, labels), value in samples.items():
        if sample == name + "_bucket":
            le = dict(labels)["le"]
            rest = tuple(kv for kv in labels if kv[0] != "le")
            buckets[rest].append((math.inf if le == "+Inf" else float(le), value))
    for rest, series in buckets.items():
        bounds = [b for b, _ in series]
        counts = [c for _, c in series]
        assert bounds == sorted(bounds) and bounds[-1] == math.inf
        assert counts == sorted(counts), "buckets must be cumulative"
        assert counts[-1] == samples[(name + "_count", rest)]
        assert (name + "_sum", rest) in samples


def value(
    families: dict[str, dict[tuple[str, Labels], float]],
    family: str,
    sample: str | None = None,
    **labels: str,
) -> float:
    return families[family].get((sample or family, tuple(labels.items())), 0.0)


# --- exposition ----------------------------------------------------------------------------------


def test_render_is_valid_prometheus_text() -> None:
    """Counters, gauges (set and computed at scrape time) and histograms pass the format check."""
    metrics = MetricsRegistry()
    hits = metrics.counter("app_hits_total", "Hits", ("route",))
    hits.inc("/a")
    hits.inc("/a", amount=2)
    metrics.gauge("app_up", "Up").set(value=1)
    metrics.gauge("app_live", "Live", ("pool",), callback=lambda: {("x",): 3.0})
    latency = metrics.histogram("app_seconds", "Latency", ("route",))
    for v in (0.0005, 0.001, 0.003, 0.2, 45.0):
        latency.observe(v, "/a")
    families = parse(metrics.render())
    assert value(families, "app_hits_total", route="/a") == 3
    assert value(families, "app_up") == 1 and value(families, "app_live", pool="x") == 3
    assert value(families, "app_seconds", "app_seconds_count", route="/a") == 5
    assert value(families, "app_seconds", "app_seconds_sum", route="/a") == pytest.approx(45.2045)


def test_histogram_buckets_are_cumulative_and_end_in_inf_equal_to_count() -> None:
    """le is inclusive; values above the last bound count only in +Inf."""
    metrics = MetricsRegistry()
    h = metrics.histogram("h_seconds", "H")
    for v in (0.001, 0.001, 0.004, 31.0, 31.0):
        h.observe(v)
    lines = metrics.render().splitlines()
    bucket: dict[str, float] = {}
    for line in lines:
        m = re.match(r'h_seconds_bucket\{le="([^"]+)"\} (\S+)$', line)
        if m:
            bucket[m[1]] = float(m[2])
    assert list(bucket) == [f"{b:g}" for b in LATENCY_BUCKETS_S] + ["+Inf"]
    assert bucket["0.001"] == 2 and bucket["0.0025"] == 2 and bucket["0.005"] == 3
    assert bucket["30"] == 3 and bucket["+Inf"] == 5
    assert "h_seconds_count 5" in lines
    parse(metrics.render())


def test_large_and_fractional_values_are_rendered_exactly() -> None:
    """1 234 567 is not rounded to 1.23457e+06; fractions keep every digit; inf is +Inf."""
    metrics = MetricsRegistry()
    c = metrics.counter("big_total", "Big", ("k",))
    c.inc("n", amount=1_234_567)
    c.inc("f", amount=0.1)
    c.inc("f", amount=0.2)
    metrics.gauge("g", "G").set(value=math.inf)
    text = metrics.render()
    assert 'big_total{k="n"} 1234567\n' in text
    assert f'big_total{{k="f"}} {0.1 + 0.2!r}\n' in text
    assert "g +Inf\n" in text
    parse(text)


def test_label_values_and_help_are_escaped() -> None:
    """Quotes, backslashes and newlines in label values and help cannot break a line."""
    metrics = MetricsRegistry()
    metrics.counter("esc_total", "Help with \\ and\nnewline", ("v",)).inc('a"b\\c\nd')
    text = metrics.render()
    assert "# HELP esc_total Help with \\\\ and\\nnewline\n" in text
    assert 'esc_total{v="a\\"b\\\\c\\nd"} 1\n' in text
    parse(text)


def test_metric_names_are_unique() -> None:
    """Registering a name twice is refused."""
    metrics = MetricsRegistry()
    metrics.counter("x_total", "X")
    with pytest.raises(ValueError):
        metrics.histogram("x_total", "X again")


# --- the router's series -------------------------------------------------------------------------


async def test_router_counters_move_with_attempts_errors_timeouts_and_429s() -> None:
    """requests/errors/timeouts/rate-limited/latency per operation and instance, no-candidate
    per operation and code, all visible in one valid rendering."""
    clock = FakeClock()
    metrics = MetricsRegistry()
    reg = registry(backend("a"), backend("b", transports=["grpc"]))
    rt = Router(reg, rng=random.Random(0), clock=clock, metrics=metrics)
    a = reg.instances["a"]

    def call(outcome: BaseException | None, seconds: float = 0.02):  # type: ignore[no-untyped-def]
        async def run(_: RegisteredInstance) -> str:
            clock.advance(seconds)
            if outcome is not None:
                raise outcome
            return "ok"

        return run

    await rt.attempt(a, call(None), CHAT)
    await rt.attempt(a, call(None, 2.0), CHAT)
    for outcome in (
        BackendFailure("down", retryable=True, status=503),
        TimeoutError(),
        BackendFailure("slow down", retryable=True, status=429),
    ):
        with pytest.raises((BackendFailure, TimeoutError)):
            await rt.attempt(a, call(outcome), CHAT)
    with pytest.raises(CanonicalFailure):
        rt.route(request(features=[Feature.SUPPORTS_DIARIZATION]))
    families = parse(metrics.render())
    labels = {"operation": "chat_completions", "instance": "a"}
    assert value(families, "spear_requests_total", **labels) == 5
    assert value(families, "spear_errors_total", **labels) == 3
    assert value(families, "spear_timeouts_total", **labels) == 1
    assert value(families, "spear_rate_limited_total", **labels) == 1
    latency = "spear_request_latency_seconds"
    assert value(families, latency, latency + "_count", **labels) == 2  # successes only
    assert value(families, latency, latency + "_bucket", **labels, le="0.025") == 1
    assert value(families, latency, latency + "_sum", **labels) == pytest.approx(2.02)
    assert (
        value(
            families,
            "spear_no_candidate_total",
            operation="chat_completions",
            code="MissingCapabilities",
        )
        == 1
    )


async def test_fallbacks_and_hedges_are_counted(autojump_clock: trio.testing.MockClock) -> None:
    """One fallback after a 503, one hedge after a stall: each shows in its counter."""
    metrics = MetricsRegistry()
    reg = registry(backend("a", priority=2), backend("b", priority=1))
    rt = Router(reg, rng=random.Random(0), metrics=metrics)

    async def fail_a(inst: RegisteredInstance) -> str:
        if inst.name == "a":
            raise BackendFailure("down", retryable=True, status=503)
        return "ok"

    async def stall_a(inst: RegisteredInstance) -> str:
        if inst.name == "a":
            await trio.sleep_forever()
        return "ok"

    await Executor(lambda: rt).run(request(), fail_a, idempotent=True)
    hedging = Executor(
        lambda: rt, hedge=HedgeConfig(operations=["chat_completions"], k=2, delay_ms=10)
    )
    await hedging.run(request(), stall_a, idempotent=True)
    families = parse(metrics.render())
    assert value(families, "spear_fallbacks_total", operation="chat_completions") == 1
    assert value(families, "spear_hedges_total", operation="chat_completions") == 1
    assert value(families, "spear_errors_total", operation="chat_completions", instance="a") == 1
