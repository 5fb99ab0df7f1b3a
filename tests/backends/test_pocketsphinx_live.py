"""pocketsphinx_live: real decoding of espeak-ng speech, alone and through the gateway adapter."""

from __future__ import annotations

import importlib.util
import io
import shutil
import subprocess
from pathlib import Path

import msgspec
import numpy as np
import pytest
import soundfile
import trio
from numpy.typing import NDArray

from spear_rt.audio import resample
from spear_rt.backend import (
    AppendAudio,
    AudioInput,
    BeginTurn,
    Commit,
    InstanceInfo,
    OneShotRequest,
    TranscriptCompleted,
    TranscriptDelta,
    TranscriptionSpec,
    TranscriptionUpstream,
    UpstreamEvent,
)
from spear_rt.errors import CanonicalFailure
from spear_rt.ir import ErrorCode, Operation, Transport
from spear_rt_backends.pocketsphinx_live import (
    KIND,
    RATE_HZ,
    DecoderPool,
    PocketsphinxRecognizer,
    transcribe_pcm16,
)

pytestmark = pytest.mark.slow

GO_FORWARD = "go forward ten meters"
DIGITS = "one two three four five six seven eight nine zero"
MUSIC = "stop the music and turn on the lights"
LONG = (
    "the quick brown fox jumps over the lazy dog and then runs back into the forest "
    "to find its family before the sun goes down"
)
# Recorded speech (pocketsphinx's own test clip) kept beside the checkout, where present.
RECORDED_GO_FORWARD = Path(__file__).resolve().parents[3] / "shared" / "audio" / "goforward.raw"
POOL = DecoderPool(max_idle=2)
INFO = InstanceInfo(name="pocketsphinx-test")


def speak(text: str) -> tuple[NDArray[np.int16], int]:
    """espeak-ng's rendering of `text` (voice en-us+f2, 150 wpm) and its rate."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    wav = subprocess.run(
        ["espeak-ng", "-v", "en-us+f2", "-s", "150", "--stdout", text],
        capture_output=True,
        check=True,
    ).stdout
    pcm, rate = soundfile.read(io.BytesIO(wav), dtype="int16")
    return pcm, rate


@pytest.fixture(scope="module")
def speech() -> dict[str, NDArray[np.int16]]:
    """Each sentence spoken by espeak-ng, resampled 22050 -> 16000 Hz."""
    out = {}
    for text in (GO_FORWARD, DIGITS, MUSIC, LONG):
        pcm, rate = speak(text)
        out[text] = resample(pcm, rate, RATE_HZ)
    return out


async def stream_turn(
    upstream: TranscriptionUpstream, pcm: NDArray[np.int16], *, wait_for_delta: bool = False
) -> tuple[list[UpstreamEvent], int]:
    """Send a turn in 20 ms frames and commit; (its events, how many came before the commit)."""
    events: list[UpstreamEvent] = []
    await upstream.send(BeginTurn("item_1"))
    for start in range(0, pcm.size, 320):
        await upstream.send(AppendAudio(pcm[start : start + 320]))
    with trio.fail_after(120):
        if wait_for_delta:
            events.append(await upstream.receive())
        before_commit = len(events)
        await upstream.send(Commit("item_1"))
        while not events or isinstance(events[-1], TranscriptDelta):
            events.append(await upstream.receive())
    return events, before_commit


def deltas(events: list[UpstreamEvent]) -> str:
    return "".join(e.delta for e in events if isinstance(e, TranscriptDelta))


@pytest.mark.parametrize("text", [DIGITS, MUSIC])
def test_the_recognizer_gets_the_words(speech: dict[str, NDArray[np.int16]], text: str) -> None:
    """Sentences espeak-ng renders clearly come out word for word."""
    assert transcribe_pcm16(speech[text], pool=POOL) == text


@pytest.mark.skipif(
    not RECORDED_GO_FORWARD.exists(), reason="recorded clip not beside the checkout"
)
def test_recorded_go_forward_ten_meters() -> None:
    """pocketsphinx's recorded test clip gives its transcript."""
    pcm = np.fromfile(RECORDED_GO_FORWARD, dtype="<i2").astype(np.int16)
    assert transcribe_pcm16(pcm, pool=POOL) == GO_FORWARD


def test_the_result_does_not_depend_on_framing(speech: dict[str, NDArray[np.int16]]) -> None:
    """Audio in odd-sized pieces decodes exactly like one piece (fixed internal blocks)."""
    pcm = speech[GO_FORWARD]
    recognizer = PocketsphinxRecognizer(POOL)
    recognizer.start_utterance()
    hypotheses = [recognizer.feed(pcm[start : start + 517]) for start in range(0, pcm.size, 517)]
    final = recognizer.end_utterance()
    recognizer.close()
    assert final == transcribe_pcm16(pcm, pool=POOL)
    assert any(hypotheses) and None in hypotheses  # partials, and "unchanged" reports


