"""Three `spear-rt serve` nodes (trio, asyncio, uvloop) on 127.0.0.2-4 sharing one
redis-server: what one node would count, three count together.

- a client resuming on another node than its session's gets its session (forwarded to the
  owner): `spear.session.resumed`, the events it missed, and the session goes on;
  a wrong token there is refused 4004 by the owner, an unknown session 4004 where it lands;
- a key's rate (0.5/s, burst 4) holds over the three nodes: 12 requests at once, 4 served;
- a key's session cap (2) holds over the nodes;
- a breaker opened by one node is open on the others within a second.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest

from tests.conftest import WsClient, b64, noise_pcm
from tests.server.test_realtime import BETA, COMPLETED, DELTA, MANUAL_BETA, TRANSCRIPTION

from .nodes import KEYS, nodes

HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


@pytest.fixture(scope="module")
def cluster(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    with nodes(tmp_path_factory.mktemp("nodes"), redis_url, HOSTS,
               ["trio", "asyncio", "uvloop"]) as addresses:  # fmt: skip
        yield addresses


def auth(env: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {KEYS[env]}")


async def session_on(address: str, path: str = TRANSCRIPTION, *extra: tuple[str, str]) -> WsClient:
    host, port = address.rsplit(":", 1)
    stream = await anyio.connect_tcp(host, int(port))
    return await WsClient.over(stream, int(port), path,
                               headers=[*BETA, auth("SPEAR_KEY_SESS"), *extra])  # fmt: skip


def append(seed: int) -> dict[str, Any]:
    return {"type": "input_audio_buffer.append", "audio": b64(noise_pcm(4800, seed=seed))}


async def test_a_session_resumes_on_another_node(cluster: list[str]) -> None:
    with anyio.fail_after(30):
        client = await session_on(cluster[0])
        created = await client.recv()
        session_id, token = created["session"]["id"], created["spear"]["resume_token"]
        await client.send(MANUAL_BETA)
        await client.recv_until("transcription_session.updated")
        await client.send(append(1))
        first = await client.recv_until(DELTA)
        await client.send(append(2))  # its delta may be lost with the socket
        await client.stream.aclose()
        last_seq = first[-1]["seq"]
        resumed = await session_on(
            cluster[1], f"{TRANSCRIPTION}&session_id={session_id}&last_seq={last_seq}",
            ("Spear-Resume-Token", token))  # fmt: skip
        hello = await resumed.recv()
        assert hello["type"] == "spear.session.resumed" and hello["last_seq"] == last_seq
        missed = await resumed.recv_until(DELTA)  # the second append's delta, kept for us
        assert [e["seq"] for e in missed] == list(range(last_seq + 1, last_seq + 1 + len(missed)))
        await resumed.send({"type": "input_audio_buffer.commit"})
        done = await resumed.recv_until(COMPLETED)
        assert done[-1]["transcript"]
        await resumed.close()


async def test_a_wrong_token_on_another_node_is_refused_by_the_owner(cluster: list[str]) -> None:
    with anyio.fail_after(30):
        client = await session_on(cluster[2])
        created = await client.recv()
        session_id = created["session"]["id"]
        for address, sid in ((cluster[0], session_id), (cluster[1], "sess_" + "0" * 20)):
            other = await session_on(
                address, f"{TRANSCRIPTION}&session_id={sid}&last_seq=1",
                ("Spear-Resume-Token", "not-the-token"))  # fmt: skip
            error = await other.recv()
            assert error["error"]["code"] == "resume_failed"
            assert (await other.wait_closed())[0] == 4004
        await client.close()


async def test_a_keys_session_cap_is_counted_over_the_nodes(cluster: list[str]) -> None:
    with anyio.fail_after(30):
        first = await session_on(cluster[0])
        second = await session_on(cluster[1])
        for client in (first, second):
            assert (await client.recv())["type"] == "transcription_session.created"
        third = await session_on(cluster[2])
        error = await third.recv()
        assert "maximum of 2 sessions" in error["error"]["message"]
        assert (await third.wait_closed())[0] == 1013
        await first.close()
        with anyio.fail_after(10):  # the place comes back once the first session has ended
            while True:
                again = await session_on(cluster[2])
                if (await again.recv())["type"] == "transcription_session.created":
                    break
                await anyio.sleep(0.1)
        await again.close()
        await second.close()


async def test_the_rate_of_one_key_holds_over_three_nodes(cluster: list[str]) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    headers = dict([auth("SPEAR_KEY_RATE"), ("spear-backend", "stub")])
    with anyio.fail_after(30):
        async with httpx.AsyncClient() as client:
            codes = []
            for n in range(12):  # well under 2 s: no token is earned back meanwhile
                answer = await client.post(f"http://{cluster[n % 3]}/v1/chat/completions",
                                           json=body, headers=headers)  # fmt: skip
                codes.append(answer.status_code)
    assert codes.count(200) == 4 and codes.count(429) == 8, codes


async def test_a_breaker_opened_by_one_node_is_open_on_the_others(cluster: list[str]) -> None:
    headers = dict([auth("SPEAR_KEY_OPS"), ("spear-backend", "down")])
    explain = {"operation": "chat_completions", "backend": "down"}
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with anyio.fail_after(30):
        async with httpx.AsyncClient() as client:

            async def reason(address: str) -> str:
                answer = await client.post(f"http://{address}/v1/route/explain", json=explain,
                                           headers=headers)  # fmt: skip
                return str(answer.json()["rejected_reasons"].get("down", ""))

            assert await reason(cluster[1]) == ""
            for _ in range(2):  # two failures open node 0's breaker
                answer = await client.post(f"http://{cluster[0]}/v1/chat/completions",
                                           json=body, headers=headers)  # fmt: skip
                assert answer.status_code >= 500, answer.text
            assert "circuit open" in await reason(cluster[0])
            opened = anyio.current_time()
            with anyio.fail_after(1.0):  # each node reads the ejections every 0.2 s
                for other in cluster[1:]:
                    # another process's state, which no event announces: polled, bounded
                    while "circuit open" not in await reason(other):  # noqa: ASYNC110
                        await anyio.sleep(0.02)
            assert anyio.current_time() - opened < 1.0
