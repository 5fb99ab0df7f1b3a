#!/usr/bin/env python3
"""Cluster bench: workers on one machine, and three nodes sharing a redis-server.

1. Workers ladder: `spear-rt serve` (one process) and `spear-rt serve --workers 2`, stub
   backend, N transcription sessions from the anchors' load generator (`rt_loadgen.py
   --commit-every-10`: 20 ms appends, a commit every 10, latency = 10th append -> its delta),
   CPU and RSS of the whole server tree. Nothing is pinned: the two workers and the generator
   share this machine's cores (say so next to the figures).
2. Three nodes on 127.0.0.2-4 (trio, asyncio, uvloop) and one redis-server:
   * sessions held: one generator per node at once, N each;
   * resume on another node: open a session on node i, lose the socket, resume on node i+1,
     time from the reconnect to `spear.session.resumed`; the same on the owning node beside it;
   * rate-limit accuracy: one key at R/s burst B, requests round-robin over the nodes at
     about 3R/s for T s: served vs B + R·T;
   * breaker propagation: an instance nothing listens for, failed twice on node 0 (its breaker
     opens), time until nodes 1 and 2 report its circuit open (`/v1/route/explain`).

Prints a table, writes bench/results/cluster-<time>.json and .png (with matplotlib).
Loopback only; every step is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parents[1]
ANCHORS = Path(os.environ.get("SPEAR_ANCHORS", "/work/shared/anchors"))
RESULTS = ROOT / "bench" / "results"
SPEAR = str(Path(sys.executable).parent / "spear-rt")
KEY = "bench-key-0123456789"
OPS_KEY = "bench-ops-key-0123456789"  # the breaker step's: the rate step empties KEY's bucket
BETA = {"OpenAI-Beta": "realtime=v1"}
FIRST_EVENT = '{"type":"transcription_session.update","session":{"turn_detection":null}}'


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, process: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise SystemExit(f"{url}: the server exited")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url}: not up after {timeout_s} s")
        time.sleep(0.05)


def wait_workers(port: int, workers: int, timeout_s: float = 30) -> None:
    """Until every worker has answered /healthz (each listens on the port by then)."""
    if workers == 1:
        return
    seen: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(seen) < workers:  # a new connection each time: the kernel picks the worker
        seen.add(httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).json()["worker"])
        if time.monotonic() > deadline:
            raise SystemExit(f"only workers {sorted(seen)} of {workers} answered")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def loadgen(address: str, n: int, args: argparse.Namespace, pid: int) -> subprocess.Popen[bytes]:
    url = f"ws://{address}/v1/realtime?intent=transcription"
    argv = [
        sys.executable,
        str(ANCHORS / "rt_loadgen.py"),
        "--url",
        url,
        "-n",
        str(n),
        "--duration",
        str(args.seconds),
        "--warmup",
        "2",
        "--drain",
        "2",
        "--relay-pid",
        str(pid),
        "--commit-every-10",
        "--first-event",
        FIRST_EVENT,
        "--header",
        "OpenAI-Beta: realtime=v1",
        "--header",
        f"Authorization: Bearer {KEY}",
    ]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)


def loadgen_result(process: subprocess.Popen[bytes], timeout_s: float) -> dict[str, Any]:
    out, _ = process.communicate(timeout=timeout_s)
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": "no result"}


def base_config(listen: str, extra: str = "") -> str:
    return f"""
[server]
listen = "{listen}"
client_keys_env = ["SPEAR_BENCH_KEY", "SPEAR_BENCH_OPS_KEY"]
max_sessions = 5000
max_sessions_per_key = 5000
{extra}
[[backends]]
name = "stub"
kind = "stub"
"""


# --- 1. workers -------------------------------------------------------------------------------


def workers_ladder(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    rows = []
    env = {**os.environ, "SPEAR_BENCH_KEY": KEY, "SPEAR_BENCH_OPS_KEY": OPS_KEY}
    for workers in (1, 2):
        for n in args.ladder:
            port = free_port()
            config = tmp / f"workers{workers}.toml"
            config.write_text(base_config(f"127.0.0.1:{port}"))
            extra = ["--workers", str(workers)] if workers > 1 else []
            server = subprocess.Popen(
                [SPEAR, "serve", "--config", str(config), "--loop", "uvloop", *extra],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                wait_http(f"http://127.0.0.1:{port}/healthz", server)
                wait_workers(port, workers)
                result = loadgen_result(
                    loadgen(f"127.0.0.1:{port}", n, args, server.pid), args.seconds + 120
                )
            finally:
                stop(server)
            row = {"workers": workers, "n": n, **result}
            rows.append(row)
            lat = result.get("lat_ms", {})
            print(
                f"workers={workers} N={n}: p50 {lat.get('p50')} p99 {lat.get('p99')} ms, "
                f"CPU {result.get('relay_cpu_pct')} %",
                flush=True,
            )
    return rows


# --- 2. nodes ---------------------------------------------------------------------------------


def node_config(address: str, redis_url: str, args: argparse.Namespace) -> str:
    downs = "".join(
        f'[[backends]]\nname = "down{i}"\nkind = "openai_http"\n'
        f'base_url = "http://127.0.0.1:{args.down_port}/v1"\n'
        for i in range(args.breakers)
    )
    extra = f"per_key_rate_per_s = {args.rate}\nper_key_burst = {args.burst}\n"
    text = base_config(address, extra)
    return (
        text.replace(
            "[[backends]]",
            f"""[realtime]
