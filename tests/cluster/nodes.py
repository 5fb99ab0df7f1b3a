"""Start spear-rt nodes sharing a redis-server, each on its own loopback address (tests)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.redis_rig import free_port

SPEAR = str(Path(sys.executable).parent / "spear-rt")
KEYS = {"SPEAR_KEY_RATE": "k-rate-0123456789", "SPEAR_KEY_OPS": "k-ops-0123456789",
        "SPEAR_KEY_SESS": "k-sess-0123456789"}  # fmt: skip


def node_config(address: str, redis_url: str, prefix: str, down_port: int, extra: str) -> str:
    """One node's TOML: client keys, a 0.5/s burst-4 key limit, 2 sessions per key, a
    breaker that opens on 2 failures, a stub and an instance nothing listens for."""
    keys = ", ".join(f'"{name}"' for name in KEYS)
    return f"""
[server]
listen = "{address}"
client_keys_env = [{keys}]
per_key_rate_per_s = 0.5
per_key_burst = 4
max_sessions_per_key = 2
{extra}
[realtime]
resume_grace_seconds = 30
[health.breaker]
consecutive_failures = 2
cooldown_s = 30
max_cooldown_s = 60
[cluster]
redis_url = "{redis_url}"
node_address = "{address}"
key_prefix = "{prefix}"
[[backends]]
name = "stub"
kind = "stub"
[[backends]]
name = "down"
kind = "openai_http"
base_url = "http://127.0.0.1:{down_port}/v1"
"""


@contextmanager
def nodes(
    tmp: Path, redis_url: str, hosts: Sequence[str], loops: Sequence[str], extra: str = ""
) -> Iterator[list[str]]:
    """Run one `spear-rt serve` per host (on its loop); yields their HOST:PORT addresses."""
    prefix = f"n{os.getpid()}-{time.monotonic_ns()}:"
    down = free_port()
    addresses = [f"{host}:{free_port(host)}" for host in hosts]
    processes: list[subprocess.Popen[bytes]] = []
    env = {**os.environ, **KEYS}
    try:
        for n, (address, loop) in enumerate(zip(addresses, loops, strict=True)):
            config = tmp / f"node{n}.toml"
            config.write_text(node_config(address, redis_url, prefix, down, extra))
            log = (tmp / f"node{n}.log").open("wb")
            processes.append(subprocess.Popen(
                [SPEAR, "serve", "--config", str(config), "--loop", loop],
                env=env, stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
        for address, process in zip(addresses, processes, strict=True):
            wait_healthy(address, process)
        yield addresses
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_healthy(address: str, process: subprocess.Popen[bytes]) -> None:
    """Until /healthz answers (bounded: 30 s)."""
    deadline = time.monotonic() + 30
    while True:
        assert process.poll() is None, f"the node on {address} exited"
        try:
            if httpx.get(f"http://{address}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"the node on {address} did not start"
        time.sleep(0.05)
