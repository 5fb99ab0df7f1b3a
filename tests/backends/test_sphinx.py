"""pocketsphinx: the same words through the gateway as the engine fed directly; segment deltas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from spear_rt.audio import frames, load_audio, resample
from spear_rt.backend import (
    AppendAudio,
    BeginTurn,
    Clear,
    Commit,
    InstanceInfo,
    TranscriptCompleted,
    TranscriptDelta,
    TranscriptionSpec,
)
from spear_rt.errors import CanonicalFailure
from spear_rt_backends.sphinx import KIND, transcribe_pcm16
from tests.conftest import WsClient, b64, make_config

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "audio"
SPEECH = [m for m in json.loads((FIXTURES / "manifest.json").read_text()) if m["kind"] == "speech"]
INFO = InstanceInfo(name="sphinx-test")


def fixture_16k(name: str):  # type: ignore[no-untyped-def]
    pcm, rate = load_audio(FIXTURES / name)
    assert rate == 16000
    return pcm


async def stream_turn(pcm16k):  # type: ignore[no-untyped-def]
    """Stream a turn in 20 ms frames and commit; (all deltas, completed transcript)."""
    async with KIND.open_transcription(INFO, TranscriptionSpec()) as upstream:
        await upstream.send(BeginTurn("item_1"))
        for frame in frames(pcm16k, 16000):
            await upstream.send(AppendAudio(frame))
        await upstream.send(Commit("item_1"))
        deltas: list[str] = []
        while True:
            event = await upstream.receive()
            if isinstance(event, TranscriptDelta):
                deltas.append(event.delta)
            else:
                assert isinstance(event, TranscriptCompleted)
                return deltas, event.transcript


@pytest.mark.slow
@pytest.mark.parametrize("item", SPEECH, ids=[m["file"] for m in SPEECH])
async def test_gateway_gives_the_engines_own_words(item: dict) -> None:  # type: ignore[type-arg]
    """Client audio at 24 kHz, resampled to 16 kHz and streamed: the words of a direct decode."""
    pcm = fixture_16k(item["file"])
    with trio.fail_after(60):
        direct = await transcribe_pcm16(pcm)
        via_24k = resample(resample(pcm, 16000, 24000), 24000, 16000)
        deltas, completed = await stream_turn(via_24k)
    assert completed == direct
    assert "".join(deltas) == completed  # append-only deltas make up the transcript
    assert completed  # every fixture is recognized as something


@pytest.mark.slow
async def test_digits_come_out_exactly() -> None:
    """The digit sentence's digits are recognized word for word."""
    item = next(m for m in SPEECH if m["file"] == "speech_phone_number.wav")
    with trio.fail_after(60):
        text = await transcribe_pcm16(fixture_16k(item["file"]))
    assert "five five five one two three" in text


@pytest.mark.slow
async def test_a_pause_inside_a_turn_gives_a_live_delta_before_the_commit() -> None:
    """Two utterances in one turn: the first segment's words arrive before the turn is committed."""
    pcm = fixture_16k("speech_two_utterances.wav")
    with trio.fail_after(60):
        async with KIND.open_transcription(INFO, TranscriptionSpec()) as upstream:
            await upstream.send(BeginTurn("item_1"))
            for frame in frames(pcm, 16000):
                await upstream.send(AppendAudio(frame))
            first = await upstream.receive()  # no commit sent yet
            assert isinstance(first, TranscriptDelta) and first.item_id == "item_1"
            await upstream.send(Commit("item_1"))
            rest = []
            while not isinstance(event := await upstream.receive(), TranscriptCompleted):
                rest.append(event)
    assert event.transcript == first.delta + "".join(e.delta for e in rest)  # type: ignore[union-attr]
    assert len(rest) >= 1


async def test_only_english_is_accepted() -> None:
    """A transcription language other than English is refused with what is supported."""
    with pytest.raises(CanonicalFailure, match="English only"):
        async with KIND.open_transcription(INFO, TranscriptionSpec(language="fr")):
            pass


@pytest.mark.slow
async def test_a_websocket_session_routes_to_pocketsphinx(serve) -> None:  # type: ignore[no-untyped-def]
    """Over the wire with a pocketsphinx backend: `completed` equals the engine's direct words."""
    server = await serve(
        make_config(backends='[[backends]]\nname = "asr"\nkind = "pocketsphinx"\n')
    )
    pcm = fixture_16k("speech_go_forward.wav")
    with trio.fail_after(60):
        direct = await transcribe_pcm16(pcm)
        client = await WsClient.connect(server.port, headers=[("OpenAI-Beta", "realtime=v1")])
        created = await client.recv()
        assert created["spear"]["backend"] == "asr"
        await client.send(
            {"type": "transcription_session.update", "session": {"turn_detection": None}}
        )
        await client.recv()
        for frame in frames(resample(pcm, 16000, 24000), 24000):
            await client.send({"type": "input_audio_buffer.append", "audio": b64(frame)})
        await client.send({"type": "input_audio_buffer.commit"})
        events = await client.recv_until("conversation.item.input_audio_transcription.completed")
        await client.close()
    assert events[-1]["transcript"] == direct


@pytest.mark.slow
async def test_pending_audio_is_counted_back_to_zero() -> None:
    """The backpressure count returns to 0 after a cleared turn and after a decoded one."""
    pcm = fixture_16k("speech_open_window.wav")
    with trio.fail_after(60):
        async with KIND.open_transcription(INFO, TranscriptionSpec()) as upstream:
            await upstream.send(BeginTurn("item_1"))
            opening = pcm[:16000]  # 1 s: speech has started, no pause yet, so nothing is cut
            await upstream.send(AppendAudio(opening))
            assert upstream._pending == opening.size
            await upstream.send(Clear())
            assert upstream._pending == 0
            await upstream.send(BeginTurn("item_2"))
            for frame in frames(pcm, 16000):
                await upstream.send(AppendAudio(frame))
            await upstream.send(Commit("item_2"))
            while not isinstance(await upstream.receive(), TranscriptCompleted):
                pass
            assert upstream._pending == 0


@pytest.mark.slow
async def test_clear_drops_segments_already_cut_from_the_turn() -> None:
    """A turn cut at a pause, then cleared: none of its words arrive; the next turn is intact."""
    two = fixture_16k("speech_two_utterances.wav")
    with trio.fail_after(60):
        async with KIND.open_transcription(INFO, TranscriptionSpec()) as upstream:
            await upstream.send(BeginTurn("cleared"))
            await upstream.send(AppendAudio(two))  # the inner pause cuts a segment at once
            await upstream.send(Clear())
            await upstream.send(BeginTurn("kept"))
            await upstream.send(AppendAudio(fixture_16k("speech_open_window.wav")))
            await upstream.send(Commit("kept"))
            events = []
            while not isinstance(event := await upstream.receive(), TranscriptCompleted):
                events.append(event)
            assert upstream._pending == 0
    assert all(e.item_id == "kept" for e in [*events, event])
    assert event.transcript
