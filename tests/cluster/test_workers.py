"""`spear-rt serve --workers N`: N processes on one port, one parent supervising them.

What must hold: every worker serves the port (connections spread across them); `/metrics`
on any of them counts every worker's requests; a signal to the parent reaches each worker
once (SIGHUP reloads all, SIGTERM drains all, exit 0); a bad --workers value is a one-line
error.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest

from spear_rt.cluster.workers import worker_count
from tests.conftest import WsClient, b64, noise_pcm
from tests.server.test_realtime import BETA, COMPLETED, DELTA, MANUAL_BETA, TRANSCRIPTION

SPEAR = str(Path(sys.executable).parent / "spear-rt")
STUB = '[[backends]]\nname = "stub"\nkind = "stub"\n'


async def read_until(
    stream: anyio.abc.ByteReceiveStream, said: bytearray, text: bytes, n: int
) -> None:
    while said.count(text) < n:
        said.extend(await stream.receive())


@asynccontextmanager
async def two_workers(
    tmp_path: Path, loop: str, host: str = "127.0.0.1", extra: str = ""
) -> AsyncIterator[tuple[anyio.abc.Process, bytearray, int]]:
    """`serve --workers 2` on a stub config (plus `extra` TOML): (process, its stderr so far,
    the port), once both workers listen."""
    config = tmp_path / f"stub-{host}.toml"
    config.write_text(extra + STUB)
    command = [SPEAR, "serve", "--workers", "2", "--listen", f"{host}:0",
               "--config", str(config), "--loop", loop]  # fmt: skip
    async with await anyio.open_process(command) as process:
        assert process.stderr is not None
        said = bytearray()
        await read_until(process.stderr, said, b"listening on", 2)
        port = int(said.split(f" workers on {host}:".encode(), 1)[1].split(b" ", 1)[0])
        yield process, said, port


async def test_two_workers_share_the_port_and_take_the_parents_signals(tmp_path: Path) -> None:
    with anyio.fail_after(60):
        async with two_workers(tmp_path, "trio") as (process, said, port):
            assert process.stderr is not None
            seen: set[int] = set()
            for _ in range(200):  # a new connection each time: the kernel picks a worker
                async with httpx.AsyncClient() as client:
                    health = (await client.get(f"http://127.0.0.1:{port}/healthz")).json()
                seen.add(health["worker"])
                if seen == {0, 1}:
                    break
            assert seen == {0, 1}
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            for _ in range(20):  # new connections: both workers answer some
                async with httpx.AsyncClient() as client:
                    answer = await client.post(
                        f"http://127.0.0.1:{port}/v1/chat/completions",
                        json=body,
                        headers={"spear-backend": "stub"},
                    )
                    assert answer.status_code == 200
            # any worker's /metrics counts every worker's requests (the others' snapshots are
            # at most a second old: polled until they are in, on new connections)
            total = 'spear_requests_total{operation="chat_completions",instance="stub"} 20'
            with anyio.fail_after(10):
                while True:
                    async with httpx.AsyncClient() as client:
                        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
                    if total in text:
                        break
                    await anyio.sleep(0.2)
            assert text.count("# TYPE spear_requests_total counter") == 1
            process.send_signal(signal.SIGHUP)
            await read_until(process.stderr, said, b"reloaded", 2)
            process.send_signal(signal.SIGTERM)
            await read_until(process.stderr, said, b"draining", 2)
            assert await process.wait() == 0
    assert b"second signal" not in said  # each worker got each signal once


def test_workers_takes_a_number_or_auto() -> None:
    assert worker_count("auto") >= 1 and worker_count("3") == 3
    done = subprocess.run([SPEAR, "serve", "--workers", "lots"], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 2 and "--workers takes a number or auto" in done.stderr


@pytest.mark.parametrize("loop", ["trio", "asyncio"])
async def test_a_resume_landing_on_the_other_worker_reaches_its_session(
    tmp_path: Path, loop: str
) -> None:
    """Each resume is a new connection the kernel gives to either worker: every one must
    get the session; resumes go on until one was forwarded (each has a 1/2 chance)."""
    with anyio.fail_after(60):
        async with two_workers(tmp_path, loop) as (process, said, port):
            client = await WsClient.connect(port, TRANSCRIPTION, headers=BETA)
            created = await client.recv()
            session_id, token = created["session"]["id"], created["spear"]["resume_token"]
            await client.send(MANUAL_BETA)
            last_seq = (await client.recv_until("transcription_session.updated"))[-1]["seq"]
            forwarded = 0.0
            for attempt in range(40):
                await client.stream.aclose()
                path = f"{TRANSCRIPTION}&session_id={session_id}&last_seq={last_seq}"
                client = await WsClient.connect(
                    port, path, headers=[*BETA, ("Spear-Resume-Token", token)]
                )
                resumed = await client.recv()
                assert resumed["type"] == "spear.session.resumed", resumed
                await client.send({"type": "input_audio_buffer.append",
                                   "audio": b64(noise_pcm(4800, seed=attempt))})  # fmt: skip
                last_seq = (await client.recv_until(DELTA))[-1]["seq"]
                async with httpx.AsyncClient() as http:
                    metrics = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
                forwarded = sum(float(line.split()[-1]) for line in metrics.splitlines()
                                if line.startswith("spear_resumes_forwarded_total"))  # fmt: skip
                if forwarded >= 1:
                    break
            assert forwarded >= 1
            await client.send({"type": "input_audio_buffer.commit"})
            assert (await client.recv_until(COMPLETED))[-1]["transcript"]
            await client.close()
            process.send_signal(signal.SIGTERM)
            code = await process.wait()
            assert process.stderr is not None
            with anyio.move_on_after(2):
                async for chunk in process.stderr:
                    said.extend(chunk)
            assert code == 0, said.decode(errors="replace")[-3000:]


async def test_a_resume_crosses_a_node_and_then_a_worker(tmp_path: Path, redis_url: str) -> None:
    """Two nodes of two workers each, one Redis: resumes alternate between the nodes and
    each one reaches the session (node hop, then maybe the worker hop)."""
    cluster = f'[cluster]\nredis_url = "{redis_url}"\nkey_prefix = "w{id(tmp_path)}:"\n'
    with anyio.fail_after(90):
        async with (
            two_workers(tmp_path, "trio", "127.0.0.2", cluster) as (a, _, port_a),
            two_workers(tmp_path, "asyncio", "127.0.0.3", cluster) as (b, _, port_b),
        ):
            stream = await anyio.connect_tcp("127.0.0.2", port_a)
            client = await WsClient.over(stream, port_a, TRANSCRIPTION, headers=BETA)
            created = await client.recv()
            session_id, token = created["session"]["id"], created["spear"]["resume_token"]
            last_seq = created["seq"]
            for attempt in range(8):
                await client.stream.aclose()
                host, port = ("127.0.0.3", port_b) if attempt % 2 == 0 else ("127.0.0.2", port_a)
                path = f"{TRANSCRIPTION}&session_id={session_id}&last_seq={last_seq}"
                stream = await anyio.connect_tcp(host, port)
                client = await WsClient.over(
                    stream, port, path, headers=[*BETA, ("Spear-Resume-Token", token)]
                )
                resumed = await client.recv()
                assert resumed["type"] == "spear.session.resumed", (attempt, resumed)
                last_seq = resumed["last_seq"]
            await client.close()
            for process in (a, b):
                process.send_signal(signal.SIGTERM)
                assert await process.wait() == 0