@pytest.mark.parametrize("text", [GO_FORWARD, DIGITS, LONG])
async def test_same_words_through_the_gateway_as_the_engine_fed_directly(
    speech: dict[str, NDArray[np.int16]], text: str
) -> None:
    """20 ms frames through the adapter: deltas add up to the transcript, which is the engine's."""
    pcm = speech[text]
    direct = await trio.to_thread.run_sync(lambda: transcribe_pcm16(pcm, pool=POOL))
    async with KIND.open_transcription(INFO, TranscriptionSpec(language="en")) as upstream:
        events, _ = await stream_turn(upstream, pcm)
    completed = events[-1]
    assert isinstance(completed, TranscriptCompleted)
    assert completed.transcript == direct
    assert deltas(events) == completed.transcript
    assert all(e.item_id == "item_1" for e in events)


async def test_live_deltas_arrive_before_the_commit(speech: dict[str, NDArray[np.int16]]) -> None:
    """On a long utterance, settled words go out while the turn is still open."""
    pcm = speech[LONG]
    async with KIND.open_transcription(INFO, TranscriptionSpec()) as upstream:
        events, before_commit = await stream_turn(upstream, pcm, wait_for_delta=True)
    assert before_commit == 1 and isinstance(events[0], TranscriptDelta)
    completed = events[-1]
    assert isinstance(completed, TranscriptCompleted)
    assert deltas(events) == completed.transcript
    assert completed.transcript.startswith(events[0].delta)


def test_decoders_are_pooled() -> None:
    """A new recognizer reuses an idle decoder instead of loading another."""
    pool = DecoderPool(max_idle=1)
    first = PocketsphinxRecognizer(pool)  # prewarms one decoder
    silence = np.zeros(RATE_HZ // 2, dtype=np.int16)
    for _ in range(3):
        recognizer = PocketsphinxRecognizer(pool)
        recognizer.start_utterance()
        recognizer.feed(silence)
        assert recognizer.end_utterance() == ""
        recognizer.close()
    first.close()
    assert (pool.created, pool.idle()) == (1, 1)


def test_kind_declares_what_makes_it_routable() -> None:
    """speech_to_text over websocket (sessions) and http (one-shot), from the local-asr extra."""
    assert (KIND.name, KIND.extra) == ("pocketsphinx_live", "local-asr")
    assert Operation.SPEECH_TO_TEXT in KIND.defaults.ops
    assert {Transport.WEBSOCKET, Transport.HTTP} <= KIND.defaults.transports
    assert KIND.unavailable_reason(INFO) is None


def test_unavailable_without_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the pocketsphinx package the kind says which extra to install."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "pocketsphinx" else real_find_spec(name, *a),
    )
    reason = KIND.unavailable_reason(INFO)
    assert reason is not None and "spear-rt[local-asr]" in reason


@pytest.mark.parametrize("language", [None, "", "en", "en-US", "EN-us"])
def test_english_is_accepted(language: str | None) -> None:
    """Unset, "en" and "en-US" (any case) open a transcription."""
    KIND.open_transcription(INFO, TranscriptionSpec(language=language))  # raises if refused


@pytest.mark.parametrize("language", ["fr", "de-DE", "english"])
def test_languages_other_than_english_are_refused(language: str) -> None:
    """A non-English transcription is an InvalidRequest that names what is supported."""
    with pytest.raises(CanonicalFailure) as caught:
        KIND.open_transcription(INFO, TranscriptionSpec(language=language))
    assert caught.value.error.code is ErrorCode.INVALID_REQUEST
    assert "English" in caught.value.error.message and "'en'" in caught.value.error.message


async def test_one_shot_transcription_of_an_upload(speech: dict[str, NDArray[np.int16]]) -> None:
    """`call` resamples an upload to 16 kHz and answers OpenAI's {"text": ...}."""
    pcm, rate = speak(DIGITS)
    audio = AudioInput(b"", "digits.wav", "audio/wav", pcm=pcm, rate_hz=rate)
    request = OneShotRequest(Operation.SPEECH_TO_TEXT, {"model": "pocketsphinx"}, audio=audio)
    with trio.fail_after(60):
        response = await KIND.call(INFO, request)
    assert msgspec.json.decode(response.body) == {"text": DIGITS}
    assert response.usage is not None and response.usage.audio_seconds == pytest.approx(
        pcm.size / rate, abs=0.01
    )
