"""A speech-to-speech upstream that stalls or sends garbage mid-answer.

A stall (nothing read or written, pings unanswered) is a lost connection: the keepalive finds
it, the conversation is restored on a new connection and the cut answer created again, and
the client hears exactly what each upstream sent. Garbage is the upstream breaking the
protocol: not retried; the client gets a clear error naming it, and the answer in progress
ends (never a response without its response.done).
"""

from __future__ import annotations

import anyio
import pytest

from tests.fakes.s2s_upstream import GarbageMidResponse, StallMidResponse
from tests.server.conversation_rig import Talk
from tests.server.test_speech_to_speech import TIMEOUT_S, audio_of, gateway, manual

pytestmark = pytest.mark.anyio  # trio and asyncio


async def test_a_stalled_upstream_is_found_by_the_keepalive_and_restored() -> None:
    with anyio.fail_after(TIMEOUT_S):
        ping = "ping_interval_s = 0.2, ping_timeout_s = 0.3"
        async with gateway(ping=ping) as (server, fake):
            fake.plan(StallMidResponse(after_chunks=2))
            talk = await Talk.open(server.port or 0, "ga", **manual("ga"))
            await talk.user_text("are you still there")
            user_item = talk.events[-1]["item"]["id"]
            await talk.send({"type": "response.create"})
            first = (await talk.until("response.done"))[-1]["response"]
            assert first["status"] == "incomplete"
            assert first["status_details"]["error"]["code"] == "upstream_disconnected"
            second = (await talk.until("response.done"))[-1]["response"]
            assert second["status"] == "completed", second
            one, two = fake.connections
            assert audio_of(talk.events, first["id"]) == bytes(one.sent_audio[one.responses[0]])
            assert audio_of(talk.events, second["id"]) == bytes(two.sent_audio[two.responses[0]])
            kinds = [e["type"] for e in talk.events]
            assert kinds.count("spear.upstream.reconnected") == 1
            cut = [item["id"] for item in first["output"]]  # what reached the client, if anything
            assert two.item_ids() == [user_item, *cut, second["output"][0]["id"]]
            await talk.close()


async def test_garbage_from_the_upstream_is_a_clear_error_and_the_answer_ends() -> None:
    with anyio.fail_after(TIMEOUT_S):
        async with gateway() as (server, fake):
            fake.plan(GarbageMidResponse(after_chunks=2))
            talk = await Talk.open(server.port or 0, "ga", **manual("ga"))
            await talk.user_text("hello")
            await talk.send({"type": "response.create"})
            done = (await talk.until("response.done"))[-1]["response"]
            assert done["status"] == "failed"
            assert "not valid JSON" in done["status_details"]["error"]["message"]
            error = (await talk.until("error"))[-1]["error"]
            assert error["code"] == "upstream_error" and "not valid JSON" in error["message"]
            with pytest.raises(ConnectionError, match="1011"):
                await talk.recv()
            assert len(fake.connections) == 1  # a protocol violation is not retried
            kinds = [e["type"] for e in talk.events]
            assert kinds.count("response.created") == kinds.count("response.done") == 1
