"""The espeak backend: real espeak-ng audio in every format, voices, limits and clear errors.

These tests need Debian's espeak-ng (CI installs it); without it they fail, never skip.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import soundfile

from spear_rt.audio import resample
from spear_rt.backend import InstanceInfo, OneShotRequest, OneShotResponse
from spear_rt.errors import BackendFailure, CanonicalFailure
from spear_rt.ir import ErrorCode, Feature, Operation
from spear_rt_backends import espeak_tts
from spear_rt_backends.espeak_tts import KIND, MISSING

INSTANCE = InstanceInfo(name="espeak")
RATES = {"mp3": 24000, "opus": 48000, "flac": 24000, "wav": 24000, "pcm": 24000}


@pytest.fixture(autouse=True)
def espeak_ng_installed() -> None:
    """Fail (not skip) when the binary is missing: CI installs it, so its absence is a bug."""
    assert shutil.which("espeak-ng"), "espeak-ng is not installed: apt-get install espeak-ng"


async def speak(
    text: str, fmt: str = "wav", instance: InstanceInfo = INSTANCE, **extra: Any
) -> OneShotResponse:
    payload = {"model": "tts-1", "input": text, "voice": "alloy", "response_format": fmt, **extra}
    return await KIND.call(instance, OneShotRequest(Operation.TEXT_TO_SPEECH, payload))


def decode(response: OneShotResponse, fmt: str) -> tuple[np.ndarray, int]:
    """int16 samples and rate of an answer (raw pcm is s16le at 24 kHz)."""
    if fmt == "pcm":
        return np.frombuffer(response.body, dtype="<i2"), 24000
    info = soundfile.info(io.BytesIO(response.body))
    assert info.channels == 1
    data, rate = soundfile.read(io.BytesIO(response.body), dtype="int16")
    return data, rate


async def invalid(payload: dict[str, Any], instance: InstanceInfo = INSTANCE) -> str:
    with pytest.raises(CanonicalFailure) as info:
        await KIND.call(
            instance, OneShotRequest(Operation.TEXT_TO_SPEECH, {"model": "m", **payload})
        )
    assert info.value.error.code is ErrorCode.INVALID_REQUEST
    return info.value.error.message


def test_kind_declares_tts_with_voices_and_ssml() -> None:
    assert KIND.name == "espeak"
    assert KIND.defaults.ops == {Operation.TEXT_TO_SPEECH}
    assert {Feature.SUPPORTS_VOICES, Feature.SUPPORTS_SSML} <= KIND.defaults.features
    assert KIND.unavailable_reason(INSTANCE) is None


async def test_missing_binary_makes_the_instance_unavailable_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert KIND.unavailable_reason(INSTANCE) == MISSING
    assert "apt-get install espeak-ng" in MISSING
    with pytest.raises(BackendFailure, match="espeak-ng is not installed"):
        await speak("hello")


@pytest.mark.parametrize("fmt", list(RATES))
async def test_every_format_decodes_at_its_rate_and_is_speech(fmt: str) -> None:
    response = await speak("The quick brown fox jumps over the lazy dog.", fmt)
    data, rate = decode(response, fmt)
    assert rate == RATES[fmt]
    seconds = data.size / rate
    assert 1.0 < seconds < 6.0
    rms = float(np.sqrt(np.mean(data.astype(np.float64) ** 2)))
    assert rms > 300, f"{fmt}: near silence (rms {rms:.0f})"
    assert response.usage is not None and response.usage.characters == 44


async def test_content_types_and_containers() -> None:
    magic = {"mp3": (b"\xff", b"ID3"), "opus": (b"OggS",), "flac": (b"fLaC",), "wav": (b"RIFF",)}
    types = {"mp3": "audio/mpeg", "opus": "audio/ogg", "flac": "audio/flac", "wav": "audio/wav"}
    for fmt, prefixes in magic.items():
        response = await speak("hi", fmt)
        assert response.content_type == types[fmt]
        assert response.body.startswith(prefixes)
    opus = await speak("hi", "opus")
    assert soundfile.info(io.BytesIO(opus.body)).subtype == "OPUS"


async def test_duration_grows_with_the_text() -> None:
    short, _ = decode(await speak("Hello.", "pcm"), "pcm")
    longer, _ = decode(await speak("Hello. This sentence is a good deal longer.", "pcm"), "pcm")
    assert longer.size > 2 * short.size


async def test_speed_changes_the_speaking_rate() -> None:
    text = "one two three four five six seven"
    normal, _ = decode(await speak(text, "pcm"), "pcm")
    fast, _ = decode(await speak(text, "pcm", speed=2.0), "pcm")
    slow, _ = decode(await speak(text, "pcm", speed=0.5), "pcm")
    assert fast.size < 0.75 * normal.size < slow.size * 0.75


async def test_voices_openai_names_and_espeak_names() -> None:
    alloy = await speak("Voice test.", "pcm", voice="alloy")
    onyx = await speak("Voice test.", "pcm", voice="onyx")
    direct = await speak("Voice test.", "pcm", voice="en-gb+f3")
    assert alloy.body != onyx.body
    assert direct.body and direct.body not in (alloy.body, onyx.body)
    assert (await speak("Voice test.", "pcm", voice="alloy")).body == alloy.body


async def test_text_is_never_read_as_options() -> None:
    data, _ = decode(await speak("--help -v xx --stdout", "pcm"), "pcm")
    assert data.size > 24000 // 2


async def test_ssml_is_spoken_but_audio_elements_are_refused() -> None:
    plain, _ = decode(await speak("<speak>Hello world</speak>", "pcm"), "pcm")
    paused, _ = decode(
        await speak('<speak>Hello <break time="1500ms"/> world</speak>', "pcm"), "pcm"
    )
    assert paused.size > plain.size + 24000  # the break is honoured, the tags are not spoken
    message = await invalid({"input": '<speak><audio src="/etc/passwd"/>hi</speak>'})
    assert "<audio>" in message


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({"input": "hi", "response_format": "aac"}, "'aac' is not supported"),
        ({"input": "hi", "response_format": "ogg"}, "response_format must be one of"),
        ({"input": 42}, "`input` must be a string"),
        ({}, "you must provide `input`"),
        ({"input": ""}, "`input` is empty"),
        ({"input": "x" * 4097}, "at most 4096"),
        ({"input": "hi", "voice": "../../etc"}, "unknown voice"),
        ({"input": "hi", "voice": "-x"}, "unknown voice"),
        ({"input": "hi", "voice": "zz-qq"}, "espeak-ng has no voice 'zz-qq'"),
        ({"input": "hi", "speed": 0.1}, "`speed` must be a number from 0.25 to 4.0"),
    ],
)
async def test_bad_requests_are_invalid_with_a_clear_message(
    payload: dict[str, Any], needle: str
) -> None:
    assert needle in await invalid(payload)


async def test_max_chars_comes_from_the_instance_options() -> None:
    small = InstanceInfo(name="espeak-small", options={"max_chars": 10})
    assert "at most 10" in await invalid({"input": "eleven chars"}, small)
    assert (await speak("ten chars!", "pcm", small)).body


async def test_parallel_requests_share_a_bounded_number_of_processes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    running = peak = 0
    real_run = espeak_tts.run_off_loop

    async def counting_run(*args: Any, **kwargs: Any) -> Any:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            return await real_run(*args, **kwargs)
        finally:
            running -= 1

    monkeypatch.setattr(espeak_tts, "run_off_loop", counting_run)
    limited = InstanceInfo(name="espeak-two", options={"max_processes": 2})
    bodies: list[bytes] = []

    async def one(i: int) -> None:
        bodies.append((await speak(f"request number {i}", "pcm", limited)).body)

    async with anyio.create_task_group() as tg:
        for i in range(6):
            tg.start_soon(one, i)
    assert len(bodies) == 6 and all(bodies)
    assert peak == 2


@pytest.mark.slow
async def test_pocketsphinx_hears_the_digits_espeak_spoke() -> None:
    """The audio is real speech: an independent recognizer gets the words back (mp3 path)."""
    from pocketsphinx import Decoder

    response = await speak("one two three four five", "mp3", voice="nova", speed=150 / 175)
    data, rate = decode(response, "mp3")

    def recognize() -> str:
        decoder = Decoder(samprate=16000)
        decoder.start_utt()
        decoder.process_raw(resample(data, rate, 16000).tobytes(), full_utt=True)
        decoder.end_utt()
        hyp = decoder.hyp()
        return hyp.hypstr if hyp is not None else ""

    assert await anyio.to_thread.run_sync(recognize) == "one two three four five"


def test_the_kind_serves_one_event_loop_after_another() -> None:
    """The kind is one object per process; its process limiter must not outlive a loop (it
    did: the asyncio run after a trio run failed with "must be called from async context")."""
    for backend in ("trio", "asyncio", "trio"):
        response = anyio.run(speak, "hello", backend=backend)
        assert decode(response, "wav")[0].size > 0


async def test_a_cancelled_run_kills_its_process(tmp_path: Path) -> None:
    """The process is started off the loop; cancelling the request kills it (and it is reaped)."""
    pidfile = tmp_path / "pid"
    args = ["sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"]
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(espeak_tts.run_off_loop, args, b"")
            while not (pidfile.exists() and pidfile.read_text().strip()):  # noqa: ASYNC110
                await anyio.sleep(0.01)  # another process's state: polled, bounded
            pid = int(pidfile.read_text())
            tg.cancel_scope.cancel()
        while True:  # reaped by the thread once killed
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            await anyio.sleep(0.01)
