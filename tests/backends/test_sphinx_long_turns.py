"""Long continuous speech streams through pocketsphinx: no pause is needed for progress.

A turn with no pause of `pause_ms` used to be queued for decoding only when it ended, and
sending stopped for good once 60 s were pending: 70 s of continuous speech gave no output,
then an idle close. Now an open turn is cut at its quietest point near `max_segment_ms`, so
deltas arrive while the speaker is still speaking, on every driver, in manual and server-VAD
mode. The audio here is single-utterance fixtures' speech joined with no gap (6 s, no 400 ms
pause anywhere), with `max_segment_ms` lowered to 2 s so the test stays short.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from numpy.typing import NDArray

from spear_rt.audio import frames, load_audio, resample
from spear_rt.backend import (
    AppendAudio,
    BeginTurn,
    Commit,
    InstanceInfo,
    TranscriptCompleted,
    TranscriptDelta,
    TranscriptionSpec,
)
from spear_rt.server.app import Server
from spear_rt_backends import sphinx
from spear_rt_backends.pocketsphinx_live import DecoderPool, PocketsphinxRecognizer
from spear_rt_backends.sphinx import KIND
from tests.conftest import WsClient, b64, make_config
from tests.server.test_realtime import BETA, COMMITTED, COMPLETED, DELTA, TRANSCRIPTION
from tests.server.test_resume import DRIVERS, IDS

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "audio"
SPHINX = (
    '[[backends]]\nname = "asr"\nkind = "pocketsphinx"\n'
    "options = { max_segment_ms = 2000, max_pending_ms = 4000 }\n"
)
LIVE = (
    '[[backends]]\nname = "asr"\nkind = "pocketsphinx_live"\noptions = { max_segment_ms = 2000 }\n'
)
# pocketsphinx on every driver; pocketsphinx_live (worker threads, no driver of its own) on trio.
RUNS = [(SPHINX, backend, driver) for backend, driver in DRIVERS] + [(LIVE, "trio", "auto")]
# Manual commit, with the opt-in for deltas before the commit (default: held until it).
EARLY_MANUAL = {
    "type": "transcription_session.update",
    "session": {"turn_detection": None, "spear": {"early_deltas": True}},
}
RUN_IDS = [f"pocketsphinx-{i}" for i in IDS] + ["pocketsphinx_live-trio"]


SPOKEN = ("speech_go_forward.wav", "speech_quick_brown_fox.wav", "speech_open_window.wav")


def continuous_speech() -> NDArray[np.int16]:
    """The speech of three one-utterance fixtures, joined with no gap (16 kHz, ~6 s)."""
    parts = []
    for item in json.loads((FIXTURES / "manifest.json").read_text()):
        if item["file"] not in SPOKEN:
            continue
        pcm, rate = load_audio(FIXTURES / item["file"])
        start, end = item["segments_ms"][0]
        parts.append(pcm[start * rate // 1000 : end * rate // 1000])
    return np.concatenate(parts)


async def speak(client: WsClient, pcm24k: NDArray[np.int16]) -> None:
    for frame in frames(pcm24k, 24000):
        await client.send({"type": "input_audio_buffer.append", "audio": b64(frame)})


async def first_delta(client: WsClient) -> list[dict[str, Any]]:
    """Events up to the first delta; none of them is a commit."""
    events = await client.recv_until(DELTA)
    assert COMMITTED not in [e["type"] for e in events]
    return events


def transcript_of(events: list[dict[str, Any]]) -> tuple[str, str]:
    deltas = "".join(e["delta"] for e in events if e["type"] == DELTA)
    [completed] = [e["transcript"] for e in events if e["type"] == COMPLETED]
    return deltas, completed


async def manual_turn(port: int, speech: NDArray[np.int16]) -> tuple[str, str]:
    """Manual commit: deltas before the commit, then completed (= the deltas joined)."""
    client = await WsClient.connect(port, TRANSCRIPTION, headers=BETA)
    async with client:
        await client.recv()
        await client.send(EARLY_MANUAL)
        await client.recv()
        await speak(client, speech)
        events = await first_delta(client)  # no commit was sent yet
        await client.send({"type": "input_audio_buffer.commit"})
        events += await client.recv_until(COMPLETED)
        return transcript_of(events)


async def server_vad_turn(port: int, speech: NDArray[np.int16]) -> tuple[str, str]:
    """Server VAD: deltas while the utterance goes on; its end (silence) completes it."""
    client = await WsClient.connect(port, TRANSCRIPTION, headers=BETA)
    async with client:
        await client.recv()
        await speak(client, speech)
        events = await first_delta(client)  # the VAD cannot have committed: no silence yet
        await speak(client, np.zeros(24000 * 3 // 2, dtype=np.int16))
        events += await client.recv_until(COMPLETED)
        return transcript_of(events)


@pytest.mark.slow
@pytest.mark.parametrize(("backends", "backend", "driver"), RUNS, ids=RUN_IDS)
def test_a_long_turn_without_a_pause_streams(backends: str, backend: str, driver: str) -> None:
    """Both turn modes on a real pocketsphinx: a delta before the turn ends, then completed."""
    speech = resample(continuous_speech(), 16000, 24000)

    async def main() -> list[tuple[str, str]]:
        config = make_config(server=f'driver = "{driver}"', backends=backends)
        server = Server(config)
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            assert server.port is not None
            with anyio.fail_after(60):
                results = [
                    await manual_turn(server.port, speech),
                    await server_vad_turn(server.port, speech),
                ]
            tg.cancel_scope.cancel()
        return results

    results = anyio.run(main, backend=backend)
    assert len(results) == 2
    for deltas, completed in results:
        assert completed and deltas == completed  # append-only: the deltas make it up
        assert len(completed.split()) >= 10


@pytest.mark.slow
async def test_more_continuous_speech_than_the_pending_bound_goes_through() -> None:
    """6 s with no pause against 2 s of pending room: every send returns (it used to wait
    for good once the open turn alone filled the bound), deltas come in order, then completed."""
    info = InstanceInfo(name="asr-long", options={"max_segment_ms": 1000, "max_pending_ms": 2000})
    speech = continuous_speech()
    deltas: list[str] = []
    done: list[str] = []
    with anyio.fail_after(60):
        async with KIND.open_transcription(info, TranscriptionSpec()) as upstream:

            async def read() -> None:
                while not isinstance(event := await upstream.receive(), TranscriptCompleted):
                    assert isinstance(event, TranscriptDelta)
                    deltas.append(event.delta)
                done.append(event.transcript)

            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                await upstream.send(BeginTurn("item_1"))
                for frame in frames(speech, 16000):
                    await upstream.send(AppendAudio(frame))
                assert upstream._pending <= 2000 * 16 + 320
                await upstream.send(Commit("item_1"))
    assert len(deltas) >= 4  # about one per 1 s segment
    assert done == ["".join(deltas)]


def test_the_quietest_cut_is_in_the_last_window_at_its_quietest_frame() -> None:
    """Loud audio with one quiet 20 ms frame in the window: the cut lands inside that frame;
    no quiet frame: the cut is still inside the window (never after the audio's end)."""
    rng = np.random.default_rng(0)
    loud = rng.integers(-8000, 8000, 16000 * 4, dtype=np.int16)
    quiet = loud.copy()
    quiet[50_000:50_320] //= 100
    cut = sphinx.quietest_cut(quiet, window=16000)
    assert 50_000 <= cut <= 50_320
    anywhere = sphinx.quietest_cut(loud, window=16000)
    assert 16000 * 3 <= anywhere <= loud.size
    assert (
        sphinx.quietest_cut(quiet, window=8000) >= 16000 * 4 - 8000
    )  # outside the window: ignored
    assert sphinx.quietest_cut(loud[:100], window=16000) == 100


@pytest.mark.slow
def test_the_live_recognizer_decodes_a_long_turn_in_bounded_engine_segments() -> None:
    """pocketsphinx_live: 6 s without a pause and 2 s segments end at least two engine
    utterances (memory grows with one, ~0.4 MB/s), and framing still does not matter."""
    speech = continuous_speech()
    pool = DecoderPool(max_idle=1)

    def run(piece: int) -> tuple[str, int]:
        recognizer = PocketsphinxRecognizer(pool, prewarm=False, max_segment_ms=2000)
        recognizer.start_utterance()
        for start in range(0, speech.size, piece):
            recognizer.feed(speech[start : start + piece])
        segments = recognizer.segments
        return recognizer.end_utterance(), segments

    whole, segments = run(speech.size)
    assert segments >= 2 and len(whole.split()) >= 10
    assert run(517) == (whole, segments)
