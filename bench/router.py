#!/usr/bin/env python3
"""Router decision cost: `Router.route` per policy at 10, 100 and 1000 instances.

What one cell measures: one call of `Router.route(req)` on a prepared request, the whole
decision (name checks, outlier bookkeeping, filtering with reasons, priority tiers, the
policy's selection, the explanation), with no backend call. Instances are built in process
from a small in-bench kind (no I/O); every instance serves every operation, declares
features, transports, a weight (1-5), a price, and half of them limits (max_concurrency 64,
a token bucket that never runs dry), so the filter does its real work on every instance and
rejects none of them (scenario `eligible`), or one of them is at max_concurrency, so every
decision also rejects one instance at decision time (scenario `one-busy`: the filter's slow
path). The clock is `time.monotonic` (the outlier evaluation runs on its
10 s interval as in the server). Requests rotate over 1024 prepared envelopes with distinct
request ids and hash keys, so consistent_hash sees many keys; the rest ignore them.

Timing: per call, `time.perf_counter_ns()` around `route` after a warm-up; p50/p99/mean in
µs over `--calls` timed calls (the timer's own cost, measured on an empty call, is in the
JSON as `timer_overhead_ns` and is not subtracted). GC stays on, as in the server.

Target (issue 3): p50 <= 20 µs at 100 instances for every single-selection policy.

    python bench/router.py                      # all policies, 10/100/1000, both scenarios
    python bench/router.py --sizes 100 --policies ewma_latency,consistent_hash --calls 50000

Prints a markdown table and writes bench/results/router-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from spear_rt.backend import InstanceDefaults, InstanceInfo
from spear_rt.config import parse_config
from spear_rt.ir import (
    CanonicalRequestEnvelope,
    Feature,
    Operation,
    RequestRequirements,
    RoutingHints,
    Transport,
)
from spear_rt.registry import BackendRegistry
from spear_rt.router import Router

POLICIES = (
    "round_robin",
    "weighted_round_robin",
    "weighted_random",
    "least_inflight",
    "ewma_latency",
    "consistent_hash",
    "lowest_cost",
    "priority_fallback",
)
TARGET_P50_US = 20.0
TARGET_SIZE = 100
RESULTS = Path(__file__).resolve().parent / "results"


class BenchKind:
    """A backend kind that exists only to be routed to."""

    name = "bench"
    extra = None
    defaults = InstanceDefaults(ops=frozenset(Operation))

    def unavailable_reason(self, instance: InstanceInfo) -> str | None:
        return None


def config_text(n: int, policy: str) -> str:
    parts = [f'[policy]\ndefault = "{policy}"\n']
    for i in range(n):
        parts.append(
            f'[[backends]]\nname = "inst-{i:04d}"\nkind = "bench"\nweight = {1 + i % 5}\n'
            'features = ["supports_stream", "supports_tools"]\ntransports = ["http", "websocket"]\n'
            f"[backends.price]\nper_1k_input_tokens = {0.5 + (i * 7919) % 97 / 100}\n"
            "per_1k_output_tokens = 1.5\n"
        )
        if i % 2:
            parts.append("[backends.limits]\nmax_concurrency = 64\nrate_per_s = 1000000\n")
    return "".join(parts)


def requests(count: int = 1024) -> list[CanonicalRequestEnvelope]:
    return [
        CanonicalRequestEnvelope(
            request_id=f"req_{k}",
            operation=Operation.CHAT_COMPLETIONS,
            task_id=f"task_{k}",
            routing=RoutingHints(hash_key=f"session-{k}"),
            requirements=RequestRequirements(
                required_features=frozenset({Feature.SUPPORTS_STREAM}),
                required_transports=frozenset({Transport.HTTP}),
            ),
        )
        for k in range(count)
    ]


def build_router(n: int, policy: str, seed: int, scenario: str = "eligible") -> Router:
    config = parse_config(config_text(n, policy), "bench")
    registry = BackendRegistry.build(config, loader=lambda _: BenchKind(), environ={})  # type: ignore[arg-type, return-value]
    router = Router(registry, rng=random.Random(seed), clock=time.monotonic)
    # Some realistic signals: a few requests in flight, latency history for ewma_latency.
    rng = random.Random(seed)
    for inst in registry.instances.values():
        inst.runtime.inflight = rng.randrange(4)
    if scenario == "one-busy":
        registry.instances["inst-0001"].runtime.inflight = 64  # its max_concurrency
    ewma = router._policy("ewma_latency")
    now = time.monotonic()
    for inst in registry.instances.values():
        ewma.observe(inst.name, rng.uniform(0.05, 0.5), now)  # type: ignore[attr-defined]
    return router


def timer_overhead_ns(calls: int) -> float:
    clock = time.perf_counter_ns
    samples = []
    for _ in range(calls):
        t0 = clock()
        samples.append(clock() - t0)
    return statistics.median(samples)


def measure(
    n: int, policy: str, calls: int, warmup: int, seed: int, scenario: str
) -> dict[str, Any]:
    router = build_router(n, policy, seed, scenario)
    reqs = requests()
    mask = len(reqs) - 1
    route = router.route
    clock = time.perf_counter_ns
    chosen: dict[str, int] = {}
    for k in range(warmup):
        inst, _ = route(reqs[k & mask])
        chosen[inst.name] = chosen.get(inst.name, 0) + 1
    samples = [0] * calls
    for k in range(calls):
        req = reqs[k & mask]
        t0 = clock()
        route(req)
        samples[k] = clock() - t0
    samples.sort()
    us = [s / 1000 for s in samples]
    return {
        "scenario": scenario,
        "policy": policy,
        "instances": n,
        "calls": calls,
        "p50_us": us[len(us) // 2],
        "p99_us": us[min(len(us) - 1, int(len(us) * 0.99))],
        "mean_us": sum(us) / len(us),
        "max_us": us[-1],
        "distinct_selected_in_warmup": len(chosen),
    }


def table(rows: list[dict[str, Any]], sizes: list[int]) -> str:
    head = (
        f"| policy ({rows[0]['scenario']}) | "
        + " | ".join(f"{n} inst p50 / p99 (µs)" for n in sizes)
        + " |"
    )
    lines = [head, "|---|" + "---:|" * len(sizes)]
    by = {(r["policy"], r["instances"]): r for r in rows}
    for policy in dict.fromkeys(r["policy"] for r in rows):
        cells = []
        for n in sizes:
            r = by.get((policy, n))
            if r is None:
                cells.append("-")
                continue
            miss = n == TARGET_SIZE and r["p50_us"] > TARGET_P50_US
            cells.append(f"{r['p50_us']:.1f} / {r['p99_us']:.1f}" + (" ✗" if miss else ""))
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,100,1000", help="instance counts (comma-separated)")
    parser.add_argument("--policies", default=",".join(POLICIES), help="policies (comma-separated)")
    parser.add_argument("--calls", type=int, default=20000, help="timed calls per cell")
    parser.add_argument("--warmup", type=int, default=2000, help="untimed calls per cell first")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scenarios", default="eligible,one-busy", help="eligible and/or one-busy")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default: bench/results/)"
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    policies = [p for p in args.policies.split(",") if p]
    unknown = set(policies) - set(POLICIES)
    if unknown:
        parser.error(f"unknown policies: {', '.join(sorted(unknown))}")

    scenarios = [x for x in args.scenarios.split(",") if x]
    if set(scenarios) - {"eligible", "one-busy"}:
        parser.error("scenarios: eligible, one-busy")

    overhead = timer_overhead_ns(100_000)
    load_before = os.getloadavg()
    rows = []
    for scenario in scenarios:
        for policy in policies:
            for n in sizes:
                row = measure(n, policy, args.calls, args.warmup, args.seed, scenario)
                rows.append(row)
                print(
                    f"  {scenario:9s} {policy:22s} {n:5d}  p50 {row['p50_us']:8.2f} µs"
                    f"  p99 {row['p99_us']:8.2f} µs",
                    file=sys.stderr,
                )
    for scenario in scenarios:
        print(table([r for r in rows if r["scenario"] == scenario], sizes) + "\n")
    print(
        f"load average before/after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f} "
        f"on {os.cpu_count()} CPUs (p99 is preemption-sensitive)"
    )
    misses = [r for r in rows if r["instances"] == TARGET_SIZE and r["p50_us"] > TARGET_P50_US]
    if TARGET_SIZE in sizes:
        verdict = "every policy meets" if not misses else f"{len(misses)} policies miss"
        print(f"target p50 <= {TARGET_P50_US:g} µs at {TARGET_SIZE} instances: {verdict}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or RESULTS / f"router-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "bench": "router",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "timer_overhead_ns": overhead,
        "loadavg_1min_before_after": [load_before[0], os.getloadavg()[0]],
        "cpus": os.cpu_count(),
        "target": {"instances": TARGET_SIZE, "p50_us": TARGET_P50_US},
        "rows": rows,
    }
    out.write_bytes(msgspec.json.format(msgspec.json.encode(report)))
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
