"""Upstream reconnect through the whole server: a client speaks one long utterance while the
`openai_realtime` upstream (a real loopback fake) drops ten times. The client must see the
transcript of an uninterrupted run and nothing but `spear.upstream.reconnected` besides.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from spear_rt.server.app import Server
from tests.conftest import WsClient, b64, make_config, noise_pcm
from tests.fakes.realtime_upstream import Drop, FakeRealtime, stub_words
from tests.server.test_realtime import BETA, COMPLETED, DELTA, MANUAL_BETA, TRANSCRIPTION

CHUNK = 480  # 20 ms at 24 kHz
RECONNECTED = "spear.upstream.reconnected"


def backend(fake: FakeRealtime) -> str:
    return f"""
[[backends]]
name = "remote"
kind = "openai_realtime"
base_url = "{fake.base_url}"
options = {{ ping_interval_s = 0 }}
"""


async def utterance(server: Server, pcm: Any) -> list[dict[str, Any]]:
    """One manual turn of `pcm` in 20 ms appends, then commit; every event until completed."""
    assert server.port is not None
    client = await WsClient.connect(server.port, TRANSCRIPTION, headers=BETA)
    await client.recv()
    await client.send(MANUAL_BETA)
    await client.recv()
    for start in range(0, pcm.size, CHUNK):
        await client.send(
            {"type": "input_audio_buffer.append", "audio": b64(pcm[start : start + CHUNK])}
        )
    await client.send({"type": "input_audio_buffer.commit"})
    events = await client.recv_until(COMPLETED)
    await client.close()
    return events


def run(backend_name: str, drops: list[int]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A clean run and a run with the upstream dropped after each of `drops` frames."""
    pcm = noise_pcm(4 * 24000, seed=41)

    async def main() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        fake = FakeRealtime()
        async with anyio.create_task_group() as tg:
            await tg.start(fake.serve)
            config = make_config(
                realtime="upstream_reconnect_backoff_s = 0.01\n"
                "upstream_reconnect_max_backoff_s = 0.02",
                backends=backend(fake),
            )
            server = Server(config)
            await tg.start(server.serve)
            with anyio.fail_after(30):
                fake.plan(live_deltas=True)
                clean = await utterance(server, pcm)
                for sent in drops:  # frames on that connection: update, replay, new audio
                    fake.plan(Drop(after=1 + sent), live_deltas=True)
                fake.plan(live_deltas=True)
                interrupted = await utterance(server, pcm)
                assert server.sessions.upstream_reconnects() == len(drops)
            tg.cancel_scope.cancel()
        assert len(fake.connections) == 1 + len(drops) + 1
        return clean, interrupted

    return anyio.run(main, backend=backend_name)


@pytest.mark.parametrize("backend_name", ["trio", "asyncio"])
def test_ten_upstream_drops_in_one_utterance_change_nothing_for_the_client(
    backend_name: str,
) -> None:
    """Same deltas, same completed transcript; ten `spear.upstream.reconnected` events."""
    pcm = noise_pcm(4 * 24000, seed=41)
    drops = [5 + 15 * k for k in range(1, 11)]
    clean, interrupted = run(backend_name, drops)
    expected = " ".join(stub_words(pcm))
    for events in (clean, interrupted):
        assert events[-1]["transcript"] == expected
        assert "".join(e["delta"] for e in events if e["type"] == DELTA) == expected
        assert "error" not in {e["type"] for e in events}
    reconnected = [e for e in interrupted if e["type"] == RECONNECTED]
    assert len(reconnected) == 10 and not [e for e in clean if e["type"] == RECONNECTED]
    assert all(e["backend"] == "remote" and len(e["replayed_item_ids"]) == 1 for e in reconnected)
    # the same events (live deltas may interleave with the commit's events differently)
    assert sorted(e["type"] for e in interrupted if e["type"] != RECONNECTED) == sorted(
        e["type"] for e in clean
    )
    seqs = [e["seq"] for e in interrupted]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
