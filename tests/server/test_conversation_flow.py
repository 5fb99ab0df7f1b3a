"""Flow control of a spoken answer: a client that stops reading slows the answer down instead
of growing the server's memory or losing audio (conversation.md, "Flow control").

The bound: the responder waits before each output event while the session's outbound queue
holds more than `[realtime] max_outbound_bytes`, so at most that much plus one event is queued,
and at most `[conversation] sentences_ahead` sentences are synthesized ahead of it. Speech comes
from the fake upstream (tones, 20 ms per character), so audio lengths are known exactly.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest

from spear_rt.server.app import Server
from tests.conftest import DRIVERS, IDS, WsClient
from tests.fakes.openai_upstream import FakeOpenAI, speech_samples, speech_wav, text_events
from tests.server.conversation_rig import Talk, run_rig
from tests.server.test_resume import drop, until
from tests.server.test_slow_client import starved_socket

MAX_OUTBOUND = 64 * 1024
SENTENCE = "This sentence is one of many in a long answer that a slow client is given. "
SENTENCES = 100  # 1.5 s of tone each: 100 x 72 kB of pcm, 9.6 MB as base64 deltas
AUDIO_EVENT_MAX = 100 * 24 * 2 * 4 // 3 + 512  # a <= 100 ms delta: base64 pcm + its JSON


def speech_requests(fake: FakeOpenAI) -> int:
    return sum(r.path == "/v1/audio/speech" for r in fake.requests)


async def slow_reader(server: Server, fake: FakeOpenAI) -> dict[str, Any]:
    assert server.port is not None
    fake.slow_stream(text_events([SENTENCE] * SENTENCES)).release(SENTENCES + 3)
    manual = {"input": {"turn_detection": None}}
    talk = await Talk.open(server.port, over=await starved_socket(server.port), audio=manual)
    (session_id,) = server.sessions.sessions
    machine = server.sessions.sessions[session_id].machine
    await talk.user_text("Tell me a long story.")
    await talk.send({"type": "response.create"})
    peak = 0

    def parked() -> bool:  # the responder waits for room: the queue is over its bound
        nonlocal peak
        peak = max(peak, machine.outbound.nbytes)
        return machine.outbound.nbytes > MAX_OUTBOUND

    await until(parked)
    asked_while_parked = speech_requests(fake)
    events = await talk.until("response.done")  # now read it all
    deltas = [e["delta"] for e in events if e["type"] == "response.output_audio.delta"]
    audio = sum(len(base64.b64decode(delta)) for delta in deltas)
    return {
        "peak": peak,
        "asked_while_parked": asked_while_parked,
        "asked": speech_requests(fake),
        "audio_bytes": audio,
        "dropped": machine.outbound.dropped,
        "done": events[-1]["response"],
    }


@pytest.mark.parametrize(("backend", "driver"), DRIVERS, ids=IDS)
def test_a_slow_reader_slows_the_answer_and_loses_no_audio(backend: str, driver: str) -> None:
    result = run_rig(
        backend, driver, slow_reader, speech="fake",
        realtime=f"max_outbound_bytes = {MAX_OUTBOUND}",
    )  # fmt: skip
    # generation stopped while the client did not read: far from every sentence was asked for
    assert result["asked_while_parked"] < SENTENCES // 2, result
    assert result["peak"] <= MAX_OUTBOUND + AUDIO_EVENT_MAX
    # ...and once it read, everything came: every sentence spoken, every sample delivered
    assert result["asked"] == SENTENCES
    assert result["audio_bytes"] == 2 * SENTENCES * speech_samples(SENTENCE.strip())
    assert result["dropped"] == 0
    assert result["done"]["status"] == "completed"


async def resume_mid_answer(server: Server, fake: FakeOpenAI) -> dict[str, Any]:
    """The socket drops during an answer longer than the replay buffer holds: the responder
    waits for the resume instead of filling the buffer, and the client hears all of it."""
    assert server.port is not None
    count = 30  # 30 x 1.5 s of tone: 2.9 MB of deltas, > 10x the replay buffer
    fake.slow_stream(text_events([SENTENCE] * count)).release(count + 3)
    talk = await Talk.open(server.port, audio={"input": {"turn_detection": None}})
    created = talk.events[0]
    (session_id,) = server.sessions.sessions
    runner = server.sessions.sessions[session_id]
    await talk.user_text("Tell me a long story.")
    await talk.send({"type": "response.create"})
    await talk.until("response.output_audio.delta")
    await drop(talk.ws, reset=False)
    await until(lambda: runner.parked or runner.machine.close is not None)
    closed_while_away = runner.machine.close
    token = created["spear"]["resume_token"]
    last_seq = talk.events[-1]["seq"]
    path = f"/v1/realtime?model=gpt-realtime&session_id={session_id}&last_seq={last_seq}"
    again = Talk(
        await WsClient.connect(server.port, path, headers=[("Spear-Resume-Token", token)]), "ga"
    )
    again.checker.announced = talk.checker.announced
    assert (await again.recv())["type"] == "spear.session.resumed"
    events = talk.events + await again.until("response.done")
    await again.close()
    deltas = [e["delta"] for e in events if e["type"] == "response.output_audio.delta"]
    return {
        "closed_while_away": closed_while_away,
        "audio": b"".join(base64.b64decode(d) for d in deltas),
        "seqs": [e["seq"] for e in events],
        "done": events[-1]["response"],
        "count": count,
    }


@pytest.mark.parametrize(("backend", "driver"), DRIVERS, ids=IDS)
def test_a_dropped_client_resumes_and_hears_the_whole_answer(backend: str, driver: str) -> None:
    result = run_rig(
        backend, driver, resume_mid_answer, speech="fake",
        realtime="resume_grace_seconds = 30.0\nreplay_buffer_bytes = 262144",
    )  # fmt: skip
    assert result["closed_while_away"] is None
    assert result["done"]["status"] == "completed"
    # every chunk exactly once: the audio is the fake's tone for each sentence, byte for byte
    tone = speech_wav(SENTENCE.strip())[44:]  # its samples, after the 44-byte WAV header
    assert (
        hashlib.sha256(result["audio"]).digest() == hashlib.sha256(tone * result["count"]).digest()
    )
    seqs = result["seqs"]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # nothing lost, nothing twice