resume_grace_seconds = 30
[health.breaker]
consecutive_failures = 2
cooldown_s = 60
max_cooldown_s = 120
[cluster]
redis_url = "{redis_url}"
[[backends]]""",
            1,
        )
        + downs
    )


Process = subprocess.Popen[bytes]


def start_nodes(args: argparse.Namespace, tmp: Path) -> tuple[Process, list[Process], list[str]]:
    redis_port = free_port()
    redis = subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(redis_port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.3)
    args.down_port = free_port()
    env = {**os.environ, "SPEAR_BENCH_KEY": KEY, "SPEAR_BENCH_OPS_KEY": OPS_KEY}
    addresses, nodes = [], []
    for n, (host, loop) in enumerate(
        zip(("127.0.0.2", "127.0.0.3", "127.0.0.4"), ("trio", "asyncio", "uvloop"), strict=True)
    ):
        address = f"{host}:{free_port(host)}"
        config = tmp / f"node{n}.toml"
        config.write_text(node_config(address, f"redis://127.0.0.1:{redis_port}/0", args))
        log = (tmp / f"node{n}.log").open("wb")
        nodes.append(
            subprocess.Popen(
                [SPEAR, "serve", "--config", str(config), "--loop", loop],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        addresses.append(address)
    for address, node in zip(addresses, nodes, strict=True):
        wait_http(f"http://{address}/healthz", node)
    return redis, nodes, addresses


async def one_resume(origin: str, target: str) -> float:
    headers = {**BETA, "Authorization": f"Bearer {KEY}"}
    first = await connect(
        f"ws://{origin}/v1/realtime?intent=transcription", additional_headers=headers
    )
    created = json.loads(await first.recv())
    session, token = created["session"]["id"], created["spear"]["resume_token"]
    assert first.transport is not None
    first.transport.abort()  # lost, no closing handshake
    query = f"intent=transcription&session_id={session}&last_seq={created['seq']}"
    start = time.perf_counter()
    second = await connect(
        f"ws://{target}/v1/realtime?{query}",
        additional_headers={**headers, "Spear-Resume-Token": token},
    )
    hello = json.loads(await second.recv())
    took = (time.perf_counter() - start) * 1000
    assert hello["type"] == "spear.session.resumed", hello
    await second.close()
    return took


async def resumes(addresses: list[str], count: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"other node": [], "same node": []}
    for i in range(count):
        origin = addresses[i % 3]
        times["other node"].append(await one_resume(origin, addresses[(i + 1) % 3]))
        times["same node"].append(await one_resume(origin, origin))
    return times


async def rate_accuracy(addresses: list[str], args: argparse.Namespace) -> dict[str, Any]:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {KEY}", "spear-backend": "stub"}
    served = refused = sent = 0
    interval = 1 / (3 * args.rate)
    async with httpx.AsyncClient() as client:
        start = last = time.perf_counter()
        while time.perf_counter() - start < args.rate_seconds:
            answer = await client.post(
                f"http://{addresses[sent % 3]}/v1/chat/completions", json=body, headers=headers
            )
            sent += 1
            served += answer.status_code == 200
            refused += answer.status_code == 429
            last = time.perf_counter()  # tokens earned after the last request never count
            await asyncio.sleep(max(0.0, sent * interval - (time.perf_counter() - start)))
        window = last - start
    expected = args.burst + args.rate * window
    return {
        "sent": sent,
        "served": served,
        "refused": refused,
        "window_s": window,
        "expected": expected,
        "error_pct": 100 * (served - expected) / expected,
    }


async def breaker_propagation(addresses: list[str], args: argparse.Namespace) -> list[float]:
    headers = {"Authorization": f"Bearer {OPS_KEY}"}
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    times = []
    async with httpx.AsyncClient() as client:
        for i in range(args.breakers):
            name = f"down{i}"
            for _ in range(2):
                await client.post(
                    f"http://{addresses[0]}/v1/chat/completions",
                    json=body,
                    headers={**headers, "spear-backend": name},
                )
            opened = time.perf_counter()
            for other in addresses[1:]:
                while True:
                    answer = await client.post(
                        f"http://{other}/v1/route/explain",
                        headers=headers,
                        json={"operation": "chat_completions", "backend": name},
                    )
                    if "circuit open" in answer.json()["rejected_reasons"].get(name, ""):
                        break
                    if time.perf_counter() - opened > 5:
                        raise SystemExit(f"{other} did not see {name} open within 5 s")
                    await asyncio.sleep(0.005)
            times.append((time.perf_counter() - opened) * 1000)
    return times


def nodes_run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    redis, nodes, addresses = start_nodes(args, tmp)
    try:
        pairs = zip(addresses, nodes, strict=True)
        gens = [loadgen(address, args.node_sessions, args, node.pid) for address, node in pairs]
        held = [loadgen_result(g, args.seconds + 120) for g in gens]
        times = asyncio.run(resumes(addresses, args.resumes))
        rate = asyncio.run(rate_accuracy(addresses, args))
        breaker = asyncio.run(breaker_propagation(addresses, args))
    finally:
        for process in (*nodes, redis):
            stop(process)
    return {
        "addresses": addresses,
        "held": held,
        "resume_ms": times,
        "rate": rate,
        "breaker_ms": breaker,
    }


# --- report -----------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def report(workers: list[dict[str, Any]], nodes: dict[str, Any] | None) -> str:
    lines = [
        "| workers | sessions | p50 ms | p99 ms | achieved fps | server CPU % | RSS MB |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in workers:
        lat = r.get("lat_ms", {})
        cells = [
            r["workers"],
            r["n"],
            lat.get("p50"),
            lat.get("p99"),
            r.get("achieved_fps"),
            r.get("relay_cpu_pct"),
            r.get("relay_rss_mb"),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if nodes is not None:
        lines += ["", "| node | sessions | p50 ms | p99 ms | CPU % |", "|---|---:|---:|---:|---:|"]
        for address, r in zip(nodes["addresses"], nodes["held"], strict=True):
            lat = r.get("lat_ms", {})
            cells = [
                address,
                r.get("connected"),
                lat.get("p50"),
                lat.get("p99"),
                r.get("relay_cpu_pct"),
            ]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines += ["", "| resume | count | p50 ms | p99 ms |", "|---|---:|---:|---:|"]
        for where, values in nodes["resume_ms"].items():
            lines.append(
                f"| {where} | {len(values)} | {pct(values, 0.5):.2f} | {pct(values, 0.99):.2f} |"
            )
        rate = nodes["rate"]
        lines.append(
            f"\nrate limit over 3 nodes: sent {rate['sent']}, served {rate['served']}, "
            f"expected {rate['expected']:.1f} (burst + rate x {rate['window_s']:.2f} s),"
            f" error {rate['error_pct']:+.1f} %"
        )
        b = nodes["breaker_ms"]
        lines.append(
            f"breaker seen open on both other nodes: median {statistics.median(b):.0f} ms,"
            f" max {max(b):.0f} ms over {len(b)} instances"
        )
    return "\n".join(lines)


def plot(workers: list[dict[str, Any]], nodes: dict[str, Any] | None, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for count in (1, 2):
        rows = [r for r in workers if r["workers"] == count and "lat_ms" in r]
        axes[0].plot(
            [r["n"] for r in rows],
            [r["lat_ms"]["p99"] for r in rows],
            "o-",
            label=f"{count} worker{'s' if count > 1 else ''} p99",
        )
    axes[0].set(xlabel="sessions", ylabel="ms", title="10th append -> delta, p99", yscale="log")
    axes[0].legend()
    if nodes is not None:
        for where, values in nodes["resume_ms"].items():
            ordered = sorted(values)
            axes[1].plot(ordered, [i / len(ordered) for i in range(len(ordered))], label=where)
        axes[1].set(xlabel="ms", ylabel="fraction", title="resume -> spear.session.resumed")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ladder", default="100,200,300", help="sessions per workers step")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured window per step")
    ap.add_argument("--node-sessions", type=int, default=50, help="sessions per node")
    ap.add_argument("--resumes", type=int, default=100)
    ap.add_argument("--rate", type=float, default=20.0, help="the key's requests/s")
    ap.add_argument("--burst", type=int, default=10)
    ap.add_argument("--rate-seconds", type=float, default=5.0)
    ap.add_argument("--breakers", type=int, default=10, help="instances opened one by one")
    ap.add_argument("--skip-workers", action="store_true")
    ap.add_argument("--skip-nodes", action="store_true")
    args = ap.parse_args()
    args.ladder = [int(n) for n in args.ladder.split(",")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with tempfile.TemporaryDirectory(prefix="spear-cluster-bench-") as tmp:
        workers = [] if args.skip_workers else workers_ladder(args, Path(tmp))
        nodes = None if args.skip_nodes else nodes_run(args, Path(tmp))
    table = report(workers, nodes)
    print(table)
    out = RESULTS / f"cluster-{stamp}"
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "args": {k: v for k, v in vars(args).items()},
                "workers": workers,
                "nodes": nodes,
                "cpus": os.cpu_count(),
            },
            indent=1,
            default=str,
        )
    )
    out.with_suffix(".md").write_text(table + "\n")
    if plot(workers, nodes, out.with_suffix(".png")):
        print(f"plot: {out.with_suffix('.png')}")
    print(f"results: {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
